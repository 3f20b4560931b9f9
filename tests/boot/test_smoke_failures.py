"""The smoke test on images that must fail: real QEMU, real edk2, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imagebuild.config import Arch, Variant
from imagebuild.errors import ImageError, SmokeTestError
from imagebuild.smoketest import smoke_test
from imagebuild.smoketest.firmware import find_firmware
from imagebuild.smoketest.qemu import DISK_ID, QemuMachine

from conftest import private_dirs, qemu_processes, spawn_cli

pytestmark = pytest.mark.boot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blank_qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


@pytest.mark.parametrize("arch", [Arch.amd64, Arch.arm64])
def test_blank_disk_fails_early_in_the_firmware(arch: Arch, tmp_path: Path) -> None:
    if not Path(f"/usr/bin/{arch.qemu_system}").exists():
        pytest.skip(f"{arch.qemu_system} not installed")
    image = blank_qcow2(tmp_path / f"blank-{arch}.qcow2")
    digest = sha256(image)
    before = qemu_processes()
    dirs_before = private_dirs()
    results = tmp_path / "results"
    boot_timeout = 300

    started = time.monotonic()
    result = smoke_test(image, arch=arch, variant=Variant.console, results_dir=results,
                        boot_timeout=boot_timeout)  # fmt: skip
    elapsed = time.monotonic() - started

    assert not result.passed
    assert result.phase_reached == "firmware"
    assert "UEFI shell" in result.reason or "firmware" in result.reason
    # A failure pattern ended the run, not the deadline.
    assert elapsed < 60 < boot_timeout, f"took {elapsed:.1f}s"
    assert result.checks == []

    console_log = results / f"{image.name}.console.log"
    assert str(console_log) == result.console_log
    assert "UEFI Interactive Shell" in console_log.read_text()
    screenshot = results / f"{image.name}.screen.png"
    assert result.screenshot == str(screenshot)
    assert screenshot.read_bytes()[:8] == PNG_MAGIC

    data = json.loads((results / f"{image.name}.smoke.json").read_text())
    assert data["passed"] is False and data["arch"] == str(arch)
    suite = ET.parse(results / f"{image.name}.smoke.xml").getroot()
    assert suite.find("testcase[@name='firmware']/failure") is not None

    assert qemu_processes() - before == set(), "a QEMU process was left behind"
    assert sha256(image) == digest, "the smoke test wrote to the image"
    assert private_dirs() - dirs_before == set(), "the per-run temporary directory was left"


def test_raw_image_is_refused_before_qemu_starts(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    before = qemu_processes()
    results = tmp_path / "results"

    with pytest.raises(ImageError) as info:
        smoke_test(image, arch=Arch.amd64, variant=Variant.console, results_dir=results)

    message = str(info.value)
    assert "not a qcow2 image" in message
    assert str(image) in message
    assert "qemu-img convert -O qcow2" in message
    assert not results.exists(), "nothing may be written for an input that was refused"
    assert qemu_processes() - before == set()


def test_missing_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        smoke_test(tmp_path / "nope.qcow2", arch=Arch.amd64, variant=Variant.console,
                   results_dir=tmp_path)  # fmt: skip


# -- the machine itself: never writes the image, never outlives its block --------------------


def machine_for(image: Path, tmp_path: Path, **kwargs: object) -> QemuMachine:
    return QemuMachine(arch=Arch.amd64, image=image, firmware=find_firmware(Arch.amd64),
                       accel="tcg", console_log=tmp_path / "console.log",
                       qemu_log=tmp_path / "qemu.log", **kwargs)  # type: ignore[arg-type]  # fmt: skip


def test_writes_through_the_drive_never_reach_the_image(tmp_path: Path) -> None:
    image = blank_qcow2(tmp_path / "blank.qcow2")
    digest = sha256(image)
    with machine_for(image, tmp_path) as machine:
        # qemu-io writes through the same block backend the guest's virtio disk uses.
        machine.qmp("human-monitor-command",
                    **{"command-line": f'qemu-io {DISK_ID} "write -P 0xaa 0 1M"'})  # fmt: skip
    # qemu-io reports on QEMU's stdout: the write did happen, just not to the image.
    assert "wrote 1048576/1048576 bytes" in (tmp_path / "qemu.log").read_text()
    assert sha256(image) == digest


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_qemu_ends_when_the_caller_raises(exception: type[BaseException], tmp_path: Path) -> None:
    image = blank_qcow2(tmp_path / "blank.qcow2")
    dirs_before = private_dirs()
    started = time.monotonic()
    with pytest.raises(exception):
        with machine_for(image, tmp_path) as machine:
            pid = machine.pid
            assert pid in qemu_processes()
            raise exception()
    assert pid not in qemu_processes()
    assert private_dirs() - dirs_before == set()
    assert time.monotonic() - started < 30


def test_launch_failure_carries_command_and_output(tmp_path: Path) -> None:
    image = blank_qcow2(tmp_path / "blank.qcow2")
    before = qemu_processes()
    machine = machine_for(image, tmp_path, extra_args=["-device", "no-such-device-imagebuild"])
    with pytest.raises(SmokeTestError) as info:
        with machine:
            pytest.fail("QEMU must not start with an unknown device")
    message = str(info.value)
    assert "QEMU did not start" in message
    assert "-device no-such-device-imagebuild" in message  # the full command line
    assert "no-such-device-imagebuild" in message.split("output:", 1)[1]  # QEMU's own words
    assert qemu_processes() - before == set()


# -- a real console image (built by the pipeline from the stand-in stage) ---------------------


def esp_offset(raw: Path) -> int:
    info = subprocess.run(["sgdisk", "-i", "1", str(raw)], check=True, capture_output=True,
                          text=True).stdout  # fmt: skip
    first = int(re.search(r"First sector: (\d+)", info).group(1))  # type: ignore[union-attr]
    return first * 512


def with_grub_cfg_edit(image: Path, tmp_path: Path, old: str, new: str) -> Path:
    """A copy of ``image`` whose /boot/grub/grub.cfg (on the ESP) has ``old`` replaced."""
    raw = tmp_path / "edit.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    target = f"{raw}@@{esp_offset(raw)}"
    cfg = subprocess.run(["mtype", "-i", target, "::/grub/grub.cfg"], check=True, env=env,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert old in cfg
    (tmp_path / "grub.cfg").write_text(cfg.replace(old, new))
    subprocess.run(["mcopy", "-o", "-i", target, str(tmp_path / "grub.cfg"), "::/grub/grub.cfg"],
                   check=True, env=env)  # fmt: skip
    broken = tmp_path / f"broken-{image.name}"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(broken)], check=True)
    raw.unlink()
    return broken


def test_kernel_grub_cannot_find_fails_in_the_grub_phase(
    console_image_amd64: Path, tmp_path: Path
) -> None:
    broken = with_grub_cfg_edit(console_image_amd64, tmp_path, "linux /vmlinuz-", "linux /nothere-")
    before = qemu_processes()

    result = smoke_test(broken, arch=Arch.amd64, variant=Variant.console,
                        results_dir=tmp_path / "results")  # fmt: skip

    assert not result.passed
    assert result.phase_reached == "grub"
    assert "GRUB error: file `/nothere-" in result.reason and "not found" in result.reason
    assert result.screenshot and Path(result.screenshot).read_bytes()[:8] == PNG_MAGIC
    assert result.total_seconds < 60
    assert qemu_processes() - before == set()


@pytest.mark.parametrize("old, new, phase", [
    # GRUB waits forever before loading the kernel.
    ("\techo 'Loading Linux", "\tsleep 3600\n\techo 'Loading Linux", "grub"),
    # The kernel runs, but PID 1 never starts a getty: no login prompt ever comes.
    ("console=tty0\n", "console=tty0 init=/bin/sh\n", "kernel"),
], ids=["grub", "kernel"])
def test_hang_ends_at_the_deadline_naming_the_phase(
    console_image_amd64: Path, tmp_path: Path, old: str, new: str, phase: str
) -> None:
    hung = with_grub_cfg_edit(console_image_amd64, tmp_path, old, new)
    before = qemu_processes()
    started = time.monotonic()

    # 45 s: the kernel starts ~10 s after QEMU under TCG, on a loaded CI host well before 45 s.
    result = smoke_test(hung, arch=Arch.amd64, variant=Variant.console, results_dir=tmp_path / "results",
                        boot_timeout=45)  # fmt: skip

    assert not result.passed
    assert result.phase_reached == phase
    assert f"stuck in the {phase} phase" in result.reason
    assert time.monotonic() - started < 45 + 45, "the run must end at its deadline"
    assert result.screenshot and Path(result.screenshot).read_bytes()[:8] == PNG_MAGIC
    assert qemu_processes() - before == set()


# A QEMU whose guest launch never opens its sockets (other calls, such as `-machine help`,
# reach the real one): the launch waits for the serial console meanwhile.
HELD_QEMU = """#!/bin/sh
case "$*" in
  *imagebuild-smoke*) echo "$$" > "{marker}"; exec sleep 600 ;;
esac
exec {real} "$@"
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_qemu_starts(tmp_path: Path, sig: signal.Signals) -> None:
    """A signal during the launch is an interruption (exit 130), not "QEMU did not start"."""
    image = blank_qcow2(tmp_path / "blank.qcow2")
    shims, marker = tmp_path / "shims", tmp_path / "qemu.held"
    shims.mkdir()
    (shims / "qemu-system-x86_64").write_text(
        HELD_QEMU.format(marker=marker, real=shutil.which("qemu-system-x86_64"))
    )
    (shims / "qemu-system-x86_64").chmod(0o755)
    proc = spawn_cli("smoke-test", image, "--arch", "amd64", "--variant", "console", "--results", tmp_path / "results",
                     env={**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"})
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the smoke test never started QEMU"
        time.sleep(0.1)
    held = int(marker.read_text())
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"interrupted by {sig.name}" in stderr
    assert "did not start" not in stderr and "Traceback" not in stderr
    assert not Path(f"/proc/{held}").exists(), "the QEMU being launched survived the signal"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_the_smoke_test(console_image_amd64: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """The last pipeline step, interrupted: the run stops within seconds and no QEMU survives."""
    digest = sha256(console_image_amd64)
    before = qemu_processes()
    proc = spawn_cli("smoke-test", console_image_amd64, "--results", tmp_path)
    log = tmp_path / f"{console_image_amd64.name}.console.log"
    deadline = time.monotonic() + 120
    # Wait until the guest is past the firmware: QEMU runs and the kernel is booting.
    while not (log.exists() and "Linux version" in log.read_text(errors="replace")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the guest never reached its kernel"
        time.sleep(0.2)
    assert qemu_processes() - before, "QEMU should be running now"
    start = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 130, stderr
    assert f"interrupted by {sig.name}" in stderr and "Traceback" not in stderr
    assert qemu_processes() - before == set(), "a QEMU process survived the signal"
    assert sha256(console_image_amd64) == digest
