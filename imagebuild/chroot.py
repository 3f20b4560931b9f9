"""Run commands inside the stage's tree, as Catalyst does with its chroot and ``interpreter``.

For a foreign architecture the kernel's binfmt_misc hands the stage's binaries to
qemu-user; Debian registers qemu-user-static with the F (fix-binary) flag, so nothing has
to be copied into the tree.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path

from imagebuild.config import Arch
from imagebuild.errors import StageError
from imagebuild.mounts import mounted
from imagebuild.run import run

_HOST_ARCH = {"x86_64": Arch.amd64, "aarch64": Arch.arm64}


# ELF e_machine values (offset 18, little-endian on both architectures).
_ELF_MACHINE = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0x03: "i386", 0xF3: "riscv64"}


def check_stage_arch(root: Path, arch: Arch) -> None:
    """The stage's programs are built for ``arch`` (read from the ELF header of its /bin/sh)."""
    from imagebuild.customize import inside_root

    shell = inside_root(root, "/bin/sh", follow_last=True)
    try:
        header = shell.read_bytes()[:20]
    except OSError:
        raise StageError(f"the stage has no /bin/sh ({shell})", hint="use a complete stage3 or seed") from None
    if header[:4] != b"\x7fELF":
        raise StageError(f"the stage's /bin/sh is not an ELF program ({shell})", hint="use a complete stage3 or seed")
    machine = _ELF_MACHINE.get(int.from_bytes(header[18:20], "little"), f"machine {header[18:20].hex()}")
    if machine != arch.uname:
        raise StageError(
            f"the stage is for {machine}, but an image for {arch.value} ({arch.uname}) was asked for",
            hint=f"use a {arch.value} stage, or build the image for the stage's architecture",
        )


def check_can_execute(root: Path, arch: Arch) -> None:
    """Fail early, with the fix, when the tree's binaries cannot run on this host."""
    if _HOST_ARCH.get(platform.machine()) == arch:
        return
    handler = Path(f"/proc/sys/fs/binfmt_misc/qemu-{arch.uname}")
    if not handler.exists() or "enabled" not in handler.read_text():
        raise StageError(
            f"cannot run the {arch.value} stage's programs on this {platform.machine()} host: "
            f"no enabled binfmt_misc handler qemu-{arch.uname}",
            hint="install qemu-user-static and binfmt-support (ci/setup does), mount binfmt_misc "
            "('mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc') and run 'update-binfmts --enable'",
        )


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[Path]:
    """/proc, /sys, /dev and a private /run inside ``root``; all undone on exit.

    Plain (non-recursive) binds: a recursive bind of /dev or /sys that a later cleanup
    deleted through would take the host's devices with it.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(mounted("proc", root / "proc", fstype="proc", options="nosuid,nodev,noexec"))
        stack.enter_context(mounted("/sys", root / "sys", bind=True))
        stack.enter_context(mounted("/dev", root / "dev", bind=True))
        stack.enter_context(mounted("tmpfs", root / "run", fstype="tmpfs", options="mode=0755,nosuid,nodev"))
        yield root


def chroot_run(root: Path, cmd: Sequence[str], *, check: bool = True) -> str:
    """Run ``cmd`` inside ``root`` (which must have chroot_mounts active); return its stdout."""
    return run(["chroot", root, *cmd], env={"HOME": "/root"}, check=check).stdout.decode(errors="replace")
