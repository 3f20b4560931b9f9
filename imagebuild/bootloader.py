"""GRUB for UEFI on the removable-media path, built from the stage's own GRUB.

``EFI/BOOT/BOOT{X64,AA64}.EFI`` boots without NVRAM entries (grub-install --removable does the
same), so the image boots on any UEFI machine it is copied to. The binary is made by the
stage's grub-mkimage from the stage's modules, so binary and modules always match.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from imagebuild.chroot import chroot_mounts, chroot_run
from imagebuild.config import Arch
from imagebuild.configure import Kernel, kernel_cmdline
from imagebuild.errors import StageError
from imagebuild.render import render

# Built into the EFI binary so GRUB can read its config from the ESP and show it on the
# serial line before it loads anything else; the rest load from /boot/grub/<target>.
_EMBEDDED_MODULES = (
    "part_gpt", "part_msdos", "fat", "xfs", "ext2", "normal", "configfile", "search",
    "search_fs_uuid", "search_label", "linux", "echo", "test", "ls", "cat", "gzio",
    "serial", "terminal", "efi_gop", "efi_uga", "all_video", "video", "reboot", "halt",
    "sleep", "minicmd",
)


def grub_module_dir(root: Path, arch: Arch) -> Path:
    directory = root / "usr/lib/grub" / arch.grub_target
    if not (directory / "linux.mod").is_file():
        raise StageError(
            f"the stage has no GRUB modules for {arch.grub_target} ({directory})",
            hint="use a stage with sys-boot/grub built for EFI (GRUB_PLATFORMS=\"efi-64\")",
        )
    return directory


def _mkimage_program(root: Path) -> str:
    for name in ("grub-mkimage", "grub2-mkimage"):
        for directory in ("usr/bin", "bin", "usr/sbin"):
            if (root / directory / name).exists():
                return f"/{directory}/{name}"
    raise StageError("the stage has no grub-mkimage", hint="use a stage with sys-boot/grub installed")


def move_boot_to_esp(root: Path, esp: Path) -> None:
    """The ESP is /boot: move the stage's /boot into the ESP tree, leaving the mount point empty.

    FAT has no symlinks, so a symlink in /boot becomes a copy of what it points to.
    """
    boot = root / "boot"
    esp.mkdir(parents=True, exist_ok=True)
    for entry in sorted(boot.iterdir()):
        if entry.is_symlink():
            target = entry.resolve()
            if target.is_file() and boot.resolve() in target.parents:
                shutil.copy2(target, esp / entry.name)
            entry.unlink()
        else:
            shutil.move(entry, esp / entry.name)


def install_grub(root: Path, esp: Path, arch: Arch, kernel: Kernel, *, esp_uuid: str, image_name: str,
                 root_label: str, root_fstype: str, timeout: int = 3) -> None:
    """Put GRUB's EFI binary, its modules and grub.cfg into the ESP tree ``esp``."""
    modules_dir = grub_module_dir(root, arch)
    program = _mkimage_program(root)
    modules = [m for m in _EMBEDDED_MODULES if (modules_dir / f"{m}.mod").is_file()]
    scratch = root / "tmp" / "imagebuild-grub"
    scratch.mkdir(parents=True, exist_ok=True)
    with chroot_mounts(root):
        # -p without a device: GRUB takes the device it was loaded from (the ESP) and
        # looks for grub.cfg in /grub there, i.e. /boot/grub in the running system.
        chroot_run(root, [program, "-O", arch.grub_target, "-d", f"/usr/lib/grub/{arch.grub_target}",
                          "-p", "/grub", "-o", "/tmp/imagebuild-grub/grub.efi", *modules])
    efi_dir = esp / "EFI" / "BOOT"
    efi_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(scratch / "grub.efi", efi_dir / arch.efi_binary)
    shutil.rmtree(scratch)
    grub_dir = esp / "grub"
    grub_dir.mkdir(exist_ok=True)
    target_dir = grub_dir / arch.grub_target
    target_dir.mkdir(exist_ok=True)
    for item in modules_dir.iterdir():
        if item.suffix in (".mod", ".lst") and item.is_file():
            shutil.copy2(item, target_dir / item.name)
    (grub_dir / "grub.cfg").write_text(render(
        "grub.cfg.j2",
        image_name=image_name,
        grub_target=arch.grub_target,
        serial_unit=0 if arch == Arch.amd64 else None,
        timeout=timeout,
        title=f"Gentoo Linux ({image_name})",
        esp_uuid=esp_uuid,
        kernel=kernel.image,
        initrd=kernel.initrd,
        kernel_version=kernel.version,
        root_label=root_label,
        root_fstype=root_fstype,
        cmdline=kernel_cmdline(arch),
    ))
