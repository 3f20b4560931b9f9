"""A compressed qcow2 written straight from the sparse raw image, on every core.

``qemu-img convert -c`` compresses each 64 KiB cluster with zlib at its default level: on
these machines that is most of a build's time. This writer makes the same image — qcow2
version 3, 64 KiB clusters, zlib (raw deflate, 4 KiB window, as QEMU writes and reads it),
all-zero clusters left unallocated — with zlib-ng where it is installed (the same format,
about three times faster) and one compressing thread per core. The result is checked by the
caller with ``qemu-img compare`` against the raw image, so QEMU itself proves every cluster.

Layout: the header cluster, the compressed clusters packed back to back (a cluster that does
not shrink is stored whole, cluster-aligned), then the L2 tables, the L1 table, the refcount
table and its blocks. docs/interop/qcow2.txt in QEMU's tree is the format's specification.
"""

from __future__ import annotations

import collections
import os
import struct
import types
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_deflate: types.ModuleType
try:  # the same API and format as zlib, several times faster
    from zlib_ng import zlib_ng as _deflate
except ImportError:  # pragma: no cover - zlib-ng is a dependency; plain zlib is the fallback
    _deflate = zlib

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
# QEMU's deflate parameters for qcow2 (block/qcow2-threads.c): raw deflate, 4 KiB window,
# default level. The window matters: readers inflate with the same 4 KiB window.
WINDOW_BITS = -12
LEVEL = 6

_MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the 104 bytes of a version 3 header
_HEADER_LENGTH = 112  # + compression_type (0: zlib) and padding to a multiple of 8
_L2_ENTRIES = CLUSTER // 8
_REFCOUNT_ORDER = 4  # 16-bit refcounts
_REFCOUNTS_PER_BLOCK = CLUSTER * 8 >> _REFCOUNT_ORDER
_COPIED = 1 << 63  # "refcount is exactly one", on L1 entries and standard clusters
_COMPRESSED = 1 << 62
_CSIZE_SHIFT = 62 - (CLUSTER_BITS - 8)  # where a compressed cluster's sector count starts
_SECTOR = 512
_ZERO = bytes(CLUSTER)
_BATCH = 64  # clusters a thread reads and compresses in one task (4 MiB)


def compress_cluster(data: bytes) -> bytes:
    compressor = _deflate.compressobj(LEVEL, zlib.DEFLATED, WINDOW_BITS, 9)
    return compressor.compress(data) + compressor.flush()


def data_clusters(fd: int, size: int) -> Iterator[int]:
    """The indexes of the clusters holding data, from the file's extents (holes are zeros)."""
    offset, last = 0, -1
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after offset
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        for index in range(max(start >> CLUSTER_BITS, last + 1), (end + CLUSTER - 1) >> CLUSTER_BITS):
            yield index
            last = index
        offset = end


def _read_and_compress(fd: int, indexes: list[int]) -> list[tuple[int, bytes | None, bool]]:
    """(index, bytes, compressed) per cluster; bytes None for a cluster of zeros."""
    out: list[tuple[int, bytes | None, bool]] = []
    for index in indexes:
        data = os.pread(fd, CLUSTER, index << CLUSTER_BITS)
        if len(data) < CLUSTER:  # the image's last, partial cluster reads as zero-padded
            data += bytes(CLUSTER - len(data))
        if data == _ZERO:
            out.append((index, None, False))
            continue
        packed = compress_cluster(data)
        # QEMU keeps a cluster compressed only if that saves at least a byte.
        out.append((index, packed, True) if len(packed) < CLUSTER else (index, data, False))
    return out


def _batches(indexes: Iterator[int]) -> Iterator[list[int]]:
    batch: list[int] = []
    for index in indexes:
        batch.append(index)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _in_order(pool: ThreadPoolExecutor, fd: int, indexes: Iterator[int],
              window: int) -> Iterator[tuple[int, bytes | None, bool]]:
    """The compressed clusters in disk order, with at most ``window`` batches in flight."""
    pending: collections.deque[Future[list[tuple[int, bytes | None, bool]]]] = collections.deque()
    for batch in _batches(indexes):
        pending.append(pool.submit(_read_and_compress, fd, batch))
        if len(pending) >= window:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


class _Refcounts:
    def __init__(self) -> None:
        self.counts: collections.Counter[int] = collections.Counter()

    def add(self, offset: int, length: int) -> None:
        """One more reference to every host cluster that [offset, offset+length) touches."""
        for cluster in range(offset >> CLUSTER_BITS, ((offset + length - 1) >> CLUSTER_BITS) + 1):
            self.counts[cluster] += 1


def _align(offset: int) -> int:
    return (offset + CLUSTER - 1) & ~(CLUSTER - 1)


def write_compressed_qcow2(raw: Path, target: Path, *, threads: int | None = None,
                           progress: Callable[[int, int], Any] | None = None) -> None:
    """Write ``target``, a zlib-compressed qcow2 of the raw image ``raw``.

    ``progress`` is called now and then with the bytes of data done and the bytes there are.
    """
    threads = threads or os.cpu_count() or 1
    size = -(-raw.stat().st_size // _SECTOR) * _SECTOR  # QEMU sizes disks in whole sectors
    guest_clusters = (size + CLUSTER - 1) >> CLUSTER_BITS
    l1_size = (guest_clusters + _L2_ENTRIES - 1) // _L2_ENTRIES
    l2: dict[int, list[int]] = {}  # L1 index -> its L2 table's entries
    refcounts = _Refcounts()
    refcounts.add(0, CLUSTER)  # the header

    fd = os.open(raw, os.O_RDONLY)
    pool = ThreadPoolExecutor(threads, "qcow2")
    try:
        with open(target, "wb") as out:
            out.seek(CLUSTER)
            offset = CLUSTER
            indexes = list(data_clusters(fd, size))
            total = len(indexes) << CLUSTER_BITS
            for done, (index, data, compressed) in enumerate(_in_order(pool, fd, iter(indexes), threads * 2)):
                if progress is not None and done % 256 == 0:
                    progress(done << CLUSTER_BITS, total)
                if data is None:
                    continue
                if compressed:
                    first, last = offset // _SECTOR, (offset + len(data) - 1) // _SECTOR
                    entry = _COMPRESSED | (last - first) << _CSIZE_SHIFT | offset
                    refcounts.add(first * _SECTOR, (last - first + 1) * _SECTOR)
                else:
                    if offset % CLUSTER:
                        out.write(bytes(_align(offset) - offset))
                        offset = _align(offset)
                    entry = _COPIED | offset
                    refcounts.add(offset, CLUSTER)
                out.write(data)
                offset += len(data)
                l2.setdefault(index // _L2_ENTRIES, [0] * _L2_ENTRIES)[index % _L2_ENTRIES] = entry
            offset = _write_metadata(out, _align(offset), size, l1_size, l2, refcounts)
            out.truncate(offset)
            out.flush()
            os.fsync(out.fileno())
    finally:
        # Interrupted (a signal, a full disk): the batches not started yet are dropped; the ones
        # running finish in a moment (4 MiB each), before their file is closed under them.
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(fd)
    if progress is not None:
        progress(total, total)


def _write_metadata(out: Any, offset: int, size: int, l1_size: int, l2: dict[int, list[int]],
                    refcounts: _Refcounts) -> int:
    """Write the L2 tables, L1 table, refcount structures and header; the file's end."""
    out.seek(offset)
    l1 = [0] * l1_size
    for l1_index in sorted(l2):
        out.write(struct.pack(f">{_L2_ENTRIES}Q", *l2[l1_index]))
        l1[l1_index] = _COPIED | offset
        refcounts.add(offset, CLUSTER)
        offset += CLUSTER
    l1_offset, l1_bytes = offset, _align(l1_size * 8)
    out.write(struct.pack(f">{l1_size}Q", *l1).ljust(l1_bytes, b"\0"))
    refcounts.add(l1_offset, l1_bytes)
    offset += l1_bytes

    # The refcount table and blocks count themselves: grow them until they cover the file.
    table_clusters = blocks = 1
    while True:
        end = (offset >> CLUSTER_BITS) + table_clusters + blocks
        need_blocks = -(-end // _REFCOUNTS_PER_BLOCK)
        need_table = -(-need_blocks * 8 // CLUSTER)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = need_blocks, need_table
    table_offset = offset
    refcounts.add(table_offset, table_clusters * CLUSTER)
    first_block = table_offset + table_clusters * CLUSTER
    refcounts.add(first_block, blocks * CLUSTER)
    table = [first_block + n * CLUSTER for n in range(blocks)]
    out.write(struct.pack(f">{len(table)}Q", *table).ljust(table_clusters * CLUSTER, b"\0"))
    for block in range(blocks):
        base = block * _REFCOUNTS_PER_BLOCK
        counts = [refcounts.counts.get(base + n, 0) for n in range(_REFCOUNTS_PER_BLOCK)]
        out.write(struct.pack(f">{_REFCOUNTS_PER_BLOCK}H", *counts))
    end = first_block + blocks * CLUSTER

    header = _HEADER.pack(
        _MAGIC, 3, 0, 0, CLUSTER_BITS, size, 0, l1_size, l1_offset, table_offset,
        table_clusters, 0, 0, 0, 0, 0, _REFCOUNT_ORDER, _HEADER_LENGTH,
    )  # fmt: skip
    out.seek(0)
    # compression_type 0 (zlib) and padding, then the end of the header extensions (zeros).
    out.write(header.ljust(_HEADER_LENGTH + 8, b"\0"))
    return end
