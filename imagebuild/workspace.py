"""The build's private scratch directory, removed on every exit path — even after a SIGKILL.

Each workspace carries ``state.json``: who owns it (pid), every mount and loop device made
inside it, and the partial outputs it is writing elsewhere. A run killed with SIGKILL cannot clean up, so the next run looks for workspaces
whose owner is gone and undoes what they recorded (and whatever else is still mounted below
them or attached to their files) before it starts.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from imagebuild.errors import ConfigError, WorkspaceError
from imagebuild.log import logger
from imagebuild.mountinfo import mounts_below
from imagebuild.mounts import RESOURCE_RECORDER, loops_backed_by, remove_tree
from imagebuild.run import run

STATE = "state.json"


class Workspace:
    """A fresh directory under ``base``; leaving the block removes it (never through a mount)."""

    def __init__(self, base: Path, name: str, keep: bool = False) -> None:
        self.base = base
        self.name = name
        self.keep = keep
        self.path: Path | None = None
        self.state: dict[str, object] = {}
        self._token: contextvars.Token[Callable[[str, str], None] | None] | None = None

    def __enter__(self) -> Path:
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            recover_stale_workspaces(self.base)
            self.path = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.base))
        except OSError as exc:
            raise WorkspaceError(
                f"cannot create a workspace under {self.base}: {exc.strerror}",
                hint="point --work-dir at a writable directory with a few GiB free",
            ) from exc
        self.state = {"pid": os.getpid(), "started": time.time(), "mounts": [], "loops": [], "outputs": []}
        try:
            self._save()
        except WorkspaceError:
            remove_tree(self.path)
            raise
        self._token = RESOURCE_RECORDER.set(self._record)
        logger.debug("workspace %s", self.path)
        return self.path

    def _record(self, kind: str, value: str) -> None:
        assert self.path is not None
        if Path(value) == self.path or self.path in Path(value).parents or kind in ("loops", "outputs"):
            entries = self.state[kind]
            assert isinstance(entries, list)
            entries.append(value)
            self._save()

    def _save(self) -> None:
        assert self.path is not None
        partial = self.path / f".{STATE}.partial"
        try:
            partial.write_text(json.dumps(self.state, indent=2) + "\n")
            partial.rename(self.path / STATE)
        except OSError as exc:
            raise WorkspaceError(f"cannot write the workspace state in {self.path}: {exc.strerror}",
                                 hint="free space there or point --work-dir at a writable directory "
                                 "with a few GiB free") from exc

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            RESOURCE_RECORDER.reset(self._token)
            self._token = None
        if self.path is None:
            return
        if self.keep:
            logger.info("keeping workspace %s", self.path)
            return
        remove_tree(self.path)
        self.path = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_workspaces(base: Path) -> None:
    """Undo what killed runs left under ``base``: mounts, loop devices, then their directories."""
    for workspace in sorted(p for p in base.iterdir() if p.is_dir()):
        state_file = workspace / STATE
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue  # not ours, or mid-creation by a live run
        pid = state.get("pid")
        if not isinstance(pid, int) or _alive(pid):
            continue
        cleaned = []
        for point in mounts_below(workspace):
            run(["umount", point], check=False)
            if point in mounts_below(workspace):
                run(["umount", "--lazy", point], check=False)
            cleaned.append(f"mount {point}")
        # The state file lists the loop devices the run attached; one no longer backed by a
        # file of this workspace has since been reused by someone else, so only those still
        # backed by our files are detached.
        for loop in sorted(loops_backed_by(workspace)):
            run(["losetup", "--detach", loop], check=False)
            cleaned.append(f"loop device {loop}")
        # Partial outputs (a .qcow2.partial-PID, a lock file) the killed run was writing.
        for output in state.get("outputs", []):
            path = Path(output)
            if isinstance(output, str) and path.is_file() and not path.is_symlink() and not _locked(path):
                path.unlink()
                cleaned.append(f"removed {path}")
        remove_tree(workspace)
        logger.warning("cleaned up after an earlier run (pid %d) that was killed: %s", pid,
                       ", ".join(cleaned + [f"removed {workspace}"]))


def _locked(path: Path) -> bool:
    """Whether a live process holds an flock on ``path`` (a lock file another run took over)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def pid_lock(path: Path, *, busy: str, hint: str, keep_file: bool = False) -> Iterator[Path]:
    """Hold an exclusive flock on ``path`` (which records our pid) or refuse at once.

    ``busy`` is the refusal message, formatted with the holder's pid as ``{pid}``.
    ``keep_file`` leaves the (emptied) file behind: unlinking it lets a third run lock a fresh
    inode while a second still holds the old one, which matters for long-lived lock paths.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot create the lock file {path}: {exc.strerror}",
                          hint="check that the directory is writable and has space") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(busy.format(pid=holder), hint=hint) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            path.unlink(missing_ok=True)  # ours: we hold its lock
            raise ConfigError(f"cannot write the lock file {path}: {exc.strerror}",
                              hint="free space there or choose another directory") from None
        try:
            yield path
        finally:
            if keep_file:
                os.ftruncate(fd, 0)
            else:
                path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def output_lock(image: Path) -> contextlib.AbstractContextManager[Path]:
    """Only one build at a time may write ``image``; a second one refuses at once.
    The block gets the lock file's path."""
    return pid_lock(
        image.with_name(f".{image.name}.lock"),
        busy=f"another imagebuild (pid {{pid}}) is already building {image}",
        hint="wait for it to finish, or build into another --output or with another --stamp",
    )
