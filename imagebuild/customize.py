"""The diskimage-stage2 keys Catalyst applies to the finished tree, in Catalyst's order.

Catalyst's diskimage-stage2 runs ``fsscript``, ``rc-update`` (``rcadd`` then ``rcdel``) and
``unmerge`` in the chroot, then ``remove`` (``diskimage/rm``) and ``empty`` from the host
(catalyst/targets/diskimage_stage2.py, set_action_sequence). Paths in these keys are paths
*inside the image*: they are resolved with the tree as ``/`` (an absolute symlink means the
image's file, never the host's), and nothing may climb out of it with ``..``.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from imagebuild.chroot import check_can_execute, chroot_mounts, chroot_run
from imagebuild.config import Arch, InitSystem
from imagebuild.errors import SpecError, StageError
from imagebuild.log import complete_step, logger
from imagebuild.mounts import empty_directory, remove_tree
from imagebuild.run import run
from imagebuild.spec import Spec

# The environment Catalyst's run_merge and setup_features give emerge
# (targets/support/chroot-functions.sh): no countdowns, no config protection in a fresh
# stage, and Catalyst's FEATURES.
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EMERGE_ENV: Mapping[str, str] = {
    "PATH": CHROOT_PATH,
    "HOME": "/root",
    "EMERGE_WARNING_DELAY": "0",
    "CLEAN_DELAY": "0",
    "CONFIG_PROTECT": "-*",
    "FEATURES": "-news binpkg-multi-instance clean-logs parallel-install",
}
_MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+-]*")


# --- Paths inside the tree -------------------------------------------------------------------

def _parts(path: str) -> list[str]:
    return [p for p in PurePosixPath(path).parts if p not in ("/", ".", "")]


def inside_root(root: Path, path: str, *, follow_last: bool = False) -> Path:
    """The host path of image path ``path``, resolving symlinks with ``root`` as ``/``.

    The last component is followed only with ``follow_last`` (removing a symlink removes the
    link). Raises StageError when ``..`` (in ``path`` or in a symlink) climbs above ``root``.
    """
    pending = _parts(path)
    current: list[str] = []
    hops = 0
    while pending:
        name = pending.pop(0)
        if name == "..":
            if not current:
                raise StageError(f"'{path}' leads outside the image's root ({root})",
                                 hint="paths in the tree must stay below its /")
            current.pop()
            continue
        candidate = root.joinpath(*current, name)
        if candidate.is_symlink() and (pending or follow_last):
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise StageError(f"too many levels of symlinks resolving '{path}' in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = []  # the image's /, not the host's
            pending = _parts(target) + pending
            continue
        current.append(name)
    return root.joinpath(*current)


def _checked_entry(spec: Spec, key: str, entry: str) -> str:
    """A path from the spec, refused when it names ``..`` or the root itself."""
    if ".." in PurePosixPath(entry).parts:
        raise SpecError(f"{spec.where(key)}: '{entry}' in {key} contains '..'",
                        hint="write absolute paths inside the image, e.g. /var/cache/distfiles")
    if not _parts(entry):
        raise SpecError(f"{spec.where(key)}: '{entry}' in {key} names the whole root",
                        hint="name directories or files below /")
    return entry


def _resolve(root: Path, spec: Spec, key: str, entry: str, *, follow_last: bool) -> Path:
    try:
        return inside_root(root, entry, follow_last=follow_last)
    except StageError as exc:
        raise SpecError(f"{spec.where(key)}: {key} entry '{entry}': {exc.message}",
                        hint="a symlink in the tree points above its root; fix the tree or the entry") from None


def _expand(root: Path, spec: Spec, key: str, pattern: str) -> list[Path]:
    """Glob ``pattern`` inside the tree (Catalyst: glob.iglob(recursive=True)), confined to it."""
    parts = _parts(pattern)
    if not any(glob.has_magic(p) for p in parts):
        path = _resolve(root, spec, key, pattern, follow_last=False)
        return [path] if os.path.lexists(path) else []
    found = [root]
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        matches: list[Path] = []
        for directory in found:
            if part == "**":
                candidates = [directory, *_descendants(directory, dirs_only=not last)]
            elif glob.has_magic(part):
                names = sorted(os.listdir(directory))
                candidates = [directory / n for n in names if fnmatch.fnmatchcase(n, part)
                              and (part.startswith(".") or not n.startswith("."))]
            else:
                candidates = [directory / part]
            for candidate in candidates:
                if last:
                    if os.path.lexists(candidate):
                        matches.append(candidate)
                    continue
                inner = "/" + candidate.relative_to(root).as_posix()
                resolved = _resolve(root, spec, key, inner, follow_last=True)
                if resolved.is_dir():
                    matches.append(resolved)
        found = matches
    return sorted(set(found))


def _descendants(directory: Path, *, dirs_only: bool) -> list[Path]:
    out = []
    for top, dirs, files in os.walk(directory):  # os.walk never follows symlinked dirs
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names = dirs if dirs_only else dirs + [f for f in files if not f.startswith(".")]
        out += [Path(top, n) for n in names]
    return out


# --- emerge in the chroot --------------------------------------------------------------------

def require_emerge(root: Path, why: str) -> None:
    """StageError unless the tree has Portage's emerge (a Gentoo stage)."""
    if not any(os.path.lexists(inside_root(root, p)) for p in ("/usr/bin/emerge", "/bin/emerge")):
        raise StageError(f"{why} needs emerge, but the stage has no /usr/bin/emerge ({root})",
                         hint="use a Gentoo stage3 or seed; a non-Gentoo stage cannot do this")


def run_merge(root: Path, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
    """Catalyst's run_merge: ``emerge ARGS`` in the chroot, its output on our stderr."""
    logger.info("  emerge %s", " ".join(args))
    # stdout=2: emerge's progress goes where our log goes, live, as Catalyst shows it.
    run(["chroot", root, "emerge", *args], env={**EMERGE_ENV, **(env or {})}, stdout=2)


# --- The stage2 keys -------------------------------------------------------------------------

def _fsscript(spec: Spec) -> Path | None:
    value = spec.get("diskimage/fsscript")
    if value is None:
        return None
    script = Path(value).expanduser()
    if not script.is_absolute():
        script = spec.path.parent / script
    if not script.is_file():
        raise SpecError(f"{spec.where('diskimage/fsscript')}: fsscript {script} does not exist",
                        hint="give the path of a script on this host (relative paths start at the spec's directory)")
    return script


def run_fsscript(root: Path, spec: Spec) -> None:
    """Copy diskimage/fsscript into the tree's /tmp, run it in the chroot, remove it."""
    script = _fsscript(spec)
    if script is None:
        return
    tmp = inside_root(root, "/tmp", follow_last=True)
    tmp.mkdir(mode=0o1777, exist_ok=True)
    with complete_step(f"Running fsscript {script.name} in the chroot"):
        holder = Path(tempfile.mkdtemp(prefix="imagebuild-fsscript-", dir=tmp))
        try:
            shutil.copyfile(script, holder / script.name)
            (holder / script.name).chmod(0o755)
            inner = "/" + (holder / script.name).relative_to(root).as_posix()
            run(["chroot", root, inner], env={"PATH": CHROOT_PATH, "HOME": "/root"}, stdout=2)
        finally:
            shutil.rmtree(holder, ignore_errors=True)


def _rc_entries(spec: Spec, key: str) -> list[tuple[str, str]]:
    entries = []
    for entry in spec.get_list(key):
        service, bar, runlevel = entry.partition("|")
        if not bar or not _SERVICE_NAME.fullmatch(service) or not _SERVICE_NAME.fullmatch(runlevel):
            raise SpecError(f"{spec.where(key)}: '{entry}' in {key} is not service|runlevel",
                            hint="write entries as service|runlevel, e.g. sshd|default")
        entries.append((service, runlevel))
    return entries


def update_services(root: Path, spec: Spec, init: InitSystem) -> None:
    """diskimage/rcadd then diskimage/rcdel (Catalyst's targets/support/rc-update.sh).

    Catalyst only knows rc-update; on systemd the same entries enable and disable units.
    """
    add, delete = _rc_entries(spec, "diskimage/rcadd"), _rc_entries(spec, "diskimage/rcdel")
    if not add and not delete:
        return
    with complete_step(f"Services: {len(add)} to add, {len(delete)} to remove ({init.value})"):
        for service, runlevel in add:
            if init == InitSystem.systemd:
                # systemd has no runlevels: the unit's [Install] section says where it goes.
                chroot_run(root, ["systemctl", "enable", service])
            else:
                levels = inside_root(root, "/etc/runlevels", follow_last=True)
                (levels / runlevel).mkdir(parents=True, exist_ok=True)  # as rc-update.sh does
                chroot_run(root, ["rc-update", "add", service, runlevel])
        for service, runlevel in delete:
            if init == InitSystem.systemd:
                chroot_run(root, ["systemctl", "disable", service])
            else:
                chroot_run(root, ["rc-update", "del", service, runlevel])


def unmerge_packages(root: Path, spec: Spec) -> None:
    """diskimage/unmerge: depclean unless diskimage/depclean is "no", then ``emerge -C``."""
    atoms = spec.get_list("diskimage/unmerge")
    if not atoms:
        return
    require_emerge(root, f"diskimage/unmerge ({spec.where('diskimage/unmerge')})")
    with complete_step(f"Unmerging {len(atoms)} package(s)"):
        # targets/diskimage-stage2/controller.sh runs depclean.sh first; depclean.sh reads
        # the livecd key, so for disk images it is always --with-bdeps=n.
        if spec.get("diskimage/depclean") != "no":
            run_merge(root, ["--quiet", "--depclean", "--with-bdeps=n"])
        run_merge(root, ["--quiet", "-C", *atoms])


def remove_paths(root: Path, spec: Spec) -> None:
    """diskimage/rm: paths and globs inside the image, removed without leaving it."""
    key = "diskimage/rm"
    entries = [_checked_entry(spec, key, e) for e in spec.get_list(key)]
    if not entries:
        return
    with complete_step(f"Removing {len(entries)} diskimage/rm entries"):
        for entry in entries:
            matches = _expand(root, spec, key, entry)
            for path in matches:
                if path == root:
                    raise SpecError(f"{spec.where(key)}: '{entry}' resolves to the whole root")
                remove_tree(path)
            logger.debug("  rm %s: %d match(es)", entry, len(matches))


def empty_directories(root: Path, spec: Spec) -> None:
    """diskimage/empty: directories emptied in place; a symlink or non-directory is skipped."""
    key = "diskimage/empty"
    entries = [_checked_entry(spec, key, e) for e in spec.get_list(key)]
    if not entries:
        return
    with complete_step(f"Emptying {len(entries)} director{'y' if len(entries) == 1 else 'ies'}"):
        for entry in entries:
            path = _resolve(root, spec, key, entry, follow_last=False)
            if path.is_symlink() or not path.is_dir():
                # Catalyst's StageBase.empty warns and goes on.
                logger.warning("diskimage/empty: %s is not a directory or does not exist; skipped", entry)
                continue
            if path == root:
                raise SpecError(f"{spec.where(key)}: '{entry}' resolves to the whole root")
            empty_directory(path)


def apply_stage2_keys(root: Path, spec: Spec, arch: Arch, init: InitSystem) -> None:
    """fsscript, rcadd/rcdel, unmerge in the chroot; then rm and empty (Catalyst's order)."""
    # Every spec problem is found before the tree is touched.
    _fsscript(spec)
    _rc_entries(spec, "diskimage/rcadd")
    _rc_entries(spec, "diskimage/rcdel")
    for key in ("diskimage/rm", "diskimage/empty"):
        for entry in spec.get_list(key):
            _checked_entry(spec, key, entry)
    in_chroot = [k for k in ("diskimage/fsscript", "diskimage/rcadd", "diskimage/rcdel",
                             "diskimage/unmerge") if spec.get(k)]
    if in_chroot:
        if spec.get("diskimage/unmerge"):
            require_emerge(root, f"diskimage/unmerge ({spec.where('diskimage/unmerge')})")
        check_can_execute(root, arch)
        with chroot_mounts(root):
            run_fsscript(root, spec)
            update_services(root, spec, init)
            unmerge_packages(root, spec)
    # From the host, after the chroot's mounts are gone.
    remove_paths(root, spec)
    empty_directories(root, spec)

