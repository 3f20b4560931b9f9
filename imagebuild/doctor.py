"""``imagebuild doctor``: which host tools and kernel features the build and smoke test need,
which are here, and the Debian and Gentoo packages that provide the missing ones."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from imagebuild.config import Arch
from imagebuild.errors import ImagebuildError
from imagebuild.run import HOST_TOOLS


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    found: bool
    detail: str
    debian: str = ""
    gentoo: str = ""
    required: bool = True


def _features() -> list[tuple[str, Callable[[], tuple[bool, str]], str, str, bool]]:
    return [
        ("loop devices", _loop_devices, "(kernel: CONFIG_BLK_DEV_LOOP)", "(kernel: CONFIG_BLK_DEV_LOOP)", True),
        ("root", lambda: (os.geteuid() == 0, "running as root" if os.geteuid() == 0 else "not root: "
                          "loop devices, mounts and chroot need root"), "", "", True),
        ("edk2 firmware amd64", lambda: _firmware(Arch.amd64), "ovmf", "sys-firmware/edk2-bin", True),
        ("edk2 firmware arm64", lambda: _firmware(Arch.arm64), "qemu-efi-aarch64", "sys-firmware/edk2-bin", True),
        ("UEFI firmware riscv64", lambda: _firmware(Arch.riscv64), "u-boot-qemu opensbi",
         "sys-firmware/edk2-bin", False),
        ("binfmt for arm64", lambda: _binfmt(Arch.arm64), "qemu-user-static binfmt-support",
         "app-emulation/qemu[static-user,qemu_user_targets_aarch64]", False),
        ("binfmt for riscv64", lambda: _binfmt(Arch.riscv64), "qemu-user-static binfmt-support",
         "app-emulation/qemu[static-user,qemu_user_targets_riscv64]", False),
        ("KVM", _kvm, "(host: /dev/kvm)", "(host: /dev/kvm)", False),
    ]


def _loop_devices() -> tuple[bool, str]:
    ok = Path("/dev/loop-control").exists()
    return ok, "/dev/loop-control present" if ok else "no /dev/loop-control (modprobe loop)"


def _firmware(arch: Arch) -> tuple[bool, str]:
    from imagebuild.smoketest.firmware import find_firmware

    try:
        firmware = find_firmware(arch)
    except ImagebuildError as exc:
        return False, exc.message
    return True, f"{firmware.name}: {firmware.code}"


def _binfmt(arch: Arch) -> tuple[bool, str]:
    """What a build checks before it runs a foreign stage's programs (chroot.check_can_execute)."""
    from imagebuild.chroot import check_can_execute

    if Arch.host() is arch:
        return True, f"native {arch} host"
    try:
        check_can_execute(arch)
    except ImagebuildError as exc:
        return False, exc.message
    return True, f"qemu-{arch.uname} registered and enabled"


def _kvm() -> tuple[bool, str]:
    from imagebuild.smoketest.qemu import kvm_works

    host = Arch.host()
    if host is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm: smoke tests run under TCG (slower)"
    try:
        works = kvm_works(host)
    except ImagebuildError as exc:
        return False, exc.message
    return works, "a KVM guest runs" if works else "/dev/kvm opens but QEMU fails under KVM: TCG is used"


def diagnose() -> list[Finding]:
    findings = []
    for name, tool in HOST_TOOLS.items():
        path = shutil.which(name)
        findings.append(Finding(name, path is not None, path or f"missing — needed for {tool.why}", tool.debian,
                                tool.gentoo, required=not tool.optional))
    for name, probe, debian, gentoo, required in _features():
        ok, detail = probe()
        findings.append(Finding(name, ok, detail, debian, gentoo, required))
    return findings


def report(findings: list[Finding]) -> str:
    width = max(len(f.name) for f in findings)
    lines = []
    for f in findings:
        status = "found  " if f.found else ("MISSING" if f.required else "absent ")
        line = f"{status}  {f.name:<{width}}  {f.detail}"
        if not f.found and (f.debian or f.gentoo):
            line += f"\n{'':{9 + width}}  Debian: {f.debian or '-'}   Gentoo: {f.gentoo or '-'}"
        lines.append(line)
    missing = [f.name for f in findings if f.required and not f.found]
    lines.append("everything needed is here" if not missing else f"missing: {', '.join(missing)} (ci/setup installs them on Debian)")
    return "\n".join(lines)
