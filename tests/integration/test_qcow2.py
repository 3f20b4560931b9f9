"""imagebuild's own qcow2 writer, read back by QEMU: `qemu-img check` finds its metadata
consistent, `qemu-img compare` finds every byte of the raw image, `qemu-img map` finds zeros
unallocated — on raw images with the awkward parts (incompressible clusters, written zeros,
an L2 table boundary, a size that is not a whole cluster), real files' bytes, and a file big
enough to need several refcount blocks."""

from __future__ import annotations

import json
import os
import subprocess
import zlib
from pathlib import Path

import pytest

from imagebuild import qcow2
from imagebuild.imagefs import compare_parts

from conftest import require_tools

pytestmark = pytest.mark.integration

MiB = 1024**2


def qemu_img(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)


def assert_qemu_reads_it_back(raw: Path, image: Path) -> None:
    check = qemu_img("check", "-f", "qcow2", image)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout
    compare = qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, image)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    info = json.loads(qemu_img("info", "--output=json", image).stdout)
    assert info["format"] == "qcow2"
    assert info["cluster-size"] == 65536
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["format-specific"]["data"]["compression-type"] == "zlib"


def sparse_raw(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return path


def test_awkward_raw_image(tmp_path: Path) -> None:
    require_tools("qemu-img")
    raw = sparse_raw(tmp_path / "disk.raw", 600 * MiB + 3 * 512, {
        0: os.urandom(70_000),  # incompressible, over a cluster boundary: stored whole
        5 * MiB + 100: b"compressible text " * 200_000,
        40 * MiB: bytes(2 * MiB),  # written zeros: allocated in the file, zero in the image
        512 * MiB - 300: b"across the first L2 table's end " * 40,  # guest clusters 8191 and 8192
        600 * MiB: b"tail" * 384,  # the last, partial cluster
    })  # fmt: skip
    image = tmp_path / "disk.qcow2"
    seen: list[tuple[int, int]] = []
    qcow2.write_compressed_qcow2(raw, image, threads=2, progress=lambda *done: seen.append(done))

    assert_qemu_reads_it_back(raw, image)
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] and seen == sorted(seen)
    regions = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", image).stdout)
    zeros = [r for r in regions if r["start"] <= 41 * MiB < r["start"] + r["length"]]
    assert zeros and not zeros[0]["data"], "written zeros must stay unallocated"
    assert image.stat().st_size < 2 * MiB


def test_real_files_compress_like_qemu_img(tmp_path: Path) -> None:
    """Bytes of real programs, about as small as `qemu-img convert -c` makes them: zlib-ng's
    level 6 trades up to ~4% of size for ~2.5 times zlib's speed (measured on /usr/bin)."""
    require_tools("qemu-img")
    files = sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and not p.is_symlink())
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as out:
        for path in files:
            out.write(path.read_bytes())
            if out.tell() > 48 * MiB:
                break
        out.truncate(64 * MiB)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qcow2.write_compressed_qcow2(raw, ours)
    assert qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", raw, theirs).returncode == 0

    assert_qemu_reads_it_back(raw, ours)
    assert ours.stat().st_size <= theirs.stat().st_size * 1.05


def test_many_refcount_blocks(tmp_path: Path) -> None:
    """Metadata placed past 6 GiB of the file (a sparse one) needs several refcount blocks,
    which count themselves; QEMU must find every count right."""
    require_tools("qemu-img")
    image = tmp_path / "big.qcow2"
    refcounts = qcow2._Refcounts()
    refcounts.add(0, qcow2.CLUSTER)
    with open(image, "wb") as out:
        end = qcow2._write_metadata(out, 6 * 1024 * MiB, 8 * 1024 * MiB, 16, {}, refcounts)
        out.truncate(end)
    check = qemu_img("check", "--output=json", "-f", "qcow2", image)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["check-errors"] == 0
    # 2 GiB of file per 16-bit refcount block: the blocks cover all 6 GiB and themselves.
    assert end > 6 * 1024 * MiB + 3 * qcow2.CLUSTER


def test_clusters_inflate_with_a_4k_window() -> None:
    """QEMU and other readers inflate with a 4 KiB window (raw deflate, -12); a 32 KiB-window
    stream inflates in QEMU's one-call read but fails any reader that inflates in pieces."""
    data = b"".join(bytes([n % 251]) * (n % 97 + 1) + os.urandom(5) for n in range(3000))[: qcow2.CLUSTER]
    packed = qcow2.compress_cluster(data)
    reader = zlib.decompressobj(qcow2.WINDOW_BITS)
    assert b"".join(reader.decompress(packed[i:i + 100]) for i in range(0, len(packed), 100)) == data


def test_split_comparison_finds_every_byte(tmp_path: Path) -> None:
    """The build's proof, `qemu-img compare` run on ranges in parallel (imagefs.compare_parts):
    the ranges cover the whole disk, and one flipped bit in the qcow2's data fails a range."""
    require_tools("qemu-img")
    raw = sparse_raw(tmp_path / "disk.raw", 300 * MiB, {
        MiB: b"first part " * 400_000, 200 * MiB: b"second part " * 400_000,
    })  # fmt: skip
    image = tmp_path / "disk.qcow2"
    qcow2.write_compressed_qcow2(raw, image)
    parts = compare_parts(raw, image, 3)
    ranges = [json.loads(raw_part.removeprefix("json:")) for raw_part, _ in parts]
    assert ranges[0]["offset"] == 0 and len(parts) >= 2
    assert all(a["offset"] + a["size"] == b["offset"] for a, b in zip(ranges, ranges[1:], strict=False))
    assert ranges[-1]["offset"] + ranges[-1]["size"] == raw.stat().st_size
    assert [qemu_img("compare", "-q", *part).returncode for part in parts] == [0] * len(parts)

    with open(image, "r+b") as f:  # a bit in the middle of the compressed data
        f.seek(qcow2.CLUSTER + 5000)
        byte = f.read(1)
        f.seek(qcow2.CLUSTER + 5000)
        f.write(bytes([byte[0] ^ 1]))
    assert any(qemu_img("compare", "-q", *part).returncode != 0 for part in compare_parts(raw, image, 3))
