"""Test tiers and the rule that CI never skips: a missing prerequisite fails there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imagebuild.config import Arch

TIERS = ("unit", "integration", "boot")
STRICT = bool(os.environ.get("CI")) or bool(os.environ.get("IMAGEBUILD_STRICT"))
CACHE_DIR = Path(os.environ.get("IMAGEBUILD_CACHE_DIR", "/var/cache/imagebuild"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The directory decides the tier when a test module does not say it itself.
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts and not item.get_closest_marker(tier):
                item.add_marker(getattr(pytest.mark, tier))


def missing(reason: str) -> None:
    """A prerequisite is missing: fail in CI (a skipped boot test proves nothing), skip elsewhere."""
    if STRICT:
        pytest.fail(f"prerequisite missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (loop devices, mounts, chroot)")


def require_tools(*tools: str) -> None:
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        missing(f"host tools not installed: {', '.join(absent)} (run ci/setup)")


def loop_devices() -> set[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return {line.split(":")[0] for line in out.splitlines() if line.strip()}


def mounts_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line.split()[4] for line in text.splitlines() if line.split()[4].startswith(str(path))]


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return CACHE_DIR


@pytest.fixture(scope="session")
def standin_amd64(cache_dir: Path) -> Path:
    """The amd64 stand-in stage tarball (built once, then cached by recipe hash)."""
    require_root()
    require_tools("mmdebstrap")
    from imagebuild.standin import ensure_standin

    return ensure_standin(Arch.amd64, cache_dir)


@pytest.fixture(scope="session")
def console_image_amd64(standin_amd64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An amd64 console image built from the stand-in stage through the CLI, without its smoke test."""
    require_tools("qemu-img", "mkfs.xfs", "mkfs.vfat", "mcopy", "sgdisk")
    out = tmp_path_factory.mktemp("console-amd64")
    from imagebuild.cli import main

    code = main(["build", "amd64", "console", "--stage", str(standin_amd64), "--no-test", "-o", str(out),
                 "--stamp", "20261124T000000Z", "--cache-dir", str(CACHE_DIR)])
    assert code == 0, "building the amd64 console image failed"
    image = out / "di-amd64-console-20261124T000000Z.qcow2"
    assert image.is_file()
    return image
