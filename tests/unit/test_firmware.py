"""Firmware selection through QEMU firmware descriptors written to temporary directories."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from imagebuild.config import Arch
from imagebuild.errors import SmokeTestError
from imagebuild.smoketest.firmware import RISCV_EDK2_QEMU, find_firmware, qemu_version

pytestmark = pytest.mark.unit

Q35 = "pc-q35-7.2"
VIRT = "virt-7.2"


def make_firmware(root: Path, name: str, suffix: str = "fd") -> tuple[Path, Path]:
    code, template = root / f"{name}_CODE.{suffix}", root / f"{name}_VARS.{suffix}"
    code.write_bytes(b"code")
    template.write_bytes(b"vars")
    return code, template


def write_descriptor(
    directory: Path,
    file_name: str,
    code: Path,
    template: Path,
    *,
    arch: str = "x86_64",
    machines: tuple[str, ...] = ("pc-q35-*",),
    features: tuple[str, ...] = (),
    fmt: str = "raw",
    interface: str = "uefi",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = {
        "description": file_name,
        "interface-types": [interface],
        "mapping": {
            "device": "flash",
            "executable": {"filename": str(code), "format": fmt},
            "nvram-template": {"filename": str(template), "format": fmt},
        },
        "targets": [{"architecture": arch, "machines": list(machines)}],
        "features": list(features),
        "tags": [],
    }
    path = directory / file_name
    path.write_text(json.dumps(descriptor))
    return path


def test_picks_plain_uefi_over_secure_boot_even_when_sorted_first(tmp_path: Path) -> None:
    dirs = [tmp_path / "usr", tmp_path / "etc", tmp_path / "home"]
    secure = make_firmware(tmp_path, "SECURE")
    plain = make_firmware(tmp_path, "PLAIN")
    write_descriptor(dirs[0], "40-enrolled.json", *secure, features=("enrolled-keys", "secure-boot"))
    write_descriptor(dirs[0], "50-secure.json", *secure, features=("secure-boot",))
    write_descriptor(dirs[0], "55-smm.json", *secure, features=("requires-smm",))
    write_descriptor(dirs[0], "60-plain.json", *plain, features=("acpi-s3", "verbose-dynamic"))

    firmware = find_firmware(Arch.amd64, machine=Q35, search_dirs=dirs, known_paths=())

    assert firmware.code == plain[0]
    assert firmware.vars_template == plain[1]
    assert firmware.format == "raw"
    assert firmware.source == str(dirs[0] / "60-plain.json")


def test_lower_file_name_wins_and_later_directory_overrides_same_name(tmp_path: Path) -> None:
    dirs = [tmp_path / "usr", tmp_path / "etc", tmp_path / "home"]
    system = make_firmware(tmp_path, "SYSTEM")
    local = make_firmware(tmp_path, "LOCAL")
    user = make_firmware(tmp_path, "USER")
    write_descriptor(dirs[0], "60-edk2.json", *system)
    write_descriptor(dirs[1], "70-local.json", *local)
    # Sorted by file name, 60-edk2.json comes first: but the user's copy replaces the system's.
    write_descriptor(dirs[2], "60-edk2.json", *user, fmt="qcow2")

    firmware = find_firmware(Arch.amd64, machine=Q35, search_dirs=dirs, known_paths=())
    assert firmware.code == user[0]
    assert firmware.format == "qcow2"

    # An empty file of the same name masks the descriptor below it (firmware.json rule).
    (dirs[2] / "60-edk2.json").write_text("")
    firmware = find_firmware(Arch.amd64, machine=Q35, search_dirs=dirs, known_paths=())
    assert firmware.code == local[0]


def test_machine_glob_and_architecture_must_match(tmp_path: Path) -> None:
    dirs = [tmp_path / "d"]
    i440fx = make_firmware(tmp_path, "I440FX")
    aavmf = make_firmware(tmp_path, "AAVMF")
    ovmf = make_firmware(tmp_path, "OVMF")
    write_descriptor(dirs[0], "10-i440fx.json", *i440fx, machines=("pc-i440fx-*",))
    write_descriptor(dirs[0], "20-aarch64.json", *aavmf, arch="aarch64", machines=("virt-*",))
    write_descriptor(dirs[0], "30-q35.json", *ovmf, machines=("pc-i440fx-*", "pc-q35-*"))

    assert find_firmware(Arch.amd64, machine=Q35, search_dirs=dirs, known_paths=()).code == ovmf[0]
    assert find_firmware(Arch.arm64, machine=VIRT, search_dirs=dirs, known_paths=()).code == aavmf[0]
    # The alias itself does not match the versioned glob: callers must resolve it first.
    with pytest.raises(SmokeTestError):
        find_firmware(Arch.arm64, machine="virt", search_dirs=dirs, known_paths=())


def test_bad_and_unusable_descriptors_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dirs = [tmp_path / "d"]
    dirs[0].mkdir()
    good = make_firmware(tmp_path, "GOOD")
    (dirs[0] / "10-broken.json").write_text("{ this is not json")
    (dirs[0] / "20-list.json").write_text("[1, 2]")
    write_descriptor(dirs[0], "30-missing.json", tmp_path / "nope.fd", tmp_path / "nope_vars.fd")
    write_descriptor(dirs[0], "40-bios.json", *good, interface="bios")
    write_descriptor(dirs[0], "50-good.json", *good)

    with caplog.at_level(logging.WARNING, logger="imagebuild"):
        firmware = find_firmware(Arch.amd64, machine=Q35, search_dirs=dirs, known_paths=())

    assert firmware.code == good[0]
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "10-broken.json" in warnings
    assert "20-list.json" in warnings
    assert "30-missing.json" in warnings
    assert "50-good.json" not in warnings


def test_known_paths_are_the_fallback(tmp_path: Path) -> None:
    dirs = [tmp_path / "empty"]
    code, template = make_firmware(tmp_path, "OVMF", suffix="qcow2")
    known = [(str(tmp_path / "absent_CODE.fd"), str(tmp_path / "absent_VARS.fd")),
             (str(code), str(template))]  # fmt: skip

    firmware = find_firmware(Arch.amd64, machine=Q35, search_dirs=dirs, known_paths=known)

    assert (firmware.code, firmware.vars_template, firmware.format) == (code, template, "qcow2")
    assert firmware.source == "known path"


def test_no_firmware_names_arch_places_and_package(tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    secure = make_firmware(tmp_path, "SECURE")
    write_descriptor(dirs[0], "50-secure.json", *secure, arch="aarch64", machines=("virt-*",),
                     features=("secure-boot",))  # fmt: skip
    known = [(str(tmp_path / "QEMU_EFI.qcow2"), str(tmp_path / "QEMU_VARS.qcow2"))]

    with pytest.raises(SmokeTestError) as info:
        find_firmware(Arch.arm64, machine=VIRT, search_dirs=dirs, known_paths=known)

    text = str(info.value)
    assert "arm64" in text and "aarch64" in text
    assert str(dirs[0]) in text and str(dirs[1]) in text
    assert str(tmp_path / "QEMU_EFI.qcow2") in text
    assert "qemu-efi-aarch64" in text and "sys-firmware/edk2-bin" in text


def test_host_firmware_is_found_through_the_real_descriptors() -> None:
    """On a host with ovmf installed the system descriptors give the non-secure-boot build."""
    if not Path("/usr/share/qemu/firmware/60-edk2-x86_64.json").exists():
        pytest.skip("ovmf descriptors not installed")
    firmware = find_firmware(Arch.amd64, machine=Q35)
    assert firmware.code.name == "OVMF_CODE_4M.fd"
    assert firmware.vars_template.name == "OVMF_VARS_4M.fd"


RV_VIRT = "virt"  # QEMU 7.2's riscv64 board has no versioned names


def test_riscv64_takes_edk2_where_qemu_runs_it_and_u_boot_on_opensbi_otherwise(tmp_path: Path) -> None:
    dirs = [tmp_path / "usr"]
    edk2 = make_firmware(tmp_path, "RISCV_VIRT")
    write_descriptor(dirs[0], "60-edk2-riscv64.json", *edk2, arch="riscv64", machines=("virt*",))
    uboot, opensbi = tmp_path / "u-boot.bin", tmp_path / "fw_jump.bin"
    uboot.write_bytes(b"u-boot")
    opensbi.write_bytes(b"opensbi")
    pair = [(str(uboot), str(opensbi))]

    newer = find_firmware(Arch.riscv64, machine=RV_VIRT, search_dirs=dirs, known_paths=[], edk2=True,
                          known_uboot=pair)
    assert (newer.code, newer.name) == (edk2[0], "edk2")
    assert newer.qemu_args(tmp_path / "vars.fd")[:2] == [
        "-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={edk2[0]}"]

    # QEMU 7.2 (Debian 12): the same descriptor is passed over, and U-Boot boots the image.
    older = find_firmware(Arch.riscv64, machine=RV_VIRT, search_dirs=dirs, known_paths=[], edk2=False,
                          known_uboot=pair)
    assert older.name == "U-Boot (UEFI) on OpenSBI"
    assert older.qemu_args(older.copy_vars(tmp_path)) == ["-bios", str(opensbi), "-kernel", str(uboot)]
    assert older.vars_copy_in(tmp_path) is None and not (tmp_path / "vars.raw").exists()


def test_no_riscv64_firmware_names_u_boot_and_opensbi(tmp_path: Path) -> None:
    with pytest.raises(SmokeTestError) as info:
        find_firmware(Arch.riscv64, machine=RV_VIRT, search_dirs=[tmp_path], known_paths=[], edk2=False,
                      known_uboot=[(str(tmp_path / "u-boot.bin"), str(tmp_path / "fw_jump.bin"))])
    text = str(info.value)
    assert "cannot run edk2" in text and "u-boot.bin" in text
    assert "u-boot-qemu opensbi" in text


def test_qemu_version_is_read_from_the_binary(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-riscv64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)'\n")
    fake.chmod(0o755)
    assert qemu_version(str(fake)) == (7, 2) < RISCV_EDK2_QEMU
