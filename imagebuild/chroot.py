"""Run commands inside the stage's tree, as Catalyst does with its chroot and ``interpreter``.

For a foreign architecture the kernel's binfmt_misc hands the stage's binaries to
qemu-user; Debian registers qemu-user-static with the F (fix-binary) flag, so nothing has
to be copied into the tree.
"""

from __future__ import annotations

import contextlib
import os
import platform
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from imagebuild.config import Arch
from imagebuild.errors import StageError
from imagebuild.mounts import mounted
from imagebuild.run import run
from imagebuild.tree import Tree

# The PATH programs run with inside the stage (Catalyst's chroot-functions.sh).
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ELF e_machine values (offset 18, little-endian on both architectures).
_ELF_MACHINE = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0x03: "i386", 0xF3: "riscv64"}


def check_stage_arch(tree: Tree, arch: Arch) -> None:
    """The stage's programs are built for ``arch`` (read from the ELF header of its /bin/sh)."""
    if not tree.exists("/bin/sh"):
        raise StageError("the stage has no /bin/sh", hint="use a complete stage3 or seed")
    header = tree.read_bytes("/bin/sh", limit=20)
    if header[:4] != b"\x7fELF" or len(header) < 20:
        raise StageError("the stage's /bin/sh is not an ELF program", hint="use a complete stage3 or seed")
    machine = _ELF_MACHINE.get(int.from_bytes(header[18:20], "little"), f"machine {header[18:20].hex()}")
    if machine != arch.uname:
        raise StageError(
            f"the stage is for {machine}, but an image for {arch.value} ({arch.uname}) was asked for",
            hint=f"use a {arch.value} stage, or build the image for the stage's architecture",
        )


def check_can_execute(arch: Arch, binfmt_dir: Path = Path("/proc/sys/fs/binfmt_misc")) -> None:
    """Fail early, with the fix, when the tree's binaries cannot run on this host."""
    if Arch.host() is arch:
        return
    handler = binfmt_dir / f"qemu-{arch.uname}"
    if not handler.exists() or "enabled" not in handler.read_text():
        raise StageError(
            f"cannot run the {arch.value} stage's programs on this {platform.machine()} host: "
            f"no enabled binfmt_misc handler qemu-{arch.uname}",
            hint="install qemu-user-static and binfmt-support (ci/setup does), mount binfmt_misc "
            "('mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc') and run 'update-binfmts --enable'",
        )
    # Catalyst copies the spec's "interpreter" into the stage; with the F flag the kernel holds
    # the host's interpreter open itself, so nothing of the host goes into the image.
    flags = next((line.split(":", 1)[1].strip() for line in handler.read_text().splitlines()
                  if line.startswith("flags:")), "")
    if "F" not in flags:
        raise StageError(
            f"the binfmt_misc handler qemu-{arch.uname} lacks the F (fix binary) flag: the {arch.value} "
            "stage's programs would need the host's qemu-user binary inside the stage",
            hint="register it with the F flag (Debian's qemu-user-static does; Gentoo: "
            "app-emulation/qemu[static-user] with its binfmt files), then 'update-binfmts --enable'",
        )


# The device nodes a chroot gets (<linux/major.h>): enough for emerge, dracut and grub, and
# nothing that reaches the host's disks.
_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
            "tty": (5, 0)}
_DEV_LINKS = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
              "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}


@contextlib.contextmanager
def chroot_mounts(tree: Tree) -> Iterator[Tree]:
    """/proc, a read-only /sys, a private /dev and /run inside the tree; all undone on exit.

    The stage's programs run as root in here, so they get a /dev of their own (a tmpfs with
    null, zero, random, a tty, a new devpts instance and shm) rather than the host's, where
    every disk of the host would be one open() away. Each mount point must be a real
    directory of the tree: a stage whose /dev is a symlink to a host directory is refused,
    never mounted through.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(mounted("proc", tree.real_directory("/proc"), fstype="proc",
                                    options="nosuid,nodev,noexec"))
        stack.enter_context(mounted("/sys", tree.real_directory("/sys"), bind=True, options="ro"))
        dev = stack.enter_context(mounted("tmpfs", tree.real_directory("/dev"), fstype="tmpfs",
                                          options="mode=0755,nosuid,noexec,size=16m"))
        _populate_dev(dev)
        stack.enter_context(mounted("devpts", dev / "pts", fstype="devpts",
                                    options="newinstance,ptmxmode=0666,mode=0620,nosuid,noexec"))
        stack.enter_context(mounted("shm", dev / "shm", fstype="tmpfs", options="mode=1777,nosuid,nodev,noexec"))
        stack.enter_context(mounted("tmpfs", tree.real_directory("/run"), fstype="tmpfs",
                                    options="mode=0755,nosuid,nodev"))
        yield tree


def _populate_dev(dev: Path) -> None:
    """Device nodes and links in ``dev``, the fresh tmpfs this build just mounted."""
    for name, (major, minor) in _DEVICES.items():
        os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)  # mknod applies the umask
    for name, target in _DEV_LINKS.items():
        os.symlink(target, dev / name)
    for name in ("pts", "shm"):
        os.mkdir(dev / name)


def chroot_run(tree: Tree, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, check: bool = True,
               live: bool = False) -> str:
    """Run ``cmd`` inside the tree (chroot_mounts active) with the stage's own PATH; return its
    stdout, or with ``live`` let it write to our stderr as it goes (emerge's progress)."""
    result = run(["chroot", tree.root, *cmd], env={"PATH": CHROOT_PATH, "HOME": "/root", **(env or {})},
                 check=check, stdout=2 if live else None)
    return result.stdout.decode(errors="replace") if result.stdout else ""
