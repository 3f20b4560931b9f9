"""`imagebuild qemu IMAGE`: an image booted by hand, its serial console on a real terminal."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pexpect
import pytest

from conftest import qemu_processes

pytestmark = pytest.mark.boot


def test_boot_log_in_and_quit_on_a_terminal(console_image_amd64: Path, tmp_path: Path) -> None:
    digest = hashlib.sha256(console_image_amd64.read_bytes()).hexdigest()
    before = qemu_processes()
    log = (tmp_path / "terminal.log").open("w")
    # A pseudo-terminal, as a person's shell gives it: QEMU's stdio console needs one.
    child = pexpect.spawn(sys.executable, ["-m", "imagebuild", "qemu", str(console_image_amd64)],
                          encoding="utf-8", codec_errors="replace", timeout=180, dimensions=(50, 200))
    child.logfile_read = log
    try:
        child.expect("Ctrl-a x quits")
        child.expect("login:")
        child.sendline("root")
        child.expect("# ")
        child.sendline("echo answer=$((6*7)); lsblk -dno LOG-SEC /dev/vda")
        child.expect("answer=42")
        child.expect("512")
        child.sendline("touch /written-by-the-guest && sync && echo wrote-$((2+3))")
        child.expect("wrote-5")
        child.send("\x01x")  # Ctrl-a x: QEMU's own quit key on a muxed stdio console
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
        log.close()
    assert child.exitstatus == 0, (tmp_path / "terminal.log").read_text()[-2000:]
    assert "QEMU: Terminated" in (tmp_path / "terminal.log").read_text()
    assert qemu_processes() - before == set(), "QEMU outlived the command"
    # The default is a snapshot: the guest's write never reached the image.
    assert hashlib.sha256(console_image_amd64.read_bytes()).hexdigest() == digest


def test_an_image_that_is_not_qcow2_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * 1024 * 1024)
    child = pexpect.spawn(sys.executable, ["-m", "imagebuild", "qemu", str(raw), "--arch", "amd64",
                                           "--variant", "console"], encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "is not a qcow2 image" in child.before
