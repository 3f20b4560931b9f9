"""What a built amd64 console image holds, read back offline from the qcow2 with real tools."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_tools
from imagebuild.disk import DPS_ROOT_TYPE
from imagebuild.config import Arch

pytestmark = pytest.mark.integration

MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


@pytest.fixture(scope="module")
def raw_image(console_image_amd64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools("qemu-img", "sfdisk", "mtype")
    raw = tmp_path_factory.mktemp("raw") / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(console_image_amd64), str(raw)], check=True)
    return raw


@pytest.fixture(scope="module")
def partitions(raw_image: Path) -> list[dict]:
    out = subprocess.run(["sfdisk", "--json", str(raw_image)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["partitiontable"]["partitions"]


@pytest.fixture(scope="module")
def root_fs(raw_image: Path, partitions: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = partitions[1]
    mnt = tmp_path_factory.mktemp("rootfs")
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "--offset", str(root["start"] * 512),
                           "--sizelimit", str(root["size"] * 512), str(raw_image)],
                          capture_output=True, text=True, check=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro,norecovery", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def esp_file(raw: Path, partitions: list[dict], path: str) -> str:
    image = f"{raw}@@{partitions[0]['start'] * 512}"
    return subprocess.run(["mtype", "-i", image, f"::{path}"], capture_output=True, text=True,
                          check=True, env=MTOOLS_ENV).stdout


def test_partition_types_and_names(partitions: list[dict]) -> None:
    esp, root = partitions
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" and esp["name"] == "gentooefi"
    assert esp["size"] * 512 == 512 * 2**20
    assert root["type"] == DPS_ROOT_TYPE[Arch.amd64] and root["name"] == "gentooroot"


def test_grub_boots_a_kernel_that_exists(raw_image: Path, partitions: list[dict]) -> None:
    config = esp_file(raw_image, partitions, "/grub/grub.cfg")
    linux = next(line.split() for line in config.splitlines() if line.strip().startswith("linux "))
    initrd = next(line.split() for line in config.splitlines() if line.strip().startswith("initrd "))
    assert "root=LABEL=gentooroot" in linux and "console=ttyS0" in linux and linux[-1] == "console=tty0"
    listing = subprocess.run(["mdir", "-b", "-/", "-i", f"{raw_image}@@{partitions[0]['start'] * 512}", "::/"],
                             capture_output=True, text=True, check=True, env=MTOOLS_ENV).stdout.splitlines()
    assert f"::{linux[1]}" in listing and f"::{initrd[1]}" in listing
    assert "::/EFI/BOOT/BOOTX64.EFI" in listing
    assert "::/grub/x86_64-efi/normal.mod" in listing
    efi = subprocess.run(["mtype", "-i", f"{raw_image}@@{partitions[0]['start'] * 512}", "::/EFI/BOOT/BOOTX64.EFI"],
                         capture_output=True, check=True, env=MTOOLS_ENV).stdout
    assert efi[:2] == b"MZ", "BOOTX64.EFI must be a PE/COFF executable"


def test_console_variant_configuration(root_fs: Path) -> None:
    fstab = [line.split() for line in (root_fs / "etc/fstab").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert ["LABEL=gentooroot", "/", "xfs", "noatime,rw", "0", "1"] in fstab
    assert ["LABEL=gentooefi", "/boot", "vfat", "defaults", "1", "2"] in fstab
    shadow = dict(line.split(":", 2)[:2] for line in (root_fs / "etc/shadow").read_text().splitlines())
    assert shadow["root"] == "", "the console variant's root password must be empty"
    wants = root_fs / "etc/systemd/system/getty.target.wants"
    assert (wants / "serial-getty@ttyS0.service").is_symlink()
    enabled = {p.name for p in (root_fs / "etc/systemd/system").rglob("*") if p.is_symlink()}
    assert not enabled & {"ssh.service", "sshd.service", "systemd-networkd.service"}
    assert (root_fs / "etc/systemd/network/80-imagebuild-dhcp.network").read_text().count("DHCP=yes") == 1
    assert (root_fs / "etc/cloud/cloud-init.disabled").exists()
    assert "GRUB_CMDLINE_LINUX=\"console=ttyS0 console=tty0\"" in (root_fs / "etc/default/grub").read_text()
    assert list((root_fs / "boot").iterdir()) == []


def test_hygiene(root_fs: Path) -> None:
    assert (root_fs / "etc/machine-id").read_text() == ""
    assert list((root_fs / "etc/ssh").glob("ssh_host_*")) == []
    assert not (root_fs / "root/.bash_history").exists()
    assert list((root_fs / "tmp").iterdir()) == [] and list((root_fs / "var/tmp").iterdir()) == []
    assert (root_fs / "etc/hostname").read_text().strip() != os.uname().nodename or os.uname().nodename == "localhost"
    assert "STAND-IN" in (root_fs / "etc/imagebuild-standin").read_text()


def test_digests_contents_and_manifest(console_image_amd64: Path) -> None:
    digests = console_image_amd64.with_name(console_image_amd64.name + ".DIGESTS").read_text().splitlines()
    data = console_image_amd64.read_bytes()
    assert digests[:4] == ["# BLAKE2B HASH", f"{hashlib.blake2b(data).hexdigest()}  {console_image_amd64.name}",
                           "# SHA512 HASH", f"{hashlib.sha512(data).hexdigest()}  {console_image_amd64.name}"]
    contents = gzip.decompress(console_image_amd64.with_name(console_image_amd64.name + ".CONTENTS.gz")
                               .read_bytes()).decode()
    assert " /boot/EFI/BOOT/BOOTX64.EFI\n" in contents and " /etc/fstab\n" in contents
    manifest = json.loads(console_image_amd64.with_name(console_image_amd64.name + ".manifest.json").read_text())
    assert manifest["arch"] == "amd64" and manifest["variant"] == "console"
    assert manifest["digests"][console_image_amd64.name]["SHA512"] == hashlib.sha512(data).hexdigest()
    assert any("XFS" in step for step in manifest["step_seconds"])
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(console_image_amd64)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 20 * 2**30
    assert info["format-specific"]["data"]["compression-type"] == "zlib"
    assert not list(console_image_amd64.parent.glob(".*partial*"))
