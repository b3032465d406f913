"""Render deploy/kubernetes/ overlays the way `kubectl kustomize` does, for the subset those files use, and
write the Grafana dashboard ConfigMap from deploy/grafana/dashboards/rpo.json.

What the renderer reads in a kustomization.yaml: `resources` (files, or directories holding a
kustomization), `patches` (strategic-merge patches given by `path`, matched to a resource by kind and
name) and `replicas` (`name` and `count` of a Deployment or StatefulSet). Anything else in a
kustomization is refused with a message naming the key, so a file this renderer cannot read is never
rendered wrong silently. Strategic merge: maps merge key by key; lists whose items all carry a `name`
merge item by item on it (containers, env, volumes, ports by name), other lists are replaced. That is
kustomize's behaviour for every list the overlays patch: both overlays rendered the same as `kubectl
kustomize` (kustomize v5.5.0) on 2026-12-07, and the suite checks the result against the API schemas.

`python -m services.cluster.kustomize dashboard` rewrites deploy/kubernetes/base/grafana-dashboard.yaml;
`python -m services.cluster.kustomize render DIR` prints DIR's manifests as one YAML stream.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_JSON = REPO / "deploy" / "grafana" / "dashboards" / "rpo.json"
DASHBOARD_CONFIGMAP = REPO / "deploy" / "kubernetes" / "base" / "grafana-dashboard.yaml"
KNOWN_KEYS = {"apiVersion", "kind", "resources", "patches", "replicas"}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot read; the message names the file and the key."""


def render(directory: Path) -> list[dict[str, Any]]:
    """The manifests of the kustomization in `directory`, patches applied, in resource order."""
    directory = Path(directory)
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(spec) - KNOWN_KEYS)
    if unknown:
        raise KustomizeError(f"{path}: this renderer does not read {', '.join(unknown)}")
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            docs.extend(render(target))
        else:
            docs.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise KustomizeError(f"{path}: patches: only `path:` (a strategic-merge patch file) is read")
        for change in yaml.safe_load_all((directory / patch["path"]).read_text()):
            if change:
                _target(docs, change["kind"], change["metadata"]["name"], path).update(
                    strategic_merge(_target(docs, change["kind"], change["metadata"]["name"], path), change)
                )
    for item in spec.get("replicas", []):
        matches = [
            d
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == item["name"]
        ]
        if not matches:
            raise KustomizeError(f"{path}: replicas: no Deployment or StatefulSet named {item['name']!r}")
        for doc in matches:
            doc["spec"]["replicas"] = int(item["count"])
    return docs


def _target(docs: list[dict[str, Any]], kind: str, name: str, path: Path) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise KustomizeError(f"{path}: a patch names {kind}/{name}, which no resource defines")


def strategic_merge(base: Any, patch: Any) -> Any:
    """`patch` merged into a copy of `base` (see the module docstring for the rules)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        patched = {item["name"]: item for item in patch}
        names = {item["name"] for item in base}
        added = [copy.deepcopy(item) for item in patch if item["name"] not in names]
        # kustomize puts the items a patch adds before the base's (the order env's $(VAR) references read)
        return added + [
            strategic_merge(i, patched[i["name"]]) if i["name"] in patched else copy.deepcopy(i) for i in base
        ]
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def dashboard_configmap(dashboard: Path = DASHBOARD_JSON) -> str:
    """The ConfigMap holding the Grafana dashboard, as YAML text (label grafana_dashboard: the Grafana
    Helm chart's sidecar loads every ConfigMap that carries it)."""
    body = json.dumps(json.loads(dashboard.read_text()), indent=2) + "\n"
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "rpo-grafana-dashboard",
            "labels": {"app.kubernetes.io/part-of": "rpo", "grafana_dashboard": "1"},
        },
        "data": {"rpo.json": body},
    }
    dumper = type("LiteralDumper", (yaml.SafeDumper,), {})
    dumper.add_representer(_Literal, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|"))
    doc["data"]["rpo.json"] = _Literal(body)
    header = (
        "# Generated from deploy/grafana/dashboards/rpo.json by `python -m services.cluster.kustomize "
        "dashboard`;\n# do not edit (the test suite checks that the two agree).\n"
    )
    return header + yaml.dump(doc, Dumper=dumper, sort_keys=False, width=1000)


class _Literal(str):
    """A string YAML writes as a literal block (the dashboard stays readable in the ConfigMap)."""


def main(argv: list[str]) -> int:
    if argv[:1] == ["dashboard"] and len(argv) == 1:
        DASHBOARD_CONFIGMAP.write_text(dashboard_configmap())
        print(f"wrote {DASHBOARD_CONFIGMAP.relative_to(REPO)}")
        return 0
    if argv[:1] == ["render"] and len(argv) == 2:
        try:
            print(yaml.safe_dump_all(render(Path(argv[1])), sort_keys=False), end="")
        except (KustomizeError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    print("usage: python -m services.cluster.kustomize dashboard | render DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
