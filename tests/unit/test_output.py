from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from imagebuild.output import contents_lines, digests_text, file_digests, write_contents

pytestmark = pytest.mark.unit


def test_digests_in_gentoo_format(tmp_path: Path) -> None:
    image = tmp_path / "di-amd64-console-20261124T000000Z.qcow2"
    image.write_bytes(b"qcow2 bytes" * 1000)
    digests = file_digests(image)
    assert digests["SHA512"] == hashlib.sha512(image.read_bytes()).hexdigest()
    assert digests["BLAKE2B"] == hashlib.blake2b(image.read_bytes()).hexdigest()
    text = digests_text({image.name: digests})
    assert text.splitlines() == [
        "# BLAKE2B HASH",
        f"{digests['BLAKE2B']}  {image.name}",
        "# SHA512 HASH",
        f"{digests['SHA512']}  {image.name}",
    ]


def test_contents_lists_root_and_esp(tmp_path: Path) -> None:
    root, esp = tmp_path / "root", tmp_path / "esp"
    (root / "etc").mkdir(parents=True)
    (root / "etc/os-release").write_text("ID=gentoo\n")
    (root / "bin").symlink_to("usr/bin")
    (esp / "EFI/BOOT").mkdir(parents=True)
    (esp / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"x" * 10)
    lines = contents_lines(root, esp)
    assert any(line.startswith("-rw-r--r-- 0/0") and line.endswith(" /etc/os-release") for line in lines)
    assert any(line.startswith("l") and line.endswith(" /bin -> usr/bin") for line in lines)
    assert any(line.split()[2] == "10" and line.endswith(" /boot/EFI/BOOT/BOOTX64.EFI") for line in lines)
    target = tmp_path / "CONTENTS.gz"
    write_contents(lines, target)
    assert gzip.decompress(target.read_bytes()).decode().splitlines() == lines
