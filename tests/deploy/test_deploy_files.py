"""The deploy files are valid for the tools that read them, and agree with what our services export."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "rpo.json"


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_compose_file_is_valid_for_docker_compose():
    assert shutil.which("docker-compose"), "scripts/test.sh installs docker-compose from the OS packages"
    out = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    services = resolved["services"]
    assert {"redis", "cache", "rollout", "trainer", "prometheus", "grafana"} <= set(services)
    rollout = services["rollout"]
    # --scale rollout=N needs replicas without a fixed name or host port
    assert "container_name" not in rollout and "ports" not in rollout
    assert rollout["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["trainer"]["environment"]["RPO_SERVICES__ROLLOUT_DISCOVERY"] == "dns://rollout:8200"
    # the trainer pushes weights to each replica's weight port, which must be reachable on the network
    assert rollout["environment"]["RPO_ROLLOUT__WEIGHT_PORT"] == "8201" and "8201" in rollout["expose"]
    assert services["cache"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {d["condition"] for d in services["trainer"]["depends_on"].values()} == {"service_healthy"}
    assert all("healthcheck" in services[n] for n in ("redis", "cache", "rollout"))


def test_prometheus_config_is_valid_and_finds_every_replica():
    assert shutil.which("promtool"), "scripts/test.sh installs prometheus from the OS packages"
    path = REPO / "deploy" / "prometheus" / "prometheus.yml"
    out = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = {j["job_name"]: j for j in yaml.safe_load(path.read_text())["scrape_configs"]}
    assert jobs["rpo-rollout"]["dns_sd_configs"][0]["names"] == ["rollout"]
    assert set(jobs) == {"rpo-cache", "rpo-rollout", "rpo-trainer"}


def test_dashboard_uses_only_metric_names_from_the_spec():
    names = set()
    for expr in dashboard_queries():
        names |= {m.removesuffix("_bucket") for m in re.findall(r"\brpo_[a-z_]+", expr)}
    spec = {
        "rpo_generated_tokens_total",
        "rpo_reused_prefix_tokens_total",
        "rpo_cache_hits_total",
        "rpo_cache_misses_total",
        "rpo_cache_entries",
        "rpo_cache_updates_total",
        "rpo_policy_version",
        "rpo_weight_sync_seconds",
        "rpo_train_policy_version",
        "rpo_train_weight_sync_seconds",
        "rpo_train_step_seconds",
        "rpo_train_steps_total",
        "rpo_reward_mean",
        "rpo_accuracy",
        "rpo_http_request_duration_seconds",
    }
    assert names <= spec, names - spec
    assert {"rpo_generated_tokens_total", "rpo_reused_prefix_tokens_total"} <= names  # tokens saved is shown
