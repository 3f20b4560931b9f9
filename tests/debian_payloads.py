"""Taking a Debian package's files out of an unpacked tree into a *payload* tarball.

The Portage stand-in stage3 (gentoo_standin.py) must not have a kernel, GRUB's EFI modules or
cloud-init, as a Gentoo stage3 has none: their Debian packages' files go into tarballs that
the test repository's ebuilds install again. dpkg's database is left as it is.

What a package owns: what its /var/lib/dpkg/info/<package>.list names (resolved inside the
tree, so /lib/modules/... is found at /usr/lib/modules/... on a merged-/usr tree), except
directories other packages list too; a directory no other package lists is the package's with
everything in it, also what its maintainer scripts made there (Python's byte code, depmod's
indexes). Payloads keep owners (numerically) and modes of files, and are the same bytes when
made from the same files.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from imagebuild.errors import StageError
from imagebuild.tree import Tree

DPKG_INFO = "/var/lib/dpkg/info"


def dpkg_lists(tree: Tree) -> dict[str, set[str]]:
    """Each installed package's paths that exist, as the tree resolves their directories."""
    parents: dict[str, str] = {}
    lists = {}
    for path in tree.glob(DPKG_INFO, "*.list"):
        package = path.rsplit("/", 1)[1].removesuffix(".list").split(":")[0]  # name:arch for Multi-Arch: same
        entries = set()
        for line in tree.read_text(path).splitlines():
            if line in ("", "/."):
                continue
            parent, name = line.rsplit("/", 1)
            if parent not in parents:
                parents[parent] = tree.image_path_of(tree.host_path(parent or "/")) \
                    if tree.stat(parent or "/") is not None else ""
            if parents[parent] and tree.lexists(f"{parents[parent]}/{name}"):
                entries.add(f"{parents[parent].rstrip('/')}/{name}")
        lists[package] = entries
    return lists


def dpkg_versions(tree: Tree) -> dict[str, str]:
    """Each installed package's Debian version (from /var/lib/dpkg/status)."""
    versions = {}
    for stanza in tree.read_text("/var/lib/dpkg/status").split("\n\n"):
        fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.M))
        if "Package" in fields and "Version" in fields:
            versions[fields["Package"]] = fields["Version"]
    return versions


def upstream_version(debian_version: str) -> str:
    """A Gentoo version from a Debian one: its upstream part (1:6.1.192-3 -> 6.1.192)."""
    match = re.match(r"(?:\d+:)?(\d+(?:\.\d+)*)", debian_version)
    if not match:
        raise StageError(f"cannot make a Gentoo version of Debian's {debian_version}")
    return match.group(1)


def take_out(tree: Tree, lists: dict[str, set[str]], package: str, dest: Path,
             replaced: dict[str, tuple[Path, int]] | None = None) -> int:
    """Write ``package``'s files to payload tarball ``dest``, then remove them from the tree;
    the number of members. ``replaced``: image path -> (host file, mtime) to put in the payload
    instead of the tree's file (it is removed from the tree all the same)."""
    members, removals = _members(tree, lists, package)
    _write(tree, members, replaced or {}, dest)
    for path in removals:
        tree.remove(path)
    return len(members)


def _members(tree: Tree, lists: dict[str, set[str]], package: str) -> tuple[list[str], list[str]]:
    """The payload's members and the paths to remove (top directories remove what is below)."""
    own = lists[package]
    others = set().union(*(paths for name, paths in lists.items() if name != package))
    # Directories are shared (dpkg lists /lib, a symlink on merged-/usr trees, as one), unless
    # no other package lists them; only real ones are taken.
    directories = {p for p in own if tree.is_dir(p)}
    exclusive = {d for d in directories if d not in others and not tree.is_symlink(d)}
    tops = sorted(d for d in exclusive if d.rsplit("/", 1)[0] not in exclusive)
    under = tuple(f"{d}/" for d in tops)
    members = {p for p in own - directories if not p.startswith(under)}
    removals = sorted(members)
    for top in tops:
        for directory, subdirs, names in tree.walk(top):
            # A directory is a member only when it is empty: tar makes the others as it unpacks
            # what is in them (all are 0755 here), and the payload stays the same bytes whatever
            # else the tree holds (on an OpenRC tree cloud-init is the only package that lists
            # /usr/lib/systemd/system-generators).
            if not subdirs and not names:
                members.add(directory)
            members.update(f"{directory}/{name}" for name in names)
        removals.append(top)
    return sorted(members), removals


def _write(tree: Tree, members: list[str], replaced: dict[str, tuple[Path, int]], dest: Path) -> None:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in members:
            arcname = path.lstrip("/")
            if path in replaced:
                source, mtime = replaced[path]
                content = source.read_bytes()
                info = tarfile.TarInfo(arcname)
                info.size, info.mode, info.mtime = len(content), 0o755, mtime
                tar.addfile(info, io.BytesIO(content))
                continue
            host = tree.host_path(path, follow=False)
            info = tar.gettarinfo(host, arcname)
            info.uname = info.gname = ""  # numeric: the host's names for these ids mean nothing
            info.mtime = int(info.mtime)  # no per-file PAX header for sub-second times
            if info.isreg():
                with open(host, "rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
