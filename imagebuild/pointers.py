"""The latest-stage3 pointer: what a verified one says, and whether it is older than one seen before.

Gentoo's ``releases/<arch>/autobuilds/latest-stage3-<flavour>.txt`` is written by releng's
scripts/copy_buildsync.sh each time it publishes: a header of ``# Latest as of $(date -uR)`` and
``# ts=$(date -u +%s)``, then ``<stamp>/stage3-<flavour>-<stamp>.tar.xz <size>``; the file is
clearsigned. ``ts`` grows with every publication (also when the release itself is unchanged).

The newest ``ts`` seen for an arch and flavour is kept in
``<cache>/pointers/<arch>/latest-stage3-<flavour>.json``. A genuinely signed pointer older than
it comes from a mirror that is behind, or from someone replaying an old release to keep
machines on it (a rollback or freeze attack); it is refused unless the user allows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from imagebuild.config import Arch
from imagebuild.errors import StageError
from imagebuild.log import logger

# The header lines, as copy_buildsync.sh writes them.
_TS_LINE = re.compile(r"#\s*ts=(.*)")
_AS_OF_LINE = re.compile(r"#\s*Latest as of\s+(.*)", re.IGNORECASE)
_PATH_CHARS = re.compile(r"[A-Za-z0-9._+/-]+")
_SYNC_HINT = "the mirror may be mid-sync; try again later or use another mirror"
_OLDER_HINT = ("use an up-to-date mirror and try again; to build from this older release on purpose, "
               "pass --allow-older-stage")


@dataclasses.dataclass(frozen=True)
class StagePointer:
    """One ``path size`` entry of a latest-stage3 file; ``path`` is relative to autobuilds/.

    ``ts`` and ``latest_as_of`` come from the file's header: when Gentoo published it.
    """

    path: str
    size: int
    ts: int | None = None
    latest_as_of: str | None = None

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def when(self) -> str:
        """``ts=1795478400 (latest as of Tue, 24 Nov 2026 00:00:00 +0000)``, or that there is no ts."""
        return _when(self.ts, self.latest_as_of)


def _when(ts: int | None, latest_as_of: str | None) -> str:
    if ts is None:
        return "no ts= line"
    return f"ts={ts}" + (f" (latest as of {latest_as_of})" if latest_as_of else "")


def parse_pointer(text: str, flavour: str, *, what: str) -> StagePointer:
    """The first entry of a (verified) latest-stage3 file that names a stage3-<flavour> tarball.

    The name must be exactly ``stage3-<flavour>-<stamp>.tar.*``, so a signed pointer for
    another flavour (``amd64-openrc-splitusr`` for ``amd64-openrc``) served in its place is refused.
    """
    wanted = re.compile(rf"stage3-{re.escape(flavour)}-\d{{8}}(T\d{{6}}Z)?\.tar(\.(xz|bz2|gz|zst))?")
    ts, latest_as_of = _pointer_header(text, what=what)
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        path = PurePosixPath(fields[0])
        if not wanted.fullmatch(path.name):
            continue
        if path.is_absolute() or ".." in path.parts or not _PATH_CHARS.fullmatch(fields[0]):
            raise StageError(f"{what} line {number}: unsafe tarball path '{fields[0]}'",
                             hint="do not use this mirror; report it to its operators")
        if len(fields) < 2 or not fields[1].isdigit():
            raise StageError(f"{what} line {number}: expected '<path> <size in bytes>', got '{line.strip()}'",
                             hint="the mirror's pointer file is malformed; try another mirror")
        return StagePointer(path=fields[0], size=int(fields[1]), ts=ts, latest_as_of=latest_as_of)
    raise StageError(f"{what} names no stage3-{flavour} tarball",
                     hint=_SYNC_HINT)


def _pointer_header(text: str, *, what: str) -> tuple[int | None, str | None]:
    """The ``# ts=`` epoch and the ``# Latest as of`` date of a (verified) pointer; None when absent."""
    ts: int | None = None
    latest_as_of: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if match := _AS_OF_LINE.fullmatch(line):
            latest_as_of = latest_as_of or match.group(1).strip()
        elif match := _TS_LINE.fullmatch(line):
            value = match.group(1).strip()
            if not re.fullmatch(r"\d{1,12}", value):
                raise StageError(f"{what} line {number}: '# ts=' must be a Unix time in seconds, got '{value}'",
                                 hint="the mirror's pointer file is malformed; try another mirror")
            if ts is not None and ts != int(value):
                raise StageError(f"{what} carries two different '# ts=' lines ({ts} and {value})",
                                 hint="the mirror's pointer file is malformed; try another mirror")
            ts = int(value)
    return ts, latest_as_of


# --- The newest pointer seen per flavour ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SeenPointer:
    """The newest pointer seen for a flavour, as recorded in the cache."""

    ts: int
    latest_as_of: str | None
    mirror: str

    @property
    def when(self) -> str:
        return f"{_when(self.ts, self.latest_as_of)} from {self.mirror}"


def freshness_record(cache_dir: Path, arch: Arch, flavour: str) -> Path:
    """Where the newest ``latest-stage3-<flavour>.txt`` seen for ``arch`` is remembered."""
    return Path(cache_dir) / "pointers" / arch.value / f"latest-stage3-{flavour}.json"


def check_freshness(cache_dir: Path, arch: Arch, flavour: str, pointer: StagePointer, *, url: str,
                    base_url: str, signed_by: str, allow_older: bool) -> None:
    """Refuse ``pointer`` if it is older than the newest one seen for this flavour; remember it if newer.

    Gentoo's mirrors are copies of one master, and ts grows with every publication, so the record
    is per arch and flavour, not per mirror: a mirror that serves an older genuinely signed pointer
    than another one did is behind, or replaying an old release. A pointer without ts cannot be
    ordered: accepted (with a warning) while nothing is recorded, refused as older afterwards.
    """
    record = freshness_record(cache_dir, arch, flavour)
    record.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(record.with_name(record.name + ".lock"), f"recording {record.name}"):
        newest = _read_freshness(record, flavour)
        if newest is not None and (pointer.ts is None or pointer.ts < newest.ts):
            if pointer.ts is None:
                problem = (f"it has no '# ts=' line, so it cannot be shown to be as new as the pointer seen "
                           f"before for stage3-{flavour} ({newest.when})")
            else:
                problem = (f"it is older than the pointer seen before for stage3-{flavour}: {pointer.when}, "
                           f"but {newest.when} was seen")
            if not allow_older:
                raise StageError(f"refusing {url}: {problem}; the mirror is behind, or an old release is "
                                 "being passed off as the latest", hint=_OLDER_HINT)
            logger.warning("warning: using %s although %s (--allow-older-stage)", url, problem)
            return
        if pointer.ts is None:
            logger.warning("warning: %s has no '# ts=' line (Gentoo's pointers always have one), so imagebuild "
                           "cannot tell whether it is older than a release published before", url)
            return
        if newest is None or pointer.ts > newest.ts:
            _write_json(record, {"ts": pointer.ts, "latest_as_of": pointer.latest_as_of, "tarball": pointer.path,
                                 "mirror": base_url, "signed_by": signed_by,
                                 "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _read_freshness(record: Path, flavour: str) -> SeenPointer | None:
    try:
        newest = json.loads(record.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else f"not JSON ({exc})"
        raise StageError(f"cannot read {record}, the record of the newest stage3-{flavour} pointer seen: "
                         f"{problem}", hint="it protects against old releases served as new; if you trust "
                         "this cache, delete the file and run again (a new record starts)") from exc
    if not isinstance(newest, dict) or not isinstance(newest.get("ts"), int) or isinstance(newest["ts"], bool):
        raise StageError(f"{record}, the record of the newest stage3-{flavour} pointer seen, has no "
                         "integer 'ts'", hint="if you trust this cache, delete the file and run again "
                         "(a new record starts)")
    return SeenPointer(ts=newest["ts"], latest_as_of=newest.get("latest_as_of"), mirror=str(newest.get("mirror", "?")))


def _write_json(path: Path, data: dict[str, object]) -> None:
    """Replace ``path`` atomically: a reader sees the old record or the new one, never half of one."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staged.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


@contextlib.contextmanager
def cache_lock(path: Path, doing: str) -> Iterator[None]:
    """One at a time: parallel builds share the cache, its .partial files and its records."""
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("  waiting for another imagebuild that is %s", doing)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
