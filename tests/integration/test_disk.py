"""The disk layout with the real tools on sparse files: pyparted, sfdisk, mkfs, mtools, loop mounts
(and sgdisk, a third tool, to verify the GPT)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from imagebuild.config import Arch, ImageLayout, MiB
from imagebuild.disk import (
    DPS_ROOT_TYPE,
    Identifiers,
    check_fits,
    make_esp,
    make_root,
    partition_image,
    root_filesystem,
)
from imagebuild.errors import ImageError
from imagebuild.imagefs import gpt_sector_size

from conftest import attached, loop_devices, mounts_under, require_root, require_tools

pytestmark = pytest.mark.integration

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_root()
    require_tools("sgdisk", "sfdisk", "mkfs.vfat", "mkfs.xfs", "mcopy", "mdir", "losetup", "blkid")


def _sfdisk(raw: Path, sector: int) -> dict:
    with attached(raw, sector=sector, read_only=True) as loop:
        out = subprocess.run(["sfdisk", "--json", loop], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]


@pytest.mark.parametrize("sector", [512, 4096])
def test_partition_table(tmp_path: Path, sector: int) -> None:
    raw = tmp_path / "disk.raw"
    layout = ImageLayout(size=2048 * MiB, sector_size=sector)
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        ids = Identifiers.make("di-amd64-console-x.qcow2")
        again = Identifiers.make("di-amd64-console-x.qcow2")
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    assert ids == again, "identifiers must be reproducible under SOURCE_DATE_EPOCH"
    disk = partition_image(raw, layout, Arch.amd64, ids)
    assert raw.stat().st_size == 2048 * MiB
    assert raw.stat().st_blocks * 512 < 4 * MiB, "the raw image must stay sparse"
    assert loop_devices(tmp_path) == set(), "the loop device used to write the GPT must be detached"
    with open(raw, "rb") as f:
        assert gpt_sector_size(f.read(8192)) == sector, "the GPT header must sit in LBA 1"
    table = _sfdisk(raw, sector)
    assert table["label"] == "gpt" and table["sectorsize"] == sector
    assert table["id"].lower() == ids.disk_guid
    esp, root = table["partitions"]
    mib = MiB // sector
    assert (esp["start"], esp["size"]) == (mib, 512 * mib)
    assert esp["type"] == ESP_TYPE and esp["name"] == "gentooefi"
    assert esp["uuid"].lower() == ids.esp_guid
    assert root["type"] == DPS_ROOT_TYPE[Arch.amd64] and root["name"] == "gentooroot"
    assert root["start"] == esp["start"] + esp["size"]
    assert root["start"] % mib == 0 and (root["start"] + root["size"]) % mib == 0
    assert disk.root.offset == root["start"] * sector and disk.root.size == root["size"] * sector
    # Another tool than the two that wrote it finds both GPTs and their CRCs right.
    with attached(raw, sector=sector, read_only=True) as loop:
        verified = subprocess.run(["sgdisk", "--verify", loop], capture_output=True, text=True)
    assert verified.returncode == 0 and "No problems found" in verified.stdout, verified.stdout


@pytest.mark.parametrize("sector", [512, 4096])
def test_filesystems_are_made_and_filled(tmp_path: Path, sector: int) -> None:
    raw = tmp_path / "disk.raw"
    # FAT32 with 4096-byte sectors needs a bigger ESP (ImageLayout.validate says so).
    layout = ImageLayout(size=1024 * MiB, esp_size=(128 if sector == 512 else 264) * MiB, sector_size=sector)
    layout.validate()
    ids = Identifiers.make("test.qcow2")
    disk = partition_image(raw, layout, Arch.arm64, ids)
    esp_tree = tmp_path / "esp"
    (esp_tree / "EFI/BOOT").mkdir(parents=True)
    (esp_tree / "EFI/BOOT/BOOTAA64.EFI").write_bytes(b"MZ" + b"\0" * 4000)
    (esp_tree / "grub").mkdir()
    (esp_tree / "grub/grub.cfg").write_text("set timeout=1\n")
    root_tree = tmp_path / "root"
    (root_tree / "usr/bin").mkdir(parents=True)
    (root_tree / "usr/bin/ping").write_bytes(b"ping")
    os.setxattr(root_tree / "usr/bin/ping", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.link(root_tree / "usr/bin/ping", root_tree / "usr/bin/ping6")
    (root_tree / "bin").symlink_to("usr/bin")
    (root_tree / "boot").mkdir()
    make_esp(raw, disk.esp, layout, ids, esp_tree)
    make_root(raw, disk.root, layout, ids)
    before = raw.stat().st_blocks
    with root_filesystem(raw, disk.root, layout, tmp_path / "mnt") as mnt:
        subprocess.run(["cp", "-a", f"{root_tree}/.", mnt], check=True)
        # What the build deletes (the kernel moved to the ESP, caches) must not ship: 64 MiB of
        # data that does not compress, deleted, may not stay allocated in the sparse raw file.
        (mnt / "deleted").write_bytes(os.urandom(64 * MiB))
        os.sync()
        (mnt / "deleted").unlink()
    grown = (raw.stat().st_blocks - before) * 512
    assert grown < 24 * MiB, f"the raw image kept {grown // MiB} MiB after a 64 MiB file was deleted"
    assert loop_devices(tmp_path) == set(), "loop devices must be detached"
    assert mounts_under(tmp_path) == []

    listing = subprocess.run(["mdir", "-/", "-b", "-i", f"{raw}@@{disk.esp.offset}", "::/"],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout
    assert "::/EFI/BOOT/BOOTAA64.EFI" in listing and "::/grub/grub.cfg" in listing
    esp_info = subprocess.run(["blkid", "-p", "-O", str(disk.esp.offset), "-o", "export", str(raw)],
                              capture_output=True, text=True, check=True).stdout
    assert "LABEL=gentooefi" in esp_info and "TYPE=vfat" in esp_info and f"UUID={ids.esp_uuid}" in esp_info
    root_info = subprocess.run(["blkid", "-p", "-O", str(disk.root.offset), "-o", "export", str(raw)],
                               capture_output=True, text=True, check=True).stdout
    assert "LABEL=gentooroot" in root_info and "TYPE=xfs" in root_info and f"UUID={ids.root_uuid}" in root_info

    with open(raw, "rb") as f:
        f.seek(disk.esp.offset + 11)  # the FAT boot sector's bytes-per-sector field
        assert int.from_bytes(f.read(2), "little") == sector

    mnt = tmp_path / "check"
    mnt.mkdir()
    with attached(raw, sector=sector, read_only=True, offset=disk.root.offset, size=disk.root.size) as loop:
        subprocess.run(["mount", "-o", "ro", loop, str(mnt)], check=True)
        try:
            assert (mnt / "usr/bin/ping").stat().st_ino == (mnt / "usr/bin/ping6").stat().st_ino
            assert os.getxattr(mnt / "usr/bin/ping", "security.capability")[:4] == bytes.fromhex("01000002")
            assert os.readlink(mnt / "bin") == "usr/bin"
            assert (mnt / "boot").is_dir() and not any((mnt / "boot").iterdir())
            info = subprocess.run(["xfs_info", str(mnt)], capture_output=True, text=True, check=True).stdout
            assert f"sectsz={sector} " in info
        finally:
            subprocess.run(["umount", str(mnt)], check=True)


def test_tree_too_big_for_the_partition(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="needs about 2048 MiB but the partition holds only 1024 MiB") as info:
        check_fits("root filesystem", 2048 * MiB, 1024 * MiB, "--size")
    assert "--size" in str(info.value)
