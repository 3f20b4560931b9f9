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
virtual machine's disk needs (``MODULES=list``); and the maintainer-script tools that would run
once per package or again from a trigger (the initramfs, the CA bundle, Python's byte code)
run once, at the end of the base layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
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
SUITE = {Arch.amd64: "bookworm", Arch.arm64: "bookworm", Arch.riscv64: "trixie"}

# Shared by every init: cloud-init for the cloud-init variant, openssh, xfsprogs for the root.
_BASE_PACKAGES = (
    "udev", "dbus", "login", "passwd", "kmod", "procps", "iproute2", "initramfs-tools", "xfsprogs",
    "dosfstools", "cloud-init", "cloud-guest-utils", "openssh-server", "sudo",
)
_ARCH_PACKAGES = {
    Arch.amd64: ("linux-image-amd64", "grub-efi-amd64-bin"),
    Arch.arm64: ("linux-image-arm64", "grub-efi-arm64-bin"),
    Arch.riscv64: ("linux-image-riscv64", "grub-efi-riscv64-bin"),
}
_INIT_PACKAGES = {
    InitSystem.systemd: ("systemd-sysv",),
    # Gentoo's OpenRC stage3: sysvinit's /sbin/init, OpenRC, dhcpcd (installed, not enabled).
    InitSystem.openrc: ("sysvinit-core", "openrc", "dhcpcd-base"),
}
# Files an init layer puts on top of its packages (a tree under standin_files/<init>/).
FILES_DIR = Path(__file__).parent / "standin_files"
# The OpenRC stand-in boots as a Gentoo OpenRC stage3 does: OpenRC's own kind of services in
# Gentoo's runlevels, under Gentoo's names (standin_files/openrc/etc/init.d). Debian's System V
# scripts go: OpenRC ran them through its LSB support, and under TCG they took 45 s to boot
# and ~30 s to shut down (sendsigs, umountfs and umountroot run twice, each script 1-9 s),
# against a few seconds for the systemd stand-in. Gentoo's cloud-init services are in no
# runlevel until an image enables them, as sshd and dhcpcd are.
_OPENRC_RUNLEVELS = {
    "sysinit": ("devfs", "udev", "cgroups"),
    "boot": ("root", "localmount", "hostname", "bootmisc", "loopback"),
    "default": (),
    "nonetwork": (),
    "shutdown": ("killprocs", "mount-ro"),
}
_OPENRC_HOOKS = (
    'for s in "$1"/etc/init.d/*; do ! grep -q "^### BEGIN INIT INFO" "$s" || rm -f "$s"; done',
    'rm -rf "$1"/etc/runlevels/* "$1"/etc/init.d/.depend.*',
    *(f'mkdir -p "$1/etc/runlevels/{level}"' + "".join(
        f' && ln -s /etc/init.d/{service} "$1/etc/runlevels/{level}/{service}"' for service in services)
      for level, services in _OPENRC_RUNLEVELS.items()),
)

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

# Maintainer-script tools that run once per package, or again from a trigger, and are slow under
# qemu-user. Measured in the arm64 base: update-ca-certificates 49 s a run (ca-certificates' own
# postinst, then its trigger), mkinitramfs ~45 s a run (the kernel's postinst, then
# initramfs-tools' trigger), py3compile ~1.5 s for each of 27 Python packages where one
# compileall of the same files takes 7 s. The base layer diverts each to /bin/true while its
# packages install (dpkg-divert, the way debootstrap-style builders keep daemons from starting)
# and runs each once, for real, at the end. Tool, then the command that does its work once.
_DEFERRED_TOOLS = (
    ("/usr/sbin/update-ca-certificates", "update-ca-certificates --fresh"),
    ("/usr/bin/py3compile", "python3 -m compileall -q /usr/lib/python3/dist-packages"),
    ("/usr/sbin/update-initramfs", "update-initramfs -c -k all"),
)
_DEFER_HOOKS = tuple(
    f'chroot "$1" dpkg-divert --quiet --local --rename --divert {tool}.imagebuild-deferred --add {tool}'
    f' && ln -s /bin/true "$1{tool}"' for tool, _ in _DEFERRED_TOOLS)
_UNDEFER_HOOKS = tuple(
    f'rm "$1{tool}" && chroot "$1" dpkg-divert --quiet --local --rename --remove {tool}'
    f' && chroot "$1" {command}' for tool, command in _DEFERRED_TOOLS)


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
        essential_hooks=(
            'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"',
            'echo MODULES=list > "$1/etc/initramfs-tools/conf.d/imagebuild-standin"',
            f"printf '%s' '{hook}' > \"$1/etc/initramfs-tools/hooks/imagebuild-standin\"",
            'chmod 755 "$1/etc/initramfs-tools/hooks/imagebuild-standin"',
            *_DEFER_HOOKS,
        ),
        customize_hooks=_UNDEFER_HOOKS,
    )


def init_layer(arch: Arch, init: InitSystem) -> Layer:
    if init not in _INIT_PACKAGES:
        raise StageError(f"there is no {init.value} stand-in stage yet", hint="use --stage standin (systemd)")
    files = FILES_DIR / init.value
    hooks = _OPENRC_HOOKS if init == InitSystem.openrc else ()
    return Layer(name=init.value, arch=arch, packages=_INIT_PACKAGES[init], parent=base_layer(arch),
                 customize_hooks=(HOSTNAME_HOOK, *hooks), files=files if files.is_dir() else None)


def standin_path(arch: Arch, cache_dir: Path, init: InitSystem = InitSystem.systemd) -> Path:
    """Where the stand-in for ``arch`` and ``init`` is cached (it may not be built yet)."""
    return init_layer(arch, init).path(cache_dir)


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


def is_foreign(arch: Arch) -> bool:
    """Whether stand-ins for ``arch`` are built through qemu-user on this host."""
    return Arch.host() is not arch


def _build(layer: Layer, parent: Path | None, path: Path) -> None:
    require_tools("mmdebstrap")
    arch = layer.arch
    if is_foreign(arch) and not Path(f"/proc/sys/fs/binfmt_misc/qemu-{arch.uname}").exists():
        raise StageError(
            f"cannot build the {arch.value} stand-in stage: no binfmt_misc handler for {arch.uname}",
            hint="install qemu-user-static, binfmt-support and arch-test (ci/setup does), then "
            "'mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc' and 'update-binfmts --enable'",
        )
    if is_foreign(arch):
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
