"""Turn a spec plus command-line options into one validated, frozen BuildConfig.

Precedence: command line, then the spec, then Gentoo's defaults. Everything is checked
here, before the first step runs; nothing deeper reads raw spec keys.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from imagebuild.config import (
    STANDIN_SOURCES,
    Arch,
    BuildConfig,
    Compression,
    ImageKind,
    ImageLayout,
    InitSystem,
    Variant,
    parse_size,
)
from imagebuild.errors import ConfigError, ImagebuildError
from imagebuild.gpg import GENTOO_RELEASE_KEY_FINGERPRINT, fingerprint_problem, normalize_fingerprint
from imagebuild.mirror import flavour_from_source_subpath
from imagebuild.render import shipped_dir
from imagebuild.spec import Spec, load_spec


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Command-line options; None means "not given"."""

    spec: Path | None = None
    stage: str | None = None
    mirror: str | None = None
    keyring: Path | None = None
    trusted_keys: tuple[str, ...] = ()
    allow_older_stage: bool = False
    output_dir: Path = Path("out")
    size: str | None = None
    esp_size: str | None = None
    sector_size: int | None = None
    compression: str | None = None
    smoke_test: bool | None = None
    boot_timeout: float | None = None
    stamp: str | None = None
    work_dir: Path | None = None
    cache_dir: Path | None = None
    placeholders: tuple[tuple[str, str], ...] = ()
    init: InitSystem | None = None


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


def _yes_no(value: str | None, where: str) -> bool | None:
    if value is None:
        return None
    if value.lower() in ("yes", "true", "1"):
        return True
    if value.lower() in ("no", "false", "0"):
        return False
    raise ConfigError(f"{where}: expected yes or no, got '{value}'")


def resolve(arch: Arch, variant: Variant, opts: Overrides) -> BuildConfig:
    stamp = opts.stamp or make_stamp()
    init_hint = opts.init or STANDIN_SOURCES.get(opts.stage or "")
    spec_path = opts.spec or default_spec(arch, variant, init_hint or InitSystem.systemd)
    placeholders = {"TIMESTAMP": stamp, **dict(opts.placeholders)}
    spec = load_spec(spec_path, placeholders=placeholders,
                     variables={"arch": arch.value, "variant": variant.value, "stamp": stamp})
    _check_matches(spec, arch, variant)

    def pick(cli: object, key: str) -> str | None:
        return str(cli) if cli is not None else spec.get(key)

    size = pick(opts.size, "diskimage/qcow2_size")
    esp_size = pick(opts.esp_size, "diskimage/qcow2_efisize")
    layout = ImageLayout(
        size=parse_size(size, what="image size") if size else ImageLayout.size,
        esp_size=parse_size(esp_size, what="EFI partition size") if esp_size else ImageLayout.esp_size,
        sector_size=int(pick(opts.sector_size, "imagebuild/sector_size") or 512),
        root_fstype=spec.get("diskimage/qcow2_roottype") or "xfs",
    )
    layout.validate()
    compression_text = pick(opts.compression, "imagebuild/compression") or "zlib"
    try:
        compression = Compression(compression_text)
    except ValueError:
        raise ConfigError(f"unknown compression '{compression_text}'", hint="use zlib or zstd") from None
    smoke = opts.smoke_test if opts.smoke_test is not None else _yes_no(
        spec.get("imagebuild/smoke_test"), spec.where("imagebuild/smoke_test"))
    timeout = pick(opts.boot_timeout, "imagebuild/boot_timeout")
    # --mirror alone means "take the stage from that mirror".
    stage = opts.stage or ("mirror" if opts.mirror else None) or spec.get("imagebuild/stage") or "mirror"
    init, init_source = _expected_init(spec, opts, stage)
    image_name = _image_name(spec, arch, ImageKind(variant, init or InitSystem.systemd), stamp)
    if opts.init is not None and stage in STANDIN_SOURCES and stage != "standin" and STANDIN_SOURCES[stage] != opts.init:
        raise ConfigError(f"--stage {stage} is the {STANDIN_SOURCES[stage].value} stand-in, but --init "
                          f"{opts.init.value} was asked for",
                          hint=f"use --stage standin-{opts.init.value}, or leave out --init")
    if stage == "standin" and init == InitSystem.openrc:
        stage = "standin-openrc"  # the stand-in of the init the spec or --init asks for
    spec_keyring = spec.get("imagebuild/keyring")
    keyring = opts.keyring or (Path(spec_keyring) if spec_keyring else None)
    return BuildConfig(
        arch=arch,
        variant=variant,
        stage=stage,
        mirror=pick(opts.mirror, "imagebuild/mirror") or BuildConfig.mirror,
        flavour=_flavour(spec, arch) if stage == "mirror" else None,
        keyring=keyring.expanduser().resolve() if keyring else None,
        trusted_keys=_trusted_keys(spec, opts.trusted_keys),
        allow_older_stage=opts.allow_older_stage,
        output_dir=opts.output_dir.resolve(),
        image_name=image_name,
        stamp=stamp,
        layout=layout,
        compression=compression,
        smoke_test=True if smoke is None else smoke,
        boot_timeout=float(timeout) if timeout else 600.0,
        spec_path=spec_path,
        spec=spec,
        work_dir=(opts.work_dir or BuildConfig.work_dir).resolve(),
        cache_dir=(opts.cache_dir or BuildConfig.cache_dir).resolve(),
        init=init,
        init_source=init_source,
    )


def _trusted_keys(spec: Spec, cli: tuple[str, ...]) -> tuple[str, ...]:
    """--trusted-key (each may be written with spaces), else imagebuild/trusted_keys, else Gentoo's key."""
    if cli:
        problems = [p for text in cli if (p := fingerprint_problem(text))]
        if problems:
            raise ConfigError(f"--trusted-key {problems[0]}",
                              hint="give the primary key's fingerprint; 'gpg --fingerprint KEY' shows it")
        names = [normalize_fingerprint(text) or text for text in cli]
    else:
        # Checked when the spec was read: each word is a fingerprint.
        names = [normalize_fingerprint(word) or word for word in (spec.get("imagebuild/trusted_keys") or "").split()]
    return tuple(dict.fromkeys(names)) or (GENTOO_RELEASE_KEY_FINGERPRINT,)


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
    if subarch is not None and subarch != arch.value:
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
        if "/" in name or "@" in name:
            raise ConfigError(
                f"{spec.where('diskimage/qcow2')}: '{name}' is not a plain file name"
                " (or has an unexpanded placeholder)",
                hint="write a file name such as di-amd64-console-@TIMESTAMP@.qcow2",
            )
        return name
    return f"di-{arch.value}-{kind.file_part}-{stamp}.qcow2"
