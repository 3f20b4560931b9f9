"""`imagebuild inspect`: passes on built images, fails (naming the check) on doctored copies."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import attached, imagebuild_cli, loop_devices

pytestmark = pytest.mark.integration


def inspect(image: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return imagebuild_cli("inspect", image, *extra, timeout=300)


def doctored(image: Path, tmp_path: Path, change: Callable[[Path], None]) -> Path:
    """A copy of ``image`` whose root filesystem ``change`` has edited (the original is untouched)."""
    raw = tmp_path / "doctored.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]["partitions"]
    root = table[1]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with attached(raw, offset=root["start"] * 512, size=root["size"] * 512) as loop:
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            change(mnt)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    copy = tmp_path / image.name
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(copy)], check=True)
    shutil.copy(image.with_name(image.name + ".manifest.json"), copy.with_name(copy.name + ".manifest.json"))
    raw.unlink()
    return copy


@pytest.mark.parametrize("fixture", ["console_image_amd64", "cloudinit_image_amd64", "console_openrc_image_amd64",
                                     "cloudinit_openrc_image_amd64"])
def test_built_images_pass(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    image: Path = request.getfixturevalue(fixture)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    result = inspect(image, "--json", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and len(report["checks"]) >= 14
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before, "inspect must never write the image"
    assert loop_devices(Path(tempfile.gettempdir()) / "imagebuild-open-") == set()


def test_planted_ssh_host_key_fails(console_image_amd64: Path, tmp_path: Path) -> None:
    def plant(root: Path) -> None:
        (root / "etc/ssh/ssh_host_ed25519_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")

    result = inspect(doctored(console_image_amd64, tmp_path, plant))
    assert result.returncode == 1
    assert "FAIL  no-ssh-host-keys" in result.stdout and "ssh_host_ed25519_key" in result.stdout
    assert "1 check(s) FAILED" in result.stdout


def test_root_password_hash_in_console_image_fails(console_image_amd64: Path, tmp_path: Path) -> None:
    def set_password(root: Path) -> None:
        shadow = root / "etc/shadow"
        lines = shadow.read_text().splitlines(keepends=True)
        lines = ["root:$6$salt$hash:19000:0:99999:7:::\n" if line.startswith("root:") else line for line in lines]
        shadow.write_text("".join(lines))

    result = inspect(doctored(console_image_amd64, tmp_path, set_password))
    assert result.returncode == 1
    assert "FAIL  console-root-empty-password" in result.stdout


def test_openrc_console_image_with_sshd_in_default_fails(console_openrc_image_amd64: Path, tmp_path: Path) -> None:
    def add_sshd(root: Path) -> None:
        (root / "etc/runlevels/default/sshd").symlink_to("/etc/init.d/sshd")

    result = inspect(doctored(console_openrc_image_amd64, tmp_path, add_sshd))
    assert result.returncode == 1
    assert "FAIL  console-no-network-service" in result.stdout and "default/sshd" in result.stdout
    assert "1 check(s) FAILED" in result.stdout


def test_openrc_cloudinit_image_without_cloud_init_local_fails(cloudinit_openrc_image_amd64: Path,
                                                                tmp_path: Path) -> None:
    def drop_local(root: Path) -> None:
        (root / "etc/runlevels/boot/cloud-init-local").unlink()

    result = inspect(doctored(cloudinit_openrc_image_amd64, tmp_path, drop_local))
    assert result.returncode == 1
    assert "FAIL  openrc-cloudinit-services" in result.stdout and "cloud-init-local in boot" in result.stdout
    assert "1 check(s) FAILED" in result.stdout


def test_openrc_console_image_without_serial_getty_fails(console_openrc_image_amd64: Path, tmp_path: Path) -> None:
    def comment_out(root: Path) -> None:
        inittab = root / "etc/inittab"
        inittab.write_text("".join(f"#{line}" if line.startswith("s0:") else line
                                   for line in inittab.read_text().splitlines(keepends=True)))

    result = inspect(doctored(console_openrc_image_amd64, tmp_path, comment_out))
    assert result.returncode == 1
    assert "FAIL  openrc-serial-getty" in result.stdout and "no getty on ttyS0" in result.stdout


def test_not_a_qcow2(tmp_path: Path) -> None:
    bogus = tmp_path / "image.qcow2"
    bogus.write_bytes(b"\0" * 65536)
    result = inspect(bogus, "--arch", "amd64", "--variant", "console")
    assert result.returncode == 2
    assert "is not a qcow2 image" in result.stderr and "Traceback" not in result.stderr
