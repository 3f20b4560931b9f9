"""A foreign stage's programs run through the host's binfmt_misc handler, which must hold the
interpreter itself (the F flag): imagebuild copies nothing of the host into the stage."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from imagebuild.chroot import check_can_execute
from imagebuild.config import Arch
from imagebuild.errors import StageError

FOREIGN = Arch.riscv64 if platform.machine() != "riscv64" else Arch.amd64


def handler(directory: Path, flags: str) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / f"qemu-{FOREIGN.uname}").write_text(
        f"enabled\ninterpreter /usr/libexec/qemu-binfmt/{FOREIGN.uname}-binfmt-P\nflags: {flags}\noffset 0\n")
    return directory


def test_a_handler_with_the_fix_binary_flag_runs_the_stage(tmp_path: Path) -> None:
    check_can_execute(FOREIGN, handler(tmp_path, "PF"))


def test_a_handler_without_it_is_refused_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"lacks the F \(fix binary\) flag") as info:
        check_can_execute(FOREIGN, handler(tmp_path, "P"))
    assert "qemu-user-static" in (info.value.hint or "")


def test_no_handler_is_refused_with_the_packages_to_install(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=f"no enabled binfmt_misc handler qemu-{FOREIGN.uname}"):
        check_can_execute(FOREIGN, tmp_path)
