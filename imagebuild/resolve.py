"""Turn a spec plus command-line options into one validated, frozen BuildConfig.

Precedence: command line, then the spec, then Gentoo's defaults. Everything is checked
here, before the first step runs; nothing deeper reads raw spec keys.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from imagebuild import options
from imagebuild.config import (
    STANDIN_SOURCES,
    Arch,
    BuildConfig,
    Compression,
    ImageKind,
    ImageLayout,
    InitSystem,
    MirrorStage,
    SnapshotSource,
    StageSource,
    StandinStage,
    TarballStage,
    Variant,
    parse_size,
)
from imagebuild.emerge import read_portage_keys
from imagebuild.errors import ConfigError, ImagebuildError
from imagebuild.gpg import GENTOO_RELEASE_KEY_FINGERPRINT, GENTOO_SNAPSHOT_KEY_FINGERPRINT, normalize_fingerprint
from imagebuild.log import logger
from imagebuild.mirror import flavour_from_source_subpath
from imagebuild.render import shipped_dir
from imagebuild.seed import check_seed_spec, find_seed, seed_subpath
from imagebuild.spec import Spec, load_spec
from imagebuild.stage2 import read_stage2_keys


@dataclasses.dataclass(frozen=True)
class Overrides:
    """What the command line (or the release config) gives; absent means "not given".

    ``settings`` holds the table's settings (imagebuild.options) by name, as text.
    """

    spec: Path | None = None
    settings: Mapping[str, str] = dataclasses.field(default_factory=dict)
    allow_older_stage: bool = False
    output_dir: Path = Path("out")
    stamp: str | None = None
    placeholders: tuple[tuple[str, str], ...] = ()
    init: InitSystem | None = None
    stage1_spec: Path | None = None  # the diskimage-stage1 spec run with a diskimage-stage2 one

    @property
    def stage(self) -> str | None:
        return self.settings.get("stage")


def default_spec(arch: Arch, variant: Variant, init: InitSystem = InitSystem.systemd) -> Path:
    """The shipped spec for arch × variant (× init: the OpenRC ones are VARIANT-openrc.spec)."""
    name = variant.value if init == InitSystem.systemd else f"{variant.value}-{init.value}"
    candidate = shipped_dir("specs") / arch.value / f"{name}.spec"
    if candidate.is_file():
        return candidate
    raise ConfigError(
        f"no shipped spec for {arch.value} {variant.value} on {init.value}",
        hint="pass one with --spec FILE",
    )


def _expected_init(spec: Spec, opts: Overrides, stage: str) -> tuple[InitSystem | None, str]:
    """The init the stage must run, and who says so: --init, the stand-in named, the spec's profile."""
    if opts.init is not None:
        return opts.init, f"--init {opts.init.value}"
    if stage in STANDIN_SOURCES and stage != "standin":  # plain "standin" is the stand-in of the spec's init
        return STANDIN_SOURCES[stage], f"--stage {stage}"
    profile = spec.get("profile")
    if profile:
        # Gentoo's systemd profiles end in /systemd (default/linux/amd64/23.0/systemd); the others are OpenRC.
        init = InitSystem.systemd if "systemd" in profile.split("/") else InitSystem.openrc
        return init, f"{spec.where('profile')} ({profile})"
    return None, ""


def make_stamp() -> str:
    """Gentoo's release stamp, YYYYMMDDTHHMMSSZ, from SOURCE_DATE_EPOCH when set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(int(epoch) if epoch else None))


class _Values:
    """The text of each setting (imagebuild.options): the command line, else the spec, else the
    table's default. Spec values were checked when the spec was read; command-line ones here."""

    def __init__(self, spec: Spec, opts: Overrides) -> None:
        self.spec, self.opts = spec, opts

    def given(self, name: str) -> str | None:
        """What the command line (or the release config) says, as text; None if nothing."""
        text = self.opts.settings.get(name)
        if text is None:
            return None
        option = options.BY_NAME[name]
        if problem := option.problem(text):
            where = option.flag or option.release_key or name
            raise ConfigError(f"{where} {text}: {problem}", hint=option.help)
        return text

    def text(self, name: str) -> str | None:
        option = options.BY_NAME[name]
        given = self.given(name)
        if given is not None:
            return given
        if option.spec_key and (in_spec := self.spec.get(option.spec_key)):
            return in_spec
        return option.default

    def __getitem__(self, name: str) -> str:
        value = self.text(name)
        assert value is not None, f"{name} has no default"
        return value


# What may become one component of a path: a stamp, an image's file name (a documented set;
# no '/', no leading '.', no whitespace or control characters).
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


def check_stamp(stamp: str) -> str:
    if not PLAIN_NAME.fullmatch(stamp):
        raise ConfigError(f"--stamp {stamp!r} is not a plain name: it becomes part of file names",
                          hint="use letters, digits, '.', '_', '+' and '-' (Gentoo's stamps look like "
                          "20261124T031854Z)")
    return stamp


def resolve(arch: Arch, variant: Variant, opts: Overrides) -> BuildConfig:
    stamp = check_stamp(opts.stamp) if opts.stamp else make_stamp()
    init_hint = opts.init or STANDIN_SOURCES.get(opts.stage or "")
    spec_path = opts.spec or default_spec(arch, variant, init_hint or InitSystem.systemd)
    placeholders = {"TIMESTAMP": stamp, **dict(opts.placeholders)}
    variables = {"arch": arch.value, "variant": variant.value, "stamp": stamp}
    spec = load_spec(spec_path, placeholders=placeholders, variables=variables)
    if opts.stage1_spec is not None:
        spec = _with_stage1(spec, load_spec(opts.stage1_spec, placeholders=placeholders, variables=variables), arch)
    _check_matches(spec, arch, variant)
    values = _Values(spec, opts)
    cache_dir = Path(values["cache_dir"]).resolve()

    layout = ImageLayout(
        size=parse_size(values["size"], what="image size"),
        esp_size=parse_size(values["esp_size"], what="EFI partition size"),
        sector_size=int(values["sector_size"]),
        root_fstype=spec.get("diskimage/qcow2_roottype") or "xfs",
    )
    layout.validate()
    # --mirror alone means "take the stage from that mirror".
    stage = values.given("stage") or ("mirror" if values.given("mirror") else None) or values["stage"]
    if not (values.given("stage") or values.given("mirror") or spec.get("imagebuild/stage")):
        # A diskimage-stage2 spec starts from its diskimage-stage1 seed, as Catalyst's does.
        if (seed := find_seed(spec, cache_dir)) is not None:
            logger.info("%s: the seed %s, from the seed cache", spec.where("source_subpath"), seed)
            stage = str(seed)
    init, init_source = _expected_init(spec, opts, stage)
    image_name = _image_name(spec, arch, ImageKind(variant, init or InitSystem.systemd), stamp)
    if opts.init is not None and stage in STANDIN_SOURCES and stage != "standin" and STANDIN_SOURCES[stage] != opts.init:
        raise ConfigError(f"--stage {stage} is the {STANDIN_SOURCES[stage].value} stand-in, but --init "
                          f"{opts.init.value} was asked for",
                          hint=f"use --stage standin-{opts.init.value}, or leave out --init")
    source: StageSource
    if stage in STANDIN_SOURCES:
        # Plain "standin" is the stand-in of the init the spec or --init asks for.
        source = StandinStage((init or InitSystem.systemd) if stage == "standin" else STANDIN_SOURCES[stage])
    elif stage == "mirror":
        keyring = values.text("keyring")
        trusted = values.text("trusted_keys")
        source = MirrorStage(
            url=values["mirror"],
            flavour=_flavour(spec, arch),
            keyring=Path(keyring).expanduser().resolve() if keyring else None,
            trusted_keys=tuple(dict.fromkeys(normalize_fingerprint(word) or word for word in trusted.split()))
            if trusted else (GENTOO_RELEASE_KEY_FINGERPRINT,),
            allow_older=opts.allow_older_stage,
        )
    else:
        source = TarballStage(Path(stage).expanduser().resolve())
    return BuildConfig(
        arch=arch,
        variant=variant,
        stage=source,
        output_dir=opts.output_dir.resolve(),
        image_name=image_name,
        stamp=stamp,
        layout=layout,
        compression=Compression(values["compression"]),
        smoke_test=values["smoke_test"] == "yes",
        boot_timeout=float(values["boot_timeout"]),
        spec_path=spec_path,
        stage2=read_stage2_keys(spec),
        portage=read_portage_keys(spec, repo=values.text("repo"), binhost=values.text("binhost"),
                                  keyring=values.text("binhost_keyring"), snapshot=_snapshot(values)),
        work_dir=Path(values["work_dir"]).resolve(),
        cache_dir=cache_dir,
        init=init,
        init_source=init_source,
    )


# What a diskimage-stage2 build takes from its diskimage-stage1 spec when both run as one:
# the package step's keys and the stage3 it starts from; profile and portage_confdir too where
# the stage2 spec has none.
_STAGE1_KEYS = ("diskimage/packages", "diskimage/use", "source_subpath")


def _with_stage1(spec: Spec, stage1: Spec, arch: Arch) -> Spec:
    """The diskimage-stage2 ``spec`` and its diskimage-stage1 spec as one build."""
    check_seed_spec(stage1, arch)
    if spec.get("target") != "diskimage-stage2":
        raise ConfigError(f"{spec.where('target')}: --stage1-spec goes with a diskimage-stage2 spec, "
                          f"and this one's target is '{spec.get('target') or '(none)'}'",
                          hint="give releng's diskimage-stage2-*.spec as --spec and its diskimage-stage1 as --stage1-spec")
    makes, starts = seed_subpath(stage1), spec.get("source_subpath")
    if starts is not None and starts != makes:
        raise ConfigError(f"{spec.where('source_subpath')}: the stage2 spec starts from {starts}, "
                          f"but {stage1.path} makes {makes}",
                          hint="give the stage1 spec of the same release and variant (and one --stamp for both)")
    keys = _STAGE1_KEYS + tuple(k for k in ("profile", "portage_confdir") if k not in spec)
    return spec.merged(stage1, keys)


def _snapshot(values: _Values) -> SnapshotSource:
    """The mirror's repository snapshot, trusted as the stage3 is: the same keyring, and the
    user's trusted keys or else Gentoo's snapshot key."""
    keyring = values.text("keyring")
    trusted = values.text("trusted_keys")
    return SnapshotSource(
        url=values["mirror"], keyring=Path(keyring).expanduser().resolve() if keyring else None,
        trusted_keys=tuple(dict.fromkeys(normalize_fingerprint(w) or w for w in trusted.split()))
        if trusted else (GENTOO_SNAPSHOT_KEY_FINGERPRINT,))


def _flavour(spec: Spec, arch: Arch) -> str:
    """The stage3 flavour to fetch, from Catalyst's source_subpath (stage3-<flavour>-<stamp>)."""
    subpath = spec.get("source_subpath")
    if not subpath:
        raise ConfigError(
            f"{spec.path}: no source_subpath, so there is no stage3 to fetch from the mirror",
            hint="add e.g. 'source_subpath: 23.0-default/stage3-amd64-nomultilib-systemd-@TIMESTAMP@', "
            "or give a stage with --stage FILE",
        )
    try:
        return flavour_from_source_subpath(subpath)
    except ImagebuildError as exc:
        raise ConfigError(f"{spec.where('source_subpath')}: {exc.message}", hint=exc.hint) from None


def _check_matches(spec: Spec, arch: Arch, variant: Variant) -> None:
    subarch = spec.get("subarch")
    # Gentoo's names count: releng's riscv specs say "subarch: rv64_lp64d".
    if subarch is not None and subarch not in (arch.value, arch.gentoo, arch.gentoo_dir):
        raise ConfigError(
            f"{spec.where('subarch')}: the spec is for '{subarch}', but {arch.value} was asked for",
            hint=f"use a spec for {arch.value}, or build {subarch}",
        )
    kind = spec.get("diskimage/type")
    if kind is not None and Variant.parse(kind) != variant:
        raise ConfigError(
            f"{spec.where('diskimage/type')}: the spec makes a '{kind}' image, but {variant.value} was asked for",
            hint=f"use a spec with diskimage/type: {variant.value}",
        )


def _image_name(spec: Spec, arch: Arch, kind: ImageKind, stamp: str) -> str:
    name = spec.get("diskimage/qcow2")
    if name and name.lower() not in ("yes", "true") and name.endswith(".qcow2"):
        if not PLAIN_NAME.fullmatch(name):
            raise ConfigError(
                f"{spec.where('diskimage/qcow2')}: '{name}' is not a plain file name"
                " (or has an unexpanded placeholder)",
                hint="write a file name of letters, digits, '.', '_', '+' and '-', such as "
                "di-amd64-console-@TIMESTAMP@.qcow2",
            )
        return name
    return f"di-{arch.gentoo}-{kind.file_part}-{stamp}.qcow2"
