"""Model directories this project writes are readable by every user.

safetensors (and with it `save_pretrained`) writes weights through a private temporary file, so a fresh
`model.safetensors` is mode 0600: a container running under another uid (the compose image's user, say)
could not serve the model. `make_readable` adds read permission for everyone (and traverse permission on
directories) to everything under a directory, and takes nothing away.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def make_readable(root: str | Path) -> None:
    """Add a+r to every file and a+rx to every directory under `root` (root included; a file works too)."""

    root = Path(root)
    _add(root, 0o555 if root.is_dir() else 0o444)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            _add(Path(dirpath) / name, 0o555)
        for name in filenames:
            _add(Path(dirpath) / name, 0o444)


def _add(path: Path, bits: int) -> None:
    if path.is_symlink():
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & bits != bits:
        path.chmod(mode | bits)
