"""Releng's amd64 disk-image specs as they are, with real Portage (issue 11, item 5).

``releases/specs/amd64/diskimage-stage1-console.spec`` and ``diskimage-stage2-console.spec`` from
../shared/releng, unchanged, with the placeholders Gentoo's release script fills in (@TIMESTAMP@
from --stamp, @REPO_DIR@ the releng checkout). The stage3 is the Portage stand-in; the packages
come from the test repository and the signed loopback binhost (conftest's gentoo_binhost), and
the ones the binhost lacks (most of releng's list: marker packages here) are built from source,
as ``--getbinpkg`` does on Gentoo. Two ways, as Catalyst runs them and as one build:

- ``imagebuild stage1`` writes the seed into the seed cache, and ``imagebuild build`` with the
  stage2 spec finds it there by its source_subpath;
- ``imagebuild build --spec STAGE2 --stage1-spec STAGE1`` runs both from the stage3.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagebuild.config import Arch
from imagebuild.imagefs import open_image

from conftest import GentooBinhost, imagebuild_cli, loop_devices, missing, mounts_under

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RELENG = Path(os.environ.get("IMAGEBUILD_RELENG_COPY", REPO.parent / "shared" / "releng"))
SPECS = RELENG / "releases/specs/amd64"
STAMP = "20261205T120000Z"
KCONFIG = RELENG / "releases/kconfig/amd64/dist-amd64-livecd.config"


def _releng_flags(binhost: GentooBinhost, cache: Path) -> list[str | Path]:
    return ["--stamp", STAMP, "--set", f"REPO_DIR={RELENG}", "--set", "TREEISH=0123abcd",
            "--repo", binhost.repo, "--binhost", binhost.url, "--binhost-keyring", binhost.public_key,
            "--cache-dir", cache]


@pytest.fixture(autouse=True)
def _releng() -> None:
    if not SPECS.is_dir():
        missing(f"Gentoo's releng specs are not at {RELENG} (set IMAGEBUILD_RELENG_COPY)")


def _check_image(out: Path, binhost: GentooBinhost) -> None:
    """The image of releng's stage2 console spec: the stage1 packages, the kernel built from
    source with releng's config fragment where dist-kernels read it, the initramfs by dracut;
    and nothing of the build's own binhost, key, USE or FEATURES, read offline."""
    image = out / f"di-amd64-console-{STAMP}.qcow2"
    assert image.is_file(), sorted(p.name for p in out.iterdir())
    log = (out / f"{image.name}.emerge.log").read_text()
    assert ">>> dracut --xz --no-hostonly -a dmsquash-live" in log, "releng's dracut_args are dracut's"
    with open_image(image) as img:
        root = img.root
        installed = {p.parent.name + "/" + p.name for p in (root / "var/db/pkg").glob("*/*")}
        for atom in ("app-misc/screen", "sys-fs/lvm2", "net-misc/openssh", "sys-boot/grub", "sys-kernel/gentoo-kernel-"):
            assert any(p.startswith(atom) for p in installed), f"{atom} is not installed: {sorted(installed)}"
        assert not any(p.startswith("sys-kernel/gentoo-kernel-bin-") for p in installed)
        assert (root / "etc/kernel/config.d/gentoo.config").read_bytes() == KCONFIG.read_bytes()
        assert (root / "etc/portage/package.use/releng/no-filecaps").is_file(), "releng's portage_confdir is merged in"
        # make.conf is the stage's with diskimage/use added; the build-only USE is gone.
        make_conf = (root / "etc/portage/make.conf").read_text()
        with tarfile.open(binhost.stage3(Arch.amd64)) as stage:
            stage_make_conf = stage.extractfile("./etc/portage/make.conf").read().decode()  # type: ignore[union-attr]
        assert make_conf.startswith(stage_make_conf.rstrip("\n")) and "binpkg-request-signature" in make_conf
        assert make_conf.count('USE="') == stage_make_conf.count('USE="') + 1
        assert 'USE="compile-locales lvm"' in make_conf
        assert not [line for line in make_conf.splitlines() if line.startswith("USE=") and "diskimage" in line]
        # The stage's own binhost and key settings stay; nothing of the build's own.
        binrepos = root / "etc/portage/binrepos.conf"
        assert sorted(p.name for p in binrepos.iterdir()) == ["gentoobinhost.conf"]
        assert "https://distfiles.gentoo.org/releases/amd64/binpackages" in (binrepos / "gentoobinhost.conf").read_text()
        assert not (root / "var/tmp/imagebuild-binhost-gnupg").exists()
        assert not (root / "etc/portage/gnupg").exists() or binhost.fingerprint.encode() not in b"".join(
            p.read_bytes() for p in (root / "etc/portage/gnupg").rglob("*") if p.is_file())
        for path in [*(root / "etc").rglob("*"), *(root / "var/lib/portage").rglob("*")]:
            if path.is_file() and not path.is_symlink():
                assert binhost.url.encode() not in path.read_bytes(), f"{path} names the build's binhost"
        assert not list((root / "var/cache/binpkgs").rglob("*.gpkg.tar"))
        assert not list((root / "var/cache/distfiles").iterdir()), "the kernel's sources stay outside"


def test_releng_stage1_seed_then_stage2_from_the_seed_cache(tmp_path: Path, gentoo_binhost: GentooBinhost) -> None:
    cache, work = tmp_path / "cache", tmp_path / "work"
    flags = _releng_flags(gentoo_binhost, cache)
    stage3 = gentoo_binhost.stage3(Arch.amd64)

    # Before the seed exists, the stage2 spec says where it looked and the three ways to get one.
    missing = imagebuild_cli("build", "amd64", "console", "--spec", SPECS / "diskimage-stage2-console.spec",
                             *flags, "--no-test", "-o", tmp_path / "early", "--work-dir", work)
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert "diskimage-stage1-amd64-console-" + STAMP in missing.stderr and "imagebuild stage1" in missing.stderr
    assert "--stage1-spec" in missing.stderr and "--stage SEED" in missing.stderr
    assert not (tmp_path / "early").exists() or not list((tmp_path / "early").iterdir())

    seeded = imagebuild_cli("stage1", "amd64", "--spec", SPECS / "diskimage-stage1-console.spec", "--stage", stage3,
                            *flags, "--work-dir", work)
    assert seeded.returncode == 0, seeded.stderr[-4000:]
    seed = cache / f"builds/23.0-default/diskimage-stage1-amd64-console-{STAMP}.tar.zst"
    assert seed.is_file(), seeded.stderr[-2000:]
    assert seed.with_name(seed.name.removesuffix(".tar.zst") + ".emerge.log").is_file()
    listing = subprocess.run(["tar", "-tf", seed], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "./var/db/pkg/app-misc/" in {line[:len("./var/db/pkg/app-misc/")] for line in listing}
    assert not any(line.startswith("./boot/vmlinuz") for line in listing), "stage1 builds no kernel"
    assert not any(line.startswith("./etc/portage/binrepos.conf/") and "imagebuild" in line for line in listing)

    built = imagebuild_cli("build", "amd64", "console", "--spec", SPECS / "diskimage-stage2-console.spec",
                           *flags, "--no-test", "-o", tmp_path / "out", "--work-dir", work)
    assert built.returncode == 0, built.stderr[-4000:]
    assert "from the seed cache" in built.stderr
    assert "/root/releng/releases/kconfig/amd64/dist-amd64-livecd.config is releng's checkout" in built.stderr
    assert "sys-kernel/gentoo-kernel (built from source here: a binary package would not have the config " \
        "fragment)" in built.stderr
    assert "--getbinpkg=n --usepkg=n --update sys-kernel/gentoo-kernel" in built.stderr
    assert "  emerge --quiet" in built.stderr and "--update --deep --newuse" not in built.stderr, \
        "the seed has the packages: only the kernel step runs"
    _check_image(tmp_path / "out", gentoo_binhost)
    assert not mounts_under(tmp_path) and not loop_devices(tmp_path)


def test_releng_stage1_and_stage2_as_one_build(tmp_path: Path, gentoo_binhost: GentooBinhost) -> None:
    flags = _releng_flags(gentoo_binhost, tmp_path / "cache")
    built = imagebuild_cli("build", "amd64", "console", "--spec", SPECS / "diskimage-stage2-console.spec",
                           "--stage1-spec", SPECS / "diskimage-stage1-console.spec",
                           "--stage", gentoo_binhost.stage3(Arch.amd64), *flags,
                           "--no-test", "-o", tmp_path / "out", "--work-dir", tmp_path / "work")
    assert built.returncode == 0, built.stderr[-4000:]
    assert "Emerging 37 packages" in built.stderr and "--usepkg=n --update sys-kernel/gentoo-kernel" in built.stderr
    assert "Emerging binary" in (tmp_path / "out" / f"di-amd64-console-{STAMP}.qcow2.emerge.log").read_text(), \
        "the binhost's packages are taken (grub, sudo, nano, dracut)"
    _check_image(tmp_path / "out", gentoo_binhost)
    assert not mounts_under(tmp_path) and not loop_devices(tmp_path)
    assert not list((tmp_path / "cache").glob("builds/**/*.tar*")), "one build writes no seed"
