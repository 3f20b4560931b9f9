"""Configure the unpacked tree: what every image needs, then the console or cloud-init variant.

Pure file edits happen from the host; enabling and disabling services runs the stage's own
systemctl (or rc-update) in a chroot, so the stage's own rules (aliases, Also=) apply.
"""

from __future__ import annotations

import dataclasses

from imagebuild import services
from imagebuild.chroot import chroot_mounts, chroot_run
from imagebuild.config import Arch, ImageLayout, InitSystem, Variant
from imagebuild.errors import StageError
from imagebuild.log import logger
from imagebuild.render import render
from imagebuild.stagefacts import check_init_files
from imagebuild.tree import Tree


def kernel_cmdline(arch: Arch, variant: Variant) -> str:
    """The last console= becomes /dev/console. The console image keeps Catalyst's order (the
    VGA console gets the init's status output, the serial line the kernel log and a getty);
    the cloud-init image puts the serial line last, as cloud images do, because the serial log
    is what a cloud shows its users and cloud-init reports (its progress, the SSH host keys'
    fingerprints) to /dev/console."""
    if variant == Variant.cloudinit:
        return f"console=tty0 console={arch.serial_console}"
    return f"console={arch.serial_console} console=tty0"


def write_system_files(tree: Tree, arch: Arch, variant: Variant, layout: ImageLayout) -> None:
    """fstab by label, GRUB defaults with serial console, empty machine-id, locale and time zone."""
    tree.write_text("/etc/fstab", render("fstab.j2", **dataclasses.asdict(layout)))
    terminal = "serial console" if arch == Arch.amd64 else "console"
    tree.append_text("/etc/default/grub", render("default-grub.j2", grub_terminal=terminal,
                                                 cmdline=kernel_cmdline(arch, variant)))
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
            off = services.units_present(tree, services.NETWORK_UNITS)
            if off:
                chroot_run(tree, ["systemctl", "disable", *off])
    else:
        enable_serial_getty(tree, arch)
        # dhcpcd handles every interface by itself: 'rc-service dhcpcd start' is all it takes.
        if not services.openrc_service_exists(tree, "dhcpcd"):
            logger.warning("  the stage has no /etc/init.d/dhcpcd: the console image has no DHCP client")
        with chroot_mounts(tree):
            for level, names in sorted(services.runlevels(tree).items()):
                for name in services.openrc_network_services(names):
                    chroot_run(tree, ["rc-update", "--quiet", "del", name, level])


def enable_serial_getty(tree: Tree, arch: Arch) -> None:
    """OpenRC: a login on the serial console through inittab (systemd starts one by itself on
    the console= terminal); the console variant logs root in there, clouds show it to users."""
    tree.write_text(services.INITTAB, services.with_serial_getty(tree.read_text(services.INITTAB),
                                                                 arch.serial_console))


DEFAULT_CLOUD_USER = "gentoo"


def configure_cloudinit(tree: Tree, arch: Arch, init: InitSystem, image_name: str) -> None:
    """cloud-init enabled with the repository's configuration, network and sshd on, all accounts locked."""
    check_init_files(tree, init, Variant.cloudinit)
    lock_all_accounts(tree)
    tree.unlink("/etc/cloud/cloud-init.disabled")
    tree.write_text("/etc/cloud/cloud.cfg.d/90-imagebuild.cfg", render(
        "cloud-init/90-imagebuild.cfg.j2", image_name=image_name, default_user=DEFAULT_CLOUD_USER,
        init=init.value,
    ))
    if init == InitSystem.systemd:
        tree.write_text("/etc/systemd/network/80-imagebuild-dhcp.network", render(
            "dhcp.network.j2", note="Used until cloud-init writes the datasource's network configuration."))
        units = services.units_present(tree, services.CLOUD_INIT_UNITS, vendor_only=True)
        ssh = services.units_present(tree, services.SSH_UNITS, vendor_only=True)
        with chroot_mounts(tree):
            chroot_run(tree, ["systemctl", "enable", "systemd-networkd.service", ssh[0], *units])
        return
    enable_serial_getty(tree, arch)
    with chroot_mounts(tree):
        for name, level in {**services.CLOUD_INIT_OPENRC, **services.CLOUD_OPENRC_SERVICES}.items():
            chroot_run(tree, ["rc-update", "--quiet", "add", name, level])


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
