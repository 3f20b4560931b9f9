"""``imagebuild release``: the weekly job. Build, inspect and boot-test every image of a
release config, then publish the ones that passed (see ``imagebuild.publish``).

The run, top to bottom: read and check the config, resolve every build (spec errors surface
before any work), take the output root's lock, then per architecture unpack the stage once and
build + inspect + smoke-test each variant from it into a private staging directory, recording a
failure and going on; finally publish by rename and print the summary.

The heavy modules (build, smoke test) are imported when a run starts, so that adding this
command to the parser keeps ``imagebuild --help`` quick.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import tomllib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagebuild import options
from imagebuild.config import STANDIN_SOURCES, Arch, BuildConfig, Companion, ImageKind, InitSystem
from imagebuild.errors import ConfigError, ImagebuildError
from imagebuild.log import logger
from imagebuild.publish import (
    ImageResult,
    assemble,
    check_signing_key,
    check_stamp,
    staging_path,
    summary_table,
    transaction,
)
from imagebuild.render import shipped_dir

if TYPE_CHECKING:
    from imagebuild.build import SharedStage

EXIT_PASSED, EXIT_FAILED = 0, 1

# The release's own keys; the build settings it may give come from the settings table.
_KEYS = {"output", "keep", "sign", "architectures", "variants", "stages", "specs", *options.BY_RELEASE_KEY}


@dataclasses.dataclass(frozen=True)
class ReleaseConfig:
    """A release config file, checked. Relative paths in it are relative to the file."""

    path: Path
    output: Path
    architectures: tuple[Arch, ...]
    variants: tuple[ImageKind, ...]  # console, cloud-init, console-openrc, cloud-init-openrc
    stages: dict[tuple[Arch, InitSystem], str]  # "mirror", "standin" or a tarball path
    specs: dict[tuple[Arch, ImageKind], Path]
    keep: int = 4
    sign: str | None = None  # GnuPG key to sign images, DIGESTS and pointers with
    # Build settings of the table (compression, mirror, keyring, boot_timeout, work_dir,
    # cache_dir) as text, by setting name; paths made absolute. Every build of the run gets them.
    settings: dict[str, str] = dataclasses.field(default_factory=dict)


def default_config() -> Path:
    """ci/release.toml of the checkout (or of the installed package)."""
    return shipped_dir("ci") / "release.toml"


def load_release_config(path: Path) -> ReleaseConfig:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read release config {path}: {exc.strerror}",
                          hint="give the path of a release config such as ci/release.toml") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_release_config(data, path)


def parse_release_config(data: dict[str, Any], path: Path) -> ReleaseConfig:
    """Check every key of a parsed config; all problems are reported together."""
    problems: list[str] = []
    base = path.resolve().parent

    def local(value: str) -> Path:
        return (base / Path(value).expanduser()).resolve()

    def text(key: str, default: str | None = None) -> str | None:
        value = data.get(key, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append(f"'{key}' must be a non-empty string, not {value!r}")
            return default
        return value

    def names(key: str, parse: Any) -> tuple[Any, ...]:
        value = data.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            problems.append(f"'{key}' must be a non-empty list of names, not {value!r}")
            return ()
        parsed = []
        for item in value:
            try:
                parsed.append(parse(item))
            except ConfigError as exc:
                problems.append(f"'{key}': {exc}")
        if len(set(parsed)) != len(parsed):
            problems.append(f"'{key}' names something twice")
        return tuple(dict.fromkeys(parsed))

    problems += [f"unknown key '{key}'" for key in sorted(set(data) - _KEYS)]
    output = text("output")
    if output is None:
        problems.append("'output' is missing (the root of the published tree)")
    arches: tuple[Arch, ...] = names("architectures", Arch.parse)
    variants: tuple[ImageKind, ...] = names("variants", ImageKind.parse)
    keep = data.get("keep", 4)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        problems.append(f"'keep' must be a whole number of releases, at least 1, not {keep!r}")
        keep = 4
    settings: dict[str, str] = {}
    for key, option in options.BY_RELEASE_KEY.items():
        if key not in data:
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            problems.append(f"'{key}' must be a string or a number, not {value!r}")
        elif problem := option.problem(str(value)):
            problems.append(f"'{key}' {problem}, not {value!r}")
        else:
            settings[option.name] = str(local(str(value))) if option.path else str(value)

    # "amd64" gives the stage of every amd64 image; "amd64/openrc" that of the OpenRC ones alone
    # (a stage tarball runs one init; "mirror" and "standin" find the right one by themselves).
    given: dict[tuple[Arch, InitSystem | None], str] = {}
    for key, value in _table(data, "stages", problems).items():
        arch_name, slash, init_name = key.partition("/")
        try:
            arch = Arch.parse(arch_name)
            init = InitSystem(init_name) if slash else None
        except (ConfigError, ValueError) as exc:
            problems.append(f"[stages] '{key}' is not ARCH or ARCH/INIT (INIT: systemd or openrc): {exc}")
            continue
        if not isinstance(value, str) or not value:
            problems.append(f"[stages] {key} must be 'mirror', 'standin' or a tarball path, not {value!r}")
        else:
            given[arch, init] = value if value in ("mirror", *STANDIN_SOURCES) else str(local(value))
    stages = {(arch, init): given.get((arch, init)) or given.get((arch, None)) or "mirror"
              for arch in arches for init in InitSystem}
    specs: dict[tuple[Arch, ImageKind], Path] = {}
    for key, value in _table(data, "specs", problems).items():
        arch_name, _, variant_name = key.partition("/")
        try:
            image = (Arch.parse(arch_name), ImageKind.parse(variant_name))
        except ConfigError as exc:
            problems.append(f"[specs] '{key}' is not ARCH/VARIANT: {exc}")
            continue
        if not isinstance(value, str) or not value:
            problems.append(f"[specs] '{key}' must be the path of a spec file")
        else:
            specs[image] = local(value)

    if problems:
        raise ConfigError(f"release config {path} has {len(problems)} problem(s):\n"
                          + "\n".join(f"    - {p}" for p in problems),
                          hint="ci/release.toml shows every key, with comments")
    assert output is not None
    return ReleaseConfig(
        path=path, output=local(output), architectures=arches, variants=variants, stages=stages,
        specs=specs, keep=keep, sign=text("sign"), settings=settings,
    )


def _table(data: dict[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        problems.append(f"'{key}' must be a table ([{key}])")
        return {}
    return value


def select(config: ReleaseConfig, arches: Collection[Arch] | None,
           variants: Collection[ImageKind] | None) -> list[tuple[Arch, ImageKind]]:
    """The images to make: the config's arch × variant, narrowed by --arch/--variant."""
    for asked, allowed, what in ((arches, config.architectures, "architecture"),
                                 (variants, config.variants, "variant")):
        unknown = sorted(str(a) for a in asked or () if a not in allowed)
        if unknown:
            raise ConfigError(f"{config.path} has no {what} {', '.join(unknown)}",
                              hint=f"it has: {', '.join(str(a) for a in allowed)}")
    return [(a, v) for a in config.architectures if not arches or a in arches
            for v in config.variants if not variants or v in variants]


def run_release(config_path: Path, *, output: Path | None = None, stamp: str | None = None,
                arches: Collection[Arch] | None = None, variants: Collection[ImageKind] | None = None,
                sign: str | None = None) -> int:
    """Build, test and publish a release; 0 if every image passed, 1 if any failed."""
    from imagebuild.resolve import Overrides, make_stamp, resolve

    release = load_release_config(config_path)
    out = (output or release.output).resolve()
    stamp = check_stamp(stamp) if stamp else make_stamp()
    sign = sign or release.sign
    images = select(release, arches, variants)
    staging = staging_path(out, stamp)
    configs = [resolve(arch, kind.variant, Overrides(
        spec=release.specs.get((arch, kind)), init=kind.init, output_dir=staging / "build" / arch.value,
        settings={**release.settings, "stage": release.stages[arch, kind.init], "smoke_test": "yes"},
        stamp=stamp)) for arch, kind in images]
    if sign:
        check_signing_key(sign)

    results: list[ImageResult] = []
    with transaction(out, stamp, {c.arch for c in configs}, keep=release.keep, sign=sign) as txn:
        logger.info("Release %s: %s into %s", stamp, ", ".join(c.image_name for c in configs), out)
        assert txn.staging == staging  # where the builds were told to write
        # One unpacked stage for the images that share it (an arch's systemd or OpenRC ones).
        for arch, stage in dict.fromkeys((c.arch, c.stage) for c in configs):
            results += build_arch([c for c in configs if (c.arch, c.stage) == (arch, stage)])
        for result in results:
            txn.add(result, staging / "build" / result.arch.value, move=True)
    print(summary_table(results))
    return EXIT_PASSED if all(r.passed for r in results) else EXIT_FAILED


def build_arch(configs: list[BuildConfig]) -> list[ImageResult]:
    """Every image of one arch from one unpacked stage; a failure is recorded, not raised."""
    from imagebuild.build import shared_stage

    results: dict[str, ImageResult] = {}
    try:
        with shared_stage(configs[0]) as shared:
            for config in configs:
                results[config.image_name] = release_image(config, shared)
    except (ImagebuildError, OSError) as exc:
        # The stage itself could not be had (mirror down, bad tarball): no image of this arch.
        logger.error("✗ the %s stage failed: %s", configs[0].arch, exc)
        for config in configs:
            if config.image_name not in results:
                results[config.image_name] = _stage_failed(config, exc)
    return [results[c.image_name] for c in configs]


def release_image(config: BuildConfig, shared: SharedStage) -> ImageResult:
    """Make one image into ``config.output_dir`` (imagebuild.product) and record what happened."""
    from imagebuild.product import make_image

    result = ImageResult(arch=config.arch, variant=config.variant, init=config.kind.init, image=config.image_name)
    image = config.image_path
    with _build_log(Companion.build_log.of(image)):
        try:
            product = make_image(config, shared=shared)
            result.build_seconds, result.size = product.build_seconds, image.stat().st_size
            result.passed, result.reason = product.passed, product.reason
            if product.smoke is not None:
                result.boot_seconds = product.smoke.total_seconds
                _relative_paths(Companion.smoke_json.of(image))
        except (ImagebuildError, OSError) as exc:
            result.reason = _first_line(exc)
            logger.error("✗ %s: %s", image.name, exc)
        if not result.passed:
            logger.error("✗ %s FAILED: %s", image.name, result.reason)
    result.files = sorted(p.name for p in config.output_dir.iterdir() if p.name.startswith(image.name))
    return result


def _stage_failed(config: BuildConfig, exc: BaseException) -> ImageResult:
    """An image never started because its stage failed; its build log says why."""
    log = Companion.build_log.of(config.image_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"the {config.arch} stage ({config.stage}) could not be prepared:\n{exc}\n")
    return ImageResult(arch=config.arch, variant=config.variant, init=config.kind.init, image=config.image_name,
                       reason=f"stage: {_first_line(exc)}", files=[log.name])


def _first_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, ImagebuildError) else f"{type(exc).__name__}: {exc}"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _relative_paths(smoke_json: Path) -> None:
    """The smoke JSON names its files by their staging paths; published, they sit beside it."""
    from imagebuild.smoketest.results import read_json, write_json

    if smoke_json.is_file():
        result = read_json(smoke_json)
        for field in ("image", "console_log", "screenshot"):
            value = getattr(result, field)
            if value:
                setattr(result, field, Path(value).name)
        write_json(result, smoke_json)


@contextlib.contextmanager
def _build_log(path: Path) -> Iterator[None]:
    """Everything logged while one image is made also goes to its own ``.build.log``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


# -- the command line (wired into imagebuild.cli) --------------------------------------------


def add_release_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "release", parents=[common],
        help="build, boot-test and publish every image of a release config (the weekly job)",
        description="Build every arch × variant of CONFIG, boot-test each, and publish the ones that "
        "passed into OUTPUT/releases/<arch>/autobuilds/<stamp>/, updating latest-di-*.txt. "
        "Exit status 0 if every image passed, 1 if any failed.")
    parser.add_argument("config", nargs="?", type=Path, metavar="CONFIG",
                        help="release config (default: ci/release.toml shipped with imagebuild)")
    parser.add_argument("-o", "--output", type=Path, help="output root (default: 'output' in CONFIG)")
    parser.add_argument("--stamp", help="release stamp, YYYYMMDDTHHMMSSZ (default: now, UTC)")
    parser.add_argument("--arch", action="append", metavar="ARCH",
                        help="only this architecture of CONFIG (repeatable): a partial tree")
    parser.add_argument("--variant", action="append", metavar="VARIANT",
                        help="only this variant of CONFIG (repeatable)")
    parser.add_argument("--sign", metavar="KEYID", help="sign with this GnuPG key (overrides 'sign' in CONFIG)")
    parser.add_argument("--assemble", nargs="+", type=Path, metavar="DIR",
                        help="build nothing: publish the partial trees DIR... (made with --arch on "
                        "several machines) into the output root")
    return parser


def cmd_release(args: argparse.Namespace) -> int:
    config_path = args.config or default_config()
    if args.assemble:
        if args.arch or args.variant or args.stamp:
            raise ConfigError("--assemble takes the images, stamp and arches from the partial trees",
                              hint="drop --arch, --variant and --stamp")
        release = load_release_config(config_path)
        results = assemble(args.assemble, args.output or release.output, keep=release.keep,
                           sign=args.sign or release.sign)
        print(summary_table(results))
        return EXIT_PASSED if all(r.passed for r in results) else EXIT_FAILED
    return run_release(
        config_path, output=args.output, stamp=args.stamp,
        arches=[Arch.parse(a) for a in args.arch] if args.arch else None,
        variants=[ImageKind.parse(v) for v in args.variant] if args.variant else None,
        sign=args.sign,
    )
