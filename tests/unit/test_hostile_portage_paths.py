"""A stage that plants absolute symlinks where the package and kernel steps write (its
binrepos.conf, /var/tmp for the build's keyring, /etc/kernel for the config fragment and the
chroot check's mask) changes nothing on the host, and gets its own entries back afterwards.

The steps' file work runs on a plain directory (no chroot, no emerge): binhost_settings as the
build enters and leaves it, and the kernel step up to its first emerge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagebuild.config import Arch, KernelKeys, PortageKeys
from imagebuild.emerge import _install_kernel, binhost_settings
from imagebuild.tree import Tree

from conftest import require_tools
from gentoo_standin import make_signing_key, stop_gpg_agent

pytestmark = pytest.mark.unit


def _snapshot(directory: Path) -> dict[str, bytes | str]:
    """Every entry below ``directory``: a file's bytes, a symlink's target, a directory's mark."""
    seen: dict[str, bytes | str] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        seen[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return seen


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Tree, Path]:
    """A tree whose Portage and kernel paths are absolute symlinks to a 'host' directory."""
    host = tmp_path / "host"
    (host / "etc/portage").mkdir(parents=True)
    (host / "etc/portage/binrepos.conf").write_text("[host]\nsync-uri = https://host.example/\n")
    (host / "var/tmp").mkdir(parents=True)
    (host / "etc/kernel/install.d").mkdir(parents=True)
    (host / "etc/kernel/install.d/05-check-chroot.install").write_text("#!/bin/sh\nexit 1  # the host's own\n")
    root = tmp_path / "root"
    (root / "etc/portage").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "etc/portage/binrepos.conf").symlink_to(host / "etc/portage/binrepos.conf")
    (root / "var/tmp").symlink_to(host / "var/tmp")
    (root / "etc/kernel").symlink_to(host / "etc/kernel")
    return Tree(root), host


def test_the_build_binhost_and_keyring_never_reach_the_host(tmp_path: Path, hostile: tuple[Tree, Path]) -> None:
    require_tools("gpg")
    tree, host = hostile
    before = _snapshot(host)
    _, public = make_signing_key(tmp_path / "signing")
    stop_gpg_agent(tmp_path / "signing")
    keys = PortageKeys(binhost="http://127.0.0.1:9", binhost_keyring=public)

    with binhost_settings(tree, keys) as env:
        assert _snapshot(host) == before, "the build's binhost or keyring went through a symlink"
        assert "sync-uri = http://127.0.0.1:9" in tree.read_text("/etc/portage/binrepos.conf")
        assert not tree.is_symlink("/etc/portage/binrepos.conf")
        home = env["BINPKG_GPG_VERIFY_GPG_HOME"]
        assert tree.is_file(f"{home}/pubring.kbx") and tree.is_file(f"{home}/trustdb.gpg")
        assert Path(tree.host_path(f"{home}/pubring.kbx")).is_relative_to(tree.root)

    assert _snapshot(host) == before
    assert os.readlink(tree.root / "etc/portage/binrepos.conf") == str(host / "etc/portage/binrepos.conf"), \
        "the stage's own entry is put back as it was"
    assert not tree.lexists(home)


def test_the_kernel_step_writes_inside_the_tree_and_unmasks_on_failure(tmp_path: Path,
                                                                       hostile: tuple[Tree, Path]) -> None:
    tree, host = hostile
    before = _snapshot(host)
    fragment = tmp_path / "dist.config"
    fragment.write_text("CONFIG_XFS_FS=y\n")
    kernel = KernelKeys(name="gentoo", package="sys-kernel/gentoo-kernel", config=fragment)

    class Refused(Exception):
        pass

    def emerge(args: list[str], **_: object) -> None:
        assert _snapshot(host) == before, "the config fragment or the mask went through /etc/kernel"
        assert tree.read_text("/etc/kernel/config.d/gentoo.config") == "CONFIG_XFS_FS=y\n"
        assert tree.read_text("/etc/kernel/install.d/05-check-chroot.install") == "", "masked while emerge runs"
        raise Refused  # as a failed emerge of dracut would

    emerge.log = tmp_path / "emerge.log"  # type: ignore[attr-defined]
    with pytest.raises(Refused):
        _install_kernel(tree, kernel, Arch.amd64, emerge)  # type: ignore[arg-type]
    assert _snapshot(host) == before
    assert Path(tree.host_path("/etc/kernel/config.d/gentoo.config")).is_relative_to(tree.root)
    assert not tree.lexists("/etc/kernel/install.d/05-check-chroot.install"), "the mask goes, even on failure"
