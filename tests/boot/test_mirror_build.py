"""`imagebuild build --mirror` against a real HTTP mirror on loopback serving the stand-in stage.

The mirror, its GnuPG key and signatures are real (tests/loopback_mirror.py); only the stage in
it is the Debian-based stand-in, because no machine here can reach Gentoo's mirrors.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import imagebuild_cli, loop_devices, mounts_under
from loopback_mirror import LoopbackMirror, SigningKeys, signing_keys_fixture  # noqa: F401

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def standin_mirror(tmp_path_factory: pytest.TempPathFactory, standin_amd64: Path,
                   signing_keys: SigningKeys) -> Iterator[LoopbackMirror]:
    root = tmp_path_factory.mktemp("mirror") / "gentoo"
    with LoopbackMirror(root, signing_keys.release, arch="amd64", flavour="amd64-nomultilib-systemd",
                        tarball=standin_amd64) as mirror:
        yield mirror


def build(mirror: LoopbackMirror, tmp_path: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return imagebuild_cli("build", "amd64", "console", "--mirror", mirror.url + "/", "--keyring", mirror.keyring,
                          "--trusted-key", mirror.key.fingerprint, "--cache-dir", cache, "--work-dir", tmp_path / "work",
                          "-o", tmp_path / "out", *extra)


def test_build_from_verified_download_then_cache_hit(standin_mirror: LoopbackMirror, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # The download is the stand-in tarball that test_images' README job builds and boots; here
    # the image is audited offline (booting it again would prove nothing new).
    first = build(standin_mirror, tmp_path / "one", cache, "--stamp", "20261124T010000Z", "--no-test")
    assert first.returncode == 0, first.stderr[-3000:]
    image = tmp_path / "one/out/di-amd64-console-20261124T010000Z.qcow2"
    assert image.is_file()
    assert "Fetching the latest stage3-amd64-nomultilib-systemd" in first.stderr
    assert json.loads(image.with_name(image.name + ".inspect.json").read_text())["passed"]
    manifest = json.loads(image.with_name(image.name + ".manifest.json").read_text())
    assert manifest["stage"]["source"] == "mirror"
    assert manifest["stage"]["file"] == standin_mirror.tarball_name
    assert len(standin_mirror.requested(standin_mirror.tarball)) == 1

    second = build(standin_mirror, tmp_path / "two", cache, "--stamp", "20261124T020000Z", "--no-test")
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stderr
    assert len(standin_mirror.requested(standin_mirror.tarball)) == 1, "the cached stage must not be downloaded again"


def test_bad_signature_stops_before_unpacking(tmp_path: Path, signing_keys: SigningKeys) -> None:
    with LoopbackMirror(tmp_path / "mirror", signing_keys.release, flavour="amd64-nomultilib-systemd") as mirror:
        mirror.tamper(mirror.digests, b"# SHA512 HASH\n", b"# SHA512 HASH\n0")
        result = build(mirror, tmp_path, tmp_path / "cache", "--no-test")
    assert result.returncode != 0
    assert "Unpacking" not in result.stderr and "BAD signature" in result.stderr
    assert mirror.tarball_name + ".DIGESTS" in result.stderr
    assert signing_keys.release.fingerprint[-16:] in result.stderr.replace(" ", "")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not list((tmp_path / "cache").glob("stages/*.tar*"))
    assert loop_devices(tmp_path) == set() and mounts_under(tmp_path) == []
