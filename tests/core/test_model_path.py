"""`services.model_path`: built-in names and local directories; and the rule that no service imports the trainer."""

import ast
from pathlib import Path

import pytest

from services.model_path import resolve_model_path

REPO = Path(__file__).resolve().parents[2]


def test_builtin_name_resolves_to_the_cached_tiny_model(tiny_model_dir):
    assert resolve_model_path("builtin:tiny-random") == tiny_model_dir


def test_local_directory_is_taken_as_given(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.parametrize("spec", ["builtin:tiny-huge", "{tmp}"])
def test_unknown_builtin_or_directory_without_config_is_rejected(spec, tmp_path):
    with pytest.raises(ValueError, match="model.path"):
        resolve_model_path(spec.format(tmp=tmp_path))


@pytest.mark.parametrize("package", ["services", "cache_server"])
def test_services_do_not_import_the_trainer(package):
    offenders = []
    for source in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{source.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "trainer"]
    assert offenders == []
