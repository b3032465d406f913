"""The deploy files are valid for the tools that read them, and agree with what our services export."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.core.config import GpusSection
from services.core.gpu_claims import GpuPlacementError, plan_gpus

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "rpo.json"


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


LAYOUTS = {
    # GPUs on the box: (the .env lines docs/deploy.md gives for it, `--scale rollout=N`)
    1: ({"RPO_ROLLOUT_GPU_MEMORY": "0.4"}, 1),
    2: ({}, 1),
    4: ({}, 3),
}
SECRETS = {"RPO_API_TOKEN": "test-token", "GRAFANA_ADMIN_PASSWORD": "test-password"}


def render_compose(env: dict[str, str]) -> subprocess.CompletedProcess:
    assert shutil.which("docker-compose"), "scripts/test.sh installs docker-compose from the OS packages"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPO_", "GRAFANA_"))}
    return subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**clean, **env},
    )


@pytest.mark.parametrize("gpus", sorted(LAYOUTS))
def test_compose_file_is_valid_for_each_gpu_layout_and_places_every_process(gpus):
    layout, replicas = LAYOUTS[gpus]
    out = render_compose({**SECRETS, **layout})
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert {"redis", "cache", "rollout", "trainer", "prometheus", "grafana"} <= set(services)
    rollout, trainer = services["rollout"], services["trainer"]
    # --scale rollout=N needs replicas without a fixed name or host port
    assert "container_name" not in rollout and "ports" not in rollout
    for gpu_service in (rollout, trainer):  # each sees every GPU and claims its own at start
        device = gpu_service["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["capabilities"] == ["gpu"] and device["count"] == "all"
        assert gpu_service["environment"]["RPO_GPUS__CLAIM_DIR"] == "/run/rpo-gpus"
        assert any(str(v).endswith(":/run/rpo-gpus") or "rpo-gpus" in str(v) for v in gpu_service["volumes"])
    assert trainer["environment"]["RPO_SERVICES__ROLLOUT_DISCOVERY"] == "dns://rollout:8200"
    assert trainer["command"][-1] == "--resume" and trainer["restart"] == "on-failure"
    assert all(services[n].get("restart") for n in ("redis", "cache", "rollout", "prometheus", "grafana"))
    # the trainer pushes weights to each replica's weight port, which must be reachable on the network
    assert rollout["environment"]["RPO_ROLLOUT__WEIGHT_PORT"] == "8201" and "8201" in rollout["expose"]
    assert services["cache"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert {d["condition"] for d in trainer["depends_on"].values()} == {"service_healthy"}
    assert all("healthcheck" in services[n] for n in ("redis", "cache", "rollout"))
    # nothing is published beyond this machine by default
    published = [str(port) for s in services.values() for port in s.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published), published
    # the GPU plan of this layout: the trainer and `replicas` replicas, each replica on a GPU of its own
    # (one GPU: shared with the trainer, with the split the layout sets)
    env = rollout["environment"]
    section = GpusSection(
        trainer=int(env["RPO_GPUS__TRAINER"]), per_replica=int(env["RPO_GPUS__PER_REPLICA"])
    )
    memory = float(env["RPO_ROLLOUT__GPU_MEMORY_UTILIZATION"])
    devices = [str(i) for i in range(gpus)]
    trainer_plan = plan_gpus("trainer", devices, section, memory, set())
    taken: set[str] = set()
    for _ in range(replicas):
        plan = plan_gpus("rollout", devices, section, memory, taken)
        assert plan.shared_with_trainer == (gpus == 1)
        taken.update(plan.devices)
    assert gpus == 1 or not taken & set(trainer_plan.devices)
    with pytest.raises(GpuPlacementError):  # one replica more than the layout has GPUs for
        plan_gpus("rollout", devices, section, memory, taken)


def test_compose_refuses_to_start_without_the_api_token_or_grafanas_password():
    out = render_compose({"GRAFANA_ADMIN_PASSWORD": "x"})
    assert out.returncode != 0 and "set RPO_API_TOKEN in .env" in out.stderr
    out = render_compose({"RPO_API_TOKEN": "x"})
    assert out.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD in .env" in out.stderr
    example = (REPO / ".env.example").read_text()
    compose = COMPOSE.read_text()
    for variable in set(re.findall(r"\$\{([A-Z_]+)", compose)):
        assert f"\n{variable}=" in example, f".env.example does not list {variable}"


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
        "rpo_train_generated_tokens_total",
        "rpo_train_reused_prefix_tokens_total",
        "rpo_train_phase_seconds",
        "rpo_eval_accuracy",
        "rpo_train_step_seconds",
        "rpo_train_steps_total",
        "rpo_reward_mean",
        "rpo_accuracy",
        "rpo_http_request_duration_seconds",
    }
    assert names <= spec, names - spec
    # tokens saved in training, the step-time breakdown, policy lag and eval accuracy are shown
    assert {"rpo_train_generated_tokens_total", "rpo_train_reused_prefix_tokens_total"} <= names
    assert {
        "rpo_train_phase_seconds",
        "rpo_policy_version",
        "rpo_train_policy_version",
        "rpo_eval_accuracy",
    } <= names
    exprs = " ".join(dashboard_queries())
    assert "vllm:kv_cache_usage_perc" in exprs and "vllm:num_requests_waiting" in exprs
