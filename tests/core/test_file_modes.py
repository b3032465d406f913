"""make_readable: what the compose stack's containers (another uid) need to read a model directory."""

from __future__ import annotations

import stat

import safetensors.torch
import torch

from services.core.file_modes import make_readable


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_saved_model_directory_becomes_readable_by_everyone_and_keeps_its_other_bits(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    weights = model / "model.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(weights))
    assert mode(weights) == 0o600  # what safetensors writes: the reason this module exists
    script = model / "sub" / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    model.chmod(0o700)
    (model / "sub").chmod(0o700)

    make_readable(model)

    assert mode(weights) == 0o644
    assert mode(script) == 0o744  # read added, the owner's execute bit kept, nothing taken away
    assert mode(model) == 0o755 and mode(model / "sub") == 0o755


def test_a_single_file_gets_read_bits_only_and_symlinks_are_left_alone(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("{}\n")
    target.chmod(0o600)
    make_readable(target)
    assert mode(target) == 0o644  # no execute bit on a plain file
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "link").symlink_to(outside)
    make_readable(tmp_path / "dir")
    assert mode(outside) == 0o600  # a link is not followed out of the tree
