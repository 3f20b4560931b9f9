"""The gentoo ebuild repository from a mirror's snapshots/gentoo-latest.tar.xz, verified with
its detached .gpgsig as emerge-webrsync does, by the stage3's rules (loopback mirror, real gpg)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuild.errors import StageError
from imagebuild.gpg import GENTOO_SNAPSHOT_KEY_FINGERPRINT
from imagebuild.mirror import fetch_snapshot

from loopback_mirror import LoopbackMirror, SigningKeys, mirror_fixture, signing_keys_fixture  # noqa: F401

pytestmark = pytest.mark.integration


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "gentoo"
    (repo / "profiles").mkdir(parents=True)
    (repo / "profiles/repo_name").write_text("gentoo\n")
    (repo / "metadata").mkdir()
    (repo / "metadata/timestamp.chk").write_text("Tue, 24 Nov 2026 00:45:01 +0000\n")
    return repo


def test_a_signed_snapshot_is_fetched_once_and_unpacked(tmp_path: Path, mirror: LoopbackMirror) -> None:
    mirror.publish_snapshot(_repo(tmp_path))
    cache = tmp_path / "cache"
    tree, ident = fetch_snapshot(mirror.url, cache, keyring=mirror.keyring, trusted_keys=[mirror.key.fingerprint],
                                 progress=False)
    assert (tree / "profiles/repo_name").read_text() == "gentoo\n"
    assert (tree / "metadata/timestamp.chk").is_file(), "the snapshot's top directory is stripped"
    assert not list((cache / "downloads").glob("*.partial"))
    before = len(mirror.requested("snapshots/gentoo-latest.tar.xz"))
    again, same = fetch_snapshot(mirror.url, cache, keyring=mirror.keyring, trusted_keys=[mirror.key.fingerprint],
                                 progress=False)
    assert (again, same) == (tree, ident)
    assert len(mirror.requested("snapshots/gentoo-latest.tar.xz")) == before, "a cache hit downloads nothing"


def test_only_gentoos_snapshot_key_is_trusted_by_default(tmp_path: Path, mirror: LoopbackMirror) -> None:
    """The stage3's release key does not sign snapshots; the snapshot key does."""
    mirror.publish_snapshot(_repo(tmp_path))
    with pytest.raises(StageError) as caught:
        fetch_snapshot(mirror.url, tmp_path / "cache", keyring=mirror.keyring, progress=False)
    assert "not a trusted" in caught.value.message
    assert GENTOO_SNAPSHOT_KEY_FINGERPRINT in (caught.value.hint or "") or "trusted" in (caught.value.hint or "")
    assert not list((tmp_path / "cache").glob("snapshots/gentoo-*"))


@pytest.mark.parametrize("how", ["tampered", "stranger"])
def test_a_bad_snapshot_leaves_nothing(tmp_path: Path, mirror: LoopbackMirror, signing_keys: SigningKeys,
                                       how: str) -> None:
    relative = mirror.publish_snapshot(_repo(tmp_path), key=signing_keys.stranger if how == "stranger" else None)
    if how == "tampered":
        data = bytearray(mirror.path(relative).read_bytes())
        data[len(data) // 2] ^= 0xFF
        mirror.path(relative).write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(StageError) as caught:
        fetch_snapshot(mirror.url, cache, keyring=mirror.keyring, trusted_keys=[mirror.key.fingerprint],
                       progress=False)
    assert ("BAD signature" if how == "tampered" else "not in keyring") in caught.value.message
    assert "snapshots/gentoo-latest.tar.xz" in caught.value.message
    assert not list(cache.glob("snapshots/*")) and not list(cache.glob("downloads/*.partial"))
