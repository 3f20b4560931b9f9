"""This process's mounts, read from /proc/self/mountinfo (its own mount namespace)."""

from __future__ import annotations

import os
from pathlib import Path


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[Path]:
    """Every mount point of this mount namespace, in mount order."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            points.append(Path(_unescape(line.split()[4])))
    return points


def mounts_below(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest (most recently mounted) first."""
    path = Path(os.path.realpath(path))
    found = [p for p in mount_points() if p == path or path in p.parents]
    return list(reversed(found))
