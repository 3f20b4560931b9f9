"""Drive the guest's serial console: follow the boot phase by phase, spot failures early,
log in as root and run shell commands whose output is fenced by unique markers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from collections.abc import Callable
from typing import NoReturn

import pexpect

from imagebuild.config import Arch
from imagebuild.log import logger

# Per-phase deadlines in seconds for a KVM guest; TCG multiplies them (TCG_FACTOR).
# "firmware": QEMU start -> GRUB; "grub": GRUB -> kernel; "kernel": kernel -> login prompt;
# "login": login prompt -> a root shell answering commands.
# "kernel-silence": the longest the kernel may print nothing before it starts init. Its early
# boot prints a line every few milliseconds; a kernel that goes quiet there has hung (seen
# under TCG: a guest stopped for good after "IP idents hash table entries", not a defect of
# the image), and waiting out the whole kernel phase for it would cost minutes.
KVM_DEADLINES = {"firmware": 30.0, "grub": 30.0, "kernel": 120.0, "login": 60.0, "kernel-silence": 30.0}
# Measured here: amd64 under TCG boots ~5x slower than KVM, arm64 (foreign arch) ~10x;
# the factors leave headroom for a loaded CI runner.
TCG_FACTOR = {Arch.amd64: 3.0, Arch.arm64: 5.0, Arch.riscv64: 6.0}


def boot_deadlines(arch: Arch, accel: str) -> dict[str, float]:
    factor = 1.0 if accel == "kvm" else TCG_FACTOR[arch]
    return {phase: seconds * factor for phase, seconds in KVM_DEADLINES.items()}


class GuestFailure(Exception):
    """The guest did not behave like a working image. A failed result, not an error."""

    def __init__(self, reason: str, phase: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.phase = phase


@dataclasses.dataclass(frozen=True)
class Pattern:
    regex: str
    phases: frozenset[str]  # the phases in which this pattern means something
    reason: str  # str.format()ted with the matched text as {0}


_ALL = frozenset({"firmware", "grub", "kernel", "login"})
_PRE_KERNEL = frozenset({"firmware", "grub"})

# Seeing one of these moves the boot to the phase named (and past all phases before it).
MILESTONES: dict[str, tuple[str, ...]] = {
    "grub": (r"GNU GRUB", r"Welcome to GRUB", r"Booting [`']", r"Booting a command list"),
    "kernel": (r"Linux version \d", r"EFI stub: ", r"\[\s+0\.0{6}\] "),
    "login": (r"login: ",),
}

# GRUB "error:" lines that do not stop a boot.
BENIGN_GRUB_ERRORS = ("no suitable video mode found",)

FAILURES: tuple[Pattern, ...] = (
    Pattern(r"UEFI Interactive Shell|Shell> ", _PRE_KERNEL,
            "firmware found nothing bootable and started the UEFI shell"),
    Pattern(r"No bootable option[^\r\n]*", _PRE_KERNEL, "firmware found nothing bootable: {0}"),
    # U-Boot (riscv64 where QEMU cannot run edk2) ends its boot scan at its command prompt.
    Pattern(r"(?m)^=> ", frozenset({"firmware"}), "U-Boot found nothing bootable and stopped at its prompt"),
    Pattern(r"grub rescue> ", _PRE_KERNEL,
            "GRUB stopped in its rescue shell (it cannot find its modules or grub.cfg)"),
    Pattern(r"(?<![\w-])grub> ", _PRE_KERNEL,
            "GRUB stopped at its command line (no usable grub.cfg)"),
    Pattern(r"error: [^\r\n]*(?=\r?\n)", _PRE_KERNEL, "GRUB {0}"),
    Pattern(r"Kernel panic[^\r\n]*(?=\r?\n)", _ALL, "{0}"),
    Pattern(r"You are in emergency mode|Entering emergency mode|emergency mode|"
            r"Give root password for maintenance|Cannot open access to console", _ALL,
            "the system entered emergency mode ({0})"),
    Pattern(r"dracut-initqueue\[\d+\]:[^\r\n]*[Tt]imeout[^\r\n]*(?=\r?\n)", _ALL,
            "dracut timed out waiting for the root device: {0}"),
    Pattern(r"Warning: /dev/\S+ does not exist", _ALL, "initramfs: {0}"),
    Pattern(r"ALERT! [^\r\n]*does not exist", _ALL, "initramfs: {0}"),
    Pattern(r"ERROR: [^\r\n]* failed to start[^\r\n]*(?=\r?\n)", _ALL, "OpenRC: {0}"),
    Pattern(r"rc: Aborting![^\r\n]*", _ALL, "OpenRC gave up on the runlevel: {0}"),
    Pattern(r"ERROR: [^\r\n]*(?:has crashed|failed to stop)[^\r\n]*(?=\r?\n)", _ALL, "OpenRC: {0}"),
)  # fmt: skip

# The kernel handing over to the initramfs or the root file system's init: the end of its
# early, chatty boot (see "kernel-silence").
INIT_STARTED = r"Run \S+ as init process"
KERNEL_HUNG = "the kernel stopped printing"

# Firmware lines worth quoting when the boot later fails.
FIRMWARE_NOTE = r"BdsDxe: failed to load Boot[^\r\n]*(?=\r?\n)"
# GRUB's menu counting down to its default entry: the test presses Enter instead of waiting out
# the image's timeout (which stays in grub.cfg for users).
GRUB_COUNTDOWN = r"will be executed automatically in \d+s"

_ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|[\x00-\x08\x0b\x0c\x0e-\x1f]")
# Typed as __IB""_... so that an echo of the command line never matches the printed marker.
_MARKER = "__IB{q}_{what}_{n}__"


@dataclasses.dataclass(frozen=True)
class CommandResult:
    status: int
    output: str


class Console:
    """The guest's serial console, as the boot and a root shell see it."""

    def __init__(self, spawn: pexpect.spawnbase.SpawnBase, *, started: float) -> None:
        self.spawn = spawn
        self.started = started  # time.monotonic() when QEMU was started
        self.phase = "firmware"
        self.phase_seconds: dict[str, float] = {}
        self._phase_start = started
        self._tail = ""
        self._seen: list[str] = []  # everything the console printed, bounded (see seen())
        self._seen_size = 0
        self._notes: list[str] = []
        self._counter = itertools.count(1)
        self._menu_answered = False

    # -- boot -------------------------------------------------------------------------------

    def wait_for_boot(
        self,
        deadlines: dict[str, float],
        *,
        boot_timeout: float,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        """Follow the boot until the login prompt; GuestFailure on a failure or a deadline."""
        order = ("firmware", "grub", "kernel", "login")
        init_started = False
        last_output = time.monotonic()
        while self.phase != "login":
            current = order.index(self.phase)
            candidates: list[tuple[str, str, str]] = [("note", FIRMWARE_NOTE, "")]
            if self.phase == "grub" and not self._menu_answered:
                candidates.append(("menu", GRUB_COUNTDOWN, ""))
            # Until init starts, every kernel line counts as progress (see "kernel-silence").
            watch_silence = self.phase == "kernel" and not init_started
            if watch_silence:
                candidates.append(("init", INIT_STARTED, ""))
            for later in order[current + 1 :]:
                candidates += [("milestone", regex, later) for regex in MILESTONES[later]]
            candidates += [
                ("failure", p.regex, p.reason) for p in FAILURES if self.phase in p.phases
            ]
            if watch_silence:  # last: a failure or milestone on the same line is found first
                candidates.append(("line", r"\n", ""))
            phase_deadline = self._phase_start + deadlines[self.phase]
            boot_deadline = self.started + boot_timeout
            silence_deadline = last_output + deadlines["kernel-silence"] if watch_silence else math.inf
            kind, text, value = self._expect(
                candidates, min(phase_deadline, boot_deadline, silence_deadline) - time.monotonic()
            )
            last_output = time.monotonic()
            if kind == "init":
                init_started = True
            elif kind == "line":
                continue
            elif kind == "note":
                self._notes.append(text)
            elif kind == "menu":
                self.spawn.send("\r")
                self._menu_answered = True
            elif kind == "milestone":
                self._enter(value, on_phase)
            elif kind == "failure":
                if text.startswith("error: ") and any(b in text for b in BENIGN_GRUB_ERRORS):
                    continue
                self._fail(value.format(text.strip()))
            elif kind == "timeout":
                if silence_deadline < min(phase_deadline, boot_deadline):
                    what = (
                        f"{KERNEL_HUNG} for {deadlines['kernel-silence']:.0f}s before starting init"
                        " (the guest hung)"
                    )
                elif boot_deadline <= phase_deadline:
                    what = f"no login prompt within the boot timeout of {boot_timeout:.0f}s"
                else:
                    what = f"no progress within the phase deadline of {deadlines[self.phase]:.0f}s"
                self._fail(
                    f"{what}, stuck in the {self.phase} phase;"
                    f" last console line: {self.last_line()!r}"
                )
            else:
                self._fail(
                    f"the serial console closed during the {self.phase} phase (QEMU exited:"
                    " the guest reset or powered off)"
                )

    def _enter(self, phase: str, on_phase: Callable[[str], None] | None) -> None:
        now = time.monotonic()
        order = ("firmware", "grub", "kernel", "login")
        # Phases skipped without a trace (a silent GRUB, a quiet kernel) get no timing.
        self.phase_seconds[self.phase] = round(now - self._phase_start, 2)
        for skipped in order[order.index(self.phase) + 1 : order.index(phase)]:
            self.phase_seconds[skipped] = 0.0
        logger.info(
            "  %s phase done after %.1fs (%.1fs since QEMU start)",
            self.phase, now - self._phase_start, now - self.started,
        )  # fmt: skip
        self.phase, self._phase_start = phase, now
        if on_phase is not None:
            on_phase(phase)

    def _fail(self, reason: str) -> NoReturn:
        self.phase_seconds[self.phase] = round(time.monotonic() - self._phase_start, 2)
        if self._notes and self.phase in _PRE_KERNEL:
            reason += " (" + "; ".join(dict.fromkeys(self._notes)) + ")"
        raise GuestFailure(reason, self.phase)

    def _expect(self, candidates: list[tuple[str, str, str]], timeout: float) -> tuple[str, str, str]:
        """Wait for the first of ``candidates``; returns (kind, matched text, value)."""
        regexes = [re.compile(regex, re.DOTALL) for _, regex, _ in candidates]
        try:
            index = self.spawn.expect_list(regexes, timeout=max(timeout, 0.0))
        except pexpect.TIMEOUT:
            self._remember(self.spawn.before)
            return "timeout", "", ""
        except pexpect.EOF:
            self._remember(self.spawn.before)
            return "eof", "", ""
        self._remember(self.spawn.before + self.spawn.after)
        kind, _, value = candidates[index]
        return kind, _clean(self.spawn.after), value

    # Enough for a TCG boot's whole console (kernel log, init, cloud-init) many times over.
    _SEEN_LIMIT = 16 * 1024 * 1024

    def _remember(self, text: object) -> None:
        if isinstance(text, str):
            self._tail = (self._tail + text)[-8192:]
            if self._seen_size < self._SEEN_LIMIT:
                self._seen.append(text)
                self._seen_size += len(text)

    def seen(self) -> str:
        """What the console printed so far (its first 16 MiB), without terminal escapes."""
        return _clean("".join(self._seen))

    def last_line(self) -> str:
        """The last non-empty console line seen, without terminal escapes."""
        for line in reversed(re.split(r"[\r\n]+", _clean(self._tail))):
            if line.strip():
                return line.strip()[-200:]
        return ""

    # -- login and commands -----------------------------------------------------------------

    def login_root(self, timeout: float) -> None:
        """Log in as root with an empty password; GuestFailure if a password is asked for."""
        self.login("root", None, timeout)

    def _send_login(self, user: str, timeout: float) -> str:
        """Type ``user`` at the login prompt; what came back: password, incorrect, or prompt."""
        start = time.monotonic()
        candidates = [
            ("password", r"[Pp]assword: ?", ""),
            ("incorrect", r"Login incorrect", ""),
            ("login", r"login: ", ""),
            ("prompt", r"[#$] ", ""),
        ]
        self.spawn.send(f"{user}\r")
        # A getty restarted late in the boot prints a fresh prompt and drops what we typed.
        for _ in range(3):
            kind, _, _ = self._expect(candidates, timeout - (time.monotonic() - start))
            if kind != "login":
                return kind
            self.spawn.send(f"{user}\r")
        return kind

    def login_refused(self, user: str, password: str, timeout: float) -> tuple[bool, str]:
        """Try ``user`` with ``password`` at the login prompt; (refused, what happened).

        Leaves the console at a fresh login prompt either way.
        """
        kind = self._send_login(user, timeout)
        if kind == "password":
            self.spawn.send(f"{password}\r")
            kind, _, _ = self._expect([("incorrect", r"Login incorrect", ""), ("prompt", r"[#$] ", "")], timeout)
        if kind == "prompt":
            self.spawn.send("exit\r")
            self._expect([("login", r"login: ", "")], timeout)
            return False, f"{user} logged in with password {password!r}"
        if kind == "incorrect":
            self._expect([("login", r"login: ", "")], timeout)
            return True, f"{user} with password {password!r}: Login incorrect"
        return False, f"no answer to a login as {user}; last console line: {self.last_line()!r}"

    def login(self, user: str, password: str | None, timeout: float) -> None:
        """Log in as ``user`` (``password`` None: it must need none); GuestFailure if that fails."""
        start = time.monotonic()
        kind = self._send_login(user, timeout)
        if kind == "password":
            if password is None:
                self._fail(f"{user} password is not empty (login asked for a password)")
            self.spawn.send(f"{password}\r")
            kind, _, _ = self._expect([("incorrect", r"Login incorrect", ""), ("prompt", r"[#$] ", "")],
                                      timeout - (time.monotonic() - start))
        if kind == "incorrect":
            self._fail(f"{user} cannot log in on the console (Login incorrect)")
        if kind != "prompt":
            self._fail(
                f"no shell prompt {timeout:.0f}s after logging in as {user};"
                f" last console line: {self.last_line()!r}"
            )
        # Quiet the console: no colours or pager, kernel messages only if fatal, and (on
        # systemd) no more boot status lines written over command output. Line editing off:
        # readline redraws long lines on a dumb terminal; the tty's plain echo stays, so the
        # console log shows each command once above its output (the markers make it harmless).
        setup = (
            "set +o emacs +o vi 2>/dev/null; export TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0"
            " PAGER=cat LC_ALL=C; unset HISTFILE; dmesg -n 1 2>/dev/null;"
            " [ -d /run/systemd/system ] && kill -s RTMIN+21 1 2>/dev/null; PS1='# '"
        )
        result = self.run(
            setup, timeout=max(timeout - (time.monotonic() - start), 30.0), subshell=False
        )
        if result.status < 0:
            self._fail("the root shell does not answer commands")
        self.phase_seconds["login"] = round(time.monotonic() - self._phase_start, 2)

    def run(self, command: str, timeout: float = 60.0, *, subshell: bool = True) -> CommandResult:
        """Run one shell command line in the guest; status -1 if it did not finish in time.

        In a subshell by default, so an `exit` or `cd` cannot change the session.
        """
        n = next(self._counter)
        begin = _MARKER.format(q="", what="BEGIN", n=n)
        end = _MARKER.format(q="", what="END", n=n)
        typed_begin = _MARKER.format(q='""', what="BEGIN", n=n)
        typed_end = _MARKER.format(q='""', what="END", n=n)
        # stdin from /dev/null so a command can never eat the next line we type.
        body = f"( {command} ) </dev/null 2>&1" if subshell else command
        line = f'echo "{typed_begin}"; {body}; echo "{typed_end} $?"'
        logger.debug("guest$ %s", command)
        self.spawn.send(line + "\r")
        try:
            self.spawn.expect_list(
                [re.compile(re.escape(begin) + r"\r?\n(.*?)" + re.escape(end) + r" (\d+)\r?\n",
                            re.DOTALL)],
                timeout=timeout,
            )  # fmt: skip
        except (pexpect.TIMEOUT, pexpect.EOF):
            self._remember(self.spawn.before)
            logger.debug("guest command timed out after %.0fs: %s", timeout, command)
            return CommandResult(-1, _clean(str(self.spawn.before or "")).strip())
        self._remember(self.spawn.before + self.spawn.after)
        match = self.spawn.match
        output = _clean(match.group(1).replace("\r\n", "\n")).strip("\n")
        return CommandResult(int(match.group(2)), output)


def _clean(text: str) -> str:
    """Remove terminal escape sequences and control characters (keeps \\r, \\n, \\t)."""
    return _ANSI.sub("", text)
