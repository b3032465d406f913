"""Where a run's model comes from: `model.path` resolved to a directory (`model_path`: a local HF directory, a
Hub id through the core's `hub`, or a built-in tiny model), the embedded tiny Qwen2 built and cached here
(`tiny_model`, `tiny_model_cache`), `rpo model tiny` / `rpo data synth` (`make`) and the memory-plan check
every heavy command runs first (`fit_plan`).
"""
