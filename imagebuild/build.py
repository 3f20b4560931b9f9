"""The build pipeline: one function that calls each step in order, top to bottom.

Each step takes the Context, does one thing, and logs itself with its duration. Resources
(workspace, loop devices, mounts, chroot binds) are context managers on one ExitStack, so
an error or a signal anywhere unwinds them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from imagebuild import __version__, standin
from imagebuild.bootloader import grub_module_dir, install_grub, move_boot_to_esp
from imagebuild.chroot import check_can_execute, check_stage_arch
from imagebuild.config import STANDIN_SOURCES, BuildConfig, Companion, InitSystem, Variant
from imagebuild.configure import (
    Kernel,
    check_init_files,
    clean_tree,
    configure_cloudinit,
    configure_console,
    detect_init,
    find_kernel,
    kernel_cmdline,
    write_system_files,
)
from imagebuild.customize import apply_stage2_keys
from imagebuild.disk import (
    DiskLayout,
    Identifiers,
    check_free_space,
    make_esp,
    make_root,
    partition_image,
    tree_size,
)
from imagebuild.errors import ConfigError, ImageError, StageError
from imagebuild.log import STEP_TIMINGS, complete_step, logger
from imagebuild.mirror import fetch_stage
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
from imagebuild.run import require_tools, run
from imagebuild.tree import Tree
from imagebuild.unpack import unpack_stage
from imagebuild.workspace import Workspace, output_lock

BUILD_TOOLS = ("qemu-img", "mkfs.xfs", "mkfs.vfat", "mcopy", "sgdisk", "losetup", "mount", "umount",
               "chroot", "cp")


@dataclasses.dataclass
class Context:
    config: BuildConfig
    workspace: Path
    stack: contextlib.ExitStack
    stage_tarball: Path | None = None
    init: InitSystem | None = None
    kernel: Kernel | None = None
    disk: DiskLayout | None = None
    ids: Identifiers | None = None
    outputs: dict[Path, Path] = dataclasses.field(default_factory=dict)  # final path -> temporary path
    shared: SharedStage | None = None  # an unpacked stage several builds of one arch share

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


def acquire_stage(ctx: Context) -> None:
    source = ctx.config.stage
    if source in STANDIN_SOURCES:
        ctx.stage_tarball = standin.ensure_standin(ctx.config.arch, ctx.config.cache_dir, STANDIN_SOURCES[source])
    elif source == "mirror":
        assert ctx.config.flavour is not None
        # fetch_stage logs its own step ("Fetching the latest stage3-... from ...").
        ctx.stage_tarball = fetch_stage(ctx.config.mirror, ctx.config.arch, ctx.config.flavour,
                                        ctx.config.cache_dir, keyring=ctx.config.keyring,
                                        trusted_keys=ctx.config.trusted_keys,
                                        allow_older=ctx.config.allow_older_stage,
                                        progress=sys.stderr.isatty())
    else:
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise StageError(
                f"stage tarball {path} does not exist",
                hint="give the path of a stage tarball, or --stage standin for the offline stand-in",
            )
        ctx.stage_tarball = path


def unpack(ctx: Context) -> None:
    if ctx.shared is not None:
        ctx.stage_tarball = ctx.shared.tarball
        with complete_step(f"Copying the shared unpacked {ctx.shared.tarball.name}"):
            # cp -a keeps owners, modes, xattrs and hardlinks; reflinks make it nearly free on XFS.
            ctx.root.mkdir()
            run(["cp", "-a", "--reflink=auto", f"{ctx.shared.tree}/.", ctx.root])
        return
    assert ctx.stage_tarball is not None
    with complete_step(f"Unpacking {ctx.stage_tarball.name}"):
        count = unpack_stage(ctx.stage_tarball, ctx.root)
        logger.info("  %d entries", count)


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
        acquire_stage(ctx)
        unpack(ctx)
        assert ctx.stage_tarball is not None
        yield SharedStage(tarball=ctx.stage_tarball, tree=ctx.root)


def inspect_stage(ctx: Context) -> None:
    """What the image needs from the stage: a kernel, GRUB modules, a runnable userland."""
    tree = ctx.tree
    check_stage_arch(tree, ctx.config.arch)
    ctx.kernel = find_kernel(tree)
    grub_module_dir(tree, ctx.config.arch)
    check_can_execute(ctx.config.arch)
    ctx.init = detect_init(tree)
    expected = ctx.config.init
    if expected is not None and ctx.init != expected:
        raise StageError(
            f"the stage runs {ctx.init.value}, but {ctx.config.init_source} asks for {expected.value}",
            hint=f"use a {expected.value} stage, or a spec for {ctx.init.value} "
            f"(the shipped ones: specs/ARCH/VARIANT.spec for systemd, VARIANT-openrc.spec for OpenRC)",
        )
    check_init_files(tree, ctx.init, ctx.config.variant)
    stand_in = tree.lexists("/etc/imagebuild-standin")
    logger.info("  kernel %s%s, init %s%s", ctx.kernel.version,
                f" with {ctx.kernel.initrd}" if ctx.kernel.initrd else " (no initramfs)",
                ctx.init.value, " — STAND-IN stage (Debian), not Gentoo" if stand_in else "")


def configure(ctx: Context) -> None:
    config = ctx.config
    assert ctx.init is not None
    with complete_step(f"Configuring the {config.variant.value} variant"):
        write_system_files(ctx.tree, config.arch, config.variant, config.layout)
        if config.variant == Variant.console:
            configure_console(ctx.tree, config.arch, ctx.init)
        else:
            configure_cloudinit(ctx.tree, config.arch, ctx.init, config.image_name)
        if config.spec is not None:
            # Catalyst's diskimage-stage2 keys, after the variant (as diskimagefs-update.sh runs first).
            apply_stage2_keys(ctx.tree, config.spec, config.arch, ctx.init)


def install_bootloader(ctx: Context) -> None:
    assert ctx.kernel is not None and ctx.ids is not None
    with complete_step(f"Installing GRUB ({ctx.config.arch.efi_binary})"):
        move_boot_to_esp(ctx.tree, ctx.esp)
        install_grub(ctx.tree, ctx.esp, ctx.config.arch, ctx.kernel, esp_uuid=ctx.ids.esp_uuid,
                     image_name=ctx.config.image_name, root_label=ctx.config.layout.root_label,
                     root_fstype=ctx.config.layout.root_fstype,
                     cmdline=kernel_cmdline(ctx.config.arch, ctx.config.variant))


def clean(ctx: Context) -> None:
    with complete_step("Cleaning the tree (machine-id, host keys, histories, scratch)"):
        clean_tree(ctx.tree)


def make_disk(ctx: Context) -> None:
    config, ids = ctx.config, ctx.ids
    assert ids is not None
    root_bytes = tree_size(ctx.root)  # walked once: the free-space check and make_root use it
    check_free_space(ctx.workspace, root_bytes + tree_size(ctx.esp))
    sectors = f"GPT, {config.layout.sector_size}-byte sectors"
    with complete_step(f"Partitioning a {config.layout.size // 2**30} GiB sparse image ({sectors})"):
        ctx.disk = partition_image(ctx.raw, config.layout, config.arch, ids)
    with complete_step("Making and filling the EFI system partition (FAT32, mtools)"):
        make_esp(ctx.raw, ctx.disk.esp, config.layout, ids, ctx.esp)
    with complete_step("Making and filling the XFS root"):
        make_root(ctx.raw, ctx.disk.root, config.layout, ids, ctx.root, ctx.workspace / "mnt", root_bytes)


def write_outputs(ctx: Context) -> None:
    config = ctx.config
    image = config.image_path
    names = {
        "image": image,
        "contents": Companion.contents.of(image),
        "digests": Companion.digests.of(image),
        "manifest": Companion.manifest.of(image),
    }
    for final in names.values():
        ctx.outputs[final] = temporary_name(final)
        note_resource("outputs", ctx.outputs[final])  # a killed run's partials go with its workspace
        ctx.stack.callback(ctx.outputs[final].unlink, missing_ok=True)
    with complete_step(f"Converting to qcow2 ({config.compression.value})"):
        convert_to_qcow2(ctx.raw, ctx.outputs[names["image"]], config.compression)
    with complete_step("Writing CONTENTS.gz, DIGESTS and the build manifest"):
        write_contents(contents_lines(ctx.root, ctx.esp), ctx.outputs[names["contents"]])
        digests = {
            image.name: file_digests(ctx.outputs[names["image"]]),
            names["contents"].name: file_digests(ctx.outputs[names["contents"]]),
        }
        ctx.outputs[names["digests"]].write_text(digests_text(digests))
        write_json(_manifest(ctx, digests), ctx.outputs[names["manifest"]])
    # The image last: whoever sees it under its final name also finds its companions.
    for final in sorted(ctx.outputs, key=lambda p: p == image):
        ctx.outputs[final].rename(final)
    logger.info("✓ %s (%.0f MiB)", image, image.stat().st_size / 2**20)


def _manifest(ctx: Context, digests: dict[str, dict[str, str]]) -> dict[str, object]:
    config = ctx.config
    assert ctx.kernel is not None and ctx.ids is not None and ctx.stage_tarball is not None
    return {
        "imagebuild": __version__,
        "image": config.image_name,
        "arch": config.arch.value,
        "variant": config.variant.value,
        "stamp": config.stamp,
        "spec": str(config.spec_path) if config.spec_path else None,
        "stage": {
            "source": config.stage if config.stage in ("mirror", *STANDIN_SOURCES) else "local",
            "file": ctx.stage_tarball.name,
            "size": ctx.stage_tarball.stat().st_size,
            "stand_in": config.stage in STANDIN_SOURCES,
        },
        "init": ctx.init.value if ctx.init else None,
        "kernel": dataclasses.asdict(ctx.kernel),
        "layout": dataclasses.asdict(config.layout),
        "identifiers": dataclasses.asdict(ctx.ids),
        "compression": config.compression.value,
        "digests": digests,
        "tools": tool_versions(),
        "step_seconds": dict(STEP_TIMINGS),
    }


def build_image(config: BuildConfig, *, keep_workspace: bool = False, shared: SharedStage | None = None) -> Path:
    """Build ``config.image_path`` from its stage (or a ``shared`` unpacked one); return its path."""
    check_prerequisites(config)
    STEP_TIMINGS.clear()  # this build's steps only, also when one process builds several
    with contextlib.ExitStack() as stack:
        lock = stack.enter_context(output_lock(config.image_path))
        workspace = stack.enter_context(Workspace(config.work_dir, f"build-{config.arch.value}-"
                                                  f"{config.variant.file_part}", keep=keep_workspace))
        note_resource("outputs", lock)
        ctx = Context(config=config, workspace=workspace, stack=stack,
                      ids=Identifiers.make(config.image_name), shared=shared)
        if shared is None:
            acquire_stage(ctx)
        unpack(ctx)
        inspect_stage(ctx)
        configure(ctx)
        install_bootloader(ctx)
        clean(ctx)
        make_disk(ctx)
        write_outputs(ctx)
    if not config.image_path.exists():
        raise ImageError(f"the build ended without {config.image_path}")
    return config.image_path
