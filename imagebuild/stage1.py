"""Catalyst's diskimage-stage1: emerge ``diskimage/packages`` into a stage, pack it as a seed.

The steps and their order are those of catalyst/targets/diskimage_stage1.py on StageBase:
unpack, make.profile link, ``portage_confdir`` copied into /etc/portage, the bind mounts
(ebuild repository, distfiles, package cache), chroot setup (the host's resolv.conf, USE in
make.conf), ``run_merge --update --deep --newuse PACKAGES`` (targets/diskimage-stage1/chroot.sh),
clean (make.conf without the build-only USE flags, the cleanables), capture as a tarball.
The seed is what ``imagebuild build --stage SEED`` (diskimage-stage2) starts from.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from imagebuild.chroot import check_can_execute, chroot_mounts, chroot_run
from imagebuild.config import Arch
from imagebuild.errors import ConfigError, SpecError, StageError, WorkspaceError
from imagebuild.log import complete_step, logger
from imagebuild.mountinfo import mounts_below
from imagebuild.mounts import mounted
from imagebuild.output import temporary_name
from imagebuild.run import run
from imagebuild.spec import Spec
from imagebuild.stage2 import require_emerge, run_merge
from imagebuild.tree import Tree, walk_host
from imagebuild.unpack import unpack_stage
from imagebuild.workspace import Workspace

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


def check_seed_spec(spec: Spec, arch: Arch) -> list[str]:
    """The package atoms to emerge; SpecError (file:line) if ``spec`` is no diskimage-stage1 spec."""
    target = spec.get("target")
    if target != "diskimage-stage1":
        raise SpecError(f"{spec.where('target')}: target is '{target or '(none)'}', not diskimage-stage1",
                        hint="build a seed from a diskimage-stage1 spec (releng: diskimage-stage1-*.spec); "
                        "diskimage-stage2 specs go to 'imagebuild build'")
    packages = spec.get_list("diskimage/packages")
    if not packages:
        raise SpecError(f"{spec.where('diskimage/packages')}: the spec has no diskimage/packages",
                        hint="list the package atoms to install under diskimage/packages, as Catalyst requires")
    for atom in packages:
        if atom.startswith("-"):
            raise SpecError(f"{spec.where('diskimage/packages')}: '{atom}' is an option, not a package atom",
                            hint="diskimage/packages holds atoms and sets (app-editors/nano, @world) only")
    subarch = spec.get("subarch")
    if subarch in set(Arch) and subarch != arch:
        raise SpecError(f"{spec.where('subarch')}: the spec is for {subarch}, the build for {arch.value}",
                        hint=f"build it as {subarch}, or use the {arch.value} spec")
    return packages


def emerge_arguments(packages: list[str], *, jobs: int, pkgcache: bool, getbinpkg: bool) -> list[str]:
    """``emerge_opts`` of chroot-functions.sh's setup_emerge_opts, then chroot.sh's arguments."""
    opts = ["--quiet"]  # Catalyst's default; --verbose only under catalyst -v
    # --jobs and --load-average as Catalyst's jobs / load-average settings give them; the load
    # limit keeps N emerge jobs each running make -jN from swamping the machine.
    opts += ["--jobs", str(jobs), "--load-average", str(jobs)]
    if pkgcache:
        # A package cache and no update_seed: reuse and keep binary packages (the doubled
        # --newuse below is Catalyst's too).
        opts += ["--usepkg", "--buildpkg", "--binpkg-respect-use=y", "--newuse"]
    if getbinpkg:
        # Not Catalyst's (stage builds "never get --getbinpkg", stagebase.py): asked for by
        # the caller; fetches from the binrepos.conf the stage ships (implies --usepkg).
        opts += ["--getbinpkg"]
    return [*opts, "--update", "--deep", "--newuse", *packages]


def spec_path(spec: Spec, key: str) -> Path | None:
    """A host directory named by ``key``; a relative one starts at the spec's directory."""
    value = spec.get(key)
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (spec.path.parent / path).resolve()


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


def _check_repository(tree: Tree, repo: Path | None) -> None:
    if repo is not None:
        if not (repo / "profiles").is_dir():
            raise ConfigError(f"{repo} is not an ebuild repository (it has no profiles/ directory)",
                              hint="give a checkout or unpacked snapshot of the gentoo repository")
        return
    if not any(tree.is_file(f"{r}/profiles/repo_name") for r in tree.glob("/var/db/repos", "*")):
        raise StageError("the stage has no ebuild repository in /var/db/repos for emerge to use",
                         hint="give the gentoo repository (a checkout or unpacked snapshot) with --repo, "
                         "as Catalyst mounts its snapshot_treeish")


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
             *SEED_COMPRESSION[_suffix(output)], "-C", root, "-cpf", partial, "."])
        partial.rename(output)
    finally:
        partial.unlink(missing_ok=True)


def _suffix(output: Path) -> str:
    for suffix in sorted(SEED_COMPRESSION, key=len, reverse=True):
        if output.name.endswith(suffix):
            return suffix
    raise ConfigError(f"cannot tell how to compress the seed {output}",
                      hint=f"name it with one of: {', '.join(SEED_COMPRESSION)} (.tar.zst is fast)")


def build_seed(spec: Spec, stage_tarball: Path, output: Path, *, arch: Arch, work_dir: Path,
               getbinpkg: bool = False, repo: Path | None = None, jobs: int | None = None) -> Path:
    """Emerge the spec's diskimage/packages into ``stage_tarball``; write the seed to ``output``.

    ``repo`` is the ebuild repository bind-mounted (read-only) at /var/db/repos/gentoo, as
    Catalyst mounts its snapshot; without it the stage must carry one. Returns ``output``.
    """
    packages = check_seed_spec(spec, arch)
    output = Path(output).absolute()
    _suffix(output)
    if output.exists():
        raise ConfigError(f"{output} already exists", hint="remove it or choose another output name")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise ConfigError(f"cannot write the seed into {output.parent}", hint="choose a writable directory")
    confdir = spec_path(spec, "portage_confdir")
    if confdir is not None and not confdir.is_dir():
        raise SpecError(f"{spec.where('portage_confdir')}: portage_confdir {confdir} does not exist",
                        hint="point it at a directory of Portage configuration (releng: releases/portage/diskimage)")
    pkgcache = spec_path(spec, "pkgcache_path")
    use = spec.get_list("diskimage/use")
    jobs = jobs or os.cpu_count() or 1
    args = emerge_arguments(packages, jobs=jobs, getbinpkg=getbinpkg,
                            pkgcache=pkgcache is not None and spec.get("update_seed", "no") == "no")
    check_can_execute(arch)

    with Workspace(Path(work_dir), f"seed-{arch.value}") as workspace:
        root = workspace / "root"
        tree = Tree(root)
        with complete_step(f"Unpacking {stage_tarball.name}"):
            logger.info("  %d entries", unpack_stage(stage_tarball, root))
        require_emerge(tree, f"diskimage-stage1 ({spec.path})")
        _check_repository(tree, repo)
        with complete_step("Configuring Portage (make.profile, portage_confdir, USE)"):
            prepare_portage(tree, spec.get("profile"), confdir, where=spec.where("profile"))
            write_use(tree, [*BUILD_ONLY_USE, *use])
        with complete_step(f"Emerging {len(packages)} packages ({arch.value})"):
            with build_mounts(tree, workspace, repo, pkgcache), host_resolv_conf(tree):
                if tree.lexists("/usr/sbin/env-update"):
                    chroot_run(tree, ["/usr/sbin/env-update"])  # update_env_settings
                # MAKEOPTS as StageBase.setup_environment derives it from jobs/load-average.
                run_merge(tree, args, env={"MAKEOPTS": f"-j{jobs} -l{jobs}"})
        with complete_step("Cleaning the tree (Catalyst's clean)"):
            clean_seed(tree, use)
        with complete_step(f"Packing the seed {output.name}"):
            pack_seed(root, output)
    logger.info("✓ %s (%.0f MiB)", output, output.stat().st_size / 2**20)
    return output
