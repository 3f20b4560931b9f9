"""Mounts and loop devices as context managers, and removal that never deletes through a mount."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from imagebuild.errors import WorkspaceError
from imagebuild.log import logger
from imagebuild.mountinfo import mounts_below
from imagebuild.run import run
from imagebuild.tree import empty_directory_fd

# The innermost active workspace's recorder: it notes every mount, loop device and partial
# output in its state file, so a later run can undo them if this one is killed with SIGKILL.
# A context variable, so a nested workspace's recorder is replaced by its parent's on exit.
RESOURCE_RECORDER: contextvars.ContextVar[Callable[[str, str], None] | None] = contextvars.ContextVar(
    "imagebuild_resource_recorder", default=None)


def note_resource(kind: str, value: Path) -> None:
    """Record ``value`` (kind: "mounts", "loops" or "outputs") with the active workspace."""
    recorder = RESOURCE_RECORDER.get()
    if recorder is not None:
        recorder(kind, str(value))


_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_in_private_namespace = False


def enter_private_mount_namespace() -> None:
    """Move this process (and the programs it starts) into a mount namespace of its own.

    Propagation is private, so no mount imagebuild makes is seen by the host, and the kernel
    drops them all when the last process in the namespace ends — also after a SIGKILL. Loop
    devices are not namespaced: the workspace records those.
    """
    global _in_private_namespace
    if _in_private_namespace:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise WorkspaceError(f"cannot make a private mount namespace: {os.strerror(err)}",
                             hint="imagebuild needs root (CAP_SYS_ADMIN) to build and inspect images"
                             if err == errno.EPERM else None)
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise WorkspaceError(f"cannot make the mount namespace private: {os.strerror(ctypes.get_errno())}")
    _in_private_namespace = True


def loops_backed_by(directory: Path) -> list[Path]:
    """Loop devices whose backing file lies below ``directory``."""
    out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False).stdout
    devices = json.loads(out or b"{}").get("loopdevices", [])
    base = Path(os.path.realpath(directory))
    return [Path(d["name"]) for d in devices
            if d.get("back-file") and base in Path(d["back-file"].removesuffix(" (deleted)")).parents]


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
    """Mount ``source`` on ``target`` for the duration of the block; always unmount.

    ``target`` must be a real directory (callers inside an image's tree get it from
    Tree.real_directory); a symlink there is refused, never mounted through.
    """
    if target.is_symlink():
        raise WorkspaceError(f"refusing to mount on {target}: it is a symlink")
    target.mkdir(parents=True, exist_ok=True)
    cmd: list[str | Path] = ["mount"]
    if bind:
        cmd += ["--bind"]
    if fstype:
        cmd += ["-t", fstype]
    if options:
        cmd += ["-o", options]
    cmd += [source, target]
    note_resource("mounts", target)
    run(cmd)
    try:
        yield target
    finally:
        # Anything mounted below our mount (by us or a chroot) goes first.
        for point in mounts_below(target):
            if run(["umount", point], check=False).returncode != 0:
                logger.warning("could not unmount %s; detaching it lazily", point)
        if mounts_below(target):
            logger.warning("could not unmount everything below %s; detaching it lazily", target)
            run(["umount", "--lazy", target], check=False)


class LoopDevice:
    """A loop device over a byte range of a file; leaving the block detaches it."""

    def __init__(self, backing: Path, *, offset: int = 0, size: int | None = None, sector_size: int = 512,
                 read_only: bool = False):
        self.backing = backing
        self.offset = offset
        self.size = size
        self.sector_size = sector_size
        self.read_only = read_only
        self.device: Path | None = None

    def __enter__(self) -> Path:
        cmd: list[str | Path] = ["losetup", "--find", "--show", "--offset", str(self.offset)]
        if self.size:
            cmd += ["--sizelimit", str(self.size)]
        if self.sector_size != 512:
            cmd += ["--sector-size", str(self.sector_size)]
        if self.read_only:
            cmd += ["--read-only"]
        cmd += [self.backing]
        self.device = Path(run(cmd).stdout.decode().strip())
        note_resource("loops", self.device)
        logger.debug("attached %s to %s (offset %d)", self.device, self.backing, self.offset)
        return self.device

    def __exit__(self, *exc: object) -> None:
        if self.device is not None:
            if not self.read_only:
                self._flush()
            if run(["losetup", "--detach", self.device], check=False).returncode != 0:
                logger.warning("could not detach loop device %s (backed by %s); the next run detaches it",
                               self.device, self.backing)
            self.device = None


    def _flush(self) -> None:
        """Write what programs left in the device's page cache (mcopy and mkfs.vfat do not
        fsync) through to the backing file. Their close flushes it only when it is the last
        one, and udev often still probes the device then: the detach is deferred and the
        writes land later, after the raw image was read (qemu-img compare caught a qcow2
        missing them)."""
        assert self.device is not None
        try:
            fd = os.open(self.device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # the audit's qemu-img compare would catch what is missing
            logger.warning("could not flush %s (backed by %s): %s", self.device, self.backing, exc.strerror)


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
    empty_directory(path)
    path.rmdir()


def empty_directory(path: Path) -> None:
    """Delete what ``path`` holds and keep the directory itself (mode, owner, xattrs).

    Iterative and by directory file descriptors: any depth, never through a symlink.
    """
    live = mounts_below(path)
    if live:
        raise WorkspaceError(
            f"refusing to delete below {path}: still mounted below it: {', '.join(map(str, live))}",
            hint="unmount these (umount -R) and delete the directory by hand, after checking what they are",
        )
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        empty_directory_fd(fd, path)
    finally:
        os.close(fd)
