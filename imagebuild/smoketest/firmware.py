"""Find UEFI firmware (edk2) for a QEMU machine the way libvirt does: through the
QEMU firmware descriptors (docs/interop/firmware.json), with well-known paths as a fallback.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from imagebuild.config import Arch
from imagebuild.errors import SmokeTestError
from imagebuild.log import logger
from imagebuild.run import find_tool, run

# The machine type each architecture is tested on (an alias QEMU resolves to a versioned name).
MACHINE_ALIAS: dict[Arch, str] = {Arch.amd64: "q35", Arch.arm64: "virt", Arch.riscv64: "virt"}

# Features that make a firmware unusable for an unattended boot of an unsigned-key image:
# Secure Boot with enrolled keys would refuse GRUB, and requires-smm needs -machine smm=on.
EXCLUDED_FEATURES = frozenset({"secure-boot", "enrolled-keys", "requires-smm"})

FIRMWARE_PACKAGES: dict[Arch, tuple[str, str]] = {
    Arch.amd64: ("ovmf", "sys-firmware/edk2-bin"),
    Arch.arm64: ("qemu-efi-aarch64", "sys-firmware/edk2-bin"),
    Arch.riscv64: ("u-boot-qemu opensbi", "dev-embedded/u-boot-tools sys-firmware/opensbi"),
}

# Known (code, vars template) pairs for hosts without usable descriptors, in order of preference.
KNOWN_FIRMWARE: dict[Arch, tuple[tuple[str, str], ...]] = {
    Arch.amd64: (
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),  # Debian 12+
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),  # older Debian/Ubuntu
        (  # Gentoo sys-firmware/edk2-bin
            "/usr/share/edk2/OvmfX64/OVMF_CODE_4M.qcow2",
            "/usr/share/edk2/OvmfX64/OVMF_VARS_4M.qcow2",
        ),
        ("/usr/share/edk2-ovmf/OVMF_CODE.fd", "/usr/share/edk2-ovmf/OVMF_VARS.fd"),  # old Gentoo
        ("/usr/share/edk2/ovmf/OVMF_CODE_4M.qcow2", "/usr/share/edk2/ovmf/OVMF_VARS_4M.qcow2"),
        ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),  # Fedora
        ("/usr/share/edk2/x64/OVMF_CODE.4m.fd", "/usr/share/edk2/x64/OVMF_VARS.4m.fd"),  # Arch
        ("/usr/share/qemu/edk2-x86_64-code.fd", "/usr/share/qemu/edk2-i386-vars.fd"),  # upstream
    ),
    Arch.arm64: (
        ("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),  # Debian
        (  # Gentoo sys-firmware/edk2-bin
            "/usr/share/edk2/ArmVirtQemu-AARCH64/QEMU_EFI.qcow2",
            "/usr/share/edk2/ArmVirtQemu-AARCH64/QEMU_VARS.qcow2",
        ),
        (  # Fedora
            "/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw",
            "/usr/share/edk2/aarch64/vars-template-pflash.raw",
        ),
        ("/usr/share/edk2/aarch64/QEMU_CODE.fd", "/usr/share/edk2/aarch64/QEMU_VARS.fd"),  # Arch
        ("/usr/share/qemu/edk2-aarch64-code.fd", "/usr/share/qemu/edk2-arm-vars.fd"),  # upstream
    ),
    Arch.riscv64: (
        ("/usr/share/qemu-efi-riscv64/RISCV_VIRT_CODE.fd", "/usr/share/qemu-efi-riscv64/RISCV_VIRT_VARS.fd"),  # Debian 13
        ("/usr/share/edk2/riscv/RISCV_VIRT_CODE.fd", "/usr/share/edk2/riscv/RISCV_VIRT_VARS.fd"),  # Fedora
        ("/usr/share/qemu/edk2-riscv-code.fd", "/usr/share/qemu/edk2-riscv-vars.fd"),  # upstream
    ),
}

# riscv64 where QEMU cannot run edk2: U-Boot's UEFI, built for S-mode and loaded as the
# "kernel" that OpenSBI (the M-mode firmware, -bios) jumps to. (U-Boot, OpenSBI) pairs.
KNOWN_UBOOT: dict[Arch, tuple[tuple[str, str], ...]] = {
    Arch.riscv64: (
        ("/usr/lib/u-boot/qemu-riscv64_smode/u-boot.bin",
         "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.bin"),  # Debian u-boot-qemu, opensbi
    ),
}
# The first QEMU whose riscv64 "virt" board runs edk2 from pflash0 in S-mode behind its
# OpenSBI. QEMU 7.2 (Debian 12) printed nothing at all with Debian 13's edk2 2025.02 in
# pflash0, with its own OpenSBI 1.1 or with OpenSBI 1.6 as -bios; U-Boot boots there.
RISCV_EDK2_QEMU = (8, 1)


@dataclasses.dataclass(frozen=True)
class Firmware:
    """UEFI firmware for the test machine: a split edk2 build (read-only code flash and the
    template its per-run VARS copy comes from), or U-Boot's UEFI that ``opensbi`` loads
    (riscv64 on a QEMU that cannot run edk2; it keeps no variables)."""

    code: Path
    vars_template: Path | None
    format: str  # "raw" or "qcow2", the same for code and vars
    source: str  # the descriptor file or "known path", for logs and results
    opensbi: Path | None = None

    @property
    def name(self) -> str:
        return "edk2" if self.opensbi is None else "U-Boot (UEFI) on OpenSBI"

    def vars_copy_in(self, directory: Path) -> Path | None:
        """Where a run in ``directory`` keeps its copy of the variable store (None: no store)."""
        return None if self.vars_template is None else directory / f"vars.{self.format}"

    def copy_vars(self, directory: Path) -> Path | None:
        """This run's own copy of the variable store (None for firmware that keeps none)."""
        copy = self.vars_copy_in(directory)
        if copy is not None and self.vars_template is not None:
            shutil.copyfile(self.vars_template, copy)
        return copy

    def qemu_args(self, vars_copy: Path | None) -> list[str]:
        """How QEMU loads it: two pflash drives for edk2, ``-bios`` and ``-kernel`` for U-Boot."""
        if self.opensbi is not None:
            return ["-bios", escape(self.opensbi), "-kernel", escape(self.code)]
        if vars_copy is None:
            raise ValueError("edk2 needs its VARS copy")
        return [
            "-drive", f"if=pflash,unit=0,format={self.format},readonly=on,file={escape(self.code)}",
            "-drive", f"if=pflash,unit=1,format={self.format},file={escape(vars_copy)}",
        ]  # fmt: skip


def check_sector_size(firmware: Firmware, arch: Arch, sector_size: int) -> None:
    """Refuse, before anything is built or booted, a disk the firmware cannot read."""
    if firmware.opensbi is not None and sector_size != 512:
        raise SmokeTestError(
            f"a {arch} image with {sector_size}-byte sectors cannot be boot-tested on this host: the "
            f"only UEFI firmware its QEMU runs for {arch} is U-Boot ({firmware.code}), whose virtio "
            "disk driver reads 512-byte sectors only (it stops at its prompt with nothing to boot)",
            hint="build it with --no-test, or boot-test it where QEMU 8.1 or later runs edk2 for riscv64",
        )


def escape(path: Path) -> str:
    """A path as a QEMU option value (a comma is written twice)."""
    return str(path).replace(",", ",,")


def descriptor_dirs() -> list[Path]:
    """The descriptor directories in increasing priority, as QEMU's firmware.json defines them."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [
        Path("/usr/share/qemu/firmware"),
        Path("/etc/qemu/firmware"),
        Path(config_home) / "qemu" / "firmware",
    ]


@functools.cache
def qemu_version(qemu_binary: str) -> tuple[int, int]:
    """(major, minor) of ``qemu_binary`` ("QEMU emulator version 7.2.22 (Debian ...)")."""
    output = run([qemu_binary, "--version"]).stdout.decode(errors="replace")
    match = re.search(r"version (\d+)\.(\d+)", output)
    if match is None:
        raise SmokeTestError(f"cannot tell the version of {qemu_binary} from: {output.strip()[:200]}")
    return int(match.group(1)), int(match.group(2))


@functools.cache
def resolve_machine(qemu_binary: str, alias: str) -> str:
    """Turn a machine alias (``q35``, ``virt``) into the versioned name QEMU maps it to."""
    output = run([qemu_binary, "-machine", "help"]).stdout.decode(errors="replace")
    for line in output.splitlines():
        name, _, rest = line.strip().partition(" ")
        if name != alias:
            continue
        match = re.search(r"\(alias of ([^)\s]+)\)", rest)
        return match.group(1) if match else alias
    raise SmokeTestError(
        f"{qemu_binary} does not know the machine type '{alias}'",
        hint=f"check '{qemu_binary} -machine help'; the QEMU build may lack this board",
    )


def find_firmware(
    arch: Arch,
    *,
    machine: str | None = None,
    search_dirs: Sequence[Path] | None = None,
    known_paths: Sequence[tuple[str, str]] | None = None,
    edk2: bool | None = None,
    known_uboot: Sequence[tuple[str, str]] | None = None,
) -> Firmware:
    """Pick the non-Secure-Boot UEFI firmware for ``arch`` on ``machine``.

    ``machine`` is the versioned machine name (``pc-q35-7.2``); by default it is resolved from
    the arch's alias through ``qemu-system-* -machine help``. ``search_dirs`` and
    ``known_paths`` default to the host's descriptor directories and KNOWN_FIRMWARE. ``edk2``
    says whether QEMU can run edk2 (by default: yes, but for riscv64 before RISCV_EDK2_QEMU);
    where it cannot, or none is installed, U-Boot's UEFI on OpenSBI (``known_uboot``, by default
    KNOWN_UBOOT) is the fallback.
    """
    dirs = list(descriptor_dirs() if search_dirs is None else search_dirs)
    known = KNOWN_FIRMWARE[arch] if known_paths is None else known_paths
    if machine is None:
        machine = resolve_machine(find_tool(arch.qemu_system), MACHINE_ALIAS[arch])
    if edk2 is None:
        edk2 = arch is not Arch.riscv64 or qemu_version(find_tool(arch.qemu_system)) >= RISCV_EDK2_QEMU

    for path in _descriptor_files(dirs) if edk2 else []:
        firmware = _firmware_from_descriptor(path, arch, machine)
        if firmware is not None:
            logger.debug("using firmware %s (descriptor %s)", firmware.code, path)
            return firmware

    for code, template in known if edk2 else []:
        if Path(code).is_file() and Path(template).is_file():
            fmt = "qcow2" if code.endswith(".qcow2") else "raw"
            logger.debug("using firmware %s (known path, no matching descriptor)", code)
            return Firmware(Path(code), Path(template), fmt, "known path")

    uboots = KNOWN_UBOOT.get(arch, ()) if known_uboot is None else known_uboot
    for uboot, opensbi in uboots:
        if Path(uboot).is_file() and Path(opensbi).is_file():
            logger.debug("using U-Boot %s on OpenSBI %s", uboot, opensbi)
            return Firmware(Path(uboot), None, "raw", "known path", opensbi=Path(opensbi))

    debian, gentoo = FIRMWARE_PACKAGES[arch]
    searched = (f"descriptors in {', '.join(map(str, dirs))} and the known paths "
                f"{', '.join(code for code, _ in known) or '(none)'}" if edk2
                else f"(this {arch.qemu_system} cannot run edk2 for {arch})")
    raise SmokeTestError(
        f"no UEFI firmware for {arch} ({arch.uname}, machine {machine}) found;"
        f" searched {searched}{''.join(f', U-Boot {u} with OpenSBI {o}' for u, o in uboots)}",
        hint=f"install the firmware: Debian/Ubuntu 'apt-get install {debian}',"
        f" Gentoo 'emerge {gentoo}'",
    )


def _descriptor_files(dirs: Sequence[Path]) -> list[Path]:
    """All descriptor files sorted by file name; a later directory overrides the same name."""
    by_name: dict[str, Path] = {}
    for directory in dirs:
        try:
            entries = sorted(directory.glob("*.json"))
        except OSError as exc:
            logger.warning("cannot list firmware descriptors in %s: %s", directory, exc)
            continue
        for path in entries:
            by_name[path.name] = path
    # firmware.json: an empty file in a higher-priority directory masks the lower one.
    return [by_name[name] for name in sorted(by_name) if _size(by_name[name]) != 0]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _firmware_from_descriptor(path: Path, arch: Arch, machine: str) -> Firmware | None:
    """The firmware a descriptor describes if it fits, None if it does not (or is unreadable)."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("top level is not a JSON object")
        interfaces = data.get("interface-types", [])
        features = set(data.get("features", []))
        targets = data.get("targets", [])
        mapping = data.get("mapping", {})
        if not isinstance(mapping, dict) or not isinstance(targets, list):
            raise ValueError("'mapping' or 'targets' has the wrong type")
    except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        logger.warning("skipping unreadable firmware descriptor %s: %s", path, exc)
        return None

    if "uefi" not in interfaces or features & EXCLUDED_FEATURES:
        return None
    if not any(_target_matches(target, arch, machine) for target in targets):
        return None
    # Only split flash images fit: read-only code plus a VARS template we copy per run.
    if mapping.get("device") != "flash" or mapping.get("mode", "split") != "split":
        return None
    executable = mapping.get("executable") or {}
    template = mapping.get("nvram-template") or {}
    code_name, vars_name = executable.get("filename"), template.get("filename")
    if not code_name or not vars_name:
        return None
    fmt = executable.get("format", "raw")
    if template.get("format", "raw") != fmt or fmt not in ("raw", "qcow2"):
        logger.warning("skipping firmware descriptor %s: unsupported format '%s'", path, fmt)
        return None
    code, vars_template = Path(code_name), Path(vars_name)
    if not code.is_file() or not vars_template.is_file():
        logger.warning(
            "skipping firmware descriptor %s: %s or %s does not exist", path, code, vars_template
        )
        return None
    return Firmware(code, vars_template, fmt, str(path))


def _target_matches(target: object, arch: Arch, machine: str) -> bool:
    if not isinstance(target, dict) or target.get("architecture") != arch.uname:
        return False
    return any(fnmatch.fnmatchcase(machine, glob) for glob in target.get("machines", []))
