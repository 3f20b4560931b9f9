"""The images boot the way Gentoo tells its users to boot them: the QEMU command line from
Gentoo's announcement and FAQ, with nothing of imagebuild's (no virtio disk, no serial
settings, no snapshot; the disk is `-drive file=`, an AHCI disk on q35, format probed).

Only what this host cannot do is changed: KVM dies here, so `-cpu host -accel kvm` becomes
`-accel tcg` (as the README says), the firmware is Debian's OVMF, and the serial line goes to
the test's terminal (`-display none -serial stdio`) so the login can be seen and typed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pexpect
import pytest

from imagebuild.config import Arch
from imagebuild.smoketest.qemu import kvm_works

from conftest import qemu_processes, require_tools

pytestmark = pytest.mark.boot

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")


def faq_command(image: Path) -> list[str]:
    accel = ["-cpu", "host", "-accel", "kvm"] if kvm_works(Arch.amd64) else ["-accel", "tcg"]
    return ["qemu-system-x86_64", "-m", "8G", "-smp", "4", *accel, "-vga", "virtio", "-smbios", "type=0,uefi=on",
            "-drive", f"if=pflash,unit=0,readonly=on,file={OVMF_CODE},format=raw",
            "-drive", f"file={image}",
            "-display", "none", "-serial", "stdio"]


@pytest.mark.parametrize("fixture", ["console_openrc_image_amd64", "console_image_amd64"])
def test_console_image_boots_with_gentoos_command_line(fixture: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path) -> None:
    require_tools("qemu-system-x86_64")
    if not OVMF_CODE.is_file():
        pytest.fail(f"{OVMF_CODE} is missing (Debian's ovmf package; ci/setup installs it)")
    built: Path = request.getfixturevalue(fixture)
    image = tmp_path / built.name  # the FAQ's command line writes to the image: boot a copy
    shutil.copyfile(built, image)
    before = qemu_processes()
    command = faq_command(image)
    log = (tmp_path / "console.log").open("w")
    child = pexpect.spawn(command[0], command[1:], encoding="utf-8", codec_errors="replace", timeout=600,
                          dimensions=(50, 200))
    child.logfile_read = log
    try:
        child.expect("login: ")
        child.sendline("root")
        child.expect("# ")
        # The FAQ's disk is an AHCI disk: the root is on sda, not vda.
        child.sendline("echo root=$(findmnt -no SOURCE,FSTYPE /) boot=$(findmnt -no FSTYPE /boot) cpus=$(nproc)")
        child.expect(r"root=(\S+) (\S+) boot=(\S+) cpus=(\d+)", timeout=60)
        source, fstype, boot, cpus = child.match.groups()
        child.sendline("poweroff")
        child.expect(pexpect.EOF, timeout=300)
    finally:
        child.close(force=True)
        log.close()
    assert (source, fstype, boot, cpus) == ("/dev/sda2", "xfs", "vfat", "4"), (tmp_path / "console.log").read_text()[-3000:]
    assert qemu_processes() - before == set(), "QEMU outlived the guest's poweroff"
