"""Gentoo's own specs (the copy of gentoo/releng in ../shared/releng, see its README): every one
of the 406 parses, and the disk-image ones name architectures imagebuild builds."""

from __future__ import annotations

import os
from pathlib import Path

from imagebuild.config import Arch
from imagebuild.spec import load_spec

from conftest import REPO, missing

RELENG = Path(os.environ.get("IMAGEBUILD_RELENG_COPY", REPO.parent / "shared" / "releng"))
# What Gentoo's release script (tools/catalyst-auto) fills in.
PLACEHOLDERS = {"TIMESTAMP": "20260105T023012Z", "TREEISH": "0" * 40, "REPO_DIR": str(RELENG)}


def specs() -> list[Path]:
    if not (RELENG / "releases").is_dir():
        missing(f"Gentoo's releng specs are not at {RELENG} (set IMAGEBUILD_RELENG_COPY)")
    return sorted(RELENG.glob("releases/specs*/**/*.spec"))


def test_all_of_gentoos_specs_parse() -> None:
    found = specs()
    assert len(found) == 406
    for path in found:
        spec = load_spec(path, placeholders=PLACEHOLDERS)
        assert spec.get("target") and spec.get("subarch"), path


def test_every_disk_image_spec_names_an_architecture_imagebuild_builds() -> None:
    disk = [p for p in specs() if p.name.startswith("diskimage-stage")]
    arches = {Arch.parse(load_spec(p, placeholders=PLACEHOLDERS).get("subarch") or "") for p in disk}
    assert arches == set(Arch)
    riscv = [p for p in disk if "/riscv/" in p.as_posix()]
    assert len(riscv) == 4
    for path in riscv:
        spec = load_spec(path, placeholders=PLACEHOLDERS)
        assert Arch.parse(spec.get("subarch") or "") is Arch.riscv64
        assert spec.get("interpreter") == "/usr/bin/qemu-riscv64"
