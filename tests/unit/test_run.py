"""The one command runner: a command that is stopped takes everything it started with it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from imagebuild.errors import CommandError
from imagebuild.run import run

from conftest import process_alive


def test_a_stopped_command_takes_its_children_that_ignore_sigterm(tmp_path: Path) -> None:
    """As mmdebstrap's workers do while its main process waits for them: a stand-in build that
    was stopped left them running apt in the chroot until its process group was signalled."""
    pidfile = tmp_path / "child"
    script = f"(trap '' TERM; exec sleep 300) & echo $! > {pidfile}; wait"
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out after 1s"):
        run(["sh", "-c", script], timeout=1)
    assert time.monotonic() - started < 10, "the command's own shell ends at once on SIGTERM"
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(child), "the child that ignored SIGTERM was left running"


def test_the_command_runs_in_its_own_process_group() -> None:
    out = run(["sh", "-c", "ps -o pgid= -p $$"]).stdout.decode().strip()
    assert int(out) != os.getpgrp()
