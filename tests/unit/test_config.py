from __future__ import annotations

import pytest

from imagebuild.config import Arch, GiB, ImageLayout, MiB, Variant, parse_size
from imagebuild.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, size", [("20GiB", 20 * GiB), ("20G", 20 * GiB), ("512MiB", 512 * MiB),
                                        ("512M", 512 * MiB), ("4096", 4096), ("1.5GiB", 3 * GiB // 2),
                                        ("10GB", 10 * 1000**3)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "20 parsecs", "-1G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        parse_size(text)


def test_arch_and_variant_names() -> None:
    assert Arch.parse("arm64").efi_binary == "BOOTAA64.EFI"
    assert Arch.parse("amd64").serial_console == "ttyS0"
    assert Variant.parse("cloudinit") is Variant.cloudinit
    assert Variant.cloudinit.file_part == "cloudinit"
    with pytest.raises(ConfigError, match="unknown architecture 'sparc64'") as info:
        Arch.parse("sparc64")
    assert "amd64, arm64, riscv64" in str(info.value)
    # Gentoo's names: the keyword (releases/riscv/) and releng's subarch (di-rv64_lp64d-*).
    assert Arch.parse("riscv") is Arch.parse("rv64_lp64d") is Arch.riscv64
    assert (Arch.riscv64.gentoo, Arch.riscv64.gentoo_dir) == ("rv64_lp64d", "riscv")
    assert Arch.riscv64.efi_binary == "BOOTRISCV64.EFI" and Arch.riscv64.grub_target == "riscv64-efi"
    with pytest.raises(ConfigError, match="unknown image variant 'desktop'"):
        Variant.parse("desktop")


def test_layout_validation() -> None:
    ImageLayout().validate()
    with pytest.raises(ConfigError, match="sector size 1024"):
        ImageLayout(sector_size=1024).validate()
    with pytest.raises(ConfigError, match="no room for a root"):
        ImageLayout(size=600 * MiB).validate()
    with pytest.raises(ConfigError, match="'ext4'"):
        ImageLayout(root_fstype="ext4").validate()
    ImageLayout(sector_size=4096).validate()
    ImageLayout(sector_size=512, esp_size=128 * MiB).validate()
    with pytest.raises(ConfigError, match="too small for FAT32 with 4096-byte sectors"):
        ImageLayout(sector_size=4096, esp_size=128 * MiB).validate()
