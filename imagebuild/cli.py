"""The ``imagebuild`` command. The only place that turns errors into exit codes."""

from __future__ import annotations

import argparse
import json
import signal
import traceback
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from imagebuild import __version__, options
from imagebuild.config import Arch, Companion, InitSystem, Variant
from imagebuild.errors import ImagebuildError, Interrupted
from imagebuild.log import logger, setup_logging, step_error

if TYPE_CHECKING:
    from imagebuild.smoketest import SmokeResult

EXIT_FAILED = 1  # the image was made or tested and did not pass
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in imagebuild, not bad input
# Commands that mount (chroot binds, loop mounts of images): they run in a private mount
# namespace, so nothing they mount is visible outside or outlives them.
_MOUNTING_COMMANDS = frozenset({"build", "inspect", "stage1", "release", "standin"})


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # Raising here unwinds every context manager (mounts, loop devices, QEMU) on the way out.
    # A second signal (an impatient ^C) must not cut that cleanup short: from now on, say so.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _while_cleaning_up)
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}; cleaned up")


def _while_cleaning_up(signum: int, _frame: FrameType | None) -> None:
    logger.warning("%s: still cleaning up (mounts, loop devices, QEMU); please wait",
                   signal.Signals(signum).name)


def _parser() -> argparse.ArgumentParser:
    # --debug works before or after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="log every command; show tracebacks")
    parser = argparse.ArgumentParser(
        prog="imagebuild",
        description="Build bootable QCOW2 disk images of Gentoo Linux and prove they boot.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"imagebuild {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser("build", parents=[common], help="build one image from a spec, then smoke-test it")
    build.add_argument("arch", help="amd64, arm64 or riscv64")
    build.add_argument("variant", help="console or cloud-init")
    build.add_argument("--spec", type=Path, help="Catalyst-style spec (default: the shipped specs/ARCH/VARIANT.spec)")
    build.add_argument("--init", choices=[i.value for i in InitSystem],
                       help="the stage's init: picks the shipped spec (VARIANT-openrc.spec for openrc) and "
                       "the stand-in; the stage must run it (default: what the spec's profile says)")
    for option in options.OPTIONS:  # the settings table: --stage, --mirror, --size, --compression, ...
        if option.flag:
            build.add_argument(option.flag, dest=option.name, help=_option_help(option),
                               choices=option.choices or None, metavar=None if option.choices else option.metavar,
                               action="append" if option.normalize else "store")
    build.add_argument("--allow-older-stage", action="store_true",
                       help="accept a mirror pointer older than the newest one seen for the flavour (with a warning)")
    build.add_argument("-o", "--output", type=Path, default=Path("out"), help="output directory (default: ./out)")
    build.add_argument("--stamp", help="release stamp (default: now, YYYYMMDDTHHMMSSZ)")
    build.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="value for a spec placeholder @NAME@ (repeatable)")
    build.add_argument("--stage1-spec", type=Path, metavar="FILE",
                       help="the diskimage-stage1 spec of a diskimage-stage2 --spec: both run as one build, "
                       "from the stage3 the stage1 spec names")
    build.add_argument("--no-test", action="store_true", help="do not boot-test the image (spec: imagebuild/smoke_test)")
    build.add_argument("--keep-workspace", action="store_true", help="keep the scratch tree for debugging")

    smoke = sub.add_parser("smoke-test", parents=[common], help="boot an image under QEMU + edk2 and check it works")
    smoke.add_argument("image", type=Path)
    _allow_backing_file(smoke)
    smoke.add_argument("--arch", help="amd64, arm64 or riscv64 (default: from the image's manifest)")
    smoke.add_argument("--variant", help="console or cloud-init (default: from the image's manifest)")
    smoke.add_argument("--results", type=Path, help="directory for the log, JSON and JUnit (default: beside the image)")
    smoke.add_argument("--boot-timeout", type=float, default=float(options.default("boot_timeout")),
                       help=f"deadline in seconds (default {options.default('boot_timeout')})")

    boot = sub.add_parser("qemu", parents=[common],
                          help="boot an image by hand, its serial console on this terminal (Ctrl-a x quits)")
    boot.add_argument("image", type=Path)
    _allow_backing_file(boot)
    boot.add_argument("--arch", help="amd64, arm64 or riscv64 (default: from the image's manifest)")
    boot.add_argument("--variant", help="console or cloud-init (default: from the image's manifest)")
    boot.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    boot.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    boot.add_argument("--writable", action="store_true",
                      help="keep the guest's changes in the image (default: thrown away; the DIGESTS stay true)")
    boot.add_argument("--ssh-port", type=int, metavar="PORT", help="forward 127.0.0.1:PORT to the guest's SSH port")

    inspect = sub.add_parser("inspect", parents=[common], help="audit an image offline (layout, boot files, hygiene, variant)")
    inspect.add_argument("image", type=Path)
    _allow_backing_file(inspect)
    inspect.add_argument("--arch", help="amd64, arm64 or riscv64 (default: from the image's manifest)")
    inspect.add_argument("--variant", help="console or cloud-init (default: from the image's manifest)")
    inspect.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    inspect.add_argument("--keep-caches", action="store_true", help="allow distfiles and binary packages")
    inspect.add_argument("--work-dir", type=Path, default=Path(options.default("work_dir")),
                         help=f"scratch space for the raw copy (default {options.default('work_dir')})")

    seed = sub.add_parser("stage1", parents=[common],
                          help="diskimage-stage1: emerge a spec's diskimage/packages into a stage, write a seed")
    seed.add_argument("arch", help="amd64, arm64 or riscv64")
    seed.add_argument("--spec", type=Path, required=True, help="a diskimage-stage1 spec (Catalyst syntax)")
    seed.add_argument("--stage", required=True, metavar="SOURCE", help="stage3 tarball path, or 'standin'")
    seed.add_argument("-o", "--output", type=Path,
                      help="seed tarball to write (.tar, .tar.xz, .tar.zst; default: the seed cache, "
                      "<cache-dir>/builds/<rel_type>/diskimage-stage1-<subarch>-<version_stamp>.tar.zst, "
                      "where a diskimage-stage2 spec's source_subpath finds it)")
    seed.add_argument("--stamp", help="release stamp for @TIMESTAMP@ (default: now); the stage2 build gives the same")
    seed.add_argument("--repo", type=Path, help="ebuild repository to bind-mount at /var/db/repos/gentoo")
    seed.add_argument("--binhost", metavar="URL", help="binary package host instead of the stage's binrepos.conf")
    seed.add_argument("--binhost-keyring", type=Path, metavar="FILE", help="the OpenPGP key that signs its packages")
    seed.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="value for a spec placeholder @NAME@ (repeatable)")
    seed.add_argument("--work-dir", type=Path, default=Path(options.default("work_dir")))
    seed.add_argument("--cache-dir", type=Path, default=Path(options.default("cache_dir")))

    from imagebuild.release import add_release_parser

    add_release_parser(sub, common)

    sub.add_parser("doctor", parents=[common], help="list the host tools and features imagebuild needs, and what is missing")

    stage = sub.add_parser("standin", parents=[common], help="build (or find cached) the offline stand-in stage and print its path")
    stage.add_argument("arch", help="amd64, arm64 or riscv64")
    stage.add_argument("--init", choices=[i.value for i in InitSystem], default=InitSystem.systemd.value,
                       help="the stand-in's init system (default: systemd)")
    stage.add_argument("--cache-dir", type=Path, default=Path(options.default("cache_dir")))
    return parser


def _allow_backing_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-backing-file", action="store_true",
                        help="read an image that names a backing file or an external data file (refused by "
                        "default: QEMU would read whatever path the image names)")


def _option_help(option: options.Option) -> str:
    where = [f"spec: {option.spec_key}"] if option.spec_key else []
    if option.default:
        where.append(f"default: {option.default}")
    return f"{option.help}" + (f" ({'; '.join(where)})" if where else "")


def _given_settings(args: argparse.Namespace) -> dict[str, str]:
    """The table's settings the command line gives, as text (a repeated flag's items joined)."""
    given: dict[str, str] = {}
    for option in options.OPTIONS:
        value = getattr(args, option.name, None)
        if isinstance(value, list):
            value = " ".join(option.normalize(item) if option.normalize else item for item in value) or None
        if value is not None:
            given[option.name] = value
    if args.no_test:
        given["smoke_test"] = "no"
    return given


def _placeholders(items: list[str]) -> list[tuple[str, str]]:
    placeholders = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ImagebuildError(f"--set '{item}' is not NAME=VALUE", hint="for example --set TREEISH=abc123")
        placeholders.append((name, value))
    return placeholders


def _cmd_build(args: argparse.Namespace) -> int:
    from imagebuild.product import make_image
    from imagebuild.resolve import Overrides, resolve

    placeholders = _placeholders(args.set)
    config = resolve(
        Arch.parse(args.arch),
        Variant.parse(args.variant),
        Overrides(spec=args.spec, settings=_given_settings(args), allow_older_stage=args.allow_older_stage,
                  output_dir=args.output, stamp=args.stamp, placeholders=tuple(placeholders),
                  init=InitSystem(args.init) if args.init else None, stage1_spec=args.stage1_spec),
    )
    product = make_image(config, keep_workspace=args.keep_workspace)
    print(product.report.table())
    if product.smoke is None:
        return 0 if product.passed else EXIT_FAILED
    return _smoke_verdict(product.image, product.smoke)


def _smoke_verdict(image: Path, result: SmokeResult) -> int:
    if result.passed:
        logger.info("✓ smoke test passed: %s", image.name)
        return 0
    logger.error("✗ smoke test FAILED for %s: %s", image.name, result.reason)
    logger.error("  console log: %s", result.console_log)
    return EXIT_FAILED


def _image_identity(image: Path, arch: str | None, variant: str | None) -> tuple[Arch, Variant]:
    """Arch and variant from the options, else from the manifest the build wrote beside the image."""
    if not image.is_file():
        raise ImagebuildError(f"image {image} does not exist", hint="give the path of a .qcow2 image")
    manifest = Companion.manifest.of(image)
    recorded: dict[str, object] = {}
    if (not arch or not variant) and manifest.exists():
        recorded = _read_manifest(manifest)
    arch = arch or (str(recorded["arch"]) if recorded.get("arch") else None)
    variant = variant or (str(recorded["variant"]) if recorded.get("variant") else None)
    if not arch or not variant:
        raise ImagebuildError(
            f"cannot tell the architecture and variant of {image} (no {manifest.name} beside it)",
            hint="pass --arch and --variant",
        )
    return Arch.parse(arch), Variant.parse(variant)


def _read_manifest(manifest: Path) -> dict[str, object]:
    """The build manifest beside an image: a small JSON object, or one message saying what is wrong."""
    problem = ""
    try:
        if not manifest.is_file() or manifest.stat().st_size > 1 << 20:
            problem = "it is not a regular file of at most 1 MiB"
        else:
            data = json.loads(manifest.read_bytes())
            if isinstance(data, dict):
                return data
            problem = "it is not a JSON object"
    except (OSError, ValueError) as exc:
        problem = f"it cannot be read as JSON ({exc})"
    raise ImagebuildError(f"the build manifest {manifest} is unusable: {problem}",
                          hint="pass --arch and --variant, or remove the file")


def _cmd_smoke_test(args: argparse.Namespace) -> int:
    from imagebuild.smoketest import smoke_test

    arch, variant = _image_identity(args.image, args.arch, args.variant)
    result = smoke_test(args.image, arch=arch, variant=variant, results_dir=args.results or args.image.resolve().parent,
                        boot_timeout=args.boot_timeout, allow_backing_file=args.allow_backing_file)
    return _smoke_verdict(args.image, result)


def _cmd_qemu(args: argparse.Namespace) -> int:
    from imagebuild.smoketest.interactive import boot_interactively

    arch, variant = _image_identity(args.image, args.arch, args.variant)
    return boot_interactively(args.image, arch, variant, memory=args.memory, cpus=args.cpus,
                              writable=args.writable, ssh_port=args.ssh_port,
                              allow_backing_file=args.allow_backing_file)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from imagebuild.inspect import inspect_image

    arch, variant = _image_identity(args.image, args.arch, args.variant)
    report = inspect_image(args.image, arch, variant, keep_caches=args.keep_caches, work_dir=args.work_dir.resolve(),
                           allow_backing_file=args.allow_backing_file)
    print(report.table())
    if args.json:
        args.json.write_text(report.to_json())
    return 0 if report.passed else EXIT_FAILED


def _cmd_stage1(args: argparse.Namespace) -> int:
    from imagebuild.config import STANDIN_SOURCES
    from imagebuild.resolve import check_stamp, make_stamp
    from imagebuild.seed import build_seed, seed_cache_path, seed_subpath
    from imagebuild.spec import load_spec
    from imagebuild.standin import ensure_standin

    arch = Arch.parse(args.arch)
    stamp = check_stamp(args.stamp) if args.stamp else make_stamp()
    placeholders = {"TIMESTAMP": stamp, **dict(_placeholders(args.set))}
    spec = load_spec(args.spec, placeholders=placeholders, variables={"arch": arch.value, "stamp": stamp})
    cache_dir = args.cache_dir.resolve()
    output = args.output or seed_cache_path(cache_dir, seed_subpath(spec))
    stage = (ensure_standin(arch, cache_dir, STANDIN_SOURCES[args.stage])
             if args.stage in STANDIN_SOURCES
             else Path(args.stage).expanduser().resolve())
    seed = build_seed(spec, stage, output, arch=arch, work_dir=args.work_dir.resolve(), cache_dir=cache_dir,
                      repo=args.repo, binhost=args.binhost, binhost_keyring=args.binhost_keyring)
    logger.info("✓ seed %s", seed)
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from imagebuild.release import cmd_release

    return cmd_release(args)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from imagebuild.doctor import diagnose, report

    findings = diagnose()
    print(report(findings))
    return 0 if all(f.found for f in findings if f.required) else EXIT_FAILED


def _cmd_standin(args: argparse.Namespace) -> int:
    from imagebuild.standin import ensure_standin

    print(ensure_standin(Arch.parse(args.arch), args.cache_dir.resolve(), InitSystem(args.init)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    setup_logging(verbose=args.debug)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    commands = {"build": _cmd_build, "smoke-test": _cmd_smoke_test, "inspect": _cmd_inspect,
                "doctor": _cmd_doctor,
                "qemu": _cmd_qemu,
                "stage1": _cmd_stage1,
                "release": _cmd_release,
                "standin": _cmd_standin}
    try:
        if args.command in _MOUNTING_COMMANDS:
            from imagebuild.mounts import enter_private_mount_namespace

            enter_private_mount_namespace()
        return commands[args.command](args)
    except (ImagebuildError, Interrupted) as exc:
        if args.debug:
            traceback.print_exc()
        logger.error("error: %s", exc)
        return exc.exit_code
    except OSError as exc:  # a host file operation outside any step
        if args.debug:
            traceback.print_exc()
        logger.error("error: %s", step_error(args.command, exc))
        return ImagebuildError.exit_code
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        logger.error("error: internal error in imagebuild %s: %s: %s\n  hint: this is a bug; please report it "
                     "with the output of the same command run with --debug", args.command, type(exc).__name__, exc)
        return EXIT_INTERNAL
    finally:
        # After an interrupt the process is on its way out with 130: a second signal that arrives
        # now (SIGTERM 50 ms after ^C, say) must not turn that into death by signal. Python puts
        # its own handlers back to the default as the interpreter shuts down, but leaves SIG_IGN.
        interrupted = signal.getsignal(signal.SIGINT) is _while_cleaning_up
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if interrupted else handler)
