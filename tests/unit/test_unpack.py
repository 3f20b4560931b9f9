"""Stage unpacking: faithful to owners, modes and links; refuses every way out of the root."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagebuild.errors import StageError
from imagebuild.unpack import unpack_stage

pytestmark = pytest.mark.unit


def _add(tf: tarfile.TarFile, name: str, *, data: bytes = b"", type: bytes = tarfile.REGTYPE,
         linkname: str = "", mode: int = 0o644, uid: int = 0, gid: int = 0,
         pax: dict[str, str] | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type = type
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = 1_700_000_000
    info.linkname = linkname
    if pax:
        info.pax_headers = pax
    if type == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def _tar(path: Path, members: list[dict], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for member in members:
            _add(tf, **member)
    return path


def test_unpacks_owners_modes_links_and_xattrs(tmp_path: Path) -> None:
    tarball = _tar(tmp_path / "stage.tar", [
        {"name": "./", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "./usr", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "./usr/bin", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "./usr/bin/su", "data": b"suid", "mode": 0o4755},
        {"name": "./usr/bin/ping", "data": b"ping", "mode": 0o755,
         "pax": {"SCHILY.xattr.user.imagebuild-test": "cap"}},
        {"name": "./usr/bin/ping-hard", "type": tarfile.LNKTYPE, "linkname": "./usr/bin/ping"},
        {"name": "./bin", "type": tarfile.SYMTYPE, "linkname": "usr/bin"},
        {"name": "./home", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "./home/larry", "type": tarfile.DIRTYPE, "mode": 0o700, "uid": 1000, "gid": 1000},
        {"name": "./proc", "type": tarfile.DIRTYPE, "mode": 0o555},
        {"name": "./etc", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "./etc/localtime", "type": tarfile.SYMTYPE, "linkname": "/usr/share/zoneinfo/UTC"},
    ])
    root = tmp_path / "root"
    assert unpack_stage(tarball, root) == 11
    su = (root / "usr/bin/su").stat()
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert (root / "usr/bin/ping").stat().st_ino == (root / "usr/bin/ping-hard").stat().st_ino
    assert os.readlink(root / "bin") == "usr/bin"
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.lstat(root / "etc/localtime").st_mtime == 1_700_000_000
    larry = (root / "home/larry").stat()
    assert (larry.st_uid, larry.st_gid, stat.S_IMODE(larry.st_mode)) == (1000, 1000, 0o700)
    assert stat.S_IMODE((root / "proc").stat().st_mode) == 0o555
    assert (root / "usr/bin").stat().st_mtime == 1_700_000_000
    assert os.getxattr(root / "usr/bin/ping", "user.imagebuild-test") == b"cap"


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz", "zst"])
def test_compressed_formats(tmp_path: Path, fmt: str) -> None:
    plain = _tar(tmp_path / "stage.tar", [{"name": "./etc", "type": tarfile.DIRTYPE},
                                         {"name": "./etc/os-release", "data": b"ID=gentoo\n"}])
    tool = {"gz": "gzip", "bz2": "bzip2", "xz": "xz", "zst": "zstd"}[fmt]
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is needed to make the test tarball (ci/setup installs it)")
    subprocess.run([tool, "-q", "-k", "-f", str(plain)], check=True)
    compressed = plain.with_name(f"stage.tar.{fmt}")
    assert compressed.exists()
    unpack_stage(compressed, tmp_path / "root")
    assert (tmp_path / "root/etc/os-release").read_text() == "ID=gentoo\n"


@pytest.mark.parametrize(
    "members, words",
    [
        ([{"name": "/etc/passwd", "data": b"x"}], "absolute path"),
        ([{"name": "./../escaped", "data": b"x"}], "'..'"),
        ([{"name": "etc/../../escaped", "data": b"x"}], "'..'"),
        ([{"name": "./evil", "type": tarfile.SYMTYPE, "linkname": "{outside}"},
          {"name": "./evil/planted", "data": b"pwned"}], "through the symlink"),
        ([{"name": "./evil", "type": tarfile.SYMTYPE, "linkname": "{outside}"},
          {"name": "./hard", "type": tarfile.LNKTYPE, "linkname": "./evil/planted"}], "through a symlink"),
        ([{"name": "./x", "type": tarfile.LNKTYPE, "linkname": "../../etc/shadow"}], "'..'"),
    ],
)
def test_refuses_members_outside_the_root(tmp_path: Path, members: list[dict], words: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for member in members:
        member["linkname"] = member.get("linkname", "").replace("{outside}", str(outside))
    tarball = _tar(tmp_path / "evil.tar", members)
    with pytest.raises(StageError, match="unsafe stage tarball") as info:
        unpack_stage(tarball, tmp_path / "root")
    assert words in str(info.value)
    assert str(tarball) in str(info.value)
    assert list(outside.iterdir()) == []


def test_duplicate_member_never_writes_through_an_earlier_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("original")
    tarball = _tar(tmp_path / "dup.tar", [
        {"name": "./file", "type": tarfile.SYMTYPE, "linkname": str(victim)},
        {"name": "./file", "data": b"replaced"},
    ])
    unpack_stage(tarball, tmp_path / "root")
    assert victim.read_text() == "original"
    assert (tmp_path / "root/file").read_text() == "replaced"
    assert not (tmp_path / "root/file").is_symlink()


def test_truncated_tarball_is_reported(tmp_path: Path) -> None:
    good = _tar(tmp_path / "stage.tar", [{"name": "./big", "data": os.urandom(100_000)}])
    subprocess.run(["xz", "-q", "-k", "-f", str(good)], check=True)
    xz = good.with_name("stage.tar.xz")
    truncated = tmp_path / "truncated.tar.xz"
    truncated.write_bytes(xz.read_bytes()[: xz.stat().st_size // 2])
    with pytest.raises(StageError, match="corrupt, truncated or not a tar archive") as info:
        unpack_stage(truncated, tmp_path / "root")
    assert "truncated.tar.xz" in str(info.value)


def test_not_a_tarball(tmp_path: Path) -> None:
    bogus = tmp_path / "stage.tar.xz"
    bogus.write_bytes(b"this is not a tarball at all\n" * 100)
    with pytest.raises(StageError, match="corrupt, truncated or not a tar archive"):
        unpack_stage(bogus, tmp_path / "root")


def test_missing_tarball(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="does not exist"):
        unpack_stage(tmp_path / "nope.tar", tmp_path / "root")


# --- whole archives only ----------------------------------------------------------------------
# Archives made by GNU tar, as stages are, then cut or damaged the ways downloads and copies are.

def _gnu_tar(tmp_path: Path, compress: list[str] | None = None) -> Path:
    """A three-file archive by GNU tar (two zero blocks at the end, padded to 10 KiB), optionally
    compressed by the real tool."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    for name, size in (("etc/a", 3000), ("etc/b", 700), ("etc/c", 5)):
        (tree / name).write_bytes(os.urandom(size))
    tarball = tmp_path / "stage.tar"
    subprocess.run(["tar", "-C", str(tree), "-cf", str(tarball), "."], check=True)
    if compress:
        subprocess.run([*compress, str(tarball)], check=True)
        return next(p for p in tmp_path.glob("stage.tar.*"))
    return tarball


def _members_end(tarball: Path) -> int:
    """The byte offset where the last member's data (padded) ends: the end-of-archive marker."""
    with tarfile.open(tarball) as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def _refused(tarball: Path, tmp_path: Path, message: str) -> None:
    with pytest.raises(StageError, match=message) as info:
        unpack_stage(tarball, tmp_path / "root")
    assert tarball.name in info.value.message and "DIGESTS" in (info.value.hint or "")


def test_a_whole_gnu_tar_unpacks(tmp_path: Path) -> None:
    unpack_stage(_gnu_tar(tmp_path), tmp_path / "root")
    assert sorted(p.name for p in (tmp_path / "root/etc").iterdir()) == ["a", "b", "c"]


def test_a_tar_cut_at_a_member_boundary_is_refused(tmp_path: Path) -> None:
    tarball = _gnu_tar(tmp_path)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tarball.read_bytes()[: _members_end(tarball)])
    _refused(cut, tmp_path, "incomplete: it stops without tar's end-of-archive marker")


def test_a_tar_with_one_zero_block_is_refused(tmp_path: Path) -> None:
    tarball = _gnu_tar(tmp_path)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tarball.read_bytes()[: _members_end(tarball) + 512])
    _refused(cut, tmp_path, "one zero block, not two")


def test_a_damaged_header_is_refused(tmp_path: Path) -> None:
    tarball = _gnu_tar(tmp_path)
    data = bytearray(tarball.read_bytes())
    with tarfile.open(tarball) as tf:
        third = tf.getmembers()[3]
    data[third.offset:third.offset + 100] = b"\xff" * 100  # the name and the checksum no longer agree
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    _refused(damaged, tmp_path, "incomplete: a header is damaged")


@pytest.mark.parametrize("tool", [["xz", "-q"], ["gzip", "-q"], ["bzip2", "-q"], ["zstd", "-q", "--rm"]])
def test_a_cut_compressed_stream_is_refused(tmp_path: Path, tool: list[str]) -> None:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    compressed = _gnu_tar(tmp_path, tool)
    cut = tmp_path / f"cut{compressed.suffix}"
    cut.write_bytes(compressed.read_bytes()[:-12])  # the stream's end (checksum, end marker) is gone
    with pytest.raises(StageError, match="corrupt, truncated or not a tar archive|incomplete"):
        unpack_stage(cut, tmp_path / "root")


@pytest.mark.parametrize("tool", [["xz", "-q"], ["gzip", "-q"], ["zstd", "-q", "--rm"]])
def test_garbage_after_the_compressed_stream_is_refused(tmp_path: Path, tool: list[str]) -> None:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    compressed = _gnu_tar(tmp_path, tool)
    garbage = tmp_path / f"garbage{compressed.suffix}"
    garbage.write_bytes(compressed.read_bytes() + b"this is not part of the archive" * 10)
    with pytest.raises(StageError, match="corrupt, truncated or not a tar archive|incomplete"):
        unpack_stage(garbage, tmp_path / "root")


@pytest.mark.parametrize(("name", "members"), [
    ("missing", [{"name": "./a", "type": tarfile.LNKTYPE, "linkname": "./nothere"}]),
    ("later", [{"name": "./a", "type": tarfile.LNKTYPE, "linkname": "./b"}, {"name": "./b", "data": b"x"}]),
    ("itself", [{"name": "./a", "type": tarfile.LNKTYPE, "linkname": "./a"}]),
    ("directory", [{"name": "./d", "type": tarfile.DIRTYPE}, {"name": "./a", "type": tarfile.LNKTYPE,
                                                                "linkname": "./d"}]),
])
def test_a_hardlink_must_name_an_earlier_file(tmp_path: Path, name: str, members: list[dict]) -> None:
    tarball = _tar(tmp_path / f"{name}.tar", members)
    with pytest.raises(StageError, match="which is not an earlier member of the archive"):
        unpack_stage(tarball, tmp_path / "root")


def test_a_hardlink_to_an_earlier_file_is_a_hardlink(tmp_path: Path) -> None:
    tarball = _tar(tmp_path / "ok.tar", [{"name": "./b", "data": b"x"},
                                         {"name": "./a", "type": tarfile.LNKTYPE, "linkname": "./b"}])
    unpack_stage(tarball, tmp_path / "root")
    assert (tmp_path / "root/a").stat().st_ino == (tmp_path / "root/b").stat().st_ino


def test_unpacked_size_of_a_zstd_stream_without_a_recorded_size(tmp_path: Path) -> None:
    """zstd writing to a pipe records no size: the estimate falls back to a guess, no traceback."""
    import subprocess

    from imagebuild.unpack import unpacked_size

    data = tmp_path / "data"
    data.write_bytes(b"stage\n" * 100_000)
    stage = tmp_path / "stage.tar.zst"
    with data.open("rb") as src, stage.open("wb") as out:
        subprocess.run(["zstd", "-q", "-c"], stdin=src, stdout=out, check=True)
    assert "Decompressed" not in subprocess.run(["zstd", "--list", "-v", str(stage)], capture_output=True,
                                                text=True).stdout
    assert unpacked_size(stage) == stage.stat().st_size * 5
