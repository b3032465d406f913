"""Every metric of a rollout replica, in the replica's own registry (served at /metrics).

Names are the ones the dashboards use (deploy/grafana): `rpo_generated_tokens_total`,
`rpo_reused_prefix_tokens_total`, `rpo_policy_version`, `rpo_weight_sync_seconds`,
`rpo_rollout_requests_total`. Labels are bounded (mode, outcome, phase); never a question or request id.
vLLM's own engine metrics (`vllm:*`, recorded by its Prometheus stat logger in this process's default
registry) are re-exported on the same page by `VllmMetricsBridge`.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

WEIGHT_SYNC_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class VllmMetricsBridge(Collector):
    """Yields the `vllm:*` families of the process-wide default registry, so one scrape of the replica's
    /metrics shows the engine's queue, KV-cache usage, token and latency figures beside ours."""

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.generated_tokens = Counter(
            "rpo_generated_tokens",
            "Tokens decoded by this replica's engine (every sample of every request)",
            registry=registry,
        )
        self.reused_prefix_tokens = Counter(
            "rpo_reused_prefix_tokens",
            "Response tokens taken from the experience cache instead of decoded (tokens saved)",
            registry=registry,
        )
        self.policy_version = Gauge(
            "rpo_policy_version",
            "Policy version this replica serves (0: the weights it loaded)",
            registry=registry,
        )
        self.weight_sync_seconds = Histogram(
            "rpo_weight_sync_seconds",
            "One accepted weight push on this replica, from its first byte to the new version serving",
            buckets=WEIGHT_SYNC_BUCKETS_SECONDS,
            registry=registry,
        )
        self.weight_apply_seconds = Histogram(
            "rpo_weight_apply_seconds",
            "The apply part of a weight push: draining generation, loading, resetting the prefix cache",
            buckets=WEIGHT_SYNC_BUCKETS_SECONDS,
            registry=registry,
        )
        self.weight_pushes = Counter(
            "rpo_weight_pushes",
            "Weight pushes by outcome: applied, rejected (4xx, nothing changed) or failed (apply error)",
            ["outcome"],
            registry=registry,
        )
        self.weight_push_bytes = Counter(
            "rpo_weight_push_bytes", "Bytes of weight pushes received", registry=registry
        )
        self.rollout_requests = Counter(
            "rpo_rollout_requests",
            "Generation and rollout requests answered, by mode (rpo, full, generate) and outcome (ok, error)",
            ["mode", "outcome"],
            registry=registry,
        )
        self.rollout_groups = Counter(
            "rpo_rollout_groups",
            "Groups decoded, by cache outcome: hit (prefix reused), miss (full sample), off (full mode)",
            ["cache"],
            registry=registry,
        )
        self.cache_seeded = Counter(
            "rpo_rollout_cache_seeded",
            "Cache entries written by this replica after a miss",
            registry=registry,
        )
        for outcome in ("applied", "rejected", "failed"):
            self.weight_pushes.labels(outcome)
        for mode in ("rpo", "full", "generate"):
            for outcome in ("ok", "error"):
                self.rollout_requests.labels(mode, outcome)
        for cache in ("hit", "miss", "off"):
            self.rollout_groups.labels(cache)
        registry.register(VllmMetricsBridge())
