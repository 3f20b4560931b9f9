"""The harness for hostile inputs: odd stages, specs, names and images against the real CLI.

Every case runs ``imagebuild`` in a child process (through ``record_commands.py``, which logs
each program it starts) and then checks the promises the project makes about untrusted input:

- the exit status is the expected one (2 for refused input, 0 for legal input that must build);
- a refusal is exactly one ``error:`` line (with its hint), never a Python traceback;
- nothing outside the workspace and the output changed: canary files and directories the
  hostile input points at, the host's mounts, its loop devices, the names in its /dev;
- every mount, loop device, chroot and copy the run made stayed inside the directories it
  was given (read from the command log);
- nothing is left behind: no mount, loop device or QEMU process, an empty workspace, and an
  output directory holding either nothing or the finished image with its companions.

Stages are built from a *mini stage*: the amd64 stand-in cut down to what a build touches (the
shell, systemctl, grub-mkimage and their libraries, GRUB's modules, the kernel, /etc), so a full
build of it takes seconds and a hostile variation of it is one member added or replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from conftest import CACHE_DIR, loop_devices, qemu_processes, require_root, require_tools

HERE = Path(__file__).parent
STAMP = "20261124T000000Z"
BUILD_TOOLS = ("qemu-img", "mkfs.xfs", "mkfs.vfat", "mcopy", "sfdisk", "tar")


# --- Stage members ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Member:
    """One tar member to add to (or replace in) a stage."""

    kind: bytes  # a tarfile type: REGTYPE, SYMTYPE, LNKTYPE, DIRTYPE, FIFOTYPE, CHRTYPE, BLKTYPE
    data: bytes = b""
    target: str = ""  # symlink or hardlink target
    mode: int = 0o644
    device: tuple[int, int] = (0, 0)


def file(data: bytes | str, mode: int = 0o644) -> Member:
    return Member(tarfile.REGTYPE, data.encode() if isinstance(data, str) else data, mode=mode)


def symlink(target: str | Path) -> Member:
    return Member(tarfile.SYMTYPE, target=str(target), mode=0o777)


def hardlink(target: str) -> Member:
    return Member(tarfile.LNKTYPE, target=target)


def directory(mode: int = 0o755) -> Member:
    return Member(tarfile.DIRTYPE, mode=mode)


def fifo() -> Member:
    return Member(tarfile.FIFOTYPE)


def block_device(path: str) -> Member:
    """A block-device node with the numbers of the host device ``path``."""
    rdev = os.stat(path).st_rdev
    return Member(tarfile.BLKTYPE, mode=0o660, device=(os.major(rdev), os.minor(rdev)))


def char_device(major: int, minor: int) -> Member:
    return Member(tarfile.CHRTYPE, mode=0o666, device=(major, minor))


def _info(name: str, member: Member) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = member.kind
    info.mode = member.mode
    info.mtime = 1_700_000_000
    info.linkname = member.target
    info.devmajor, info.devminor = member.device
    info.size = len(member.data) if member.kind == tarfile.REGTYPE else 0
    return info


def stage_from(base: Path, dest: Path, changes: Mapping[str, Member | None] = {},
               *, drop_below: Iterable[str] = ()) -> Path:
    """Copy the stage tarball ``base`` to ``dest``, replacing or dropping (None) the members
    named in ``changes`` (and everything below a replaced or dropped directory) and adding the
    rest at the end, so an added symlink is in place before nothing else is written through it.
    """
    gone = {n.strip("/") for n, m in changes.items()} | {n.strip("/") for n in drop_below}
    with tarfile.open(base) as src, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out:
        for info in src:
            name = info.name.removeprefix("./").strip("/")
            if any(name == g or name.startswith(g + "/") for g in gone):
                continue
            out.addfile(info, src.extractfile(info) if info.isreg() else None)
        for name, member in changes.items():
            if member is not None:
                out.addfile(_info(name.strip("/"), member), io.BytesIO(member.data))
    return dest


def tar_of(dest: Path, members: Mapping[str, Member]) -> Path:
    """A stage tarball holding just ``members``, in order."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out:
        for name, member in members.items():
            out.addfile(_info(name, member), io.BytesIO(member.data))
    return dest


# --- The mini stage ---------------------------------------------------------------------------

_MINI_PROGRAMS = ("/usr/bin/dash", "/usr/bin/systemctl", "/usr/bin/grub-mkimage")
_MINI_TREES = ("etc", "dev", "root", "usr/lib/systemd", "usr/lib/grub/x86_64-efi",
               "usr/lib/x86_64-linux-gnu/systemd", "usr/share/zoneinfo/UTC", "usr/share/zoneinfo/Etc")
_MINI_FILES = ("bin", "sbin", "lib", "lib64", "usr/bin/sh", "usr/bin/cloud-init", "usr/lib/os-release",
               "usr/sbin/sshd")
# SysV scripts would make systemctl call systemd-sysv-install (perl's update-rc.d): left out.
_MINI_EXCLUDE = ("etc/init.d", "etc/rc0.d", "etc/rc1.d", "etc/rc2.d", "etc/rc3.d", "etc/rc4.d",
                 "etc/rc5.d", "etc/rc6.d", "etc/rcS.d")
_MINI_DIRS = ("boot", "home", "media", "mnt", "opt", "proc", "run", "srv", "sys", "tmp", "var",
              "var/tmp", "var/cache", "var/lib", "var/log", "var/lib/dbus", "var/lib/systemd", "usr/sbin")


# The OpenRC stand-in's: rc-update instead of systemctl, its scripts and runlevels kept.
_MINI_OPENRC_PROGRAMS = ("/usr/bin/dash", "/usr/sbin/rc-update", "/usr/bin/grub-mkimage")
_MINI_OPENRC_TREES = (*_MINI_TREES, "usr/lib/rc", "usr/libexec/rc")
_MINI_OPENRC_FILES = (*_MINI_FILES, "usr/sbin/openrc", "usr/sbin/agetty", "usr/sbin/openrc-run")


def mini_stage(standin: Path, init: str = "systemd") -> Path:
    """The amd64 stand-in (of ``init``) cut down to what a build touches; cached beside it."""
    if init == "openrc":
        programs, trees, files, exclude = _MINI_OPENRC_PROGRAMS, _MINI_OPENRC_TREES, _MINI_OPENRC_FILES, ()
    else:
        programs, trees, files, exclude = _MINI_PROGRAMS, _MINI_TREES, _MINI_FILES, _MINI_EXCLUDE
    key = hashlib.sha256(f"{standin.name}:{programs}:{trees}:{files}:{_MINI_DIRS}:{exclude}:1".encode())
    cached = CACHE_DIR / "test-stages" / f"mini-amd64-{key.hexdigest()[:16]}.tar"
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/var/tmp")) / f"imagebuild-mini-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    root = work / "root"
    root.mkdir(parents=True)
    try:
        subprocess.run(["tar", "-C", root, "-xpf", standin, "--numeric-owner", "--xattrs",
                        "--xattrs-include=*"], check=True)
        wanted: set[str] = set(files) | set(_MINI_DIRS)
        for tree in trees:
            for top, dirs, files in os.walk(root / tree):
                rel = Path(top).relative_to(root)
                wanted.add(str(rel))
                wanted.update(str(rel / n) for n in dirs + files)
        wanted.update(str(p.relative_to(root)) for p in (root / "boot").glob("vmlinuz-*"))
        # The programs and the libraries they load, with each symlink on the way.
        ldd = subprocess.run(["chroot", root, "ldd", *programs], capture_output=True, text=True,
                             check=True).stdout
        paths = set(programs)
        for line in ldd.split():
            if line.startswith("/"):
                paths.add(line.rstrip(":"))
        for path in paths:
            inner = Path(path.lstrip("/"))
            if str(inner).startswith(("lib/", "lib64/", "bin/")):
                inner = Path("usr") / inner
            while True:  # the path and every symlink on the way, resolved inside the root
                wanted.add(str(inner))
                if not (root / inner).is_symlink():
                    break
                target = os.readlink(root / inner)
                inner = Path(target.lstrip("/")) if target.startswith("/") else inner.parent / target
                inner = Path(os.path.normpath(inner))
                if str(inner).startswith(("lib/", "lib64/", "bin/")):
                    inner = Path("usr") / inner
        wanted = {n for n in wanted if not any(n == e or n.startswith(e + "/") for e in exclude)}
        for name in list(wanted):
            wanted.update(str(p) for p in Path(name).parents if str(p) != ".")
        listing = work / "list"
        listing.write_text("".join(f"./{n}\n" for n in sorted(wanted) if os.path.lexists(root / n)))
        partial = cached.with_suffix(".partial")
        subprocess.run(["tar", "-C", root, "-cf", partial, "--no-recursion", "--numeric-owner",
                        "--xattrs", "--xattrs-include=*", "-T", listing], check=True)
        partial.rename(cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cached


# --- The host's canaries ----------------------------------------------------------------------

class Host:
    """Files, directories and a block device that hostile input points at; they must not change."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir()
        (base / "file").write_text("host file: must stay as it is\n")
        (base / "shadow").write_text("root:$6$hosthash:19000:0:99999:7:::\nalice:$6$alice:19000:0:99999:7:::\n")
        (base / "dir" / "sub").mkdir(parents=True)
        (base / "dir" / "a").write_text("a\n")
        (base / "dir" / "ssh_host_ed25519_key").write_text("host key\n")
        (base / "dir" / ".bash_history").write_text("history\n")
        (base / "dir" / "sub" / "b").write_text("b\n")
        (base / "empty").mkdir()
        self.disk_image = base / "disk.img"
        with open(self.disk_image, "wb") as f:
            f.write(b"host disk: must stay as it is\n".ljust(1 << 20, b"\0"))
        self.disk = subprocess.run(["losetup", "--find", "--show", self.disk_image], capture_output=True,
                                   text=True, check=True).stdout.strip()
        self._before = self.snapshot()

    def close(self) -> None:
        subprocess.run(["losetup", "--detach", self.disk], check=False)

    @property
    def file(self) -> Path:
        return self.base / "file"

    @property
    def dir(self) -> Path:
        return self.base / "dir"

    @property
    def empty(self) -> Path:
        return self.base / "empty"

    def snapshot(self) -> dict[str, object]:
        state: dict[str, object] = {}
        for top, dirs, files in os.walk(self.base):
            for name in sorted(dirs + files):
                path = Path(top, name)
                st = path.lstat()
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
                state[str(path)] = (stat.filemode(st.st_mode), st.st_uid, st.st_size, st.st_mtime_ns, digest)
        state["/dev"] = sorted(n for n in os.listdir("/dev") if not n.startswith("loop"))
        state["mounts"] = sorted(_host_mounts())
        return state

    def assert_untouched(self) -> None:
        now = self.snapshot()
        changed = {k: (self._before.get(k), now.get(k)) for k in set(self._before) | set(now)
                   if self._before.get(k) != now.get(k)}
        assert not changed, f"the host changed: {changed}"


def _host_mounts() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


# --- Running the CLI --------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    code: int
    stderr: str
    stdout: str
    commands: list[list[str]]

    @property
    def error(self) -> str:
        """The ``error:`` line and what follows it (the hint)."""
        return self.stderr[self.stderr.find("error:"):]


COMPANIONS = (".CONTENTS.gz", ".DIGESTS", ".manifest.json", ".inspect.json")


def run_cli(tmp_path: Path, host: Host, *args: str | Path, expect: int, allowed: Iterable[Path] = (),
            timeout: float = 600, env: Mapping[str, str] | None = None) -> Result:
    """Run ``imagebuild ARGS`` and check every promise listed in this module's docstring.

    ``allowed``: directories besides tmp_path/work and tmp_path/out where the run may mount,
    attach loop devices and write.
    """
    work, out = tmp_path / "work", tmp_path / "out"
    log = tmp_path / f"commands-{len(list(tmp_path.glob('commands-*')))}.jsonl"
    loops, qemus = loop_devices(), qemu_processes()
    proc = subprocess.run([sys.executable, HERE / "record_commands.py", log, "--", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    commands = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    result = Result(proc.returncode, proc.stderr, proc.stdout, commands)
    where = f"\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert "Traceback" not in proc.stderr, f"a traceback instead of a message{where}"
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}{where}"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if expect == 0:
        assert not errors, f"an error on a run that passed{where}"
    else:
        assert len(errors) == 1, f"expected one 'error:' line, got {len(errors)}{where}"
    host.assert_untouched()
    assert loop_devices() <= loops, f"loop devices left behind: {loop_devices() - loops}"
    assert qemu_processes() <= qemus, "a QEMU process was left behind"
    assert not any(tmp_path in Path(m).parents for m in _host_mounts()), "a mount was left behind"
    if work.exists():
        left = [p.name for p in work.iterdir()]
        assert left == [], f"workspace left behind: {left}"
    produced = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if expect == 2:
        assert produced == [], f"output written by a refused run: {produced}"
    assert not [p for p in produced if p.endswith(".partial") or p.startswith(".")], \
        f"partial output left behind: {produced}"
    _check_commands(commands, [work, out, *allowed], where)
    return result


def _inside(path: str, roots: Iterable[Path]) -> bool:
    real = Path(os.path.realpath(path)) if path.startswith("/") else None
    return real is not None and any(real == r or r in real.parents for r in (Path(os.path.realpath(x)) for x in roots))


def _check_commands(commands: list[list[str]], roots: list[Path], where: str) -> None:
    """Mount targets, loop backing files, chroots and copy destinations lie inside ``roots``."""
    for argv in commands:
        program = Path(argv[0]).name
        operands = [a for a in argv[1:] if not a.startswith("-")]
        if program == "mount" and operands:
            assert _inside(operands[-1], roots), f"mounted outside the workspace: {argv}{where}"
        elif program == "losetup" and "--find" in argv:
            assert _inside(argv[-1], roots), f"loop device over a file outside the workspace: {argv}{where}"
        elif program == "chroot":
            assert _inside(operands[0], roots), f"chroot outside the workspace: {argv}{where}"
        elif program == "cp" and operands:
            assert _inside(operands[-1], roots), f"copied outside the workspace: {argv}{where}"
            assert all(_inside(s, roots) for s in operands[:-1]), f"copied from the host: {argv}{where}"
        elif program == "mcopy":
            sources = [a for a in operands if not a.startswith("::") and not a.startswith("/dev/")]
            assert all(_inside(s, roots) for s in sources), f"mcopy from outside the workspace: {argv}{where}"


def build(tmp_path: Path, host: Host, stage: Path, *extra: str | Path, variant: str = "console",
          init: str = "systemd", expect: int = 2, **kwargs: object) -> Result:
    """``imagebuild build amd64 VARIANT --init INIT --stage STAGE --no-test`` into tmp_path/out."""
    result = run_cli(tmp_path, host, "build", "amd64", variant, "--init", init, "--stage", stage, "--no-test",
                     "-o", tmp_path / "out", "--work-dir", tmp_path / "work", "--stamp", STAMP,
                     "--cache-dir", tmp_path / "cache", *extra, expect=expect, **kwargs)  # type: ignore[arg-type]
    if expect == 0:
        suffix = "" if init == "systemd" else f"-{init}"
        image = f"di-amd64-{variant.replace('-', '')}{suffix}-{STAMP}.qcow2"
        produced = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert produced == sorted([image, *(image + c for c in COMPANIONS)]), produced
    return result


def requirements() -> None:
    require_root()
    require_tools(*BUILD_TOOLS)


@pytest.fixture
def host(tmp_path: Path):  # type: ignore[no-untyped-def]
    canaries = Host(tmp_path / "host")
    yield canaries
    canaries.close()
