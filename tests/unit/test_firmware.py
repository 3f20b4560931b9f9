"""Firmware selection through QEMU firmware descriptors written to temporary directories."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from imagebuild.config import Arch
from imagebuild.errors import SmokeTestError
from imagebuild.smoketest.firmware import find_firmware

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
