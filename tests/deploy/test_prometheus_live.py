"""A real Prometheus scrapes our real services, and every dashboard query evaluates against it.

The cache server runs here over the real Redis; the scrape config uses the job names of
deploy/prometheus/prometheus.yml, so the dashboard's queries run unchanged.
"""

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cache_server.app import create_app
from services.core.config import load_config
from services.core.server_kit import serve_in_thread
from tests.deploy.test_deploy_files import dashboard_queries
from trainer.telemetry.metrics import TrainerMetrics
from trainer.telemetry.records import LearnerStats, StepRecord


def _step_record() -> StepRecord:
    return StepRecord(
        step=1, policy_version=1, epoch=0, questions=8, trained_groups=8, samples=32, rounds=1, reward_mean=0.3,
        accuracy=0.5, response_len_mean=40.0, cache_hit_rate=1.0, generated_tokens=320, reused_prefix_tokens=960,
        decoded_tokens_per_sample=10.0, tokens_per_second=1000.0, rollout_retries=0, step_seconds=1.5,
        phases={"rollout": 0.5, "reward": 0.1, "train": 0.8, "weight_sync": 0.1, "cache": 0.1},
        weight_sync_seconds=0.1, weight_transport="http", cache_updates={"best": 5, "other": 3, "none": 0},
        reward_functions={"exact": 0.5, "format": 0.9}, reward_functions_std={"exact": 0.5, "format": 0.3},
        learner=LearnerStats(
            loss=0.01, kl=0.001, clip_fraction=0.0, entropy=0.9, grad_norm=0.7, lr=1e-6, tokens=300, sequences=32,
            micro_batches=2, model_tokens=900, seconds=0.8, policy_version=1,
        ),
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cache_target():
    app = create_app(load_config(None, ["services.run_id=prom-test"]), redis_url="redis://127.0.0.1:6379/0")
    with serve_in_thread(app) as url:
        httpx.post(
            f"{url}/v1/runs/prom-test/prefixes",
            json={"question_ids": ["q1"], "truncation_limit": 5},
            timeout=10,
        )
        yield url.removeprefix("http://")


@pytest.fixture
def trainer_target():
    """The trainer's real metrics endpoint, after one step's record."""
    metrics = TrainerMetrics()
    metrics.observe_step(_step_record())
    metrics.eval_accuracy.set(0.5)
    port = metrics.serve("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        metrics.close()


@pytest.fixture
def prometheus(tmp_path: Path, cache_target: str, trainer_target: str):
    assert shutil.which("prometheus"), "scripts/test.sh installs prometheus from the OS packages"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "rpo-cache", "static_configs": [{"targets": [cache_target]}]},
            {"job_name": "rpo-trainer", "static_configs": [{"targets": [trainer_target]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(base: str, expr: str) -> dict:
    resp = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    return resp.json()


def test_prometheus_scrapes_the_cache_server_and_every_dashboard_query_runs(prometheus):
    deadline = time.monotonic() + 60
    series = []
    while time.monotonic() < deadline:
        try:
            series = query(prometheus, 'rpo_cache_misses_total{job="rpo-cache"}')["data"]["result"]
        except (httpx.HTTPError, ValueError, KeyError):
            # ValueError: a Prometheus still starting answers 503 with a plain-text body, not JSON.
            series = []
        if series:
            break
        time.sleep(0.5)
    assert series, "Prometheus never scraped rpo_cache_misses_total from the cache server"
    assert float(series[0]["value"][1]) >= 1  # the miss the fixture caused
    # the trainer's series arrive too (the panels built on them must have data, not just parse)
    while (
        time.monotonic() < deadline
        and not query(prometheus, 'rpo_train_steps_total{job="rpo-trainer"}')["data"]["result"]
    ):
        time.sleep(0.5)
    empty = []
    for expr in dashboard_queries():
        expr = expr.replace("$__range", "5m")  # Grafana's variable; Prometheus needs a real range
        answer = query(prometheus, expr)
        assert answer["status"] == "success", (expr, answer)
        if (
            "rpo-trainer" in expr
            and "rpo-rollout" not in expr
            and "increase(" not in expr
            and "rate(" not in expr
        ):
            if not answer["data"]["result"]:
                empty.append(expr)
    assert not empty, f"trainer panels without data: {empty}"
    # the push of the step above is counted under its transport, the others at 0
    pushes = query(prometheus, 'sum by (transport) (rpo_train_weight_sync_seconds_count{job="rpo-trainer"})')
    by_transport = {r["metric"]["transport"]: float(r["value"][1]) for r in pushes["data"]["result"]}
    assert by_transport == {"http": 1.0, "nccl": 0.0, "http_fallback": 0.0}
