"""Hostile OpenRC stages: the files the OpenRC configuration reads and writes (inittab, the
runlevels, the service scripts) made symlinks out of the root or the wrong type. The host's
canaries must stay as they are (tests/hostile.py checks them after every build); a stage that
can be built safely builds, one that cannot gets one message."""

from __future__ import annotations

from pathlib import Path

import pytest

import hostile
from hostile import Host, build, directory, fifo, host, stage_from, symlink

pytestmark = pytest.mark.integration
__all__ = ["host"]  # the fixture, imported for pytest


@pytest.fixture(autouse=True)
def _requirements() -> None:
    hostile.requirements()


@pytest.mark.parametrize("variant", ["console", "cloud-init"])
def test_the_openrc_mini_stage_builds(tmp_path: Path, host: Host, mini_stage_openrc_amd64: Path,
                                      variant: str) -> None:
    build(tmp_path, host, mini_stage_openrc_amd64, variant=variant, init="openrc", expect=0)


# case -> (image path, what it becomes, the variant, the exit status, words of the message)
CASES = {
    "inittab-to-host-file": ("etc/inittab", "file", "console", 2, "inittab"),
    "inittab-fifo": ("etc/inittab", "fifo", "console", 2, "inittab"),
    "inittab-directory": ("etc/inittab", "directory", "console", 2, "inittab"),
    "runlevels-to-host-dir": ("etc/runlevels", "dir", "console", 2, "/etc/runlevels is not a directory"),
    "default-runlevel-to-host-dir": ("etc/runlevels/default", "dir", "cloud-init", 2,
                                     "/etc/runlevels/default is not a directory"),
    "boot-runlevel-fifo": ("etc/runlevels/boot", "fifo", "console", 2, "/etc/runlevels/boot is not a directory"),
    "init.d-to-host-dir": ("etc/init.d", "dir", "cloud-init", 2, "init.d"),
    "sshd-script-to-host-file": ("etc/init.d/sshd", "file", "cloud-init", 2, "sshd"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_openrc_paths(tmp_path: Path, host: Host, mini_stage_openrc_amd64: Path, case: str) -> None:
    path, kind, variant, expect, word = CASES[case]
    member = {"file": symlink(host.file), "dir": symlink(host.dir), "fifo": fifo(), "directory": directory()}[kind]
    stage = stage_from(mini_stage_openrc_amd64, tmp_path / "stage.tar", {path: member})
    result = build(tmp_path, host, stage, variant=variant, init="openrc", expect=expect)
    assert word in result.error
