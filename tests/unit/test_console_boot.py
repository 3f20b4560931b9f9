"""Console.wait_for_boot on a real child process that prints a boot's console lines: the
phases it follows, and a kernel that goes quiet before init (a hung guest) failing at once
instead of at the end of the kernel phase."""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Callable, Iterator

import pexpect
import pytest

from imagebuild.smoketest.console import KERNEL_HUNG, Console, GuestFailure

# Short deadlines: the script below sleeps in seconds, not minutes.
DEADLINES = {"firmware": 10.0, "grub": 10.0, "kernel": 20.0, "login": 10.0, "kernel-silence": 2.0}

BOOT = """\
BdsDxe: loading Boot0001 "UEFI Misc Device"
Welcome to GRUB!
[    0.000000] Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org)
[    1.580791] IP idents hash table entries: 32768 (order: 6, 262144 bytes, linear)
"""
AFTER_HANG = """\
[    1.865314] tcp_listen_portaddr_hash hash table entries: 1024 (order: 2, 16384 bytes, linear)
[    3.100000] Run /init as init process
"""
LOGIN = "\nimagebuild login: "


@pytest.fixture
def console() -> Iterator[Callable[[str], Console]]:
    """Start a script as the guest; it is killed when the test ends."""
    spawned: list[pexpect.spawn] = []

    def start(script: str) -> Console:
        spawned.append(pexpect.spawn(sys.executable, ["-c", textwrap.dedent(script)],
                                     encoding="utf-8", codec_errors="replace"))
        return Console(spawned[-1], started=time.monotonic())

    yield start
    for spawn in spawned:
        spawn.close(force=True)


def printer(*steps: tuple[str, float]) -> str:
    """A script printing each text, then sleeping its seconds."""
    lines = ["import sys, time"]
    for text, pause in steps:
        lines += [f"sys.stdout.write({text!r}); sys.stdout.flush()", f"time.sleep({pause})"]
    return "\n".join(lines)


def test_boot_reaches_login_through_every_phase(console: Callable[[str], Console]) -> None:
    guest = console(printer((BOOT, 0.5), (AFTER_HANG, 0.5), (LOGIN, 5)))
    guest.wait_for_boot(DEADLINES, boot_timeout=30)
    assert guest.phase == "login"
    assert set(guest.phase_seconds) == {"firmware", "grub", "kernel"}


def test_quiet_after_init_is_not_a_hang(console: Callable[[str], Console]) -> None:
    # Once init runs, a quiet stretch (a slow service) is the kernel phase's deadline's business.
    guest = console(printer((BOOT + AFTER_HANG, 3.5), (LOGIN, 5)))
    guest.wait_for_boot(DEADLINES, boot_timeout=30)
    assert guest.phase == "login"


def test_kernel_silent_before_init_fails_fast(console: Callable[[str], Console]) -> None:
    guest = console(printer((BOOT, 30)))
    start = time.monotonic()
    with pytest.raises(GuestFailure) as failure:
        guest.wait_for_boot(DEADLINES, boot_timeout=30)
    assert time.monotonic() - start < 10  # the silence deadline, not the kernel phase's 20 s
    assert failure.value.phase == "kernel"
    assert KERNEL_HUNG in failure.value.reason
    assert "IP idents hash table entries" in failure.value.reason


def test_kernel_panic_is_reported_as_such(console: Callable[[str], Console]) -> None:
    panic = "[    2.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n"
    guest = console(printer((BOOT, 0.2), (panic, 30)))
    with pytest.raises(GuestFailure) as failure:
        guest.wait_for_boot(DEADLINES, boot_timeout=30)
    assert failure.value.reason.startswith("Kernel panic - not syncing: VFS")
