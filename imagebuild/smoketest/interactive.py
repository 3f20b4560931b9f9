"""``imagebuild qemu IMAGE``: boot an image by hand, with the firmware, disk and console the
smoke test uses, and the serial console on this terminal.

The image is not changed unless asked (``snapshot=on``); a cloud-init image gets a NoCloud
seed with a login printed before the boot, since it has no other account that works.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from imagebuild.config import Arch, Variant
from imagebuild.imagefs import image_sector_size, read_header
from imagebuild.log import logger
from imagebuild.run import find_tool
from imagebuild.smoketest.firmware import Firmware, find_firmware
from imagebuild.smoketest.qemu import guest_args, kvm_works, network_args, run_qemu
from imagebuild.smoketest.seed import Seed, write_seed_iso


def qemu_command(image: Path, arch: Arch, *, firmware: Firmware, vars_copy: Path | None, accel: str,
                 sector_size: int, memory: str, cpus: int, writable: bool, seed_iso: Path | None,
                 ssh_port: int | None) -> list[str]:
    forward = f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22" if ssh_port else ""
    return [
        find_tool(arch.qemu_system),
        "-name", f"imagebuild-qemu-{image.name}",
        "-nodefaults",
        "-no-user-config",
        *guest_args(arch=arch, accel=accel, firmware=firmware, vars_copy=vars_copy, disk=image,
                    sector_size=sector_size, memory=memory, cpus=cpus, snapshot=not writable, seed=seed_iso),
        *network_args(forward, firmware),
        # The serial console and QEMU's monitor share this terminal: Ctrl-a c switches,
        # Ctrl-a x quits. signal=off: a ^C goes to the guest, not to QEMU.
        "-chardev", "stdio,id=console0,mux=on,signal=off",
        "-serial", "chardev:console0",
        "-mon", "chardev=console0,mode=readline",
        "-display", "none",
    ]  # fmt: skip


def boot_interactively(image: Path, arch: Arch, variant: Variant, *, memory: str = "2G", cpus: int = 2,
                       writable: bool = False, ssh_port: int | None = None, allow_backing_file: bool = False) -> int:
    """Boot ``image`` with its serial console on this terminal; QEMU's exit status."""
    image = image.resolve()
    read_header(image, allow_external=allow_backing_file)
    firmware = find_firmware(arch)
    accel = "kvm" if kvm_works(arch, firmware) else "tcg"
    sector_size = image_sector_size(image)
    with tempfile.TemporaryDirectory(prefix="imagebuild-qemu-") as tmp:
        vars_copy = firmware.copy_vars(Path(tmp))
        seed = Seed.make() if variant is Variant.cloudinit else None
        seed_iso = write_seed_iso(seed, Path(tmp) / "seed.iso") if seed else None
        command = qemu_command(image, arch, firmware=firmware, vars_copy=vars_copy, accel=accel, sector_size=sector_size,
                               memory=memory, cpus=cpus, writable=writable, seed_iso=seed_iso,
                               ssh_port=ssh_port)
        logger.info("Booting %s (%s, %s, %s%s)", image.name, arch, variant, accel.upper(),
                    "" if sector_size == 512 else f", {sector_size}-byte sectors")
        logger.info("  %s", "changes are WRITTEN to the image" if writable
                    else "changes are thrown away when QEMU exits (--writable keeps them)")
        if seed:
            logger.info("  cloud-init seed: log in as '%s' with password '%s' (hostname %s)",
                        seed.user, seed.password, seed.hostname)
        else:
            logger.info("  log in as root (no password) on the serial console below")
        if ssh_port:
            logger.info("  ssh: port %d on 127.0.0.1 goes to the guest's port 22", ssh_port)
        logger.info("  serial console on this terminal: Ctrl-a x quits QEMU, Ctrl-a c toggles its monitor")
        sys.stderr.flush()
        return run_qemu(command)
