"""Gentoo's own riscv disk-image specs (releng's releases/specs-qemu/riscv, from the copy in
../shared/releng) build as they are, from a seed that already holds the kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagebuild.config import Arch

from conftest import REPO, _standin, imagebuild_cli, missing

pytestmark = [pytest.mark.integration, pytest.mark.standin("riscv64")]

RELENG = Path(os.environ.get("IMAGEBUILD_RELENG_COPY", REPO.parent / "shared" / "releng"))
STAMP = "20260105T023012Z"


@pytest.mark.parametrize("variant", ["console", "cloudinit"])
def test_releng_riscv_stage2_spec_builds_with_a_seed(variant: str, tmp_path: Path) -> None:
    spec = RELENG / "releases/specs-qemu/riscv" / f"diskimage-stage2-{variant}.spec"
    if not spec.is_file():
        missing(f"Gentoo's releng specs are not at {RELENG} (set IMAGEBUILD_RELENG_COPY)")
    seed = _standin(Arch.riscv64)  # a seed with its kernel: the kernel step has nothing to do
    out = tmp_path / "out"
    result = imagebuild_cli("build", "riscv", variant, "--spec", spec, "--stage", seed, "--stamp", STAMP,
                            "--no-test", "-o", out, "--work-dir", tmp_path / "work")
    assert result.returncode == 0, result.stderr[-3000:]
    # The file name is the spec's diskimage/qcow2, with Gentoo's name for the architecture.
    image = out / f"di-rv64_lp64d-{variant}-{STAMP}.qcow2"
    assert image.is_file(), sorted(p.name for p in out.iterdir())
    inspected = image.with_name(image.name + ".inspect.json").read_text()
    assert "BOOTRISCV64.EFI is an EFI executable for riscv64" in inspected
    assert '"passed": true' in inspected
