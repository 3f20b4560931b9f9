"""The build settings table: every setting a user can give, once.

Each row names the setting, the spec key, the ``build`` flag and the release-config key that
give it, its default, and the check its text must pass. The spec reader, the command line,
the release config and ``resolve.resolve()`` (precedence: command line or release config, then
the spec, then the default) are all derived from this table, in the manner of mkosi's
``SETTINGS``; specs/README.md documents the same rows (a test holds them together).

Values are handled as text, as a spec writes them, until ``resolve.resolve()`` parses them.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from collections.abc import Callable, Mapping

from imagebuild.config import STAGE_SUFFIXES, STANDIN_SOURCES, Compression, parse_size
from imagebuild.errors import ConfigError
from imagebuild.gpg import fingerprint_problem, normalize_fingerprint

Check = Callable[[str], "str | None"]  # None when the text is good, else what is wrong with it


def choice(*allowed: str) -> Check:
    def check(value: str) -> str | None:
        return None if value in allowed else f"must be one of: {', '.join(allowed)}"
    return check


def size(value: str) -> str | None:
    try:
        parse_size(value)
    except ConfigError as exc:
        return f"{exc.message} ({exc.hint})"
    return None


def stage(value: str) -> str | None:
    if value in ("mirror", *STANDIN_SOURCES) or value.endswith(STAGE_SUFFIXES):
        return None
    return f"must be mirror, {', '.join(STANDIN_SOURCES)} or a stage tarball ({', '.join(STAGE_SUFFIXES)})"


def seconds(value: str) -> str | None:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    return None if math.isfinite(number) and number > 0 else "must be a number of seconds > 0"


def url(value: str) -> str | None:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme in ("http", "https") and parts.netloc or parts.scheme == "file" and parts.path:
        return None
    return "must be an http(s):// or file:// URL, for example https://distfiles.gentoo.org"


def fingerprints(value: str) -> str | None:
    problems = [p for word in value.split() if (p := fingerprint_problem(word))]
    if problems:
        return "; ".join(problems) + " (one word per fingerprint, no spaces inside it)"
    return None


def anything(value: str) -> str | None:
    return None if value else "must not be empty"


YES_NO = choice("yes", "no")


@dataclasses.dataclass(frozen=True)
class Option:
    """One build setting and every place it can be given."""

    name: str  # the BuildConfig field it resolves into (and resolve.Overrides.settings' key)
    spec_key: str | None  # imagebuild/compression, or a Catalyst key such as diskimage/qcow2_size
    flag: str | None  # the build command's option
    release_key: str | None  # the release config's key
    default: str | None  # as a spec writes it; None: unset unless given
    check: Check
    help: str = ""
    choices: tuple[str, ...] = ()
    # A repeatable flag's items are normalized one by one before they are joined with spaces.
    normalize: Callable[[str], str] | None = None
    path: bool = False  # a file or directory: relative to the release config that names it
    metavar: str = "VALUE"

    def problem(self, value: str) -> str | None:
        return self.check(value)


OPTIONS: tuple[Option, ...] = (
    Option("stage", "imagebuild/stage", "--stage", None, "mirror", stage, metavar="SOURCE",
           help="where the root filesystem comes from: 'mirror' (the newest stage3, verified), "
           "'standin' (the offline Debian-based stand-in of the spec's init), 'standin-systemd', "
           "'standin-openrc', or a stage tarball"),
    Option("mirror", "imagebuild/mirror", "--mirror", "mirror", "https://distfiles.gentoo.org", url,
           metavar="URL", help="Gentoo mirror base URL to fetch the stage3 from (on the command line "
           "it implies --stage mirror)"),
    Option("keyring", "imagebuild/keyring", "--keyring", "keyring", None, anything, metavar="FILE", path=True,
           help="GnuPG keyring holding the key that signs the mirror's DIGESTS (default: "
           "~/.config/imagebuild/gentoo-release.gpg, then /etc/imagebuild/gentoo-release.gpg)"),
    Option("trusted_keys", "imagebuild/trusted_keys", "--trusted-key", None, None, fingerprints, metavar="FPR",
           normalize=lambda text: normalize_fingerprint(text) or text.strip(),
           help="primary key fingerprint whose signatures on the mirror's files count, instead of "
           "Gentoo's release key (repeatable)"),
    Option("repo", "imagebuild/repo", "--repo", "repo", None, anything, metavar="DIR", path=True,
           help="the ebuild repository the package and kernel steps emerge from, bind-mounted read-only at "
           "/var/db/repos/gentoo (default: the stage's own, else Gentoo's snapshot from the mirror)"),
    Option("binhost", "imagebuild/binhost", "--binhost", "binhost", None, url, metavar="URL",
           help="binary package host to emerge from instead of the one in the stage's binrepos.conf "
           "(packages it lacks are built from source)"),
    Option("binhost_keyring", "imagebuild/binhost_keyring", "--binhost-keyring", "binhost_keyring", None, anything,
           metavar="FILE", path=True,
           help="OpenPGP key(s) that sign the binary packages (default: the stage's /etc/portage/gnupg); "
           "unsigned or otherwise signed packages are refused"),
    Option("size", "diskimage/qcow2_size", "--size", None, "20GiB", size, metavar="SIZE",
           help="image size, e.g. 20GiB"),
    Option("esp_size", "diskimage/qcow2_efisize", "--esp-size", None, "512MiB", size, metavar="SIZE",
           help="EFI system partition size, e.g. 512MiB"),
    Option("sector_size", "imagebuild/sector_size", "--sector-size", None, "512", choice("512", "4096"),
           choices=("512", "4096"),
           help="logical sector size: 512 (Gentoo's published images) or 4096 for 4Kn disks"),
    Option("compression", "imagebuild/compression", "--compression", "compression", Compression.zlib.value,
           choice(*Compression), choices=tuple(Compression),
           help="qcow2 compression: zlib opens everywhere, zstd is smaller and faster (QEMU 5.1+)"),
    Option("smoke_test", "imagebuild/smoke_test", None, None, "yes", YES_NO,
           help="boot the finished image under QEMU + edk2 and check it (build --no-test: no)"),
    Option("boot_timeout", "imagebuild/boot_timeout", "--boot-timeout", "boot_timeout", "600", seconds,
           metavar="SECONDS", help="seconds the smoke test may take"),
    Option("work_dir", None, "--work-dir", "work_dir", "/var/tmp/imagebuild", anything, metavar="DIR",
           path=True, help="scratch space (a few GiB per image)"),
    Option("cache_dir", None, "--cache-dir", "cache_dir", "/var/cache/imagebuild", anything, metavar="DIR",
           path=True, help="download and stand-in cache"),
)

BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}
BY_RELEASE_KEY: Mapping[str, Option] = {o.release_key: o for o in OPTIONS if o.release_key}
BY_SPEC_KEY: Mapping[str, Option] = {o.spec_key: o for o in OPTIONS if o.spec_key}

# imagebuild's own spec keys (the others in the table are Catalyst's).
SPEC_KEYS = frozenset(k for k in BY_SPEC_KEY if k.startswith("imagebuild/"))
# Keys that hold a list of words rather than one word.
LIST_SPEC_KEYS = frozenset({"imagebuild/trusted_keys"})


def default(name: str) -> str:
    """The default text of a setting that has one."""
    value = BY_NAME[name].default
    assert value is not None, name
    return value
