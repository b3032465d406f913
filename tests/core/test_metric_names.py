"""A metric name means one thing: the trainer, a rollout replica and the cache server each export their own
families, and no name is defined by two of them (Prometheus would merge them under one query, and the
dashboard would add a replica's served version to the trainer's, or count decoded tokens twice)."""

from prometheus_client import CollectorRegistry

from cache_server.metrics import CacheMetrics
from services.rollout.metrics import RolloutMetrics
from trainer.telemetry.metrics import TrainerMetrics


def _names(registry: CollectorRegistry) -> set[str]:
    return {family.name for family in registry.collect()}


def test_no_metric_name_is_defined_by_two_processes():
    trainer = _names(TrainerMetrics().registry)
    rollout, cache = CollectorRegistry(), CollectorRegistry()
    RolloutMetrics(rollout)
    CacheMetrics(cache)
    rollout_names, cache_names = _names(rollout), _names(cache)
    assert len(trainer) >= 10 and len(rollout_names) >= 4 and len(cache_names) >= 4
    assert not trainer & rollout_names, trainer & rollout_names
    assert not trainer & cache_names, trainer & cache_names
    assert not rollout_names & cache_names, rollout_names & cache_names
    # the replicas' own counters and gauges keep the dashboard's names; the trainer's say they are its own
    assert {"rpo_generated_tokens", "rpo_policy_version", "rpo_weight_sync_seconds"} <= rollout_names
    assert {
        "rpo_train_generated_tokens",
        "rpo_train_policy_version",
        "rpo_train_weight_sync_seconds",
    } <= trainer
    # every family the trainer exports carries its prefix, the reward and accuracy gauges included
    assert all(name.startswith("rpo_train_") for name in trainer), sorted(
        n for n in trainer if not n.startswith("rpo_train_")
    )
    assert {
        "rpo_train_reward_mean",
        "rpo_train_reward_function_mean",
        "rpo_train_accuracy",
        "rpo_train_eval_accuracy",
        "rpo_train_rollout_retries",
    } <= trainer
