"""Faults: SIGINT/SIGTERM at every step, SIGKILL recovery, foreign mounts, concurrent builds.

To stop a build inside a given step, a shim for the step's external program stands first on
PATH: when called with the step's arguments it announces itself and waits, so the signal
arrives while that step's resources (loop devices, mounts, chroot binds) are live. The shim
then runs the real program; everything else is the real pipeline. The stage is the mini
stage (tests/hostile.py): the same steps as the stand-in's, in seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import imagebuild_cli, loop_devices, mounts_under, require_root, spawn_cli

pytestmark = pytest.mark.integration

SHIM = """#!/bin/sh
case "$*" in
  *{pattern}*)
    echo "$$" > "{marker}"
    trap 'kill $pid 2>/dev/null; exit 143' TERM INT
    sleep 600 & pid=$!
    wait $pid
    ;;
esac
exec {real} "$@"
"""

# step -> (program to hold, argument pattern that marks the step's call)
STEPS = {
    "configure (chroot binds live)": ("chroot", "systemctl"),
    "grub (chroot binds live)": ("chroot", "mkimage"),
    "partition": ("sfdisk", "part-type"),
    "esp (loop device live)": ("mcopy", "::/"),
    "root (loop mount live)": ("fstrim", "root"),
    "convert (qemu-img, zstd)": ("qemu-img", "convert"),
}
# qemu-img converts only zstd images; zlib is imagebuild's own writer (test_signal_during_conversion).
STEP_ARGS = {"convert (qemu-img, zstd)": ("--compression", "zstd")}


def start_build(tmp_path: Path, stage: Path, *extra: str, env: dict[str, str] | None = None,
                output: Path | None = None) -> subprocess.Popen[str]:
    return spawn_cli("build", "amd64", "console", "--stage", stage, "--no-test", "-o", output or tmp_path / "out",
                     "--work-dir", tmp_path / "work", *extra, env=env)


def shim_env(tmp_path: Path, program: str, pattern: str) -> tuple[dict[str, str], Path]:
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    marker = tmp_path / f"{program}.held"
    real = shutil.which(program)
    assert real, program
    shim = shims / program
    shim.write_text(SHIM.format(pattern=pattern, marker=marker, real=real))
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}, marker


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def assert_nothing_left(tmp_path: Path) -> None:
    assert loop_devices(tmp_path) == set(), "a loop device was left attached"
    assert mounts_under(tmp_path) == [], "a mount was left behind"
    work = tmp_path / "work"
    assert not work.exists() or list(work.iterdir()) == [], f"workspace left: {list(work.iterdir())}"
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == [], f"output left: {list(out.iterdir())}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("step", list(STEPS))
def test_signal_during_step(step: str, sig: signal.Signals, tmp_path: Path, mini_stage_amd64: Path) -> None:
    require_root()
    program, pattern = STEPS[step]
    env, marker = shim_env(tmp_path, program, pattern)
    proc = start_build(tmp_path, mini_stage_amd64, *STEP_ARGS.get(step, ()), env=env)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 300, f"the {step} step")
        assert proc.poll() is None, proc.communicate()[1]
        start = time.monotonic()
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - start < 30, "the build must stop within seconds"
    assert proc.returncode == 130, stderr
    assert f"interrupted by {sig.name}" in stderr
    assert "Traceback" not in stderr
    assert_nothing_left(tmp_path)


def test_a_second_signal_does_not_cut_the_cleanup_short(tmp_path: Path, mini_stage_amd64: Path) -> None:
    """An impatient user: SIGINT, then SIGTERM while the loop mount is being undone."""
    require_root()
    env, marker = shim_env(tmp_path, "fstrim", "root")
    proc = start_build(tmp_path, mini_stage_amd64, env=env)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 300, "the root filesystem step")
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted by SIGINT" in stderr and "Traceback" not in stderr
    assert_nothing_left(tmp_path)


def signal_in_step(proc: subprocess.Popen[str], step: str, sig: signal.Signals) -> tuple[str, float]:
    """Send ``sig`` a second into the step whose log line starts with ``step``; the build's
    whole stderr, and how long it took to end after the signal."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(step):
            break
    time.sleep(1)
    start = time.monotonic()
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=60)
    return "".join(seen) + rest, time.monotonic() - start


def test_signal_during_unpack(tmp_path: Path, standin_amd64: Path) -> None:
    proc = start_build(tmp_path, standin_amd64, "--debug")
    stderr, _ = signal_in_step(proc, "‣ Unpacking", signal.SIGTERM)
    assert proc.returncode == 130, stderr
    assert "Configuring" not in stderr, "the signal should have arrived while unpacking"
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_conversion(sig: signal.Signals, tmp_path: Path, standin_amd64: Path) -> None:
    """The zlib qcow2 is written by imagebuild's own threads: a signal stops them within
    seconds, and the half-written image goes with the workspace."""
    proc = start_build(tmp_path, standin_amd64)
    stderr, took = signal_in_step(proc, "‣ Converting to qcow2 (zlib)", sig)
    assert took < 10, "the build must stop within seconds"
    assert proc.returncode == 130, stderr
    assert f"interrupted by {sig.name}" in stderr and "Traceback" not in stderr
    assert "Writing CONTENTS" not in stderr, "the signal should have arrived while converting"
    assert_nothing_left(tmp_path)


def test_sigkill_leftovers_are_cleaned_by_the_next_run(tmp_path: Path, mini_stage_amd64: Path) -> None:
    env, marker = shim_env(tmp_path, "fstrim", "root")
    proc = start_build(tmp_path, mini_stage_amd64, env=env)
    wait_for(lambda: marker.exists() or proc.poll() is not None, 300, "the root filesystem step")
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait()
    # The held fstrim died with its parent (PR_SET_PDEATHSIG); its mount namespace, and with it
    # the root filesystem's mount, went with them. The loop device is not namespaced.
    wait_for(lambda: not marker.exists() or not _alive(int(marker.read_text())), 30, "the held fstrim to end")
    assert mounts_under(tmp_path) == [], "the killed build's mounts are private to it"
    assert loop_devices(tmp_path), "the killed build should have left its loop device"

    # The next run (here one that fails fast on a missing stage) cleans up first and says so.
    result = imagebuild_cli("build", "amd64", "console", "--stage", tmp_path / "none.tar", "--no-test",
                            "-o", tmp_path / "out2", "--work-dir", tmp_path / "work", timeout=120)
    assert "cleaned up after an earlier run" in result.stderr
    assert "loop device /dev/loop" in result.stderr
    assert loop_devices(tmp_path) == set()
    assert mounts_under(tmp_path) == []
    assert list((tmp_path / "work").iterdir()) == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_foreign_mount_under_the_workspace_survives(tmp_path: Path, mini_stage_amd64: Path) -> None:
    """A mount that is not ours below a workspace: nothing is deleted through it.

    The build runs in a mount namespace of its own, made before the foreign mount: there the
    directory is an empty one, and deleting it cannot reach what the host mounted on it.
    """
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("do not delete\n")
    env, marker = shim_env(tmp_path, "sfdisk", "part-type")
    proc = start_build(tmp_path, mini_stage_amd64, "--debug", env=env)
    wait_for(lambda: marker.exists() or proc.poll() is not None, 300, "the partition step")
    workspace = next((tmp_path / "work").iterdir())
    intruder = workspace / "root" / "srv" / "foreign"
    intruder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(precious), str(intruder)], check=True)
    try:
        os.kill(int(marker.read_text()), signal.SIGTERM)  # let the step go on; the build ends normally
        _, stderr = proc.communicate(timeout=300)
        assert (precious / "keep.txt").read_text() == "do not delete\n"
    finally:
        subprocess.run(["umount", "--lazy", str(intruder)], check=False)
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
    assert (precious / "keep.txt").read_text() == "do not delete\n"


def test_two_builds_same_output_second_refuses(tmp_path: Path, mini_stage_amd64: Path) -> None:
    env, marker = shim_env(tmp_path, "sfdisk", "part-type")
    first = start_build(tmp_path, mini_stage_amd64, "--stamp", "20261124T050000Z", env=env)
    try:
        wait_for(lambda: marker.exists() or first.poll() is not None, 300, "the first build")
        second = imagebuild_cli("build", "amd64", "console", "--stage", mini_stage_amd64, "--no-test",
                                "-o", tmp_path / "out", "--work-dir", tmp_path / "work2", "--stamp", "20261124T050000Z",
                                timeout=120)
        assert second.returncode == 2
        assert "another imagebuild" in second.stderr and "is already building" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)


def test_two_builds_different_outputs_both_succeed(tmp_path: Path, mini_stage_amd64: Path) -> None:
    builds = [start_build(tmp_path / name, mini_stage_amd64, "--stamp", "20261124T060000Z", output=tmp_path / name / "out")
              for name in ("a", "b")]
    for proc in builds:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    for name in ("a", "b"):
        assert (tmp_path / name / "out/di-amd64-console-20261124T060000Z.qcow2").is_file()
