"""Configure the unpacked tree: what every image needs, then the console or cloud-init variant.

Pure file edits happen from the host; enabling and disabling services runs the stage's own
systemctl (or rc-update) in a chroot, so the stage's own rules (aliases, Also=) apply.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from imagebuild.chroot import chroot_mounts, chroot_run
from imagebuild.config import Arch, ImageLayout, InitSystem
from imagebuild.errors import StageError
from imagebuild.log import logger
from imagebuild.mounts import empty_directory
from imagebuild.render import render

# Services that would put the console variant on the network.
_NETWORK_SERVICES = (
    "ssh.service",
    "sshd.service",
    "ssh.socket",
    "sshd.socket",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "NetworkManager.service",
    "dhcpcd.service",
)
_UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The kernel an image boots, as file names relative to /boot."""

    image: str
    initrd: str | None
    version: str


def detect_init(root: Path) -> InitSystem:
    if (root / "sbin/openrc").exists() or (root / "usr/sbin/openrc").exists():
        return InitSystem.openrc
    if any((root / d / "systemd").exists() for d in ("usr/lib/systemd", "lib/systemd")):
        return InitSystem.systemd
    raise StageError(
        f"cannot tell the stage's init system: neither systemd nor OpenRC found in {root}",
        hint="use a Gentoo systemd or OpenRC stage3/seed",
    )


def _version_key(version: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def find_kernel(root: Path) -> Kernel:
    """The newest kernel in the stage's /boot and its initramfs (Gentoo's or Debian's names)."""
    boot = root / "boot"
    kernels = []
    for path in boot.glob("*") if boot.is_dir() else []:
        match = re.fullmatch(r"(?:vmlinuz|vmlinux|kernel|Image)-(.+)", path.name)
        if match and path.is_file() and not path.name.endswith((".old", ".sig")):
            kernels.append((match.group(1), path.name))
    if not kernels:
        raise StageError(
            f"the stage has no kernel in /boot ({boot} holds no vmlinuz-*, kernel-* or Image-*)",
            hint="use a diskimage seed with a kernel (Catalyst's boot/kernel, or emerge "
            "sys-kernel/gentoo-kernel-bin with USE=initramfs)",
        )
    version, image = max(kernels, key=lambda k: _version_key(k[0]))
    initrd = None
    for name in (f"initramfs-{version}.img", f"initrd.img-{version}", f"initrd-{version}.img", f"initrd-{version}"):
        if (boot / name).is_file():
            initrd = name
            break
    if initrd is None:
        logger.warning("no initramfs found for kernel %s: the kernel must mount XFS by itself", version)
    return Kernel(image=image, initrd=initrd, version=version)


def kernel_cmdline(arch: Arch) -> str:
    # Catalyst's order: the last console= becomes /dev/console, so VGA gets systemd's
    # status output and the serial line gets the kernel log and a getty.
    return f"console={arch.serial_console} console=tty0"


def write_system_files(root: Path, arch: Arch, layout: ImageLayout) -> None:
    """fstab by label, GRUB defaults with serial console, empty machine-id, locale and time zone."""
    etc = root / "etc"
    (etc / "fstab").write_text(render("fstab.j2", **dataclasses.asdict(layout)))
    terminal = "serial console" if arch == Arch.amd64 else "console"
    with open(_mkparent(etc / "default" / "grub"), "a") as f:
        f.write(render("default-grub.j2", grub_terminal=terminal, cmdline=kernel_cmdline(arch)))
    # Catalyst's choices: C.UTF-8, us keymap, UTC; keep whatever the stage already set.
    _write_if_missing(etc / "locale.conf", 'LANG="C.UTF-8"\n')
    _write_if_missing(etc / "vconsole.conf", "KEYMAP=us\n")
    if not (etc / "localtime").exists() and (root / "usr/share/zoneinfo/UTC").exists():
        (etc / "localtime").unlink(missing_ok=True)
        (etc / "localtime").symlink_to("../usr/share/zoneinfo/UTC")
    make_conf = etc / "portage" / "make.conf"
    if make_conf.is_file() and "binpkg-request-signature" not in make_conf.read_text():
        with open(make_conf, "a") as f:
            f.write('\n# Ensure that binary package signatures are verified\nFEATURES="binpkg-request-signature"\n')


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_if_missing(path: Path, text: str) -> None:
    if not path.exists() and not path.is_symlink():
        path.write_text(text)


def _units_present(root: Path, names: tuple[str, ...], *, vendor_only: bool = False) -> list[str]:
    """The unit names of ``names`` that exist; ``vendor_only`` skips /etc (aliases such as
    Debian's sshd.service -> ssh.service, which systemctl refuses to enable)."""
    dirs = _UNIT_DIRS[1:] if vendor_only else _UNIT_DIRS
    return [n for n in names if any((root / d / n).exists() or (root / d / n).is_symlink() for d in dirs)]


def configure_console(root: Path, arch: Arch, init: InitSystem) -> None:
    """Empty root password, a getty on the serial console, DHCP configured, no network service."""
    _set_root_password_field(root, "")
    if (root / "etc/cloud").is_dir():
        # The documented switch that keeps cloud-init from running at boot.
        (root / "etc/cloud/cloud-init.disabled").write_text("disabled by imagebuild: console image\n")
    if init == InitSystem.systemd:
        network_dir = root / "etc/systemd/network"
        network_dir.mkdir(parents=True, exist_ok=True)
        (network_dir / "80-imagebuild-dhcp.network").write_text(
            render("dhcp.network.j2", note="systemd-networkd is disabled in the console image; "
                   "'systemctl start systemd-networkd' brings the network up.")
        )
        with chroot_mounts(root):
            chroot_run(root, ["systemctl", "enable", f"serial-getty@{arch.serial_console}.service"])
            off = _units_present(root, _NETWORK_SERVICES)
            if off:
                chroot_run(root, ["systemctl", "disable", *off])
    else:
        raise StageError(
            "OpenRC stages are not supported yet for the console variant",
            hint="use a systemd stage (profile .../systemd) for now",
        )


# cloud-init's systemd units changed names across releases (cloud-init-main and
# cloud-init-network since 24.3); enable whichever the installed cloud-init ships.
_CLOUD_INIT_UNITS = (
    "cloud-init-main.service",
    "cloud-init-local.service",
    "cloud-init-network.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
)
_CLOUD_INIT_OPENRC = ("cloud-init-local", "cloud-init", "cloud-config", "cloud-final")
_SSH_UNITS = ("sshd.service", "ssh.service")

DEFAULT_CLOUD_USER = "gentoo"


def configure_cloudinit(root: Path, arch: Arch, init: InitSystem, image_name: str) -> None:
    """cloud-init enabled with the repository's configuration, network and sshd on, all accounts locked."""
    if not (root / "usr/bin/cloud-init").exists():
        raise StageError(
            "the stage has no cloud-init (/usr/bin/cloud-init is missing)",
            hint="use a diskimage seed with app-emulation/cloud-init installed "
            "(releng's diskimage-stage1-cloudinit.spec lists it)",
        )
    lock_all_accounts(root)
    (root / "etc/cloud/cloud-init.disabled").unlink(missing_ok=True)
    config_dir = root / "etc/cloud/cloud.cfg.d"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "90-imagebuild.cfg").write_text(render(
        "cloud-init/90-imagebuild.cfg.j2", image_name=image_name, default_user=DEFAULT_CLOUD_USER,
        init=init.value,
    ))
    if init != InitSystem.systemd:
        raise StageError(
            "OpenRC stages are not supported yet for the cloud-init variant",
            hint="use a systemd stage (profile .../systemd) for now",
        )
    network_dir = root / "etc/systemd/network"
    network_dir.mkdir(parents=True, exist_ok=True)
    (network_dir / "80-imagebuild-dhcp.network").write_text(
        render("dhcp.network.j2", note="Used until cloud-init writes the datasource's network configuration.")
    )
    units = _units_present(root, _CLOUD_INIT_UNITS, vendor_only=True)
    if not units:
        raise StageError(
            "the stage's cloud-init ships none of the systemd units imagebuild knows "
            f"({', '.join(_CLOUD_INIT_UNITS)})",
            hint="check the stage's cloud-init installation (USE=systemd?)",
        )
    ssh = _units_present(root, _SSH_UNITS, vendor_only=True)
    if not ssh:
        raise StageError("the stage has no sshd unit (sshd.service or ssh.service)",
                         hint="use a seed with net-misc/openssh installed")
    with chroot_mounts(root):
        chroot_run(root, ["systemctl", "enable", "systemd-networkd.service", ssh[0], *units])


def lock_all_accounts(root: Path) -> None:
    """No password works anywhere: every shadow entry gets a '!' lock (root's hash goes)."""
    shadow = root / "etc/shadow"
    lines = []
    for line in shadow.read_text().splitlines(keepends=True):
        fields = line.split(":")
        if len(fields) > 1:
            password = fields[1]
            if fields[0] == "root":
                fields[1] = "!"
            elif not password.startswith(("!", "*")):
                fields[1] = "!" + password
        lines.append(":".join(fields))
    shadow.write_text("".join(lines))


def _set_root_password_field(root: Path, value: str) -> None:
    shadow = root / "etc/shadow"
    if not shadow.is_file():
        raise StageError(f"the stage has no /etc/shadow ({shadow})", hint="use a complete stage3")
    lines = shadow.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root":
            fields[1] = value
            lines[i] = ":".join(fields)
            break
    else:
        raise StageError(f"the stage's {shadow} has no root entry", hint="use a complete stage3")
    shadow.write_text("".join(lines))


_HISTORY_FILES = (".bash_history", ".ash_history", ".sh_history", ".python_history", ".lesshst", ".viminfo")


def clean_tree(root: Path) -> None:
    """Hygiene: nothing of the build host or of one machine's identity ships in the image."""
    # An empty machine-id: systemd makes a new one at first boot and treats the system as
    # initialised (Catalyst does the same).
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    (root / "var/lib/systemd/random-seed").unlink(missing_ok=True)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    homes = [root / "root", *(p for p in (root / "home").glob("*") if p.is_dir() and not p.is_symlink())]
    for home in homes:
        for name in _HISTORY_FILES:
            (home / name).unlink(missing_ok=True)
    for scratch in ("tmp", "var/tmp", "var/cache/distfiles", "var/cache/binpkgs"):
        directory = root / scratch
        if directory.is_dir() and not directory.is_symlink():
            empty_directory(directory)
