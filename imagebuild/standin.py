"""The stand-in stage: a Debian root filesystem that takes a Gentoo stage's place offline.

No machine here can reach Gentoo's mirrors, so tests and the offline quick start use a
root filesystem made by mmdebstrap from Debian bookworm that carries what a Gentoo
diskimage-stage1 seed carries: systemd, a kernel with its initramfs in /boot, GRUB's EFI
modules, xfsprogs, cloud-init and openssh. It is a test and demo aid, not Gentoo, and says so
in its own /etc/imagebuild-standin. The pipeline treats it as any other stage tarball.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

from imagebuild.config import Arch
from imagebuild.errors import StageError
from imagebuild.log import complete_step, logger
from imagebuild.run import require_tools, run

# Bump when the recipe's meaning changes in a way the fields below do not capture.
RECIPE_VERSION = 1

NOTICE = (
    "This is an imagebuild STAND-IN stage: a Debian bookworm root filesystem built with\n"
    "mmdebstrap so images can be built and boot-tested without access to Gentoo's mirrors.\n"
    "It is not Gentoo.\n"
)

HOSTNAME_HOOK = 'echo localhost > "$1/etc/hostname"'

_COMMON_PACKAGES = [
    "systemd-sysv",
    "udev",
    "dbus",
    "login",
    "passwd",
    "kmod",
    "procps",
    "iproute2",
    "initramfs-tools",
    "xfsprogs",
    "dosfstools",
    "cloud-init",
    "cloud-guest-utils",
    "openssh-server",
    "sudo",
]
_ARCH_PACKAGES = {
    Arch.amd64: ["linux-image-amd64", "grub-efi-amd64-bin"],
    Arch.arm64: ["linux-image-arm64", "grub-efi-arm64-bin"],
}


def recipe(arch: Arch) -> dict[str, object]:
    """Everything that decides the stand-in's content; its hash names the cached tarball."""
    return {
        "recipe_version": RECIPE_VERSION,
        "tool": "mmdebstrap",
        "suite": "bookworm",
        "variant": "apt",
        "arch": arch.debian,
        "packages": sorted(_COMMON_PACKAGES + _ARCH_PACKAGES[arch]),
        "notice": NOTICE,
        "hooks": [HOSTNAME_HOOK],
    }


def recipe_hash(arch: Arch) -> str:
    blob = json.dumps(recipe(arch), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def standin_path(arch: Arch, cache_dir: Path) -> Path:
    return cache_dir / "standin" / f"standin-debian-bookworm-{arch.value}-{recipe_hash(arch)}.tar"


def ensure_standin(arch: Arch, cache_dir: Path) -> Path:
    """Return the cached stand-in tarball for ``arch``, building it first if needed."""
    path = standin_path(arch, cache_dir)
    logger.warning(
        "Using the STAND-IN stage for %s: a Debian bookworm root filesystem for offline use, "
        "not a Gentoo stage3.",
        arch.value,
    )
    if path.exists():
        logger.info("  reusing cached stand-in stage %s (recipe %s)", path, recipe_hash(arch))
        return path
    _build_standin(arch, path)
    return path


def _foreign(arch: Arch) -> bool:
    host = {"x86_64": Arch.amd64, "aarch64": Arch.arm64}.get(platform.machine())
    return host != arch


def _build_standin(arch: Arch, path: Path) -> None:
    require_tools("mmdebstrap")
    if _foreign(arch) and not Path(f"/proc/sys/fs/binfmt_misc/qemu-{arch.uname}").exists():
        raise StageError(
            f"cannot build the {arch.value} stand-in stage: no binfmt_misc handler for {arch.uname}",
            hint="install qemu-user-static and binfmt-support (ci/setup does), then "
            "'mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc' and 'update-binfmts --enable'",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    spec = recipe(arch)
    with complete_step(f"Building the {arch.value} stand-in stage with mmdebstrap (cached afterwards)"), \
            tempfile.TemporaryDirectory(prefix="imagebuild-standin-") as scratch:
        notice = Path(scratch) / "imagebuild-standin"
        notice.write_text(NOTICE)
        try:
            run(
                [
                    "mmdebstrap",
                    f"--variant={spec['variant']}",
                    f"--arch={spec['arch']}",
                    f"--include={','.join(spec['packages'])}",  # type: ignore[arg-type]
                    "--format=tar",
                    f"--customize-hook=copy-in {notice} /etc",
                    # mmdebstrap leaves the build host's name in /etc/hostname.
                    f"--customize-hook={HOSTNAME_HOOK}",
                    str(spec["suite"]),
                    partial,
                ],
                env={"TMPDIR": os.environ.get("TMPDIR", "/tmp")},
            )
            partial.rename(path)
        finally:
            partial.unlink(missing_ok=True)
    # Stand-ins of older recipes for this arch are never used again.
    for stale in path.parent.glob(f"standin-debian-bookworm-{arch.value}-*.tar"):
        if stale != path:
            logger.info("  removing the stand-in of an older recipe: %s", stale.name)
            stale.unlink()
