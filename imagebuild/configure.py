"""Configure the unpacked tree: what every image needs, then the console or cloud-init variant.

Pure file edits happen from the host; enabling and disabling services runs the stage's own
systemctl (or rc-update) in a chroot, so the stage's own rules (aliases, Also=) apply.
"""

from __future__ import annotations

import dataclasses
import re

from imagebuild.chroot import chroot_mounts, chroot_run
from imagebuild.config import Arch, ImageLayout, InitSystem
from imagebuild.errors import StageError
from imagebuild.log import logger
from imagebuild.render import render
from imagebuild.tree import Tree

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
_UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The kernel an image boots, as file names relative to /boot."""

    image: str
    initrd: str | None
    version: str


def detect_init(tree: Tree) -> InitSystem:
    if tree.lexists("/sbin/openrc") or tree.lexists("/usr/sbin/openrc"):
        return InitSystem.openrc
    if any(tree.lexists(f"{d}/systemd") for d in ("/usr/lib/systemd", "/lib/systemd")):
        return InitSystem.systemd
    raise StageError(
        "cannot tell the stage's init system: neither systemd (/usr/lib/systemd/systemd) nor OpenRC "
        "(/sbin/openrc) is in the stage",
        hint="use a Gentoo systemd or OpenRC stage3/seed",
    )


def _version_key(version: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version)]


def find_kernel(tree: Tree) -> Kernel:
    """The newest kernel in the stage's /boot and its initramfs (Gentoo's or Debian's names)."""
    kernels = []
    for name in tree.listdir("/boot") if tree.is_dir("/boot") else []:
        match = re.fullmatch(r"(?:vmlinuz|vmlinux|kernel|Image)-(.+)", name)
        if match and tree.is_file(f"/boot/{name}") and not name.endswith((".old", ".sig")):
            kernels.append((match.group(1), name))
    if not kernels:
        raise StageError(
            "the stage has no kernel in /boot (no vmlinuz-*, kernel-* or Image-*)",
            hint="use a diskimage seed with a kernel (Catalyst's boot/kernel, or emerge "
            "sys-kernel/gentoo-kernel-bin with USE=initramfs)",
        )
    version, image = max(kernels, key=lambda k: _version_key(k[0]))
    initrd = None
    for name in (f"initramfs-{version}.img", f"initrd.img-{version}", f"initrd-{version}.img", f"initrd-{version}"):
        if tree.is_file(f"/boot/{name}"):
            initrd = name
            break
    if initrd is None:
        logger.warning("no initramfs found for kernel %s: the kernel must mount XFS by itself", version)
    return Kernel(image=image, initrd=initrd, version=version)


def kernel_cmdline(arch: Arch) -> str:
    # Catalyst's order: the last console= becomes /dev/console, so VGA gets systemd's
    # status output and the serial line gets the kernel log and a getty.
    return f"console={arch.serial_console} console=tty0"


def write_system_files(tree: Tree, arch: Arch, layout: ImageLayout) -> None:
    """fstab by label, GRUB defaults with serial console, empty machine-id, locale and time zone."""
    tree.write_text("/etc/fstab", render("fstab.j2", **dataclasses.asdict(layout)))
    terminal = "serial console" if arch == Arch.amd64 else "console"
    tree.append_text("/etc/default/grub", render("default-grub.j2", grub_terminal=terminal,
                                                 cmdline=kernel_cmdline(arch)))
    # Catalyst's choices: C.UTF-8, us keymap, UTC; keep whatever the stage already set.
    tree.write_if_missing("/etc/locale.conf", 'LANG="C.UTF-8"\n')
    tree.write_if_missing("/etc/vconsole.conf", "KEYMAP=us\n")
    if not tree.exists("/etc/localtime") and tree.exists("/usr/share/zoneinfo/UTC"):
        tree.unlink("/etc/localtime")
        tree.symlink("../usr/share/zoneinfo/UTC", "/etc/localtime")
    make_conf = "/etc/portage/make.conf"
    if tree.is_file(make_conf) and "binpkg-request-signature" not in tree.read_text(make_conf):
        tree.append_text(make_conf, '\n# Ensure that binary package signatures are verified\n'
                                    'FEATURES="binpkg-request-signature"\n')


def _units_present(tree: Tree, names: tuple[str, ...], *, vendor_only: bool = False) -> list[str]:
    """The unit names of ``names`` that exist; ``vendor_only`` skips /etc (aliases such as
    Debian's sshd.service -> ssh.service, which systemctl refuses to enable)."""
    dirs = _UNIT_DIRS[1:] if vendor_only else _UNIT_DIRS
    return [n for n in names if any(tree.lexists(f"{d}/{n}") for d in dirs)]


def configure_console(tree: Tree, arch: Arch, init: InitSystem) -> None:
    """Empty root password, a getty on the serial console, DHCP configured, no network service."""
    _set_root_password_field(tree, "")
    if tree.is_dir("/etc/cloud"):
        # The documented switch that keeps cloud-init from running at boot.
        tree.write_text("/etc/cloud/cloud-init.disabled", "disabled by imagebuild: console image\n")
    if init == InitSystem.systemd:
        tree.write_text("/etc/systemd/network/80-imagebuild-dhcp.network", render(
            "dhcp.network.j2", note="systemd-networkd is disabled in the console image; "
            "'systemctl start systemd-networkd' brings the network up."))
        with chroot_mounts(tree):
            chroot_run(tree, ["systemctl", "enable", f"serial-getty@{arch.serial_console}.service"])
            off = _units_present(tree, _NETWORK_SERVICES)
            if off:
                chroot_run(tree, ["systemctl", "disable", *off])
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


def configure_cloudinit(tree: Tree, arch: Arch, init: InitSystem, image_name: str) -> None:
    """cloud-init enabled with the repository's configuration, network and sshd on, all accounts locked."""
    if not tree.lexists("/usr/bin/cloud-init"):
        raise StageError(
            "the stage has no cloud-init (/usr/bin/cloud-init is missing)",
            hint="use a diskimage seed with app-emulation/cloud-init installed "
            "(releng's diskimage-stage1-cloudinit.spec lists it)",
        )
    lock_all_accounts(tree)
    tree.unlink("/etc/cloud/cloud-init.disabled")
    tree.write_text("/etc/cloud/cloud.cfg.d/90-imagebuild.cfg", render(
        "cloud-init/90-imagebuild.cfg.j2", image_name=image_name, default_user=DEFAULT_CLOUD_USER,
        init=init.value,
    ))
    if init != InitSystem.systemd:
        raise StageError(
            "OpenRC stages are not supported yet for the cloud-init variant",
            hint="use a systemd stage (profile .../systemd) for now",
        )
    tree.write_text("/etc/systemd/network/80-imagebuild-dhcp.network", render(
        "dhcp.network.j2", note="Used until cloud-init writes the datasource's network configuration."))
    units = _units_present(tree, _CLOUD_INIT_UNITS, vendor_only=True)
    if not units:
        raise StageError(
            "the stage's cloud-init ships none of the systemd units imagebuild knows "
            f"({', '.join(_CLOUD_INIT_UNITS)})",
            hint="check the stage's cloud-init installation (USE=systemd?)",
        )
    ssh = _units_present(tree, _SSH_UNITS, vendor_only=True)
    if not ssh:
        raise StageError("the stage has no sshd unit (sshd.service or ssh.service)",
                         hint="use a seed with net-misc/openssh installed")
    with chroot_mounts(tree):
        chroot_run(tree, ["systemctl", "enable", "systemd-networkd.service", ssh[0], *units])


def _read_shadow(tree: Tree) -> str:
    if not tree.lexists("/etc/shadow"):
        raise StageError("the stage has no /etc/shadow", hint="use a complete stage3 or seed")
    return tree.read_text("/etc/shadow")


def lock_all_accounts(tree: Tree) -> None:
    """No password works anywhere: every shadow entry gets a '!' lock (root's hash goes)."""
    lines = []
    for line in _read_shadow(tree).splitlines(keepends=True):
        fields = line.split(":")
        if len(fields) > 1:
            password = fields[1]
            if fields[0] == "root":
                fields[1] = "!"
            elif not password.startswith(("!", "*")):
                fields[1] = "!" + password
        lines.append(":".join(fields))
    tree.write_text("/etc/shadow", "".join(lines), mode=0o640)


def _set_root_password_field(tree: Tree, value: str) -> None:
    lines = _read_shadow(tree).splitlines(keepends=True)
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root":
            fields[1] = value
            lines[i] = ":".join(fields)
            break
    else:
        raise StageError("the stage's /etc/shadow has no root entry", hint="use a complete stage3")
    tree.write_text("/etc/shadow", "".join(lines), mode=0o640)


_HISTORY_FILES = (".bash_history", ".ash_history", ".sh_history", ".python_history", ".lesshst", ".viminfo")


def clean_tree(tree: Tree) -> None:
    """Hygiene: nothing of the build host or of one machine's identity ships in the image."""
    # An empty machine-id: systemd makes a new one at first boot and treats the system as
    # initialised (Catalyst does the same). A machine-id that is a symlink (to
    # /run/machine-id, say) is replaced by the empty file.
    tree.write_text("/etc/machine-id", "", mode=0o444)
    if tree.lstat("/var/lib/dbus/machine-id") is not None and not tree.is_symlink("/var/lib/dbus/machine-id"):
        tree.unlink("/var/lib/dbus/machine-id")
    tree.unlink("/var/lib/systemd/random-seed")
    for key in tree.glob("/etc/ssh", "ssh_host_*") if tree.is_dir("/etc/ssh") else []:
        tree.remove(key)
    homes = ["/root", *(h for h in tree.glob("/home", "*") if tree.is_dir(h) and not tree.is_symlink(h))]
    for home in homes:
        if tree.is_dir(home):
            for name in _HISTORY_FILES:
                tree.remove(f"{home}/{name}")
    for scratch in ("/tmp", "/var/tmp", "/var/cache/distfiles", "/var/cache/binpkgs"):
        if tree.is_dir(scratch) and not tree.is_symlink(scratch):
            tree.empty(scratch)
