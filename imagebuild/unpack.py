"""Unpack a stage tarball into an empty directory, faithfully and safely.

Faithfully: numeric owners, modes (setuid included), extended attributes (file
capabilities), hardlinks, device nodes and timestamps survive. Safely: no member may land
outside the root — absolute names, ``..`` components, and writing through a symlink that
an earlier member created are all refused before anything is written for that member.
Completely: the archive must end with tar's end-of-archive marker (two zero blocks) and the
compressed stream must end where its format says it ends. Python's tarfile quietly treats a
cut at a member boundary, or a damaged header, as the end; a stage cut short that way would
build an image with files missing, so it is refused.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, cast

from imagebuild.config import STAGE_SUFFIXES
from imagebuild.errors import CommandError, StageError
from imagebuild.log import Progress, logger
from imagebuild.run import output_stream, run

_XATTR_PREFIX = "SCHILY.xattr."
_INODE_COST = 512  # what a member costs besides its data: an inode, a directory entry


def _member_path(name: str, tarball: Path) -> PurePosixPath:
    """Normalise a member name (``./etc/passwd`` -> ``etc/passwd``), refusing escapes."""
    if name.startswith("/"):
        raise StageError(
            f"unsafe stage tarball {tarball}: member '{name}' has an absolute path",
            hint="stage tarballs must hold relative paths (tar -C root -cf stage.tar .); "
            "do not use this tarball",
        )
    parts = [p for p in PurePosixPath(name).parts if p not in (".", "")]
    if ".." in parts:
        raise StageError(
            f"unsafe stage tarball {tarball}: member '{name}' points outside the root with '..'",
            hint="do not use this tarball; rebuild it from a clean tree",
        )
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


# Decompressors by the stream's magic number. xz goes through the xz program with -T0: Gentoo's
# stage3s are made by pixz, in blocks that xz 5.4+ decompresses on every core; Python 3.11 has no
# zstd module. Each program's exit status, and Python's gzip and bz2 readers, report a stream
# that is cut short or followed by garbage (tarfile's own decompression checks neither).
_XZ, _ZSTD, _GZIP, _BZIP2 = b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x1f\x8b", b"BZh"  # magic numbers
_PROGRAMS = {_XZ: ["xz", "-dc", "-q", "-T0", "--"], _ZSTD: ["zstd", "-dc", "-q", "--"]}


@contextlib.contextmanager
def _open_stream(tarball: Path) -> Iterator[IO[bytes]]:
    """A decompressed byte stream of ``tarball`` (or the file itself, an uncompressed tar)."""
    with open(tarball, "rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        program = next((cmd for prefix, cmd in _PROGRAMS.items() if magic.startswith(prefix)), None)
        if program is not None:
            with output_stream([*program, tarball]) as stream:
                yield stream
            return
        reader: IO[bytes] | None = None
        if magic.startswith(_GZIP):
            reader = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
        elif magic.startswith(_BZIP2):
            reader = cast(IO[bytes], bz2.BZ2File(raw, "rb"))
        if reader is not None:
            with reader:
                yield reader
            return
        yield raw


class _Unpacker:
    def __init__(self, tarball: Path, root: Path, room: int | None = None) -> None:
        self.tarball = tarball
        self.root = root
        self.room = room  # bytes the members may take (None: as many as the filesystem holds)
        self.written = 0
        self.symlinks: set[PurePosixPath] = set()
        self.files: set[PurePosixPath] = set()  # what a later hardlink may name
        self.directories: list[tuple[tarfile.TarInfo, str]] = []
        self.count = 0

    def check(self, member: tarfile.TarInfo) -> PurePosixPath:
        path = _member_path(member.name, self.tarball)
        for parent in path.parents:
            if parent in self.symlinks:
                raise StageError(
                    f"unsafe stage tarball {self.tarball}: member '{member.name}' would be written "
                    f"through the symlink '{parent}' that an earlier member created",
                    hint="do not use this tarball; it may try to overwrite files outside the root",
                )
        if member.islnk():
            target = _member_path(member.linkname, self.tarball)
            if any(p in self.symlinks for p in [target, *target.parents]):
                raise StageError(
                    f"unsafe stage tarball {self.tarball}: hardlink '{member.name}' goes through a symlink",
                    hint="do not use this tarball",
                )
            if target not in self.files:
                raise StageError(
                    f"stage tarball {self.tarball}: hardlink '{member.name}' points to '{member.linkname}', "
                    "which is not an earlier member of the archive",
                    hint="tar writes a hardlink after the file it links to; this tarball is damaged or was "
                    "not made by tar: rebuild it",
                )
            member.linkname = str(target)
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isdev()):
            raise StageError(
                f"stage tarball {self.tarball}: member '{member.name}' has an unsupported type",
                hint="stage tarballs hold files, directories, links and device nodes only",
            )
        return path

    def extract(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        path = self.check(member)
        # Counted from the header, before the member is written: a stage that unpacks to more
        # than it announced (or than the room there is) stops here, not in a full filesystem.
        self.written += (member.size if member.isreg() else 0) + _INODE_COST
        if self.room is not None and self.written > self.room:
            raise StageError(f"no space left while unpacking {self.tarball}: it holds more than the "
                             f"{self.room // 2**20} MiB there is room for")
        if path == PurePosixPath("."):
            self.directories.append((member, str(self.root)))
            return
        target = self.root / path
        member.name = str(path)
        if os.path.lexists(target):
            if member.isdir() and target.is_dir() and not target.is_symlink():
                pass
            elif target.is_dir() and not target.is_symlink():
                raise StageError(
                    f"stage tarball {self.tarball}: member '{path}' replaces a directory",
                    hint="the tarball has conflicting members; rebuild it",
                )
            else:
                # A later duplicate replaces the earlier entry; never open through it.
                target.unlink()
        if member.issym():
            self.symlinks.add(path)
        if member.isdir():
            tf.extract(member, self.root, set_attrs=False, numeric_owner=True, filter=_trusted)
            self.directories.append((member, str(target)))
        else:
            tf.extract(member, self.root, set_attrs=True, numeric_owner=True, filter=_trusted)
            if member.issym():
                # tarfile leaves a symlink's own timestamps at "now".
                os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
            else:
                self.files.add(path)
            _apply_xattrs(member, target)
        self.count += 1

    def finish(self, tf: tarfile.TarFile) -> None:
        # Directory modes, owners and times last, deepest first, as tar does: a read-only
        # directory must not stop its children from being written, and writing children
        # changes a directory's mtime.
        for member, target in sorted(self.directories, key=lambda d: d[1], reverse=True):
            tf.chown(member, target, numeric_owner=True)
            tf.utime(member, target)
            tf.chmod(member, target)
            _apply_xattrs(member, Path(target))


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped reading headers: only a zero block is an end-of-archive."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _EndAwareTarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_.imagebuild_end = exc  # type: ignore[attr-defined]
            raise


def _check_complete(tf: tarfile.TarFile, tarball: Path) -> None:
    """The archive ended with two zero blocks, and the (decompressed) stream ends after them."""
    # tarfile's header errors (not in its stubs): EOFHeaderError is a zero block, the end-of-
    # archive marker; EmptyHeaderError and TruncatedHeaderError mean the data simply stopped.
    end = getattr(tf, "imagebuild_end", None)
    if type(end).__name__ != "EOFHeaderError":
        cut = end is None or type(end).__name__ in ("EmptyHeaderError", "TruncatedHeaderError")
        why = "it stops without tar's end-of-archive marker" if cut else f"a header is damaged ({end})"
        raise StageError(
            f"stage tarball {tarball} is incomplete: {why} ({tf.offset} bytes in)",
            hint="the download or copy was cut short or damaged; fetch it again and check it against its "
            ".DIGESTS file",
        )
    assert tf.fileobj is not None
    second = tf.fileobj.read(tarfile.BLOCKSIZE)
    if second != bytes(tarfile.BLOCKSIZE):
        raise StageError(
            f"stage tarball {tarball} is incomplete: its end-of-archive marker is one zero block, not two",
            hint="the archive was cut short; fetch it again and check it against its .DIGESTS file",
        )
    # Read to the end: the decompressor checks that its stream ends properly (xz, gzip, bzip2
    # here; zstd's exit status in run.output_stream).
    while tf.fileobj.read(1 << 20):
        pass


def _trusted(member: tarfile.TarInfo, _dest: str) -> tarfile.TarInfo:
    # Every member has passed _Unpacker.check; keep setuid bits and owners intact.
    return member


def _apply_xattrs(member: tarfile.TarInfo, target: Path) -> None:
    for key, value in member.pax_headers.items():
        if key.startswith(_XATTR_PREFIX):
            name = key[len(_XATTR_PREFIX) :]
            data = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(target, name, data, follow_symlinks=False)
            except OSError as exc:
                logger.warning("could not set xattr %s on %s: %s", name, target, exc)


def unpacked_size(tarball: Path) -> int:
    """About how many bytes ``tarball`` unpacks to (the tar stream's size), before unpacking it:
    what the root filesystem and the work directory must hold. A plain tar is its own size;
    xz and zstd record it (``--list``); gzip in its trailer (modulo 4 GiB); bzip2 nowhere, so a
    generous guess. Untrusted, so only a hint for the checks before writing: an unpack that
    runs out of room is still caught while writing."""
    size = tarball.stat().st_size
    with open(tarball, "rb") as f:
        magic = f.read(6)
        if magic.startswith(_GZIP) and size >= 18:
            f.seek(-4, os.SEEK_END)
            trailer = int.from_bytes(f.read(4), "little")
            return max(trailer, size)
    # A listing that fails or lacks the size (zstd written to a pipe records none) is no size.
    with contextlib.suppress(CommandError, OSError, StopIteration, ValueError, IndexError):
        if magic.startswith(_XZ):
            listing = run(["xz", "--robot", "--list", "--", tarball]).stdout.decode().splitlines()
            totals = next(line.split("\t") for line in listing if line.startswith("totals\t"))
            return int(totals[4])
        if magic.startswith(_ZSTD):
            listing = run(["zstd", "--list", "-v", "--", tarball]).stdout.decode().splitlines()
            found = next(line for line in listing if line.strip().startswith("Decompressed Size:"))
            return int(found.rsplit("(", 1)[1].split()[0])
    if magic.startswith((_XZ, _ZSTD, _BZIP2)):
        return size * 5  # no size recorded: xz/zstd/bzip2 stages shrink about 3-5 times
    return size


def unpack_stage(tarball: Path, root: Path, room: int | None = None, *, expected: int | None = None) -> int:
    """Extract ``tarball`` into the empty directory ``root``; return the number of members.
    ``room``: the bytes the members may take; a stage that needs more is refused before the
    member that would not fit is written. ``expected``: its unpacked_size(), for a progress
    bar on a terminal (None: no bar)."""
    if not tarball.is_file():
        raise StageError(
            f"stage tarball {tarball} does not exist or is not a file",
            hint=f"give the path of a stage3 or seed tarball ({', '.join(STAGE_SUFFIXES)})",
        )
    root.mkdir(parents=True, exist_ok=True)
    unpacker = _Unpacker(tarball, root, room)
    try:
        with _open_stream(tarball) as stream, \
                tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndAwareTarInfo) as tf, \
                Progress("unpack", expected or 1, enabled=expected is not None) as bar:
            tf.errorlevel = 2
            for member in tf:
                unpacker.extract(tf, member)
                bar.update(unpacker.written)
            _check_complete(tf, tarball)
            unpacker.finish(tf)
    except StageError:
        raise
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError, CommandError) as exc:
        if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
            raise StageError(
                f"no space left while unpacking {tarball} into {root}",
                hint="free space there or point --work-dir at a larger filesystem",
            ) from exc
        raise StageError(
            f"stage tarball {tarball} is corrupt, truncated or not a tar archive ({exc})",
            hint="download it again and check it against its .DIGESTS file",
        ) from exc
    if unpacker.count == 0:
        raise StageError(f"stage tarball {tarball} is empty", hint="give a real stage3 or seed tarball")
    return unpacker.count
