"""Catalyst's diskimage-stage2 keys in a whole build: rcadd, rm, empty and fsscript reach the image."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuild.imagefs import open_image

from conftest import imagebuild_cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_stage2_keys_in_a_build(tmp_path: Path, standin_amd64: Path) -> None:
    script = tmp_path / "fsscript.sh"
    script.write_text("#!/bin/sh\necho 'written by the fsscript' > /etc/imagebuild-fsscript\n")
    spec = tmp_path / "console.spec"
    spec.write_text((REPO / "specs/amd64/console.spec").read_text() + f"""
diskimage/rcadd: fstrim.timer|default
diskimage/rm: /usr/share/man /usr/share/doc/*/changelog*
diskimage/empty: /var/log/apt
diskimage/fsscript: {script}
""")
    out = tmp_path / "out"
    result = imagebuild_cli("build", "amd64", "console", "--spec", spec, "--stage", standin_amd64, "--no-test",
                            "-o", out, "--work-dir", tmp_path / "work")
    assert result.returncode == 0, result.stderr[-3000:]
    [image] = out.glob("*.qcow2")
    with open_image(image) as img:
        root = img.root
        assert (root / "etc/imagebuild-fsscript").read_text() == "written by the fsscript\n"
        assert not (root / "usr/share/man").exists()
        assert not list((root / "usr/share/doc").glob("*/changelog*"))
        assert (root / "var/log/apt").is_dir() and list((root / "var/log/apt").iterdir()) == []
        assert (root / "etc/systemd/system/timers.target.wants/fstrim.timer").is_symlink()
        assert not list((root / "tmp").iterdir()), "the fsscript must not stay in the image"
