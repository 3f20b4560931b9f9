"""What a stage holds, read before anything is written: the kernel an image boots, the init it
runs, and whether that init has what the variant needs (imagebuild.services names it)."""

from __future__ import annotations

import dataclasses
import re

from imagebuild import services
from imagebuild.config import InitSystem, Variant
from imagebuild.errors import StageError
from imagebuild.log import logger
from imagebuild.tree import Tree


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The kernel an image boots, as file names relative to /boot."""

    image: str
    initrd: str | None
    version: str


def detect_init(tree: Tree) -> InitSystem:
    if (init := services.init_of(tree)) is not None:
        return init
    raise StageError(
        "cannot tell the stage's init system: neither systemd (/usr/lib/systemd/systemd) nor OpenRC "
        "(/sbin/openrc) is in the stage",
        hint="use a Gentoo systemd or OpenRC stage3/seed",
    )


def _version_key(version: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def kernel_in(tree: Tree) -> Kernel | None:
    """The newest kernel in the stage's /boot and its initramfs (Gentoo's or Debian's names);
    None when /boot has no kernel."""
    kernels = []
    for name in tree.listdir("/boot") if tree.is_dir("/boot") else []:
        match = re.fullmatch(r"(?:vmlinuz|vmlinux|kernel|Image)-(.+)", name)
        if match and tree.is_file(f"/boot/{name}") and not name.endswith((".old", ".sig")):
            kernels.append((match.group(1), name))
    if not kernels:
        return None
    version, image = max(kernels, key=lambda k: _version_key(k[0]))
    initrd = None
    for name in (f"initramfs-{version}.img", f"initrd.img-{version}", f"initrd-{version}.img", f"initrd-{version}"):
        if tree.is_file(f"/boot/{name}"):
            initrd = name
            break
    return Kernel(image=image, initrd=initrd, version=version)


def find_kernel(tree: Tree) -> Kernel:
    """The kernel an image boots (kernel_in), or StageError."""
    kernel = kernel_in(tree)
    if kernel is None:
        raise StageError(
            "the stage has no kernel in /boot (no vmlinuz-*, kernel-* or Image-*)",
            hint="use a diskimage seed with a kernel, or name one in the spec (boot/kernel with "
            "distkernel: yes) for the build to install",
        )
    if kernel.initrd is None:
        logger.warning("no initramfs found for kernel %s: the kernel must mount XFS by itself", kernel.version)
    return kernel


def check_init_files(tree: Tree, init: InitSystem, variant: Variant) -> None:
    """Before anything is written: what the variant needs from the init is in the stage."""
    if init == InitSystem.openrc:
        if not tree.is_file(services.INITTAB):
            raise StageError("the OpenRC stage has no /etc/inittab (sysvinit's)",
                             hint="use a Gentoo OpenRC stage3 (sys-apps/sysvinit installs it)")
        if not tree.lexists("/sbin/agetty"):
            raise StageError("the OpenRC stage has no /sbin/agetty for the serial login",
                             hint="use a complete stage3 (sys-apps/util-linux installs it)")
        if not tree.lexists("/sbin/rc-update") and not tree.lexists("/usr/sbin/rc-update"):
            raise StageError("the OpenRC stage has no rc-update", hint="use a complete OpenRC stage3")
        # rc-update (in the chroot) and the audit work on these; a symlink here would send them
        # wherever it points, and OpenRC at boot would find no runlevel.
        for level in ("/etc/runlevels", *(f"/etc/runlevels/{name}" for name in services.BOOT_RUNLEVELS[1:])):
            if tree.is_symlink(level) or not tree.is_dir(level):
                raise StageError(f"the OpenRC stage's {level} is not a directory",
                                 hint="use a complete OpenRC stage3 (sys-apps/openrc installs its runlevels)")
    if variant != Variant.cloudinit:
        return
    if not tree.lexists("/usr/bin/cloud-init"):
        raise StageError(
            "the stage has no cloud-init (/usr/bin/cloud-init is missing)",
            hint="use a diskimage seed with app-emulation/cloud-init installed "
            "(releng's diskimage-stage1-cloudinit.spec lists it)",
        )
    if init == InitSystem.systemd:
        if not services.units_present(tree, services.CLOUD_INIT_UNITS, vendor_only=True):
            raise StageError(
                "the stage's cloud-init ships none of the systemd units imagebuild knows "
                f"({', '.join(services.CLOUD_INIT_UNITS)})",
                hint="check the stage's cloud-init installation (USE=systemd?)",
            )
        if not services.units_present(tree, services.SSH_UNITS, vendor_only=True):
            raise StageError("the stage has no sshd unit (sshd.service or ssh.service)",
                             hint="use a seed with net-misc/openssh installed")
        return
    wanted = {**services.CLOUD_INIT_OPENRC, **services.CLOUD_OPENRC_SERVICES}
    missing = [name for name in wanted if not services.openrc_service_exists(tree, name)]
    if missing:
        raise StageError(
            f"the OpenRC stage lacks the services the cloud-init image runs: "
            f"{', '.join(f'/etc/init.d/{n}' for n in missing)}",
            hint="use a seed with app-emulation/cloud-init, net-misc/openssh and net-misc/dhcpcd "
            "installed (releng's diskimage-stage1-cloudinit.spec lists them)",
        )
