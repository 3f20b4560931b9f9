"""Breaking a gpkg binary package the ways a binhost can be broken (for gentoo_standin.tampered_copy).

A gpkg (Portage's GLEP 78 format) is a tar of ``<name>/gpkg-1``, ``metadata.tar.zst``,
``image.tar.zst``, a detached armoured signature ``*.sig`` of each archive, and a
``Manifest`` (size and digests of every member, the ``.sig`` files too) that is clearsigned.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from loopback_mirror import SigningKey

# The Manifest's digest names -> hashlib's.
HASHES = {"BLAKE2B": "blake2b", "SHA512": "sha512", "SHA256": "sha256", "SHA1": "sha1", "MD5": "md5"}


def flip_image_bytes(gpkg: Path) -> None:
    """Invert 16 bytes in the middle of the package's image archive, in place (same size)."""
    with tarfile.open(gpkg) as tar:
        image = next(m for m in tar.getmembers()
                     if m.name.rsplit("/", 1)[-1].startswith("image.") and not m.name.endswith(".sig"))
        offset = image.offset_data + image.size // 2
    with gpkg.open("r+b") as f:
        f.seek(offset)
        chunk = f.read(16)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in chunk))


def resign(gpkg: Path, key: SigningKey | None) -> None:
    """Rewrite ``gpkg`` with no signature at all (``key`` None: no .sig members, a plain
    Manifest), or signed throughout by ``key``: new .sig members, their Manifest records, and
    the Manifest clearsigned."""
    with tarfile.open(gpkg) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()]  # type: ignore[union-attr]
    manifest_name = next(m.name for m, _ in members if m.name.endswith("/Manifest"))
    manifest = unclearsign(next(data for m, data in members if m.name == manifest_name).decode())
    records = {line.split()[1]: line.split() for line in manifest.splitlines() if line.strip()}
    out: list[tuple[tarfile.TarInfo, bytes]] = []
    for info, data in members:
        if info.name.endswith(".sig") or info.name == manifest_name:
            continue
        out.append((info, data))
        if key is not None:
            signature = key.detach_sign(data)
            sig = tarfile.TarInfo(info.name + ".sig")
            sig.size, sig.mtime, sig.mode = len(signature), info.mtime, info.mode
            out.append((sig, signature))
    names = []
    for info, data in out:
        name = info.name.rsplit("/", 1)[1]
        names.append(name)
        algorithms = records[name][3::2] if name in records else ["BLAKE2B", "SHA512"]
        records[name] = ["DATA", name, str(len(data))] + [
            x for algorithm in algorithms for x in (algorithm, hashlib.new(HASHES[algorithm], data).hexdigest())]
    text = "".join(" ".join(records[name]) + "\n" for name in names)
    manifest_data = key.clearsign(text) if key is not None else text.encode()
    info = tarfile.TarInfo(manifest_name)
    info.mtime = out[-1][0].mtime
    out.append((info, manifest_data))
    with tarfile.open(gpkg, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in out:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def unclearsign(text: str) -> str:
    """The signed text of a clearsigned message (dash-escaping undone); plain text as it is."""
    if "-----BEGIN PGP SIGNED MESSAGE-----" not in text:
        return text
    body = text.split("\n\n", 1)[1].split("-----BEGIN PGP SIGNATURE-----", 1)[0]
    return "".join(line[2:] if line.startswith("- ") else line for line in body.splitlines(keepends=True))
