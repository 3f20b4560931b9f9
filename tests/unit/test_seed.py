"""Releng's diskimage-stage2 specs start from their stage1's seed (imagebuild.seed): found in the
seed cache by source_subpath, or built in the same run with --stage1-spec; releng's
/root/releng paths read below the checkout given as @REPO_DIR@. Checked when the build is
resolved, before any work, on releng's own specs from ../shared/releng."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagebuild.config import Arch, TarballStage, Variant
from imagebuild.errors import ConfigError, SpecError
from imagebuild.resolve import Overrides, resolve
from imagebuild.seed import find_seed, seed_cache_path, seed_subpath
from imagebuild.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
RELENG = Path(os.environ.get("IMAGEBUILD_RELENG_COPY", REPO.parent / "shared" / "releng"))
SPECS = RELENG / "releases/specs/amd64"
STAMP = "20261205T120000Z"


@pytest.fixture(autouse=True)
def _releng() -> None:
    from conftest import missing

    if not SPECS.is_dir():
        missing(f"Gentoo's releng specs are not at {RELENG} (set IMAGEBUILD_RELENG_COPY)")


def _resolve(tmp_path: Path, variant: Variant, spec: str, **opts: object):  # type: ignore[no-untyped-def]
    settings = {"cache_dir": str(tmp_path / "cache"), **opts.pop("settings", {})}  # type: ignore[dict-item]
    return resolve(Arch.amd64, variant, Overrides(
        spec=SPECS / spec, stamp=STAMP, settings=settings,
        placeholders=(("REPO_DIR", str(RELENG)), ("TREEISH", "0123abcd")), **opts))  # type: ignore[arg-type]


def test_the_stage1_spec_names_the_seed_its_stage2_spec_starts_from(tmp_path: Path) -> None:
    for variant in ("console", "cloudinit"):
        stage1 = load_spec(SPECS / f"diskimage-stage1-{variant}.spec", placeholders={"TIMESTAMP": STAMP})
        stage2 = load_spec(SPECS / f"diskimage-stage2-{variant}.spec", placeholders={"TIMESTAMP": STAMP})
        assert seed_subpath(stage1) == stage2.get("source_subpath") == \
            f"23.0-default/diskimage-stage1-amd64-{variant}-{STAMP}"
    assert seed_cache_path(tmp_path, seed_subpath(stage1)) == \
        tmp_path / f"builds/23.0-default/diskimage-stage1-amd64-cloudinit-{STAMP}.tar.zst"


def test_the_stage2_spec_finds_its_seed_in_the_seed_cache(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing_seed:
        _resolve(tmp_path, Variant.console, "diskimage-stage2-console.spec")
    assert f"the seed 23.0-default/diskimage-stage1-amd64-console-{STAMP} is not in the seed cache" \
        in missing_seed.value.message
    assert "imagebuild stage1" in (missing_seed.value.hint or "") and "--stage1-spec" in (missing_seed.value.hint or "")

    builds = tmp_path / "cache/builds/23.0-default"
    builds.mkdir(parents=True)
    (builds / "diskimage-stage1-amd64-console-20261128T000000Z.tar.xz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"it has: diskimage-stage1-amd64-console-20261128T000000Z\.tar\.xz"):
        _resolve(tmp_path, Variant.console, "diskimage-stage2-console.spec")

    seed = builds / f"diskimage-stage1-amd64-console-{STAMP}.tar.xz"  # Catalyst's compression also counts
    seed.write_bytes(b"")
    config = _resolve(tmp_path, Variant.console, "diskimage-stage2-console.spec")
    assert config.stage == TarballStage(seed)
    # releng's kernel config names /root/releng; it is read below REPO_DIR instead.
    [kernel] = config.portage.kernels
    assert kernel.config == RELENG / "releases/kconfig/amd64/dist-amd64-livecd.config" and kernel.config.is_file()
    assert kernel.package == "sys-kernel/gentoo-kernel"
    assert config.portage.confdir == RELENG / "releases/portage/diskimage"
    # --stage still decides when given.
    other = tmp_path / "other-seed.tar"
    other.write_bytes(b"")
    assert _resolve(tmp_path, Variant.console, "diskimage-stage2-console.spec",
                    settings={"stage": str(other)}).stage == TarballStage(other)


def test_stage1_and_stage2_as_one_build(tmp_path: Path) -> None:
    config = _resolve(tmp_path, Variant.cloudinit, "diskimage-stage2-cloudinit.spec",
                      stage1_spec=SPECS / "diskimage-stage1-cloudinit.spec")
    assert "app-emulation/cloud-init" in config.portage.packages and len(config.portage.packages) == 38
    assert set(config.portage.use) == {"compile-locales", "lvm"}
    assert config.stage.flavour == "amd64-nomultilib-systemd"  # type: ignore[union-attr]  # stage1's stage3
    assert config.portage.where["diskimage/packages"].startswith(str(SPECS / "diskimage-stage1-cloudinit.spec:"))
    assert config.image_name == f"di-amd64-cloudinit-{STAMP}.qcow2"

    with pytest.raises(ConfigError, match="starts from 23.0-default/diskimage-stage1-amd64-console-.* makes "
                       "23.0-default/diskimage-stage1-amd64-cloudinit-"):
        _resolve(tmp_path, Variant.console, "diskimage-stage2-console.spec",
                 stage1_spec=SPECS / "diskimage-stage1-cloudinit.spec")
    with pytest.raises(SpecError, match="target is 'diskimage-stage2', not diskimage-stage1"):
        _resolve(tmp_path, Variant.console, "diskimage-stage2-console.spec",
                 stage1_spec=SPECS / "diskimage-stage2-console.spec")


def test_a_source_subpath_stays_inside_the_seed_cache(tmp_path: Path) -> None:
    spec = tmp_path / "stage2.spec"
    spec.write_text("subarch: amd64\ntarget: diskimage-stage2\nversion_stamp: x\nrel_type: r\nprofile: p\n"
                    "snapshot_treeish: t\nsource_subpath: ../../../etc/diskimage-stage1-amd64-x\n")
    with pytest.raises(SpecError, match=r"stage2.spec:7: '\.\./\.\./\.\./etc/diskimage-stage1-amd64-x' is not a path "
                       "of plain names below the seed cache"):
        find_seed(load_spec(spec), tmp_path)
    spec.write_text(spec.read_text().replace("../../../etc/", "23.0-default/"))
    with pytest.raises(ConfigError, match="is not in the seed cache"):
        find_seed(load_spec(spec), tmp_path)
    spec.write_text(spec.read_text().replace("diskimage-stage1-amd64-x", "stage3-amd64-systemd-x"))
    assert find_seed(load_spec(spec), tmp_path) is None, "a stage3 comes from the mirror, not the seed cache"
