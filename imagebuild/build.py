"""The build pipeline: one function that calls each step in order, top to bottom.

Each step takes the Context, does one thing, and logs itself with its duration. Resources
(workspace, loop devices, mounts, chroot binds) are context managers on one ExitStack, so
an error or a signal anywhere unwinds them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from imagebuild import __version__, emerge, standin
from imagebuild.bootloader import grub_module_dir, install_grub, move_boot_to_esp
from imagebuild.chroot import check_can_execute, check_stage_arch
from imagebuild.config import BuildConfig, Companion, InitSystem, MiB, MirrorStage, StandinStage, TarballStage, Variant
from imagebuild.disk import (
    DiskLayout,
    Identifiers,
    check_fits,
    check_free_space,
    make_esp,
    make_root,
    partition_image,
    root_filesystem,
    root_full,
    tree_size,
)
from imagebuild.errors import CommandError, ConfigError, ImageError, StageError
from imagebuild.hygiene import clean_tree
from imagebuild.log import STEP_TIMINGS, complete_step, logger
from imagebuild.mirror import fetch_stage, snapshot_id, snapshot_signature
from imagebuild.mounts import note_resource
from imagebuild.output import (
    contents_lines,
    convert_to_qcow2,
    digests_text,
    file_digests,
    temporary_name,
    tool_versions,
    write_contents,
    write_json,
)
from imagebuild.run import BUILD_TOOLS, require_tools, run
from imagebuild.stage1 import pack_seed
from imagebuild.stage2 import apply_stage2_keys
from imagebuild.stagefacts import Kernel, check_init_files, detect_init, find_kernel
from imagebuild.tree import Tree
from imagebuild.unpack import unpack_stage, unpacked_size
from imagebuild.variant import configure_cloudinit, configure_console, kernel_cmdline, write_system_files
from imagebuild.workspace import Workspace, output_lock


@dataclasses.dataclass
class Context:
    """The build's inputs and where it works; what the steps find, they return."""

    config: BuildConfig
    workspace: Path
    stack: contextlib.ExitStack
    outputs: dict[Path, Path] = dataclasses.field(default_factory=dict)  # final path -> temporary path

    @property
    def root(self) -> Path:
        return self.workspace / "root"

    @property
    def tree(self) -> Tree:
        """The unpacked stage, touched only as the image sees it (imagebuild.tree)."""
        return Tree(self.root)

    @property
    def esp(self) -> Path:
        return self.workspace / "esp"

    @property
    def raw(self) -> Path:
        return self.workspace / "disk.raw"

    @property
    def emerge_log(self) -> Path:
        return self.workspace / "emerge.log"


def check_prerequisites(config: BuildConfig) -> None:
    """Everything that can be known before work starts: tools, output directory, clashes."""
    require_tools(*BUILD_TOOLS)
    try:
        config.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the output directory {config.output_dir}: {exc.strerror}",
            hint="choose a writable directory with --output",
        ) from exc
    if not os.access(config.output_dir, os.W_OK):
        raise ConfigError(f"the output directory {config.output_dir} is not writable",
                          hint="choose a writable directory with --output")
    if config.image_path.exists():
        raise ConfigError(f"{config.image_path} already exists",
                          hint="remove it, choose another --output, or give another --stamp")


def acquire_stage(config: BuildConfig) -> Path:
    """The stage tarball: the stand-in, a verified download from the mirror, or a local file."""
    source = config.stage
    if isinstance(source, StandinStage):
        return standin.ensure_standin(config.arch, config.cache_dir, source.init)
    if isinstance(source, MirrorStage):
        # fetch_stage logs its own step ("Fetching the latest stage3-... from ...").
        return fetch_stage(source.url, config.arch, source.flavour, config.cache_dir, keyring=source.keyring,
                           trusted_keys=source.trusted_keys, allow_older=source.allow_older,
                           progress=sys.stderr.isatty())
    path = source.path
    if not path.is_file():
        raise StageError(
            f"stage tarball {path} does not exist",
            hint="give the path of a stage tarball, or --stage standin for the offline stand-in",
        )
    return path


def unpack(ctx: Context, tarball: Path, expected: int) -> None:
    # The room: what the root filesystem holds (less the first boot's 5%), and what the work
    # directory holds for the sparse raw image that backs it (less room for the ESP's files).
    ctx.root.mkdir(exist_ok=True)  # the mounted XFS root, or (a release's shared stage) a directory
    work_room = shutil.disk_usage(ctx.workspace).free - 128 * MiB
    root_room = int(shutil.disk_usage(ctx.root).free * 0.95)
    with complete_step(f"Unpacking {tarball.name}"), _root_space(ctx, root_room <= work_room):
        count = unpack_stage(tarball, ctx.root, room=min(work_room, root_room), expected=expected)
        logger.info("  %d entries", count)


def copy_shared(ctx: Context, shared: SharedStage) -> None:
    with complete_step(f"Copying the shared unpacked {shared.tarball.name}"), _root_space(ctx, None):
        # cp -a keeps owners, modes, xattrs and hardlinks; "tree/." gives / the tree's mode.
        try:
            run(["cp", "-a", f"{shared.tree}/.", ctx.root])
        except CommandError as exc:
            if "No space left" in exc.message:
                raise ImageError("no space left while copying the shared stage") from exc
            raise


@contextlib.contextmanager
def _root_space(ctx: Context, root_limited: bool | None) -> Iterator[None]:
    """Running out of room while writing the root tree: the image's root filesystem, or the
    work directory that holds the sparse raw image. Which one, the message says
    (``root_limited``: the root filesystem was the smaller room; None: look at it)."""
    try:
        yield
    except (StageError, ImageError) as exc:
        if "no space left" not in exc.message:
            raise
        if root_limited or (root_limited is None and root_full(ctx.root)):
            raise ImageError(f"the root filesystem of {ctx.config.image_name} filled up while writing the tree",
                             hint="make the image larger (diskimage/qcow2_size or --size); the image is "
                             "sparse, so size costs little disk") from exc
        raise ImageError(f"no space left in {ctx.config.work_dir} for the raw image while writing the tree",
                         hint="free space there or point --work-dir at a larger filesystem") from exc


@dataclasses.dataclass(frozen=True)
class SharedStage:
    tarball: Path
    tree: Path


@contextlib.contextmanager
def shared_stage(config: BuildConfig) -> Iterator[SharedStage]:
    """Fetch and unpack ``config``'s stage once, for every build of that arch to copy from.

    The release job builds console and cloud-init from one stage; unpacking it once saves
    a decompression and a tar walk per extra variant.
    """
    with contextlib.ExitStack() as stack:
        workspace = stack.enter_context(Workspace(config.work_dir, f"stage-{config.arch.value}"))
        ctx = Context(config=config, workspace=workspace, stack=stack)
        tarball = acquire_stage(config)
        unpack(ctx, tarball, unpacked_size(tarball))
        yield SharedStage(tarball=tarball, tree=ctx.root)


@dataclasses.dataclass(frozen=True)
class StageFacts:
    """What the unpacked stage turned out to hold."""

    tarball: Path
    kernel: Kernel
    init: InitSystem
    stand_in: bool


def inspect_stage(ctx: Context, tarball: Path) -> StageFacts:
    """What the image needs from the stage: a kernel, GRUB modules, a runnable userland, the
    init the spec expects and what the variant needs of it — all before anything is written."""
    tree = ctx.tree
    check_stage_arch(tree, ctx.config.arch)
    kernel = find_kernel(tree)
    grub_module_dir(tree, ctx.config.arch)
    check_can_execute(ctx.config.arch)
    init = detect_init(tree)
    expected = ctx.config.init
    if expected is not None and init != expected:
        raise StageError(
            f"the stage runs {init.value}, but {ctx.config.init_source} asks for {expected.value}",
            hint=f"use a {expected.value} stage, or a spec for {init.value} "
            f"(the shipped ones: specs/ARCH/VARIANT.spec for systemd, VARIANT-openrc.spec for OpenRC)",
        )
    check_init_files(tree, init, ctx.config.variant)
    stand_in = tree.lexists("/etc/imagebuild-standin")
    logger.info("  kernel %s%s, init %s%s", kernel.version,
                f" with {kernel.initrd}" if kernel.initrd else " (no initramfs)",
                init.value, " — STAND-IN stage (Debian), not Gentoo" if stand_in else "")
    return StageFacts(tarball=tarball, kernel=kernel, init=init, stand_in=stand_in)


def configure(ctx: Context, init: InitSystem) -> None:
    config = ctx.config
    with complete_step(f"Configuring the {config.variant.value} variant"):
        write_system_files(ctx.tree, config.arch, config.variant, config.layout)
        if config.variant == Variant.console:
            configure_console(ctx.tree, config.arch, init)
        else:
            configure_cloudinit(ctx.tree, config.arch, init, config.image_name)
        # Catalyst's diskimage-stage2 keys, after the variant (as diskimagefs-update.sh runs first).
        apply_stage2_keys(ctx.tree, config.stage2, config.arch, init)


def install_bootloader(ctx: Context, kernel: Kernel, ids: Identifiers) -> None:
    with complete_step(f"Installing GRUB ({ctx.config.arch.efi_binary})"):
        move_boot_to_esp(ctx.tree, ctx.esp)
        install_grub(ctx.tree, ctx.esp, ctx.config.arch, kernel, esp_uuid=ids.esp_uuid,
                     image_name=ctx.config.image_name, root_label=ctx.config.layout.root_label,
                     root_fstype=ctx.config.layout.root_fstype,
                     cmdline=kernel_cmdline(ctx.config.arch, ctx.config.variant))


def clean(ctx: Context) -> None:
    with complete_step("Cleaning the tree (machine-id, host keys, histories, scratch)"):
        clean_tree(ctx.tree)


def make_disk(ctx: Context, ids: Identifiers, tree_bytes: int) -> DiskLayout:
    """The partitioned sparse image, checked against the tree it must hold before a byte of
    the tree is written (``tree_bytes``: the stage's unpacked size, as far as it is known)."""
    config = ctx.config
    check_free_space(ctx.workspace, tree_bytes)
    sectors = f"GPT, {config.layout.sector_size}-byte sectors"
    with complete_step(f"Partitioning a {config.layout.size // 2**30} GiB sparse image ({sectors}), "
                       "making its XFS root"):
        disk = partition_image(ctx.raw, config.layout, config.arch, ids)
        # XFS metadata and log take a few percent; keep 5% + 64 MiB free for the first boot.
        check_fits("root filesystem", int(tree_bytes * 1.05) + 64 * MiB, disk.root.size,
                   "diskimage/qcow2_size or --size")
        make_root(ctx.raw, disk.root, config.layout, ids)
    return disk


def fill_esp(ctx: Context, disk: DiskLayout, ids: Identifiers) -> None:
    with complete_step("Making and filling the EFI system partition (FAT32, mtools)"):
        make_esp(ctx.raw, disk.esp, ctx.config.layout, ids, ctx.esp)


def write_outputs(ctx: Context, stage: StageFacts, ids: Identifiers, contents: list[str]) -> None:
    config = ctx.config
    image = config.image_path
    names = {
        "image": image,
        "contents": Companion.contents.of(image),
        "digests": Companion.digests.of(image),
        "manifest": Companion.manifest.of(image),
    }
    if ctx.emerge_log.exists():
        names["emerge_log"] = Companion.emerge_log.of(image)
    for final in names.values():
        ctx.outputs[final] = temporary_name(final)
        note_resource("outputs", ctx.outputs[final])  # a killed run's partials go with its workspace
        ctx.stack.callback(ctx.outputs[final].unlink, missing_ok=True)
    with complete_step(f"Converting to qcow2 ({config.compression.value})"):
        convert_to_qcow2(ctx.raw, ctx.outputs[names["image"]], config.compression)
    with complete_step("Writing CONTENTS.gz, DIGESTS and the build manifest"):
        if "emerge_log" in names:
            shutil.copyfile(ctx.emerge_log, ctx.outputs[names["emerge_log"]])
        write_contents(contents, ctx.outputs[names["contents"]])
        digests = {
            image.name: file_digests(ctx.outputs[names["image"]]),
            names["contents"].name: file_digests(ctx.outputs[names["contents"]]),
        }
        ctx.outputs[names["digests"]].write_text(digests_text(digests))
        write_json(_manifest(ctx.config, stage, ids, digests), ctx.outputs[names["manifest"]])
    # The image last: whoever sees it under its final name also finds its companions.
    for final in sorted(ctx.outputs, key=lambda p: p == image):
        ctx.outputs[final].rename(final)
    logger.info("✓ %s (%.0f MiB)", image, image.stat().st_size / 2**20)


def _manifest(config: BuildConfig, stage: StageFacts, ids: Identifiers,
              digests: dict[str, dict[str, str]]) -> dict[str, object]:
    return {
        "imagebuild": __version__,
        "image": config.image_name,
        "arch": config.arch.value,
        "variant": config.variant.value,
        "stamp": config.stamp,
        "spec": str(config.spec_path) if config.spec_path else None,
        "stage": {
            "source": {StandinStage: "standin", MirrorStage: "mirror", TarballStage: "local"}[type(config.stage)],
            "file": stage.tarball.name,
            "size": stage.tarball.stat().st_size,
            "stand_in": stage.stand_in,
        },
        "init": stage.init.value,
        "kernel": dataclasses.asdict(stage.kernel),
        "layout": dataclasses.asdict(config.layout),
        "identifiers": dataclasses.asdict(ids),
        "compression": config.compression.value,
        "digests": digests,
        "tools": tool_versions(),
        "step_seconds": dict(STEP_TIMINGS),
    }


@dataclasses.dataclass
class PortageSteps:
    """The package and kernel steps of one build (imagebuild.emerge): their cache entry, and
    whether a cached result stands in for the stage.

    A result is cached as ``<cache>/portage/<arch>-<key>-<repository>.tar.zst``: ``key`` hashes
    every input but the repository, whose identity is --repo's digest, ``stage`` (the stage
    carries it, and the stage's digest is in the key) or the mirror snapshot's id. Each entry is
    a whole tree (hundreds of MB), and a weekly stage3 makes new keys, so only the ``KEEP`` most
    recently used entries of each arch stay: a release's console and cloud-init keys, twice."""

    KEEP = 4

    config: BuildConfig
    key: str | None
    cached: Path | None

    @classmethod
    def plan(cls, config: BuildConfig, tarball: Path) -> PortageSteps:
        keys = config.portage
        if not keys.packages and not keys.kernels:
            return cls(config, None, None)
        key = emerge.steps_key(keys, config.arch, _stage_digest(tarball, config.cache_dir))
        return cls(config, key, cls._lookup(config, key))

    @classmethod
    def _lookup(cls, config: BuildConfig, key: str) -> Path | None:
        keys = config.portage
        if keys.repo is not None:
            idents = [f"repo-{emerge.repo_digest(keys.repo)[:16]}"]
        else:
            idents = ["stage"]
            if keys.snapshot is not None and list(cls._path(config, key, "snapshot-*").parent.glob(
                    cls._path(config, key, "snapshot-*").name)):
                # A result made from the mirror's snapshot counts only while it is the latest one.
                try:
                    idents.append("snapshot-" + snapshot_id(snapshot_signature(keys.snapshot.url)))
                except StageError as exc:
                    logger.warning("cannot tell whether the mirror's snapshot changed (%s): emerging again",
                                   exc.message)
        found = next((p for i in idents if (p := cls._path(config, key, i)).is_file()), None)
        if found is not None:
            with contextlib.suppress(OSError):
                os.utime(found)  # used: the last to go when the cache is pruned
        return found

    @staticmethod
    def _path(config: BuildConfig, key: str, ident: str) -> Path:
        return config.cache_dir / "portage" / f"{config.arch.value}-{key}-{ident}.tar.zst"

    def copy_log(self, dest: Path) -> None:
        assert self.cached is not None
        log = _emerge_log_of(self.cached)
        if log.is_file():
            shutil.copyfile(log, dest)

    def run(self, ctx: Context) -> None:
        """The steps in the unpacked tree when it needs them; their result cached after."""
        keys = self.config.portage
        if not keys.packages and not keys.kernels:
            # No spec key asks for anything: a stage without a kernel fails in inspect_stage.
            return
        needed, kernel = emerge.needs_steps(ctx.tree, keys)
        if not needed:
            assert kernel is not None
            logger.info("  the stage has a kernel (%s): no kernel step; the spec names no packages", kernel.version)
            return
        ident = emerge.run_steps(ctx.tree, keys, self.config.arch, ctx.workspace, ctx.emerge_log,
                                 install_kernel=kernel is None, cache_dir=self.config.cache_dir)
        assert self.key is not None
        path = self._path(self.config, self.key, ident)
        with complete_step(f"Caching the tree after the package and kernel steps ({path.name})"):
            path.parent.mkdir(parents=True, exist_ok=True)
            pack_seed(ctx.root, path)
            shutil.copyfile(ctx.emerge_log, _emerge_log_of(path))
        self.prune()

    def prune(self) -> None:
        for old in prune_steps_cache(self.config.cache_dir, self.config.arch.value, self.KEEP):
            logger.info("  removed the cached steps %s (the cache keeps the %d most recently used of %s)",
                        old.name, self.KEEP, self.config.arch.value)


def prune_steps_cache(cache_dir: Path, arch: str, keep: int) -> list[Path]:
    """Remove all but the ``keep`` most recently used package-step results of ``arch`` (and their
    emerge logs) from ``<cache_dir>/portage``; return what was removed."""
    entries = sorted((cache_dir / "portage").glob(f"{arch}-*.tar.zst"), key=_mtime, reverse=True)
    for old in entries[keep:]:
        old.unlink(missing_ok=True)
        _emerge_log_of(old).unlink(missing_ok=True)
    return entries[keep:]


def _emerge_log_of(entry: Path) -> Path:
    """The emerge log kept beside a cached result of the steps."""
    return entry.with_name(entry.name.removesuffix(".tar.zst") + ".emerge.log")


def _stage_digest(tarball: Path, cache_dir: Path) -> str:
    """The stage's SHA-256, remembered by its path, size and time (hashing a stage takes seconds)."""
    memo = cache_dir / "portage" / "stage-digests.json"
    st = tarball.stat()
    name = f"{tarball.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    known: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(memo.read_text())
    if name not in known:
        # Stages that changed or went away are forgotten; this one is remembered.
        known = {k: v for k, v in known.items() if _still(k)}
        known[name] = emerge.stage_digest(tarball)
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            partial = temporary_name(memo)
            partial.write_text(json.dumps(known, indent=1, sort_keys=True))
            partial.rename(memo)
    return known[name]


def _still(name: str) -> bool:
    """Whether the stage a digest memo entry names (``path:size:mtime_ns``) is still as it was."""
    path, size, mtime = name.rsplit(":", 2)
    try:
        st = os.stat(path)
    except OSError:
        return False
    return f"{st.st_size}:{st.st_mtime_ns}" == f"{size}:{mtime}"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def build_image(config: BuildConfig, *, keep_workspace: bool = False, shared: SharedStage | None = None,
                audit: Callable[[Path, Path], object] | None = None) -> Path:
    """Build ``config.image_path`` from its stage (or a ``shared`` unpacked one); return its path.
    ``audit`` is called with the finished image and the raw image it was converted from, while
    that still exists (imagebuild.product audits the raw image, proven equal to the qcow2)."""
    check_prerequisites(config)
    STEP_TIMINGS.clear()  # this build's steps only, also when one process builds several
    with contextlib.ExitStack() as stack:
        lock = stack.enter_context(output_lock(config.image_path))
        workspace = stack.enter_context(Workspace(config.work_dir, f"build-{config.arch.value}-"
                                                  f"{config.variant.file_part}", keep=keep_workspace))
        note_resource("outputs", lock)
        ctx = Context(config=config, workspace=workspace, stack=stack)
        ids = Identifiers.make(config.image_name)
        tarball = acquire_stage(config) if shared is None else shared.tarball
        steps = PortageSteps.plan(config, tarball)
        if steps.cached is not None:
            tree_bytes = unpacked_size(steps.cached)
        else:
            tree_bytes = unpacked_size(tarball) if shared is None else tree_size(shared.tree)
        disk = make_disk(ctx, ids, tree_bytes)
        # The stage goes straight into the image's XFS root: written once, never copied.
        with root_filesystem(ctx.raw, disk.root, config.layout, ctx.root):
            if steps.cached is not None:
                logger.info("  the package and kernel steps' result for these inputs is cached (%s): "
                            "no emerge runs", steps.cached.name)
                unpack(ctx, steps.cached, tree_bytes)
                steps.copy_log(ctx.emerge_log)
            elif shared is None:
                unpack(ctx, tarball, tree_bytes)
            else:
                copy_shared(ctx, shared)
            if steps.cached is None:
                steps.run(ctx)
            stage = inspect_stage(ctx, tarball)
            configure(ctx, stage.init)
            install_bootloader(ctx, stage.kernel, ids)
            clean(ctx)
            contents = contents_lines(ctx.root, ctx.esp)
        fill_esp(ctx, disk, ids)
        write_outputs(ctx, stage, ids, contents)
        if audit is not None:
            audit(config.image_path, ctx.raw)
    if not config.image_path.exists():
        raise ImageError(f"the build ended without {config.image_path}")
    return config.image_path
