"""The one way imagebuild runs an external program.

Argument lists only (never a shell string), an explicit environment, the command logged
before it runs, and on failure a CommandError that carries the exact command and its stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from imagebuild.errors import CommandError, ToolMissingError
from imagebuild.log import logger


# Host programs imagebuild calls, with the packages that provide them.
# tool -> (Debian package, Gentoo package)
@dataclasses.dataclass(frozen=True)
class HostTool:
    """A host program imagebuild runs: its packages, why it is needed, and whether every build
    needs it (checked before the first step; doctor lists them all)."""

    debian: str
    gentoo: str
    why: str
    build: bool = False
    optional: bool = False  # doctor reports it absent, not missing


HOST_TOOLS: dict[str, HostTool] = {
    "qemu-img": HostTool("qemu-utils", "app-emulation/qemu", "qcow2 conversion, image checks", build=True),
    "qemu-system-x86_64": HostTool("qemu-system-x86", "app-emulation/qemu", "smoke test of amd64 images"),
    "qemu-system-aarch64": HostTool("qemu-system-arm", "app-emulation/qemu", "smoke test of arm64 images"),
    "qemu-system-riscv64": HostTool("qemu-system-misc", "app-emulation/qemu", "smoke test of riscv64 images",
                                    optional=True),
    "mkfs.xfs": HostTool("xfsprogs", "sys-fs/xfsprogs", "root filesystem", build=True),
    "mkfs.vfat": HostTool("dosfstools", "sys-fs/dosfstools", "EFI system partition", build=True),
    "mcopy": HostTool("mtools", "sys-fs/mtools", "filling the ESP without mounting FAT", build=True),
    "mmd": HostTool("mtools", "sys-fs/mtools", "directories on the ESP", build=True),
    "mdir": HostTool("mtools", "sys-fs/mtools", "reading the ESP (inspect)"),
    "mtype": HostTool("mtools", "sys-fs/mtools", "reading files on the ESP (inspect)"),
    "sfdisk": HostTool("fdisk", "sys-apps/util-linux", "partition types and GUIDs; reading partition tables",
                       build=True),
    "blkid": HostTool("util-linux", "sys-apps/util-linux", "filesystem labels (inspect)"),
    "losetup": HostTool("mount", "sys-apps/util-linux", "loop devices", build=True),
    "mount": HostTool("mount", "sys-apps/util-linux", "loop mounts, chroot mounts", build=True),
    "umount": HostTool("mount", "sys-apps/util-linux", "undoing mounts", build=True),
    "chroot": HostTool("coreutils", "sys-apps/coreutils", "commands inside the stage", build=True),
    "cp": HostTool("coreutils", "sys-apps/coreutils", "copying a shared unpacked stage (release)", build=True),
    "fstrim": HostTool("util-linux", "sys-apps/util-linux", "leaving deleted blocks out of the image", build=True),
    "sync": HostTool("coreutils", "sys-apps/coreutils", "flushing the root filesystem", build=True),
    "tar": HostTool("tar", "app-arch/tar", "diskimage-stage1 seeds"),
    "zstd": HostTool("zstd", "app-arch/zstd", ".tar.zst stages"),
    "xz": HostTool("xz-utils", "app-arch/xz-utils", ".tar.xz stages (Gentoo's stage3s)"),
    "bzip2": HostTool("bzip2", "app-arch/bzip2", ".tar.bz2 seeds"),
    "gpg": HostTool("gnupg", "app-crypt/gnupg", "verifying stage3 signatures, signing releases"),
    "mmdebstrap": HostTool("mmdebstrap", "(none: Debian-only tool for the stand-in stage)",
                           "the offline stand-in stage only", optional=True),
    "arch-test": HostTool("arch-test", "(none: Debian-only, mmdebstrap's check for a foreign architecture)",
                          "the stand-in of a foreign architecture (mmdebstrap needs it)", optional=True),
}
BUILD_TOOLS = tuple(name for name, tool in HOST_TOOLS.items() if tool.build)
_UNKNOWN = HostTool("?", "?", "")


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets ``sig`` when imagebuild dies, even by SIGKILL, so no
    program of a killed run (a qemu-img, a chroot, QEMU itself) lives on."""
    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return preexec


def find_tool(name: str) -> str:
    """Return the path of host program ``name`` or raise ToolMissingError naming its package."""
    path = shutil.which(name)
    if path is None:
        tool = HOST_TOOLS.get(name, _UNKNOWN)
        raise ToolMissingError(
            f"required host tool '{name}' is not installed",
            hint=f"install it: Debian/Ubuntu 'apt-get install {tool.debian}', Gentoo 'emerge {tool.gentoo}'"
            " (or run ci/setup to install every tool imagebuild needs)",
        )
    return path


def require_tools(*names: str) -> None:
    """Fail before a step starts if any of ``names`` is missing (all reported at once)."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    packages = sorted({HOST_TOOLS.get(n, _UNKNOWN).debian for n in missing})
    gentoo = sorted({HOST_TOOLS.get(n, _UNKNOWN).gentoo for n in missing})
    raise ToolMissingError(
        f"required host tool(s) not installed: {', '.join(missing)}",
        hint=f"Debian/Ubuntu: apt-get install {' '.join(packages)}; Gentoo: emerge {' '.join(gentoo)}"
        " (or run ci/setup)",
    )


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    stdout: int | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` (an argument list) and return the completed process.

    ``env`` adds to a minimal, explicit environment instead of inheriting the caller's.
    stderr is always captured so a failure can show it beside the exact command.
    """
    argv = [os.fspath(arg) for arg in cmd]
    argv[0] = find_tool(argv[0]) if "/" not in argv[0] else argv[0]
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    if "SOURCE_DATE_EPOCH" in os.environ:
        full_env["SOURCE_DATE_EPOCH"] = os.environ["SOURCE_DATE_EPOCH"]
    full_env.update(env or {})
    logger.debug("+ %s", shlex.join(argv))
    proc = subprocess.Popen(
        argv,
        env=full_env,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        # Its own process group, so that everything it starts can be stopped with it.
        process_group=0,
        preexec_fn=die_with_parent(),
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stop_group(proc)
        raise CommandError(f"command timed out after {timeout}s: {shlex.join(argv)}") from exc
    except BaseException:
        # Interrupted (SIGINT/SIGTERM): let the command clean up after itself, then make sure
        # nothing of it is left.
        stop_group(proc)
        raise
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and result.returncode != 0:
        stderr = result.stderr.decode(errors="replace").strip()
        raise CommandError(
            f"command failed with exit status {result.returncode}: {shlex.join(argv)}"
            + (f"\n{_indent(stderr)}" if stderr else "")
        )
    return result


@contextlib.contextmanager
def output_stream(cmd: Sequence[str | os.PathLike[str]]) -> Iterator[IO[bytes]]:
    """Run ``cmd`` and yield its stdout as a stream (a decompressor feeding tarfile, say).

    Logged like run(); on leaving the block the program is stopped if it is still running.
    """
    argv = [os.fspath(arg) for arg in cmd]
    argv[0] = find_tool(argv[0]) if "/" not in argv[0] else argv[0]
    logger.debug("+ %s", shlex.join(argv))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=die_with_parent())
    assert proc.stdout is not None
    finished = False
    try:
        yield proc.stdout
        finished = proc.stdout.read(1) == b""
    finally:
        proc.stdout.close()
        if not finished:
            stop(proc, grace=5.0)
    # Read to its end, the program's exit status says whether its input was whole (zstd on a
    # cut frame writes what it could and exits 1); a reader that stopped early stopped it.
    if finished and proc.wait() != 0:
        raise CommandError(f"command failed with exit status {proc.returncode}: {shlex.join(argv)}")


def spawn(cmd: Sequence[str | os.PathLike[str]], *, stdout: IO[bytes] | int | None = subprocess.DEVNULL,
          stdin: int | None = subprocess.DEVNULL, new_session: bool = False,
          death_signal: int = signal.SIGTERM) -> subprocess.Popen[bytes]:
    """Start a long-running program (QEMU) and return it; logged like run(). Its stderr goes
    with its stdout (None: both stay this terminal's). It gets ``death_signal`` when imagebuild
    dies; end it with stop()."""
    argv = [os.fspath(arg) for arg in cmd]
    argv[0] = find_tool(argv[0]) if "/" not in argv[0] else argv[0]
    logger.debug("+ %s", shlex.join(argv))
    return subprocess.Popen(argv, stdin=stdin, stdout=stdout,
                            stderr=subprocess.STDOUT if stdout is not None else None,
                            start_new_session=new_session, preexec_fn=die_with_parent(death_signal))


def stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """End ``proc``: SIGTERM, ``grace`` seconds to exit (0: none), then SIGKILL; always reaped."""
    if proc.poll() is None and grace > 0:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def stop_group(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """End ``proc`` and what it started (its process group, see run()): SIGTERM to the whole
    group, as a terminal's ^C reaches every process of a job, ``grace`` seconds for ``proc`` to
    exit, then SIGKILL to whatever of the group is left. mmdebstrap needs the signal to reach
    its workers: they ignore SIGTERM while its main process waits for them, and one killed alone
    leaves them running apt in the chroot (seen when a stand-in build was stopped)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _indent(text: str, limit: int = 40) -> str:
    lines = text.splitlines()
    if len(lines) > limit:
        lines = ["..."] + lines[-limit:]
    return "\n".join("    " + line for line in lines)
