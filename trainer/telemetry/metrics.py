"""Prometheus metrics of the trainer, all in one place, served on `/metrics` by rank 0.

Names follow the Grafana dashboard's queries: `rpo_train_` prefix, base units, `_total` on
counters only, ratios in 0..1, no unbounded labels. Each `TrainerMetrics` owns its own registry, so two
trainers in one process (tests) never collide; the HTTP server binds `train.metrics_host:metrics_port`
(port 0: any free port; None: no server).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from trainer.telemetry.records import StepRecord
from trainer.weights.transport import TRANSPORTS

log = logging.getLogger(__name__)

STEP_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
SYNC_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
LEARNER_GAUGES = (
    ("loss", "loss", "The last step's whole-batch objective"),
    ("kl", "kl", "Mean k3 KL to the reference over the last step's loss tokens"),
    ("grad_norm", "grad_norm", "Gradient norm before clipping, last update"),
    ("lr", "learning_rate", "Learning rate of the last update"),
    ("clip_fraction", "clipped_ratio", "Share of the last step's loss tokens whose ratio was clipped"),
    ("entropy", "entropy", "Mean entropy of the policy over the last step's loss tokens, nats"),
)
"""(field of the step record's `LearnerStats`, metric name after `rpo_train_`, help) of the learner's gauges."""
LENGTH_ROOM_GAUGES = (
    ("all_correct_groups_ratio", "all_correct_groups_ratio", "Share of the last step's groups all correct"),
    (
        "correct_length_varied_ratio",
        "correct_length_varied_ratio",
        "Share of the last step's groups with two or more correct responses whose correct lengths differ",
    ),
    (
        "correct_length_spread",
        "correct_length_spread_tokens",
        "Mean, over the last step's groups with two or more correct responses, of the longest minus the "
        "shortest correct response, in tokens",
    ),
    (
        "correct_below_group_mean",
        "correct_below_group_mean",
        "Correct responses of the last step shorter than their group's mean length: the ones the length-aware "
        "reward lifts above its floor when alpha > 0",
    ),
)
"""(field of the step record, metric name after `rpo_train_`, help): the room the length-aware reward had."""


class TrainerMetrics:
    """The trainer's gauges, counters and histograms, updated once per step from the step record."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter("rpo_train_steps", "Optimizer steps taken", registry=r)
        self.step_seconds = Histogram(
            "rpo_train_step_seconds",
            "Wall time of one training step",
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Gauge(
            "rpo_train_phase_seconds",
            "Wall time of each phase of the last step",
            ["phase"],
            registry=r,
        )
        self.policy_version = Gauge(
            "rpo_train_policy_version", "Policy version the trainer holds", registry=r
        )
        self.weight_sync_seconds = Histogram(
            "rpo_train_weight_sync_seconds",
            "Push of new weights to every replica until all serve them, by the transport that carried it "
            "(nccl, http, http_fallback: NCCL configured and failed)",
            ["transport"],
            buckets=SYNC_SECONDS_BUCKETS,
            registry=r,
        )
        for transport in TRANSPORTS:  # every transport's series exists from the start (0 pushes)
            self.weight_sync_seconds.labels(transport=transport)
        self.reward_mean = Gauge(
            "rpo_train_reward_mean", "Mean shaped reward of the last step's responses", registry=r
        )
        self.reward_function_mean = Gauge(
            "rpo_train_reward_function_mean",
            "Mean score of each reward function over the last step's responses",
            ["function"],
            registry=r,
        )
        self.accuracy = Gauge(
            "rpo_train_accuracy", "Share of the last step's responses that are correct", registry=r
        )
        self.eval_accuracy = Gauge(
            "rpo_train_eval_accuracy", "pass@1 on the held-out split at the last evaluation", registry=r
        )
        self.generated_tokens = Counter(
            "rpo_train_generated_tokens",
            "Response tokens decoded by the rollout replicas for training",
            registry=r,
        )
        self.reused_prefix_tokens = Counter(
            "rpo_train_reused_prefix_tokens",
            "Response tokens reused from the experience cache, in training batches",
            registry=r,
        )
        self.rollout_retries = Counter(
            "rpo_train_rollout_retries",
            "Rollout requests retried on another replica after a failure",
            registry=r,
        )
        self.cache_updates = Counter(
            "rpo_train_cache_updates", "Cache entries replaced by the step's updates", ["choice"], registry=r
        )
        self.step = Gauge(
            "rpo_train_step", "The run's last finished step (counts on across resumes)", registry=r
        )
        self.raw_reward_mean = Gauge(
            "rpo_train_raw_reward_mean",
            "Mean reward as written (weighted sum of the functions) of the last step's responses, before shaping",
            registry=r,
        )
        self.reward_std = Gauge(
            "rpo_train_reward_std",
            "Mean over the last step's groups of their shaped rewards' std",
            registry=r,
        )
        self.zero_std_groups = Gauge(
            "rpo_train_zero_std_groups_ratio",
            "Share of the last step's groups whose rewards are all equal (zero advantages)",
            registry=r,
        )
        self.reward_function_std = Gauge(
            "rpo_train_reward_function_std",
            "Standard deviation of each reward function's scores over the last step's responses",
            ["function"],
            registry=r,
        )
        self.response_tokens = Gauge(
            "rpo_train_response_length_tokens",
            "Response length of the last step's responses (stat: min, mean, max)",
            ["stat"],
            registry=r,
        )
        self.truncated = Gauge(
            "rpo_train_truncated_ratio",
            "Share of the last step's responses cut at their token budget (max_response_tokens, or RPO's "
            "suffix budget): finish `length`",
            registry=r,
        )
        self.length_room = {
            key: Gauge(f"rpo_train_{name}", help_text, registry=r)
            for key, name, help_text in LENGTH_ROOM_GAUGES
        }
        self.learner = {
            key: Gauge(f"rpo_train_{name}", help_text, registry=r) for key, name, help_text in LEARNER_GAUGES
        }
        self._server: Any = None
        self.port: int | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the `/metrics` HTTP server in a daemon thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        log.info("trainer metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe_step(self, record: StepRecord) -> None:
        """Update everything from one step's record."""
        self.steps.inc()
        self.step_seconds.observe(record.step_seconds)
        for phase, seconds in record.phases.items():
            self.phase_seconds.labels(phase=phase).set(seconds)
        self.policy_version.set(record.policy_version)
        if record.weight_sync_seconds is not None:
            transport = record.weight_transport or "http"
            self.weight_sync_seconds.labels(transport=transport).observe(record.weight_sync_seconds)
        self.reward_mean.set(record.reward_mean)
        for name, mean in record.reward_functions.items():
            self.reward_function_mean.labels(function=name).set(mean)
        self.accuracy.set(record.accuracy)
        self.generated_tokens.inc(record.generated_tokens)
        self.reused_prefix_tokens.inc(record.reused_prefix_tokens)
        self.rollout_retries.inc(record.rollout_retries)
        for choice, count in record.cache_updates.items():
            self.cache_updates.labels(choice=choice).inc(count)
        self.step.set(record.step)
        self.raw_reward_mean.set(record.raw_reward_mean)
        self.reward_std.set(record.reward_std)
        self.zero_std_groups.set(record.zero_std_groups_ratio)
        for name, std in record.reward_functions_std.items():
            self.reward_function_std.labels(function=name).set(std)
        for stat, value in (
            ("min", record.response_len_min),
            ("mean", record.response_len_mean),
            ("max", record.response_len_max),
        ):
            self.response_tokens.labels(stat=stat).set(value)
        self.truncated.set(record.truncated_ratio)
        for key, gauge in self.length_room.items():
            gauge.set(getattr(record, key))
        if record.learner is not None:
            for key, gauge in self.learner.items():
                gauge.set(getattr(record.learner, key))
