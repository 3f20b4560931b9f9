"""Open a finished qcow2 image read-only to look inside it, without booting it.

The qcow2 is converted to a sparse raw copy in a private directory (or, just after a build,
proven equal to the raw image it was made from, which is used instead; the image itself is
never opened for writing), the root partition is attached to a read-only loop device and
mounted ``ro,norecovery``, and the ESP is read with mtools (no vfat in the kernel needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imagebuild import options
from imagebuild.errors import CommandError, ImagebuildError, ImageError
from imagebuild.mounts import LoopDevice, mounted
from imagebuild.qcow2 import CLUSTER_BITS, data_clusters
from imagebuild.run import run, spawn, stop
from imagebuild.workspace import Workspace

_MTOOLS = {"MTOOLS_SKIP_CHECK": "1"}


@dataclasses.dataclass(frozen=True)
class GptPartition:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str
    uuid: str
    name: str


@dataclasses.dataclass(frozen=True)
class OpenedImage:
    raw: Path
    sector_size: int
    disk_guid: str
    partitions: list[GptPartition]
    root: Path  # read-only mount of partition 2

    @property
    def esp_offset(self) -> int:
        return self.partitions[0].start * self.sector_size

    def _esp(self) -> str:
        return f"{self.raw}@@{self.esp_offset}"

    def esp_list(self) -> list[str]:
        """Every path on the ESP, as ``/EFI/BOOT/BOOTX64.EFI``."""
        out = run(["mdir", "-/", "-b", "-i", self._esp(), "::/"], env=_MTOOLS).stdout.decode()
        return [line[2:] for line in out.splitlines() if line.startswith("::/")]

    def esp_read(self, path: str) -> bytes:
        return run(["mtype", "-i", self._esp(), f"::{path}"], env=_MTOOLS).stdout

    def blkid(self, partition: GptPartition) -> dict[str, str]:
        out = run(["blkid", "-p", "-O", str(partition.start * self.sector_size), "-o", "export", self.raw]).stdout
        return dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)


SECTOR_SIZES = (512, 4096)


def gpt_sector_size(head: bytes) -> int | None:
    """The logical sector size a disk's GPT was written for, from its first 8 KiB.

    The GPT header sits in LBA 1, so its signature is at byte 512 on a 512-byte-sector
    disk and at byte 4096 on a 4Kn one. None: no GPT at all.
    """
    for size in SECTOR_SIZES:
        if head[size : size + 8] == b"EFI PART":
            return size
    return None


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What a qcow2 image's header says, read without opening any other file."""

    virtual_size: int
    backing_file: str | None
    data_file: str | None


def read_header(image: Path, *, allow_external: bool = False) -> ImageHeader:
    """The header of ``image``, an untrusted qcow2 file; ImageError unless it is a qcow2 file
    standing alone. A backing file or an external data file would make QEMU and qemu-img read a
    path the image names — a host file, a host disk — so such an image is refused unless the
    user allows it (``allow_external``: --allow-backing-file). ``qemu-img info`` reads only the
    image itself (-U: even while a QEMU holds it open)."""
    if not image.is_file():
        raise ImageError(f"image {image} does not exist or is not a file",
                         hint="give the path of a .qcow2 image (build one with: imagebuild build ARCH VARIANT)")
    try:
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", image]).stdout)
    except (CommandError, ValueError) as exc:
        raise ImageError(f"cannot read image {image}: {exc}", hint="is it a qcow2 image?") from exc
    if info.get("format") != "qcow2":
        raise ImageError(
            f"{image} is not a qcow2 image (qemu-img reads it as {info.get('format')})",
            hint=f"convert it: qemu-img convert -O qcow2 {image} {image.with_suffix('.qcow2')}",
        )
    header = ImageHeader(
        virtual_size=int(info.get("virtual-size", 0)),
        backing_file=info.get("full-backing-filename") or info.get("backing-filename"),
        data_file=info.get("format-specific", {}).get("data", {}).get("data-file"),
    )
    external = [f"backing file {header.backing_file}" if header.backing_file else "",
                f"external data file {header.data_file}" if header.data_file else ""]
    if any(external) and not allow_external:
        raise ImageError(
            f"{image} names another file to read: {' and '.join(e for e in external if e)}",
            hint="a published image stands alone; if you made this overlay yourself and trust what it names, "
            "pass --allow-backing-file (or flatten it: qemu-img convert -O qcow2 IMAGE FLAT.qcow2)",
        )
    return header


def image_sector_size(image: Path) -> int:
    """The sector size of a qcow2 image's GPT (512 when it has none: let the boot tell)."""
    with tempfile.TemporaryDirectory(prefix="imagebuild-head-") as tmp:
        head = Path(tmp) / "head.raw"
        # -U: the image may be open elsewhere (a second smoke test); we only read it.
        run(["qemu-img", "dd", "-U", "-f", "qcow2", "-O", "raw", f"bs={max(SECTOR_SIZES)}", "count=2",
             f"if={image}", f"of={head}"])
        return gpt_sector_size(head.read_bytes()) or 512


def _partition_table(disk: str, name: str) -> tuple[str, list[GptPartition]]:
    """GPT id and partitions of ``disk``, a loop device carrying the image's sector size
    (sfdisk takes the sector size from the device; on a plain file it assumes 512)."""
    table = json.loads(run(["sfdisk", "--json", disk], check=False).stdout or b"{}").get("partitiontable")
    if not table or table.get("label") != "gpt":
        raise ImagebuildError(f"{name}: no GPT partition table", hint="is this an imagebuild disk image?")
    parts = [GptPartition(int(re.search(r"(\d+)$", p["node"]).group(1)),  # type: ignore[union-attr]
                          p["start"], p["size"], p["type"], p.get("uuid", ""), p.get("name", ""))
             for p in table["partitions"]]
    return table["id"], parts




DEFAULT_WORK_DIR = Path(options.default("work_dir"))


def compare_parts(raw: Path, image: Path, parts: int) -> list[tuple[str, str]]:
    """``qemu-img compare`` arguments that split the comparison of ``raw`` with the qcow2
    ``image`` into ``parts`` ranges holding about the same amount of data (one process each:
    QEMU's comparison runs on one core). Each range is QEMU's raw driver over the same range
    of each file, as a json: filename."""
    with open(raw, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        clusters = list(data_clusters(f.fileno(), size))
    bounds = [0, *sorted({clusters[len(clusters) * n // parts] << CLUSTER_BITS
                          for n in range(1, parts) if clusters}), size]
    ranges = [(start, end) for start, end in zip(bounds, bounds[1:], strict=False) if end > start]

    def part(start: int, end: int, file: dict[str, object]) -> str:
        return "json:" + json.dumps({"driver": "raw", "offset": start, "size": end - start, "file": file})

    return [
        (part(start, end, {"driver": "file", "filename": str(raw)}),
         part(start, end, {"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}}))
        for start, end in ranges
    ]


@contextlib.contextmanager
def open_image(image: Path, work_dir: Path = DEFAULT_WORK_DIR, *, allow_external: bool = False,
               raw: Path | None = None) -> Iterator[OpenedImage]:
    """Open ``image`` read-only: a raw copy, loop devices and a mount, all in a workspace
    under ``work_dir`` (so a killed audit's loop devices are detached by the next run).

    ``raw``: the raw image the build converted ``image`` from. Then no copy is made: ``qemu-img
    compare`` proves the two hold the same bytes, and the raw image is what is looked at."""
    read_header(image, allow_external=allow_external)
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(Workspace(work_dir, "audit"))
        comparing: list[subprocess.Popen[bytes]] = []
        if raw is None:
            raw = work / "disk.raw"
            run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw])
        else:
            # QEMU itself reads the image: its metadata must be consistent (a wrong refcount
            # would let a writer overwrite live data) and every cluster equal to the raw image's.
            checked = run(["qemu-img", "check", "-q", "-f", "qcow2", image], check=False)
            if checked.returncode != 0:
                raise ImageError(f"{image.name}: qemu-img check found its qcow2 metadata inconsistent "
                                 f"(exit {checked.returncode}): "
                                 f"{(checked.stdout + checked.stderr).decode(errors='replace').strip()[:300]}",
                                 hint="the conversion is faulty; build again, and report it")
            # The comparison runs while the raw image is audited; the audit waits for it at the end.
            comparing = [spawn(["qemu-img", "compare", "-q", raw_part, qcow2_part])
                         for raw_part, qcow2_part in compare_parts(raw, image, os.cpu_count() or 1)]
            for proc in comparing:
                stack.callback(stop, proc, 0)
        with open(raw, "rb") as f:
            sector = gpt_sector_size(f.read(2 * max(SECTOR_SIZES))) or 512
        disk = stack.enter_context(LoopDevice(raw, sector_size=sector, read_only=True))
        disk_guid, parts = _partition_table(str(disk), image.name)
        if len(parts) < 2:
            raise ImagebuildError(f"{image.name}: expected an ESP and a root partition, found {len(parts)}")
        root = parts[1]
        loop = stack.enter_context(LoopDevice(raw, sector_size=sector, read_only=True, offset=root.start * sector,
                                               size=root.size * sector))
        mnt = stack.enter_context(mounted(loop, work / "root", options="ro,norecovery"))
        yield OpenedImage(raw=raw, sector_size=sector, disk_guid=disk_guid, partitions=parts, root=mnt)
        failed = [proc.returncode for proc in comparing if proc.wait() != 0]
        if failed:
            raise ImageError(f"{image.name} does not hold the bytes of the raw image it was converted from "
                             f"(qemu-img compare: exit {failed[0]})",
                             hint="the conversion or the disk is faulty; build again")
