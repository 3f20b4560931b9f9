"""The pieces of Catalyst's diskimage-stage1 that the package step (imagebuild.emerge) and
the seed command (imagebuild.seed) are made of.

They follow catalyst/targets/diskimage_stage1.py on StageBase: the make.profile link,
``portage_confdir`` copied into /etc/portage, the bind mounts (ebuild repository, distfiles,
package cache), chroot setup (the host's resolv.conf, USE in make.conf), clean (make.conf without
the build-only USE flags, the cleanables) and capture as a tarball (pack_seed).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from imagebuild.chroot import chroot_mounts
from imagebuild.errors import ConfigError, SpecError, WorkspaceError
from imagebuild.log import logger
from imagebuild.mountinfo import mounts_below
from imagebuild.mounts import mounted
from imagebuild.output import temporary_name
from imagebuild.run import run
from imagebuild.spec import Spec
from imagebuild.tree import Tree, walk_host

# Seed suffix -> tar's compression options (multi-threaded where the compressor can be).
SEED_COMPRESSION: dict[str, list[str]] = {
    ".tar": [],
    ".tar.zst": ["--use-compress-program=zstd -T0"],
    ".tar.xz": ["--use-compress-program=xz -T0"],
    ".tar.gz": ["--gzip"],
    ".tar.bz2": ["--bzip2"],
}
# catalyst_use while building: "diskimage" (diskimage_stage1.set_catalyst_use) and "bindist",
# which Catalyst's default options (etc/catalyst.conf) turn on. clean() rewrites make.conf
# without them, so the seed keeps only diskimage/use.
BUILD_ONLY_USE = ("bindist", "diskimage")
REPO_NAME = "gentoo"  # Catalyst's repo_name default
_USE_BEGIN = "# BEGIN imagebuild diskimage/use"
_USE_END = "# END imagebuild diskimage/use"
# StageBase.set_cleanables (resolv.conf is put back by host_resolv_conf itself).
_CLEANABLE_FILES = ("/etc/machine-id", "/etc/sandbox.d/99catalyst")
_CLEANABLE_DIRS = ("/var/tmp", "/tmp")


# Where Gentoo's release hosts keep the releng checkout: releng's specs name it so in places
# where they do not write @REPO_DIR@ (boot/kernel/gentoo/config of the amd64 stage2 specs).
RELENG_HOST_CHECKOUT = Path("/root/releng")


def spec_path(spec: Spec, key: str) -> Path | None:
    """A host path named by ``key``; a relative one starts at the spec's directory. A path in
    releng's checkout on Gentoo's hosts (/root/releng/...) that is not here is read below the
    checkout given as @REPO_DIR@, when one was given."""
    value = spec.get(key)
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        return (spec.path.parent / path).resolve()
    repo_dir = spec.placeholders.get("REPO_DIR")
    if repo_dir and path.is_relative_to(RELENG_HOST_CHECKOUT) and not path.exists():
        moved = Path(repo_dir).expanduser().resolve() / path.relative_to(RELENG_HOST_CHECKOUT)
        logger.info("%s: %s is releng's checkout on Gentoo's hosts; reading %s (REPO_DIR)",
                    spec.where(key), path, moved)
        return moved
    return path


def write_use(tree: Tree, flags: list[str]) -> None:
    """Set USE in /etc/portage/make.conf as Catalyst's write_make_conf does (sorted, unique).

    Catalyst rewrites the whole file; imagebuild keeps the stage's make.conf and replaces
    only its own block, which comes last so its USE= wins as Catalyst's would.
    """
    make_conf = "/etc/portage/make.conf"
    text = tree.read_text(make_conf) if tree.exists(make_conf) else ""
    if _USE_BEGIN in text:
        head, _, rest = text.partition(_USE_BEGIN)
        text = head.rstrip("\n") + "\n" + rest.partition(_USE_END)[2].lstrip("\n")
    if flags:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + (
            f"{_USE_BEGIN}\n# The USE flags used for building in addition to what the profile provides.\n"
            f'USE="{" ".join(sorted(set(flags)))}"\n{_USE_END}\n')
    tree.write_text(make_conf, text)


def written_use(tree: Tree) -> list[str]:
    """The flags of the USE block write_use left in make.conf (a seed's diskimage/use)."""
    make_conf = "/etc/portage/make.conf"
    text = tree.read_text(make_conf) if tree.is_file(make_conf) else ""
    block = text.partition(_USE_BEGIN)[2].partition(_USE_END)[0]
    found = re.search(r'^USE="([^"]*)"', block, re.M)
    return found.group(1).split() if found else []


def prepare_portage(tree: Tree, profile: str | None, confdir: Path | None, *, where: str = "profile") -> None:
    """make.profile from ``profile`` (``where``: the spec line, for a message) and
    ``portage_confdir`` merged into /etc/portage."""
    tree.mkdir("/etc/portage")
    if profile:
        # config_profile_link: "[repo:]path", linked relative to /etc/portage.
        repo, sep, path = profile.partition(":")
        if not sep:
            repo, path = REPO_NAME, profile
        if ".." in PurePosixPath(path).parts or path.startswith("/") or not re.fullmatch(r"[\w.+-]+", repo):
            raise SpecError(f"{where}: profile '{profile}' is not a path below profiles/",
                            hint="write it as Catalyst does, e.g. default/linux/amd64/23.0/systemd")
        tree.remove("/etc/portage/make.profile")
        tree.symlink(f"../../var/db/repos/{repo}/profiles/{path}", "/etc/portage/make.profile")
    if confdir is not None:
        merge_confdir(tree, confdir, "/etc/portage")


def merge_confdir(tree: Tree, confdir: Path, inner: str) -> None:
    """setup_confdir's ``rsync -a CONFDIR/ /etc/portage/``: merged in, the stage's other files
    stay; an entry of the tree in the way is replaced (never written through)."""
    for directory, dirs, files in walk_host(confdir):
        below = Path(directory).relative_to(confdir).as_posix().removeprefix(".")
        dest = f"{inner}/{below}".rstrip("/")
        for name in dirs:
            if tree.lexists(f"{dest}/{name}") and not tree.is_dir(f"{dest}/{name}"):
                tree.unlink(f"{dest}/{name}")
            tree.mkdir(f"{dest}/{name}")
        for name in files:
            source = Path(directory, name)
            tree.remove(f"{dest}/{name}")
            if source.is_symlink():
                tree.symlink(os.readlink(source), f"{dest}/{name}")
            elif source.is_file():
                tree.copy_in(source, f"{dest}/{name}", mode=source.stat().st_mode & 0o7777)


@contextlib.contextmanager
def host_resolv_conf(tree: Tree) -> Iterator[None]:
    """The host's resolv.conf in the tree while emerge fetches; the stage's own put back after."""
    target, saved = "/etc/resolv.conf", "/etc/.resolv.conf.imagebuild-saved"
    had = tree.lexists(target)
    if had:
        tree.rename(target, saved)  # a symlink is moved, never written through
    try:
        if os.path.exists("/etc/resolv.conf"):
            tree.copy_in(Path("/etc/resolv.conf"), target)
        else:
            logger.warning("the host has no /etc/resolv.conf: emerge cannot resolve mirror names")
        yield
    finally:
        tree.unlink(target)
        if had:
            tree.rename(saved, target)


@contextlib.contextmanager
def build_mounts(tree: Tree, workspace: Path, repo: Path | None, pkgcache: Path | None) -> Iterator[None]:
    """Catalyst's mounts: proc/sys/dev/run (devpts and shm in /dev), repository, distfiles, package cache."""
    repo_dir = f"/var/db/repos/{REPO_NAME}"
    with contextlib.ExitStack() as stack:
        if repo is not None and not tree.lexists(repo_dir):
            # Runs last, once unmounted: Catalyst's clean removes the repository's mount point.
            stack.callback(_remove_if_empty, tree, repo_dir)
        stack.enter_context(chroot_mounts(tree))  # with /dev/pts and /dev/shm
        if repo is not None:
            # Read-only, as Catalyst's squashfs snapshot is.
            stack.enter_context(mounted(repo, tree.real_directory(repo_dir), bind=True, options="ro"))
        # Sources and binary packages stay outside the seed (Catalyst binds distdir/pkgdir).
        for source, inner in ((workspace / "distfiles", "/var/cache/distfiles"),
                              (pkgcache or workspace / "binpkgs", "/var/cache/binpkgs")):
            source.mkdir(parents=True, exist_ok=True)
            stack.enter_context(mounted(source, tree.real_directory(inner), bind=True))
        yield


def _remove_if_empty(tree: Tree, directory: str) -> None:
    if tree.is_dir(directory) and not tree.is_symlink(directory) and not tree.listdir(directory):
        if not mounts_below(tree.host_path(directory)):
            tree.remove(directory)


def clean_seed(tree: Tree, use: list[str]) -> None:
    """Catalyst's clean(): build-only USE dropped, the cleanables, /etc/*- backup files."""
    write_use(tree, use)
    for inner in _CLEANABLE_FILES:
        if tree.lexists(inner) and not tree.is_dir(inner):
            tree.unlink(inner)
    for inner in _CLEANABLE_DIRS:
        if tree.is_dir(inner) and not tree.is_symlink(inner):
            tree.empty(inner)
    for backup in tree.glob("/etc", "*-"):  # find /etc -maxdepth 1 -name '*-' -delete
        if tree.is_symlink(backup) or not tree.is_dir(backup):
            tree.unlink(backup)
        elif not tree.listdir(backup):
            tree.remove(backup)


def pack_seed(root: Path, output: Path) -> None:
    """Tar the tree (numeric owners, xattrs such as file capabilities) to ``output``, atomically.
    ``root`` itself may be a mount point (a build's XFS root); nothing below it may be."""
    live = [m for m in mounts_below(root) if m != Path(os.path.realpath(root))]
    if live:
        raise WorkspaceError(f"refusing to pack {root}: still mounted below it: {', '.join(map(str, live))}")
    partial = temporary_name(output)
    try:
        run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name",
             *SEED_COMPRESSION[seed_suffix(output)], "-C", root, "-cpf", partial, "."])
        partial.rename(output)
    finally:
        partial.unlink(missing_ok=True)


def seed_suffix(output: Path) -> str:
    for suffix in sorted(SEED_COMPRESSION, key=len, reverse=True):
        if output.name.endswith(suffix):
            return suffix
    raise ConfigError(f"cannot tell how to compress the seed {output}",
                      hint=f"name it with one of: {', '.join(SEED_COMPRESSION)} (.tar.zst is fast)")
