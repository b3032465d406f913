"""Everything that is not the trainer or the cache server: the shared core (`core/`), the rollout service
(`rollout/`), the `rpo` command line (`cli/`), the multi-process jobs (`supervisor/`) and the embedded demo
(`demo/`). See docs/architecture.md."""
