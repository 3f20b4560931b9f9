"""The package and kernel steps' inputs: read from the spec and command line, checked before
work starts, and hashed into the cache key (imagebuild.emerge)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_options import resolved

from imagebuild import emerge
from imagebuild.build import prune_steps_cache
from imagebuild.config import Arch, KernelKeys
from imagebuild.errors import ConfigError, SpecError, StageError
from imagebuild.tree import Tree

from gentoo_standin import serve


def test_kernel_package_follows_the_config_fragment(tmp_path: Path) -> None:
    config = resolved(tmp_path, "boot/kernel: gentoo\nboot/kernel/gentoo/distkernel: yes\n")
    assert config.portage.kernels == (KernelKeys(name="gentoo", package="sys-kernel/gentoo-kernel-bin"),)
    fragment = tmp_path / "extra.config"
    fragment.write_text("CONFIG_XFS_FS=y\n")
    config = resolved(tmp_path, "boot/kernel: gentoo\nboot/kernel/gentoo/distkernel: yes\n"
                      f"boot/kernel/gentoo/config: {fragment}\nboot/kernel/gentoo/dracut_args: --xz -a qemu\n")
    [kernel] = config.portage.kernels
    assert kernel.package == "sys-kernel/gentoo-kernel" and kernel.config == fragment
    assert kernel.dracut_args == ("--xz", "-a", "qemu")
    config = resolved(tmp_path, "boot/kernel: gentoo\nboot/kernel/gentoo/distkernel: yes\n"
                      "boot/kernel/gentoo/sources: sys-kernel/vanilla-kernel\n")
    assert config.portage.kernels[0].package == "sys-kernel/vanilla-kernel"


def test_a_genkernel_build_is_refused_with_the_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        resolved(tmp_path, "boot/kernel: gentoo\nboot/kernel/gentoo/sources: sys-kernel/gentoo-sources\n")
    assert "my.spec:5" in caught.value.message and "distkernel" in caught.value.message


def test_packages_repo_binhost_and_keyring_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="'--oneshot' is an option"):
        resolved(tmp_path, "diskimage/packages: --oneshot app-editors/nano\n")
    with pytest.raises(ConfigError, match="not an ebuild repository"):
        resolved(tmp_path, "", "--repo", str(tmp_path))
    with pytest.raises(ConfigError, match="--binhost-keyring .* does not exist"):
        resolved(tmp_path, "", "--binhost-keyring", str(tmp_path / "nope.asc"))
    with pytest.raises(ConfigError, match="--binhost ftp://x: must be an http"):
        resolved(tmp_path, "", "--binhost", "ftp://x")
    (tmp_path / "repo/profiles").mkdir(parents=True)
    config = resolved(tmp_path, "diskimage/packages: sys-boot/grub\ndiskimage/use: -bindist\n",
                      "--repo", str(tmp_path / "repo"), "--binhost", "http://127.0.0.1:1/binpkgs/")
    assert config.portage.packages == ("sys-boot/grub",) and config.portage.use == ("-bindist",)
    assert config.portage.repo == tmp_path / "repo" and config.portage.binhost == "http://127.0.0.1:1/binpkgs"


def test_the_cache_key_changes_with_every_input(tmp_path: Path) -> None:
    (tmp_path / "repo/profiles").mkdir(parents=True)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/package.use").write_text("sys-boot/grub -themes\n")
    base = "diskimage/packages: sys-boot/grub\nboot/kernel: gentoo\nboot/kernel/gentoo/distkernel: yes\n" \
           f"portage_confdir: {tmp_path / 'conf'}\n"
    flags = ("--repo", str(tmp_path / "repo"))

    def key(extra: str = "", *more: str, stage: str = "a" * 64) -> str:
        return emerge.steps_key(resolved(tmp_path, base + extra, *flags, *more).portage, Arch.amd64, stage)

    first = key()
    assert key() == first
    assert key(stage="b" * 64) != first
    assert key("diskimage/use: lvm\n") != first
    assert key("boot/kernel/gentoo/dracut_args: --xz\n") != first
    assert key("", "--binhost", "http://127.0.0.1:1/") != first
    (tmp_path / "conf/package.use").write_text("sys-boot/grub themes\n")
    assert key() != first
    (tmp_path / "repo/profiles/repo_name").write_text("gentoo\n")
    assert key() != first


def _vdb(tmp_path: Path, contents: str) -> Tree:
    pkg = tmp_path / "root/var/db/pkg/sys-kernel/gentoo-kernel-bin-6.1.119"
    pkg.mkdir(parents=True)
    (pkg / "CONTENTS").write_text(contents)
    (tmp_path / "root/var/db/pkg/sys-kernel/gentoo-kernel-bin-extras-1").mkdir()
    return Tree(tmp_path / "root")


def test_the_kernel_version_comes_from_the_package_database(tmp_path: Path) -> None:
    tree = _vdb(tmp_path, "dir /usr\ndir /usr/src/linux-6.1.119-gentoo-dist\n"
                "obj /usr/src/linux-6.1.119-gentoo-dist/arch/x86/boot/bzImage 0123 1700000000\n")
    assert emerge.installed_kernel_version(tree, ">=sys-kernel/gentoo-kernel-bin-6.1:6.1") == "6.1.119-gentoo-dist"
    with pytest.raises(StageError, match="no /usr/src/linux-"):
        emerge.installed_kernel_version(tree, "sys-kernel/gentoo-kernel")


def test_the_stage_binhosts_are_read_from_a_file_or_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/portage/binrepos.conf").mkdir(parents=True)
    (root / "etc/portage/binrepos.conf/gentoobinhost.conf").write_text(
        "[gentoobinhost]\npriority = 1\nsync-uri = https://distfiles.gentoo.org/releases/amd64/binpackages/23.0/x86-64\n")
    (root / "etc/portage/binrepos.conf/README").write_text("sync-uri = http://not-a-conf-file/\n")
    assert emerge.binhost_urls(Tree(root)) == [("https://distfiles.gentoo.org/releases/amd64/binpackages/23.0/x86-64",
                                                "/etc/portage/binrepos.conf/gentoobinhost.conf")]


def test_a_binhost_must_answer_before_anything_is_emerged(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good/Packages").write_text("PACKAGES: 0\n")
    with serve(tmp_path) as url:
        emerge.check_binhost(f"{url}/good", "--binhost")
        with pytest.raises(ConfigError) as caught:
            emerge.check_binhost(f"{url}/empty/", "--binhost")
        assert "HTTP 404" in caught.value.message and "--binhost" in (caught.value.hint or "")
    with pytest.raises(ConfigError, match="refused"):
        emerge.check_binhost(url, "/etc/portage/binrepos.conf")


def test_the_steps_cache_keeps_the_most_recently_used_entries_of_each_arch(tmp_path: Path) -> None:
    cache = tmp_path / "portage"
    cache.mkdir()
    for age, name in enumerate(["amd64-a-repo-1", "amd64-b-stage", "amd64-c-snapshot-x", "amd64-d-repo-2",
                                "arm64-e-stage"]):
        for suffix in (".tar.zst", ".emerge.log"):
            (cache / (name + suffix)).write_text(name)
            os.utime(cache / (name + suffix), (1_000_000 - age * 10, 1_000_000 - age * 10))
    (cache / "stage-digests.json").write_text("{}")

    removed = prune_steps_cache(tmp_path, "amd64", 2)

    assert sorted(p.name for p in removed) == ["amd64-c-snapshot-x.tar.zst", "amd64-d-repo-2.tar.zst"]
    assert sorted(p.name for p in cache.iterdir()) == [
        "amd64-a-repo-1.emerge.log", "amd64-a-repo-1.tar.zst", "amd64-b-stage.emerge.log", "amd64-b-stage.tar.zst",
        "arm64-e-stage.emerge.log", "arm64-e-stage.tar.zst", "stage-digests.json"]
    assert prune_steps_cache(tmp_path / "nothing-here", "amd64", 2) == []
