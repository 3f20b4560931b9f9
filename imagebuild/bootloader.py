"""GRUB for UEFI on the removable-media path, built from the stage's own GRUB.

``EFI/BOOT/BOOT{X64,AA64}.EFI`` boots without NVRAM entries (grub-install --removable does the
same), so the image boots on any UEFI machine it is copied to. The binary is made by the
stage's grub-mkimage from the stage's modules, so binary and modules always match.
"""

from __future__ import annotations

import stat as statmod
from pathlib import Path

from imagebuild.chroot import chroot_mounts, chroot_run
from imagebuild.config import Arch
from imagebuild.errors import StageError
from imagebuild.log import logger
from imagebuild.mounts import remove_tree
from imagebuild.render import render
from imagebuild.stagefacts import Kernel
from imagebuild.tree import Tree, kind

# Built into the EFI binary so GRUB can read its config from the ESP and show it on the
# serial line before it loads anything else; the rest load from /boot/grub/<target>.
_EMBEDDED_MODULES = (
    "part_gpt", "part_msdos", "fat", "xfs", "ext2", "normal", "configfile", "search",
    "search_fs_uuid", "search_label", "linux", "echo", "test", "ls", "cat", "gzio",
    "serial", "terminal", "efi_gop", "efi_uga", "all_video", "video", "reboot", "halt",
    "sleep", "minicmd",
)


def grub_module_dir(tree: Tree, arch: Arch) -> str:
    """The image path of the stage's GRUB modules for ``arch``."""
    directory = f"/usr/lib/grub/{arch.grub_target}"
    if not tree.is_file(f"{directory}/linux.mod"):
        raise StageError(
            f"the stage has no GRUB modules for {arch.grub_target} ({directory})",
            hint="use a stage with sys-boot/grub built for EFI (GRUB_PLATFORMS=\"efi-64\")",
        )
    return directory


def _mkimage_program(tree: Tree) -> str:
    for name in ("grub-mkimage", "grub2-mkimage"):
        for directory in ("/usr/bin", "/bin", "/usr/sbin"):
            if tree.exists(f"{directory}/{name}"):
                return f"{directory}/{name}"
    raise StageError("the stage has no grub-mkimage", hint="use a stage with sys-boot/grub installed")


def move_boot_to_esp(tree: Tree, esp: Path) -> None:
    """The ESP is /boot: copy the stage's /boot into the ESP tree, then empty the mount point.

    FAT has no symlinks, so a symlink to a file of /boot becomes a copy of that file (resolved
    inside the tree: never a host file); other symlinks are left out. FAT cannot hold device
    nodes, FIFOs or sockets either, and no stage has them in /boot: they are refused.
    """
    boot = tree.real_directory("/boot")
    esp.mkdir(parents=True, exist_ok=True)
    for directory, dirs, files in tree.walk("/boot"):
        below = directory.removeprefix("/boot").lstrip("/")
        for name in dirs:
            (esp / below / name).mkdir()
        for name in files:
            path = f"{directory}/{name}"
            entry = tree.lstat(path)
            assert entry is not None
            if statmod.S_ISLNK(entry.st_mode):
                target = tree.stat(path)
                if target is None or not statmod.S_ISREG(target.st_mode) or boot not in tree.host_path(path).parents:
                    logger.info("  %s is a symlink out of /boot (or to no file): not copied to the ESP", path)
                    continue
            elif not statmod.S_ISREG(entry.st_mode):
                raise StageError(f"the stage's {path} is a {kind(entry.st_mode)}: /boot becomes the FAT "
                                 "EFI system partition, which holds files and directories only",
                                 hint="remove it from the stage")
            tree.copy_out(path, esp / below / name)
    tree.empty("/boot")


def install_grub(tree: Tree, esp: Path, arch: Arch, kernel: Kernel, *, esp_uuid: str, image_name: str,
                 root_label: str, root_fstype: str, cmdline: str, timeout: int = 3) -> None:
    """Put GRUB's EFI binary, its modules and grub.cfg into the ESP tree ``esp``."""
    modules_dir = grub_module_dir(tree, arch)
    program = _mkimage_program(tree)
    names = tree.listdir(modules_dir)
    modules = [m for m in _EMBEDDED_MODULES if f"{m}.mod" in names]
    scratch = "/tmp/imagebuild-grub"
    tree.remove(scratch)
    tree.mkdir(scratch, 0o700)
    with chroot_mounts(tree):
        # -p without a device: GRUB takes the device it was loaded from (the ESP) and
        # looks for grub.cfg in /grub there, i.e. /boot/grub in the running system.
        chroot_run(tree, [program, "-O", arch.grub_target, "-d", modules_dir,
                          "-p", "/grub", "-o", f"{scratch}/grub.efi", *modules])
    # What the stage's /boot brought along under these names gives way to ours.
    efi_dir = _esp_directory(esp, "EFI/BOOT")
    tree.copy_out(f"{scratch}/grub.efi", efi_dir / arch.efi_binary)
    tree.remove(scratch)
    grub_dir = _esp_directory(esp, "grub")
    target_dir = _esp_directory(esp, f"grub/{arch.grub_target}")
    for name in names:
        if name.endswith((".mod", ".lst")) and tree.is_file(f"{modules_dir}/{name}"):
            tree.copy_out(f"{modules_dir}/{name}", target_dir / name)
    remove_tree(grub_dir / "grub.cfg")
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
        cmdline=cmdline,
    ))


def _esp_directory(esp: Path, name: str) -> Path:
    """Directory ``name`` of the ESP tree (which holds only our files and directories),
    made if missing; a file in its place is removed."""
    path = esp
    for part in name.split("/"):
        path = path / part
        if path.exists() and not path.is_dir():
            path.unlink()
        path.mkdir(exist_ok=True)
    return path
