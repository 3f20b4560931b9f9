"""SIGKILL at every phase of a build, then a recovering run that must leave nothing behind.

A shim for the phase's external program holds the build while that phase's resources are live
(chroot mounts, loop devices, the raw image, a half-written qcow2, the audit's loop devices and
read-only mount); the build is then killed with SIGKILL, which no cleanup code can answer.
The next run with the same work and output directories (one that fails fast on a missing
stage) must detach the loop devices, remove the workspace and the partial outputs, and say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import hostile
from conftest import loop_devices, process_alive, spawn_cli
from hostile import Host, host, run_cli

pytestmark = pytest.mark.integration
__all__ = ["host"]

SHIM = """#!/bin/sh
case "$*" in
  *"{pattern}"*)
    {before}
    echo "$$" > "{marker}"
    sleep 600
    ;;
esac
exec {real} "$@"
"""
# Writes a few bytes where qemu-img convert would write the qcow2: a half-written output.
HALF_WRITTEN = 'for last; do :; done; printf QFI > "$last"'

# phase -> (program held, argument pattern of the phase's call, shell run before holding)
PHASES = {
    "unpack (zstd)": ("zstd", "-dc", ""),
    "configure (chroot mounts)": ("chroot", "systemctl", ""),
    "grub (chroot mounts)": ("chroot", "mkimage", ""),
    "partition (loop device)": ("sfdisk", "part-type", ""),
    "esp (loop device)": ("mcopy", "::/", ""),
    "root (loop mount)": ("fstrim", "root", ""),
    "convert (half-written qcow2)": ("qemu-img", "-O qcow2", HALF_WRITTEN),
    "audit (loop devices, mount)": ("mount", "norecovery", ""),
}


@pytest.fixture(scope="module")
def mini_stage_zst(mini_stage_amd64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zst") / "mini.tar.zst"
    subprocess.run(["zstd", "-q", "-T0", "-o", out, mini_stage_amd64], check=True)
    return out


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_then_recovery(phase: str, tmp_path: Path, host: Host, mini_stage_amd64: Path,
                               mini_stage_zst: Path) -> None:
    hostile.requirements()
    program, pattern, before = PHASES[phase]
    shims, marker = tmp_path / "shims", tmp_path / "held"
    shims.mkdir()
    real = shutil.which(program)
    assert real, program
    (shims / program).write_text(SHIM.format(pattern=pattern, marker=marker, real=real, before=before))
    (shims / program).chmod(0o755)
    stage = mini_stage_zst if program == "zstd" else mini_stage_amd64
    out, work = tmp_path / "out", tmp_path / "work"
    # qemu-img converts only zstd images (zlib is imagebuild's own writer, killed in test_faults.py).
    zstd = ["--compression", "zstd"] if program == "qemu-img" else []
    proc = spawn_cli("build", "amd64", "console", "--stage", stage, "--no-test", "-o", out, "--work-dir", work,
                     "--stamp", hostile.STAMP, *zstd, stdout=subprocess.DEVNULL,
                     env={**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"})
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, f"the build never reached {phase}"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.2)
        proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    # The held program dies with its parent (PR_SET_PDEATHSIG), and the build's mounts with
    # its mount namespace.
    holder = int(marker.read_text())
    deadline = time.monotonic() + 30
    while process_alive(holder):
        assert time.monotonic() < deadline, f"the held {program} outlived the killed build"
        time.sleep(0.1)
    assert any(work.iterdir()), "the killed build should have left its workspace"

    finished = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if program == "mount":
        # The audit runs on the finished image: it stays, complete (moved aside here, so the
        # recovering run's check of out/ sees only what the recovery leaves).
        image = f"di-amd64-console-{hostile.STAMP}.qcow2"
        # It runs inside the build, on the raw image, so the build's output lock is still there
        # (the recovering run removes it, as any killed build's).
        assert finished == sorted([f".{image}.lock", image,
                                   *(image + c for c in hostile.COMPANIONS if c != ".inspect.json")])
        out.rename(tmp_path / "finished")
    result = run_cli(tmp_path, host, "build", "amd64", "console", "--stage", tmp_path / "missing.tar",
                     "--no-test", "-o", out, "--work-dir", work, expect=2)
    assert "does not exist" in result.error
    assert loop_devices(work) == set(), "loop devices of the killed build were not detached"
    assert "cleaned up after an earlier run" in result.stderr  # run_cli checked out/ is empty
