"""diskimage-stage2's tree keys (rcadd, rcdel, unmerge, fsscript, rm, empty) on a real tree.

Nothing here can run Portage, systemd or OpenRC. The tree holds the host's static busybox and
small scripts standing in for ``emerge``, ``systemctl`` and ``rc-update`` that record how they
were called. The chroot, the mounts and the path handling are real; only those programs are
stand-ins.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imagebuild.config import Arch, InitSystem
from imagebuild.errors import SpecError, StageError
from imagebuild.spec import load_spec
from imagebuild.stage2 import apply_stage2_keys, read_stage2_keys
from imagebuild.tree import Tree

from conftest import missing, mounts_under, require_root, require_tools

pytestmark = pytest.mark.integration

# Each stand-in appends "name arg arg ..." to /root/calls.log (shell builtins only).
RECORDER = """#!/bin/sh
echo "{name} $*" >> /root/calls.log
"""
FSSCRIPT = """#!/bin/sh
# Runs in the chroot: / is the image, /proc is mounted.
echo "fsscript $*" >> /root/calls.log
[ -e /proc/self/mountinfo ] && echo proc > /root/fsscript-marker
echo "cwd=$(pwd)" >> /root/fsscript-marker
echo "made by fsscript" > /var/cache/distfiles/from-fsscript
"""


@pytest.fixture
def host_state(tmp_path: Path):
    require_root()
    require_tools("chroot", "mount", "umount")
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        missing("a static /bin/busybox is needed (Debian: apt-get install busybox-static)")
    yield
    assert mounts_under(tmp_path) == [], "mounts left behind"
    # Other builds may use loop devices meanwhile: only ours (backed by files here) count.
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(tmp_path) not in losetup, "loop devices left behind"


def make_root(tmp_path: Path, *, emerge: bool = True) -> Path:
    root = tmp_path / "root"
    for d in ("usr/bin", "usr/sbin", "usr/lib", "etc/runlevels/default", "root", "proc", "sys", "dev",
              "run", "var/cache/distfiles/sub", "var/log", "usr/share/doc/pkg/html"):
        (root / d).mkdir(parents=True)
    (root / "tmp").mkdir(mode=0o1777)
    for top in ("bin", "sbin", "lib"):
        (root / top).symlink_to(f"usr/{top}")
    (root / "usr/bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (root / "usr/bin/busybox").chmod(0o755)
    for applet in ("sh", "cat", "pwd", "ls"):
        (root / "usr/bin" / applet).symlink_to("busybox")
    tools = {"usr/bin/systemctl": "systemctl", "usr/sbin/rc-update": "rc-update"}
    if emerge:
        tools["usr/bin/emerge"] = "emerge"
    for path, name in tools.items():
        (root / path).write_text(RECORDER.format(name=name))
        (root / path).chmod(0o755)
    (root / "etc/hostname").write_text("gentoo\n")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "var/log/emerge.log").write_text("log\n")
    (root / "var/log/portage.log").write_text("log\n")
    (root / "var/log/keep.txt").write_text("kept\n")
    (root / "usr/share/doc/pkg/README").write_text("doc\n")
    (root / "usr/share/doc/pkg/html/index.html").write_text("doc\n")
    (root / "var/cache/distfiles/nano.tar.xz").write_text("source\n")
    (root / "var/cache/distfiles/sub/x").write_text("source\n")
    (root / "var/cache/distfiles").chmod(0o2775)
    return root


def spec_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "diskimage-stage2.spec"
    path.write_text("subarch: amd64\ntarget: diskimage-stage2\n" + body)
    return path


def calls(root: Path) -> list[str]:
    log = root / "root/calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_rcadd_systemd(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    spec = load_spec(spec_file(tmp_path, "diskimage/rcadd: sshd|default cloud-init|boot\n"
                                         "diskimage/rcdel: getty@tty2|default\n"))
    apply_stage2_keys(Tree(root), read_stage2_keys(spec), Arch.amd64, InitSystem.systemd)
    assert calls(root) == ["systemctl enable sshd", "systemctl enable cloud-init", "systemctl disable getty@tty2"]


def test_rcadd_openrc(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    spec = load_spec(spec_file(tmp_path, "diskimage/rcadd: sshd|default net.eth0|boot dhcpcd|net-up\n"
                                         "diskimage/rcdel: netmount|default\n"))
    apply_stage2_keys(Tree(root), read_stage2_keys(spec), Arch.amd64, InitSystem.openrc)
    assert calls(root) == ["rc-update add sshd default", "rc-update add net.eth0 boot",
                           "rc-update add dhcpcd net-up", "rc-update del netmount default"]
    # rc-update.sh creates a runlevel that does not exist yet.
    assert (root / "etc/runlevels/net-up").is_dir() and (root / "etc/runlevels/boot").is_dir()


def test_rcadd_malformed_entry(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    path = spec_file(tmp_path, "diskimage/rcadd: sshd|default sshd\n")
    with pytest.raises(SpecError, match=rf"{path}:3: 'sshd' in diskimage/rcadd is not service\|runlevel"):
        apply_stage2_keys(Tree(root), read_stage2_keys(load_spec(path)), Arch.amd64, InitSystem.openrc)
    assert calls(root) == []


def test_unmerge(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    spec = load_spec(spec_file(tmp_path, "diskimage/unmerge: app-editors/nano\n\tsys-apps/man-pages\n"))
    apply_stage2_keys(Tree(root), read_stage2_keys(spec), Arch.amd64, InitSystem.systemd)
    # controller.sh's unmerge: depclean.sh first (unless diskimage/depclean: no), then emerge -C.
    assert calls(root) == ["emerge --quiet --depclean --with-bdeps=n",
                           "emerge --quiet -C app-editors/nano sys-apps/man-pages"]

    root2 = make_root(tmp_path / "2")
    spec = load_spec(spec_file(tmp_path, "diskimage/depclean: no\ndiskimage/unmerge: app-editors/nano\n"))
    apply_stage2_keys(Tree(root2), read_stage2_keys(spec), Arch.amd64, InitSystem.systemd)
    assert calls(root2) == ["emerge --quiet -C app-editors/nano"]


def test_unmerge_without_emerge(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path, emerge=False)
    spec = load_spec(spec_file(tmp_path, "diskimage/rcadd: sshd|default\ndiskimage/unmerge: app-editors/nano\n"))
    with pytest.raises(StageError, match="needs emerge, but the stage has no /usr/bin/emerge"):
        apply_stage2_keys(Tree(root), read_stage2_keys(spec), Arch.amd64, InitSystem.systemd)
    assert calls(root) == [], "nothing runs when the stage cannot do what the spec asks"


def test_fsscript_runs_in_the_chroot_and_is_removed(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    script = tmp_path / "scripts/finish.sh"
    script.parent.mkdir()
    script.write_text(FSSCRIPT)
    spec = load_spec(spec_file(tmp_path, "diskimage/fsscript: scripts/finish.sh\n"  # relative to the spec
                                         "diskimage/rcadd: sshd|default\n"
                                         "diskimage/unmerge: app-editors/nano\n"
                                         "diskimage/empty: /var/cache/distfiles\n"))
    apply_stage2_keys(Tree(root), read_stage2_keys(spec), Arch.amd64, InitSystem.systemd)
    # Catalyst's order: fsscript, rc-update, unmerge; empty last (it removes fsscript's file).
    assert calls(root) == ["fsscript ", "systemctl enable sshd", "emerge --quiet --depclean --with-bdeps=n",
                           "emerge --quiet -C app-editors/nano"]
    assert (root / "root/fsscript-marker").read_text() == "proc\ncwd=/\n"
    assert list((root / "tmp").iterdir()) == [], "the script is removed after it ran"
    assert not (root / "var/cache/distfiles/from-fsscript").exists()


def test_fsscript_missing(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    path = spec_file(tmp_path, "diskimage/rcadd: sshd|default\ndiskimage/fsscript: /nonexistent/fs.sh\n")
    with pytest.raises(SpecError, match=rf"{path}:4: fsscript /nonexistent/fs.sh does not exist"):
        apply_stage2_keys(Tree(root), read_stage2_keys(load_spec(path)), Arch.amd64, InitSystem.systemd)
    assert calls(root) == []


def test_empty(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("must survive\n")
    (root / "var/cache/distfiles/escape").symlink_to(outside)  # emptied as a link, not followed
    (root / "var/linked").symlink_to("/var/cache/distfiles")  # a symlinked directory is skipped
    spec = load_spec(spec_file(tmp_path, "diskimage/empty: /var/linked /var/cache/distfiles /does/not/exist\n"))
    apply_stage2_keys(Tree(root), read_stage2_keys(spec), Arch.amd64, InitSystem.systemd)
    distfiles = root / "var/cache/distfiles"
    assert distfiles.is_dir() and list(distfiles.iterdir()) == []
    assert distfiles.stat().st_mode & 0o7777 == 0o2775, "the directory itself is kept as it was"
    assert (outside / "victim").read_text() == "must survive\n"
    assert (root / "var/linked").is_symlink()


def test_rm(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    spec = load_spec(spec_file(tmp_path, "diskimage/rm: /etc/hostname /var/log/*.log /usr/share/doc/**\n"))
    apply_stage2_keys(Tree(root), read_stage2_keys(spec), Arch.amd64, InitSystem.systemd)
    assert not (root / "etc/hostname").exists()
    assert sorted(p.name for p in (root / "var/log").iterdir()) == ["keep.txt"]
    assert not (root / "usr/share/doc").exists()
    assert (root / "etc/passwd").exists()


def test_rm_cannot_leave_the_root(tmp_path: Path, host_state: None) -> None:
    root = make_root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("must survive\n")
    host_passwd = os.stat("/etc/passwd")

    # '..' in an entry: refused before anything is removed.
    path = spec_file(tmp_path, "diskimage/rm: /etc/hostname ../../etc\n")
    with pytest.raises(SpecError, match=rf"{path}:3: '\.\./\.\./etc' in diskimage/rm contains '\.\.'"):
        apply_stage2_keys(Tree(root), read_stage2_keys(load_spec(path)), Arch.amd64, InitSystem.systemd)
    assert (root / "etc/hostname").exists()

    # A symlink whose '..' climbs above the root stops at the image's / (as in the image).
    (root / "up").symlink_to("../../../../../../../..")
    path = spec_file(tmp_path, f"diskimage/rm: /up{outside}/victim /up/etc/hostname\n")
    apply_stage2_keys(Tree(root), read_stage2_keys(load_spec(path)), Arch.amd64, InitSystem.systemd)
    assert (outside / "victim").read_text() == "must survive\n"
    assert not (root / "etc/hostname").exists(), "/up/etc/hostname is the image's /etc/hostname"

    # An absolute path is a path in the image (as in Catalyst): the host's file is not it.
    # A symlink to /etc or to a host directory means the image's /etc or nothing at all.
    (root / "hostetc").symlink_to("/etc")
    (root / "escape").symlink_to(outside)
    spec = load_spec(spec_file(tmp_path, f"diskimage/rm: {outside}/victim /escape/victim /escape/* "
                                         "/hostetc/passwd\n"))
    apply_stage2_keys(Tree(root), read_stage2_keys(spec), Arch.amd64, InitSystem.systemd)
    assert (outside / "victim").read_text() == "must survive\n"
    assert os.stat("/etc/passwd") == host_passwd
    assert not (root / "etc/passwd").exists(), "/hostetc/passwd is the image's /etc/passwd"
    assert (root / "escape").is_symlink() and (root / "hostetc").is_symlink()
