"""The stand-in stages: Debian root filesystems that take a Gentoo stage's place offline.

No machine here can reach Gentoo's mirrors, so tests and the offline quick start use root
filesystems made by mmdebstrap from Debian that carry what a Gentoo diskimage-stage1 seed
carries: an init (systemd, or sysvinit with OpenRC), a kernel with its initramfs in /boot,
GRUB's EFI modules, xfsprogs, cloud-init and openssh. They are test and demo aids, not Gentoo,
and say so in their own /etc/imagebuild-standin. The pipeline treats them as any other stage.

Stand-ins are built in layers, each cached by the hash of its recipe and its parent's: a
*base* per architecture holds everything the inits share (the kernel and its initramfs made
once, which under qemu-user is the slow part), and each init is a small layer on top of it,
installed by mmdebstrap onto the unpacked base (its documented way to refine a chroot).
Foreign architectures run through qemu-user via binfmt_misc, so everything that runs there is
kept small: no documentation, man pages or translations; an initramfs with only the modules a
virtual machine's disk needs (``MODULES=list``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

from imagebuild.config import Arch, InitSystem
from imagebuild.errors import StageError
from imagebuild.log import complete_step, logger
from imagebuild.run import require_tools, run

# Bump when a recipe's meaning changes in a way the fields below do not capture.
RECIPE_VERSION = 2

NOTICE = (
    "This is an imagebuild STAND-IN stage: a Debian root filesystem built with mmdebstrap so\n"
    "images can be built and boot-tested without access to Gentoo's mirrors. It is not Gentoo.\n"
)

# Debian has riscv64 from trixie on; bookworm for the others (what these machines run).
SUITE = {Arch.amd64: "bookworm", Arch.arm64: "bookworm"}

# Shared by every init: cloud-init for the cloud-init variant, openssh, xfsprogs for the root.
_BASE_PACKAGES = (
    "udev", "dbus", "login", "passwd", "kmod", "procps", "iproute2", "initramfs-tools", "xfsprogs",
    "dosfstools", "cloud-init", "cloud-guest-utils", "openssh-server", "sudo",
)
_ARCH_PACKAGES = {
    Arch.amd64: ("linux-image-amd64", "grub-efi-amd64-bin"),
    Arch.arm64: ("linux-image-arm64", "grub-efi-arm64-bin"),
}
_INIT_PACKAGES = {
    InitSystem.systemd: ("systemd-sysv",),
    # Gentoo's OpenRC stage3: sysvinit's /sbin/init, OpenRC, dhcpcd (installed, not enabled).
    InitSystem.openrc: ("sysvinit-core", "openrc", "dhcpcd-base"),
}
# Files an init layer puts on top of its packages (a tree under standin_files/<init>/).
FILES_DIR = Path(__file__).parent / "standin_files"
# Debian's OpenRC adopts the System V scripts of the packages into runlevels; Gentoo's packages
# add none. The Gentoo-named services of standin_files/openrc replace Debian's (openssh-server's
# "ssh", which also provides "sshd", gives way to Gentoo's "sshd"; cloud-init's four get
# Gentoo's scripts), in no runlevel. OpenRC's "loopback" goes into boot, as on Gentoo.
#
# Debian's System V scripts are many and slow under emulation (a TCG boot spent a minute in
# them and half a minute shutting down), so the stand-in keeps only what a boot of these images
# needs: the kernel filesystems, udev, the root remounted rw, fstab mounted, the hostname, and
# the shutdown. The others go (hardware clock, NFS, sysctl, module lists, the old boot-log and
# nologin scripts, savecache): fewer scripts also make OpenRC's "Caching service dependencies"
# at every boot shorter (17 s before, 11 s after, under TCG).
_DEBIAN_SCRIPTS_DROPPED = ("brightness", "mount-configfs", "mountnfs.sh", "mountnfs-bootclean.sh", "bootlogs",
                           "rmnologin", "rc.local", "hwclock.sh", "urandom", "kmod", "procps", "savecache", "sudo")
_OPENRC_HOOKS = ('rm -f "$1"/etc/runlevels/*/ssh "$1"/etc/runlevels/*/cloud-* "$1"/etc/init.d/ssh',
                 'ln -sf /etc/init.d/loopback "$1"/etc/runlevels/boot/loopback',
                 f'for s in {" ".join(_DEBIAN_SCRIPTS_DROPPED)}; do rm -f "$1/etc/init.d/$s" "$1"/etc/runlevels/*/"$s"; done')

# What the initramfs loads to find the root: the disks QEMU and clouds offer (virtio; the PIIX
# IDE disk of Gentoo's FAQ command line, which has no -machine and so gets QEMU's default pc
# machine; AHCI on q35; SCSI; NVMe), and XFS. Built-in modules are skipped.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "ata_piix", "ahci", "sd_mod", "nvme", "xfs",
                     "crc32c_generic")
_INITRAMFS_HOOK = """#!/bin/sh
# imagebuild stand-in: the modules a virtual machine needs for its root disk (MODULES=list).
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
# Only what this kernel has as a module (ata_piix is for x86 only; some are built in).
for module in {modules}; do
    modinfo -k "$version" "$module" >/dev/null 2>&1 && force_load "$module"
done
exit 0
"""
# mmdebstrap writes these into /etc/dpkg/dpkg.cfg.d: nothing to unpack that nobody reads.
_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "force-unsafe-io",
)
HOSTNAME_HOOK = 'echo localhost > "$1/etc/hostname"'


@dataclasses.dataclass(frozen=True)
class Layer:
    """One cached mmdebstrap result: packages (and hooks) on top of ``parent``, or from nothing."""

    name: str
    arch: Arch
    packages: tuple[str, ...]
    parent: Layer | None = None
    essential_hooks: tuple[str, ...] = ()
    customize_hooks: tuple[str, ...] = ()
    files: Path | None = None  # a directory whose tree is copied onto the layer's /

    @property
    def suite(self) -> str:
        return SUITE[self.arch]

    def recipe(self) -> dict[str, object]:
        """Everything that decides the layer's content; its hash names the cached tarball."""
        return {
            "recipe_version": RECIPE_VERSION,
            "tool": "mmdebstrap",
            "suite": self.suite,
            "arch": self.arch.debian,
            "layer": self.name,
            "packages": sorted(self.packages),
            "dpkg_options": list(_DPKG_OPTIONS),
            "essential_hooks": list(self.essential_hooks),
            "customize_hooks": list(self.customize_hooks),
            "notice": NOTICE,
            "files": _tree_digest(self.files) if self.files else None,
            "parent": self.parent.hash() if self.parent else None,
        }

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.recipe(), sort_keys=True).encode()).hexdigest()[:16]

    def path(self, cache_dir: Path) -> Path:
        return cache_dir / "standin" / f"standin-debian-{self.suite}-{self.arch.value}-{self.name}-{self.hash()}.tar"


def _tree_digest(top: Path) -> dict[str, str]:
    """Each file of ``top`` (relative name -> mode and sha256), so a changed file is a new recipe."""
    return {
        str(p.relative_to(top)): f"{p.stat().st_mode & 0o7777:o}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
        for p in sorted(top.rglob("*")) if p.is_file()
    }


def base_layer(arch: Arch) -> Layer:
    hook = _INITRAMFS_HOOK.format(modules=" ".join(INITRAMFS_MODULES))
    assert "'" not in hook  # it is written with printf '%s' '...' 
    return Layer(
        name="base",
        arch=arch,
        packages=_BASE_PACKAGES + _ARCH_PACKAGES[arch],
        # Before the kernel's package runs update-initramfs: the initramfs is made once.
        essential_hooks=(
            'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"',
            'echo MODULES=list > "$1/etc/initramfs-tools/conf.d/imagebuild-standin"',
            f"printf '%s' '{hook}' > \"$1/etc/initramfs-tools/hooks/imagebuild-standin\"",
            'chmod 755 "$1/etc/initramfs-tools/hooks/imagebuild-standin"',
        ),
    )


def init_layer(arch: Arch, init: InitSystem) -> Layer:
    if init not in _INIT_PACKAGES:
        raise StageError(f"there is no {init.value} stand-in stage yet", hint="use --stage standin (systemd)")
    files = FILES_DIR / init.value
    hooks = _OPENRC_HOOKS if init == InitSystem.openrc else ()
    return Layer(name=init.value, arch=arch, packages=_INIT_PACKAGES[init], parent=base_layer(arch),
                 customize_hooks=(HOSTNAME_HOOK, *hooks), files=files if files.is_dir() else None)


def ensure_standin(arch: Arch, cache_dir: Path, init: InitSystem = InitSystem.systemd) -> Path:
    """Return the cached stand-in tarball for ``arch`` and ``init``, building it first if needed."""
    layer = init_layer(arch, init)
    logger.warning(
        "Using the STAND-IN stage for %s (%s): a Debian %s root filesystem for offline use, "
        "not a Gentoo stage3.", arch.value, init.value, layer.suite,
    )
    return _ensure(layer, cache_dir)


def _ensure(layer: Layer, cache_dir: Path) -> Path:
    path = layer.path(cache_dir)
    if path.exists():
        logger.info("  reusing cached stand-in %s", path)
        return path
    parent = _ensure(layer.parent, cache_dir) if layer.parent else None
    _build(layer, parent, path)
    # Layers of older recipes are never used again.
    for stale in path.parent.glob(f"standin-debian-*-{layer.arch.value}-{layer.name}-*.tar"):
        if stale != path:
            logger.info("  removing the stand-in of an older recipe: %s", stale.name)
            stale.unlink()
    return path


def _foreign(arch: Arch) -> bool:
    host = {"x86_64": Arch.amd64, "aarch64": Arch.arm64}.get(platform.machine())
    return host != arch


def _build(layer: Layer, parent: Path | None, path: Path) -> None:
    require_tools("mmdebstrap")
    arch = layer.arch
    if _foreign(arch) and not Path(f"/proc/sys/fs/binfmt_misc/qemu-{arch.uname}").exists():
        raise StageError(
            f"cannot build the {arch.value} stand-in stage: no binfmt_misc handler for {arch.uname}",
            hint="install qemu-user-static, binfmt-support and arch-test (ci/setup does), then "
            "'mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc' and 'update-binfmts --enable'",
        )
    if _foreign(arch):
        require_tools("arch-test")  # mmdebstrap needs it for a foreign architecture
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    what = f"the {arch.value} stand-in's {layer.name} layer"
    with complete_step(f"Building {what} with mmdebstrap (cached afterwards)"), \
            tempfile.TemporaryDirectory(prefix="imagebuild-standin-") as scratch:
        notice = Path(scratch) / "imagebuild-standin"
        notice.write_text(NOTICE)
        cmd: list[str | Path] = ["mmdebstrap", f"--arch={arch.debian}", "--format=tar",
                                 *(f"--dpkgopt={o}" for o in _DPKG_OPTIONS),
                                 "--aptopt=Acquire::Languages \"none\""]
        if parent is None:
            cmd += ["--variant=apt"]
        else:
            # mmdebstrap's way to refine a chroot it made: unpack it, then install on top.
            cmd += ["--variant=custom", f"--setup-hook=tar -C \"$1\" --exclude=./dev/* -xf {parent}"]
        cmd += [f"--include={','.join(layer.packages)}",
                *(f"--essential-hook={h}" for h in layer.essential_hooks),
                f"--customize-hook=copy-in {notice} /etc",
                *([f"--customize-hook=tar -C {layer.files} --owner=0 --group=0 -c . | tar -C \"$1\" --no-overwrite-dir -x"]
                  if layer.files else []),
                *(f"--customize-hook={h}" for h in layer.customize_hooks),
                layer.suite, partial]
        try:
            run(cmd, env={"TMPDIR": os.environ.get("TMPDIR", "/tmp")})
            partial.rename(path)
        finally:
            partial.unlink(missing_ok=True)
