"""The disk image: GPT with an ESP and an XFS root, made and filled without mounting FAT.

The host kernel may lack vfat (these build machines do), so the ESP is made with mkfs.vfat
on a loop device and filled with mtools; the root is XFS, filled through a loop mount.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import parted

from imagebuild.config import Arch, ImageLayout, MiB
from imagebuild.errors import ImageError
from imagebuild.mounts import LoopDevice, mounted
from imagebuild.run import run
from imagebuild.tree import walk_host

# Discoverable Partitions Specification root types: systemd's gpt-auto finds the root by them.
DPS_ROOT_TYPE = {
    Arch.amd64: "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    Arch.arm64: "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
    Arch.riscv64: "72EC70A6-CF74-40E6-BD49-4BDA08E8F224",
}
_ALIGN = 1 * MiB


@dataclasses.dataclass(frozen=True)
class Identifiers:
    disk_guid: str
    esp_guid: str
    root_guid: str
    esp_volume_id: str  # FAT serial, 8 hex digits
    root_uuid: str

    @property
    def esp_uuid(self) -> str:
        """The FAT serial as blkid and GRUB's search --fs-uuid spell it (ABCD-1234)."""
        return f"{self.esp_volume_id[:4]}-{self.esp_volume_id[4:]}".upper()

    @classmethod
    def make(cls, image_name: str) -> Identifiers:
        """Derived from SOURCE_DATE_EPOCH and the image name when set (reproducible), random otherwise."""
        epoch = os.environ.get("SOURCE_DATE_EPOCH")

        def ident(purpose: str) -> uuid.UUID:
            if epoch is None:
                return uuid.uuid4()
            return uuid.uuid5(uuid.NAMESPACE_URL, f"imagebuild:{epoch}:{image_name}:{purpose}")

        return cls(
            disk_guid=str(ident("disk")),
            esp_guid=str(ident("esp")),
            root_guid=str(ident("root")),
            esp_volume_id=ident("esp-fs").hex[:8].upper(),
            root_uuid=str(ident("root-fs")),
        )


@dataclasses.dataclass(frozen=True)
class Partition:
    number: int
    offset: int  # bytes
    size: int  # bytes


@dataclasses.dataclass(frozen=True)
class DiskLayout:
    esp: Partition
    root: Partition


def partition_image(raw: Path, layout: ImageLayout, arch: Arch, ids: Identifiers) -> DiskLayout:
    """Create the sparse raw file and write its GPT: ESP, then root filling the disk."""
    with open(raw, "wb") as f:
        f.truncate(layout.size)
    sector = layout.sector_size
    align = _ALIGN // sector
    # libparted and sfdisk take the logical sector size from a block device and assume 512
    # on a plain file, so the table is written through a loop device with the image's
    # sector size: the same code makes 512-byte and 4Kn images.
    with LoopDevice(raw, sector_size=sector) as loop, _parted_device(loop) as device:
        if device.sectorSize != sector:
            raise ImageError(f"{loop} has {device.sectorSize}-byte sectors, expected {sector}")
        disk = parted.freshDisk(device, "gpt")
        esp_start = align
        esp_end = esp_start + layout.esp_size // sector - 1
        root_start = esp_end + 1
        # Leave the last MiB for the backup GPT, keeping the root's end aligned (as Catalyst's -1M).
        root_end = (device.length // align) * align - align - 1
        constraint = parted.Constraint(device=device)
        for start, end, fstype, name, flag in [
            (esp_start, esp_end, "fat32", layout.esp_label, parted.PARTITION_BOOT),
            (root_start, root_end, "xfs", layout.root_label, None),
        ]:
            geometry = parted.Geometry(device=device, start=start, end=end)
            filesystem = parted.FileSystem(type=fstype, geometry=geometry)
            partition = parted.Partition(disk=disk, type=parted.PARTITION_NORMAL, fs=filesystem, geometry=geometry)
            disk.addPartition(partition, constraint)
            partition.set_name(name)
            if flag is not None:
                partition.setFlag(flag)  # on GPT this sets the ESP type GUID
        # To the device only: the kernel is not told of partitions on our loop device.
        disk.commitToDevice()
        # pyparted on bookworm (parted 3.5) cannot set type or unique GUIDs; sfdisk can (and,
        # unlike sgdisk, does not sleep a second after each write). Nor does it tell the kernel.
        sfdisk = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel"]
        run([*sfdisk, "--disk-id", loop, ids.disk_guid])
        run([*sfdisk, "--part-uuid", loop, "1", ids.esp_guid])
        run([*sfdisk, "--part-uuid", loop, "2", ids.root_guid])
        run([*sfdisk, "--part-type", loop, "2", DPS_ROOT_TYPE[arch]])
    return DiskLayout(
        esp=Partition(1, esp_start * sector, (esp_end - esp_start + 1) * sector),
        root=Partition(2, root_start * sector, (root_end - root_start + 1) * sector),
    )


@contextlib.contextmanager
def _parted_device(path: Path) -> Iterator[parted.Device]:
    """libparted's view of ``path``; it caches devices by path and loop devices are reused,
    so the entry is dropped after (else the next image could see this one's size)."""
    device = parted.getDevice(str(path))
    try:
        yield device
    finally:
        device.removeFromCache()


def tree_size(root: Path) -> int:
    """Bytes the tree occupies on disk (allocated blocks, hardlinks counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, dirs, files in walk_host(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(directory, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def check_fits(what: str, needed: int, available: int, option: str) -> None:
    if needed > available:
        raise ImageError(
            f"the {what} needs about {needed // MiB} MiB but the partition holds only {available // MiB} MiB",
            hint=f"make the image larger ({option}); the image is sparse, so size costs little disk",
        )


def check_free_space(directory: Path, data: int) -> None:
    """The sparse raw image takes as much real space as the data written into it (plus
    filesystem metadata): check before writing, rather than fail with I/O errors half-way."""
    needed = int(data * 1.1) + 128 * MiB
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ImageError(
            f"not enough free space in {directory} for the raw image: about {needed // MiB} MiB needed, "
            f"{free // MiB} MiB free",
            hint="free space there or point --work-dir at a larger filesystem",
        )


def make_esp(raw: Path, part: Partition, layout: ImageLayout, ids: Identifiers, esp_tree: Path) -> None:
    """FAT32 on partition 1, filled from ``esp_tree`` with mtools."""
    # FAT needs clusters for directories and slack; 10% + 4 MiB is generous for /boot.
    check_fits("EFI system partition (/boot)", int(_tree_bytes(esp_tree) * 1.1) + 4 * MiB, part.size,
               "diskimage/qcow2_efisize or --esp-size")
    with LoopDevice(raw, offset=part.offset, size=part.size, sector_size=layout.sector_size) as dev:
        run(["mkfs.vfat", "-F", "32", "-n", layout.esp_label, "-i", ids.esp_volume_id,
             "-S", str(layout.sector_size), dev])
        entries = sorted(esp_tree.iterdir())
        if entries:
            run(["mcopy", "-s", "-m", "-Q", "-i", dev, *entries, "::/"], env={"MTOOLS_SKIP_CHECK": "1"})


def _tree_bytes(tree: Path) -> int:
    """Bytes of the files in ``tree`` (the ESP tree: our own files and directories only)."""
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in walk_host(tree) for f in files)


def make_root(raw: Path, part: Partition, layout: ImageLayout, ids: Identifiers) -> None:
    """XFS on partition 2."""
    with LoopDevice(raw, offset=part.offset, size=part.size, sector_size=layout.sector_size) as dev:
        # nrext64=0: large extent counters are unreadable to older kernels (5.15) and GRUB.
        run(["mkfs.xfs", "-q", "-f", "-i", "nrext64=0", "-L", layout.root_label,
             "-m", f"uuid={ids.root_uuid}", dev])


@contextlib.contextmanager
def root_filesystem(raw: Path, part: Partition, layout: ImageLayout, mountpoint: Path) -> Iterator[Path]:
    """The XFS root (made by make_root) mounted on ``mountpoint`` for the block: the stage is
    unpacked straight into it, so the tree is written once. On the way out, the blocks of what
    the build deleted (/boot went to the ESP, the cleaned caches) are discarded, which punches
    them out of the sparse raw file: they would otherwise ship, compressed, in the image."""
    with LoopDevice(raw, offset=part.offset, size=part.size, sector_size=layout.sector_size) as dev:
        with mounted(dev, mountpoint, fstype=layout.root_fstype):
            yield mountpoint
        # XFS frees a deleted file's blocks in the background, after syncfs; an unmount waits
        # for all of it, so the trim runs on a fresh mount and sees every free block.
        with mounted(dev, mountpoint, fstype=layout.root_fstype):
            run(["fstrim", mountpoint])
            run(["sync", "-f", mountpoint])


def root_full(mountpoint: Path) -> bool:
    """Whether the mounted root filesystem has (nearly) no room left: an ENOSPC while
    writing it means the image is too small, not that the work directory is full."""
    st = os.statvfs(mountpoint)
    return st.f_bavail * st.f_frsize < 16 * MiB or st.f_favail < 64
