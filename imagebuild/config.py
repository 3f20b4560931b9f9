"""Typed settings: the enums every module shares and the resolved, frozen build settings."""

from __future__ import annotations

import dataclasses
import enum
import platform
import re
from collections.abc import Mapping
from pathlib import Path

from imagebuild.errors import ConfigError


class Arch(enum.StrEnum):
    amd64 = "amd64"
    arm64 = "arm64"
    riscv64 = "riscv64"

    @classmethod
    def parse(cls, text: str) -> Arch:
        """An architecture by imagebuild's name or Gentoo's (``riscv``, ``rv64_lp64d``)."""
        try:
            return cls(_GENTOO_ALIASES.get(text, text))
        except ValueError:
            raise ConfigError(
                f"unknown architecture '{text}'",
                hint=f"use one of: {', '.join(a.value for a in cls)}",
            ) from None

    @classmethod
    def host(cls) -> Arch | None:
        """The architecture of this machine (None: one imagebuild does not build for)."""
        return next((arch for arch in cls if arch.uname == platform.machine()), None)

    @property
    def uname(self) -> str:
        """What ``uname -m`` prints on this architecture."""
        return _ARCH_FACTS[self].uname

    @property
    def grub_target(self) -> str:
        return _ARCH_FACTS[self].grub_target

    @property
    def efi_binary(self) -> str:
        """The removable-media path name UEFI firmware boots without NVRAM entries."""
        return _ARCH_FACTS[self].efi_binary

    @property
    def serial_console(self) -> str:
        return _ARCH_FACTS[self].serial_console

    @property
    def qemu_system(self) -> str:
        return f"qemu-system-{self.uname}"

    @property
    def debian(self) -> str:
        return _ARCH_FACTS[self].debian

    @property
    def gentoo(self) -> str:
        """How Gentoo names the architecture in its files (``di-rv64_lp64d-console.qcow2``)."""
        return _ARCH_FACTS[self].gentoo

    @property
    def gentoo_dir(self) -> str:
        """Gentoo's directory for the architecture on its mirrors (``releases/riscv/``)."""
        return _ARCH_FACTS[self].gentoo_dir

    @property
    def kernel_image(self) -> str:
        """Where a distribution kernel's image is below /usr/src/linux-VERSION (Catalyst's
        kmerge.sh, distkmerge_get_image_path): what dracut is given as --kernel-image."""
        return _ARCH_FACTS[self].kernel_image


@dataclasses.dataclass(frozen=True)
class _ArchFacts:
    uname: str
    grub_target: str
    efi_binary: str
    serial_console: str
    debian: str
    gentoo: str
    gentoo_dir: str
    kernel_image: str


# One row per architecture. QEMU's riscv64 "virt" board has an NS16550 UART, as PCs do
# (ttyS0); arm64's has a PL011 (ttyAMA0).
_ARCH_FACTS = {
    Arch.amd64: _ArchFacts("x86_64", "x86_64-efi", "BOOTX64.EFI", "ttyS0", "amd64", "amd64", "amd64",
                           "arch/x86/boot/bzImage"),
    Arch.arm64: _ArchFacts("aarch64", "arm64-efi", "BOOTAA64.EFI", "ttyAMA0", "arm64", "arm64", "arm64",
                           "arch/arm64/boot/Image.gz"),
    Arch.riscv64: _ArchFacts("riscv64", "riscv64-efi", "BOOTRISCV64.EFI", "ttyS0", "riscv64", "rv64_lp64d", "riscv",
                             "arch/riscv/boot/Image.gz"),
}
# Gentoo's names for an architecture: its keyword/mirror directory and the subarch of releng's
# specs (releases/specs-qemu/riscv/*.spec say "subarch: rv64_lp64d").
_GENTOO_ALIASES = {"riscv": "riscv64", "rv64_lp64d": "riscv64"}


class Variant(enum.StrEnum):
    console = "console"
    cloudinit = "cloud-init"

    @classmethod
    def parse(cls, text: str) -> Variant:
        # Catalyst accepts both spellings (diskimagefs-update.sh: "cloud-init|cloudinit").
        if text == "cloudinit":
            return cls.cloudinit
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(
                f"unknown image variant '{text}'",
                hint=f"use one of: {', '.join(v.value for v in cls)}",
            ) from None

    @property
    def file_part(self) -> str:
        """How Gentoo spells the variant in file names (di-amd64-cloudinit.qcow2)."""
        return self.value.replace("-", "")


class Compression(enum.StrEnum):
    zlib = "zlib"
    zstd = "zstd"


class InitSystem(enum.StrEnum):
    systemd = "systemd"
    openrc = "openrc"


class Companion(enum.StrEnum):
    """The files published beside an image, each named ``<image file name><suffix>``."""

    contents = ".CONTENTS.gz"
    digests = ".DIGESTS"
    manifest = ".manifest.json"
    inspect = ".inspect.json"
    smoke_json = ".smoke.json"
    smoke_xml = ".smoke.xml"
    console_log = ".console.log"
    qemu_log = ".qemu.log"
    screenshot = ".screen.png"
    build_log = ".build.log"
    emerge_log = ".emerge.log"

    def of(self, image: Path, directory: Path | None = None) -> Path:
        """This companion of ``image``, beside it or in ``directory``."""
        return (directory or image.parent) / (image.name + self.value)


# What a stage tarball may be called (unpack also tells the compression by the content).
STAGE_SUFFIXES = (".tar", ".tar.xz", ".tar.zst", ".tar.gz", ".tar.bz2", ".tgz", ".txz")


def strip_stage_suffix(name: str) -> str:
    """``stage3-amd64-openrc-20261124T000000Z.tar.xz`` -> ``stage3-amd64-openrc-20261124T000000Z``."""
    suffix = next((s for s in sorted(STAGE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), "")
    return name.removesuffix(suffix) if suffix else name


# The stage sources that name an offline stand-in (imagebuild.standin), and the init of each.
STANDIN_SOURCES = {"standin": InitSystem.systemd, "standin-systemd": InitSystem.systemd,
                   "standin-openrc": InitSystem.openrc}


@dataclasses.dataclass(frozen=True)
class ImageKind:
    """A variant on an init: what one published image is, apart from its architecture.

    Gentoo publishes systemd images (``console``, ``cloud-init``); the OpenRC ones carry the
    init in their names (``console-openrc``, file part ``console-openrc``, ``cloudinit-openrc``).
    """

    variant: Variant
    init: InitSystem = InitSystem.systemd

    @classmethod
    def parse(cls, text: str) -> ImageKind:
        name, dash, init = text.rpartition("-")
        if dash and init in (i.value for i in InitSystem):
            return cls(Variant.parse(name), InitSystem(init))
        try:
            return cls(Variant.parse(text))
        except ConfigError:
            raise ConfigError(
                f"unknown image variant '{text}'",
                hint="use console or cloud-init, optionally with -openrc (console-openrc)",
            ) from None

    @property
    def suffix(self) -> str:
        return "" if self.init == InitSystem.systemd else f"-{self.init.value}"

    @property
    def file_part(self) -> str:
        """How the image's file and pointer names spell it: cloudinit, console-openrc."""
        return self.variant.file_part + self.suffix

    def __str__(self) -> str:
        return self.variant.value + self.suffix


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse a parted/Catalyst-style size (``20GiB``, ``20G``, ``512MiB``, ``4096``) into bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"cannot read {what} '{text}'",
            hint="write a number with an optional unit, for example 20GiB, 20G or 512MiB",
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


MiB = 1024**2
GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Geometry and labels of the disk image (Gentoo's published layout by default)."""

    size: int = 20 * GiB
    esp_size: int = 512 * MiB
    sector_size: int = 512
    esp_label: str = "gentooefi"
    root_label: str = "gentooroot"
    root_fstype: str = "xfs"

    def validate(self) -> None:
        if self.sector_size not in (512, 4096):
            raise ConfigError(
                f"unsupported sector size {self.sector_size}", hint="use 512 or 4096"
            )
        if self.root_fstype != "xfs":
            raise ConfigError(
                f"unsupported root filesystem type '{self.root_fstype}'",
                hint="imagebuild makes XFS roots, as Gentoo's images have (diskimage/qcow2_roottype: xfs)",
            )
        if self.esp_size < 64 * MiB:
            raise ConfigError(
                f"EFI system partition of {self.esp_size // MiB} MiB is too small",
                hint="use at least 64MiB (Gentoo uses 512MiB)",
            )
        # FAT32 needs at least 65525 clusters, and a cluster is at least a sector: with
        # 4096-byte sectors that is 256 MiB of clusters plus the FATs.
        if self.sector_size == 4096 and self.esp_size < 260 * MiB:
            raise ConfigError(
                f"EFI system partition of {self.esp_size // MiB} MiB is too small for FAT32 "
                "with 4096-byte sectors",
                hint="use at least 260MiB (Gentoo uses 512MiB)",
            )
        if self.size < self.esp_size + 300 * MiB:
            raise ConfigError(
                f"image size {self.size // MiB} MiB leaves no room for a root filesystem",
                hint="make diskimage/qcow2_size (or --size) larger; Gentoo uses 20GiB",
            )


@dataclasses.dataclass(frozen=True)
class Stage2Keys:
    """Catalyst's diskimage-stage2 keys of a spec, checked (imagebuild.stage2 reads and applies
    them); ``where`` names each key's file:line for a later message."""

    fsscript: Path | None = None
    rcadd: tuple[tuple[str, str], ...] = ()  # (service, runlevel)
    rcdel: tuple[tuple[str, str], ...] = ()
    unmerge: tuple[str, ...] = ()
    depclean: bool = True
    rm: tuple[str, ...] = ()
    empty: tuple[str, ...] = ()
    where: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def in_chroot(self) -> bool:
        return bool(self.fsscript or self.rcadd or self.rcdel or self.unmerge)


@dataclasses.dataclass(frozen=True)
class KernelKeys:
    """One ``boot/kernel`` entry of a spec: Catalyst's distkernel (diskimage-stage2's kernel step)."""

    name: str
    package: str  # the atom to emerge: boot/kernel/NAME/sources, else the distribution kernel
    dracut_args: tuple[str, ...] = ()
    config: Path | None = None  # a kernel config fragment on this host (boot/kernel/NAME/config)


@dataclasses.dataclass(frozen=True)
class SnapshotSource:
    """Where the ebuild repository comes from when neither --repo nor the stage has one: the
    mirror's snapshot, checked with the keyring and trusted keys of the stage3."""

    url: str
    keyring: Path | None
    trusted_keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PortageKeys:
    """What the package and kernel steps need: Catalyst's diskimage-stage1 keys (packages, USE,
    profile, portage_confdir), the spec's kernels, and where emerge gets its ebuilds and binary
    packages (imagebuild.emerge runs them)."""

    packages: tuple[str, ...] = ()
    use: tuple[str, ...] = ()
    profile: str | None = None
    confdir: Path | None = None
    kernels: tuple[KernelKeys, ...] = ()
    repo: Path | None = None  # --repo: an ebuild repository, bind-mounted read-only
    binhost: str | None = None  # --binhost: instead of the stage's binrepos.conf
    binhost_keyring: Path | None = None  # the key(s) that sign that binhost
    snapshot: SnapshotSource | None = None
    where: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def emerges(self) -> bool:
        """Whether the spec asks for packages (a stage without a kernel also needs the kernels)."""
        return bool(self.packages)


@dataclasses.dataclass(frozen=True)
class StandinStage:
    """The offline Debian-based stand-in stage of ``init`` (imagebuild.standin)."""

    init: InitSystem

    def __str__(self) -> str:
        return f"standin-{self.init.value}"


@dataclasses.dataclass(frozen=True)
class MirrorStage:
    """The newest stage3 of ``flavour`` on a Gentoo mirror, its signed DIGESTS checked."""

    url: str
    flavour: str  # e.g. amd64-nomultilib-systemd
    keyring: Path | None  # None: the Gentoo release key's usual places
    trusted_keys: tuple[str, ...]  # primary fingerprints whose signatures count
    allow_older: bool = False  # accept a pointer older than the newest seen (a warning)

    def __str__(self) -> str:
        return f"mirror {self.url} (stage3-{self.flavour})"


@dataclasses.dataclass(frozen=True)
class TarballStage:
    """A stage3 or seed tarball on this machine."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


StageSource = StandinStage | MirrorStage | TarballStage


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything a build needs, resolved and validated before the first step runs."""

    arch: Arch
    variant: Variant
    stage: StageSource
    output_dir: Path
    image_name: str  # e.g. di-amd64-console-20261124T030000Z.qcow2
    stamp: str
    layout: ImageLayout
    # The settings table's (imagebuild.options): no defaults here, resolve.resolve gives them.
    compression: Compression
    smoke_test: bool
    boot_timeout: float
    work_dir: Path
    cache_dir: Path
    spec_path: Path | None = None
    # Catalyst's diskimage-stage2 keys (fsscript, rcadd/rcdel, unmerge, rm, empty), checked.
    stage2: Stage2Keys = Stage2Keys()
    # The package and kernel steps' inputs (diskimage-stage1's keys, boot/kernel, repository, binhost).
    portage: PortageKeys = PortageKeys()
    # The init the spec or the command line expects of the stage (None: whatever it runs).
    init: InitSystem | None = None
    init_source: str = ""  # what said so, for the message when the stage disagrees

    @property
    def image_path(self) -> Path:
        return self.output_dir / self.image_name

    @property
    def kind(self) -> ImageKind:
        """The variant on the init the build expects (systemd when nothing says otherwise)."""
        return ImageKind(self.variant, self.init or InitSystem.systemd)
