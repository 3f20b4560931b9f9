"""What each init calls the services an image cares about, and how a tree says which are on.

The build (configure) and the audit (inspect) both read this: the console variant's "no
network service" is one list per init, the cloud-init variant's services one list per init.
systemd keeps enabled units as symlinks in ``/etc/systemd/system/*.wants``; OpenRC keeps its
runlevels as symlinks in ``/etc/runlevels/<runlevel>/``, and sysvinit starts the gettys from
``/etc/inittab``.
"""

from __future__ import annotations

import re

from imagebuild.config import InitSystem
from imagebuild.tree import Tree

# Services that put a console image on the network.
NETWORK_UNITS = (
    "ssh.service", "sshd.service", "ssh.socket", "sshd.socket",
    "systemd-networkd.service", "systemd-networkd.socket",
    "NetworkManager.service", "dhcpcd.service",
)
# OpenRC: sshd (Gentoo) or ssh (Debian), the DHCP clients, netifrc's interfaces other than
# the loopback, and the network managers.
NETWORK_OPENRC = ("sshd", "ssh", "dhcpcd", "dhclient", "NetworkManager", "connman")
NETWORK_OPENRC_PATTERN = re.compile(r"net\.(?!lo$).+")

# cloud-init's systemd units changed names across releases (cloud-init-main and
# cloud-init-network since 24.3); an image enables whichever its cloud-init ships.
CLOUD_INIT_UNITS = (
    "cloud-init-main.service", "cloud-init-local.service", "cloud-init-network.service",
    "cloud-init.service", "cloud-config.service", "cloud-final.service",
)
SSH_UNITS = ("sshd.service", "ssh.service")
# Gentoo's app-emulation/cloud-init OpenRC services and the runlevel each belongs in.
CLOUD_INIT_OPENRC = {"cloud-init-local": "boot", "cloud-init": "default", "cloud-config": "default",
                     "cloud-final": "default"}
# What a cloud-init OpenRC image runs besides: sshd, and dhcpcd for the network on every
# ethernet interface (cloud-init has no OpenRC network renderer to rely on).
CLOUD_OPENRC_SERVICES = {"sshd": "default", "dhcpcd": "default"}
# The runlevels a booted OpenRC system passes through (inittab: sysinit, boot, default).
BOOT_RUNLEVELS = ("sysinit", "boot", "default")

def init_of(tree: Tree) -> InitSystem | None:
    """The tree's init: OpenRC when it has openrc (a tree may carry systemd's files beside it), else systemd."""
    if tree.lexists("/sbin/openrc") or tree.lexists("/usr/sbin/openrc"):
        return InitSystem.openrc
    if tree.lexists("/usr/lib/systemd/systemd") or tree.lexists("/lib/systemd/systemd"):
        return InitSystem.systemd
    return None


_UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")


def units_present(tree: Tree, names: tuple[str, ...], *, vendor_only: bool = False) -> list[str]:
    """The systemd units of ``names`` that exist; ``vendor_only`` skips /etc (aliases such as
    Debian's sshd.service -> ssh.service, which systemctl refuses to enable)."""
    dirs = _UNIT_DIRS[1:] if vendor_only else _UNIT_DIRS
    return [n for n in names if any(tree.lexists(f"{d}/{n}") for d in dirs)]


def enabled_units(tree: Tree) -> set[str]:
    """The systemd units that something wants (``/etc/systemd/system/*.wants/*``)."""
    base = "/etc/systemd/system"
    wants = [d for d in tree.glob(base, "*.wants") if tree.is_dir(d)] if tree.is_dir(base) else []
    return {p.rpartition("/")[2] for d in wants for p in tree.glob(d, "*") if tree.is_symlink(p)}


def runlevels(tree: Tree) -> dict[str, set[str]]:
    """Each OpenRC runlevel and the services in it (``/etc/runlevels/<level>/<service>``)."""
    top = "/etc/runlevels"
    if not tree.is_dir(top):
        return {}
    levels = [name for name in tree.listdir(top) if tree.is_dir(f"{top}/{name}") and not tree.is_symlink(f"{top}/{name}")]
    return {level: set(tree.listdir(f"{top}/{level}")) for level in levels}


def openrc_network_services(names: set[str]) -> list[str]:
    return sorted(n for n in names if n in NETWORK_OPENRC or NETWORK_OPENRC_PATTERN.fullmatch(n))


def openrc_service_exists(tree: Tree, name: str) -> bool:
    return tree.is_file(f"/etc/init.d/{name}")


INITTAB = "/etc/inittab"
SERIAL_GETTY_ID = "s0"


def serial_getty_line(tty: str) -> str:
    """The inittab line of the console variant's serial login: Gentoo's commented ``s0`` line,
    turned on at the speed the image's kernel and GRUB use."""
    return f"{SERIAL_GETTY_ID}:12345:respawn:/sbin/agetty -L 115200 {tty} vt100"


def inittab_gettys(text: str) -> dict[str, str]:
    """The active respawning getty lines of an inittab, by the terminal they serve."""
    gettys = {}
    for line in text.splitlines():
        fields = line.strip().split(":", 3)
        if len(fields) != 4 or line.lstrip().startswith("#") or fields[2] != "respawn":
            continue
        words = fields[3].split()
        if words and words[0].rpartition("/")[2] in ("agetty", "getty"):
            terminals = [w for w in words[1:] if re.fullmatch(r"tty\w+|hvc\d+|console", w)]
            if terminals:
                gettys[terminals[0]] = line.strip()
    return gettys


def with_serial_getty(text: str, tty: str) -> str:
    """``text`` (an inittab) with exactly one active getty on ``tty``: lines for it, commented
    or not, give way to :func:`serial_getty_line`, which goes where the first of them was (or
    at the end)."""
    out: list[str] = []
    placed = False
    for line in text.splitlines():
        body = line.lstrip("#").strip()
        fields = body.split(":", 3)
        serves_tty = len(fields) == 4 and re.search(rf"(?<![\w/]){re.escape(tty)}(?!\w)", fields[3])
        taken_id = len(fields) == 4 and fields[0] == SERIAL_GETTY_ID and not line.lstrip().startswith("#")
        if serves_tty or taken_id:
            if not placed:
                out.append(serial_getty_line(tty))
                placed = True
            if not line.lstrip().startswith("#"):
                out.append(f"#{line}  # replaced by imagebuild")
            continue
        out.append(line)
    if not placed:
        out.append(serial_getty_line(tty))
    return "\n".join(out) + "\n"
