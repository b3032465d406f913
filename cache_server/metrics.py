"""The cache service's Prometheus metrics, in its own registry (names fixed by the Grafana dashboard in
deploy/grafana).

No label carries an id: hits and misses are counted over all runs and questions; `rpo_cache_entries` is the
number of entries of the runs this process has served, refreshed at each scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.core.schemas.cache import PrefixResponse, UpdateResponse
from services.core.schemas.common import TOKEN_ID_BYTES


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.hits = Counter("rpo_cache_hits", "Prefix lookups that found an entry", registry=registry)
        self.misses = Counter("rpo_cache_misses", "Prefix lookups that found no entry", registry=registry)
        self.entries = Gauge(
            "rpo_cache_entries", "Entries held by the runs this server has served", registry=registry
        )
        self.updates = Counter(
            "rpo_cache_updates",
            "Epsilon-greedy updates applied, by which response was stored",
            ["choice"],
            registry=registry,
        )
        self.update_replays = Counter(
            "rpo_cache_update_replays",
            "Updates answered from the record of an earlier identical (step, question) update",
            registry=registry,
        )
        self.prefix_tokens = Counter(
            "rpo_cache_prefix_tokens", "Prefix tokens handed out by prefix retrieval", registry=registry
        )
        for choice in ("best", "other"):
            self.updates.labels(choice)

    def record_prefixes(self, response: PrefixResponse) -> None:
        hits = sum(1 for r in response.results if r.hit)
        self.hits.inc(hits)
        self.misses.inc(len(response.results) - hits)
        self.prefix_tokens.inc(sum(len(r.prefix_ids) for r in response.results) // TOKEN_ID_BYTES)

    def record_update(self, response: UpdateResponse) -> None:
        for r in response.results:
            if not r.applied:
                self.update_replays.inc()
            elif r.choice != "none":
                self.updates.labels(r.choice).inc()
