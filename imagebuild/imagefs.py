"""Open a finished qcow2 image read-only to look inside it, without booting it.

The qcow2 is converted to a sparse raw copy in a private directory (the image itself is
never opened for writing), the root partition is attached to a read-only loop device and
mounted ``ro,norecovery``, and the ESP is read with mtools (no vfat in the kernel needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imagebuild.errors import ImagebuildError
from imagebuild.mounts import mounted, remove_tree
from imagebuild.run import run

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


def _partition_table(raw: Path) -> tuple[int, str, list[GptPartition]]:
    table = json.loads(run(["sfdisk", "--json", raw], check=False).stdout or b"{}").get("partitiontable")
    if not table or table.get("label") != "gpt":
        raise ImagebuildError(f"{raw.name}: no GPT partition table", hint="is this an imagebuild disk image?")
    parts = [GptPartition(int(p["node"].rsplit(raw.name, 1)[-1]), p["start"], p["size"], p["type"],
                          p.get("uuid", ""), p.get("name", "")) for p in table["partitions"]]
    return table.get("sectorsize", 512), table["id"], parts


@contextlib.contextmanager
def open_image(image: Path, scratch: Path | None = None) -> Iterator[OpenedImage]:
    info = json.loads(run(["qemu-img", "info", "--output=json", image], check=False).stdout or b"{}")
    if info.get("format") != "qcow2":
        raise ImagebuildError(
            f"{image} is not a qcow2 image (qemu-img sees '{info.get('format', 'nothing readable')}')",
            hint="give the .qcow2 file a build produced",
        )
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="imagebuild-open-", dir=scratch))
        stack.callback(remove_tree, work)
        raw = work / "disk.raw"
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw])
        sector, disk_guid, parts = _partition_table(raw)
        if len(parts) < 2:
            raise ImagebuildError(f"{image.name}: expected an ESP and a root partition, found {len(parts)}")
        root = parts[1]
        loop = run(["losetup", "--find", "--show", "--read-only", "--offset", str(root.start * sector),
                    "--sizelimit", str(root.size * sector), "--sector-size", str(sector), raw]).stdout.decode().strip()
        stack.callback(run, ["losetup", "--detach", loop], check=False)
        mnt = stack.enter_context(mounted(loop, work / "root", options="ro,norecovery"))
        yield OpenedImage(raw=raw, sector_size=sector, disk_guid=disk_guid, partitions=parts, root=mnt)
