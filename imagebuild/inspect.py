"""``imagebuild inspect``: audit a finished image without booting it, and without writing to it.

Each check is a named result, reported as a table and as JSON; any failure makes the run fail.
"""

from __future__ import annotations

import dataclasses
import json
import re
import stat
import struct
from pathlib import Path

from imagebuild import services
from imagebuild.config import Arch, InitSystem, Variant
from imagebuild.disk import DPS_ROOT_TYPE
from imagebuild.hygiene import HISTORY_FILES
from imagebuild.imagefs import DEFAULT_WORK_DIR, OpenedImage, open_image
from imagebuild.tree import Tree

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_FS_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# PE/COFF machine field of an EFI executable, per architecture.
_PE_MACHINE = {Arch.amd64: 0x8664, Arch.arm64: 0xAA64, Arch.riscv64: 0x5064}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclasses.dataclass
class Report:
    image: str
    arch: str
    variant: str
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> str:
        return json.dumps({"image": self.image, "arch": self.arch, "variant": self.variant,
                           "passed": self.passed, "checks": [dataclasses.asdict(c) for c in self.checks]},
                          indent=2) + "\n"

    def table(self) -> str:
        width = max(len(c.name) for c in self.checks)
        rows = [f"{'ok  ' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in self.checks]
        verdict = "all checks passed" if self.passed else f"{len(self.failed())} check(s) FAILED"
        return "\n".join([f"{self.image} ({self.arch} {self.variant})", *rows, verdict])


def _check(name: str, passed: bool, good: str, bad: str) -> Check:
    return Check(name, passed, good if passed else bad)


def _partition_checks(img: OpenedImage, arch: Arch) -> list[Check]:
    esp, root = img.partitions[0], img.partitions[1]
    esp_fs, root_fs = img.blkid(esp), img.blkid(root)
    return [
        _check("gpt-layout", len(img.partitions) == 2, f"GPT, {img.sector_size}-byte sectors, 2 partitions",
               f"expected 2 partitions, found {len(img.partitions)}"),
        _check("esp-partition", esp.type == ESP_TYPE and esp.name == "gentooefi",
               "partition 1 is the ESP, named gentooefi", f"partition 1: type {esp.type}, name '{esp.name}'"),
        _check("esp-filesystem", esp_fs.get("TYPE") == "vfat" and esp_fs.get("LABEL") == "gentooefi",
               "FAT, label gentooefi", f"{esp_fs.get('TYPE')} labelled '{esp_fs.get('LABEL')}'"),
        _check("root-partition", root.type in (DPS_ROOT_TYPE[arch], LINUX_FS_TYPE) and root.name == "gentooroot",
               f"partition 2 is the {arch.value} root, named gentooroot",
               f"partition 2: type {root.type}, name '{root.name}'"),
        _check("root-filesystem", root_fs.get("TYPE") == "xfs" and root_fs.get("LABEL") == "gentooroot",
               "XFS, label gentooroot", f"{root_fs.get('TYPE')} labelled '{root_fs.get('LABEL')}'"),
    ]


def _fstab_check(img: OpenedImage) -> Check:
    tree = Tree(img.root)
    entries = {}
    if tree.is_file("/etc/fstab"):
        for line in tree.read_text("/etc/fstab").splitlines():
            fields = line.split()
            if len(fields) >= 3 and not fields[0].startswith("#"):
                entries[fields[1]] = (fields[0], fields[2])
    labels = {img.blkid(p).get("LABEL") for p in img.partitions[:2]}
    want = {"/": ("LABEL=gentooroot", "xfs"), "/boot": ("LABEL=gentooefi", "vfat")}
    ok = all(entries.get(mount) == spec for mount, spec in want.items()) and {"gentooroot", "gentooefi"} <= labels
    return _check("fstab-labels", ok, "fstab mounts / and /boot by the partitions' labels",
                  f"fstab has {entries.get('/')} for / and {entries.get('/boot')} for /boot; labels {sorted(map(str, labels))}")


def _boot_checks(img: OpenedImage, arch: Arch) -> list[Check]:
    files = set(img.esp_list())
    binary = f"/EFI/BOOT/{arch.efi_binary}"
    machine = None
    if binary in files:
        data = img.esp_read(binary)
        if data[:2] == b"MZ" and len(data) > 0x40:
            pe = struct.unpack_from("<I", data, 0x3C)[0]
            if data[pe:pe + 4] == b"PE\0\0":
                machine = struct.unpack_from("<H", data, pe + 4)[0]
    checks = [_check("grub-efi-binary", machine == _PE_MACHINE[arch], f"{binary} is an EFI executable for {arch.value}",
                     f"{binary} missing or not an {arch.value} PE executable (machine {machine})")]
    config = img.esp_read("/grub/grub.cfg").decode(errors="replace") if "/grub/grub.cfg" in files else ""
    referenced = re.findall(r"^\s*(?:linux|initrd)\s+(\S+)", config, re.MULTILINE)
    missing = [path for path in referenced if path not in files]
    checks.append(_check("grub-cfg-kernel", bool(referenced) and not missing,
                         f"grub.cfg boots {', '.join(referenced)}, all present on the ESP",
                         "no grub.cfg with a kernel" if not referenced else f"grub.cfg names missing {missing}"))
    return checks


def _hygiene_checks(img: OpenedImage, *, keep_caches: bool) -> list[Check]:
    # Read as the image sees itself: its absolute symlinks lead to its own /, never the host's.
    tree = Tree(img.root)
    machine_id = tree.stat("/etc/machine-id")
    keys = sorted(p.rpartition("/")[2] for p in tree.glob("/etc/ssh", "ssh_host_*"))
    homes = ["/root", *(h for h in tree.glob("/home", "*") if tree.is_dir(h))]
    histories = [f"{h}/{n}" for h in homes for n in HISTORY_FILES if tree.lexists(f"{h}/{n}")]
    scratch = [d for d in ("/tmp", "/var/tmp") if tree.is_dir(d) and tree.listdir(d)]
    caches = [d for d in ("/var/cache/distfiles", "/var/cache/binpkgs") if tree.is_dir(d) and tree.listdir(d)]
    checks = [
        _check("machine-id-empty", machine_id is not None and stat.S_ISREG(machine_id.st_mode)
               and machine_id.st_size == 0,
               "/etc/machine-id is empty (made at first boot)", "/etc/machine-id is missing or not empty"),
        _check("no-ssh-host-keys", not keys, "no SSH host keys", f"SSH host keys in the image: {', '.join(keys)}"),
        _check("no-shell-history", not histories, "no shell history", f"history files: {', '.join(histories)}"),
        _check("empty-scratch", not scratch, "/tmp and /var/tmp are empty", f"not empty: {', '.join(scratch)}"),
    ]
    if not keep_caches:
        checks.append(_check("no-package-caches", not caches, "no distfiles or binary packages",
                             f"not empty: {', '.join(caches)}"))
    return checks


def _shadow(tree: Tree) -> dict[str, str]:
    text = tree.read_text("/etc/shadow") if tree.is_file("/etc/shadow") else ""
    return {f[0]: f[1] for f in (line.split(":") for line in text.splitlines()) if len(f) > 1}


def _network_services(tree: Tree, init: InitSystem) -> list[str]:
    """The network services that start at boot, as ``name`` (systemd) or ``runlevel/name``."""
    if init == InitSystem.systemd:
        return sorted(services.enabled_units(tree) & set(services.NETWORK_UNITS))
    levels = services.runlevels(tree)
    return [f"{level}/{name}" for level in services.BOOT_RUNLEVELS
            for name in services.openrc_network_services(levels.get(level, set()))]


def _openrc_checks(tree: Tree, arch: Arch, variant: Variant) -> list[Check]:
    text = tree.read_text(services.INITTAB) if tree.is_file(services.INITTAB) else ""
    getty = services.inittab_gettys(text).get(arch.serial_console)
    checks = [_check("openrc-serial-getty", getty is not None,
                     f"inittab: {getty}", f"no getty on {arch.serial_console} in /etc/inittab")]
    if variant == Variant.console:
        return checks
    levels = services.runlevels(tree)
    wanted = {**services.CLOUD_INIT_OPENRC, **services.CLOUD_OPENRC_SERVICES}
    missing = [f"{name} in {level}" for name, level in wanted.items() if name not in levels.get(level, set())]
    return [*checks, _check("openrc-cloudinit-services", not missing,
                   ", ".join(f"{n} ({lvl})" for n, lvl in wanted.items()),
                   f"missing from their runlevels: {', '.join(missing)}")]


def _variant_checks(img: OpenedImage, arch: Arch, variant: Variant) -> list[Check]:
    tree = Tree(img.root)
    shadow = _shadow(tree)
    init = services.init_of(tree)
    checks = [_check("init-system", init is not None, f"init: {init.value if init else ''}",
                     "neither systemd nor OpenRC is in the image")]
    if variant == Variant.console:
        network = _network_services(tree, init) if init else []
        checks += [
            _check("console-root-empty-password", shadow.get("root") == "", "root has an empty password",
                   "root's password is not empty (a hash or lock is set)" if "root" in shadow else "no root in /etc/shadow"),
            _check("console-no-network-service", not network, "no network service enabled",
                   f"enabled: {', '.join(network)}"),
        ]
    else:
        unlocked = sorted(user for user, pw in shadow.items() if not pw.startswith(("!", "*")))
        checks.append(_check("cloudinit-accounts-locked", bool(shadow) and not unlocked, "every account is locked",
                             f"accounts with a usable password: {', '.join(unlocked)}"))
    if init == InitSystem.openrc:
        checks += _openrc_checks(tree, arch, variant)
    return checks


def inspect_image(image: Path, arch: Arch, variant: Variant, *, keep_caches: bool = False,
                  work_dir: Path = DEFAULT_WORK_DIR, allow_backing_file: bool = False,
                  raw: Path | None = None) -> Report:
    """The audit of ``image`` (``raw``: the raw image it was just converted from, see open_image)."""
    with open_image(image, work_dir, allow_external=allow_backing_file, raw=raw) as img:
        checks = [
            *_partition_checks(img, arch),
            _fstab_check(img),
            *_boot_checks(img, arch),
            *_hygiene_checks(img, keep_caches=keep_caches),
            *_variant_checks(img, arch, variant),
        ]
    return Report(image=image.name, arch=arch.value, variant=variant.value, checks=checks)
