"""Unpack a stage tarball into an empty directory, faithfully and safely.

Faithfully: numeric owners, modes (setuid included), extended attributes (file
capabilities), hardlinks, device nodes and timestamps survive. Safely: no member may land
outside the root — absolute names, ``..`` components, and writing through a symlink that
an earlier member created are all refused before anything is written for that member.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from imagebuild.config import STAGE_SUFFIXES
from imagebuild.errors import StageError
from imagebuild.log import logger
from imagebuild.run import output_stream

_XATTR_PREFIX = "SCHILY.xattr."


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


@contextlib.contextmanager
def _open_stream(tarball: Path) -> Iterator[IO[bytes]]:
    """A decompressed byte stream of ``tarball``; zstd goes through the zstd program."""
    with open(tarball, "rb") as raw:
        if raw.read(4) == b"\x28\xb5\x2f\xfd":
            # Python 3.11 has no zstd module: the zstd program decompresses into tarfile.
            with output_stream(["zstd", "-dc", "-q", "--", tarball]) as stream:
                yield stream
        else:
            raw.seek(0)
            yield raw


class _Unpacker:
    def __init__(self, tarball: Path, root: Path) -> None:
        self.tarball = tarball
        self.root = root
        self.symlinks: set[PurePosixPath] = set()
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
            member.linkname = str(target)
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isdev()):
            raise StageError(
                f"stage tarball {self.tarball}: member '{member.name}' has an unsupported type",
                hint="stage tarballs hold files, directories, links and device nodes only",
            )
        return path

    def extract(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        path = self.check(member)
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


def unpack_stage(tarball: Path, root: Path) -> int:
    """Extract ``tarball`` into the empty directory ``root``; return the number of members."""
    if not tarball.is_file():
        raise StageError(
            f"stage tarball {tarball} does not exist or is not a file",
            hint=f"give the path of a stage3 or seed tarball ({', '.join(STAGE_SUFFIXES)})",
        )
    root.mkdir(parents=True, exist_ok=True)
    unpacker = _Unpacker(tarball, root)
    try:
        with _open_stream(tarball) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            tf.errorlevel = 2
            for member in tf:
                unpacker.extract(tf, member)
            unpacker.finish(tf)
    except StageError:
        raise
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as exc:
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
