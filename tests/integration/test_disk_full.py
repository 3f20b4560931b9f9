"""Disk full while unpacking, before populating, or while converting: a clear message and
nothing half-written left behind. Small tmpfs mounts play the full disks."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import imagebuild_cli, loop_devices, mounts_under, require_root

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    require_root()
    made: list[Path] = []

    def make(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        subprocess.run(["umount", str(path)], check=False)


def build(stage: Path, out: Path, work: Path) -> subprocess.CompletedProcess[str]:
    return imagebuild_cli("build", "amd64", "console", "--stage", stage, "--no-test", "-o", out, "--work-dir", work)


def assert_clean(out: Path, work: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == [], f"left in the output: {list(out.iterdir())}"
    assert not work.exists() or list(work.iterdir()) == [], f"left in the work dir: {list(work.iterdir())}"
    assert loop_devices(work) == set() and [m for m in mounts_under(work) if m != str(work)] == []


def test_output_full_during_conversion(tmp_path: Path, small_fs, standin_amd64: Path) -> None:  # type: ignore[no-untyped-def]
    out = small_fs("out", "48m")
    result = build(standin_amd64, out, tmp_path / "work")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"no space left in {out} while writing the qcow2 image" in result.stderr
    assert "Traceback" not in result.stderr
    assert_clean(out, tmp_path / "work")


def test_work_dir_too_small_for_the_raw_image(tmp_path: Path, small_fs, standin_amd64: Path) -> None:  # type: ignore[no-untyped-def]
    # The stand-in unpacks to ~740 MiB, which (with the ESP and room to spare) does not fit.
    work = small_fs("work", "900m")
    result = build(standin_amd64, tmp_path / "out", work)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"not enough free space in {work}" in result.stderr and "--work-dir" in result.stderr
    assert "Unpacking" not in result.stderr, "refused before a byte of the stage was written"
    assert_clean(tmp_path / "out", work)


def test_work_dir_full_while_unpacking(tmp_path: Path, small_fs) -> None:  # type: ignore[no-untyped-def]
    """A gzip stage whose trailer understates its size (gzip's ISIZE is 32 bits, and untrusted):
    the checks before writing pass, the unpacker stops at the member that would not fit."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    with open(tree / "big", "wb") as f:
        f.truncate(300 * 2**20)
    stage = tmp_path / "stage.tar.gz"
    subprocess.run(f"tar -C {tree} -c . | gzip -1 > {stage}", shell=True, check=True)
    with open(stage, "r+b") as f:
        f.seek(-4, 2)
        f.write((1000).to_bytes(4, "little"))
    work = small_fs("work", "200m")
    result = build(stage, tmp_path / "out", work)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"no space left in {work}" in result.stderr and "--work-dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert_clean(tmp_path / "out", work)
