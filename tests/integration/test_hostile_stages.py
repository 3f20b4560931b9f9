"""Hostile stages: every path the build touches, made a symlink out of the root, a device node,
a FIFO, the wrong type, or missing — built through the real CLI (tests/hostile.py checks the
host's canaries, leftovers and where every mount, chroot and copy went).

A legal-but-odd stage must build (exit 0) without touching the host; a stage that cannot be
built safely is refused with one message (exit 2).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

import hostile
from hostile import Host, block_device, build, char_device, directory, fifo, file, host, stage_from, symlink

pytestmark = pytest.mark.integration
__all__ = ["host"]  # the fixture, imported for pytest


@pytest.fixture(autouse=True)
def _requirements() -> None:
    hostile.requirements()


def contents(tmp_path: Path) -> str:
    [listing] = (tmp_path / "out").glob("*.CONTENTS.gz")
    return gzip.decompress(listing.read_bytes()).decode()


def odd(tmp_path: Path, base: Path, changes: dict, **kwargs: object) -> Path:
    return stage_from(base, tmp_path / "stage.tar", changes, **kwargs)  # type: ignore[arg-type]


# --- Symlinks out of the root where the build writes: legal, and the host stays as it is ------

# image path -> which canary it points at
WRITTEN_THROUGH = {
    "etc/machine-id": "file",
    "etc/fstab": "file",
    "etc/locale.conf": "file",
    "etc/vconsole.conf": "file",
    "etc/default": "dir",
    "etc/ssh": "dir",
    "etc/systemd/network": "dir",
    "etc/cloud": "dir",
    "root": "dir",
    "tmp": "dir",
    "var/tmp": "dir",
    "var/cache/distfiles": "dir",
    "var/cache/binpkgs": "dir",
    "var/lib/systemd/random-seed": "file",
    "var/lib/dbus/machine-id": "file",
    "usr/lib/grub/x86_64-efi/zstd.mod": "file",
}


@pytest.mark.parametrize("path", sorted(WRITTEN_THROUGH))
def test_symlink_to_the_host_console(tmp_path: Path, host: Host, mini_stage_amd64: Path, path: str) -> None:
    target = getattr(host, WRITTEN_THROUGH[path])
    stage = odd(tmp_path, mini_stage_amd64, {path: symlink(target)})
    if str(target).startswith(f"/{path}/"):
        # /tmp -> /tmp/pytest-.../host/dir leads, inside the image, back to itself.
        assert "a symlink loop" in build(tmp_path, host, stage, expect=2).error
    else:
        build(tmp_path, host, stage, expect=0)


@pytest.mark.parametrize("path", ["etc/cloud/cloud.cfg.d", "etc/ssh", "etc/systemd/network", "root"])
def test_symlink_to_the_host_cloudinit(tmp_path: Path, host: Host, mini_stage_amd64: Path, path: str) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {path: symlink(host.dir)})
    build(tmp_path, host, stage, variant="cloud-init", expect=0)


def test_var_is_a_symlink_to_the_host(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"var": symlink(host.dir)}), expect=0)


def test_relative_symlink_climbing_out(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    # ../../../../.. from /etc/fstab stops at the image's / (as it does when the image runs).
    up = "../" * 30 + str(host.file).lstrip("/")
    build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"etc/fstab": symlink(up)}), expect=0)


def test_shadow_symlink_to_the_host_console(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    # The image's /etc/shadow leads nowhere inside the image: refused, the host's untouched.
    stage = odd(tmp_path, mini_stage_amd64, {"etc/shadow": symlink(host.base / "shadow")})
    result = build(tmp_path, host, stage, expect=2)
    assert "cannot read the image's /etc/shadow" in result.error


def test_shadow_symlink_to_the_host_cloudinit(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"etc/shadow": symlink(host.base / "shadow")})
    result = build(tmp_path, host, stage, variant="cloud-init", expect=2)
    assert "cannot read the image's /etc/shadow" in result.error


# --- /boot: what the ESP is filled from ---------------------------------------------------

def test_boot_file_symlink_to_the_host(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"boot/extra.cfg": symlink(host.file),
                                             "boot/grub": symlink(host.dir)})
    build(tmp_path, host, stage, expect=0)
    listing = contents(tmp_path)
    assert "/boot/extra.cfg" not in listing and "/boot/grub/keep" not in listing
    assert "/boot/EFI/BOOT/BOOTX64.EFI" in listing


def test_boot_symlink_inside_boot_becomes_a_copy(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"boot/vmlinuz": symlink("vmlinuz-6.1.0-57-amd64")})
    build(tmp_path, host, stage, expect=0)
    [line] = [line for line in contents(tmp_path).splitlines() if line.endswith(" /boot/vmlinuz")]
    assert line.startswith("-rw"), line  # FAT has no symlinks: a copy of the kernel


def test_boot_is_a_symlink_to_the_host(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"boot": symlink(host.dir)})
    result = build(tmp_path, host, stage, expect=2)
    assert "no kernel in /boot" in result.error


def test_boot_holds_a_device_node(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"boot/disk": block_device(host.disk)})
    result = build(tmp_path, host, stage, expect=2)
    assert "/boot/disk is a block device" in result.error


def test_boot_holds_a_fifo(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"boot/pipe": fifo()}), expect=2)
    assert "/boot/pipe is a FIFO" in result.error


# --- Mount points of the chroot --------------------------------------------------------------

@pytest.mark.parametrize("path", ["dev", "proc", "sys", "run"])
def test_mount_point_symlink_to_the_host(tmp_path: Path, host: Host, mini_stage_amd64: Path, path: str) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {path: symlink(host.empty)}), expect=2)
    assert f"the image's /{path} is a symlink to {host.empty}, not a directory" in result.error


def test_mount_point_is_a_file(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"proc": file("")}), expect=2)
    assert "the image's /proc is a regular file, not a directory" in result.error


def test_tmp_symlink_to_dev_writes_nothing_on_the_host(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    # /tmp -> /dev: GRUB's scratch directory must not land in the host's /dev (the chroot's
    # /dev is a private tmpfs, and the tree API never crosses into a mount).
    build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"tmp": symlink("/dev")}), expect=2)


# --- Device nodes, FIFOs and wrong types where files are expected --------------------------

def test_fstab_is_the_hosts_disk(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"etc/fstab": block_device(host.disk)})
    result = build(tmp_path, host, stage, expect=2)
    assert "cannot write the image's /etc/fstab: it is a block device, not a regular file" in result.error


def test_fstab_is_a_fifo(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"etc/fstab": fifo()}), expect=2)
    assert "/etc/fstab: it is a FIFO" in result.error


def test_fstab_is_a_directory(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"etc/fstab": directory()}), expect=2)
    assert "/etc/fstab: it is a directory" in result.error


def test_fstab_symlink_loop_is_replaced(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    # What the build writes replaces a symlink, loop or not.
    build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"etc/fstab": symlink("fstab")}), expect=0)
    [line] = [line for line in contents(tmp_path).splitlines() if line.endswith(" /etc/fstab")]
    assert line.startswith("-rw"), line


def test_shadow_symlink_loop(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"etc/shadow": symlink("../etc/shadow")}),
                   expect=2)
    assert "/etc/shadow: a symlink loop" in result.error


def test_shell_symlink_loop(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"usr/bin/sh": symlink("/bin/sh")}), expect=2)
    assert "/bin/sh" in result.error and "symlink loop" in result.error


def test_machine_id_is_a_device(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"etc/machine-id": char_device(1, 3)})
    result = build(tmp_path, host, stage, expect=2)
    assert "/etc/machine-id: it is a character device" in result.error


def test_make_conf_is_the_hosts_disk(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    # Not a regular file, so not a make.conf to add FEATURES to: left alone, never opened.
    stage = odd(tmp_path, mini_stage_amd64, {"etc/portage": directory(),
                                             "etc/portage/make.conf": block_device(host.disk)})
    build(tmp_path, host, stage, expect=0)


def test_etc_default_is_a_file(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"etc/default": file("x")}), expect=2)
    assert "its /etc/default is a regular file" in result.error


@pytest.mark.parametrize("member", [fifo(), char_device(1, 3), directory()], ids=["fifo", "device", "directory"])
def test_shell_is_not_a_program(tmp_path: Path, host: Host, mini_stage_amd64: Path, member: hostile.Member) -> None:
    # A FIFO at /bin/sh must not hang the build: it is never opened.
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"usr/bin/sh": member}), expect=2, timeout=120)
    assert "/bin/sh" in result.error


def test_shell_is_not_elf(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"usr/bin/sh": file("#!/bin/true\n", 0o755)})
    result = build(tmp_path, host, stage, expect=2)
    assert "the stage's /bin/sh is not an ELF program" in result.error


def test_kernel_is_a_symlink_to_the_host(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    # The only kernel leads out of the image: there is no kernel.
    stage = odd(tmp_path, mini_stage_amd64, {"boot/vmlinuz-6.1.0-57-amd64": symlink(host.file)})
    result = build(tmp_path, host, stage, expect=2)
    assert "no kernel in /boot" in result.error


def test_grub_modules_symlink_to_the_host(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"usr/lib/grub/x86_64-efi": symlink(host.dir)})
    result = build(tmp_path, host, stage, expect=2)
    assert "no GRUB modules for x86_64-efi" in result.error


# --- Missing pieces ----------------------------------------------------------------------

def test_no_etc(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"etc": None}), expect=2)
    assert "no /etc/shadow" in result.error


def test_no_shadow_cloudinit(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"etc/shadow": None}),
                   variant="cloud-init", expect=2)
    assert "no /etc/shadow" in result.error


def test_no_root_in_shadow(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    stage = odd(tmp_path, mini_stage_amd64, {"etc/shadow": file("daemon:*:19000:0:99999:7:::\n", 0o640)})
    result = build(tmp_path, host, stage, expect=2)
    assert "has no root entry" in result.error


def test_no_systemd_or_openrc(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"usr/lib/systemd": None}), expect=2)
    assert "cannot tell the stage's init system" in result.error


def test_no_cloud_init(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = build(tmp_path, host, odd(tmp_path, mini_stage_amd64, {"usr/bin/cloud-init": None}),
                   variant="cloud-init", expect=2)
    assert "the stage has no cloud-init" in result.error


def test_deep_tree_builds(tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    # 200 levels: deeper than anything in a stage3, shallower than the unpacker's limit.
    deep = {"/".join(["var/deep"] + ["d"] * i): directory() for i in range(1, 200)}
    build(tmp_path, host, odd(tmp_path, mini_stage_amd64, deep), expect=0)


# --- Full filesystems before the first write ----------------------------------------------

@pytest.fixture
def full_fs():  # type: ignore[no-untyped-def]
    """A tmpfs (outside tmp_path, so the harness's own mount check stays meaningful) filled up."""
    import subprocess
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ib-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64", "tmpfs", str(path)], check=True)
    (path / "filler").write_bytes(b"\0" * (200 << 10))
    try:
        (path / "filler2").write_bytes(b"\0" * (256 << 10))
    except OSError:
        pass  # full, as wanted
    yield path
    subprocess.run(["umount", str(path)], check=False)
    path.rmdir()


def test_work_filesystem_full(full_fs: Path, tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    result = hostile.run_cli(tmp_path, host, "build", "amd64", "console", "--stage", mini_stage_amd64, "--no-test",
                             "-o", tmp_path / "out", "--work-dir", full_fs / "work", expect=2, allowed=[full_fs])
    assert "--work-dir" in result.error
    assert sorted(p.name for p in full_fs.iterdir()) == ["filler", "filler2"] or \
        [p.name for p in (full_fs / "work").iterdir()] == []


def test_output_filesystem_full(full_fs: Path, tmp_path: Path, host: Host, mini_stage_amd64: Path) -> None:
    out = full_fs / "out"
    out.mkdir()
    result = hostile.run_cli(tmp_path, host, "build", "amd64", "console", "--stage", mini_stage_amd64, "--no-test",
                             "-o", out, "--work-dir", tmp_path / "work", expect=2, allowed=[full_fs])
    assert str(out) in result.error
    assert list(out.iterdir()) == [], "nothing half-written in the full output directory"
