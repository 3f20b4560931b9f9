"""Stage1 (Catalyst's diskimage-stage1): emerge the package set in a chroot, pack a seed.

What Catalyst's steps look like from inside the chroot: the arguments, environment, mounts
and configuration emerge is given. (test_portage_build and test_releng_pair run real Portage.)
The stage is a tiny real tree (the host's static busybox for
amd64; dash and glibc taken from the cached arm64 stand-in stage for arm64) whose ``emerge``
is a shell script the test installs: it records its arguments, environment, working
directory and what it could see, to a file inside the tree. The chroot, the mounts, the
binfmt path for arm64 and the argument construction are real; only Portage is absent.
"""

from __future__ import annotations

import os
import shlex
import struct
import subprocess
from pathlib import Path

import pytest

from imagebuild.config import Arch
from imagebuild.errors import ConfigError, SpecError, StageError
from imagebuild.seed import build_seed
from imagebuild.spec import load_spec
from imagebuild.unpack import unpack_stage

from conftest import CACHE_DIR, _standin, missing, mounts_under, require_root, require_tools
from gentoo_standin import serve

pytestmark = pytest.mark.integration

FAKE_EMERGE = r"""#!/bin/sh
# Fake emerge installed by imagebuild's tests (Portage cannot run here): it records how it
# was called. Shell builtins only, so it runs on a tree that holds nothing but a shell.
{
    echo "=== emerge"
    echo "cwd=$(pwd)"
    for arg in "$@"; do echo "arg=$arg"; done
    export -p | while IFS= read -r line; do echo "env:$line"; done
    if [ -e /etc/resolv.conf ]; then echo "seen=resolv.conf"; fi
    if [ -e /proc/self/mountinfo ]; then echo "seen=proc"; fi
    if [ -e /dev/null ]; then echo "seen=dev"; fi
    if [ -e /var/db/repos/gentoo/profiles/repo_name ]; then echo "seen=repository"; fi
    if [ -e /etc/portage/binrepos.conf ]; then while IFS= read -r line; do echo "binrepos:$line"; done < /etc/portage/binrepos.conf; fi
    if (: > /var/db/repos/gentoo/.probe) 2>/dev/null; then echo "seen=repository-writable"; fi
    if (: > /var/cache/binpkgs/fake-emerge-was-here) 2>/dev/null; then echo "seen=binpkgs-writable"; fi
    while IFS= read -r line; do echo "make.conf:$line"; done < /etc/portage/make.conf
} >> /root/fake-emerge.log
case " $* " in *" fail/me "*) echo "fake emerge: failing as asked" >&2; exit 1 ;; esac
exit 0
"""
STAGE_MAKE_CONF = 'COMMON_FLAGS="-O2 -pipe"\nUSE="from-the-stage"\n'
BUSYBOX_APPLETS = ("sh", "cat", "env", "ls", "mkdir", "rm", "touch", "pwd", "echo", "printf", "id")
ARM64_USERLAND = (  # what dash needs: the loader and libc (Debian's merged-/usr layout)
    "./bin", "./lib", "./sbin", "./usr/bin/dash", "./usr/bin/sh", "./usr/lib/ld-linux-aarch64.so.1",
    "./usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1", "./usr/lib/aarch64-linux-gnu/libc.so.6",
)
EM_X86_64, EM_AARCH64 = 62, 183


def elf_info(path: Path) -> tuple[int, bool]:
    """(e_machine, statically linked) of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    return machine, 3 not in types  # PT_INTERP: a dynamic loader is needed


def add_userland(tree: Path, arch: Arch) -> None:
    """A shell for ``arch`` in ``tree``: static busybox (amd64) or dash + glibc (arm64)."""
    if arch == Arch.amd64:
        busybox = Path("/bin/busybox")
        if not busybox.is_file() or elf_info(busybox) != (EM_X86_64, True):
            missing("a static x86-64 /bin/busybox is needed (Debian: apt-get install busybox-static)")
        (tree / "usr/bin").mkdir(parents=True, exist_ok=True)
        (tree / "usr/bin/busybox").write_bytes(busybox.read_bytes())
        (tree / "usr/bin/busybox").chmod(0o755)
        for applet in BUSYBOX_APPLETS:
            (tree / "usr/bin" / applet).symlink_to("busybox")
        for top in ("bin", "sbin", "lib"):
            (tree / top).symlink_to(f"usr/{top}")
        (tree / "usr/sbin").mkdir()
        (tree / "usr/lib").mkdir()
        return
    # Any cached arm64 stand-in will do (only its shell and libc are taken); without one,
    # build it as the other tests do (mmdebstrap through qemu-user, ~18 min, then cached).
    standins = sorted((CACHE_DIR / "standin").glob("standin-debian-bookworm-arm64-*.tar"))
    if standins:
        standin = standins[-1]
    else:
        standin = _standin(Arch.arm64)
    subprocess.run(["tar", "-xf", standin, "-C", tree, *ARM64_USERLAND], check=True)
    (tree / "usr/sbin").mkdir(exist_ok=True)
    assert elf_info(tree / "usr/bin/dash")[0] == EM_AARCH64


def make_tree(tree: Path, arch: Arch, *, emerge: bool = True) -> Path:
    """A tiny stage tree: a shell, the fake emerge, a make.conf and Catalyst's cleanables."""
    for d in ("etc/portage/package.use", "root", "var/tmp/portage", "proc", "sys", "dev", "run",
              "var/cache"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").mkdir(mode=0o1777)
    add_userland(tree, arch)
    if emerge:
        (tree / "usr/bin/emerge").write_text(FAKE_EMERGE)
        (tree / "usr/bin/emerge").chmod(0o755)
    (tree / "etc/portage/make.conf").write_text(STAGE_MAKE_CONF)
    (tree / "etc/portage/package.use/from-the-stage").write_text("sys-apps/stage-pkg flag\n")
    (tree / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (tree / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (tree / "etc/passwd-").write_text("root:x:0:0::/root:/bin/sh\n")
    (tree / "var/tmp/portage/leftover").write_text("build scratch\n")
    return tree


def make_stage(tmp_path: Path, arch: Arch, *, emerge: bool = True) -> Path:
    tree = make_tree(tmp_path / f"tree-{arch.value}", arch, emerge=emerge)
    stage = tmp_path / f"stage3-{arch.value}.tar"
    subprocess.run(["tar", "--numeric-owner", "-C", tree, "-cf", stage, "."], check=True)
    return stage


def make_repo(tmp_path: Path) -> Path:
    """The smallest thing that is an ebuild repository: profiles/repo_name."""
    repo = tmp_path / "gentoo-repo"
    (repo / "profiles").mkdir(parents=True)
    (repo / "profiles/repo_name").write_text("gentoo\n")
    return repo


def write_spec(tmp_path: Path, arch: Arch, *, target: str = "diskimage-stage1", extra: str = "",
               packages: str = "\tapp-editors/nano\n\tsys-fs/xfsprogs\n") -> Path:
    confdir = tmp_path / "portage-confdir"
    (confdir / "package.use").mkdir(parents=True, exist_ok=True)
    (confdir / "package.use/installkernel").write_text("sys-kernel/installkernel dracut grub\n")
    (confdir / "package.license").write_text("sys-kernel/linux-firmware linux-fw-redistributable\n")
    spec = tmp_path / f"diskimage-stage1-{arch.value}.spec"
    spec.write_text(
        f"subarch: {arch.value}\n"
        f"target: {target}\n"
        "version_stamp: console-test\n"
        "rel_type: 23.0-default\n"
        f"profile: default/linux/{arch.value}/23.0/systemd\n"
        "snapshot_treeish: 0123abcd\n"
        f"source_subpath: 23.0-default/stage3-{arch.value}-systemd-test\n"
        f"portage_confdir: {confdir}\n"
        f"{extra}"
        "\n"
        "diskimage/use:\n\tcompile-locales\n\tlvm\n"
        "\n"
        f"diskimage/packages:\n{packages}"
    )
    return spec


def read_calls(tree: Path) -> list[dict]:
    calls: list[dict] = []
    for line in (tree / "root/fake-emerge.log").read_text().splitlines():
        if line == "=== emerge":
            calls.append({"args": [], "env": {}, "seen": set(), "make.conf": []})
            continue
        key, _, value = line.partition("=") if not line.startswith(("env:", "make.conf:", "binrepos:")) else \
            line.partition(":")
        call = calls[-1]
        if key == "arg":
            call["args"].append(value)
        elif key == "env":
            words = shlex.split(value)  # export NAME='value'
            if len(words) == 2 and "=" in words[1]:
                name, _, val = words[1].partition("=")
                call["env"][name] = val
        elif key == "seen":
            call["seen"].add(value)
        elif key in ("make.conf", "binrepos"):
            call.setdefault(key, []).append(value)
        else:
            call[key] = value
    return calls


@pytest.fixture
def host_state(tmp_path: Path):
    """Fails the test if it leaves a mount below tmp_path or a loop device behind."""
    require_root()
    require_tools("chroot", "mount", "umount", "tar", "zstd", "xz", "cp")
    yield
    assert mounts_under(tmp_path) == [], "mounts left behind"
    # Other builds may use loop devices meanwhile: only ours (backed by files here) count.
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(tmp_path) not in losetup, "loop devices left behind"


EXPECTED_ENV = {
    "EMERGE_WARNING_DELAY": "0",
    "CLEAN_DELAY": "0",
    "CONFIG_PROTECT": "-*",
    "FEATURES": "-news binpkg-multi-instance clean-logs parallel-install binpkg-request-signature",
    "MAKEOPTS": "-j2 -l2",
    "HOME": "/root",
}


@pytest.mark.parametrize(("arch", "binhost", "suffix"), [
    (Arch.amd64, False, ".tar.zst"),
    (Arch.amd64, True, ".tar.xz"),
    pytest.param(Arch.arm64, False, ".tar.zst", marks=pytest.mark.standin("arm64")),
])
def test_build_seed(tmp_path: Path, host_state: None, arch: Arch, binhost: bool, suffix: str) -> None:
    if arch == Arch.arm64 and not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        missing("binfmt_misc has no qemu-aarch64 handler (Debian: qemu-user-static binfmt-support; ci/setup)")
    stage = make_stage(tmp_path, arch)
    spec = load_spec(write_spec(tmp_path, arch))
    output = tmp_path / "out" / f"seed-{arch.value}{suffix}"
    work = tmp_path / "work"
    (tmp_path / "binhost").mkdir()
    (tmp_path / "binhost/Packages").write_text("PACKAGES: 0\n\n")

    with serve(tmp_path / "binhost") as url:
        assert build_seed(spec, stage, output, arch=arch, work_dir=work, cache_dir=tmp_path / "cache",
                          binhost=url if binhost else None, repo=make_repo(tmp_path), jobs=2) == output

    assert output.is_file() and not list(output.parent.glob(".*partial*"))
    assert output.with_name(f"seed-{arch.value}.emerge.log").is_file(), "emerge's output is kept beside the seed"
    assert list(work.iterdir()) == [], "the workspace must be removed"
    seed = tmp_path / "seed"
    unpack_stage(output, seed)  # what 'imagebuild build --stage SEED' does with it

    [call] = read_calls(seed)
    expected = ["--quiet", "--jobs", "2", "--load-average", "2", *(["--getbinpkg"] if binhost else []),
                "--update", "--deep", "--newuse", "app-editors/nano", "sys-fs/xfsprogs"]
    assert call["args"] == expected
    assert {k: call["env"].get(k) for k in EXPECTED_ENV} == EXPECTED_ENV
    assert "/usr/sbin" in call["env"]["PATH"].split(":")
    assert call["cwd"] == "/"
    # In the chroot: the host's resolv.conf, /proc, /dev, the repository mounted read-only.
    assert {"resolv.conf", "proc", "dev", "repository"} <= call["seen"]
    assert "repository-writable" not in call["seen"]
    # The binhost given is the only one while emerge runs, and is gone from the seed.
    if binhost:
        assert "verify-signature = true" in call["binrepos"] and f"sync-uri = {url}" in call["binrepos"]
    assert not (seed / "etc/portage/binrepos.conf").exists()
    # USE while building: Catalyst's catalyst_use plus diskimage/use, last in make.conf.
    assert call["make.conf"][:2] == STAGE_MAKE_CONF.splitlines()
    assert 'USE="bindist compile-locales diskimage lvm"' in call["make.conf"]

    # The seed: the tree, with the portage_confdir merged in and only diskimage/use kept.
    assert (seed / "usr/bin/emerge").is_file() and (seed / "etc/passwd").is_file()
    if arch == Arch.arm64:
        # The fake emerge ran, so the aarch64 shell really ran here through qemu-user.
        assert elf_info(seed / "usr/bin/dash")[0] == EM_AARCH64
    make_conf = (seed / "etc/portage/make.conf").read_text()
    assert make_conf.startswith(STAGE_MAKE_CONF)
    assert make_conf.rstrip().splitlines()[-2] == 'USE="compile-locales lvm"'
    assert "bindist" not in make_conf
    assert (seed / "etc/portage/package.use/installkernel").read_text() == "sys-kernel/installkernel dracut grub\n"
    assert (seed / "etc/portage/package.use/from-the-stage").is_file(), "the stage's own config stays"
    assert (seed / "etc/portage/package.license").is_file()
    assert os.readlink(seed / "etc/portage/make.profile") == \
        f"../../var/db/repos/gentoo/profiles/default/linux/{arch.value}/23.0/systemd"
    # Catalyst's clean: cleanables and /etc/*- gone; no resolv.conf, no repository mount point.
    assert not os.path.lexists(seed / "etc/resolv.conf")
    assert not (seed / "etc/machine-id").exists() and not (seed / "etc/passwd-").exists()
    assert list((seed / "var/tmp").iterdir()) == [] and list((seed / "tmp").iterdir()) == []
    assert not (seed / "var/db/repos/gentoo").exists()
    assert not (seed / "var/cache/binpkgs/fake-emerge-was-here").exists()


def test_package_cache_is_used_and_stays_outside(tmp_path: Path, host_state: None) -> None:
    """pkgcache_path: Catalyst's --usepkg --buildpkg, with the cache bind-mounted, not packed."""
    pkgcache = tmp_path / "pkgcache"
    spec = load_spec(write_spec(tmp_path, Arch.amd64, extra=f"pkgcache_path: {pkgcache}\n"))
    output = tmp_path / "seed.tar"
    build_seed(spec, make_stage(tmp_path, Arch.amd64), output, arch=Arch.amd64, work_dir=tmp_path / "work",
               cache_dir=tmp_path / "cache", repo=make_repo(tmp_path), jobs=2)
    seed = tmp_path / "seed"
    unpack_stage(output, seed)
    [call] = read_calls(seed)
    assert call["args"] == ["--quiet", "--jobs", "2", "--load-average", "2", "--usepkg", "--buildpkg",
                            "--binpkg-respect-use=y", "--newuse", "--update", "--deep", "--newuse",
                            "app-editors/nano", "sys-fs/xfsprogs"]
    assert (pkgcache / "fake-emerge-was-here").exists()
    assert not (seed / "var/cache/binpkgs/fake-emerge-was-here").exists()


def test_failed_emerge_leaves_nothing(tmp_path: Path, host_state: None) -> None:
    spec = load_spec(write_spec(tmp_path, Arch.amd64, packages="\tapp-editors/nano\n\tfail/me\n"))
    output = tmp_path / "seed.tar.zst"
    with pytest.raises(StageError, match="emerge failed .* while installing diskimage/packages") as failure:
        build_seed(spec, make_stage(tmp_path, Arch.amd64), output, arch=Arch.amd64,
                   work_dir=tmp_path / "work", cache_dir=tmp_path / "cache", repo=make_repo(tmp_path), jobs=2)
    assert "fake emerge: failing as asked" in failure.value.message, "emerge's own words are in the message"
    assert not output.exists() and not list(tmp_path.glob(".seed*"))
    assert list((tmp_path / "work").iterdir()) == []


def test_stage_without_emerge_or_repository(tmp_path: Path, host_state: None) -> None:
    spec = load_spec(write_spec(tmp_path, Arch.amd64))
    stage = make_stage(tmp_path, Arch.amd64, emerge=False)
    with pytest.raises(StageError, match="no /usr/bin/emerge"):
        build_seed(spec, stage, tmp_path / "a.tar", arch=Arch.amd64, work_dir=tmp_path / "work",
                   cache_dir=tmp_path / "cache", repo=make_repo(tmp_path))
    (tmp_path / f"tree-{Arch.amd64.value}").rename(tmp_path / "old-tree")
    stage = make_stage(tmp_path, Arch.amd64)
    with pytest.raises(ConfigError, match="no ebuild repository .* --repo was not given") as failure:
        build_seed(spec, stage, tmp_path / "b.tar", arch=Arch.amd64, work_dir=tmp_path / "work",
                   cache_dir=tmp_path / "cache")
    assert "--repo DIR" in (failure.value.hint or "")
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "b.tar").exists()


def test_spec_errors_name_file_and_line(tmp_path: Path) -> None:
    stage = tmp_path / "never-read.tar"
    wrong = load_spec(write_spec(tmp_path, Arch.amd64, target="diskimage-stage2"))
    with pytest.raises(SpecError, match=rf"{wrong.path}:2: target is 'diskimage-stage2', not diskimage-stage1"):
        build_seed(wrong, stage, tmp_path / "s.tar", arch=Arch.amd64, work_dir=tmp_path / "work",
                   cache_dir=tmp_path / "cache")

    empty = load_spec(write_spec(tmp_path, Arch.amd64, packages="\tnone\n"))
    with pytest.raises(SpecError, match=r":14: the spec has no diskimage/packages"):
        build_seed(empty, stage, tmp_path / "s.tar", arch=Arch.amd64, work_dir=tmp_path / "work",
                   cache_dir=tmp_path / "cache")

    (tmp_path / "nowhere").mkdir()
    gone = write_spec(tmp_path, Arch.amd64)
    gone.write_text(gone.read_text().replace(str(tmp_path / "portage-confdir"), str(tmp_path / "nowhere/x")))
    with pytest.raises(SpecError, match=rf"{gone}:8: portage_confdir .*nowhere/x does not exist"):
        build_seed(load_spec(gone), stage, tmp_path / "s.tar", arch=Arch.amd64, work_dir=tmp_path / "work",
                   cache_dir=tmp_path / "cache")

    with pytest.raises(SpecError, match=r":1: the spec is for amd64, the build for arm64"):
        build_seed(load_spec(gone), stage, tmp_path / "s.tar", arch=Arch.arm64, work_dir=tmp_path / "work",
                   cache_dir=tmp_path / "cache")
    assert not (tmp_path / "work").exists(), "spec errors are found before any work starts"
