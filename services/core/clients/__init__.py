"""Typed clients, beside the schemas they speak: `cache` (the cache server) and `rollout` (the replicas)."""
