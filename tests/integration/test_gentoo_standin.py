"""The Portage stand-in (tests/gentoo_standin.py) is what a Gentoo stage3 and binhost are, for real.

A consumer does what a build on Gentoo does: unpack a fresh copy of the stage3, bind the
repository, point binrepos.conf at the binhost served on 127.0.0.1, trust its key in a
verify keyring, and run emerge --getbinpkg (the kernel with USE=-initramfs, then dracut, as
Catalyst's kmerge.sh does). Everything is real: Portage 3.0.83, gpg signatures, HTTP. A
tampered, unsigned or otherwise signed package is refused and nothing is installed.

The stand-in stage3 is cached (cache_dir/test-stages); the binhost is conftest's
gentoo_binhost, built once per session. What a build does with them (emerge, dracut, refusals)
is tested through imagebuild in test_portage_build.py and, booted, in test_release.py; here, the
fixtures themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild.config import Arch
from imagebuild.run import run
from imagebuild.tree import Tree

import gentoo_standin
from conftest import BINHOST_PACKAGES, GentooBinhost, mounts_under
from gentoo_standin import GentooStandin

pytestmark = pytest.mark.integration

CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
WANTED = ("sys-kernel/gentoo-kernel-bin", "sys-boot/grub", "app-emulation/cloud-init")


@dataclasses.dataclass(frozen=True)
class Binhost:
    standin: GentooStandin
    repo: Path
    pkgdir: Path
    url: str
    public_key: Path  # what a user passes as --binhost-keyring


@pytest.fixture(scope="module")
def standin_amd64(gentoo_binhost: GentooBinhost) -> GentooStandin:
    gentoo_binhost.stage3(Arch.amd64)
    return gentoo_binhost.standin(Arch.amd64)


@pytest.fixture(scope="module")
def binhost(gentoo_binhost: GentooBinhost, standin_amd64: GentooStandin) -> Binhost:
    return Binhost(standin_amd64, gentoo_binhost.repo, gentoo_binhost.pkgdir, gentoo_binhost.url,
                   gentoo_binhost.public_key)


@dataclasses.dataclass
class Consumer:
    """A fresh copy of the stage3 set up to install from one binhost."""

    tree: Tree
    log: Path

    def emerge(self, *args: str, env: dict[str, str] | None = None) -> int:
        env = {"FEATURES": "binpkg-request-signature", **(env or {})}
        return gentoo_standin.emerge(self.tree, list(args), env, self.log).returncode

    def run(self, *cmd: str) -> str:
        return run(["chroot", self.tree.root, *cmd], env=CHROOT_ENV).stdout.decode()

    def installed(self) -> list[str]:
        return sorted(f"{c}/{p}" for c in self.tree.listdir("/var/db/pkg") for p in self.tree.listdir(f"/var/db/pkg/{c}"))


@contextlib.contextmanager
def consumer(binhost: Binhost, url: str, work: Path) -> Iterator[Consumer]:
    """The stage3 unpacked under ``work``, its binhost ``url`` (Gentoo's own is unreachable
    here) with verify-signature, the binhost's key trusted, releng's installkernel USE."""
    work.mkdir(exist_ok=True)
    with gentoo_standin.unpacked_stage(binhost.standin.stage3, binhost.repo, work=work) as tree:
        tree.remove("/etc/portage/binrepos.conf/gentoobinhost.conf")
        tree.write_text("/etc/portage/binrepos.conf/test-binhost.conf",
                        f"[test-binhost]\nsync-uri = {url}\npriority = 9999\nverify-signature = true\n")
        gentoo_standin.trust_keyring(tree.real_directory("/etc/portage/gnupg"), binhost.public_key)
        tree.write_text("/etc/portage/package.use/installkernel", gentoo_standin.BINHOST_PACKAGE_USE)
        yield Consumer(tree, work / "emerge.log")
    assert not mounts_under(work), "the consumer's stage must be unmounted"
    assert not [p for p in work.iterdir() if p.name.startswith("imagebuild-gentoo-standin-")]


def members(tarball: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tarball) as tar:
        return {m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers()}


def test_stage3_is_shaped_like_gentoos(standin_amd64: GentooStandin) -> None:
    stage = members(standin_amd64.stage3)
    kv = standin_amd64.kernel_version
    with tarfile.open(standin_amd64.stage3) as tar:
        def text(name: str) -> str:
            return tar.extractfile(f"./{name}").read().decode()  # type: ignore[union-attr]

        assert 'FEATURES="-sandbox -usersandbox binpkg-request-signature"' in text("etc/portage/make.conf")
        assert 'COMMON_FLAGS="-O2 -pipe"' in text("etc/portage/make.conf")
        assert "[gentoobinhost]\npriority = 1\nsync-uri = https://distfiles.gentoo.org/releases/amd64/binpackages/" \
               "23.0/x86-64\n" in text("etc/portage/binrepos.conf/gentoobinhost.conf")
        assert "location = /var/db/repos/gentoo" in text("etc/portage/repos.conf/gentoo.conf")
        assert "auto-sync = no" in text("etc/portage/repos.conf/gentoo.conf")
        assert "Portage STAND-IN stage3" in text("etc/imagebuild-standin")
        assert "not Gentoo" in text("etc/imagebuild-standin")
        assert "PORTAGE_OVERRIDE_EPREFIX=/" in text("usr/bin/emerge")
    assert stage["etc/portage/make.profile"].linkname == \
        "../../var/db/repos/gentoo/profiles/default/linux/amd64/23.0/no-multilib/systemd"
    assert stage["var/db/pkg"].isdir() and not [n for n in stage if n.startswith("var/db/pkg/")]
    assert not [n for n in stage if n.startswith("var/db/repos/")], "a stage3 has no repository"
    for program in ("usr/bin/emerge", "usr/bin/ebuild", "usr/bin/portageq", "usr/bin/quickpkg", "usr/bin/gpkg-sign",
                    "usr/sbin/env-update", "usr/sbin/emaint", "usr/sbin/mkinitramfs", "usr/bin/gpg", "usr/bin/zstd"):
        assert program in stage, program
    assert stage["share/portage"].linkname == "../usr/share/portage"
    # No kernel, initramfs, GRUB EFI modules or cloud-init: those come from packages.
    assert not [n for n in stage if n.startswith(("boot/vmlinuz", "boot/initrd", "vmlinuz", "initrd.img"))]
    assert not [n for n in stage if n.startswith((f"usr/lib/modules/{kv}", "usr/lib/grub/x86_64-efi"))]
    assert "usr/bin/cloud-init" not in stage and "etc/cloud/cloud.cfg" not in stage
    # ... and dpkg still says they are installed (its database is left alone).
    assert f"var/lib/dpkg/info/linux-image-{kv}.list" in stage

    kernel = members(standin_amd64.distfiles / f"standin-kernel-{kv}.tar")
    assert {f"boot/vmlinuz-{kv}", f"boot/config-{kv}", f"usr/lib/modules/{kv}/modules.dep"} <= set(kernel)
    assert any(n.endswith("/xfs.ko") for n in kernel)
    grub = members(standin_amd64.distfiles / standin_amd64.payload("sys-boot/grub").distfile)
    assert "usr/lib/grub/x86_64-efi/normal.mod" in grub
    cloud_init = members(standin_amd64.distfiles / standin_amd64.payload("app-emulation/cloud-init").distfile)
    assert {"usr/bin/cloud-init", "etc/cloud/cloud.cfg", "etc/init.d/cloud-init"} <= set(cloud_init)
    assert all(m.uid == 0 and m.gid == 0 for m in cloud_init.values())


def test_emerge_info_in_the_stage3(binhost: Binhost, tmp_path: Path) -> None:
    with consumer(binhost, binhost.url, tmp_path) as stage:
        info = stage.run("emerge", "--info")
    assert "Portage 3.0.83 (python 3.11" in info
    assert "default/linux/amd64/23.0/no-multilib/systemd" in info
    assert "FEATURES=" in info and " sandbox " not in info


def test_binhost_holds_signed_packages(binhost: Binhost) -> None:
    header, entries = gentoo_standin.read_index(binhost.pkgdir)
    assert int(header["PACKAGES"]) == len(entries)
    # The binhost is kept between runs and may hold arm64's packages too: amd64's are checked.
    entries = [e for e in entries if e.get("CHOST", header.get("CHOST", "")).startswith("x86_64")]
    assert entries, "no amd64 package on the binhost"
    cpvs = {gentoo_standin._cpv_package(e["CPV"]) for e in entries}
    assert set(BINHOST_PACKAGES) <= cpvs <= set(gentoo_standin.repository_packages(binhost.repo, Arch.amd64))
    # The kernels twice: as configured (USE=initramfs) and as Catalyst emerges them.
    for kernel in set(gentoo_standin.KERNEL_PACKAGES) & set(BINHOST_PACKAGES):
        uses = sorted("initramfs" in e["USE"].split() for e in entries if gentoo_standin._cpv_package(e["CPV"]) == kernel)
        assert uses == [False, True], kernel
    gentoo_standin.check_index(binhost.pkgdir)
    for entry in entries:
        with tarfile.open(binhost.pkgdir / entry["PATH"]) as tar:
            names = [n.split("/", 1)[1] for n in tar.getnames()]
            manifest = tar.extractfile(tar.getnames()[names.index("Manifest")]).read()  # type: ignore[union-attr]
        assert {"image.tar.zst.sig", "metadata.tar.zst.sig"} <= set(names), entry["CPV"]
        assert manifest.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"), entry["CPV"]


def test_tampered_copy_keeps_the_index_describing_the_files(binhost: Binhost, tmp_path: Path) -> None:
    for how in gentoo_standin.TAMPERINGS:
        bad = gentoo_standin.tampered_copy(binhost.pkgdir, tmp_path / how, how, package="sys-kernel/gentoo-kernel-bin")
        gentoo_standin.check_index(bad)
        _, entries = gentoo_standin.read_index(bad)
        for entry in entries:
            changed = (bad / entry["PATH"]).read_bytes() != (binhost.pkgdir / entry["PATH"]).read_bytes()
            assert changed == ("gentoo-kernel-bin-" in entry["PATH"]), (how, entry["PATH"])
