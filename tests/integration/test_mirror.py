"""Stage3 from a mirror, against a real HTTP server on loopback and real GnuPG signatures.

The mirror (tests/loopback_mirror.py) has Gentoo's layout and file formats and is signed with
a throwaway key the tests make; only Gentoo's servers and key are replaced. Every failure must
be a StageError that names the file and says what to do, with nothing left in <cache>/stages/.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild import mirror as mirror_module
from imagebuild.config import Arch
from imagebuild.errors import StageError
from imagebuild.gpg import GENTOO_RELEASE_KEY_FINGERPRINT
from imagebuild.mirror import fetch_stage, flavour_from_source_subpath
from loopback_mirror import LoopbackMirror, SigningKeys, mirror_fixture, signing_keys_fixture  # noqa: F401

pytestmark = pytest.mark.integration

FLAVOUR = "amd64-openrc"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """imagebuild's log lines (its logger stops propagating once the CLI has set it up)."""
    logger = logging.getLogger("imagebuild")
    logger.addHandler(caplog.handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)


def fetch(mirror: LoopbackMirror, cache: Path, **kwargs: object) -> Path:
    kwargs.setdefault("keyring", mirror.keyring)
    kwargs.setdefault("trusted_keys", [mirror.key.fingerprint])
    return fetch_stage(mirror.url, Arch.amd64, FLAVOUR, cache, progress=False, **kwargs)  # type: ignore[arg-type]


def fetch_fails(mirror: LoopbackMirror, cache: Path, *, base_url: str | None = None, **kwargs: object) -> str:
    """Fetch, expect a StageError, check nothing reached the cache; return the message (with hint)."""
    kwargs.setdefault("keyring", mirror.keyring)
    kwargs.setdefault("trusted_keys", [mirror.key.fingerprint])
    with pytest.raises(StageError) as caught:
        fetch_stage(base_url or mirror.url, Arch.amd64, FLAVOUR, cache,
                    progress=False, **kwargs)  # type: ignore[arg-type]
    stages = cache / "stages"
    assert not stages.exists() or list(stages.iterdir()) == [], f"left in the cache: {list(stages.iterdir())}"
    assert caught.value.hint, "every failure says what to do next"
    return str(caught.value)


def partials(cache: Path) -> list[Path]:
    return sorted((cache / "downloads").glob("*.partial"))


def test_success(mirror: LoopbackMirror, cache: Path) -> None:
    stage = fetch(mirror, cache)
    assert stage == cache / "stages" / mirror.tarball_name
    assert stage.read_bytes() == mirror.path(mirror.tarball).read_bytes()
    record = (cache / "stages" / f"{mirror.tarball_name}.verified.json").read_text()
    assert mirror.key.fingerprint in record
    assert partials(cache) == []
    assert [r.range for r in mirror.requested(mirror.tarball)] == [None]
    assert len(mirror.requested(mirror.pointer)) == len(mirror.requested(mirror.digests)) == 1


def test_cache_hit_downloads_nothing(mirror: LoopbackMirror, cache: Path, log: pytest.LogCaptureFixture) -> None:
    first = fetch(mirror, cache)
    second = fetch(mirror, cache)
    assert second == first
    assert len(mirror.requested(mirror.tarball)) == 1, "the second fetch downloaded the tarball again"
    assert len(mirror.requested(mirror.digests)) == 2, "the cache is checked against the current DIGESTS"
    assert "cache hit" in log.text


def test_new_release_replaces_stale_cache_entry(mirror: LoopbackMirror, cache: Path) -> None:
    fetch(mirror, cache)
    # The same name with other content (a re-spun release): the old entry must not be used.
    tarball = mirror.path(mirror.tarball)
    tarball.write_bytes(tarball.read_bytes()[:-1] + b"\0")
    mirror.write_digests()
    stage = fetch(mirror, cache)
    assert stage.read_bytes() == tarball.read_bytes()
    assert len(mirror.requested(mirror.tarball)) == 2


def test_interrupted_download_resumes(mirror: LoopbackMirror, cache: Path) -> None:
    size = mirror.path(mirror.tarball).stat().st_size
    mirror.drop_after[mirror.tarball] = size // 2
    message = fetch_fails(mirror, cache)
    assert mirror.tarball in message and f"after {size // 2} of {size} bytes" in message
    assert "run again to resume" in message
    assert [p.stat().st_size for p in partials(cache)] == [size // 2]

    mirror.drop_after.clear()
    stage = fetch(mirror, cache)
    assert mirror.requested(mirror.tarball)[-1].range == f"bytes={size // 2}-"
    assert stage.read_bytes() == mirror.path(mirror.tarball).read_bytes()
    assert partials(cache) == []


def test_server_ignoring_range_restarts_from_zero(mirror: LoopbackMirror, cache: Path) -> None:
    size = mirror.path(mirror.tarball).stat().st_size
    mirror.drop_after[mirror.tarball] = size // 3
    fetch_fails(mirror, cache)
    mirror.drop_after.clear()
    mirror.ignore_range = True
    stage = fetch(mirror, cache)
    assert mirror.requested(mirror.tarball)[-1].range == f"bytes={size // 3}-"
    assert stage.read_bytes() == mirror.path(mirror.tarball).read_bytes()


def test_digest_mismatch(mirror: LoopbackMirror, cache: Path) -> None:
    tarball = mirror.path(mirror.tarball)
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content: only the digests can tell
    tarball.write_bytes(bytes(data))
    message = fetch_fails(mirror, cache)
    assert "SHA512" in message and "BLAKE2B" in message and mirror.tarball in message
    assert "does not match its signed DIGESTS" in message
    assert partials(cache) == [], "a download that failed its digests must be deleted"


def test_only_sha512_listed_is_enough(mirror: LoopbackMirror, cache: Path) -> None:
    mirror.write_digests(algorithms=("sha512",))
    assert fetch(mirror, cache).is_file()


def test_digests_without_an_entry_for_the_tarball(mirror: LoopbackMirror, cache: Path) -> None:
    mirror.write_signed(mirror.digests, "# SHA512 HASH\n" + "0" * 128 + "  some-other-file.tar.xz\n")
    message = fetch_fails(mirror, cache)
    assert f"lists no SHA512 or BLAKE2B digest for {mirror.tarball_name}" in message
    assert mirror.requested(mirror.tarball) == []


def test_bad_signature_on_digests(mirror: LoopbackMirror, signing_keys: SigningKeys, cache: Path) -> None:
    mirror.tamper(mirror.digests, b"# SHA512 HASH\n", b"# SHA512 HASH\n0")
    message = fetch_fails(mirror, cache)
    assert "BAD signature" in message and mirror.digests in message
    assert signing_keys.release.fingerprint[-16:] in message, "the message names the key"
    assert mirror.requested(mirror.tarball) == [], "nothing is downloaded on a bad signature"


def test_bad_signature_on_pointer(mirror: LoopbackMirror, cache: Path) -> None:
    size = mirror.path(mirror.tarball).stat().st_size
    mirror.tamper(mirror.pointer, f" {size}\n".encode(), f" {size + 1}\n".encode())
    message = fetch_fails(mirror, cache)
    assert "BAD signature" in message and mirror.pointer in message
    assert mirror.requested(mirror.digests) == []


def test_signature_by_unknown_key(mirror: LoopbackMirror, signing_keys: SigningKeys, cache: Path) -> None:
    mirror.write_digests(key=signing_keys.stranger)
    message = fetch_fails(mirror, cache)
    assert mirror.digests in message and "not in keyring" in message and str(mirror.keyring) in message
    assert signing_keys.stranger.fingerprint[-16:] in message, "the message names the unknown key"
    assert "BAD signature" not in message
    assert mirror.requested(mirror.tarball) == []


def test_signature_by_expired_key(mirror: LoopbackMirror, signing_keys: SigningKeys, cache: Path,
                                  tmp_path: Path) -> None:
    # gpg exits 0 for a good signature by an expired key; it must still be refused.
    mirror.write_pointer(key=signing_keys.expired)
    keyring = signing_keys.expired.export(tmp_path / "expired.gpg")
    message = fetch_fails(mirror, cache, keyring=keyring, trusted_keys=[signing_keys.expired.fingerprint])
    assert mirror.pointer in message and "has expired" in message
    assert signing_keys.expired.fingerprint[-16:] in message


def test_unsigned_pointer(mirror: LoopbackMirror, cache: Path) -> None:
    mirror.path(mirror.pointer).write_text(mirror.pointer_text())
    message = fetch_fails(mirror, cache)
    assert "is not PGP-signed" in message and mirror.pointer in message


def test_text_outside_the_signature_is_ignored(mirror: LoopbackMirror, cache: Path) -> None:
    # A mirror (or someone in between) adds unsigned lines around the signed block.
    evil = f"{mirror.stamp}/stage3-{FLAVOUR}-20990101T000000Z.tar.xz 1\n".encode()
    signed = mirror.path(mirror.pointer).read_bytes()
    mirror.path(mirror.pointer).write_bytes(evil + signed + evil)
    stage = fetch(mirror, cache)
    assert stage.name == mirror.tarball_name


def test_signed_pointer_for_another_flavour_is_refused(mirror: LoopbackMirror, cache: Path) -> None:
    mirror.write_pointer(entry=f"{mirror.stamp}/stage3-{FLAVOUR}-splitusr-{mirror.stamp}.tar.xz 1234")
    message = fetch_fails(mirror, cache)
    assert f"names no stage3-{FLAVOUR} tarball" in message


def test_unsafe_path_in_pointer_is_refused(mirror: LoopbackMirror, cache: Path) -> None:
    mirror.write_pointer(entry=f"../../../{mirror.stamp}/stage3-{FLAVOUR}-{mirror.stamp}.tar.xz 1234")
    assert "unsafe tarball path" in fetch_fails(mirror, cache)


def test_size_differs_from_pointer(mirror: LoopbackMirror, cache: Path) -> None:
    size = mirror.path(mirror.tarball).stat().st_size
    mirror.write_pointer(entry=f"{mirror.stamp}/{mirror.tarball_name} {size + 10}")
    message = fetch_fails(mirror, cache)
    assert f"is {size} bytes but the signed pointer file says {size + 10}" in message


def test_missing_digests(mirror: LoopbackMirror, cache: Path) -> None:
    mirror.missing.add(mirror.digests)
    message = fetch_fails(mirror, cache)
    assert mirror.digests in message and "HTTP 404" in message
    assert mirror.requested(mirror.tarball) == []


def test_pointer_404(mirror: LoopbackMirror, cache: Path) -> None:
    mirror.missing.add(mirror.pointer)
    message = fetch_fails(mirror, cache)
    assert mirror.pointer in message and "HTTP 404" in message and f"stage3-{FLAVOUR}" in message


@pytest.mark.parametrize("where", ["pointer", "digests"])
def test_server_drops_the_connection(mirror: LoopbackMirror, cache: Path, where: str) -> None:
    path = getattr(mirror, where)
    if where == "pointer":
        mirror.hangup.add(path)  # no answer at all
    else:
        mirror.drop_after[path] = 100  # mid-body
    message = fetch_fails(mirror, cache)
    assert path in message and "closed the connection" in message


def test_connection_refused(mirror: LoopbackMirror, cache: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    message = fetch_fails(mirror, cache, base_url=f"http://127.0.0.1:{port}/")
    assert f"http://127.0.0.1:{port}/releases/amd64/autobuilds/latest-stage3-{FLAVOUR}.txt" in message
    assert "connection refused" in message


def test_stalled_transfer_times_out(mirror: LoopbackMirror, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_module, "HTTP_TIMEOUT", 0.5)
    mirror.stall_after[mirror.tarball] = 1000
    message = fetch_fails(mirror, cache)
    assert mirror.tarball in message and "timed out" in message
    assert [p.stat().st_size for p in partials(cache)] == [1000], "a stalled transfer can be resumed"


def test_no_keyring_says_how_to_get_gentoos_key(mirror: LoopbackMirror, cache: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr("imagebuild.gpg.SYSTEM_KEYRING", tmp_path / "etc/imagebuild/gentoo-release.gpg")
    message = fetch_fails(mirror, cache, keyring=None)
    assert GENTOO_RELEASE_KEY_FINGERPRINT in message and "--recv-keys" in message
    assert "/usr/share/openpgp-keys/gentoo-release.asc" in message
    assert str(tmp_path / "config/imagebuild/gentoo-release.gpg") in message
    assert mirror.requests == [], "without a keyring nothing is fetched"


def test_default_user_keyring(mirror: LoopbackMirror, cache: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    keyring = tmp_path / "config/imagebuild/gentoo-release.gpg"
    keyring.parent.mkdir(parents=True)
    keyring.write_bytes(mirror.keyring.read_bytes())
    assert fetch(mirror, cache, keyring=None).is_file()


def test_armored_keyring(mirror: LoopbackMirror, cache: Path, tmp_path: Path) -> None:
    armored = mirror.key.export(tmp_path / "gentoo-release.asc", armor=True)
    assert fetch(mirror, cache, keyring=armored).is_file()


@pytest.mark.parametrize(("subpath", "flavour"), [
    ("23.0-default/stage3-amd64-nomultilib-systemd-@TIMESTAMP@", "amd64-nomultilib-systemd"),
    ("23.0-default/stage3-amd64-desktop-openrc-@TIMESTAMP@.tar.xz", "amd64-desktop-openrc"),
    ("23.0-default/stage3-arm64-systemd-20261124T000000Z", "arm64-systemd"),
    ("23.0-default/stage3-amd64-openrc-latest.tar.xz", "amd64-openrc"),
    ("23.0-default/stage3-amd64-systemd", "amd64-systemd"),
])
def test_flavour_from_source_subpath(subpath: str, flavour: str) -> None:
    assert flavour_from_source_subpath(subpath) == flavour


def test_flavour_from_a_non_stage3_subpath() -> None:
    with pytest.raises(StageError, match="does not name a stage3"):
        flavour_from_source_subpath("23.0-default/diskimage-stage1-amd64-systemd-@TIMESTAMP@")
