"""Progress bars for long steps: drawn on a terminal, nothing on a pipe (a CI log stays clean)."""

from __future__ import annotations

import subprocess
import sys

import pexpect

SCRIPT = """
import time
from imagebuild.log import Progress
with Progress("qcow2", 1) as bar:
    for done in range(0, 101, 20):
        bar.update(done * 2**20, 100 * 2**20)
        time.sleep(0.25)
print("END")
"""


def test_bar_on_a_terminal() -> None:
    child = pexpect.spawn(sys.executable, ["-c", SCRIPT], encoding="utf-8", timeout=30)
    child.expect("END")
    shown = child.before
    child.close()
    assert "[#########################] 100% 100.0 MiB of 100.0 MiB" in shown
    assert " 20% 20.0 MiB of 100.0 MiB" in shown and shown.count("\r  [") >= 4


def test_nothing_on_a_pipe() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "END\n" and done.stderr == ""
