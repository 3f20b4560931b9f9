"""The diskimage-stage2 keys Catalyst applies to the finished tree, in Catalyst's order.

Catalyst's diskimage-stage2 runs ``fsscript``, ``rc-update`` (``rcadd`` then ``rcdel``) and
``unmerge`` in the chroot, then ``remove`` (``diskimage/rm``) and ``empty`` from the host
(catalyst/targets/diskimage_stage2.py, set_action_sequence). Paths in these keys are paths
*inside the image*, handled through imagebuild.tree: resolved with the tree as ``/`` (an
absolute symlink means the image's file, never the host's; ``..`` stops at the tree's root).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

from imagebuild.chroot import check_can_execute, chroot_mounts, chroot_run
from imagebuild.config import Arch, InitSystem, Stage2Keys
from imagebuild.errors import SpecError, StageError
from imagebuild.log import complete_step, logger
from imagebuild.spec import Spec
from imagebuild.tree import Tree, image_path

# The environment Catalyst's run_merge and setup_features give emerge
# (targets/support/chroot-functions.sh): no countdowns, no config protection in a fresh
# stage, and Catalyst's FEATURES.
EMERGE_ENV: Mapping[str, str] = {
    "EMERGE_WARNING_DELAY": "0",
    "CLEAN_DELAY": "0",
    "CONFIG_PROTECT": "-*",
    "FEATURES": "-news binpkg-multi-instance clean-logs parallel-install",
}
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+-]*")


# --- The keys, read and checked when the build is resolved ------------------------------------

def read_stage2_keys(spec: Spec) -> Stage2Keys:
    """The spec's stage2 keys; every problem in them is one SpecError, before any work starts."""
    problems: list[str] = []
    keys = Stage2Keys(
        fsscript=_fsscript(spec, problems),
        rcadd=_rc_entries(spec, "diskimage/rcadd", problems),
        rcdel=_rc_entries(spec, "diskimage/rcdel", problems),
        unmerge=tuple(spec.get_list("diskimage/unmerge")),
        # targets/diskimage-stage2/controller.sh runs depclean.sh before the unmerge.
        depclean=spec.get("diskimage/depclean") != "no",
        rm=_paths(spec, "diskimage/rm", problems),
        empty=_paths(spec, "diskimage/empty", problems),
        where={key: spec.where(key) for key in _KEYS if spec.get(key)},
    )
    if problems:
        raise SpecError("\n".join(problems), hint=_hint(problems))
    return keys


_KEYS = ("diskimage/fsscript", "diskimage/rcadd", "diskimage/rcdel", "diskimage/unmerge", "diskimage/rm",
         "diskimage/empty")


def _hint(problems: list[str]) -> str:
    if any("service|runlevel" in p for p in problems):
        return "write entries as service|runlevel, e.g. sshd|default"
    if any("does not exist" in p for p in problems):
        return "give the path of a script on this host (relative paths start at the spec's directory)"
    return "write absolute paths inside the image below /, e.g. /var/cache/distfiles"


def _paths(spec: Spec, key: str, problems: list[str]) -> tuple[str, ...]:
    """Paths inside the image; refused when one names ``..``, a NUL or the root itself."""
    entries = []
    for entry in spec.get_list(key):
        if ".." in PurePosixPath(entry).parts:
            problems.append(f"{spec.where(key)}: '{entry}' in {key} contains '..'")
        elif "\0" in entry:
            problems.append(f"{spec.where(key)}: an entry in {key} contains a NUL byte")
        elif image_path(entry) == "/":
            problems.append(f"{spec.where(key)}: '{entry}' in {key} names the whole root")
        else:
            entries.append(entry)
    return tuple(entries)


def _fsscript(spec: Spec, problems: list[str]) -> Path | None:
    value = spec.get("diskimage/fsscript")
    if value is None:
        return None
    script = Path(value).expanduser()
    if not script.is_absolute():
        script = spec.path.parent / script
    if not script.is_file():
        problems.append(f"{spec.where('diskimage/fsscript')}: fsscript {script} does not exist")
        return None
    return script


def _rc_entries(spec: Spec, key: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    entries = []
    for entry in spec.get_list(key):
        service, bar, runlevel = entry.partition("|")
        if not bar or not _SERVICE_NAME.fullmatch(service) or not _SERVICE_NAME.fullmatch(runlevel):
            problems.append(f"{spec.where(key)}: '{entry}' in {key} is not service|runlevel")
        else:
            entries.append((service, runlevel))
    return tuple(entries)


# --- Paths inside the tree -------------------------------------------------------------------


def _canonical(tree: Tree, path: str) -> str:
    """The image path ``path`` resolves to (symlinks followed inside the tree)."""
    return tree.image_path_of(tree.host_path(path))


def _expand(tree: Tree, pattern: str) -> list[str]:
    """Glob ``pattern`` inside the tree (Catalyst: glob.iglob(recursive=True)), confined to it.

    Image paths come back; every directory on the way is resolved inside the tree.
    """
    parts = PurePosixPath(image_path(pattern)).parts[1:]
    if not any(glob.has_magic(p) for p in parts):
        return [image_path(pattern)] if tree.lexists(pattern) else []
    found = ["/"]
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        matches: list[str] = []
        for directory in found:
            if part == "**":
                candidates = [directory, *_descendants(tree, directory, dirs_only=not last)]
            elif glob.has_magic(part):
                candidates = [image_path(f"{directory}/{n}") for n in tree.listdir(directory)
                              if fnmatch.fnmatchcase(n, part) and (part.startswith(".") or not n.startswith("."))]
            else:
                candidates = [image_path(f"{directory}/{part}")]
            for candidate in candidates:
                if last:
                    if tree.lexists(candidate):
                        matches.append(candidate)
                elif tree.is_dir(candidate):
                    matches.append(_canonical(tree, candidate))
        found = matches
    return sorted(set(found))


def _descendants(tree: Tree, directory: str, *, dirs_only: bool) -> list[str]:
    out = []
    for top, dirs, files in tree.walk(directory):  # never follows symlinked dirs
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names = dirs if dirs_only else dirs + [f for f in files if not f.startswith(".")]
        out += [image_path(f"{top}/{n}") for n in names]
    return out


# --- emerge in the chroot --------------------------------------------------------------------

def require_emerge(tree: Tree, why: str) -> None:
    """StageError unless the tree has Portage's emerge (a Gentoo stage)."""
    if not any(tree.lexists(p) for p in ("/usr/bin/emerge", "/bin/emerge")):
        raise StageError(f"{why} needs emerge, but the stage has no /usr/bin/emerge",
                         hint="use a Gentoo stage3 or seed; a non-Gentoo stage cannot do this")


def run_merge(tree: Tree, args: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
    """Catalyst's run_merge: ``emerge ARGS`` in the chroot, its output on our stderr."""
    logger.info("  emerge %s", " ".join(args))
    # Output to our stderr: emerge's progress goes where our log goes, live, as Catalyst shows it.
    chroot_run(tree, ["emerge", *args], env={**EMERGE_ENV, **(env or {})}, live=True)


# --- Applying them ---------------------------------------------------------------------------

def run_fsscript(tree: Tree, script: Path) -> None:
    """Copy diskimage/fsscript into the tree's /tmp, run it in the chroot, remove it."""
    if not tree.exists("/tmp"):
        tree.mkdir("/tmp", 0o1777)
    holder = f"/tmp/imagebuild-fsscript-{os.getpid()}"
    with complete_step(f"Running fsscript {script.name} in the chroot"):
        tree.remove(holder)
        tree.mkdir(holder, 0o700)
        try:
            tree.copy_in(script, f"{holder}/fsscript", mode=0o755)
            chroot_run(tree, [f"{holder}/fsscript"], live=True)
        finally:
            tree.remove(holder)


def update_services(tree: Tree, keys: Stage2Keys, init: InitSystem) -> None:
    """diskimage/rcadd then diskimage/rcdel (Catalyst's targets/support/rc-update.sh).

    Catalyst only knows rc-update; on systemd the same entries enable and disable units.
    """
    if not keys.rcadd and not keys.rcdel:
        return
    with complete_step(f"Services: {len(keys.rcadd)} to add, {len(keys.rcdel)} to remove ({init.value})"):
        for service, runlevel in keys.rcadd:
            if init == InitSystem.systemd:
                # systemd has no runlevels: the unit's [Install] section says where it goes.
                chroot_run(tree, ["systemctl", "enable", service])
            else:
                tree.mkdir(f"/etc/runlevels/{runlevel}")  # as rc-update.sh does
                chroot_run(tree, ["rc-update", "add", service, runlevel])
        for service, runlevel in keys.rcdel:
            if init == InitSystem.systemd:
                chroot_run(tree, ["systemctl", "disable", service])
            else:
                chroot_run(tree, ["rc-update", "del", service, runlevel])


def unmerge_packages(tree: Tree, keys: Stage2Keys) -> None:
    """diskimage/unmerge: depclean unless diskimage/depclean is "no", then ``emerge -C``."""
    if not keys.unmerge:
        return
    with complete_step(f"Unmerging {len(keys.unmerge)} package(s)"):
        # depclean.sh reads the livecd key, so for disk images it is always --with-bdeps=n.
        if keys.depclean:
            run_merge(tree, ["--quiet", "--depclean", "--with-bdeps=n"])
        run_merge(tree, ["--quiet", "-C", *keys.unmerge])


def remove_paths(tree: Tree, keys: Stage2Keys) -> None:
    """diskimage/rm: paths and globs inside the image, removed without leaving it."""
    if not keys.rm:
        return
    with complete_step(f"Removing {len(keys.rm)} diskimage/rm entries"):
        for entry in keys.rm:
            matches = _expand(tree, entry)
            for path in matches:
                if path == "/":
                    raise SpecError(f"{keys.where['diskimage/rm']}: '{entry}' resolves to the whole root")
                tree.remove(path)
            logger.debug("  rm %s: %d match(es)", entry, len(matches))


def empty_directories(tree: Tree, keys: Stage2Keys) -> None:
    """diskimage/empty: directories emptied in place; a symlink or non-directory is skipped."""
    if not keys.empty:
        return
    with complete_step(f"Emptying {len(keys.empty)} director{'y' if len(keys.empty) == 1 else 'ies'}"):
        for entry in keys.empty:
            if tree.is_symlink(entry) or not tree.is_dir(entry):
                # Catalyst's StageBase.empty warns and goes on.
                logger.warning("diskimage/empty: %s is not a directory or does not exist; skipped", entry)
                continue
            if _canonical(tree, entry) == "/":
                raise SpecError(f"{keys.where['diskimage/empty']}: '{entry}' resolves to the whole root")
            tree.empty(entry)


def apply_stage2_keys(tree: Tree, keys: Stage2Keys, arch: Arch, init: InitSystem) -> None:
    """fsscript, rcadd/rcdel, unmerge in the chroot; then rm and empty (Catalyst's order)."""
    if keys.in_chroot:
        if keys.unmerge:
            require_emerge(tree, f"diskimage/unmerge ({keys.where['diskimage/unmerge']})")
        check_can_execute(arch)
        with chroot_mounts(tree):
            if keys.fsscript:
                run_fsscript(tree, keys.fsscript)
            update_services(tree, keys, init)
            unmerge_packages(tree, keys)
    # From the host, after the chroot's mounts are gone.
    remove_paths(tree, keys)
    empty_directories(tree, keys)
