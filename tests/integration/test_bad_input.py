"""Bad input: one clear message naming the input and the fix, exit != 0, nothing left behind."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import imagebuild_cli, loop_devices, mounts_under, require_root, require_tools

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()
    require_tools("qemu-img", "mkfs.xfs", "mkfs.vfat", "mcopy", "sfdisk")


def imagebuild(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would; check the common "nothing left behind" promises."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = imagebuild_cli(*args, "-o", out, "--work-dir", work, "--no-test", env=env, timeout=600)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    assert loop_devices(tmp_path) == set(), "a loop device was left attached"
    assert mounts_under(tmp_path) == [], "a mount was left behind"
    assert not work.exists() or list(work.iterdir()) == [], f"workspace left behind: {list(work.iterdir())}"
    assert not out.exists() or list(out.iterdir()) == [], f"output left behind: {list(out.iterdir())}"
    return result


def _tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_missing_stage_file(tmp_path: Path) -> None:
    result = imagebuild(tmp_path, "build", "amd64", "console", "--stage", str(tmp_path / "stage3-nope.tar.xz"))
    assert "stage3-nope.tar.xz does not exist" in result.stderr
    assert "hint:" in result.stderr


def test_corrupt_stage(tmp_path: Path) -> None:
    bogus = tmp_path / "stage3.tar.xz"
    bogus.write_bytes(os.urandom(64 * 1024))
    result = imagebuild(tmp_path, "build", "amd64", "console", "--stage", str(bogus))
    assert f"{bogus} is corrupt, truncated or not a tar archive" in result.stderr


def test_truncated_stage(tmp_path: Path) -> None:
    whole = _tarball(tmp_path / "stage3.tar", {"etc/os-release": b"ID=gentoo\n", "big": os.urandom(200_000)})
    subprocess.run(["xz", "-q", "-f", str(whole)], check=True)
    xz = tmp_path / "stage3.tar.xz"
    xz.write_bytes(xz.read_bytes()[:50_000])
    result = imagebuild(tmp_path, "build", "amd64", "console", "--stage", str(xz))
    assert "corrupt, truncated or not a tar archive" in result.stderr
    assert "DIGESTS" in result.stderr


def test_stage_without_kernel(tmp_path: Path) -> None:
    stage = _tarball(tmp_path / "seed.tar", {"bin/sh": Path("/bin/dash").read_bytes(),
                                            "etc/shadow": b"root:*:1::::::\n", "boot/README": b"empty\n"})
    result = imagebuild(tmp_path, "build", "amd64", "console", "--stage", str(stage))
    assert "no kernel in /boot" in result.stderr
    assert "gentoo-kernel" in result.stderr


def test_unknown_arch(tmp_path: Path) -> None:
    result = imagebuild(tmp_path, "build", "loong64", "console", "--stage", "standin")
    assert "unknown architecture 'loong64'" in result.stderr and "amd64, arm64, riscv64" in result.stderr


def test_unknown_variant(tmp_path: Path) -> None:
    result = imagebuild(tmp_path, "build", "amd64", "desktop", "--stage", "standin")
    assert "unknown image variant 'desktop'" in result.stderr and "console, cloud-init" in result.stderr


def test_spec_syntax_error(tmp_path: Path) -> None:
    spec = tmp_path / "broken.spec"
    spec.write_text("   orphan continuation line\nsubarch: amd64\ndiskimage/type: console\n")
    result = imagebuild(tmp_path, "build", "amd64", "console", "--spec", str(spec), "--stage", "standin")
    assert f"{spec}:1:" in result.stderr


def test_spec_unknown_key(tmp_path: Path) -> None:
    spec = tmp_path / "typo.spec"
    spec.write_text("subarch: amd64\ndiskimage/type: console\ndiskimage/qcow2_sise: 20GiB\n")
    result = imagebuild(tmp_path, "build", "amd64", "console", "--spec", str(spec), "--stage", "standin")
    assert f"{spec}:3:" in result.stderr
    assert "diskimage/qcow2_sise" in result.stderr and "diskimage/qcow2_size" in result.stderr


def test_image_too_small_for_the_tree(tmp_path: Path, standin_amd64: Path) -> None:
    result = imagebuild(tmp_path, "build", "amd64", "console", "--stage", str(standin_amd64), "--size", "1GiB")
    assert "the root filesystem needs about" in result.stderr
    assert "--size" in result.stderr


def env_without(tool: str, tmp_path: Path) -> dict[str, str]:
    """The environment with a PATH holding every program the host has except ``tool``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if name != tool and not (bin_dir / name).exists():
                    (bin_dir / name).symlink_to(os.path.join(directory, name))
    return {**os.environ, "PATH": str(bin_dir)}


def test_missing_host_tool(tmp_path: Path) -> None:
    env = env_without("mkfs.xfs", tmp_path)
    assert shutil.which("mkfs.xfs", path=env["PATH"]) is None
    result = imagebuild(tmp_path, "build", "amd64", "console", "--stage", "standin", env=env)
    assert "mkfs.xfs" in result.stderr and "xfsprogs" in result.stderr


def test_output_directory_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output directory should go\n")
    result = imagebuild_cli("build", "amd64", "console", "--stage", "standin", "--no-test", "-o", blocker / "out",
                            timeout=60)
    assert result.returncode != 0
    assert f"cannot create the output directory {blocker / 'out'}" in result.stderr


def test_doctor_names_the_missing_tool_and_its_packages(tmp_path: Path) -> None:
    result = imagebuild_cli("doctor", env=env_without("mkfs.xfs", tmp_path), timeout=120)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("MISSING") and " mkfs.xfs " in line)
    assert "Debian: xfsprogs" in lines[row + 1] and "Gentoo: sys-fs/xfsprogs" in lines[row + 1]
    assert "found    mkfs.vfat" in result.stdout
    assert lines[-1].startswith("missing: mkfs.xfs")


def test_stage_of_the_wrong_architecture(tmp_path: Path, standin_amd64: Path) -> None:
    result = imagebuild(tmp_path, "build", "arm64", "console", "--stage", str(standin_amd64))
    assert "the stage is for x86_64, but an image for arm64 (aarch64) was asked for" in result.stderr


def test_stage_without_grub_modules(tmp_path: Path) -> None:
    dash = Path("/bin/dash").read_bytes()
    stage = _tarball(tmp_path / "seed.tar", {"bin/sh": dash, "etc/shadow": b"root:*:1::::::\n",
                                            "boot/vmlinuz-6.6.0-gentoo-dist": b"kernel"})
    result = imagebuild(tmp_path, "build", "amd64", "console", "--stage", str(stage))
    assert "no GRUB modules for x86_64-efi" in result.stderr and "GRUB_PLATFORMS" in result.stderr
