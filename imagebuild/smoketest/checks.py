"""What a booted image must prove, as named checks run through the root shell on the console.

``checks_for(variant)`` is the extension point: each variant gets a list of ``Check``s, and
a check is a function of the ``GuestSession`` that returns (passed, detail).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from imagebuild.config import Arch, Variant
from imagebuild.log import logger
from imagebuild.smoketest.console import CommandResult, Console
from imagebuild.smoketest.results import CheckResult

# How long systemd may take after the login prompt to finish starting units (KVM seconds;
# GuestSession.slowdown scales it for TCG).
SYSTEM_RUNNING_TIMEOUT = 120.0


@dataclasses.dataclass
class GuestSession:
    """A logged-in root shell on the guest, and what the run learned so far."""

    console: Console
    arch: Arch
    variant: Variant
    slowdown: float = 1.0  # TCG factor for timeouts inside the guest
    # Facts earlier steps record for the checks, e.g. "root_password_prompt": False.
    facts: dict[str, object] = dataclasses.field(default_factory=dict)

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        return self.console.run(command, timeout=timeout * self.slowdown)

    def init_system(self) -> str:
        """"systemd", "openrc" or "unknown": which init is running (detected once)."""
        if "init" not in self.facts:
            # /run/systemd/system exists exactly when systemd is PID 1 (sd_booted()).
            result = self.run(
                "if [ -d /run/systemd/system ]; then echo systemd;"
                " elif [ -x /sbin/openrc ] || [ -x /usr/sbin/openrc ]; then echo openrc;"
                " else echo unknown; fi"
            )
            value = _last_line(result)
            self.facts["init"] = value if value in ("systemd", "openrc") else "unknown"
        return str(self.facts["init"])


CheckFunction = Callable[[GuestSession], tuple[bool, str]]


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    function: CheckFunction

    def run(self, session: GuestSession) -> CheckResult:
        try:
            passed, detail = self.function(session)
        except Exception as exc:  # a broken check is a failed check, not a crashed run
            logger.debug("check %s raised", self.name, exc_info=True)
            passed, detail = False, f"check could not run: {type(exc).__name__}: {exc}"
        logger.info("  check %-26s %s%s", self.name, "ok" if passed else "FAILED",
                    f" ({detail})" if detail else "")  # fmt: skip
        return CheckResult(self.name, passed, detail)


def run_checks(session: GuestSession, checks: list[Check]) -> list[CheckResult]:
    return [check.run(session) for check in checks]


def _last_line(result: CommandResult) -> str:
    lines = [line.strip() for line in result.output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _command_failed(result: CommandResult, what: str) -> str:
    if result.status < 0:
        return f"{what} did not finish"
    return f"{what} exited with status {result.status}: {result.output or '(no output)'}"


# -- the checks -------------------------------------------------------------------------------


def check_arch(session: GuestSession) -> tuple[bool, str]:
    result = session.run("uname -m")
    machine = _last_line(result)
    return machine == session.arch.uname, f"uname -m: {machine or '(nothing)'}"


def _fstype_check(mountpoint: str, expected: str) -> CheckFunction:
    def check(session: GuestSession) -> tuple[bool, str]:
        result = session.run(f"findmnt -no FSTYPE {mountpoint}")
        if result.status != 0:
            return False, f"{mountpoint} is not mounted ({_command_failed(result, 'findmnt')})"
        fstype = _last_line(result)
        return fstype == expected, f"{mountpoint} is {fstype or '(unknown)'}"

    return check


def check_no_failed_units(session: GuestSession) -> tuple[bool, str]:
    init = session.init_system()
    if init == "systemd":
        limit = SYSTEM_RUNNING_TIMEOUT * session.slowdown
        state = _last_line(
            session.run(f"timeout {limit:.0f} systemctl is-system-running --wait",
                        timeout=SYSTEM_RUNNING_TIMEOUT + 30)
        )  # fmt: skip
        failed = session.run("systemctl --failed --no-legend --plain")
        if failed.status != 0:
            return False, _command_failed(failed, "systemctl --failed")
        units = [line.split()[0] for line in failed.output.splitlines() if line.strip()]
        if units:
            return False, f"system {state or 'state unknown'}; failed units: {', '.join(units)}"
        if state != "running":
            return False, f"system state after {limit:.0f}s: {state or '(no answer)'}"
        return True, "systemd: system running, no failed units"
    if init == "openrc":
        status = session.run("rc-status --all --nocolor")
        if status.status != 0:
            return False, _command_failed(status, "rc-status --all")
        states = openrc_service_states(status.output)
        if not states:
            return False, f"rc-status --all listed no services: {status.output[-300:] or '(no output)'}"
        bad = [f"{name} ({state})" for name, state in states.items() if state in OPENRC_BAD_STATES]
        if bad:
            return False, f"OpenRC: {', '.join(bad)}"
        started = sum(state == "started" for state in states.values())
        return True, f"OpenRC: {started} services started, none crashed or failed"
    return False, "cannot tell the init system (neither systemd nor OpenRC is running)"


# rc-status prints a service's state in brackets; these mean it did not do its job.
OPENRC_BAD_STATES = ("crashed", "failed")


def openrc_service_states(text: str) -> dict[str, str]:
    """``rc-status --all`` output as {service: state}: lines ``name  [  state  ]`` under the
    ``Runlevel: x`` and ``Dynamic Runlevel: y`` headers (a service in several runlevels once,
    its worst state kept)."""
    states: dict[str, str] = {}
    for line in text.splitlines():
        # The state is the first word in the brackets ("started 00:01:02 (0)" when supervised).
        match = re.fullmatch(r"\s*(\S+)\s+\[\s*([a-z]+)[^\]]*\]\s*", line)
        if not match:
            continue
        name, state = match.groups()
        if states.get(name) not in OPENRC_BAD_STATES:
            states[name] = state
    return states


def check_nothing_listening(session: GuestSession) -> tuple[bool, str]:
    # /proc/net/tcp{,6} state 0A is LISTEN: the fallback for stages without iproute2.
    result = session.run(
        "if command -v ss >/dev/null 2>&1; then ss -Htln;"
        " else awk 'FNR > 1 && $4 == \"0A\"' /proc/net/tcp /proc/net/tcp6 2>/dev/null; fi"
    )
    if result.status != 0:
        return False, _command_failed(result, "ss -Htln")
    sockets = [line.strip() for line in result.output.splitlines() if line.strip()]
    if sockets:
        return False, "listening TCP sockets: " + "; ".join(" ".join(s.split()) for s in sockets)
    return True, "no TCP socket is listening"


def check_root_login_empty_password(session: GuestSession) -> tuple[bool, str]:
    if session.facts.get("root_password_prompt") is False:
        return True, "root logged in on the serial console without a password"
    return False, "root could not log in without a password"


ARCH = Check("arch", check_arch)
ROOT_XFS = Check("root-xfs", _fstype_check("/", "xfs"))
BOOT_VFAT = Check("boot-vfat", _fstype_check("/boot", "vfat"))
NO_FAILED_UNITS = Check("no-failed-units", check_no_failed_units)
NOTHING_LISTENING = Check("nothing-listening", check_nothing_listening)
ROOT_LOGIN_EMPTY_PASSWORD = Check("root-login-empty-password", check_root_login_empty_password)

# What every image must show, whatever the variant.
COMMON_CHECKS = [ARCH, ROOT_XFS, BOOT_VFAT, NO_FAILED_UNITS]


# How long `cloud-init status --wait` may take after login (KVM seconds, scaled for TCG):
# the final stage runs after the getty starts.
CLOUD_INIT_TIMEOUT = 120.0


def check_cloud_init_done(session: GuestSession) -> tuple[bool, str]:
    timeout = CLOUD_INIT_TIMEOUT * session.slowdown
    result = session.run(f"timeout {timeout:.0f} cloud-init status --wait --long", timeout=CLOUD_INIT_TIMEOUT + 30)
    summary = "; ".join(line.strip() for line in result.output.splitlines()
                        if line.strip() and line.strip("."))[-400:]
    status = next((line.split(":", 1)[1].strip() for line in result.output.splitlines()
                   if line.startswith("status:")), "unknown")
    # Exit 0: done without errors; 1: an error; 2: done with recoverable errors (23.4+).
    errors = [line for line in result.output.splitlines() if line.startswith("errors:") and line.strip() != "errors: []"]
    if result.status == 0 and status == "done" and not errors:
        return True, summary
    return False, f"cloud-init status {status!r}, exit {result.status}: {summary}"


def check_cloud_init_config_valid(session: GuestSession) -> tuple[bool, str]:
    """cloud-init found no schema error in the image's configuration or the seed's (it warns and
    goes on, so 'done' alone does not show it)."""
    result = session.run("sudo -n grep -h 'Invalid cloud-config' /var/log/cloud-init.log")
    if result.status == 1:  # grep: no line matched
        return True, "no schema warnings in /var/log/cloud-init.log"
    if result.status == 0:
        return False, f"cloud-init reports an invalid configuration: {_last_line(result)[-300:]}"
    return False, _command_failed(result, "grep /var/log/cloud-init.log")


def check_hostname(session: GuestSession) -> tuple[bool, str]:
    want = str(session.facts["seed_hostname"])
    got = _last_line(session.run("hostname"))
    return got == want, f"hostname is {got!r} (the seed's meta-data asked for {want!r})"


def check_seeded_login(session: GuestSession) -> tuple[bool, str]:
    user = session.facts["seed_user"]
    who = _last_line(session.run("id -un"))
    return who == user, f"logged in on the console as the seeded user {who!r} with its password"


def check_root_login_refused(session: GuestSession) -> tuple[bool, str]:
    answer = session.facts.get("root_login_refused")
    if not isinstance(answer, tuple):
        return False, "not tried"
    refused, detail = answer
    return bool(refused), str(detail)


def check_host_keys_made_at_boot(session: GuestSession) -> tuple[bool, str]:
    # A key is "made at boot" when it is younger than the running system.
    result = session.run(
        "boot=$(( $(date +%s) - $(cut -d. -f1 /proc/uptime) - 5 ));"
        " for k in /etc/ssh/ssh_host_*_key.pub; do [ -e \"$k\" ] || continue;"
        " echo \"$k $(stat -c %Y \"$k\") $boot\"; done")
    keys = [line.split() for line in result.output.splitlines() if line.startswith("/etc/ssh/")]
    if not keys:
        return False, "no SSH host keys in /etc/ssh"
    old = [k[0] for k in keys if int(k[1]) < int(k[2])]
    names = ", ".join(k[0].rsplit("/", 1)[1] for k in keys)
    return not old, f"made at this boot: {names}" if not old else f"older than this boot: {', '.join(old)}"


def check_root_grown(session: GuestSession) -> tuple[bool, str]:
    disk, nominal = int(str(session.facts["disk_size"])), int(str(session.facts["image_size"]))
    size = int(_last_line(session.run("findmnt -bno SIZE /")) or 0)
    # Grown means: bigger than the whole nominal image could hold, and close to the disk.
    grown = size > nominal and size > disk - 1024**3
    return grown, (f"/ is {size / 2**30:.1f} GiB on a {disk / 2**30:.0f} GiB disk "
                   f"(the image's nominal size is {nominal / 2**30:.0f} GiB)")


def check_cloud_init_on_console(session: GuestSession) -> tuple[bool, str]:
    """cloud-init reports to /dev/console, which must be the serial line clouds show users."""
    seen = session.console.seen()
    wanted = {"its network table": "ci-info: ", "its final message": "Cloud-init v. ",
              "the SSH host keys": "-----BEGIN SSH HOST KEY KEYS-----"}
    missing = [what for what, text in wanted.items() if text not in seen]
    if missing:
        return False, f"the serial console does not show cloud-init's {', '.join(missing)} (is /dev/console the serial port?)"
    return True, "the serial console shows cloud-init's network table, final message and SSH host keys"


def check_hostname_resolves(session: GuestSession) -> tuple[bool, str]:
    result = session.run('getent hosts "$(hostname)"')
    line = _last_line(result)
    if result.status != 0 or not line:
        return False, f"the hostname does not resolve (getent hosts exit {result.status})"
    return True, f"the hostname resolves: {' '.join(line.split())}"


def check_sshd_listening(session: GuestSession) -> tuple[bool, str]:
    result = session.run(
        "if command -v ss >/dev/null 2>&1; then ss -Htln; else awk 'FNR > 1 && $4 == \"0A\"'"
        " /proc/net/tcp /proc/net/tcp6 2>/dev/null; fi")
    # ss: "LISTEN 0 128 0.0.0.0:22 0.0.0.0:*"; /proc/net/tcp: "0: 00000000:0016 00000000:0000 0A" (hex port).
    listening = any(field.endswith((":22", ":0016")) for line in result.output.splitlines()
                    for field in line.split()[:5])
    return listening, "sshd listens on port 22" if listening else "nothing listens on port 22 (sshd not running)"


CLOUD_INIT_DONE = Check("cloud-init-done", check_cloud_init_done)
CLOUD_INIT_CONFIG_VALID = Check("cloud-init-config-valid", check_cloud_init_config_valid)
CLOUD_INIT_ON_CONSOLE = Check("cloud-init-on-serial-console", check_cloud_init_on_console)
HOSTNAME_RESOLVES = Check("hostname-resolves", check_hostname_resolves)
SSHD_LISTENING = Check("sshd-listening", check_sshd_listening)
HOSTNAME = Check("hostname-from-seed", check_hostname)
SEEDED_LOGIN = Check("seeded-login", check_seeded_login)
ROOT_LOGIN_REFUSED = Check("root-empty-password-refused", check_root_login_refused)
HOST_KEYS = Check("ssh-host-keys-made-at-boot", check_host_keys_made_at_boot)
ROOT_GROWN = Check("root-grown-to-disk", check_root_grown)


def checks_for(variant: Variant) -> list[Check]:
    """The checks an image of ``variant`` must pass once a shell is open."""
    if variant is Variant.console:
        return [*COMMON_CHECKS, NOTHING_LISTENING, ROOT_LOGIN_EMPTY_PASSWORD]
    # cloud-init first: the other checks need what it configures (the root grown, keys made).
    return [CLOUD_INIT_DONE, CLOUD_INIT_CONFIG_VALID, *COMMON_CHECKS, HOSTNAME, HOSTNAME_RESOLVES, SEEDED_LOGIN, ROOT_LOGIN_REFUSED,
            HOST_KEYS, SSHD_LISTENING, CLOUD_INIT_ON_CONSOLE, ROOT_GROWN]
