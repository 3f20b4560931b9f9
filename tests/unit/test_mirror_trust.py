"""Mirror trust in pure Python: trusted-key fingerprints (spec, command line), the pointer's header."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from imagebuild.cli import _given_settings, _parser
from imagebuild.config import Arch, Variant
from imagebuild.errors import ConfigError, SpecError, StageError
from imagebuild.gpg import GENTOO_RELEASE_KEY_FINGERPRINT, fingerprint_problem, normalize_fingerprint
from imagebuild.pointers import parse_pointer
from imagebuild.resolve import Overrides, resolve
from imagebuild.spec import parse_spec_text

pytestmark = pytest.mark.unit

GENTOO_SPACED = "13EB BDBE DE7A 1277 5DFD  B1BA BB57 2E0E 2D18 2910"
OTHER = "F9143E18CCFC3059751FA94009F223DE8FB00F1F"
SPEC = """subarch: amd64
target: diskimage-stage2
version_stamp: @TIMESTAMP@
rel_type: 23.0-default
profile: default/linux/amd64/23.0/no-multilib/systemd
source_subpath: 23.0-default/stage3-amd64-nomultilib-systemd-@TIMESTAMP@
diskimage/type: console
"""


@pytest.mark.parametrize("text", [GENTOO_SPACED, GENTOO_SPACED.lower(), "0x" + GENTOO_RELEASE_KEY_FINGERPRINT])
def test_fingerprint_spellings(text: str) -> None:
    assert normalize_fingerprint(text) == GENTOO_RELEASE_KEY_FINGERPRINT
    assert fingerprint_problem(text) is None


@pytest.mark.parametrize(("text", "phrase"), [("BB572E0E2D182910", "is a key ID"), ("0x2D182910", "is a key ID"),
                                              ("13EBBDBE-DE7A", "not an OpenPGP fingerprint"),
                                              (GENTOO_RELEASE_KEY_FINGERPRINT[:-1], "not an OpenPGP fingerprint")])
def test_not_fingerprints(text: str, phrase: str) -> None:
    assert normalize_fingerprint(text) is None
    assert phrase in (fingerprint_problem(text) or "")


def spec_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "console.spec"
    path.write_text(SPEC + extra)
    return path


def test_trusted_keys_default_to_gentoos_release_key(tmp_path: Path) -> None:
    config = resolve(Arch.amd64, Variant.console, Overrides(spec=spec_file(tmp_path), stamp="20261124T000000Z"))
    assert config.stage.trusted_keys == (GENTOO_RELEASE_KEY_FINGERPRINT,)
    assert config.stage.allow_older is False


def _build_args(*flags: str) -> argparse.Namespace:
    """The build command's arguments, as the command line parses them."""
    return _parser().parse_args(["build", "amd64", "console", *flags])


def test_trusted_keys_from_the_spec(tmp_path: Path) -> None:
    spec = spec_file(tmp_path, f"imagebuild/trusted_keys: {OTHER.lower()}\n    {GENTOO_RELEASE_KEY_FINGERPRINT}\n")
    config = resolve(Arch.amd64, Variant.console, Overrides(spec=spec, stamp="20261124T000000Z"))
    assert config.stage.trusted_keys == (OTHER, GENTOO_RELEASE_KEY_FINGERPRINT)


def test_command_line_trusted_keys_replace_the_spec_s(tmp_path: Path) -> None:
    spec = spec_file(tmp_path, f"imagebuild/trusted_keys: {OTHER}\n")
    config = resolve(Arch.amd64, Variant.console, Overrides(
        spec=spec, stamp="20261124T000000Z", allow_older_stage=True,
        settings=_given_settings(_build_args("--trusted-key", GENTOO_SPACED, "--trusted-key", GENTOO_SPACED))))
    assert config.stage.trusted_keys == (GENTOO_RELEASE_KEY_FINGERPRINT,)
    assert config.stage.allow_older is True


def test_a_key_id_on_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--trusted-key BB572E0E2D182910: 'BB572E0E2D182910' is a key ID"):
        resolve(Arch.amd64, Variant.console, Overrides(
            spec=spec_file(tmp_path), settings=_given_settings(_build_args("--trusted-key", "BB572E0E2D182910"))))


def test_spec_trusted_keys_are_checked_with_their_line() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec_text(SPEC + f"imagebuild/trusted_keys: {GENTOO_SPACED}\n", Path("test.spec"))
    message = caught.value.message
    assert "test.spec:8:" in message and "'13EB' is a key ID" not in message
    assert "'13EB' is not an OpenPGP fingerprint" in message and "no spaces inside it" in message


def test_pointer_header_is_read() -> None:
    text = ("# Latest as of Tue, 24 Nov 2026 00:00:00 +0000\n# ts=1795478400\n"
            "20261124T000000Z/stage3-amd64-openrc-20261124T000000Z.tar.xz 1234\n")
    pointer = parse_pointer(text, "amd64-openrc", what="latest")
    assert (pointer.ts, pointer.latest_as_of, pointer.size) == (1795478400, "Tue, 24 Nov 2026 00:00:00 +0000", 1234)
    assert pointer.when == "ts=1795478400 (latest as of Tue, 24 Nov 2026 00:00:00 +0000)"


def test_pointer_without_header() -> None:
    pointer = parse_pointer("20261124T000000Z/stage3-amd64-openrc-20261124T000000Z.tar.xz 1234\n",
                            "amd64-openrc", what="latest")
    assert pointer.ts is None and pointer.when == "no ts= line"


@pytest.mark.parametrize("header", ["# ts=\n", "# ts=-5\n", "# ts=1e9\n", "# ts=1\n# ts=2\n"])
def test_malformed_ts(header: str) -> None:
    with pytest.raises(StageError, match="ts="):
        parse_pointer(header + "20261124T000000Z/stage3-amd64-openrc-20261124T000000Z.tar.xz 1\n",
                      "amd64-openrc", what="latest")
