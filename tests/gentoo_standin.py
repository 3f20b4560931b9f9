"""A Gentoo stage3 and a signed Gentoo binhost for tests, made offline from the Debian stand-in.

No machine here reaches Gentoo's mirrors, so this builds the closest real thing that can exist
offline, and nothing in it is a mock:

- **The stand-in stage3** (``make_stage3``): the Debian stand-in (imagebuild.standin) with
  Portage 3.0.83 from PyPI installed as Gentoo has it (``emerge`` on the PATH, / as its
  EPREFIX, the ``portage`` user), Gentoo's /etc/portage as a stage3 ships it (make.conf,
  make.profile, repos.conf, binrepos.conf naming Gentoo's binhost), an empty /var/db/pkg and no
  repository. Like a Gentoo stage3 it has no kernel, initramfs, GRUB EFI modules or cloud-init:
  the files of Debian's packages for those are taken out of the tree into *payload* tarballs
  (the stand-in's distfiles), so they can only come back through emerge.
- **The test repository** (``write_repository``): a standalone ebuild repository called
  ``gentoo`` with Gentoo's profile names for amd64 and arm64, EAPI 8 ebuilds that install the
  payloads (sys-kernel/gentoo-kernel-bin, sys-kernel/gentoo-kernel, sys-boot/grub,
  app-emulation/cloud-init), sys-kernel/dracut (a shim over Debian's mkinitramfs, see
  gentoo_standin_files/dracut-standin), sys-kernel/installkernel, and a one-file marker
  package for every other atom of releng's diskimage-stage1 package lists.
- **The binhost** (``build_binhost``): real emerge in a throwaway copy of the stage3 builds
  gpkg binary packages of the repository, signed with a throwaway key (``make_signing_key``),
  into a PKGDIR with its Packages index; ``serve`` puts it on 127.0.0.1 over HTTP, and
  ``tampered_copy`` makes the broken binhosts a consumer must refuse.

Versions: the payload packages carry the upstream part of the Debian package's version
(linux-image 6.1.192-3 -> gentoo-kernel-bin-6.1.192, grub-efi-amd64-bin 2.06-13+deb12u2 ->
grub-2.06, cloud-init 22.4.2-1+deb12u4 -> cloud-init-22.4.2); the kernel's release keeps
Debian's name (6.1.0-57-amd64), because its modules directory is named so. Markers are
version 1.

What this does not exercise: Gentoo's real tree, eclasses and profiles, real dracut and
installkernel, getuto and Gentoo's binhost key. It does exercise emerge's command lines and
configuration files, the merge into the tree, the vdb, pkg_postinst, and Portage's signature
policy for binary packages, for real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import jinja2

from imagebuild import standin
from imagebuild.chroot import CHROOT_PATH, chroot_mounts
from imagebuild.config import Arch, InitSystem
from imagebuild.emerge import file_digest
from imagebuild.errors import CommandError, StageError
from imagebuild.log import complete_step, logger
from imagebuild.mounts import mounted, remove_tree
from imagebuild.run import run
from imagebuild.tree import Tree

import debian_payloads
import gpkg_tamper
from loopback_mirror import make_signing_key as _make_key
from loopback_mirror import stop_gpg_agent

# Bump when what make_stage3 does changes in a way its recipe (below) does not show.
RECIPE_VERSION = 2
PORTAGE_VERSION = "3.0.83"
# The wheel on PyPI (pip download --no-deps portage==3.0.83), checked before it is used.
PORTAGE_WHEEL_SHA256 = "25de95ad893cdf9abec2bf4d18217b3fc07756989c62d3e74bb1695cdf639402"
FILES = Path(__file__).parent / "gentoo_standin_files"
REPO_NAME = "gentoo"
BINHOST_UID = "Test Binhost (TEST KEY) <binhost@example.invalid>"

# What Portage needs beyond the stand-in (PORTAGE.md): gpg and its agent to sign and verify,
# zstd (BINPKG_COMPRESS), bzip2 (the vdb's environment.bz2), wget (FETCHCOMMAND), and the
# /usr/bin/python that a Gentoo stage has and Portage's helper scripts name.
_PORTAGE_DEBS = ("gpg", "gpg-agent", "zstd", "bzip2", "wget", "python-is-python3")
# Gentoo's acct-user/portage and acct-group/portage.
_PORTAGE_USER_HOOKS = (
    'chroot "$1" groupadd --system --gid 250 portage',
    'chroot "$1" useradd --system --uid 250 --gid portage --home-dir /var/lib/portage/home'
    ' --shell /bin/false --comment portage portage',
)
# Where Gentoo installs Portage's programs (the rest of its console scripts go to /usr/bin).
_SBIN_PROGRAMS = {"archive-conf", "dispatch-conf", "emaint", "env-update", "etc-update", "fixpackages", "regenworld"}

# The profile a stage3 of each architecture and init points at: releng's stage3 specs
# (amd64's no-multilib ones are what the diskimage specs start from). OpenRC is Gentoo's
# default: its profiles have no init suffix.
STAGE_PROFILES = {
    (Arch.amd64, InitSystem.systemd): "default/linux/amd64/23.0/no-multilib/systemd",
    (Arch.amd64, InitSystem.openrc): "default/linux/amd64/23.0/no-multilib",
    (Arch.arm64, InitSystem.systemd): "default/linux/arm64/23.0/systemd",
    (Arch.arm64, InitSystem.openrc): "default/linux/arm64/23.0",
}
# Gentoo's binhost directory for each architecture (releases/<arch>/binpackages/23.0/<this>).
_BINHOST_SUBDIR = {Arch.amd64: "x86-64", Arch.arm64: "arm64"}

KERNEL_PACKAGES = ("sys-kernel/gentoo-kernel-bin", "sys-kernel/gentoo-kernel")
# releng's diskimage-stage1-{console,cloudinit}.spec diskimage/packages for amd64 and arm64
# (the same list for both; the cloud-init one adds app-emulation/cloud-init). Those without a
# payload become marker packages, so that releng's lists resolve.
RELENG_PACKAGES = (
    "app-admin/pwgen", "app-admin/sudo", "app-arch/unzip", "app-crypt/gnupg", "app-editors/nano",
    "app-emulation/cloud-init", "app-misc/screen", "app-portage/cpuid2cpuflags", "app-portage/gentoolkit",
    "app-portage/mirrorselect", "app-text/wgetpaste", "net-analyzer/traceroute", "net-irc/irssi",
    "net-misc/iputils", "net-misc/openssh", "net-misc/rsync", "sys-apps/busybox", "sys-apps/gptfdisk",
    "sys-apps/iproute2", "sys-apps/kbd", "sys-apps/nvme-cli", "sys-apps/pciutils", "sys-apps/pv",
    "sys-apps/usbutils", "sys-auth/ssh-import-id", "sys-block/parted", "sys-boot/grub", "sys-fs/cryptsetup",
    "sys-fs/dmraid", "sys-fs/dosfstools", "sys-fs/e2fsprogs", "sys-fs/lvm2", "sys-fs/mdadm",
    "sys-fs/multipath-tools", "sys-fs/xfsdump", "sys-fs/xfsprogs", "sys-kernel/linux-firmware",
    "sys-libs/glibc",
)
# The builder's USE for installkernel: releng's releases/portage/diskimage/package.use, so a
# build that uses releng's portage_confdir finds it on the binhost as it is configured.
BINHOST_PACKAGE_USE = "sys-kernel/installkernel dracut grub\n"
NOTICE_LINE = (
    "This tree is imagebuild's Portage STAND-IN stage3 (tests/gentoo_standin.py): Portage {version} and\n"
    "Gentoo's /etc/portage on the Debian stand-in, without a kernel, GRUB's EFI modules or cloud-init,\n"
    "which come from the test repository's packages.\n"
)
_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(FILES), undefined=jinja2.StrictUndefined,
                                keep_trailing_newline=True, autoescape=False)


# --- What make_stage3 returns ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Payload:
    """A payload tarball of the stand-in's distfiles and the package that installs it."""

    atom: str  # category/name
    version: str
    distfile: str  # its name in GentooStandin.distfiles


@dataclasses.dataclass(frozen=True)
class GentooStandin:
    arch: Arch
    stage3: Path  # the stand-in stage3 tarball (plain .tar)
    distfiles: Path  # directory of payload tarballs the test repository's ebuilds unpack
    kernel_version: str  # the kernel's release, e.g. "6.1.0-57-amd64"
    init: InitSystem = InitSystem.systemd
    payloads: tuple[Payload, ...] = ()

    def payload(self, atom: str) -> Payload:
        return next(p for p in self.payloads if p.atom == atom)


# --- The stand-in stage3 -----------------------------------------------------------------------

def portage_layer(arch: Arch, init: InitSystem) -> standin.Layer:
    """The stand-in for ``arch`` and ``init`` with the Debian packages Portage needs and its user."""
    return standin.Layer(name=f"portage-{init.value}", arch=arch, parent=standin.init_layer(arch, init),
                         packages=_PORTAGE_DEBS, customize_hooks=_PORTAGE_USER_HOOKS)


def make_stage3(arch: Arch, init: InitSystem, cache_dir: Path) -> GentooStandin:
    """The stand-in stage3 for ``arch`` and ``init`` and its payloads, built once and cached under
    ``cache_dir``/test-stages by a hash of everything that goes in."""
    if (arch, init) not in STAGE_PROFILES:
        raise StageError(f"there is no Portage stand-in stage3 for {arch.value}", hint="use amd64 or arm64")
    layer = portage_layer(arch, init)
    wheel = portage_wheel(cache_dir)
    config = _portage_config(arch, init)
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "layer": layer.hash(),
        "portage_wheel": PORTAGE_WHEEL_SHA256,
        "config": config,
        "wrappers": _TEMPLATES.get_template("portage-wrapper.j2").render(version=PORTAGE_VERSION, name="NAME"),
        "openrc_cloud_init": standin._tree_digest(_OPENRC_SCRIPTS),
        "notice": NOTICE_LINE,
        "sysv_install": _SYSV_INSTALL_SHIM,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    top = cache_dir / "test-stages"
    out = top / f"gentoo-standin-{arch.value}-{init.value}-{key}"
    if not (out / "standin.json").is_file():
        parent = standin._ensure(layer, cache_dir)
        partial = top / f".{out.name}.partial-{os.getpid()}"
        remove_tree(partial)
        try:
            with complete_step(f"Building the {arch.value} {init.value} Portage stand-in stage3 (cached afterwards)"):
                _build_stage3(parent, partial, arch, init, wheel, config)
            try:
                partial.rename(out)
            except OSError:  # another session built the same recipe meanwhile
                if not (out / "standin.json").is_file():
                    raise
        finally:
            remove_tree(partial)
        for stale in top.glob(f"gentoo-standin-{arch.value}-{init.value}-*"):
            if stale != out:
                logger.info("  removing the Portage stand-in of an older recipe: %s", stale.name)
                remove_tree(stale)
    else:
        logger.info("  reusing cached Portage stand-in stage3 %s", out)
    facts = json.loads((out / "standin.json").read_text())
    return GentooStandin(arch=arch, init=init, stage3=out / facts["stage3"], distfiles=out / "distfiles",
                         kernel_version=facts["kernel_version"],
                         payloads=tuple(Payload(**p) for p in facts["payloads"]))


def portage_wheel(cache_dir: Path) -> Path:
    """Portage's wheel from PyPI, kept in ``cache_dir``/test-stages and checked by its digest."""
    wheel = cache_dir / "test-stages" / f"portage-{PORTAGE_VERSION}-py3-none-any.whl"
    if not wheel.is_file():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheel.parent) as scratch:
            subprocess.run(["python3", "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            f"portage=={PORTAGE_VERSION}", "--dest", scratch], check=True, timeout=600)
            Path(scratch, wheel.name).rename(wheel)
    if file_digest(wheel) != PORTAGE_WHEEL_SHA256:
        wheel.unlink()
        raise StageError(f"the Portage wheel from PyPI is not the one this module was written for ({wheel.name})",
                         hint="check PORTAGE_WHEEL_SHA256 in tests/gentoo_standin.py")
    return wheel


def _portage_config(arch: Arch, init: InitSystem) -> dict[str, str]:
    """Gentoo's /etc/portage as a stage3 ships it: image path -> text (make.profile: its target)."""
    return {
        "/etc/portage/make.conf": _TEMPLATES.get_template("make.conf.j2").render(),
        "/etc/portage/make.profile": f"../../var/db/repos/{REPO_NAME}/profiles/{STAGE_PROFILES[arch, init]}",
        "/etc/portage/repos.conf/gentoo.conf": (FILES / "repos-gentoo.conf").read_text(),
        "/etc/portage/binrepos.conf/gentoobinhost.conf": _TEMPLATES.get_template("gentoobinhost.conf.j2").render(
            arch_dir=arch.gentoo_dir, binhost_subdir=_BINHOST_SUBDIR[arch]),
    }


_SYSV_INSTALL = "/usr/lib/systemd/systemd-sysv-install"
_SYSV_INSTALL_SHIM = ("#!/bin/sh\n# imagebuild Portage stand-in stage3: Gentoo's systemd has no SysV compatibility,\n"
                      "# so there is nothing to synchronize with /etc/init.d (tests/gentoo_standin.py).\nexit 0\n")


def _build_stage3(parent: Path, out: Path, arch: Arch, init: InitSystem, wheel: Path,
                  config: dict[str, str]) -> None:
    """Unpack the stand-in into ``out``/root, make it a stage3, pack it; payloads to ``out``/distfiles."""
    root = out / "root"
    distfiles = out / "distfiles"
    root.mkdir(parents=True)
    distfiles.mkdir()
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", root, "-xpf", parent])
    tree = Tree(root)
    kernel_version, payloads = _carve_payloads(tree, arch, distfiles)
    _install_portage(tree, wheel)
    for path, text in config.items():
        if path.endswith("/make.profile"):
            tree.symlink(text, path)
        else:
            tree.write_text(path, text)
    for directory in ("/var/db/pkg", "/var/lib/portage", "/var/cache/distfiles", "/var/cache/binpkgs"):
        tree.mkdir(directory)
    tree.mkdir("/var/lib/portage/home")
    os.chown(tree.host_path("/var/lib/portage/home"), 250, 250)
    if init == InitSystem.systemd and tree.lexists(_SYSV_INSTALL):
        # Gentoo builds systemd without SysV compatibility; Debian's systemctl hands a unit that
        # also has an /etc/init.d script (Gentoo's cloud-init installs OpenRC scripts on every
        # init) to update-rc.d, which refuses an openrc-run script. As on Gentoo: nothing to sync.
        tree.unlink(_SYSV_INSTALL)
        tree.write_text(_SYSV_INSTALL, _SYSV_INSTALL_SHIM, mode=0o755)
    tree.append_text("/etc/imagebuild-standin", NOTICE_LINE.format(version=PORTAGE_VERSION))
    stage3 = f"stage3-{arch.value}-{init.value}-portage-standin.tar"
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name", "-C", root,
         "-cf", out / stage3, "."])
    remove_tree(root)
    (out / "standin.json").write_text(json.dumps({
        "stage3": stage3, "kernel_version": kernel_version,
        "payloads": [dataclasses.asdict(p) for p in payloads],
    }, indent=2) + "\n")


def _install_portage(tree: Tree, wheel: Path) -> None:
    """Portage from its wheel, laid out for Debian's python3 (sys.prefix /usr), with wrappers
    that make / its EPREFIX, and its Python files compiled by the stage's own python3."""
    data = f"portage-{PORTAGE_VERSION}.data/"
    places = (  # wheel prefix -> image directory
        (f"{data}data/lib/portage/", "/usr/lib/portage/"),
        (f"{data}data/share/portage/", "/usr/share/portage/"),
        (f"{data}data/etc/", "/etc/"),
        (f"{data}scripts/", "/usr/bin/"),
        ("", "/usr/lib/python3/dist-packages/"),
    )
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            prefix, where = next((p, w) for p, w in places if info.filename.startswith(p))
            name = info.filename.removeprefix(prefix)
            if where == "/usr/bin/" and name in _SBIN_PROGRAMS:
                where = "/usr/sbin/"
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            tree.write_bytes(where + name, archive.read(info), mode=mode)
        entry_points = archive.read(f"portage-{PORTAGE_VERSION}.dist-info/entry_points.txt").decode()
    # The module finds make.globals at EPREFIX/share/portage/config (portage/const.py).
    tree.mkdir("/share")
    tree.symlink("../usr/share/portage", "/share/portage")
    wrapper = _TEMPLATES.get_template("portage-wrapper.j2")
    for name in re.findall(r"^([\w-]+) = portage\.util\.bin_entry_point", entry_points, re.M):
        where = "/usr/sbin" if name in _SBIN_PROGRAMS else "/usr/bin"
        tree.write_text(f"{where}/{name}", wrapper.render(version=PORTAGE_VERSION, name=name), mode=0o755)
    run(["chroot", tree.root, "python3", "-m", "compileall", "-q", "/usr/lib/python3/dist-packages/portage",
         "/usr/lib/python3/dist-packages/_emerge"], env={"PATH": CHROOT_PATH})


# --- Payloads: the files of Debian's packages that a stage3 does not have ------------------------

# Gentoo's cloud-init installs OpenRC's services whatever the init; the stand-in's are Gentoo's.
_OPENRC_SCRIPTS = standin.FILES_DIR / "openrc" / "etc" / "init.d"


def _carve_payloads(tree: Tree, arch: Arch, distfiles: Path) -> tuple[str, list[Payload]]:
    """Take the kernel's, GRUB's EFI modules' and cloud-init's files out of ``tree`` into payload
    tarballs in ``distfiles`` (debian_payloads). Returns the kernel's release and the payloads."""
    lists = debian_payloads.dpkg_lists(tree)
    versions = debian_payloads.dpkg_versions(tree)
    kernels = [name for name in lists if re.fullmatch(r"linux-image-\d.*", name)]
    if len(kernels) != 1:
        raise StageError(f"the stand-in should hold one versioned kernel package, it holds {kernels or 'none'}")
    kernel_deb = kernels[0]
    kernel_version = kernel_deb.removeprefix("linux-image-")
    grub_deb = f"grub-efi-{arch.debian}-bin"
    kernel_pv, grub_pv, cloud_init_pv = (debian_payloads.upstream_version(versions[deb])
                                         for deb in (kernel_deb, grub_deb, "cloud-init"))
    listed = tree.lstat(f"{debian_payloads.DPKG_INFO}/cloud-init.list")
    assert listed is not None
    openrc = {f"/etc/init.d/{p.name}": (p, int(listed.st_mtime)) for p in sorted(_OPENRC_SCRIPTS.glob("cloud-*"))}
    carved: tuple[tuple[str, str, list[tuple[str, str]], dict[str, tuple[Path, int]]], ...] = (
        # Debian package, distfile, the packages that install it, files it gets instead of Debian's
        (kernel_deb, f"standin-kernel-{kernel_version}.tar", [(a, kernel_pv) for a in KERNEL_PACKAGES], {}),
        (grub_deb, f"standin-grub-{grub_pv}-{arch.grub_target}.tar", [("sys-boot/grub", grub_pv)], {}),
        ("cloud-init", f"standin-cloud-init-{cloud_init_pv}-{arch.value}.tar",
         [("app-emulation/cloud-init", cloud_init_pv)], openrc),
    )
    payloads = []
    for deb, distfile, packages, replaced in carved:
        count = debian_payloads.take_out(tree, lists, deb, distfiles / distfile, replaced)
        payloads += [Payload(atom=atom, version=pv, distfile=distfile) for atom, pv in packages]
        logger.info("  %s: %d members into %s", deb, count, distfile)
    # What the kernel's and initramfs-tools' maintainer scripts made: the initramfs and the links.
    for name in tree.listdir("/boot"):
        if name.startswith(("initrd.img-", "vmlinuz")):
            tree.remove(f"/boot/{name}")
    for name in tree.listdir("/"):
        if name.startswith(("vmlinuz", "initrd.img")):
            tree.remove(f"/{name}")
    # What update-rc.d made for cloud-init's System V scripts (Gentoo has no /etc/rc?.d).
    for directory in tree.glob("/etc", "rc?.d"):
        for link in tree.glob(directory, "[SK][0-9][0-9]cloud-*"):
            if tree.is_symlink(link) and not tree.exists(link):
                tree.remove(link)
    return kernel_version, payloads


# --- The test repository -----------------------------------------------------------------------

_PAYLOAD_PACKAGES = {  # atom -> (what, homepage, license)
    "sys-boot/grub": ("Debian's GRUB EFI modules (grub-efi-*-bin), GRUB's tools stay Debian's",
                      "https://www.gnu.org/software/grub/", "GPL-3"),
    "app-emulation/cloud-init": ("Debian's cloud-init with Gentoo's OpenRC services",
                                 "https://cloud-init.io/", "|| ( Apache-2.0 GPL-3 )"),
}
_DRACUT_VERSION = "105"
_INSTALLKERNEL_VERSION = "50"


def write_repository(dest: Path, standins: list[GentooStandin], *, distfiles_url: str | None = None) -> Path:
    """The test ebuild repository ``gentoo`` at ``dest``, with the payload packages of
    ``standins`` (their distfiles digested in each package's Manifest); returns ``dest``.
    With ``distfiles_url`` (where the stand-ins' distfiles are served), the kernel built from
    source, ``sys-kernel/gentoo-kernel``, fetches its payload from there."""
    arches = sorted({s.arch for s in standins}, key=list(Arch).index)
    keywords = " ".join(a.value for a in arches)
    ebuilds: dict[str, str] = {}  # relative path -> text

    # The payload packages: one ebuild per version, each arch's payload under its USE flag.
    by_package: dict[tuple[str, str], list[tuple[GentooStandin, Payload]]] = {}
    for s in standins:
        for payload in s.payloads:
            entries = by_package.setdefault((payload.atom, payload.version), [])
            if all(other.arch != s.arch for other, _ in entries):
                entries.append((s, payload))
    manifests: dict[str, dict[str, str]] = {}
    for (atom, version), entries in sorted(by_package.items()):
        pn = atom.split("/")[1]
        dist = [{"arch": s.arch.value, "distfile": p.distfile, "version": s.kernel_version} for s, p in entries]
        words = " ".join(s.arch.value for s, _ in entries)
        if atom in KERNEL_PACKAGES:
            text = _TEMPLATES.get_template("kernel.ebuild.j2").render(
                atom=atom, kernels=dist, keywords=words,
                fetch_url=distfiles_url if atom == "sys-kernel/gentoo-kernel" else None)
        else:
            what, homepage, license_ = _PAYLOAD_PACKAGES[atom]
            text = _TEMPLATES.get_template("payload.ebuild.j2").render(
                atom=atom, what=what, homepage=homepage, license=license_, payloads=dist, keywords=words)
        ebuilds[f"{atom}/{pn}-{version}.ebuild"] = text
        for s, p in entries:
            line = _dist_line(s.distfiles / p.distfile)
            known = manifests.setdefault(atom, {})
            if known.get(p.distfile, line) != line:
                raise StageError(f"two stand-ins have different payloads named {p.distfile}",
                                 hint="rebuild the stand-ins from the same base layer")
            known[p.distfile] = line

    ebuilds[f"sys-kernel/dracut/dracut-{_DRACUT_VERSION}.ebuild"] = \
        _TEMPLATES.get_template("dracut.ebuild.j2").render(keywords=keywords)
    ebuilds[f"sys-kernel/installkernel/installkernel-{_INSTALLKERNEL_VERSION}.ebuild"] = \
        _TEMPLATES.get_template("marker.ebuild.j2").render(
            atom="sys-kernel/installkernel", keywords=keywords, iuse="dracut grub",
            rdepend="dracut? ( sys-kernel/dracut ) grub? ( sys-boot/grub )")
    payload_atoms = {atom for atom, _ in by_package}
    for atom in RELENG_PACKAGES:
        if atom not in payload_atoms and atom not in _PAYLOAD_PACKAGES:
            ebuilds[f"{atom}/{atom.split('/')[1]}-1.ebuild"] = _TEMPLATES.get_template("marker.ebuild.j2").render(
                atom=atom, keywords=keywords, iuse="", rdepend="")

    shutil.copytree(FILES / "repository", dest, dirs_exist_ok=True)  # profiles, layout.conf
    files = {
        "profiles/categories": "".join(f"{c}\n" for c in sorted({p.split("/")[0] for p in ebuilds})),
        **ebuilds,
        **{f"{atom}/Manifest": "".join(sorted(lines.values())) for atom, lines in manifests.items()},
    }
    for relative, text in files.items():
        path = dest / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    shim = dest / "sys-kernel/dracut/files/dracut-standin"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FILES / "dracut-standin", shim)
    return dest


def _dist_line(path: Path) -> str:
    """A Manifest DIST line for distfile ``path`` (layout.conf's manifest-hashes)."""
    blake2b, sha512 = hashlib.blake2b(), hashlib.sha512()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            blake2b.update(block)
            sha512.update(block)
    return f"DIST {path.name} {path.stat().st_size} BLAKE2B {blake2b.hexdigest()} SHA512 {sha512.hexdigest()}\n"


def repository_packages(repo: Path, arch: Arch) -> list[str]:
    """The packages of the test repository that have a version keyworded for ``arch``."""
    atoms = set()
    for ebuild in repo.glob("*-*/*/*.ebuild"):
        keywords = re.search(r'^KEYWORDS="([^"]*)"', ebuild.read_text(), re.M)
        if keywords and arch.value in keywords.group(1).split():
            atoms.add(f"{ebuild.parent.parent.name}/{ebuild.parent.name}")
    return sorted(atoms)


# --- Signing, the builder and the binhost ------------------------------------------------------

def make_signing_key(home: Path, uid: str = BINHOST_UID) -> tuple[str, Path]:
    """A throwaway passphrase-less signing key in GNUPGHOME ``home``: (its fingerprint, the
    armoured public key file beside ``home`` a user would pass as --binhost-keyring)."""
    key = _make_key(home, uid)
    public = key.export(home.with_name(f"{home.name}-public.asc"), armor=True)
    stop_gpg_agent(home)  # signing happens in the builder's chroot, with its own agent
    return key.fingerprint, public


def trust_keyring(home: Path, public_key: Path) -> None:
    """GnuPG home ``home`` trusting ``public_key`` fully and readable by anyone, as Portage's
    BINPKG_GPG_VERIFY_GPG_HOME must be (it runs gpg --verify as nobody)."""
    # gpg looks for its agent's socket in the home, and a socket's path has at most 107
    # bytes: a home deep in a test's directory makes gpg fail (exit 2, "File name too long").
    # So the keyring is made in a short temporary home and copied.
    with tempfile.TemporaryDirectory(prefix="gnupg-") as scratch:
        gpg = ["gpg", "--homedir", scratch, "--batch", "--no-tty", "--no-autostart"]
        subprocess.run([*gpg, "--import", str(public_key)], check=True, capture_output=True, timeout=60)
        lines = subprocess.run([*gpg, "--with-colons", "--list-keys"], check=True, capture_output=True, text=True,
                               timeout=60).stdout.splitlines()
        primaries = [line.split(":")[9] for previous, line in zip(lines, lines[1:], strict=False)
                     if line.startswith("fpr:") and previous.startswith("pub:")]
        subprocess.run([*gpg, "--import-ownertrust"], input="".join(f"{fpr}:6:\n" for fpr in primaries), text=True,
                       check=True, capture_output=True, timeout=60)
        # Without this even a good signature is "of undefined trust", and Portage refuses it.
        subprocess.run([*gpg, "--check-trustdb"], check=True, capture_output=True, timeout=60)
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o755)
        for name in ("pubring.kbx", "trustdb.gpg"):
            shutil.copyfile(Path(scratch, name), home / name)
            (home / name).chmod(0o644)


@contextlib.contextmanager
def unpacked_stage(stage3: Path, repo: Path | None = None, *, work: Path | None = None) -> Iterator[Tree]:
    """A throwaway copy of ``stage3``, with /proc, /sys, /dev and /run mounted for chroot and
    ``repo`` bound read-only at /var/db/repos/gentoo; unmounted and deleted on the way out."""
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imagebuild-gentoo-standin-",
                                                                        dir=work)))
        root = scratch / "root"
        root.mkdir()
        stack.callback(remove_tree, root)  # refuses while anything is mounted below it
        run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--exclude=./dev/*", "-C", root,
             "-xpf", stage3])
        tree = Tree(root)
        stack.enter_context(chroot_mounts(tree))
        # A booted system has it; Portage's signing command locks there (BINPKG_GPG_SIGNING_BASE_COMMAND).
        lock = root / "run" / "lock"  # on the tmpfs chroot_mounts just made
        lock.mkdir()
        lock.chmod(0o1777)
        if repo is not None:
            stack.enter_context(mounted(repo, tree.real_directory(f"/var/db/repos/{REPO_NAME}"), bind=True,
                                        options="ro"))
        yield tree


def emerge(tree: Tree, args: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess[bytes]:
    """``emerge ARGS`` in the tree (unpacked_stage), its output appended to ``log``; not checked."""
    with log.open("ab") as out:
        out.write(f"\n>>> emerge {' '.join(args)}\n".encode())
        out.flush()
        result = run(["chroot", tree.root, "emerge", "--color=n", "--nospinner", *args],
                     env={"PATH": CHROOT_PATH, "HOME": "/root", "TERM": "dumb", **env},
                     stdout=out.fileno(), check=False)
        out.write(result.stderr)
    return result


_SIGNING_HOME = "/root/.gnupg-binhost"
_VERIFY_HOME = "/etc/portage/gnupg"


def build_binhost(standin: GentooStandin, repo: Path, pkgdir: Path, signing_home: Path, fingerprint: str, *,
                  packages: list[str] | None = None) -> Path:
    """Signed gpkg packages of ``packages`` (default: every package of ``repo`` for the stand-in's
    architecture) built by real emerge in a throwaway copy of the stand-in stage3, into
    ``pkgdir`` with its Packages index; returns ``pkgdir``.

    Everything is built as it is configured by default, and the kernel packages once more with
    USE=-initramfs (Catalyst's way), both instances kept (binpkg-multi-instance); installkernel
    with releng's USE. ``emerge --getbinpkg`` picks the instance that matches its USE;
    ``--getbinpkgonly`` implies --binpkg-respect-use=n and takes the newest, the USE=-initramfs
    one. ``pkgdir`` may already hold another architecture's packages: each entry of the index
    carries its CHOST, and consumers of either architecture take only theirs."""
    atoms = packages or repository_packages(repo, standin.arch)
    pkgdir.mkdir(parents=True, exist_ok=True)
    log = pkgdir.parent / f"{pkgdir.name}-build-{standin.arch.value}.log"
    log.unlink(missing_ok=True)
    public = signing_home.with_name(f"{signing_home.name}-public.asc")
    with complete_step(f"Building the {standin.arch.value} binhost: {len(atoms)} packages, signed"), \
            contextlib.ExitStack() as stack:
        tree = stack.enter_context(unpacked_stage(standin.stage3, repo))
        stack.enter_context(mounted(standin.distfiles, tree.real_directory("/var/cache/distfiles"), bind=True,
                                    options="ro"))
        stack.enter_context(mounted(pkgdir, tree.real_directory("/var/cache/binpkgs"), bind=True))
        shutil.copytree(signing_home, tree.host_path("/root") / _SIGNING_HOME.rsplit("/", 1)[1],
                        ignore=shutil.ignore_patterns("S.*", "*.lock"))
        stack.callback(run, ["chroot", tree.root, "gpgconf", "--homedir", _SIGNING_HOME, "--kill", "all"],
                       env={"PATH": CHROOT_PATH}, check=False)
        if not public.is_file():
            subprocess.run(["gpg", "--homedir", str(signing_home), "--batch", "--armor", "--export",
                            "--output", str(public), fingerprint], check=True, capture_output=True, timeout=60)
        trust_keyring(tree.real_directory(_VERIFY_HOME), public)
        tree.write_text("/etc/portage/package.use/binhost", BINHOST_PACKAGE_USE)
        env = {"FEATURES": "binpkg-signing", "BINPKG_FORMAT": "gpkg",
               "BINPKG_GPG_SIGNING_GPG_HOME": _SIGNING_HOME, "BINPKG_GPG_SIGNING_KEY": fingerprint,
               "BINPKG_GPG_VERIFY_GPG_HOME": _VERIFY_HOME}
        passes = [(atoms, {}), ([a for a in atoms if a in KERNEL_PACKAGES], {"USE": "-initramfs"})]
        for pass_atoms, use in passes:
            if not pass_atoms:
                continue
            # Two builds at a time on these 2-core machines (amd64, everything: 76 s against 112 s).
            result = emerge(tree, ["--oneshot", "--buildpkgonly", "--usepkg=n", "--quiet-build=y",
                                   f"--jobs={os.cpu_count() or 1}", *pass_atoms], {**env, **use}, log)
            if result.returncode != 0:
                raise CommandError(f"building the {standin.arch.value} binhost failed (emerge exit status "
                                   f"{result.returncode}){_tail(log)}\n    the whole output: {log}")
    check_index(pkgdir)
    return pkgdir


def _tail(log: Path, lines: int = 25) -> str:
    return "".join(f"\n    {line}" for line in log.read_text(errors="replace").splitlines()[-lines:])


def read_index(pkgdir: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The Packages index of ``pkgdir``: its header and its package entries."""
    blocks = [b for b in (pkgdir / "Packages").read_text().split("\n\n") if b.strip()]
    parsed = [dict(line.split(": ", 1) for line in block.splitlines() if ": " in line) for block in blocks]
    return parsed[0], parsed[1:]


def check_index(pkgdir: Path) -> None:
    """Every package the index names is there with its size, and nothing else (a failed build
    leaves 0-byte placeholders)."""
    _, entries = read_index(pkgdir)
    named = {e["PATH"] for e in entries}
    problems = [f"{p}: {'missing' if not (pkgdir / p).is_file() else 'wrong size'}" for p in sorted(named)
                if not (pkgdir / p).is_file() or (pkgdir / p).stat().st_size != int(next(
                    e["SIZE"] for e in entries if e["PATH"] == p))]
    stray = [str(p.relative_to(pkgdir)) for p in pkgdir.rglob("*.gpkg.tar") if str(p.relative_to(pkgdir)) not in named]
    if problems or stray:
        raise StageError(f"the binhost {pkgdir} and its Packages index disagree: "
                         + "; ".join(problems + [f"{s}: not in the index" for s in stray]))


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """``directory`` over real HTTP on 127.0.0.1 (any free port); yields its URL, no trailing slash."""
    handler = type("Handler", (_QuietHandler,), {"root": str(directory)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="binhost",
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    root: str

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, directory=self.root, **kwargs)  # type: ignore[arg-type]

    def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures
        pass


# --- Broken binhosts ---------------------------------------------------------------------------

TAMPERINGS = ("payload", "unsigned", "otherkey")


def tampered_copy(pkgdir: Path, dest: Path, how: str, *, package: str = "sys-boot/grub") -> Path:
    """A copy of binhost ``pkgdir`` at ``dest`` in which every instance of ``package`` is broken:

    - ``payload``: bytes in the middle of its image.tar.zst changed (same size);
    - ``unsigned``: its signatures removed (the .sig members, the Manifest's clearsigning);
    - ``otherkey``: re-signed, consistently, by a new throwaway key nobody trusts.

    The Packages index is rewritten to describe the broken files (size, digests), as a
    binhost's owner or an attacker on it could, so Portage gets as far as verifying them."""
    if how not in TAMPERINGS:
        raise ValueError(f"unknown tampering {how!r}: use one of {', '.join(TAMPERINGS)}")
    shutil.copytree(pkgdir, dest, symlinks=True)
    header, entries = read_index(dest)
    targets = [e for e in entries if _cpv_package(e["CPV"]) == package]
    if not targets:
        raise ValueError(f"{package} is not on the binhost {pkgdir}")
    with contextlib.ExitStack() as stack:
        stranger = None
        if how == "otherkey":
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imagebuild-otherkey-")))
            stranger = _make_key(home / "gnupg", "Someone Else (TEST KEY) <stranger@example.invalid>")
            stack.callback(stop_gpg_agent, stranger.home)
        for entry in targets:
            gpkg = dest / entry["PATH"]
            if how == "payload":
                gpkg_tamper.flip_image_bytes(gpkg)
            else:
                gpkg_tamper.resign(gpkg, stranger)
            data = gpkg.read_bytes()
            entry["SIZE"] = str(len(data))
            for name, algorithm in gpkg_tamper.HASHES.items():
                if name in entry:  # Portage's index has MD5 and SHA1
                    entry[name] = hashlib.new(algorithm, data).hexdigest()
            entry["MTIME"] = str(int(gpkg.stat().st_mtime))
    _write_index(dest, header, entries)
    return dest


def _cpv_package(cpv: str) -> str:
    """category/name of a CPV (sys-kernel/gentoo-kernel-bin-6.1.192 -> sys-kernel/gentoo-kernel-bin)."""
    match = re.fullmatch(r"(.+?)-\d[^/]*", cpv)
    return match.group(1) if match else cpv


def _write_index(pkgdir: Path, header: dict[str, str], entries: list[dict[str, str]]) -> None:
    """Packages (and Packages.gz, which FEATURES=compress-index keeps beside it) from ``entries``."""
    text = "".join("".join(f"{k}: {v}\n" for k, v in block.items()) + "\n" for block in (header, *entries))
    (pkgdir / "Packages").write_text(text)
    if (pkgdir / "Packages.gz").exists():
        (pkgdir / "Packages.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
