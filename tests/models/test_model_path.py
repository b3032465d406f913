"""`services.models.model_path`: built-in names and local directories. (Which package may import which is
checked in test_layout.py.)"""

from pathlib import Path

import pytest

from services.models.model_path import resolve_model_path

REPO = Path(__file__).resolve().parents[2]


def test_builtin_name_resolves_to_the_cached_tiny_model(tiny_model_dir):
    assert resolve_model_path("builtin:tiny-random") == tiny_model_dir


def test_local_directory_is_taken_as_given(tiny_model_dir):
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.parametrize("spec", ["builtin:tiny-huge", "{tmp}"])
def test_unknown_builtin_or_directory_without_config_is_rejected(spec, tmp_path):
    with pytest.raises(ValueError, match="model.path"):
        resolve_model_path(spec.format(tmp=tmp_path))
