"""Publishing a release into a Gentoo-style autobuilds tree, all or nothing.

The published tree under an output root::

    releases/<arch>/autobuilds/<stamp>/di-<arch>-<variant>-<stamp>.qcow2 (+ .DIGESTS, ...)
    releases/<arch>/autobuilds/latest-di-<arch>-<variant>.txt      pointer, Gentoo's format
    failed/<stamp>/<arch>/...                                       images that did not pass
    index.html, summary.json                                        what the last run did

Nothing is written there while a release runs: builds, tests and the prepared stamp
directories live in a private ``.staging-<stamp>/`` beside it, and publishing is a handful of
renames at the end (stamp directories first, pointers last, so a pointer never names a missing
file). SIGINT/SIGTERM are held back for those few renames, so an interrupted run leaves the
tree either as it was or completely published. One lock (``.release.lock``) keeps two runs
from interleaving. ``assemble`` publishes partial trees made on several machines with the
same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import functools
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2

from imagebuild.config import Arch, Companion, ImageKind, InitSystem, Variant
from imagebuild.errors import ConfigError, ImagebuildError
from imagebuild.log import logger
from imagebuild.mounts import remove_tree
from imagebuild.run import require_tools, run
from imagebuild.workspace import pid_lock

STAMP_RE = re.compile(r"\d{8}T\d{6}Z")
LOCK_NAME = ".release.lock"
STAGING_PREFIX = ".staging-"
SUMMARY_JSON = "summary.json"
SUMMARY_HTML = "index.html"
# A pointer's one data line: "<stamp>/<file> <size>".
_POINTER_LINE = re.compile(r"^(\d{8}T\d{6}Z)/(\S+) (\d+)$", re.MULTILINE)


@dataclasses.dataclass
class ImageResult:
    """What happened to one image of a release; ``files`` are the names published for it."""

    arch: Arch
    variant: Variant
    image: str
    init: InitSystem = InitSystem.systemd
    passed: bool = False
    reason: str = ""
    size: int | None = None
    build_seconds: float | None = None
    boot_seconds: float | None = None
    files: list[str] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> ImageKind:
        return ImageKind(self.variant, self.init)

    @property
    def pointer(self) -> str:
        return pointer_name(self.arch, self.kind)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "arch": self.arch.value, "variant": self.variant.value,
                "init": self.init.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageResult:
        return cls(**{**data, "arch": Arch.parse(data["arch"]), "variant": Variant.parse(data["variant"]),
                      "init": InitSystem(data.get("init", InitSystem.systemd.value))})


def check_stamp(stamp: str) -> str:
    if not STAMP_RE.fullmatch(stamp):
        raise ConfigError(f"release stamp '{stamp}' is not Gentoo's YYYYMMDDTHHMMSSZ",
                          hint="for example 20261124T030000Z (UTC)")
    return stamp


def autobuilds(out: Path, arch: Arch) -> Path:
    return out / "releases" / arch.gentoo_dir / "autobuilds"


def result_dir(result: ImageResult, stamp: str) -> PurePosixPath:
    """Where an image's files are published, relative to the output root."""
    if result.passed:
        return PurePosixPath("releases", result.arch.gentoo_dir, "autobuilds", stamp)
    return PurePosixPath("failed", stamp, result.arch.gentoo_dir)


# -- pointers --------------------------------------------------------------------------------


def pointer_name(arch: Arch, kind: ImageKind) -> str:
    return f"latest-di-{arch.gentoo}-{kind.file_part}.txt"


def pointer_text(stamp: str, file: str, size: int, now: float) -> str:
    """Gentoo's latest-*.txt: two comment lines, then ``<stamp>/<file> <size>``."""
    when = email.utils.format_datetime(datetime.fromtimestamp(int(now), UTC))
    return f"# Latest as of {when}\n# ts={int(now)}\n{stamp}/{file} {size}\n"


def read_pointer(path: Path) -> tuple[str, str, int] | None:
    """(stamp, file, size) a pointer names; None if there is none. Reads clearsigned ones too."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    match = _POINTER_LINE.search(text)
    return (match.group(1), match.group(2), int(match.group(3))) if match else None


def pointed_stamps(directory: Path) -> set[str]:
    """Every stamp a ``latest-*.txt`` in ``directory`` names (Gentoo's stage3 pointers too)."""
    found = set()
    for pointer in directory.glob("latest-*.txt") if directory.is_dir() else []:
        named = read_pointer(pointer)
        if named:
            found.add(named[0])
    return found


# -- keeping the last N --------------------------------------------------------------------


def prune_plan(stamps: Iterable[str], pointed: Collection[str], keep: int) -> list[str]:
    """The stamps to delete: all but the newest ``keep``, never one a pointer names."""
    if keep < 1:
        raise ConfigError(f"keep must be at least 1, not {keep}")
    ordered = sorted(s for s in set(stamps) if STAMP_RE.fullmatch(s))  # this format sorts by time
    return [s for s in ordered[:-keep] if s not in pointed]


def stamp_dirs(directory: Path, *, images_only: bool) -> list[str]:
    """The stamp directories in ``directory``. With ``images_only``, only those holding nothing
    but disk-image files: a shared autobuilds directory may also hold stage3 releases, which
    are not ours to delete."""
    stamps = []
    for entry in directory.iterdir() if directory.is_dir() else []:
        if (entry.is_dir() and not entry.is_symlink() and STAMP_RE.fullmatch(entry.name)
                and (not images_only or all(child.name.startswith("di-") for child in entry.iterdir()))):
            stamps.append(entry.name)
    return stamps


# -- the lock --------------------------------------------------------------------------------


@contextlib.contextmanager
def release_lock(out: Path) -> Iterator[None]:
    """One release (or assemble) per output root at a time; a second one refuses at once."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output root {out}: {exc.strerror}",
                          hint="choose a writable directory with --output") from exc
    with pid_lock(out / LOCK_NAME, keep_file=True,
                  busy=f"another imagebuild release (pid {{pid}}) is already running on {out}",
                  hint=f"wait for it to finish (the lock is {out / LOCK_NAME}), or use another --output"):
        yield


# -- staging ----------------------------------------------------------------------------------


def staging_path(out: Path, stamp: str) -> Path:
    """Where a release of ``stamp`` prepares its files before publishing them."""
    return out / f"{STAGING_PREFIX}{stamp}"


@contextlib.contextmanager
def staging_area(out: Path, stamp: str) -> Iterator[Path]:
    """A fresh ``<out>/.staging-<stamp>/``, removed on every way out. Call with the lock held:
    staging left by a killed run is removed first."""
    for stale in out.glob(f"{STAGING_PREFIX}*"):
        logger.warning("removing %s, left behind by a release that was killed", stale)
        remove_tree(stale)
    staging = staging_path(out, stamp)
    staging.mkdir()
    try:
        yield staging
    finally:
        remove_tree(staging)


def refuse_existing(out: Path, stamp: str, arches: Iterable[Arch]) -> None:
    taken = [autobuilds(out, arch) / stamp for arch in arches] + [out / "failed" / stamp]
    clash = [str(p) for p in taken if p.exists()]
    if clash:
        raise ConfigError(f"release {stamp} already exists in {out}: {', '.join(clash)}",
                          hint="give another --stamp (or none, for the current time)")


@dataclasses.dataclass
class Transaction:
    """One publication in progress: images are gathered into staging; publish happens at the end."""

    out: Path
    staging: Path
    stamp: str
    results: list[ImageResult] = dataclasses.field(default_factory=list)

    def add(self, result: ImageResult, source: Path, *, move: bool) -> None:
        """Take ``result``'s files from ``source`` (moved, or hard-linked/copied) into the release."""
        gather(result, source, self.staging, self.stamp, move=move)
        self.results.append(result)


@contextlib.contextmanager
def transaction(out: Path, stamp: str, arches: Iterable[Arch], *, keep: int,
                sign: str | None) -> Iterator[Transaction]:
    """The one way to publish: take the output root's lock, refuse a stamp that exists, stage,
    let the caller add images, then publish by rename (nothing of it is published if the block
    fails or is interrupted). ``release`` and ``assemble`` both go through here."""
    with release_lock(out):
        refuse_existing(out, stamp, arches)
        with staging_area(out, stamp) as staging:
            txn = Transaction(out, staging, stamp)
            yield txn
            publish(out, staging, stamp, txn.results, keep=keep, sign=sign)


def tree_dir(staging: Path) -> Path:
    """Inside staging, the layout being prepared mirrors the published one."""
    return staging / "tree"


def gather(result: ImageResult, source: Path, staging: Path, stamp: str, *, move: bool) -> None:
    """Put ``result``'s files from ``source`` into the prepared tree (renamed, or hard-linked/copied)."""
    target = tree_dir(staging) / result_dir(result, stamp)
    target.mkdir(parents=True, exist_ok=True)
    for name in result.files:
        if move:
            (source / name).rename(target / name)
        else:
            _link_or_copy(source / name, target / name)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def sign_files(paths: Sequence[Path], key: str) -> None:
    """Detached ASCII-armoured signatures (``<file>.asc``) made with the user's key ``key``."""
    for path in paths:
        run(["gpg", "--batch", "--yes", "--local-user", key, "--armor", "--detach-sign",
             "--output", path.with_name(path.name + ".asc"), path], env=_gpg_env())


def clearsign(path: Path, key: str) -> None:
    """Replace ``path`` by its clearsigned form, as Gentoo signs its latest-*.txt pointers."""
    signed = path.with_name(path.name + ".signed")
    run(["gpg", "--batch", "--yes", "--local-user", key, "--clearsign", "--output", signed, path],
        env=_gpg_env())
    signed.rename(path)


def check_signing_key(key: str) -> None:
    """Fail before any work if gpg has no secret key ``key``."""
    require_tools("gpg")
    found = run(["gpg", "--batch", "--list-secret-keys", key], env=_gpg_env(), check=False)
    if found.returncode != 0:
        raise ConfigError(f"gpg has no secret key '{key}' to sign the release with",
                          hint="import it (gpg --import), set GNUPGHOME, or drop 'sign' from the config")


def _gpg_env() -> dict[str, str]:
    return {name: os.environ[name] for name in ("GNUPGHOME", "HOME", "GPG_AGENT_INFO") if name in os.environ}


# -- publishing -------------------------------------------------------------------------------


def publish(out: Path, staging: Path, stamp: str, results: list[ImageResult], *,
            keep: int, sign: str | None, now: float | None = None) -> None:
    """Publish the prepared tree in ``staging``: sign, write pointers, rename, prune, summarise."""
    now = time.time() if now is None else now
    tree = tree_dir(staging)
    passed = [r for r in results if r.passed]
    if sign:
        for result in passed:
            directory = tree / result_dir(result, stamp)
            wanted = [n for n in (result.image, result.image + Companion.digests) if n in result.files]
            sign_files([directory / n for n in wanted], sign)
            result.files += [n + ".asc" for n in wanted if n + ".asc" not in result.files]
    for result in passed:
        pointer = tree / "releases" / result.arch.gentoo_dir / "autobuilds" / result.pointer
        assert result.size is not None
        pointer.write_text(pointer_text(stamp, result.image, result.size, now))
        if sign:
            clearsign(pointer, sign)
    summary_json = json.dumps({"stamp": stamp, "published": int(now),
                               "images": [r.to_dict() for r in results]}, indent=2) + "\n"
    (staging / SUMMARY_JSON).write_text(summary_json)
    (staging / SUMMARY_HTML).write_text(render_summary(stamp, results, now))

    arches = sorted({r.arch for r in results})
    with signals_deferred():
        for arch in arches:
            prepared = tree / "releases" / arch.gentoo_dir / "autobuilds"
            if (prepared / stamp).is_dir():
                _rename_new(prepared / stamp, autobuilds(out, arch) / stamp)
        if (tree / "failed" / stamp).is_dir():
            _rename_new(tree / "failed" / stamp, out / "failed" / stamp)
        # Pointers last: each names a file that is already in place.
        for arch in arches:
            for pointer in sorted((tree / "releases" / arch.gentoo_dir / "autobuilds").glob("latest-*.txt")):
                os.replace(pointer, autobuilds(out, arch) / pointer.name)
        for name in (SUMMARY_JSON, SUMMARY_HTML):
            os.replace(staging / name, out / name)
        trash = staging / "pruned"
        trash.mkdir()
        for arch in arches:
            prune(autobuilds(out, arch), keep, trash, pointed=pointed_stamps(autobuilds(out, arch)))
        prune(out / "failed", keep, trash, pointed=set(), images_only=False)
    for result in results:
        where = out / result_dir(result, stamp)
        logger.info("%s %s -> %s", "published" if result.passed else "FAILED, kept in", result.image, where)


def prune(directory: Path, keep: int, trash: Path, *, pointed: Collection[str],
          images_only: bool = True) -> list[str]:
    """Move the stamp directories ``prune_plan`` picks into ``trash`` (deleted with staging)."""
    doomed = prune_plan(stamp_dirs(directory, images_only=images_only), pointed, keep)
    for stamp in doomed:
        logger.info("removing old release %s", directory / stamp)
        (directory / stamp).rename(trash / f"{directory.parent.name}-{directory.name}-{stamp}")
    return doomed


def _rename_new(source: Path, target: Path) -> None:
    if target.exists():
        raise ImagebuildError(f"{target} appeared while the release ran", hint="is something else writing there?")
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the few renames that publish, then deliver them.

    The published tree is then either the old one or the complete new one, never a mix.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: pending.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            logger.warning("a signal arrived while publishing; the release was published first")
            os.kill(os.getpid(), pending[0])


# -- assembling partial trees ----------------------------------------------------------------


def read_summary(part: Path) -> tuple[str, list[ImageResult]]:
    path = part / SUMMARY_JSON
    try:
        data = json.loads(path.read_text())
        return check_stamp(data["stamp"]), [ImageResult.from_dict(d) for d in data["images"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{part} is not a release tree: cannot read {path} ({exc})",
                          hint="give directories made by 'imagebuild release --output DIR'") from None


def assemble(parts: Sequence[Path], out: Path, *, keep: int, sign: str | None = None) -> list[ImageResult]:
    """Publish the images of partial release trees (one per CI runner, say) into ``out``."""
    if not parts:
        raise ConfigError("nothing to assemble", hint="give the partial release trees to merge")
    loaded = [(part.resolve(), *read_summary(part)) for part in parts]
    stamps = {stamp for _, stamp, _ in loaded}
    if len(stamps) != 1:
        raise ConfigError(f"the parts are of different releases ({', '.join(sorted(stamps))})",
                          hint="run every part with the same --stamp")
    [stamp] = stamps
    seen: dict[tuple[Arch, ImageKind], Path] = {}
    for part, _, results in loaded:
        for result in results:
            if (result.arch, result.kind) in seen:
                raise ConfigError(f"{result.image} is in both {seen[result.arch, result.kind]} and {part}")
            seen[result.arch, result.kind] = part
            missing = [n for n in result.files if not (part / result_dir(result, stamp) / n).is_file()]
            if missing:
                raise ConfigError(f"{part}: files of {result.image} are missing: {', '.join(missing)}")
    if sign:
        check_signing_key(sign)
    all_results = [r for _, _, results in loaded for r in results]
    with transaction(out.resolve(), stamp, {r.arch for r in all_results}, keep=keep, sign=sign) as txn:
        for part, _, results in loaded:
            for result in results:
                txn.add(result, part / result_dir(result, stamp), move=False)
    return all_results


# -- the summary ------------------------------------------------------------------------------


def human_size(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.1f} MiB"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def summary_table(results: Sequence[ImageResult]) -> str:
    """The text table printed at the end of a run."""
    header = ("image", "size", "build", "boot", "result", "reason")
    rows = [header] + [(r.image, human_size(r.size), seconds(r.build_seconds), seconds(r.boot_seconds),
                        "PASSED" if r.passed else "FAILED", r.reason) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) if i in (0, 4) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=False))) + "  " + row[-1]
             for row in rows]
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(line.rstrip() for line in lines)


# Files worth a link on the page, in the order shown.
_LINKS = (("console log", Companion.console_log), ("JUnit", Companion.smoke_xml),
          ("smoke JSON", Companion.smoke_json), ("screenshot", Companion.screenshot),
          ("inspect", Companion.inspect), ("build log", Companion.build_log), ("DIGESTS", Companion.digests))


@functools.cache
def _html() -> jinja2.Environment:
    # Autoescape: image names, reasons and console excerpts end up in the page verbatim.
    return jinja2.Environment(loader=jinja2.PackageLoader("imagebuild", "templates"),
                              undefined=jinja2.StrictUndefined, autoescape=True,
                              trim_blocks=True, lstrip_blocks=True)


def render_summary(stamp: str, results: Sequence[ImageResult], now: float) -> str:
    rows = []
    for r in results:
        base = result_dir(r, stamp)
        links = [(label, str(base / (r.image + suffix))) for label, suffix in _LINKS if r.image + suffix in r.files]
        if r.image in r.files:
            links.insert(0, ("image", str(base / r.image)))
        rows.append({"image": r.image, "arch": r.arch.value, "variant": str(r.kind),
                     "size": human_size(r.size), "build": seconds(r.build_seconds),
                     "boot": seconds(r.boot_seconds), "passed": r.passed, "reason": r.reason, "links": links})
    pointers = sorted({str(PurePosixPath("releases", r.arch.gentoo_dir, "autobuilds", r.pointer))
                       for r in results if r.passed})
    return _html().get_template("release-summary.html.j2").render(
        stamp=stamp, rows=rows, pointers=pointers,
        generated=email.utils.format_datetime(datetime.fromtimestamp(int(now), UTC)),
        passed=sum(r.passed for r in results), failed=sum(not r.passed for r in results))
