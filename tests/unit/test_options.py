"""The settings table is the one place a setting lives: precedence (command line, then spec,
then default), the flags and keys derived from it, and the README that documents it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imagebuild import options
from imagebuild.cli import _given_settings, _parser
from imagebuild.config import Arch, Compression, MirrorStage, Variant
from imagebuild.errors import ConfigError, SpecError
from imagebuild.gpg import GENTOO_RELEASE_KEY_FINGERPRINT
from imagebuild.release import _KEYS as RELEASE_KEYS
from imagebuild.resolve import Overrides, resolve
from imagebuild.spec import IMAGEBUILD_KEYS

REPO = Path(__file__).resolve().parents[2]
STAMP = "20261204T000000Z"


def spec(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "my.spec"
    path.write_text("subarch: amd64\ndiskimage/type: console\nprofile: default/linux/amd64/23.0/systemd\n"
                    "source_subpath: 23.0-default/stage3-amd64-systemd-@TIMESTAMP@\n" + extra)
    return path


def resolved(tmp_path: Path, extra: str, *flags: str):  # type: ignore[no-untyped-def]
    args = _parser().parse_args(["build", "amd64", "console", *flags])
    return resolve(Arch.amd64, Variant.console, Overrides(spec=spec(tmp_path, extra), stamp=STAMP,
                                                          settings=_given_settings(args)))


def test_defaults_when_nobody_says(tmp_path: Path) -> None:
    config = resolved(tmp_path, "")
    assert (config.compression, config.layout.sector_size, config.layout.size, config.boot_timeout) == \
        (Compression.zlib, 512, 20 * 2**30, 600.0)
    assert config.stage == MirrorStage("https://distfiles.gentoo.org", "amd64-systemd", None,
                                       (GENTOO_RELEASE_KEY_FINGERPRINT,))
    assert config.smoke_test is True and config.work_dir == Path("/var/tmp/imagebuild")


def test_the_spec_beats_the_default(tmp_path: Path) -> None:
    config = resolved(tmp_path, "imagebuild/compression: zstd\nimagebuild/sector_size: 4096\n"
                                "diskimage/qcow2_size: 8GiB\nimagebuild/smoke_test: no\nimagebuild/boot_timeout: 90\n")
    assert (config.compression, config.layout.sector_size, config.layout.size, config.smoke_test,
            config.boot_timeout) == (Compression.zstd, 4096, 8 * 2**30, False, 90.0)


def test_the_command_line_beats_the_spec(tmp_path: Path) -> None:
    config = resolved(tmp_path, "imagebuild/compression: zstd\ndiskimage/qcow2_size: 8GiB\nimagebuild/boot_timeout: 90\n",
                      "--compression", "zlib", "--size", "6GiB", "--boot-timeout", "45", "--no-test",
                      "--work-dir", "scratch")
    assert (config.compression, config.layout.size, config.boot_timeout, config.smoke_test) == \
        (Compression.zlib, 6 * 2**30, 45.0, False)
    assert config.work_dir == Path("scratch").resolve()


@pytest.mark.parametrize(("flags", "message"), [
    (("--boot-timeout", "soon"), "--boot-timeout soon: must be a number of seconds > 0"),
    (("--size", "big"), "--size big: cannot read size 'big'"),
    (("--mirror", "ftp://example.org"), "--mirror ftp://example.org: must be an http(s):// or file:// URL"),
    (("--stage", "stage3.zip"), "--stage stage3.zip: must be mirror, standin"),
])
def test_bad_command_line_values_name_the_flag(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolved(tmp_path, "", *flags)


def test_every_flag_key_and_release_key_comes_from_the_table() -> None:
    build = _parser()._subparsers._group_actions[0].choices["build"]  # type: ignore[union-attr]
    flags = {flag for action in build._actions for flag in action.option_strings}
    assert {o.flag for o in options.OPTIONS if o.flag} <= flags
    assert IMAGEBUILD_KEYS == {o.spec_key for o in options.OPTIONS if o.spec_key and o.spec_key.startswith("imagebuild/")}
    assert {o.release_key for o in options.OPTIONS if o.release_key} <= RELEASE_KEYS


def test_specs_readme_documents_the_table() -> None:
    """specs/README.md's table of imagebuild's keys: every key of the table, with its default."""
    text = (REPO / "specs/README.md").read_text()
    rows = dict(re.findall(r"^\| `(imagebuild/\w+)`[ \t]*\|[^\n]*\|[ \t]*([^|\n]+?)[ \t]*\|$", text, re.MULTILINE))
    assert set(rows) == set(IMAGEBUILD_KEYS)
    for key in IMAGEBUILD_KEYS:
        default = options.BY_SPEC_KEY[key].default
        if default is not None:
            assert rows[key] == f"`{default}`", key


def test_stage2_keys_are_checked_when_the_build_is_resolved(tmp_path: Path) -> None:
    """Catalyst's stage2 keys become a typed value; every problem in them is reported at once,
    before any work starts."""
    with pytest.raises(SpecError) as caught:
        resolved(tmp_path, "diskimage/rcadd: sshd\ndiskimage/rm: /var/../../etc\ndiskimage/fsscript: /nonexistent.sh\n")
    message = caught.value.message
    assert "my.spec:5: 'sshd' in diskimage/rcadd is not service|runlevel" in message
    assert "my.spec:6: '/var/../../etc' in diskimage/rm contains '..'" in message
    assert "my.spec:7: fsscript /nonexistent.sh does not exist" in message
    config = resolved(tmp_path, "diskimage/rcadd: sshd|default\ndiskimage/empty: /var/log\n")
    assert config.stage2.rcadd == (("sshd", "default"),) and config.stage2.empty == ("/var/log",)
    assert config.stage2.where["diskimage/empty"].endswith("my.spec:6")
