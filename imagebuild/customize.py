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
from imagebuild.config import Arch, InitSystem
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


# --- Paths inside the tree -------------------------------------------------------------------

def _checked_entry(spec: Spec, key: str, entry: str) -> str:
    """A path from the spec, refused when it names ``..`` or the root itself."""
    if ".." in PurePosixPath(entry).parts:
        raise SpecError(f"{spec.where(key)}: '{entry}' in {key} contains '..'",
                        hint="write absolute paths inside the image, e.g. /var/cache/distfiles")
    if "\0" in entry:
        raise SpecError(f"{spec.where(key)}: an entry in {key} contains a NUL byte")
    if image_path(entry) == "/":
        raise SpecError(f"{spec.where(key)}: '{entry}' in {key} names the whole root",
                        hint="name directories or files below /")
    return entry


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


def run_fsscript(tree: Tree, spec: Spec) -> None:
    """Copy diskimage/fsscript into the tree's /tmp, run it in the chroot, remove it."""
    script = _fsscript(spec)
    if script is None:
        return
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


def _rc_entries(spec: Spec, key: str) -> list[tuple[str, str]]:
    entries = []
    for entry in spec.get_list(key):
        service, bar, runlevel = entry.partition("|")
        if not bar or not _SERVICE_NAME.fullmatch(service) or not _SERVICE_NAME.fullmatch(runlevel):
            raise SpecError(f"{spec.where(key)}: '{entry}' in {key} is not service|runlevel",
                            hint="write entries as service|runlevel, e.g. sshd|default")
        entries.append((service, runlevel))
    return entries


def update_services(tree: Tree, spec: Spec, init: InitSystem) -> None:
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
                chroot_run(tree, ["systemctl", "enable", service])
            else:
                tree.mkdir(f"/etc/runlevels/{runlevel}")  # as rc-update.sh does
                chroot_run(tree, ["rc-update", "add", service, runlevel])
        for service, runlevel in delete:
            if init == InitSystem.systemd:
                chroot_run(tree, ["systemctl", "disable", service])
            else:
                chroot_run(tree, ["rc-update", "del", service, runlevel])


def unmerge_packages(tree: Tree, spec: Spec) -> None:
    """diskimage/unmerge: depclean unless diskimage/depclean is "no", then ``emerge -C``."""
    atoms = spec.get_list("diskimage/unmerge")
    if not atoms:
        return
    require_emerge(tree, f"diskimage/unmerge ({spec.where('diskimage/unmerge')})")
    with complete_step(f"Unmerging {len(atoms)} package(s)"):
        # targets/diskimage-stage2/controller.sh runs depclean.sh first; depclean.sh reads
        # the livecd key, so for disk images it is always --with-bdeps=n.
        if spec.get("diskimage/depclean") != "no":
            run_merge(tree, ["--quiet", "--depclean", "--with-bdeps=n"])
        run_merge(tree, ["--quiet", "-C", *atoms])


def remove_paths(tree: Tree, spec: Spec) -> None:
    """diskimage/rm: paths and globs inside the image, removed without leaving it."""
    key = "diskimage/rm"
    entries = [_checked_entry(spec, key, e) for e in spec.get_list(key)]
    if not entries:
        return
    with complete_step(f"Removing {len(entries)} diskimage/rm entries"):
        for entry in entries:
            matches = _expand(tree, entry)
            for path in matches:
                if path == "/":
                    raise SpecError(f"{spec.where(key)}: '{entry}' resolves to the whole root")
                tree.remove(path)
            logger.debug("  rm %s: %d match(es)", entry, len(matches))


def empty_directories(tree: Tree, spec: Spec) -> None:
    """diskimage/empty: directories emptied in place; a symlink or non-directory is skipped."""
    key = "diskimage/empty"
    entries = [_checked_entry(spec, key, e) for e in spec.get_list(key)]
    if not entries:
        return
    with complete_step(f"Emptying {len(entries)} director{'y' if len(entries) == 1 else 'ies'}"):
        for entry in entries:
            if tree.is_symlink(entry) or not tree.is_dir(entry):
                # Catalyst's StageBase.empty warns and goes on.
                logger.warning("diskimage/empty: %s is not a directory or does not exist; skipped", entry)
                continue
            if _canonical(tree, entry) == "/":
                raise SpecError(f"{spec.where(key)}: '{entry}' resolves to the whole root")
            tree.empty(entry)


def apply_stage2_keys(tree: Tree, spec: Spec, arch: Arch, init: InitSystem) -> None:
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
            require_emerge(tree, f"diskimage/unmerge ({spec.where('diskimage/unmerge')})")
        check_can_execute(arch)
        with chroot_mounts(tree):
            run_fsscript(tree, spec)
            update_services(tree, spec, init)
            unmerge_packages(tree, spec)
    # From the host, after the chroot's mounts are gone.
    remove_paths(tree, spec)
    empty_directories(tree, spec)

