"""A Gentoo-shaped stage3 becomes an image through real Portage (issue 11), as a build sees it.

The stage is the Portage stand-in stage3 of tests/gentoo_standin.py: the Debian stand-in with
Portage 3.0.83 from PyPI, Gentoo's /etc/portage and binrepos.conf, and no kernel, initramfs,
GRUB EFI modules or cloud-init. Those come, as on Gentoo, from emerge: a test ebuild repository
and a binhost of gpkg packages signed with a throwaway key on 127.0.0.1 (conftest's
gentoo_binhost). The images these builds make boot in tests/boot/test_release.py (where the
second image of each architecture reuses the first one's cached steps); releng's specs emerge in
tests/integration/test_releng_pair.py, which also reads the image's Portage configuration
offline. Here: every way the inputs can be wrong.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imagebuild.config import Arch

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
