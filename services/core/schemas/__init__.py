"""Typed wire schemas shared by servers and clients: `common` (errors, token ids, encodings), `cache`
(the experience cache service), `rollout` (the rollout service). Importable without FastAPI, torch or vLLM."""
