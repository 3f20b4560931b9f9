"""The package and kernel steps: what Catalyst's diskimage-stage1 and the kernel step of its
diskimage-stage2 do to a stage3, run by a build between unpacking and configuring.

1. **Packages** (targets/diskimage-stage1/chroot.sh): the spec's ``profile`` and
   ``portage_confdir`` into /etc/portage, ``diskimage/use`` in make.conf, then
   ``emerge --update --deep --newuse`` of ``diskimage/packages``.
2. **Kernels** (targets/support/pre-distkmerge.sh and kmerge.sh), for each ``boot/kernel``
   entry: dracut; the distribution kernel with USE=-initramfs; then ``dracut`` with the entry's
   ``dracut_args`` for the kernel it installed (``--kernel-image`` below /usr/src/linux-VERSION).
   A stage that already has a kernel in /boot skips this step.

Binary packages first: emerge runs with ``--getbinpkg`` (what the binhost lacks is built from
source) and FEATURES=binpkg-request-signature, so only packages signed by a trusted key go in.
The binhost is the stage's own (its binrepos.conf) unless ``--binhost`` names another, and the
trusted keys are the stage's (/etc/portage/gnupg) unless ``--binhost-keyring`` names a file.
What the build used for itself — that binhost, that keyring, the build-only USE flags, emerge's
FEATURES — is gone from the tree afterwards: the image keeps the stage's own configuration.

The tree after both steps is cached, keyed by everything that went into it (the stage's digest,
the repository, the packages, USE, the confdir, the kernels, the binhost and its key), so the
images of one release and a rebuild do not emerge again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.client
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from imagebuild.chroot import CHROOT_PATH, chroot_run
from imagebuild.config import Arch, KernelKeys, PortageKeys, SnapshotSource
from imagebuild.errors import CommandError, ConfigError, SpecError, StageError
from imagebuild.log import complete_step, logger
from imagebuild.mirror import fetch_snapshot
from imagebuild.run import run
from imagebuild.spec import Spec
from imagebuild.stage1 import (
    BUILD_ONLY_USE,
    REPO_NAME,
    build_mounts,
    host_resolv_conf,
    prepare_portage,
    spec_path,
    write_use,
    written_use,
)
from imagebuild.stage2 import EMERGE_ENV, require_emerge
from imagebuild.stagefacts import Kernel, kernel_in
from imagebuild.tree import Tree, walk_host

# Bump when what the steps do changes in a way the key's inputs do not show.
STEPS_VERSION = 1
BINREPOS = "/etc/portage/binrepos.conf"
_BINREPOS_SAVED = "/etc/portage/.binrepos.conf.imagebuild-saved"
# The keyring the build verifies its binhost with, inside the tree while emerge runs (Portage
# runs gpg --verify as nobody, so it is world-readable).
_VERIFY_HOME = "/var/tmp/imagebuild-binhost-gnupg"
# installkernel's check that refuses to run in a chroot; pre-distkmerge.sh masks it the same way.
_CHROOT_CHECK = "/etc/kernel/install.d/05-check-chroot.install"
_PROBE_TIMEOUT = 20.0
_ATOM = re.compile(r"[<>=~]*([A-Za-z0-9][\w+.-]*)/([A-Za-z0-9][\w+-]*?)(?:-\d[^:\[]*)?(?::[^\[]*)?(?:\[.*\])?")
_SIGNATURE_WORDS = re.compile(r"signature|gpg|BADSIG|untrusted|Invalid binary package|verif", re.IGNORECASE)


# --- The keys, read and checked when the build is resolved ------------------------------------

def read_portage_keys(spec: Spec, *, repo: str | None, binhost: str | None, keyring: str | None,
                      snapshot: SnapshotSource | None = None) -> PortageKeys:
    """The spec's package and kernel keys and the repository/binhost settings, checked; every
    problem of the spec is one SpecError before any work starts."""
    problems: list[str] = []
    packages = spec.get_list("diskimage/packages")
    for atom in packages:
        if atom.startswith("-"):
            problems.append(f"{spec.where('diskimage/packages')}: '{atom}' is an option, not a package atom")
    # portage_confdir is checked when the steps run: a seed with a kernel and no packages never
    # reads it (releng's stage2 specs name theirs with @REPO_DIR@).
    confdir = spec_path(spec, "portage_confdir")
    kernels = []
    for name in spec.get_list("boot/kernel"):
        key = f"boot/kernel/{name}"
        if spec.get(f"{key}/distkernel", "no") != "yes":
            problems.append(f"{spec.where('boot/kernel')}: kernel '{name}' is not a distkernel; imagebuild "
                            f"installs distribution kernels only ({key}/distkernel: yes), not genkernel builds")
            continue
        config = spec_path(spec, f"{key}/config")
        sources = spec.get(f"{key}/sources")
        kernels.append(KernelKeys(name=name, package=sources or kernel_package(config), config=config,
                                  dracut_args=tuple(spec.get_list(f"{key}/dracut_args"))))
    if problems:
        raise SpecError("\n".join(problems), hint="see specs/README.md for what these keys take")
    repo_path = Path(repo).expanduser().resolve() if repo else None
    if repo_path is not None and not (repo_path / "profiles").is_dir():
        raise ConfigError(f"--repo {repo_path} is not an ebuild repository (it has no profiles/ directory)",
                          hint="give a checkout or unpacked snapshot of the gentoo repository")
    keyring_path = Path(keyring).expanduser().resolve() if keyring else None
    if keyring_path is not None and not keyring_path.is_file():
        raise ConfigError(f"--binhost-keyring {keyring_path} does not exist",
                          hint="give the OpenPGP public key (armoured or binary) that signs the binhost's packages")
    return PortageKeys(
        packages=tuple(packages), use=tuple(spec.get_list("diskimage/use")), profile=spec.get("profile"),
        confdir=confdir, kernels=tuple(kernels), repo=repo_path, binhost=binhost.rstrip("/") if binhost else None,
        binhost_keyring=keyring_path, snapshot=snapshot,
        where={k: spec.where(k) for k in ("diskimage/packages", "boot/kernel", "profile", "portage_confdir")
               if spec.get(k)},
    )


def kernel_package(config: Path | None) -> str:
    """Gentoo's prebuilt distribution kernel, unless a config fragment asks for a build from source."""
    return "sys-kernel/gentoo-kernel" if config else "sys-kernel/gentoo-kernel-bin"


# --- The cache key -------------------------------------------------------------------------------

def steps_key(keys: PortageKeys, arch: Arch, stage_digest: str) -> str:
    """Everything that decides the tree the steps leave but the repository, hashed (the
    repository's identity, repository_id(), is known only once the stage is unpacked)."""
    recipe = {
        "version": STEPS_VERSION,
        "arch": arch.value,
        "stage": stage_digest,
        "packages": list(keys.packages),
        "use": sorted(keys.use),
        "profile": keys.profile,
        "confdir": _tree_digest(keys.confdir) if keys.confdir and keys.confdir.is_dir() else str(keys.confdir),
        "kernels": [{"name": k.name, "package": k.package, "dracut_args": list(k.dracut_args),
                     "config": file_digest(k.config) if k.config and k.config.is_file() else str(k.config)}
                    for k in keys.kernels],
        "binhost": keys.binhost,
        "binhost_keyring": file_digest(keys.binhost_keyring) if keys.binhost_keyring else None,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_digest(top: Path) -> str:
    """The names, link targets and contents of a (small) configuration directory."""
    digest = hashlib.sha256()
    for directory, dirs, files in walk_host(top):
        for name in sorted(files):
            path = Path(directory, name)
            digest.update(str(path.relative_to(top)).encode() + b"\0")
            digest.update(os.readlink(path).encode() if path.is_symlink() else file_digest(path).encode())
        dirs.sort()
    return digest.hexdigest()


@functools.cache
def repo_digest(top: Path) -> str:
    """A repository by its files' names, sizes and times (reading every ebuild of Gentoo's tree
    would take longer than the check saves); metadata/timestamp.chk dates a snapshot."""
    digest = hashlib.sha256()
    for directory, dirs, files in walk_host(top):
        dirs[:] = sorted(d for d in dirs if d not in (".git", "distfiles", "packages"))
        for name in sorted(files):
            st = os.lstat(os.path.join(directory, name))
            digest.update(f"{os.path.relpath(directory, top)}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stage_digest(tarball: Path) -> str:
    return file_digest(tarball)


# --- Before the steps: what they need ------------------------------------------------------------

def needs_steps(tree: Tree, keys: PortageKeys) -> tuple[bool, Kernel | None]:
    """Whether the steps have work to do in ``tree``, and the kernel it already has.

    StageError (exit 2) when the stage has no kernel and the spec names none to install."""
    kernel = kernel_in(tree)
    if kernel is None and not keys.kernels:
        raise StageError(
            "the stage has no kernel in /boot, and the spec names none to install (no boot/kernel)",
            hint="use a stage or diskimage seed that has a kernel, or add 'boot/kernel: gentoo' and "
            "'boot/kernel/gentoo/distkernel: yes' to the spec so the build installs Gentoo's distribution kernel",
        )
    return bool(keys.packages) or kernel is None, kernel


def binhost_urls(tree: Tree) -> list[tuple[str, str]]:
    """The stage's binhosts: (sync-uri, the file that names it) from /etc/portage/binrepos.conf."""
    files = [BINREPOS] if tree.is_file(BINREPOS) else \
        [f"{BINREPOS}/{n}" for n in sorted(tree.listdir(BINREPOS)) if n.endswith(".conf")] \
        if tree.is_dir(BINREPOS) else []
    urls: list[tuple[str, str]] = []
    for name in files:
        if not tree.is_file(name):
            continue
        for line in tree.read_text(name).splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "sync-uri" and value.strip():
                urls.extend((uri, name) for uri in value.split())
    return urls


def check_binhost(url: str, source: str) -> None:
    """ConfigError unless ``url``'s Packages index answers (a HEAD request: Gentoo's is large)."""
    index = f"{url.rstrip('/')}/Packages"
    request = urllib.request.Request(index, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT):  # noqa: S310 - the user's binhost
            return
    except urllib.error.HTTPError as exc:
        exc.close()
        what = f"the server answered HTTP {exc.code} {exc.reason}"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        what = str(reason) or type(reason).__name__
    raise ConfigError(
        f"the binary package host {url} ({source}) cannot be reached: {index}: {what}",
        hint="give a binhost this machine reaches with --binhost URL (and the key that signs it with "
        "--binhost-keyring FILE); the ebuild repository comes from the stage or --repo DIR",
    )


def repository(tree: Tree, keys: PortageKeys, cache_dir: Path) -> tuple[Path | None, str]:
    """The repository to bind-mount (None: the stage's own) and its identity for the cache key:
    --repo, else the stage's /var/db/repos/gentoo, else the mirror's verified snapshot."""
    if keys.repo is not None:
        logger.info("  ebuild repository: %s (--repo)", keys.repo)
        return keys.repo, f"repo-{repo_digest(keys.repo)[:16]}"
    if tree.is_file(f"/var/db/repos/{REPO_NAME}/profiles/repo_name"):
        logger.info("  ebuild repository: the stage's own /var/db/repos/%s", REPO_NAME)
        return None, "stage"
    missing = f"the stage has no ebuild repository (no /var/db/repos/{REPO_NAME}) and --repo was not given"
    hint = "give a checkout or unpacked snapshot of the gentoo repository with --repo DIR"
    if keys.snapshot is None:
        raise ConfigError(missing, hint=hint)
    logger.info("  ebuild repository: the snapshot from %s (%s)", keys.snapshot.url, missing)
    try:
        path, ident = fetch_snapshot(keys.snapshot.url, cache_dir, keyring=keys.snapshot.keyring,
                                     trusted_keys=keys.snapshot.trusted_keys, progress=False)
    except StageError as exc:
        raise ConfigError(f"{missing}, and the mirror's snapshot cannot be had: {exc.message}",
                          hint=f"{hint} ({exc.hint})" if exc.hint else hint) from None
    return path, f"snapshot-{ident}"


# --- The steps ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Emerge:
    """Runs emerge in the tree as Catalyst's run_merge does, its output appended to ``log``."""

    tree: Tree
    log: Path
    env: Mapping[str, str]
    getbinpkg: bool
    jobs: int

    usepkg: bool = False

    def __call__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, what: str,
                 from_source: bool = False) -> None:
        opts = ["--quiet", "--jobs", str(self.jobs), "--load-average", str(self.jobs)]
        if from_source:
            # No binary package, whatever the stage's FEATURES say: what is built must be built here.
            opts += ["--getbinpkg=n", "--usepkg=n"]
        elif self.usepkg:
            # pkgcache_path and no update_seed (Catalyst's setup_emerge_opts): reuse and keep
            # binary packages in the cache (the doubled --newuse is Catalyst's too).
            opts += ["--usepkg", "--buildpkg", "--binpkg-respect-use=y", "--newuse"]
        if self.getbinpkg and not from_source:
            opts.append("--getbinpkg")
        argv = ["emerge", *opts, *args]
        logger.info("  %s", " ".join(argv))
        full_env = {"PATH": CHROOT_PATH, "HOME": "/root", **EMERGE_ENV, **self.env, **(env or {}),
                    "MAKEOPTS": f"-j{self.jobs} -l{self.jobs}"}
        with self.log.open("ab") as out:
            out.write(f"\n>>> {' '.join(argv)}\n".encode())
            out.flush()
            start = out.tell()
            result = run(["chroot", self.tree.root, *argv], env=full_env, stdout=out.fileno(), check=False)
            out.write(result.stderr)
        if result.returncode != 0:
            raise _emerge_error(what, result.returncode, self.log, start)


def _emerge_error(what: str, status: int, log: Path, start: int = 0) -> StageError:
    """What went wrong, in Portage's own lines from this command's output (from byte ``start``
    of ``log``); the log itself goes with the failed build's workspace."""
    with log.open("rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    complaints = [line.strip() for line in lines if line.lstrip().startswith(("!!!", "*", "emerge:"))]
    signature = [line for line in complaints if _SIGNATURE_WORDS.search(line)]
    shown = "\n".join(f"    {line}" for line in (signature or complaints or lines)[-12:])
    if signature:
        return StageError(
            f"emerge refused a binary package while installing {what}: its signature did not verify\n{shown}",
            hint="the binhost's packages must be signed by a key in --binhost-keyring (or the stage's "
            "/etc/portage/gnupg); a tampered, unsigned or otherwise signed package is never installed",
        )
    return StageError(f"emerge failed (exit status {status}) while installing {what}\n{shown}",
                      hint="Portage's lines above say why; --keep-workspace keeps the whole emerge.log")


@contextlib.contextmanager
def binhost_settings(tree: Tree, keys: PortageKeys) -> Iterator[dict[str, str]]:
    """The build's own binhost and keyring while emerge runs; the stage's put back after.

    Yields the environment emerge gets: FEATURES=binpkg-request-signature and, with a keyring,
    BINPKG_GPG_VERIFY_GPG_HOME."""
    env = {"FEATURES": f"{EMERGE_ENV['FEATURES']} binpkg-request-signature"}
    with contextlib.ExitStack() as stack:
        if keys.binhost:
            had = tree.lexists(BINREPOS)
            if had:
                tree.rename(BINREPOS, _BINREPOS_SAVED)  # a file or a directory; moved, never written through
                stack.callback(tree.rename, _BINREPOS_SAVED, BINREPOS)
            stack.callback(tree.remove, BINREPOS)
            tree.write_text(BINREPOS, "# imagebuild: this build's binhost (removed after the package steps)\n"
                            f"[imagebuild]\nsync-uri = {keys.binhost}\npriority = 9999\nverify-signature = true\n")
        if keys.binhost_keyring:
            tree.remove(_VERIFY_HOME)
            stack.callback(tree.remove, _VERIFY_HOME)
            tree.mkdir(_VERIFY_HOME, 0o755)
            _import_keyring(keys.binhost_keyring, tree, _VERIFY_HOME)
            env["BINPKG_GPG_VERIFY_GPG_HOME"] = _VERIFY_HOME
        yield env


def _import_keyring(keyring: Path, tree: Tree, home: str) -> None:
    """``keyring``'s keys, fully trusted, into the tree's GnuPG home ``home``, readable by anyone.

    gpg keeps its agent's socket in the home and a socket path has at most 107 bytes, so the
    keyring is made in a short scratch home and its two files are copied into the tree."""
    with tempfile.TemporaryDirectory(prefix="imagebuild-gnupg-") as scratch:
        gpg: list[str | Path] = ["gpg", "--homedir", scratch, "--batch", "--no-tty", "--no-autostart"]
        try:
            run([*gpg, "--import", keyring])
            listing = run([*gpg, "--with-colons", "--list-keys"]).stdout.decode()
            primaries, last = [], ""
            for line in listing.splitlines():
                fields = line.split(":")
                if fields[0] == "fpr" and last == "pub":
                    primaries.append(fields[9])
                last = fields[0] if fields[0] != "fpr" else last
            if not primaries:
                raise ConfigError(f"--binhost-keyring {keyring} holds no OpenPGP public key",
                                  hint="export the binhost's signing key with 'gpg --export --armor FPR'")
            # Portage refuses good signatures "of undefined trust" unless the trust database says so.
            run([*gpg, "--import-ownertrust"], input="".join(f"{f}:6:\n" for f in primaries).encode())
            run([*gpg, "--check-trustdb"])
        except CommandError as exc:
            raise ConfigError(f"--binhost-keyring {keyring} cannot be read as OpenPGP keys: {exc.message}",
                              hint="give the binhost's public key, armoured or binary") from None
        for name in ("pubring.kbx", "trustdb.gpg"):
            tree.copy_in(Path(scratch, name), f"{home}/{name}", mode=0o644)


def run_steps(tree: Tree, keys: PortageKeys, arch: Arch, workspace: Path, log: Path, *,
              install_kernel: bool, cache_dir: Path, pkgcache: Path | None = None, jobs: int | None = None) -> str:
    """The package step, then (``install_kernel``) the kernel step, in the unpacked ``tree``.
    ``pkgcache`` (Catalyst's pkgcache_path) is bind-mounted as the package cache and used.
    Returns the identity of the repository they used (repository())."""
    if install_kernel and not any(tree.lexists(p) for p in ("/usr/bin/emerge", "/bin/emerge")):
        raise StageError(
            f"the stage has no kernel in /boot, and no emerge to install the one the spec names "
            f"({keys.where.get('boot/kernel', 'boot/kernel')}: {', '.join(k.package for k in keys.kernels)})",
            hint="use a Gentoo stage3, where the build emerges that kernel, or a stage or seed with a kernel",
        )
    require_emerge(tree, "installing the spec's diskimage/packages")
    if keys.confdir is not None and not keys.confdir.is_dir():
        raise SpecError(f"{keys.where.get('portage_confdir', 'portage_confdir')}: portage_confdir {keys.confdir} "
                        "is not a directory", hint="point it at a directory of Portage configuration "
                        "(releng: releases/portage/diskimage), or give releng's @REPO_DIR@ with --set")
    repo, repo_ident = repository(tree, keys, cache_dir)
    stage_binhosts = binhost_urls(tree)
    if keys.binhost:
        check_binhost(keys.binhost, "--binhost")
    elif stage_binhosts:
        for url, source in stage_binhosts:
            check_binhost(url, source)
    else:
        logger.warning("no binhost (the stage has no binrepos.conf and --binhost was not given): "
                       "every package is built from source")
    getbinpkg = bool(keys.binhost or stage_binhosts)
    logger.info("  binary packages: %s", keys.binhost or ", ".join(u for u, _ in stage_binhosts) or "none (from source)")
    # A seed keeps its diskimage/use unless the spec gives its own (a stage2 spec has none).
    use = list(keys.use) or [f for f in written_use(tree) if f not in BUILD_ONLY_USE]
    with complete_step("Configuring Portage (profile, portage_confdir, USE)"):
        prepare_portage(tree, keys.profile, keys.confdir, where=keys.where.get("profile", "profile"))
        write_use(tree, [*BUILD_ONLY_USE, *use])
    with contextlib.ExitStack() as stack:
        stack.enter_context(build_mounts(tree, workspace, repo, pkgcache))
        stack.enter_context(host_resolv_conf(tree))
        env = stack.enter_context(binhost_settings(tree, keys))
        emerge = Emerge(tree, log, env, getbinpkg, jobs or os.cpu_count() or 1, usepkg=pkgcache is not None)
        if tree.lexists("/usr/sbin/env-update") or tree.lexists("/usr/bin/env-update"):
            chroot_run(tree, ["env-update"])  # Catalyst's update_env_settings
        if keys.packages:
            with complete_step(f"Emerging {len(keys.packages)} packages ({arch.value}, diskimage-stage1)"):
                emerge(["--update", "--deep", "--newuse", *keys.packages], what="diskimage/packages")
        if install_kernel:
            for kernel in keys.kernels:
                _install_kernel(tree, kernel, arch, emerge)
    with complete_step("Cleaning up after emerge (build-only USE, scratch)"):
        write_use(tree, use)  # Catalyst's clean: only diskimage/use stays
        for scratch in ("/var/tmp/portage", "/var/cache/distfiles", "/var/cache/binpkgs"):
            if tree.is_dir(scratch) and not tree.is_symlink(scratch):
                tree.empty(scratch)
    return repo_ident


def _install_kernel(tree: Tree, kernel: KernelKeys, arch: Arch, emerge: Emerge) -> None:
    why = "the spec gives its sources" if kernel.package not in ("sys-kernel/gentoo-kernel-bin",
                                                                  "sys-kernel/gentoo-kernel") else \
        "built from source here: a binary package would not have the config fragment" if kernel.config else \
        "no config fragment: Gentoo's prebuilt distribution kernel"
    with complete_step(f"Installing kernel '{kernel.name}': {kernel.package} ({why}), initramfs by dracut"):
        if kernel.config is not None:
            if not kernel.config.is_file():
                raise ConfigError(f"{kernel.config} (boot/kernel/{kernel.name}/config) does not exist",
                                  hint="give the path of a kernel config fragment on this machine")
            # Where Gentoo's dist-kernels read config fragments (kernel-build.eclass).
            tree.mkdir("/etc/kernel/config.d")
            tree.copy_in(kernel.config, f"/etc/kernel/config.d/{kernel.name}.config")
        masked_check = not tree.lexists(_CHROOT_CHECK)
        if masked_check:
            tree.mkdir("/etc/kernel/install.d")
            tree.write_text(_CHROOT_CHECK, "")
        try:
            emerge(["--oneshot", "sys-kernel/dracut"], what="dracut (pre-distkmerge.sh)")
            # A binary package of the kernel was configured without the fragment: with one, the
            # kernel is built here, as Catalyst builds it (its stage builds never --getbinpkg).
            emerge(["--update", kernel.package], env={"USE": "-initramfs"}, what=kernel.package,
                   from_source=kernel.config is not None)
            version = installed_kernel_version(tree, kernel.package)
            image = f"/usr/src/linux-{version}/{arch.kernel_image}"
            if not tree.is_file(image):
                raise StageError(f"{kernel.package} installed no kernel image at {image}",
                                 hint="check the package; Catalyst expects the image there too")
            args = [*kernel.dracut_args, "--force", f"--kernel-image={image}", f"--kver={version}"]
            logger.info("  dracut %s", " ".join(args))
            with emerge.log.open("ab") as out:
                out.write(f"\n>>> dracut {' '.join(args)}\n".encode())
                out.flush()
                start = out.tell()
                result = run(["chroot", tree.root, "dracut", *args],
                             env={"PATH": CHROOT_PATH, "HOME": "/root"}, stdout=out.fileno(), check=False)
                out.write(result.stderr)
            if result.returncode != 0:
                raise _emerge_error(f"the initramfs (dracut for {version})", result.returncode, emerge.log, start)
        finally:
            if masked_check:
                tree.remove(_CHROOT_CHECK)
        if kernel_in(tree) is None:
            raise StageError(f"{kernel.package} {version} is installed, but /boot has no vmlinuz-{version}",
                             hint="the package's installkernel should put the kernel into /boot")


def installed_kernel_version(tree: Tree, atom: str) -> str:
    """The version of the kernel ``atom`` installed: its /usr/src/linux-VERSION, read from the
    package database (Catalyst: ``equery files`` | grep /usr/src/linux-)."""
    match = _ATOM.fullmatch(atom)
    if not match:
        raise ConfigError(f"'{atom}' is not a package atom", hint="write it as category/package")
    category, name = match.groups()
    entries = [e for e in tree.listdir(f"/var/db/pkg/{category}") if re.fullmatch(re.escape(name) + r"-\d.*", e)] \
        if tree.is_dir(f"/var/db/pkg/{category}") else []
    versions = set()
    for entry in entries:
        contents = f"/var/db/pkg/{category}/{entry}/CONTENTS"
        if tree.is_file(contents):
            versions.update(re.findall(r"^(?:dir|obj|sym) /usr/src/linux-([^/\s]+)", tree.read_text(contents), re.M))
    if not versions:
        raise StageError(f"emerge installed {atom}, but no /usr/src/linux-* of it is in the package database",
                         hint="a distribution kernel package installs its image below /usr/src/linux-VERSION")
    if len(versions) > 1:
        logger.warning("  %s installed several kernels (%s); using the newest", atom, ", ".join(sorted(versions)))
    return max(versions, key=lambda v: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", v)])
