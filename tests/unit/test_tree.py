"""imagebuild.tree: paths resolved as the image sees them, and what is refused.

A tree in a temporary directory with absolute symlinks, ``..`` tricks, FIFOs and device-like
entries; beside it a "host" directory whose files must never change.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from imagebuild.errors import StageError, WorkspaceError
from imagebuild.tree import Tree, image_path, walk_host

pytestmark = pytest.mark.unit


@pytest.fixture
def host(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    (host / "dir").mkdir(parents=True)
    (host / "file").write_text("host\n")
    (host / "dir" / "keep").write_text("keep\n")
    return host


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root = tmp_path / "root"
    for d in ("etc", "usr/lib", "var/tmp", "boot"):
        (root / d).mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "etc/fstab").write_text("old\n")
    return Tree(root)


def unchanged(host: Path) -> None:
    assert (host / "file").read_text() == "host\n"
    assert sorted(os.listdir(host / "dir")) == ["keep"]


def test_image_path_normalises() -> None:
    assert image_path("etc//fstab") == "/etc/fstab"
    assert image_path("/./etc/") == "/etc"
    assert image_path("") == "/"
    with pytest.raises(StageError, match="NUL"):
        image_path("etc/\0x")


def test_write_replaces_a_symlink(tree: Tree, host: Path) -> None:
    (tree.root / "etc/machine-id").symlink_to(host / "file")
    tree.write_text("/etc/machine-id", "")
    unchanged(host)
    assert not (tree.root / "etc/machine-id").is_symlink()
    assert (tree.root / "etc/machine-id").read_text() == ""


def test_append_follows_a_symlink_inside(tree: Tree, host: Path) -> None:
    (tree.root / "etc/grub").symlink_to(host / "file")
    tree.append_text("/etc/grub", "x\n")
    unchanged(host)
    # The image's own copy of that path got the write.
    assert (tree.root / str(host / "file").lstrip("/")).read_text() == "x\n"


def test_write_keeps_a_regular_files_mode(tree: Tree) -> None:
    (tree.root / "etc/fstab").chmod(0o600)
    tree.write_text("/etc/fstab", "new\n")
    assert (tree.root / "etc/fstab").read_text() == "new\n"
    assert stat.S_IMODE((tree.root / "etc/fstab").stat().st_mode) == 0o600


def test_dotdot_stops_at_the_root(tree: Tree, host: Path) -> None:
    (tree.root / "up").symlink_to("../../../../../..")
    assert tree.host_path("/up/etc") == tree.root / "etc"
    assert tree.host_path("/../../etc/fstab") == tree.root / "etc/fstab"
    assert tree.read_text("/up/etc/fstab") == "old\n"


def test_relative_symlink_followed_inside(tree: Tree) -> None:
    assert tree.host_path("/lib", follow=False) == tree.root / "lib"
    assert tree.host_path("/lib") == tree.root / "usr/lib"
    tree.write_text("/lib/x", "y")
    assert (tree.root / "usr/lib/x").read_text() == "y"
    assert tree.is_symlink("/lib") and tree.is_dir("/lib")


def test_symlink_loop_is_refused(tree: Tree) -> None:
    (tree.root / "etc/loop").symlink_to("loop")
    with pytest.raises(StageError, match="symlink loop"):
        tree.read_text("/etc/loop")
    with pytest.raises(StageError, match="symlink loop"):
        tree.append_text("/etc/loop", "x")


def test_fifo_is_never_opened(tree: Tree) -> None:
    os.mkfifo(tree.root / "etc/fstab.fifo")
    with pytest.raises(StageError, match="is a FIFO, not a regular file"):
        tree.read_text("/etc/fstab.fifo")  # would block forever if opened
    with pytest.raises(StageError, match="is a FIFO"):
        tree.write_text("/etc/fstab.fifo", "x")


def test_directory_where_a_file_goes(tree: Tree) -> None:
    (tree.root / "etc/shadow").mkdir()
    with pytest.raises(StageError, match="is a directory, not a regular file"):
        tree.write_text("/etc/shadow", "x")
    with pytest.raises(StageError, match="is a directory"):
        tree.unlink("/etc/shadow")


def test_mkdir_through_a_file_is_refused(tree: Tree) -> None:
    (tree.root / "etc/default").write_text("not a directory\n")
    with pytest.raises(StageError, match="its /etc/default is a regular file"):
        tree.append_text("/etc/default/grub", "x")


def test_mkdir_follows_a_dangling_symlink_inside(tree: Tree, host: Path) -> None:
    (tree.root / "etc/default").symlink_to(host / "newdir")
    tree.append_text("/etc/default/grub", "GRUB\n")
    assert not (host / "newdir").exists()
    assert (tree.root / str(host / "newdir/grub").lstrip("/")).read_text() == "GRUB\n"


def test_unlink_removes_the_link_not_the_target(tree: Tree, host: Path) -> None:
    (tree.root / "etc/ssh_key").symlink_to(host / "file")
    tree.unlink("/etc/ssh_key")
    assert not os.path.lexists(tree.root / "etc/ssh_key")
    unchanged(host)


def test_remove_never_follows(tree: Tree, host: Path) -> None:
    (tree.root / "var/tmp/hostdir").symlink_to(host / "dir")
    (tree.root / "var/tmp/sub").mkdir()
    (tree.root / "var/tmp/sub/link").symlink_to(host / "dir")
    tree.empty("/var/tmp")
    assert os.listdir(tree.root / "var/tmp") == []
    unchanged(host)
    # /var itself a symlink to a host directory: emptying the image's /var/tmp then means
    # the image's <host>/dir/tmp, which does not exist.
    os.rename(tree.root / "var", tree.root / "var.real")
    (tree.root / "var").symlink_to(host)
    assert not tree.is_dir("/var/tmp")
    unchanged(host)


def test_remove_any_depth(tree: Tree) -> None:
    fd = os.open(tree.root / "var/tmp", os.O_RDONLY)
    for _ in range(3000):  # deeper than Python's recursion limit, and than PATH_MAX allows by name
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    tree.remove("/var/tmp/d")
    assert os.listdir(tree.root / "var/tmp") == []


def test_walk_any_depth_and_no_symlinks(tmp_path: Path) -> None:
    top = tmp_path / "w"
    (top / "a/b").mkdir(parents=True)
    (top / "a/b/f").write_text("x")
    (top / "link").symlink_to("/etc")
    walked = list(walk_host(top, "/"))
    assert walked == [("/", ["a"], ["link"]), ("/a", ["b"], []), ("/a/b", [], ["f"])]


def test_real_directory_refuses_symlinks(tree: Tree, host: Path) -> None:
    (tree.root / "dev").symlink_to(host / "dir")
    with pytest.raises(StageError, match=r"/dev is a symlink to .*/host/dir, not a directory"):
        tree.real_directory("/dev")
    (tree.root / "sys").write_text("")
    with pytest.raises(StageError, match="/sys is a regular file, not a directory"):
        tree.real_directory("/sys")
    assert tree.real_directory("/proc") == tree.root / "proc"
    assert (tree.root / "proc").is_dir()
    # A symlink on the way counts too: /lib is one.
    with pytest.raises(StageError, match="/lib is a symlink"):
        tree.real_directory("/lib/modules")
    unchanged(host)


def test_copy_out_resolves_inside(tree: Tree, host: Path, tmp_path: Path) -> None:
    (tree.root / "boot/vmlinuz").symlink_to(host / "file")
    with pytest.raises(StageError, match="cannot copy the image's /boot/vmlinuz"):
        tree.copy_out("/boot/vmlinuz", tmp_path / "out")
    (tree.root / "boot/real").write_text("kernel")
    (tree.root / "boot/real").chmod(0o600)
    tree.copy_out("/boot/real", tmp_path / "out")
    assert (tmp_path / "out").read_text() == "kernel"
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o600


def test_mounted_below_is_never_emptied(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    import imagebuild.tree as tree_module

    monkeypatch.setattr(tree_module, "mounts_below", lambda path: [path / "dev"])
    with pytest.raises(WorkspaceError, match="still mounted below it"):
        tree.empty("/var")


def test_glob_and_listdir(tree: Tree) -> None:
    for name in ("ssh_host_rsa_key", "ssh_host_rsa_key.pub", "sshd_config"):
        tree.write_text(f"/etc/ssh/{name}", "")
    assert tree.glob("/etc/ssh", "ssh_host_*") == ["/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_rsa_key.pub"]
    assert tree.listdir("/nonexistent") == []
