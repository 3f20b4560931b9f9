"""A QEMU guest for the smoke test: command line, launch, serial console, QMP, and an exit
that always ends the process (poweroff wait, system_powerdown, quit, SIGTERM, SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import pexpect
import pexpect.fdpexpect
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from imagebuild.config import Arch
from imagebuild.errors import SmokeTestError
from imagebuild.log import logger
from imagebuild.run import find_tool, run, spawn, stop
from imagebuild.smoketest.firmware import MACHINE_ALIAS, Firmware, escape

# What QMP raises once QEMU has gone away; after a power-off that is the expected end.
QMP_GONE = (QMPError, EOFError, OSError, asyncio.TimeoutError)

# The block backend of the image's disk (for QMP and qemu-io).
DISK_ID = "disk0"

# How long QEMU may take from exec to accepting the serial and QMP connections.
LAUNCH_TIMEOUT = 30.0
# How long the KVM probe lets a guest run before asking whether it is still running.
KVM_PROBE_SECONDS = 2.0

_kvm_answers: dict[Arch, bool] = {}


def kvm_works(arch: Arch, firmware: Firmware | None = None) -> bool:
    """Whether a KVM guest of ``arch`` actually runs here (cached for the process).

    /dev/kvm opening is not enough: on some hosts QEMU dies at once under KVM (an MSR it
    cannot set) or stops with "KVM internal error", so start a tiny guest and ask it.
    """
    if arch not in _kvm_answers:
        _kvm_answers[arch] = _probe_kvm(arch, firmware)
        logger.info(
            "KVM %s for %s guests", "works" if _kvm_answers[arch] else "is not usable", arch
        )
    return _kvm_answers[arch]


def _probe_kvm(arch: Arch, firmware: Firmware | None) -> bool:
    if platform.machine() != arch.uname:
        return False
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        logger.debug("KVM: /dev/kvm does not open (%s)", exc)
        return False
    binary = find_tool(arch.qemu_system)
    with tempfile.TemporaryDirectory(prefix="imagebuild-kvm-probe-") as tmp:
        qmp_path = Path(tmp) / "qmp.sock"
        cmd = [binary, "-nodefaults", "-no-user-config", "-display", "none", "-machine",
               MACHINE_ALIAS[arch], "-accel", "kvm", "-cpu", "host", "-m", "256"]
        if firmware is not None:
            cmd += firmware.qemu_args(firmware.copy_vars(Path(tmp)))
        cmd += ["-chardev", f"socket,id=qmp0,path={escape(qmp_path)}",
                "-mon", "chardev=qmp0,mode=control"]
        qmp = QEMUMonitorProtocol(str(qmp_path), server=True)
        with open(Path(tmp) / "qemu.log", "wb") as log:
            proc = _spawn_qemu(cmd, log)
        try:
            # Dying at once (an MSR KVM refuses) ends the probe here; a guest that stops
            # with "KVM internal error" stays alive but reports a status other than running.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KVM_PROBE_SECONDS)
            if proc.poll() is None:
                qmp.accept(timeout=LAUNCH_TIMEOUT)
                reply: Any = qmp.cmd("query-status")
                status = str(reply["status"])
            else:
                status = f"exited with status {proc.returncode}"
        except QMP_GONE as exc:
            status = f"no QMP ({type(exc).__name__})"
        finally:
            with contextlib.suppress(*QMP_GONE):
                qmp.close()
            stop(proc, grace=0)
        output = (Path(tmp) / "qemu.log").read_text(errors="replace").strip()
    logger.debug("KVM probe: guest status %s; QEMU said: %s", status, output or "(nothing)")
    return status == "running"


class QemuMachine:
    """One QEMU process booting ``image`` read-only; a context manager whose exit ends it.

    Inside the ``with`` block, ``console`` is a pexpect spawn on the guest's serial port
    (every byte read goes to ``console_log``) and ``qmp()`` talks to the monitor.
    """

    def __init__(
        self,
        *,
        arch: Arch,
        image: Path,
        firmware: Firmware,
        accel: str,
        console_log: Path,
        qemu_log: Path,
        memory: str = "2G",
        cpus: int = 2,
        extra_args: Sequence[str] = (),
        disk_size: int | None = None,
        seed: Path | None = None,
        sector_size: int = 512,
    ) -> None:
        self.arch = arch
        self.image = image.resolve()
        self.firmware = firmware
        self.accel = accel
        self.console_log = console_log
        self.qemu_log = qemu_log
        self.memory = memory
        self.cpus = cpus
        self.extra_args = list(extra_args)
        # A bigger disk than the image (a throwaway qcow2 overlay of that size), so the
        # guest can show it grows its root; and a NoCloud seed as a second, read-only disk.
        self.disk_size = disk_size
        self.seed = seed
        self.sector_size = sector_size
        self.command: list[str] = []
        self._tmp: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._serial: socket.socket | None = None
        self._console: pexpect.fdpexpect.fdspawn | None = None
        self._console_file: IO[str] | None = None
        self._console_eof = False

    def __enter__(self) -> QemuMachine:
        self.launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.shutdown()
        else:
            # The caller failed (or ^C): the guest's state is worthless (its disk is a
            # snapshot), so skip the waits for a power-off and go straight to quit.
            self.shutdown(poweroff_timeout=0, powerdown_timeout=0)

    # -- command line -----------------------------------------------------------------------

    def build_command(self, tmp: Path) -> list[str]:
        """The full QEMU command line for a run whose sockets and VARS copy live in ``tmp``."""
        return [
            find_tool(self.arch.qemu_system),
            "-name", f"imagebuild-smoke-{self.image.name}",
            "-nodefaults",
            "-no-user-config",
            # A guest that resets (panic, triple fault, reboot) ends the run instead of looping.
            "-no-reboot",
            *guest_args(arch=self.arch, accel=self.accel, firmware=self.firmware,
                        vars_copy=self.firmware.vars_copy_in(tmp), disk=self._disk(tmp),
                        sector_size=self.sector_size, memory=self.memory, cpus=self.cpus, seed=self.seed),
            # A NIC only for the cloud-init guest (the one whose datasource seed goes with a
            # network), isolated from the host's network: DHCP works, nothing gets out.
            *(network_args("restrict=on", self.firmware) if self.seed else []),
            # wait=on: the guest does not start before we are connected, so nothing is lost.
            "-chardev", f"socket,id=serial0,path={escape(tmp / 'serial.sock')},server=on,wait=on",
            "-serial", "chardev:serial0",
            "-chardev", f"socket,id=qmp0,path={escape(tmp / 'qmp.sock')}",
            "-mon", "chardev=qmp0,mode=control",
            "-display", "none",
            *self.extra_args,
        ]  # fmt: skip

    def _disk(self, tmp: Path) -> Path:
        return tmp / "grown.qcow2" if self.disk_size else self.image

    # -- launch -----------------------------------------------------------------------------

    def launch(self) -> None:
        """Start QEMU, connect the serial console and QMP; SmokeTestError if that fails."""
        self._tmp = Path(tempfile.mkdtemp(prefix="imagebuild-qemu-"))
        try:
            self.firmware.copy_vars(self._tmp)
            if self.disk_size:
                run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.image, "-F", "qcow2",
                     self._disk(self._tmp), str(self.disk_size)])
            self.command = self.build_command(self._tmp)
            # QMP: we listen, QEMU connects as a client as soon as it parses -chardev.
            self._qmp = QEMUMonitorProtocol(str(self._tmp / "qmp.sock"), server=True)
            with open(self.qemu_log, "wb") as log:
                self._proc = _spawn_qemu(self.command, log)
            self._serial = self._connect_serial(self._tmp / "serial.sock")
            self._qmp.accept(timeout=LAUNCH_TIMEOUT)
            self._qmp.settimeout(30)
            self._console_file = open(
                self.console_log, "w", encoding="utf-8", errors="replace", newline=""
            )
            self._console = pexpect.fdpexpect.fdspawn(
                self._serial, encoding="utf-8", codec_errors="replace", maxread=65536
            )
            self._console.logfile_read = self._console_file
        except BaseException as exc:
            # Nothing of the guest is worth a polite shutdown yet.
            if self._proc is not None:
                stop(self._proc, grace=0)
            self._cleanup()
            if isinstance(exc, Exception) and not isinstance(exc, SmokeTestError):
                raise self._launch_error(f"{type(exc).__name__}: {exc}") from exc
            raise

    def _connect_serial(self, path: Path) -> socket.socket:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise self._launch_error(f"QEMU exited with status {self._proc.returncode}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            if time.monotonic() > deadline:
                raise self._launch_error(f"no serial socket after {LAUNCH_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def _launch_error(self, what: str) -> SmokeTestError:
        if self._proc is not None and self._proc.poll() is None:
            stop(self._proc, grace=0)
        output = _read_text(self.qemu_log).strip() or "(no output)"
        return SmokeTestError(
            f"QEMU did not start ({what})\n  command: {shlex.join(self.command)}\n"
            f"  output:\n" + "\n".join("    " + line for line in output.splitlines()[-40:]),
            hint="run the command by hand to see what QEMU needs; the full output is in "
            f"{self.qemu_log}",
        )

    # -- while running ----------------------------------------------------------------------

    @property
    def console(self) -> pexpect.fdpexpect.fdspawn:
        if self._console is None:
            raise SmokeTestError("the QEMU machine is not running; there is no console")
        return self._console

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_status(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def qmp(self, command: str, **args: Any) -> Any:
        """Run a QMP command and return its result (QMPError subclasses on failure)."""
        if self._qmp is None:
            raise SmokeTestError("the QEMU machine is not running; there is no QMP monitor")
        return self._qmp.cmd(command, **args)

    def screendump(self, path: Path) -> None:
        """Save the guest's display as PNG (QEMU >= 7.1 knows ``format``)."""
        self.qmp("screendump", filename=str(path.resolve()), format="png")

    def wait_for_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for QEMU to exit, draining the console meanwhile.

        Draining matters: a guest printing while it shuts down stalls on a full socket.
        """
        deadline = time.monotonic() + timeout
        while self._proc is not None and self._proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._drain_console(min(remaining, 0.2))
        self._drain_console(0)
        return True

    def _drain_console(self, seconds: float) -> None:
        if self._console is None or self._console_eof:
            time.sleep(seconds)
            return
        try:
            self._console.read_nonblocking(65536, timeout=seconds)
        except pexpect.TIMEOUT:
            pass
        except (pexpect.EOF, OSError):
            self._console_eof = True

    # -- exit -------------------------------------------------------------------------------

    def shutdown(
        self,
        *,
        poweroff_timeout: float = 2.0,
        powerdown_timeout: float = 10.0,
        quit_timeout: float = 5.0,
        term_timeout: float = 5.0,
    ) -> None:
        """End QEMU and clean up; idempotent. Each stage runs only if the one before failed.

        First wait for a power-off the caller started, then ask the guest by ACPI
        (system_powerdown), then QEMU (quit), then the OS (SIGTERM, SIGKILL).
        """
        try:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                if not self.wait_for_exit(poweroff_timeout) and powerdown_timeout > 0:
                    logger.debug("guest still running: QMP system_powerdown")
                    self._qmp_quietly("system_powerdown")
                    self.wait_for_exit(powerdown_timeout)
                if proc.poll() is None:
                    logger.debug("guest still running: QMP quit")
                    self._qmp_quietly("quit")
                    self.wait_for_exit(quit_timeout)
                if proc.poll() is None:
                    logger.warning("QEMU (pid %d) ignored quit: sending SIGTERM", proc.pid)
                    proc.terminate()
                    self.wait_for_exit(term_timeout)
        finally:
            # Also reached on KeyboardInterrupt half-way through the polite steps.
            if self._proc is not None:
                stop(self._proc, grace=0)
            self._cleanup()

    def _qmp_quietly(self, command: str) -> None:
        try:
            self.qmp(command)
        except QMP_GONE as exc:
            # After a power-off QEMU closes the monitor under us: that is a clean end.
            logger.debug("QMP %s: %s (QEMU is going away)", command, type(exc).__name__)
        except SmokeTestError:
            pass

    def _cleanup(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(*QMP_GONE):
                self._qmp.close()
            self._qmp = None
        if self._console is not None:
            self._console.logfile_read = None
            self._console = None
        if self._console_file is not None:
            self._console_file.close()
            self._console_file = None
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def guest_args(*, arch: Arch, accel: str, firmware: Firmware, vars_copy: Path | None, disk: Path,
               sector_size: int, memory: str, cpus: int, snapshot: bool = True,
               seed: Path | None = None) -> list[str]:
    """The virtual machine itself, for the smoke test and ``imagebuild qemu`` alike: machine,
    CPU, edk2, the image as a virtio disk with the image's own sector size, RNG, display,
    and a NoCloud ``seed`` as a second, read-only disk when there is one."""
    if arch is Arch.amd64:
        # "max" under TCG offers x86-64-v2/v3 instructions to images built for them.
        cpu = "host" if accel == "kvm" else "max"
        display = ["-vga", "std"]
    elif arch is Arch.arm64:
        # Plain "max" is slow under TCG (pointer authentication emulation); neoverse-n1
        # is a real ARMv8.2 core every arm64 distribution kernel supports.
        cpu = "host" if accel == "kvm" else "neoverse-n1"
        display = ["-device", "virtio-gpu-pci"]
    else:
        # rv64: RV64GC with the extensions this QEMU implements, what distribution kernels need.
        cpu = "host" if accel == "kvm" else "rv64"
        display = ["-device", "virtio-gpu-pci"]
    return [
        "-machine", MACHINE_ALIAS[arch],
        "-accel", accel,
        "-cpu", cpu,
        "-m", memory,
        "-smp", str(cpus),
        *firmware.qemu_args(vars_copy),
        # snapshot=on: writes go to a throwaway overlay, the image is never changed.
        "-drive", f"file={escape(disk)},if=none,id={DISK_ID},format=qcow2,snapshot={'on' if snapshot else 'off'}",
        # The disk's sectors are the image's: a 4Kn image boots on a 4Kn disk.
        "-device", f"virtio-blk-pci,drive={DISK_ID},logical_block_size={sector_size},"
                   f"physical_block_size={sector_size}",
        "-device", "virtio-rng-pci",
        *display,
        *(["-drive", f"file={escape(seed)},if=virtio,format=raw,readonly=on"] if seed else []),
    ]  # fmt: skip


def network_args(netdev_options: str, firmware: Firmware) -> list[str]:
    """A virtio NIC on QEMU's user network (``netdev_options``: restrict=on, hostfwd=...).

    No option ROM, and edk2's PXE off: a guest whose disk does not boot must fail at once,
    not after minutes of network boot attempts. (The setting goes through fw_cfg, which only
    edk2 reads; riscv64's board has no fw_cfg device under QEMU 7.2, where U-Boot boots.)
    """
    edk2_pxe_off = [] if firmware.opensbi else [
        "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
        "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
    ]
    return [
        "-netdev", f"user,id=net0,{netdev_options}".rstrip(","),
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        *edk2_pxe_off,
    ]  # fmt: skip




def _spawn_qemu(cmd: Sequence[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    # Own session: a ^C on the terminal reaches us, and we shut QEMU down in order. If Python
    # dies without running our cleanup (SIGKILL, crash), QEMU dies too.
    return spawn(cmd, stdout=log, new_session=True, death_signal=signal.SIGKILL)


def run_qemu(command: Sequence[str]) -> int:
    """Run QEMU in the foreground on this terminal until it exits; its exit status.

    On SIGINT/SIGTERM here, QEMU gets SIGTERM first: it exits cleanly and gives the
    terminal back out of raw mode, which a SIGKILL would not.
    """
    proc = spawn(command, stdout=None, stdin=None, death_signal=signal.SIGKILL)
    try:
        return proc.wait()
    except BaseException:
        stop(proc, grace=10)
        raise


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""

