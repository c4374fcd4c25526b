"""Numbered run folders, ``results/<NNN>-<name>/``, that never overwrite one another."""

from __future__ import annotations

import re
from pathlib import Path

from utils.errors import InputError

_RUN_PATTERN = re.compile(r"^(\d{3,})-")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def make_run_dir(root, name: str) -> Path:
    """Create and return ``root/<NNN>-<name>`` with NNN one more than the largest number there.

    ``mkdir(exist_ok=False)`` is the arbiter: if two processes race for the same number, the loser
    takes the next one instead of writing into the winner's folder.
    """
    if not _NAME_PATTERN.match(name):
        raise InputError(f"run name {name!r} must be letters, digits, '_', '.', '-' (no path separators)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _RUN_PATTERN.match(p.name))]
    number = max(taken, default=-1) + 1
    while True:
        path = root / f"{number:03d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1
