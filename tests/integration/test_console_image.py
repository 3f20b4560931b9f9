"""What built amd64 images hold, read back offline from the qcow2 with real tools."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild.config import Arch
from imagebuild.disk import DPS_ROOT_TYPE
from imagebuild.imagefs import OpenedImage, open_image

from conftest import require_tools

pytestmark = pytest.mark.integration

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


@pytest.fixture(scope="module")
def console(console_image_amd64: Path) -> Iterator[OpenedImage]:
    require_tools("qemu-img", "sfdisk", "mtype", "blkid")
    with open_image(console_image_amd64) as opened:
        yield opened


@pytest.fixture(scope="module")
def cloudinit(cloudinit_image_amd64: Path) -> Iterator[OpenedImage]:
    require_tools("qemu-img", "sfdisk", "mtype", "blkid")
    with open_image(cloudinit_image_amd64) as opened:
        yield opened


def test_partition_types_names_and_labels(console: OpenedImage) -> None:
    esp, root = console.partitions
    assert esp.type == ESP_TYPE and esp.name == "gentooefi"
    assert esp.size * 512 == 512 * 2**20 and esp.start == 2048
    assert root.type == DPS_ROOT_TYPE[Arch.amd64] and root.name == "gentooroot"
    assert console.blkid(esp)["LABEL"] == "gentooefi" and console.blkid(esp)["TYPE"] == "vfat"
    assert console.blkid(root)["LABEL"] == "gentooroot" and console.blkid(root)["TYPE"] == "xfs"


def test_grub_boots_a_kernel_that_exists(console: OpenedImage) -> None:
    config = console.esp_read("/grub/grub.cfg").decode()
    linux = next(line.split() for line in config.splitlines() if line.strip().startswith("linux "))
    initrd = next(line.split() for line in config.splitlines() if line.strip().startswith("initrd "))
    assert "root=LABEL=gentooroot" in linux and "console=ttyS0" in linux and linux[-1] == "console=tty0"
    listing = console.esp_list()
    assert linux[1] in listing and initrd[1] in listing
    assert "/EFI/BOOT/BOOTX64.EFI" in listing and "/grub/x86_64-efi/normal.mod" in listing
    assert console.esp_read("/EFI/BOOT/BOOTX64.EFI")[:2] == b"MZ", "must be a PE/COFF executable"
    esp_uuid = console.blkid(console.partitions[0])["UUID"]
    assert f"search --no-floppy --fs-uuid --set=root {esp_uuid}" in config


def test_console_variant_configuration(console: OpenedImage) -> None:
    root = console.root
    fstab = [line.split() for line in (root / "etc/fstab").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert ["LABEL=gentooroot", "/", "xfs", "noatime,rw", "0", "1"] in fstab
    assert ["LABEL=gentooefi", "/boot", "vfat", "defaults", "1", "2"] in fstab
    shadow = dict(line.split(":", 2)[:2] for line in (root / "etc/shadow").read_text().splitlines())
    assert shadow["root"] == "", "the console variant's root password must be empty"
    assert (root / "etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service").is_symlink()
    enabled = {p.name for p in (root / "etc/systemd/system").rglob("*") if p.is_symlink()}
    assert not enabled & {"ssh.service", "sshd.service", "systemd-networkd.service"}
    assert (root / "etc/systemd/network/80-imagebuild-dhcp.network").read_text().count("DHCP=yes") == 1
    assert (root / "etc/cloud/cloud-init.disabled").exists()
    assert "GRUB_CMDLINE_LINUX=\"console=ttyS0 console=tty0\"" in (root / "etc/default/grub").read_text()
    assert list((root / "boot").iterdir()) == []


def test_cloudinit_variant_configuration(cloudinit: OpenedImage) -> None:
    root = cloudinit.root
    for line in (root / "etc/shadow").read_text().splitlines():
        user, password = line.split(":")[:2]
        assert password.startswith(("!", "*")), f"account {user} is not locked: {password!r}"
    enabled = {p.name for p in (root / "etc/systemd/system").rglob("*.service") if p.is_symlink()}
    assert {"cloud-init-local.service", "cloud-init.service", "cloud-config.service",
            "cloud-final.service"} <= enabled
    assert {"ssh.service", "systemd-networkd.service"} <= enabled
    assert not (root / "etc/cloud/cloud-init.disabled").exists()
    config = (root / "etc/cloud/cloud.cfg.d/90-imagebuild.cfg").read_text()
    assert "datasource_list: [ NoCloud," in config and "resize_rootfs: true" in config
    assert "name: gentoo" in config and "renderers: [networkd]" in config
    assert list((root / "etc/ssh").glob("ssh_host_*")) == []


@pytest.mark.parametrize("variant", ["console", "cloudinit"])
def test_hygiene(variant: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(variant).root
    assert (root / "etc/machine-id").read_text() == ""
    assert list((root / "etc/ssh").glob("ssh_host_*")) == []
    assert not (root / "root/.bash_history").exists()
    assert list((root / "tmp").iterdir()) == [] and list((root / "var/tmp").iterdir()) == []
    assert (root / "etc/hostname").read_text().strip() == "localhost"
    assert "STAND-IN" in (root / "etc/imagebuild-standin").read_text()


def test_digests_contents_and_manifest(console_image_amd64: Path) -> None:
    image = console_image_amd64
    digests = image.with_name(image.name + ".DIGESTS").read_text().splitlines()
    data = image.read_bytes()
    assert digests[:4] == ["# BLAKE2B HASH", f"{hashlib.blake2b(data).hexdigest()}  {image.name}",
                           "# SHA512 HASH", f"{hashlib.sha512(data).hexdigest()}  {image.name}"]
    contents = gzip.decompress(image.with_name(image.name + ".CONTENTS.gz").read_bytes()).decode()
    assert " /boot/EFI/BOOT/BOOTX64.EFI\n" in contents and " /etc/fstab\n" in contents
    manifest = json.loads(image.with_name(image.name + ".manifest.json").read_text())
    assert manifest["arch"] == "amd64" and manifest["variant"] == "console"
    assert manifest["digests"][image.name]["SHA512"] == hashlib.sha512(data).hexdigest()
    assert any("XFS" in step for step in manifest["step_seconds"])
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 20 * 2**30
    assert info["format-specific"]["data"]["compression-type"] == "zlib"
    assert not list(image.parent.glob(".*partial*"))
    assert os.stat(image).st_mode & 0o222, "the published image stays an ordinary file"
