"""Stage3 from a mirror, against a real HTTP server on loopback and real GnuPG signatures.

The mirror (tests/loopback_mirror.py) has Gentoo's layout and file formats and is signed with
a throwaway key the tests make; only Gentoo's servers and key are replaced (the tests name the
throwaway key as the trusted fingerprint). Every failure must be a StageError that names the
file and says what to do, with nothing left in <cache>/stages/.
"""

from __future__ import annotations

import json
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
from imagebuild.pointers import freshness_record

from loopback_mirror import EPOCH, LoopbackMirror, SigningKeys, export_keyring, mirror_fixture, signing_keys_fixture  # noqa: F401

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
    stages = cache / "stages"
    before = sorted(stages.iterdir()) if stages.exists() else []
    with pytest.raises(StageError) as caught:
        fetch_stage(base_url or mirror.url, Arch.amd64, FLAVOUR, cache,
                    progress=False, **kwargs)  # type: ignore[arg-type]
    after = sorted(stages.iterdir()) if stages.exists() else []
    assert after == before, f"the cache changed: {before} -> {after}"
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
    assert f"primary key fingerprint {signing_keys.release.fingerprint}" in message, "the message names the key"
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


# --- Which keys count ---------------------------------------------------------------------------

def test_only_gentoos_release_key_is_trusted_by_default(mirror: LoopbackMirror, cache: Path) -> None:
    # The loopback key is in the keyring, but it is not Gentoo's: in the keyring is not enough.
    message = fetch_fails(mirror, cache, trusted_keys=None)
    assert mirror.pointer in message and "is not a trusted release key" in message
    assert mirror.key.fingerprint in message, "the message names the signer's primary fingerprint"
    assert f"only Gentoo's release key {GENTOO_RELEASE_KEY_FINGERPRINT} is trusted" in message
    assert "--trusted-key" in message
    assert mirror.requested(mirror.digests) == []


def test_second_key_in_the_keyring_is_not_trusted(mirror: LoopbackMirror, signing_keys: SigningKeys,
                                                  cache: Path, tmp_path: Path) -> None:
    # Like gentoo-release.asc, the keyring holds several keys; only the named one counts.
    keyring = export_keyring(tmp_path / "two-keys.gpg", signing_keys.release, signing_keys.stranger)
    mirror.write_digests(key=signing_keys.stranger)
    message = fetch_fails(mirror, cache, keyring=keyring)
    assert mirror.digests in message and "is not a trusted release key" in message
    assert f"primary key fingerprint {signing_keys.stranger.fingerprint}" in message
    assert signing_keys.release.fingerprint in message, "the hint names the trusted key"
    assert mirror.requested(mirror.tarball) == []


def test_several_trusted_keys(mirror: LoopbackMirror, signing_keys: SigningKeys, cache: Path, tmp_path: Path) -> None:
    keyring = export_keyring(tmp_path / "two-keys.gpg", signing_keys.release, signing_keys.stranger)
    mirror.write_digests(key=signing_keys.stranger)
    stage = fetch(mirror, cache, keyring=keyring,
                  trusted_keys=[signing_keys.release.fingerprint, signing_keys.stranger.fingerprint])
    record = json.loads((cache / "stages" / f"{mirror.tarball_name}.verified.json").read_text())
    assert stage.is_file() and record["signed_by"] == signing_keys.stranger.fingerprint


def test_subkey_signature_counts_as_its_primary(tmp_path: Path, signing_keys: SigningKeys, cache: Path,
                                                log: pytest.LogCaptureFixture) -> None:
    key = signing_keys.subkeyed
    assert key.subkey and key.subkey != key.fingerprint
    with LoopbackMirror(tmp_path / "mirror", key) as mirror:
        stage = fetch(mirror, cache)
    assert stage.is_file()
    record = json.loads((cache / "stages" / f"{mirror.tarball_name}.verified.json").read_text())
    assert record["signed_by"] == key.fingerprint, "the record names the primary, not the subkey"
    assert f"signed by primary key {key.fingerprint}" in log.text


def test_a_subkey_fingerprint_is_not_a_trust_anchor(tmp_path: Path, signing_keys: SigningKeys, cache: Path) -> None:
    key = signing_keys.subkeyed
    assert key.subkey
    with LoopbackMirror(tmp_path / "mirror", key) as mirror:
        message = fetch_fails(mirror, cache, trusted_keys=[key.subkey])
    assert "is not a trusted release key" in message and "is a subkey" in message
    assert f"primary key fingerprint {key.fingerprint}" in message


def test_fingerprint_spelled_with_spaces_and_lower_case(mirror: LoopbackMirror, cache: Path) -> None:
    fingerprint = mirror.key.fingerprint.lower()
    spaced = " ".join(fingerprint[i:i + 4] for i in range(0, 40, 4))
    assert fetch(mirror, cache, trusted_keys=[spaced]).is_file()


@pytest.mark.parametrize("key", ["BB572E0E2D182910", "2D182910", "not-hex", "13EBBDBE"])
def test_key_ids_are_not_trusted_keys(mirror: LoopbackMirror, cache: Path, key: str) -> None:
    message = fetch_fails(mirror, cache, trusted_keys=[key])
    assert f"'{key}'" in message and ("is a key ID" in message or "not an OpenPGP fingerprint" in message)
    assert mirror.requests == [], "nothing is fetched with a bad trust anchor"


def test_good_signatures_are_logged_with_the_primary_fingerprint(mirror: LoopbackMirror, cache: Path,
                                                                log: pytest.LogCaptureFixture) -> None:
    fetch(mirror, cache)
    assert f"ts={EPOCH}" in log.text and "latest as of" in log.text
    signed = {r.getMessage() for r in log.records if f"signed by primary key {mirror.key.fingerprint}" in r.getMessage()}
    assert len(signed) == 2, f"the pointer and the DIGESTS: {signed}"


# --- Freshness: the pointer's ts ------------------------------------------------------------

def newest_seen(cache: Path, flavour: str = FLAVOUR) -> int:
    return json.loads(freshness_record(cache, Arch.amd64, flavour).read_text())["ts"]


def test_the_newest_pointer_is_remembered(mirror: LoopbackMirror, cache: Path) -> None:
    fetch(mirror, cache)
    assert newest_seen(cache) == EPOCH
    mirror.write_pointer(ts=EPOCH + 3600)  # the next publication, same release
    fetch(mirror, cache)
    assert newest_seen(cache) == EPOCH + 3600
    fetch(mirror, cache)  # the same pointer again is fine
    assert len(mirror.requested(mirror.tarball)) == 1


def test_older_pointer_after_a_newer_one_is_refused(mirror: LoopbackMirror, cache: Path) -> None:
    fetch(mirror, cache)
    mirror.write_pointer(ts=EPOCH - 7 * 86400)  # genuinely signed, a week older
    requests = len(mirror.requests)
    with pytest.raises(StageError) as caught:
        fetch(mirror, cache)
    message = str(caught.value)
    assert f"refusing {mirror.url}/{mirror.pointer}" in message
    assert f"it is older than the pointer seen before for stage3-{FLAVOUR}: ts={EPOCH - 7 * 86400}" in message
    assert f"ts={EPOCH}" in message and "--allow-older-stage" in message
    assert [r.path for r in mirror.requests[requests:]] == [mirror.pointer], "nothing after the pointer"
    assert newest_seen(cache) == EPOCH


def test_older_pointer_with_allow_older(mirror: LoopbackMirror, cache: Path, log: pytest.LogCaptureFixture) -> None:
    mirror.write_pointer(ts=EPOCH + 100)
    fetch(mirror, cache)
    mirror.write_pointer(ts=EPOCH)
    assert fetch(mirror, cache, allow_older=True).is_file()
    assert "although it is older than the pointer seen before" in log.text
    assert newest_seen(cache) == EPOCH + 100, "allowing an older pointer does not lower the record"


def test_a_mirror_that_is_behind_another(mirror: LoopbackMirror, signing_keys: SigningKeys, cache: Path,
                                         tmp_path: Path) -> None:
    mirror.write_pointer(ts=EPOCH + 100)
    fetch(mirror, cache)
    with LoopbackMirror(tmp_path / "lagging", signing_keys.release) as lagging:
        message = fetch_fails(lagging, cache, base_url=lagging.url)
    assert "is older than the pointer seen before" in message and f"from {mirror.url}" in message


def test_newer_pointer_is_remembered_even_if_its_digests_fail(mirror: LoopbackMirror, cache: Path) -> None:
    # A freeze: the attacker shows the new pointer but keeps its DIGESTS away, then serves the old one.
    mirror.write_pointer(ts=EPOCH + 100)
    mirror.missing.add(mirror.digests)
    fetch_fails(mirror, cache)
    mirror.missing.clear()
    mirror.write_pointer(ts=EPOCH)
    assert "is older than the pointer seen before" in fetch_fails(mirror, cache)


def test_pointer_without_ts_is_accepted_while_none_was_seen(mirror: LoopbackMirror, cache: Path,
                                                            log: pytest.LogCaptureFixture) -> None:
    mirror.write_pointer(ts=None)
    assert fetch(mirror, cache).is_file()
    assert "has no '# ts=' line" in log.text
    assert not freshness_record(cache, Arch.amd64, FLAVOUR).exists()


def test_pointer_without_ts_after_one_with_ts_is_refused(mirror: LoopbackMirror, cache: Path) -> None:
    fetch(mirror, cache)
    mirror.write_pointer(ts=None)
    message = fetch_fails(mirror, cache)
    assert "it has no '# ts=' line, so it cannot be shown to be as new" in message
    assert "--allow-older-stage" in message


@pytest.mark.parametrize("header", ["# ts=yesterday\n", "# ts=1795478400\n# ts=1795478401\n"])
def test_malformed_ts_is_refused(mirror: LoopbackMirror, cache: Path, header: str) -> None:
    mirror.write_signed(mirror.pointer, header + mirror.pointer_text(ts=None))
    message = fetch_fails(mirror, cache)
    assert mirror.pointer in message and "'# ts=" in message
    assert mirror.requested(mirror.digests) == []


def test_damaged_freshness_record(mirror: LoopbackMirror, cache: Path) -> None:
    record = freshness_record(cache, Arch.amd64, FLAVOUR)
    record.parent.mkdir(parents=True)
    record.write_text('{"ts": ')
    message = fetch_fails(mirror, cache)
    assert str(record) in message and "delete the file" in message


def test_freshness_is_kept_per_flavour(tmp_path: Path, signing_keys: SigningKeys, cache: Path) -> None:
    with LoopbackMirror(tmp_path / "a", signing_keys.release, flavour="amd64-systemd") as other:
        other.write_pointer(ts=EPOCH + 100)
        fetch_stage(other.url, Arch.amd64, "amd64-systemd", cache, keyring=other.keyring,
                    trusted_keys=[other.key.fingerprint], progress=False)
    with LoopbackMirror(tmp_path / "b", signing_keys.release) as mirror:
        assert fetch(mirror, cache).is_file(), "another flavour's newer pointer does not count"
    assert newest_seen(cache, "amd64-systemd") == EPOCH + 100 and newest_seen(cache) == EPOCH


# --- The cache is re-hashed -------------------------------------------------------------------

def test_damaged_cached_tarball_is_fetched_again(mirror: LoopbackMirror, cache: Path,
                                                 log: pytest.LogCaptureFixture) -> None:
    stage = fetch(mirror, cache)
    data = bytearray(stage.read_bytes())
    data[len(data) // 3] ^= 0x01  # same size, one bit: only a re-hash can tell
    stage.write_bytes(bytes(data))
    again = fetch(mirror, cache)
    assert again == stage and again.read_bytes() == mirror.path(mirror.tarball).read_bytes()
    assert len(mirror.requested(mirror.tarball)) == 2
    assert "no longer matches its signed DIGESTS" in log.text and "fetching it again" in log.text
    assert "cache hit" not in log.text


@pytest.mark.parametrize("damage", ["truncated", "symlink", "no record"])
def test_cached_tarball_not_as_stored_is_fetched_again(mirror: LoopbackMirror, cache: Path, tmp_path: Path,
                                                       damage: str) -> None:
    stage = fetch(mirror, cache)
    if damage == "truncated":
        with open(stage, "r+b") as f:
            f.truncate(stage.stat().st_size // 2)
    elif damage == "symlink":  # the right bytes, but elsewhere: the cache holds files, not links
        outside = tmp_path / "elsewhere.tar.xz"
        outside.write_bytes(stage.read_bytes())
        stage.unlink()
        stage.symlink_to(outside)
    else:
        stage.with_name(stage.name + ".verified.json").unlink()
    again = fetch(mirror, cache)
    assert not again.is_symlink() and again.read_bytes() == mirror.path(mirror.tarball).read_bytes()
    assert len(mirror.requested(mirror.tarball)) == 2
