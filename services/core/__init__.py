"""The shared core every process imports: the run config, wire schemas and their clients, the retry policy,
the algorithm, rewards, data loading and the server kit. It imports neither torch, vLLM, DeepSpeed nor
transformers, nor any process package (tests/core/test_layout.py checks it)."""
