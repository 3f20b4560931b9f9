"""Mounts and loop devices as context managers, and removal that never deletes through a mount."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from imagebuild.errors import WorkspaceError
from imagebuild.log import logger
from imagebuild.run import run


# The active workspace's recorder: it notes every mount and loop device in its state file,
# so a later run can undo them if this one is killed with SIGKILL.
_resource_hook: Callable[[str, str], None] | None = None


def register_resource_hook(hook: Callable[[str, str], None] | None) -> None:
    global _resource_hook
    _resource_hook = hook


def _note(kind: str, value: Path) -> None:
    if _resource_hook is not None:
        _resource_hook(kind, str(value))


def loops_backed_by(directory: Path) -> list[Path]:
    """Loop devices whose backing file lies below ``directory``."""
    out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False).stdout
    devices = json.loads(out or b"{}").get("loopdevices", [])
    base = Path(os.path.realpath(directory))
    return [Path(d["name"]) for d in devices
            if d.get("back-file") and base in Path(d["back-file"].removesuffix(" (deleted)")).parents]


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


def umount(target: Path) -> None:
    run(["umount", target])


@contextlib.contextmanager
def mounted(
    source: str | Path,
    target: Path,
    *,
    fstype: str | None = None,
    options: str | None = None,
    bind: bool = False,
) -> Iterator[Path]:
    """Mount ``source`` on ``target`` for the duration of the block; always unmount."""
    target.mkdir(parents=True, exist_ok=True)
    cmd: list[str | Path] = ["mount"]
    if bind:
        cmd += ["--bind"]
    if fstype:
        cmd += ["-t", fstype]
    if options:
        cmd += ["-o", options]
    cmd += [source, target]
    _note("mounts", target)
    run(cmd)
    try:
        yield target
    finally:
        # Anything mounted below our mount (by us or a chroot) goes first.
        for point in mounts_below(target):
            run(["umount", point], check=False)
        if mounts_below(target):
            run(["umount", "--lazy", target], check=False)


class LoopDevice:
    """A loop device over a byte range of a file; leaving the block detaches it."""

    def __init__(self, backing: Path, *, offset: int = 0, size: int | None = None, sector_size: int = 512):
        self.backing = backing
        self.offset = offset
        self.size = size
        self.sector_size = sector_size
        self.device: Path | None = None

    def __enter__(self) -> Path:
        cmd: list[str | Path] = ["losetup", "--find", "--show", "--offset", str(self.offset)]
        if self.size is not None:
            cmd += ["--sizelimit", str(self.size)]
        if self.sector_size != 512:
            cmd += ["--sector-size", str(self.sector_size)]
        cmd += [self.backing]
        self.device = Path(run(cmd).stdout.decode().strip())
        _note("loops", self.device)
        logger.debug("attached %s to %s (offset %d)", self.device, self.backing, self.offset)
        return self.device

    def __exit__(self, *exc: object) -> None:
        if self.device is not None:
            run(["losetup", "--detach", self.device], check=False)
            self.device = None


def remove_tree(path: Path) -> None:
    """Delete ``path`` (recursively, never following a symlink), refusing loudly if anything
    is still mounted below it.

    Deleting through a live bind mount of /dev or / is how image builders have wiped hosts;
    the check runs immediately before the deletion, not earlier.
    """
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    live = mounts_below(path)
    if live:
        raise WorkspaceError(
            f"refusing to delete {path}: still mounted below it: {', '.join(map(str, live))}",
            hint="unmount these (umount -R) and delete the directory by hand, after checking what they are",
        )
    shutil.rmtree(path)


def empty_directory(path: Path) -> None:
    """Delete what ``path`` holds and keep the directory itself (mode, owner, xattrs)."""
    live = mounts_below(path)
    if live:
        raise WorkspaceError(
            f"refusing to empty {path}: still mounted below it: {', '.join(map(str, live))}",
            hint="unmount these first",
        )
    for entry in os.scandir(path):
        remove_tree(Path(entry.path))
