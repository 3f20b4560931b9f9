"""Each smoke check, on canned answers of a guest: what passes, what fails and what it says.

The console is replaced by a table of answers (command fragment -> exit status and output),
which is what a check sees of a real guest through Console.run."""

from __future__ import annotations

import dataclasses

import pytest

from imagebuild.config import Arch, Variant
from imagebuild.smoketest import checks
from imagebuild.smoketest.console import CommandResult


@dataclasses.dataclass
class CannedConsole:
    answers: dict[str, CommandResult]
    printed: str = ""

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        for fragment, answer in self.answers.items():
            if fragment in command:
                return answer
        return CommandResult(127, f"sh: {command.split()[0]}: not found")

    def seen(self) -> str:
        return self.printed


def session(answers: dict[str, tuple[int, str]], *, printed: str = "", arch: Arch = Arch.amd64,
            **facts: object) -> checks.GuestSession:
    console = CannedConsole({k: CommandResult(*v) for k, v in answers.items()}, printed)
    return checks.GuestSession(console, arch, Variant.console, facts=dict(facts))  # type: ignore[arg-type]


def test_arch() -> None:
    assert checks.check_arch(session({"uname -m": (0, "x86_64\n")}))[0]
    passed, detail = checks.check_arch(session({"uname -m": (0, "aarch64\n")}))
    assert not passed and detail == "uname -m: aarch64"


def test_root_on_xfs() -> None:
    check = checks.ROOT_XFS.function
    assert check(session({"findmnt -no FSTYPE /": (0, "xfs\n")})) == (True, "/ is xfs")
    assert check(session({"findmnt -no FSTYPE /": (0, "ext4\n")})) == (False, "/ is ext4")
    passed, detail = checks.BOOT_VFAT.function(session({"findmnt": (1, "")}))
    assert not passed and detail.startswith("/boot is not mounted")


SYSTEMD = {"/run/systemd/system": (0, "systemd\n")}
OPENRC = {"/run/systemd/system": (0, "openrc\n")}


def test_systemd_running_and_failed_units() -> None:
    good = session({**SYSTEMD, "is-system-running": (0, "running\n"), "systemctl --failed": (0, "")})
    assert checks.check_no_failed_units(good) == (True, "systemd: system running, no failed units")
    bad = session({**SYSTEMD, "is-system-running": (1, "degraded\n"),
                   "systemctl --failed": (0, "cloud-final.service loaded failed failed Cloud-init final\n")})
    assert checks.check_no_failed_units(bad) == (False, "system degraded; failed units: cloud-final.service")
    slow = session({**SYSTEMD, "is-system-running": (1, "starting\n"), "systemctl --failed": (0, "")})
    assert not checks.check_no_failed_units(slow)[0]


def test_openrc_services() -> None:
    good = session({**OPENRC, "rc-status": (0, "Runlevel: default\n sshd   [  started  ]\n")})
    assert checks.check_no_failed_units(good) == (True, "OpenRC: 1 services started, none crashed or failed")
    bad = session({**OPENRC, "rc-status": (0, "Runlevel: default\n sshd  [  crashed  ]\n dhcpcd  [ started ]\n")})
    assert checks.check_no_failed_units(bad) == (False, "OpenRC: sshd (crashed)")
    assert not checks.check_no_failed_units(session({**OPENRC, "rc-status": (0, "")}))[0], "nothing listed"
    unknown = session({"/run/systemd/system": (0, "unknown\n")})
    assert not checks.check_no_failed_units(unknown)[0]


def test_nothing_listening() -> None:
    assert checks.check_nothing_listening(session({"ss -Htln": (0, "")}))[0]
    passed, detail = checks.check_nothing_listening(session({"ss -Htln": (0, "LISTEN 0 128 0.0.0.0:22 0.0.0.0:*\n")}))
    assert not passed and "0.0.0.0:22" in detail


def test_sshd_listening() -> None:
    assert checks.check_sshd_listening(session({"ss -Htln": (0, "LISTEN 0 128 [::]:22 [::]:*\n")}))[0]
    # /proc/net/tcp's fallback: the port in hex (0016 is 22).
    assert checks.check_sshd_listening(session({"ss -Htln": (0, "0: 00000000:0016 00000000:0000 0A\n")}))[0]
    assert not checks.check_sshd_listening(session({"ss -Htln": (0, "LISTEN 0 5 127.0.0.1:631 *:*\n")}))[0]


def test_cloud_init_done() -> None:
    done = "status: done\nboot_status_code: enabled-by-generator\ndetail:\nerrors: []\n"
    assert checks.check_cloud_init_done(session({"cloud-init status": (0, done)}))[0]
    failed = "status: error\nerrors:\n\t- ('ssh', RuntimeError())\n"
    passed, detail = checks.check_cloud_init_done(session({"cloud-init status": (1, failed)}))
    assert not passed and "cloud-init status 'error', exit 1" in detail
    recoverable = "status: done\nerrors: ['x']\n"
    assert not checks.check_cloud_init_done(session({"cloud-init status": (2, recoverable)}))[0]


def test_hostname_and_login_facts() -> None:
    assert checks.check_hostname(session({"hostname": (0, "smoke-1\n")}, seed_hostname="smoke-1"))[0]
    assert not checks.check_hostname(session({"hostname": (0, "localhost\n")}, seed_hostname="smoke-1"))[0]
    assert checks.check_seeded_login(session({"id -un": (0, "smoketest\n")}, seed_user="smoketest"))[0]
    assert checks.check_root_login_refused(session({}, root_login_refused=(True, "Login incorrect")))[0]
    assert checks.check_root_login_refused(session({})) == (False, "not tried")
    assert checks.check_root_login_empty_password(session({}, root_password_prompt=False))[0]
    assert not checks.check_root_login_empty_password(session({}))[0]


def test_hostname_resolves() -> None:
    assert checks.check_hostname_resolves(session({"getent hosts": (0, "127.0.1.1 smoke-1\n")}))[0]
    assert not checks.check_hostname_resolves(session({"getent hosts": (2, "")}))[0]


def test_host_keys_made_at_boot() -> None:
    fresh = "/etc/ssh/ssh_host_ed25519_key.pub 1000 900\n"
    assert checks.check_host_keys_made_at_boot(session({"ssh_host_": (0, fresh)}))[0]
    shipped = "/etc/ssh/ssh_host_ed25519_key.pub 800 900\n"
    passed, detail = checks.check_host_keys_made_at_boot(session({"ssh_host_": (0, shipped)}))
    assert not passed and "older than this boot" in detail
    assert not checks.check_host_keys_made_at_boot(session({"ssh_host_": (0, "")}))[0]


@pytest.mark.parametrize(("root", "grown"), [(24 * 2**30 - 2**29, True), (20 * 2**30 - 2**29, False)])
def test_root_grown(root: int, grown: bool) -> None:
    answers = {"findmnt -bno SIZE /": (0, f"{root}\n")}
    assert checks.check_root_grown(session(answers, disk_size=24 * 2**30, image_size=20 * 2**30))[0] is grown


def test_cloud_init_on_the_serial_console() -> None:
    everything = ("ci-info: +----+\nCloud-init v. 24.1 finished at ...\n-----BEGIN SSH HOST KEY KEYS-----\n")
    assert checks.check_cloud_init_on_console(session({}, printed=everything))[0]
    passed, detail = checks.check_cloud_init_on_console(session({}, printed="ci-info: +--+\n"))
    assert not passed and "its final message, the SSH host keys" in detail


def test_cloud_init_config_valid() -> None:
    assert checks.check_cloud_init_config_valid(session({"Invalid cloud-config": (1, "")}))[0]
    warned = "2026-12-04 23:18:36,364 - schema.py[WARNING]: Invalid cloud-config provided: Please run ...\n"
    passed, detail = checks.check_cloud_init_config_valid(session({"Invalid cloud-config": (0, warned)}))
    assert not passed and "schema.py[WARNING]" in detail
    assert not checks.check_cloud_init_config_valid(session({"Invalid cloud-config": (2, "no such file")}))[0]
