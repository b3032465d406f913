"""deploy/kubernetes/: both overlays render (services.cluster.kustomize), validate against the Kubernetes API
schemas bundled by kubernetes-validate with unknown fields rejected, wire the services the way the code
reads them (settings that exist, a headless Service the trainer's DNS discovery resolves, a Secret for the
token), keep Redis's persistence and the Grafana dashboard in step with the compose stack, and scale the
replica Deployment without any other manifest changing."""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.cli.main import build_parser
from services.cluster.kustomize import (
    DASHBOARD_CONFIGMAP,
    DASHBOARD_JSON,
    KustomizeError,
    dashboard_configmap,
    render,
)
from services.core.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
OVERLAYS = ("gpu", "cpu")
K8S_VERSION = kubernetes_validate.latest_version()


def by_key(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def container(doc: dict) -> dict:
    (only,) = pod_spec(doc)["containers"]
    return only


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_validates_strictly_against_the_current_api(overlay):
    docs = render(K8S / overlay)
    assert K8S_VERSION.split(".")[:2] >= ["1", "37"]
    kinds = sorted(by_key(docs))
    assert kinds == sorted(
        [
            ("ConfigMap", "rpo-run-config"),
            ("ConfigMap", "rpo-grafana-dashboard"),
            ("PersistentVolumeClaim", "rpo-models"),
            ("PersistentVolumeClaim", "rpo-runs"),
            ("Service", "rpo-redis"),
            ("StatefulSet", "rpo-redis"),
            ("Service", "rpo-cache"),
            ("Deployment", "rpo-cache"),
            ("Service", "rpo-rollout"),
            ("Deployment", "rpo-rollout"),
            ("Job", "rpo-trainer"),
            ("Service", "rpo-trainer"),
        ]
    )
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert errors == []


def test_the_validation_is_strict_an_unknown_field_or_a_wrong_type_fails():
    trainer = by_key(render(K8S / "gpu"))[("Job", "rpo-trainer")]
    bad = copy.deepcopy(trainer)
    container(bad)["gpus"] = 1  # not a field of a container
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(trainer)
    bad["spec"]["backoffLimit"] = "six"  # an integer field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_real_rpo_commands_with_settings_that_exist(overlay, monkeypatch):
    docs = by_key(render(K8S / overlay))
    parser = build_parser()
    for key in [("Deployment", "rpo-cache"), ("Deployment", "rpo-rollout"), ("Job", "rpo-trainer")]:
        c = container(docs[key])
        args = parser.parse_args(c["args"])
        assert args.config == "/configs/run.yaml", key
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/configs"] == "configs"
        literal = {e["name"]: e["value"] for e in c["env"] if "value" in e and e["name"].startswith("RPO_")}
        for name in list(literal):
            if "$(" in literal[name]:
                literal.pop(name)
        for name, value in literal.items():
            monkeypatch.setenv(name, value)
        cfg = load_config(None)  # an RPO_<SECTION>__<FIELD> that names no setting fails here
        for name, value in literal.items():
            if "__" in name:
                section, field = name[len("RPO_") :].lower().split("__")
                assert str(getattr(getattr(cfg, section), field)) == value, name
        for name in literal:
            monkeypatch.delenv(name)
        token = [e for e in c["env"] if e["name"] == "RPO_API_TOKEN"]
        assert token == [
            {
                "name": "RPO_API_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "rpo-secrets", "key": "api-token"}},
            }
        ], key
    run_yaml = yaml.safe_load(docs[("ConfigMap", "rpo-run-config")]["data"]["run.yaml"])
    assert run_yaml["model"]["path"] == "/models/policy"


def test_the_trainer_finds_the_replicas_through_a_headless_service_and_keeps_checkpoints_on_a_claim():
    docs = by_key(render(K8S / "gpu"))
    trainer, rollout = docs[("Job", "rpo-trainer")], docs[("Deployment", "rpo-rollout")]
    env = {e["name"]: e.get("value") for e in container(trainer)["env"]}
    host, port = env["RPO_SERVICES__ROLLOUT_DISCOVERY"].removeprefix("dns://").split(":")
    service = docs[("Service", host)]
    assert service["spec"]["clusterIP"] == "None"  # one A record per ready pod, not a virtual IP
    assert service["spec"]["selector"].items() <= rollout["spec"]["template"]["metadata"]["labels"].items()
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert int(port) in {p["containerPort"] for p in container(rollout)["ports"]}
    weight_port = int(
        {e["name"]: e.get("value") for e in container(rollout)["env"]}["RPO_ROLLOUT__WEIGHT_PORT"]
    )
    assert weight_port in {p["port"] for p in service["spec"]["ports"]}
    assert env["RPO_SERVICES__CACHE_URL"] == "http://rpo-cache:8100"
    assert ("Service", "rpo-cache") in docs
    # checkpoints: the run directory is on the rpo-runs claim, and the trainer resumes from it
    runs_mount = next(m for m in container(trainer)["volumeMounts"] if m["name"] == "runs")
    assert env["RPO_TRAIN__RUN_DIR"].startswith(runs_mount["mountPath"] + "/")
    volume = next(v for v in pod_spec(trainer)["volumes"] if v["name"] == "runs")
    assert volume["persistentVolumeClaim"]["claimName"] == "rpo-runs"
    assert "--resume" in container(trainer)["args"]
    assert pod_spec(trainer)["restartPolicy"] == "OnFailure"
    # one GPU per replica pod (scaling asks for GPUs), one for the trainer
    assert container(rollout)["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container(trainer)["resources"]["limits"] == {"nvidia.com/gpu": 1}
    cpu = by_key(render(K8S / "cpu"))
    for key in [("Deployment", "rpo-rollout"), ("Job", "rpo-trainer")]:
        assert "limits" not in container(cpu[key]).get("resources", {})
        assert {"name": "DS_ACCELERATOR", "value": "cpu"} in container(cpu[key])["env"]
        assert container(cpu[key])["image"].startswith("rpo-rl-cpu:")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rpo_pod_is_scraped_on_the_port_it_serves_metrics_on(overlay):
    docs = by_key(render(K8S / overlay))
    for key in [("Deployment", "rpo-cache"), ("Deployment", "rpo-rollout"), ("Job", "rpo-trainer")]:
        annotations = docs[key]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) in {
            p["containerPort"] for p in container(docs[key])["ports"]
        }
    trainer_env = {e["name"]: e.get("value") for e in container(docs[("Job", "rpo-trainer")])["env"]}
    assert trainer_env["RPO_TRAIN__METRICS_HOST"] == "0.0.0.0"
    assert load_config(None).train.metrics_port == 9100


def test_the_prometheus_config_scrapes_the_services_under_the_dashboards_job_names():
    promtool = shutil.which("promtool")
    assert promtool, "scripts/test.sh installs prometheus (promtool) from the OS packages"
    config = K8S / "prometheus.yml"
    done = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = yaml.safe_load(config.read_text())["scrape_configs"]
    compose = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"
    ]
    assert [j["job_name"] for j in jobs] == [j["job_name"] for j in compose]
    docs = by_key(render(K8S / "gpu"))
    workloads = {"rpo-cache": ("Deployment", "rpo-cache"), "rpo-rollout": ("Deployment", "rpo-rollout")}
    workloads["rpo-trainer"] = ("Job", "rpo-trainer")
    for job in jobs:
        if "static_configs" in job:
            (target,) = job["static_configs"][0]["targets"]
            host, port = target.split(":")
        else:
            (sd,) = job["dns_sd_configs"]
            (host,), port = sd["names"], sd["port"]
            assert docs[("Service", host)]["spec"]["clusterIP"] == "None"  # one A record per pod
        service, workload = docs[("Service", host)], docs[workloads[job["job_name"]]]
        assert (
            service["spec"]["selector"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        )
        assert int(port) in {p["containerPort"] for p in container(workload)["ports"]}
        assert workload["metadata"]["labels"]["app.kubernetes.io/name"] == job["job_name"]


def test_redis_keeps_the_compose_stacks_persistence_on_its_own_claim():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["redis"]
    redis = by_key(render(K8S / "gpu"))[("StatefulSet", "rpo-redis")]
    assert container(redis)["command"] == compose["command"]
    command = shlex.join(container(redis)["command"])
    assert "--appendonly yes" in command
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container(redis)["volumeMounts"]


def test_the_dashboard_configmap_is_the_grafana_dashboard():
    assert DASHBOARD_CONFIGMAP.read_text() == dashboard_configmap(), (
        "deploy/kubernetes/base/grafana-dashboard.yaml is stale: python -m services.cluster.kustomize dashboard"
    )
    (doc,) = [d for d in yaml.safe_load_all(DASHBOARD_CONFIGMAP.read_text()) if d]
    assert json.loads(doc["data"]["rpo.json"]) == json.loads(DASHBOARD_JSON.read_text())
    assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_scaling_the_replica_deployment_changes_no_other_manifest(tmp_path):
    overlay = tmp_path / "scaled"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(K8S / "gpu")],
                "replicas": [{"name": "rpo-rollout", "count": 7}],
            }
        )
    )
    before, after = by_key(render(K8S / "gpu")), by_key(render(overlay))
    assert before.keys() == after.keys()
    changed = [key for key in before if before[key] != after[key]]
    assert changed == [("Deployment", "rpo-rollout")]
    scaled = copy.deepcopy(after[("Deployment", "rpo-rollout")])
    assert scaled["spec"].pop("replicas") == 7
    original = copy.deepcopy(before[("Deployment", "rpo-rollout")])
    original["spec"].pop("replicas")
    assert scaled == original


def test_the_renderer_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [], "namePrefix": "x-"}))
    with pytest.raises(KustomizeError, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [str(K8S / "base")], "replicas": [{"name": "nope", "count": 2}]})
    )
    with pytest.raises(KustomizeError, match="'nope'"):
        render(tmp_path)
