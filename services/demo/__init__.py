"""The embedded default: the tiny Qwen2-shaped model (built and warm-started locally, cached by content),
the model-path resolver for `builtin:` names, the `tiny-demo` preset, and `rpo model tiny` / `rpo data synth`."""
