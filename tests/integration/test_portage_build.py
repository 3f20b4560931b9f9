"""A Gentoo-shaped stage3 becomes an image through real Portage (issue 11), as a build sees it.

The stage is the Portage stand-in stage3 of tests/gentoo_standin.py: the Debian stand-in with
Portage 3.0.83 from PyPI, Gentoo's /etc/portage and binrepos.conf, and no kernel, initramfs,
GRUB EFI modules or cloud-init. Those come, as on Gentoo, from emerge: a test ebuild repository
and a binhost of gpkg packages signed with a throwaway key on 127.0.0.1 (conftest's
gentoo_binhost). The images these builds make boot in tests/boot/test_release.py; here, what
a build does with its inputs: the emerge, the cache, the image's Portage configuration, and
every way the inputs can be wrong.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from imagebuild.config import Arch
from imagebuild.imagefs import open_image

from conftest import GentooBinhost, imagebuild_cli, loop_devices, mounts_under

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PACKAGES = "sys-boot/grub app-editors/nano app-admin/sudo"


def _spec(tmp_path: Path, *, packages: str = PACKAGES, kernel: bool = True) -> Path:
    spec = tmp_path / "console.spec"
    text = (REPO / "specs/amd64/console.spec").read_text()
    if not kernel:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("boot/kernel")) + "\n"
    spec.write_text(text + (f"\ndiskimage/packages: {packages}\n" if packages else ""))
    return spec


def _build(tmp_path: Path, binhost: GentooBinhost, *args: object, out: str = "out", spec: Path | None = None,
           stamp: str = "20261205T000000Z") -> subprocess.CompletedProcess[str]:
    return imagebuild_cli("build", "amd64", "console", "--spec", spec or _spec(tmp_path),
                          "--stage", binhost.stage3(Arch.amd64), "--no-test", "-o", tmp_path / out,
                          "--stamp", stamp, "--work-dir", tmp_path / "work", *args)


def _nothing_left(tmp_path: Path, out: str = "out") -> None:
    assert not mounts_under(tmp_path), "a mount is left behind"
    assert not loop_devices(tmp_path), "a loop device is left behind"
    assert not (tmp_path / out).exists() or not list((tmp_path / out).iterdir()), "half-written output"
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").glob("build-*")), "a workspace is left"


def test_emerge_then_the_cached_result(tmp_path: Path, gentoo_binhost: GentooBinhost) -> None:
    flags = ("--repo", gentoo_binhost.repo, "--binhost", gentoo_binhost.url,
             "--binhost-keyring", gentoo_binhost.public_key)
    result = _build(tmp_path, gentoo_binhost, *flags)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sys-kernel/gentoo-kernel-bin (no config fragment" in result.stderr
    [image] = (tmp_path / "out").glob("*.qcow2")
    log = (tmp_path / "out" / (image.name + ".emerge.log")).read_text()
    assert "Emerging binary" in log and "sys-boot/grub" in log and ">>> dracut" in log
    with open_image(image) as img:
        root = img.root
        installed = {p.parent.name + "/" + p.name for p in (root / "var/db/pkg").glob("*/*")}
        assert any(p.startswith("sys-kernel/gentoo-kernel-bin-") for p in installed), installed
        assert any(p.startswith("sys-boot/grub-") for p in installed), installed
        # The image keeps the stage's own binhost and key settings; nothing of the build's own
        # binhost, its key, its USE or its FEATURES stays.
        binrepos = root / "etc/portage/binrepos.conf"
        assert sorted(p.name for p in binrepos.iterdir()) == ["gentoobinhost.conf"]
        assert "https://distfiles.gentoo.org/releases/amd64/binpackages" in (binrepos / "gentoobinhost.conf").read_text()
        make_conf = (root / "etc/portage/make.conf").read_text()
        assert "binpkg-request-signature" in make_conf, "the stage's signature policy stays"
        with tarfile.open(gentoo_binhost.stage3(Arch.amd64)) as stage:
            assert make_conf.encode() == stage.extractfile("./etc/portage/make.conf").read(), \
                "make.conf is the stage's (the spec has no diskimage/use; the build-only USE is gone)"  # type: ignore[union-attr]
        assert not (root / "var/tmp/imagebuild-binhost-gnupg").exists()
        assert not (root / "etc/portage/gnupg").exists() or gentoo_binhost.fingerprint.encode() not in b"".join(
            p.read_bytes() for p in (root / "etc/portage/gnupg").rglob("*") if p.is_file())
        for path in [*(root / "etc").rglob("*"), *(root / "var/lib/portage").rglob("*")]:
            if path.is_file() and not path.is_symlink():
                assert gentoo_binhost.url.encode() not in path.read_bytes(), f"{path} names the build's binhost"
        assert not list((root / "var/cache/binpkgs").rglob("*.gpkg.tar"))
        assert not list((root / "var/cache/distfiles").iterdir())
    # The same inputs again: the cached tree, no emerge.
    again = _build(tmp_path, gentoo_binhost, *flags, out="out2", stamp="20261205T000001Z")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "no emerge runs" in again.stderr and "  emerge --" not in again.stderr
    [image2] = (tmp_path / "out2").glob("*.qcow2")
    assert (tmp_path / "out2" / (image2.name + ".emerge.log")).read_text() == log


@pytest.mark.parametrize("how", ["payload", "unsigned", "otherkey"])
def test_a_bad_binary_package_is_refused(tmp_path: Path, gentoo_binhost: GentooBinhost, how: str) -> None:
    import gentoo_standin

    gentoo_binhost.stage3(Arch.amd64)
    bad = gentoo_standin.tampered_copy(gentoo_binhost.pkgdir, tmp_path / f"binpkgs-{how}", how)
    with gentoo_standin.serve(bad) as url:
        result = _build(tmp_path, gentoo_binhost, "--repo", gentoo_binhost.repo, "--binhost", url,
                        "--binhost-keyring", gentoo_binhost.public_key)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error: ") == 1, result.stderr[-3000:]
    assert "emerge refused a binary package" in result.stderr and "signature" in result.stderr
    _nothing_left(tmp_path)


def test_the_stage3_alone_says_what_is_missing(tmp_path: Path, gentoo_binhost: GentooBinhost) -> None:
    """The stand-in stage3 names Gentoo's binhost, which no machine here reaches, and carries no
    repository (the mirror's snapshot cannot be had either)."""
    result = _build(tmp_path, gentoo_binhost, "--repo", gentoo_binhost.repo)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "distfiles.gentoo.org/releases/amd64/binpackages" in result.stderr and "--binhost" in result.stderr
    _nothing_left(tmp_path)
    result = _build(tmp_path, gentoo_binhost, "--binhost", gentoo_binhost.url,
                    "--binhost-keyring", gentoo_binhost.public_key, "--mirror", "http://127.0.0.1:9/")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no ebuild repository" in result.stderr and "--repo" in result.stderr
    _nothing_left(tmp_path)


def test_neither_kernel_nor_boot_kernel(tmp_path: Path, gentoo_binhost: GentooBinhost) -> None:
    result = _build(tmp_path, gentoo_binhost, "--repo", gentoo_binhost.repo, "--binhost", gentoo_binhost.url,
                    spec=_spec(tmp_path, kernel=False))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no kernel in /boot" in result.stderr and "boot/kernel" in result.stderr
    assert "  emerge --" not in result.stderr, "refused before anything is emerged"
    _nothing_left(tmp_path)
