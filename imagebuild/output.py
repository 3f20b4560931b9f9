"""What a build publishes: the compressed qcow2, Gentoo-style DIGESTS, CONTENTS.gz, a manifest.

Every file is written under a temporary name in the output directory and renamed into
place at the end, the image last, so nobody ever sees a half-written image under its name.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imagebuild.config import Compression
from imagebuild.errors import CommandError, ImageError
from imagebuild.log import Progress
from imagebuild.qcow2 import write_compressed_qcow2
from imagebuild.run import run
from imagebuild.tree import walk_host

_CHUNK = 4 * 1024 * 1024


def temporary_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def convert_to_qcow2(raw: Path, target: Path, compression: Compression) -> None:
    """Compressed qcow2: zlib by imagebuild's own writer on every core (imagebuild.qcow2),
    zstd by qemu-img with 16 coroutines and out-of-order writes (-m 16 -W)."""
    try:
        if compression == Compression.zlib:
            with Progress("qcow2", 1) as bar:
                write_compressed_qcow2(raw, target, progress=bar.update)
        else:
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-m", "16", "-W",
                 "-o", "compression_type=zstd", raw, target])
    except (CommandError, OSError) as exc:
        full = exc.errno == errno.ENOSPC if isinstance(exc, OSError) else "No space left" in exc.message
        if full:
            raise ImageError(
                f"no space left in {target.parent} while writing the qcow2 image",
                hint="free space there or choose another --output; the image needs up to the size of "
                "the root tree (compressed, usually less)",
            ) from exc
        raise


def file_digests(path: Path) -> dict[str, str]:
    """BLAKE2B and SHA512 of ``path``, each on its own core (hashlib lets go of the GIL)."""

    def digest(algorithm: str) -> str:
        hasher = hashlib.new(algorithm)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
        return hasher.hexdigest()

    with ThreadPoolExecutor(2) as pool:
        blake2b, sha512 = pool.map(digest, ("blake2b", "sha512"))
    return {"BLAKE2B": blake2b, "SHA512": sha512}


def digests_text(entries: dict[str, dict[str, str]]) -> str:
    """Gentoo's DIGESTS format: a '# <ALGO> HASH' line, then '<hex>  <file name>', per file."""
    lines = []
    for name, digests in entries.items():
        for algo in ("BLAKE2B", "SHA512"):
            lines += [f"# {algo} HASH", f"{digests[algo]}  {name}"]
    return "\n".join(lines) + "\n"


def _mode_string(mode: int) -> str:
    return stat.filemode(mode)


def _stamp(mtime: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(mtime))
    except (OverflowError, OSError, ValueError):  # a time no calendar holds (the stage's, not ours)
        return "????-??-?? ??:??"


def contents_lines(root: Path, esp: Path) -> list[str]:
    """One line per path in the image, like a tar listing: mode, owner, size, time, path."""
    lines: list[str] = []

    def walk(base: Path, prefix: str) -> None:
        for directory, dirs, files in walk_host(base):
            for name in sorted(dirs + files):
                path = Path(directory) / name
                st = path.lstat()
                rel = prefix + "/" + str(path.relative_to(base))
                stamp = _stamp(st.st_mtime)
                line = f"{_mode_string(st.st_mode)} {st.st_uid}/{st.st_gid} {st.st_size:>10} {stamp} {rel}"
                if stat.S_ISLNK(st.st_mode):
                    line += f" -> {os.readlink(path)}"
                lines.append(line)

    walk(root, "")
    walk(esp, "/boot")
    return lines


def write_contents(lines: list[str], target: Path) -> None:
    # mtime=0 keeps the gzip header free of the build time.
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))


def write_json(data: dict[str, object], target: Path) -> None:
    target.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def tool_versions() -> dict[str, str]:
    versions = {}
    for tool, args in (("qemu-img", ["--version"]), ("mkfs.xfs", ["-V"]), ("mcopy", ["--version"]),
                       ("sfdisk", ["--version"])):
        result = run([tool, *args], check=False)
        text = (result.stdout or result.stderr).decode(errors="replace").strip().splitlines()
        versions[tool] = text[0] if text else "unknown"
    return versions
