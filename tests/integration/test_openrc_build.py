"""OpenRC builds that must stop: an image that fails its audit is never booted, and a stage
whose init is not the one the spec asks for is refused before anything is written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imagebuild.config import Arch

from conftest import _standin, imagebuild_cli, qemu_processes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

def build(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return imagebuild_cli("build", "amd64", *args, "-o", tmp_path / "out", "--work-dir", tmp_path / "work",
                          "--size", "4GiB", "--compression", "zstd")

def test_a_console_image_with_sshd_in_default_is_not_booted(tmp_path: Path) -> None:
    stage = _standin(Arch.amd64, "openrc")
    spec = tmp_path / "console-openrc.spec"
    spec.write_text((REPO / "specs/amd64/console-openrc.spec").read_text() + "diskimage/rcadd: sshd|default\n")
    before = qemu_processes()
    result = build(tmp_path, "console", "--spec", str(spec), "--stage", str(stage))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "FAIL  console-no-network-service" in result.stdout and "default/sshd" in result.stdout
    assert "not boot-testing" in result.stderr and "Smoke-testing" not in result.stderr
    [image] = (tmp_path / "out").glob("*.qcow2")
    assert image.name.startswith("di-amd64-console-openrc-")
    assert not list((tmp_path / "out").glob("*.smoke.json")) and not list((tmp_path / "out").glob("*.console.log"))
    assert qemu_processes() - before == set()

@pytest.mark.parametrize(("stage_init", "asked"), [("systemd", "--init=openrc"), ("openrc", "--init=systemd")])
def test_a_stage_of_the_other_init_is_refused_before_writing(tmp_path: Path, stage_init: str, asked: str) -> None:

    stage = _standin(Arch.amd64, stage_init)
    result = build(tmp_path, "console", "--stage", str(stage), asked)
    assert result.returncode == 2, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"the stage runs {stage_init}, but {asked.replace('=', ' ')} asks for" in error
    assert "Traceback" not in result.stderr
    assert "Configuring" not in result.stderr, "refused before the variant was configured"
    assert not list((tmp_path / "out").glob("*")), "no output"
