"""Hostile mirrors through the real CLI: wrong keys, replayed releases, a damaged cache.

Every case runs ``imagebuild build --stage mirror`` against a real HTTP mirror on loopback
(tests/loopback_mirror.py) serving the mini stage, with the hostile-input harness
(tests/hostile.py) checking the exit status, the single ``error:`` line, the host's canaries
and that nothing is left behind. The loopback key stands in for Gentoo's release key and is
named with --trusted-key; the other keys are the attacker's or Gentoo's other keys. A refused
run must also leave the cache's stages/ as it was: nothing half-written, nothing unverified.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from imagebuild.config import Arch
from imagebuild.gpg import GENTOO_RELEASE_KEY_FINGERPRINT
from imagebuild.mirror import fetch_stage
from imagebuild.pointers import freshness_record

from hostile import Host, Result, build, host, requirements  # noqa: F401
from loopback_mirror import EPOCH, LoopbackMirror, SigningKey, SigningKeys, export_keyring, signing_keys_fixture  # noqa: F401

pytestmark = pytest.mark.integration

FLAVOUR = "amd64-nomultilib-systemd"  # what the shipped amd64 specs' source_subpath names
DAY = 86400


@pytest.fixture(autouse=True)
def _requirements() -> None:
    requirements()


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory, mini_stage_amd64: Path) -> Path:
    """The mini stage, copied once beside the tests' mirrors so each mirror can hard-link it."""
    copy = tmp_path_factory.mktemp("mini-stage") / mini_stage_amd64.name
    shutil.copyfile(mini_stage_amd64, copy)
    return copy


def serve(tmp_path: Path, key: SigningKey, stage: Path, name: str = "mirror") -> LoopbackMirror:
    return LoopbackMirror(tmp_path / name, key, flavour=FLAVOUR, tarball=stage)


@pytest.fixture
def mirror(tmp_path: Path, signing_keys: SigningKeys, stage: Path) -> Iterator[LoopbackMirror]:
    with serve(tmp_path, signing_keys.release, stage) as served:
        yield served


def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"  # hostile.build passes this as --cache-dir


def stages(tmp_path: Path) -> list[str]:
    where = cache(tmp_path) / "stages"
    return sorted(p.name for p in where.iterdir()) if where.exists() else []


def mirror_build(tmp_path: Path, host: Host, mirror: LoopbackMirror, *extra: str | Path,
                 keyring: Path | None = None, trust: Sequence[str] | None = None, expect: int = 2) -> Result:
    """``imagebuild build amd64 console --stage mirror --mirror URL --keyring K --trusted-key F``.

    ``trust`` defaults to the mirror's own key; ``()`` passes no --trusted-key (Gentoo's only).
    A refused run must not change the cache's stages/.
    """
    trusted = [mirror.key.fingerprint] if trust is None else list(trust)
    before = stages(tmp_path)
    result = cli_build(tmp_path, host, "--mirror", mirror.url + "/", "--keyring", keyring or mirror.keyring,
                       *[a for fpr in trusted for a in ("--trusted-key", fpr)], *extra, expect=expect)
    if expect == 2:
        assert stages(tmp_path) == before, f"a refused run changed the cache: {before} -> {stages(tmp_path)}"
    assert not list(cache(tmp_path).rglob("*.tmp")), "a half-written record was left in the cache"
    return result


def cli_build(tmp_path: Path, host: Host, *args: str | Path, expect: int) -> Result:
    """hostile.build with --stage mirror, its temporary files (gpg's homes) in tmp_path/tmp
    instead of the host's /tmp, and gone at the end."""
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    result = build(tmp_path, host, "mirror", *args, expect=expect, allowed=[scratch], env={"TMPDIR": str(scratch)})
    assert list(scratch.iterdir()) == [], f"temporary files left behind: {list(scratch.iterdir())}"
    return result


def seed(tmp_path: Path, mirror: LoopbackMirror) -> Path:
    """Fetch the mirror's current release into the cache, as an earlier build would have."""
    return fetch_stage(mirror.url, Arch.amd64, FLAVOUR, cache(tmp_path), keyring=mirror.keyring,
                       trusted_keys=[mirror.key.fingerprint], progress=False)


# --- Keys -------------------------------------------------------------------------------------

def test_pointer_signed_by_a_second_key_in_the_keyring(tmp_path: Path, host: Host, mirror: LoopbackMirror,
                                                       signing_keys: SigningKeys) -> None:
    # gentoo-release.asc holds four keys: a file signed by any but the release key must not pass.
    keyring = export_keyring(tmp_path / "two.gpg", signing_keys.release, signing_keys.stranger)
    mirror.write_pointer(key=signing_keys.stranger)
    mirror.write_digests(key=signing_keys.stranger)
    result = mirror_build(tmp_path, host, mirror, keyring=keyring)
    assert "is not a trusted release key" in result.error
    assert f"primary key fingerprint {signing_keys.stranger.fingerprint}" in result.error
    assert mirror.requested(mirror.digests) == [] and mirror.requested(mirror.tarball) == []


def test_digests_signed_by_an_untrusted_key_in_the_keyring(tmp_path: Path, host: Host, mirror: LoopbackMirror,
                                                           signing_keys: SigningKeys) -> None:
    # The right key signs the pointer; the DIGESTS that vouch for the tarball are someone else's.
    keyring = export_keyring(tmp_path / "two.gpg", signing_keys.release, signing_keys.stranger)
    mirror.write_digests(key=signing_keys.stranger)
    result = mirror_build(tmp_path, host, mirror, keyring=keyring)
    assert f"{mirror.digests} is signed by primary key fingerprint {signing_keys.stranger.fingerprint}" in result.error
    assert "is not a trusted release key" in result.error
    assert mirror.requested(mirror.tarball) == []


def test_digests_signed_by_a_key_outside_the_keyring(tmp_path: Path, host: Host, mirror: LoopbackMirror,
                                                     signing_keys: SigningKeys) -> None:
    mirror.write_digests(key=signing_keys.stranger)
    result = mirror_build(tmp_path, host, mirror)
    assert f"which is not in keyring {mirror.keyring}" in result.error
    assert signing_keys.stranger.fingerprint in result.error
    assert mirror.requested(mirror.tarball) == []


def test_pointer_signed_right_but_digests_unsigned(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    digests = mirror.path(mirror.digests)
    text = digests.read_text()
    # The signed text alone, without its signature: what a mirror that strips signatures serves.
    digests.write_text(text.split("\n\n", 1)[1].split("-----BEGIN PGP SIGNATURE-----")[0])
    result = mirror_build(tmp_path, host, mirror)
    assert f"{mirror.digests} is not PGP-signed" in result.error
    assert mirror.requested(mirror.tarball) == []


def test_only_gentoos_key_is_trusted_without_trusted_key(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    result = mirror_build(tmp_path, host, mirror, trust=())
    assert f"only Gentoo's release key {GENTOO_RELEASE_KEY_FINGERPRINT} is trusted" in result.error
    assert mirror.key.fingerprint in result.error
    assert mirror.requested(mirror.digests) == []


def test_subkey_of_the_trusted_key_is_accepted(tmp_path: Path, host: Host, signing_keys: SigningKeys,
                                               stage: Path) -> None:
    key = signing_keys.subkeyed
    with serve(tmp_path, key, stage) as mirror:
        result = mirror_build(tmp_path, host, mirror, trust=[key.fingerprint], expect=0)
    assert f"signed by primary key {key.fingerprint}" in result.stderr
    assert stages(tmp_path) == sorted([mirror.tarball_name, mirror.tarball_name + ".verified.json"])


def test_a_subkey_fingerprint_does_not_make_its_key_trusted(tmp_path: Path, host: Host, signing_keys: SigningKeys,
                                                            stage: Path) -> None:
    key = signing_keys.subkeyed
    assert key.subkey
    with serve(tmp_path, key, stage) as mirror:
        result = mirror_build(tmp_path, host, mirror, trust=[key.subkey])
    assert "is a subkey: name primary key fingerprints" in result.error


def test_a_key_id_is_not_accepted_as_trusted_key(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    result = mirror_build(tmp_path, host, mirror, trust=[mirror.key.fingerprint[-16:]])
    key_id = mirror.key.fingerprint[-16:]
    assert f"--trusted-key {key_id}: '{key_id}' is a key ID, not a fingerprint" in result.error
    assert mirror.requests == [], "refused before anything is fetched"


def test_a_key_id_in_the_spec(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    spec = tmp_path / "console.spec"
    shipped = Path(__file__).resolve().parents[2] / "specs/amd64/console.spec"
    spec.write_text(shipped.read_text() + "imagebuild/trusted_keys: BB572E0E2D182910\n")
    result = mirror_build(tmp_path, host, mirror, "--spec", spec, trust=())
    assert "imagebuild/trusted_keys: BB572E0E2D182910" in result.error and "is a key ID" in result.error
    assert mirror.requests == []


def test_bad_signature_names_the_primary_fingerprint(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    size = mirror.path(mirror.tarball).stat().st_size
    mirror.tamper(mirror.pointer, f" {size}\n".encode(), f" {size + 1}\n".encode())
    result = mirror_build(tmp_path, host, mirror)
    assert f"BAD signature on {mirror.url}/{mirror.pointer}" in result.error
    assert f"primary key fingerprint {mirror.key.fingerprint}" in result.error


def test_expired_trusted_key(tmp_path: Path, host: Host, signing_keys: SigningKeys, stage: Path) -> None:
    with serve(tmp_path, signing_keys.expired, stage) as mirror:
        result = mirror_build(tmp_path, host, mirror)
    assert "which has expired in keyring" in result.error
    assert signing_keys.expired.fingerprint in result.error


# --- Rollback and freeze ----------------------------------------------------------------------

def test_older_pointer_after_a_newer_one(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    mirror.write_pointer(ts=EPOCH + DAY)
    seed(tmp_path, mirror)
    mirror.write_pointer(ts=EPOCH)  # last week's pointer, genuinely signed, replayed
    result = mirror_build(tmp_path, host, mirror)
    assert f"it is older than the pointer seen before for stage3-{FLAVOUR}: ts={EPOCH}" in result.error
    assert "--allow-older-stage" in result.error
    assert len(mirror.requested(mirror.digests)) == 1, "nothing is fetched after the older pointer"


def test_older_pointer_from_a_mirror_that_is_behind(tmp_path: Path, host: Host, mirror: LoopbackMirror,
                                                    signing_keys: SigningKeys, stage: Path) -> None:
    mirror.write_pointer(ts=EPOCH + DAY)
    seed(tmp_path, mirror)
    with serve(tmp_path, signing_keys.release, stage, "lagging") as lagging:
        result = mirror_build(tmp_path, host, lagging)
    assert "is older than the pointer seen before" in result.error and f"from {mirror.url}" in result.error


def test_older_pointer_with_allow_older_stage(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    mirror.write_pointer(ts=EPOCH + DAY)
    seed(tmp_path, mirror)
    mirror.write_pointer(ts=EPOCH)
    result = mirror_build(tmp_path, host, mirror, "--allow-older-stage", expect=0)
    assert "warning: using" in result.stderr and "although it is older than the pointer seen before" in result.stderr
    record = json.loads(freshness_record(cache(tmp_path), Arch.amd64, FLAVOUR).read_text())
    assert record["ts"] == EPOCH + DAY, "the override does not lower what was seen"


def test_pointer_without_ts_after_one_with_ts(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    seed(tmp_path, mirror)
    mirror.write_pointer(ts=None)
    result = mirror_build(tmp_path, host, mirror)
    assert "it has no '# ts=' line, so it cannot be shown to be as new" in result.error


def test_newer_pointer_with_its_digests_withheld_then_the_old_one(tmp_path: Path, host: Host,
                                                                  mirror: LoopbackMirror) -> None:
    # A freeze: the new pointer is shown, its DIGESTS kept away, and then the old pointer served.
    seed(tmp_path, mirror)
    mirror.write_pointer(ts=EPOCH + DAY)
    mirror.missing.add(mirror.digests)
    assert "HTTP 404" in mirror_build(tmp_path, host, mirror).error
    mirror.missing.clear()
    mirror.write_pointer(ts=EPOCH)
    assert "is older than the pointer seen before" in mirror_build(tmp_path, host, mirror).error


def test_damaged_freshness_record(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    record = freshness_record(cache(tmp_path), Arch.amd64, FLAVOUR)
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    result = mirror_build(tmp_path, host, mirror)
    assert f"{record}, the record of the newest stage3-{FLAVOUR} pointer seen, has no integer 'ts'" in result.error


# --- The cache ----------------------------------------------------------------------------------

def test_damaged_cached_tarball_is_fetched_again(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    cached = seed(tmp_path, mirror)
    with open(cached, "r+b") as f:  # one flipped byte, same size: only a re-hash can tell
        f.seek(cached.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = mirror_build(tmp_path, host, mirror, expect=0)
    assert f"the cached {mirror.tarball_name} no longer matches its signed DIGESTS" in result.stderr
    assert "deleting it and fetching it again" in result.stderr and "cache hit" not in result.stderr
    assert len(mirror.requested(mirror.tarball)) == 2
    assert cached.read_bytes() == mirror.path(mirror.tarball).read_bytes()


def test_damaged_cache_and_a_bad_download(tmp_path: Path, host: Host, mirror: LoopbackMirror) -> None:
    # The cached copy is cut short, and what the mirror now serves does not match the DIGESTS.
    cached = seed(tmp_path, mirror)
    with open(cached, "r+b") as f:
        f.truncate(cached.stat().st_size - 4096)
    served = mirror.path(mirror.tarball)
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.unlink()  # hard-linked to the shared stage copy: replace, do not write through
    served.write_bytes(bytes(data))
    before = stages(tmp_path)
    result = cli_build(tmp_path, host, "--mirror", mirror.url + "/", "--keyring", mirror.keyring,
                       "--trusted-key", mirror.key.fingerprint, expect=2)
    assert f"of {mirror.url}/{mirror.tarball} does not match its signed DIGESTS" in result.error
    assert before and stages(tmp_path) == [], "the damaged copy is gone and nothing unverified took its place"
    assert not list((cache(tmp_path) / "downloads").glob("*.partial"))
