"""The one way the host touches an image's tree: every path resolved as the image sees it.

A stage is untrusted input that imagebuild, running as root, reads and edits from the host. A
path such as ``/etc/machine-id`` may be an absolute symlink to ``/etc/shadow``: followed on the
host, a write would land on the host's file. Every operation here therefore resolves its path
with the kernel's ``openat2(RESOLVE_IN_ROOT)``, which treats the tree as ``/``: absolute
symlinks lead to the tree's own root, ``..`` stops there, and magic links (``/proc/self/...``)
are refused, and so is crossing a mount point (the chroot's /dev, /proc, /sys). The object opened is then checked for its type *before* it is read or written
(``O_PATH`` first, so opening a FIFO cannot hang and a device node is never opened), and the
same inode is reopened through ``/proc/self/fd``: nothing can be swapped in between.

What cannot be done safely is refused with a ``StageError`` naming the image path: writing a
file where the tree has a device node, FIFO, socket or directory; reading a file that is not
a regular file; mounting on anything but a real directory of the tree. Walks and removals are
iterative, on directory file descriptors, never following a symlink, so no depth of tree can
exhaust the interpreter's stack and no symlink swapped in mid-walk leads out.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import stat as statmod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from imagebuild.errors import StageError, WorkspaceError
from imagebuild.mountinfo import mounts_below

# openat2(2): <linux/openat2.h>; the syscall number is 437 on every architecture with the
# generic syscall table (x86_64, aarch64, riscv64, loongarch64).
_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode, resolve=resolve)
    while True:
        fd = _libc.syscall(_SYS_OPENAT2, ctypes.c_int(dirfd), os.fsencode(path), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):  # EAGAIN: a rename raced the lookup; retry
            raise OSError(err, os.strerror(err), path)


# Never across a mount point either: while the chroot's /dev or /proc are mounted, a stage
# symlink such as /tmp -> /dev must not lead a write onto the host's devices.
_IN_ROOT = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
_KIND = {statmod.S_IFREG: "regular file", statmod.S_IFDIR: "directory", statmod.S_IFLNK: "symlink",
         statmod.S_IFBLK: "block device", statmod.S_IFCHR: "character device", statmod.S_IFIFO: "FIFO",
         statmod.S_IFSOCK: "socket"}


def kind(mode: int) -> str:
    """'regular file', 'block device', ... for an ``st_mode``."""
    return _KIND.get(statmod.S_IFMT(mode), "special file")


def image_path(path: str | PurePosixPath) -> str:
    """``path`` as an absolute image path, normalised (``etc//fstab`` -> ``/etc/fstab``)."""
    text = os.fspath(path)
    if "\0" in text:
        raise StageError(f"image path {text!r} contains a NUL byte")
    parts = [p for p in PurePosixPath("/", text).parts[1:] if p not in (".", "")]
    return "/" + "/".join(parts)


def _split(path: str) -> tuple[str, str]:
    """(parent, name) of a normalised image path; the root has no name."""
    parent, _, name = image_path(path).rpartition("/")
    return parent or "/", name


class Tree:
    """An unpacked image tree at host path ``root``, touched only as the image sees it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Tree({str(self.root)!r})"

    # --- Resolution -----------------------------------------------------------------------

    def _root_fd(self) -> int:
        try:
            return os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise WorkspaceError(f"cannot open the tree {self.root}: {exc.strerror}") from None

    def _open(self, path: str, flags: int = os.O_PATH, *, follow: bool = True, mode: int = 0) -> int:
        """A file descriptor for image path ``path`` (``follow``: through a final symlink)."""
        root = self._root_fd()
        try:
            return _openat2(root, image_path(path).lstrip("/") or ".",
                            flags | (0 if follow else os.O_NOFOLLOW), _IN_ROOT, mode)
        finally:
            os.close(root)

    def _error(self, path: str, exc: OSError, doing: str) -> StageError:
        reason = {errno.ELOOP: "a symlink loop (or too many symlinks)",
                  errno.ENOTDIR: "a component is not a directory",
                  errno.ENAMETOOLONG: "the name is too long",
                  errno.EXDEV: "it crosses a mount point",
                  errno.ENOSPC: "no space left on the work filesystem"}.get(exc.errno or 0, exc.strerror)
        hint = ("free space on the work filesystem (--work-dir)" if exc.errno == errno.ENOSPC
                else "the stage's tree is not what a stage3 holds there; fix the stage or use another")
        return StageError(f"cannot {doing} the image's {image_path(path)}: {reason}", hint=hint)

    def lstat(self, path: str) -> os.stat_result | None:
        """The entry itself (a symlink is not followed); None when it does not exist."""
        return self._stat(path, follow=False)

    def stat(self, path: str) -> os.stat_result | None:
        """What the path leads to inside the tree; None when missing or a dangling symlink."""
        return self._stat(path, follow=True)

    def _stat(self, path: str, *, follow: bool) -> os.stat_result | None:
        try:
            fd = self._open(path, follow=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise self._error(path, exc, "look up") from None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def lexists(self, path: str) -> bool:
        return self.lstat(path) is not None

    def is_file(self, path: str) -> bool:
        st = self.stat(path)
        return st is not None and statmod.S_ISREG(st.st_mode)

    def is_dir(self, path: str) -> bool:
        st = self.stat(path)
        return st is not None and statmod.S_ISDIR(st.st_mode)

    def is_symlink(self, path: str) -> bool:
        st = self.lstat(path)
        return st is not None and statmod.S_ISLNK(st.st_mode)

    def host_path(self, path: str, *, follow: bool = True) -> Path:
        """The host path of what image path ``path`` resolves to (which must exist), for
        handing to a program that runs on the host; it always lies inside the tree."""
        try:
            fd = self._open(path, follow=follow)
        except OSError as exc:
            raise self._error(path, exc, "find") from None
        try:
            resolved = Path(os.readlink(f"/proc/self/fd/{fd}"))
        finally:
            os.close(fd)
        root = Path(os.path.realpath(self.root))
        if resolved != root and root not in resolved.parents:  # cannot happen with RESOLVE_IN_ROOT
            raise StageError(f"the image's {image_path(path)} resolves outside the tree ({resolved})")
        return resolved

    def image_path_of(self, host: Path) -> str:
        """The image path of host path ``host`` inside the tree."""
        return "/" + Path(host).relative_to(self.root).as_posix().removeprefix(".")

    # --- Reading --------------------------------------------------------------------------

    def _reopen(self, path: str, flags: int, *, want: int = statmod.S_IFREG, doing: str) -> int:
        """Open ``path`` for ``flags`` only after checking (through O_PATH) that it is a ``want``."""
        try:
            fd = self._open(path)
        except OSError as exc:
            raise self._error(path, exc, doing) from None
        try:
            st = os.fstat(fd)
            if statmod.S_IFMT(st.st_mode) != want:
                raise StageError(
                    f"cannot {doing} the image's {image_path(path)}: it is a {kind(st.st_mode)}, "
                    f"not a {kind(want)}",
                    hint="a stage3 has a plain file there; fix the stage or use another")
            return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(path, exc, doing) from None
        finally:
            os.close(fd)

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """The contents of regular file ``path`` (at most ``limit`` bytes)."""
        fd = self._reopen(path, os.O_RDONLY, doing="read")
        with os.fdopen(fd, "rb") as f:
            return f.read() if limit is None else f.read(limit)

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8", errors="surrogateescape")

    def listdir(self, path: str) -> list[str]:
        """Names in directory ``path``, sorted; [] when it does not exist."""
        if self.stat(path) is None:
            return []
        fd = self._reopen(path, os.O_RDONLY | os.O_DIRECTORY, want=statmod.S_IFDIR, doing="list")
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    def glob(self, directory: str, pattern: str) -> list[str]:
        """Image paths of the entries of ``directory`` whose names match ``pattern``."""
        base = image_path(directory).rstrip("/")
        return [f"{base}/{name}" for name in self.listdir(directory) if fnmatch.fnmatchcase(name, pattern)]

    def copy_out(self, path: str, dest: Path) -> None:
        """Copy regular file ``path`` of the tree to host file ``dest`` (mode and mtime kept),
        replacing a file already there; ``dest`` is the caller's, never a path of the tree."""
        fd = self._reopen(path, os.O_RDONLY, doing="copy")
        try:
            st = os.fstat(fd)
            if os.path.lexists(dest):
                os.unlink(dest)
            with os.fdopen(os.dup(fd), "rb") as src, open(dest, "xb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.chmod(dest, statmod.S_IMODE(st.st_mode) & 0o777)
            os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError as exc:
            raise self._error(path, exc, "copy") from None
        finally:
            os.close(fd)

    # --- Writing --------------------------------------------------------------------------

    def _parent(self, path: str, *, create: bool = False, doing: str) -> tuple[int, str]:
        """A directory fd of ``path``'s parent (resolved in the tree) and the last name."""
        parent, name = _split(path)
        if not name:
            raise StageError(f"cannot {doing} the image's root directory itself")
        if create:
            self.mkdir(parent)
        try:
            fd = self._open(parent, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            raise self._error(parent, exc, doing) from None
        return fd, name

    def write_bytes(self, path: str, data: bytes, *, mode: int = 0o644, append: bool = False) -> None:
        """Write regular file ``path`` (or append to it), creating it and its parents if needed.

        A regular file is rewritten in place (its owner, mode and xattrs stay). A symlink is
        replaced by the file — what the build writes (fstab, machine-id, shadow) is then in
        the image under that name, not wherever the stage pointed it — except when appending,
        which follows it inside the tree. A device node, FIFO, socket or directory is refused.
        """
        doing = "append to" if append else "write"
        entry = self.lstat(path)
        if entry is not None and statmod.S_ISLNK(entry.st_mode):
            if not append:
                self.unlink(path)
                entry = None
            elif self.stat(path) is None:
                path, entry = self._dangling_target(path), None
        if entry is None:
            dirfd, name = self._parent(path, create=True, doing=doing)
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                             dir_fd=dirfd)
            except OSError as exc:
                raise self._error(path, exc, doing) from None
            finally:
                os.close(dirfd)
        else:
            fd = self._reopen(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC), doing=doing)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise self._error(path, exc, doing) from None

    def _dangling_target(self, path: str) -> str:
        """Where a symlink that leads nowhere (yet) points, as an image path."""
        hops = 0
        while self.is_symlink(path):
            hops += 1
            if hops > 40:
                raise StageError(f"cannot write the image's {image_path(path)}: a symlink loop")
            dirfd, name = self._parent(path, doing="follow")
            try:
                target = os.readlink(name, dir_fd=dirfd)
            finally:
                os.close(dirfd)
            base = self.image_path_of(self.host_path(_split(path)[0]))
            path = image_path(target if target.startswith("/") else f"{base}/{target}")
        return path

    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None:
        self.write_bytes(path, text.encode(), mode=mode)

    def append_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode(), append=True)

    def write_if_missing(self, path: str, text: str) -> None:
        """Write ``path`` unless the tree already has an entry there (even a dangling symlink)."""
        if not self.lexists(path):
            self.write_text(path, text)

    def copy_in(self, source: Path, path: str, *, mode: int = 0o644) -> None:
        """Copy host file ``source`` to regular file ``path`` of the tree."""
        self.write_bytes(path, Path(source).read_bytes(), mode=mode)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Make directory ``path`` and its missing parents (a symlink on the way is followed
        inside the tree; anything there that is not a directory is refused)."""
        current = "/"
        for name in PurePosixPath(image_path(path)).parts[1:]:
            current = image_path(f"{current}/{name}")
            st = self.stat(current)
            if st is not None:
                if not statmod.S_ISDIR(st.st_mode):
                    raise StageError(f"cannot make the directory {image_path(path)} in the image: "
                                     f"its {current} is a {kind(st.st_mode)}",
                                     hint="a stage3 has a directory there; fix the stage or use another")
                continue
            target = self._dangling_target(current) if self.is_symlink(current) else current
            dirfd, last = self._parent(target, create=target != current, doing="make")
            try:
                os.mkdir(last, mode, dir_fd=dirfd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise self._error(target, exc, "make") from None
            finally:
                os.close(dirfd)

    def symlink(self, target: str, path: str) -> None:
        """A symlink at ``path`` (its parent must exist) pointing at ``target``."""
        dirfd, name = self._parent(path, doing="link")
        try:
            os.symlink(target, name, dir_fd=dirfd)
        except OSError as exc:
            raise self._error(path, exc, "link") from None
        finally:
            os.close(dirfd)

    def chmod(self, path: str, mode: int) -> None:
        try:
            fd = self._open(path)
        except OSError as exc:
            raise self._error(path, exc, "chmod") from None
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        """Remove the entry ``path`` itself (a symlink, never what it points to); no error
        when it is missing. A directory is refused (use ``remove``)."""
        st = self.lstat(path)
        if st is None:
            return
        if statmod.S_ISDIR(st.st_mode):
            raise StageError(f"cannot remove the image's {image_path(path)}: it is a directory, not a file")
        dirfd, name = self._parent(path, doing="remove")
        try:
            os.unlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(path, exc, "remove") from None
        finally:
            os.close(dirfd)

    def rename(self, source: str, dest: str) -> None:
        """Rename entry ``source`` to ``dest`` (both inside the tree; symlinks moved, not followed)."""
        sfd, sname = self._parent(source, doing="rename")
        try:
            dfd, dname = self._parent(dest, doing="rename")
            try:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            except OSError as exc:
                raise self._error(source, exc, "rename") from None
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def remove(self, path: str) -> None:
        """Remove ``path`` and, for a directory, everything below it; never through a symlink
        or a mount point (refused, naming the mount)."""
        st = self.lstat(path)
        if st is None:
            return
        if not statmod.S_ISDIR(st.st_mode):
            self.unlink(path)
            return
        self.empty(path)
        dirfd, name = self._parent(path, doing="remove")
        try:
            os.rmdir(name, dir_fd=dirfd)
        except OSError as exc:
            raise self._error(path, exc, "remove") from None
        finally:
            os.close(dirfd)

    def empty(self, path: str) -> None:
        """Remove what directory ``path`` holds, keeping the directory (mode, owner, xattrs)."""
        host = self.host_path(path)
        _refuse_mounts(host, "empty")
        fd = self._reopen(path, os.O_RDONLY | os.O_DIRECTORY, want=statmod.S_IFDIR, doing="empty")
        try:
            empty_directory_fd(fd, host)
        finally:
            os.close(fd)

    # --- Walking --------------------------------------------------------------------------

    def walk(self, path: str = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        """(image directory, subdirectory names, other names), top down, never following a
        symlink; iterative, so any depth of tree is fine."""
        yield from walk_host(self.host_path(path), image_path(path))

    def real_directory(self, path: str, mode: int = 0o755) -> Path:
        """The host path of ``path`` for mounting on: every component must be a real
        directory of the tree (no symlink anywhere), the last one is made if missing."""
        parent, name = _split(path)
        if parent != "/":
            self.real_directory(parent)
        st = self.lstat(path)
        if st is None:
            self.mkdir(path, mode)
        elif not statmod.S_ISDIR(st.st_mode):
            what = kind(st.st_mode)
            if statmod.S_ISLNK(st.st_mode):
                dirfd, last = self._parent(path, doing="inspect")
                try:
                    what += f" to {os.readlink(last, dir_fd=dirfd)}"
                finally:
                    os.close(dirfd)
            raise StageError(f"the image's {image_path(path)} is a {what}, not a directory: "
                             "imagebuild mounts there for the chroot",
                             hint="a stage3 has a real directory there; fix the stage or use another")
        # The path the mount command is given must lead there with no symlink at all (it is
        # resolved on the host); mounts of our own on the way (/dev before /dev/pts) are fine.
        try:
            root_fd = self._root_fd()
            try:
                os.close(_openat2(root_fd, image_path(path).lstrip("/"), os.O_PATH | os.O_DIRECTORY,
                                  RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS))
            finally:
                os.close(root_fd)
        except OSError as exc:
            raise self._error(path, exc, "mount on") from None
        return self.root / image_path(path).lstrip("/")


def walk_host(top: Path, label: str | None = None) -> Iterator[tuple[str, list[str], list[str]]]:
    """Like os.walk(top) (top down, symlinks not followed) but iterative; directories are
    reported as ``label`` + their path below ``top`` (default: host paths)."""
    base = str(label if label is not None else top).rstrip("/")
    stack = [""]
    while stack:
        rel = stack.pop()
        dirs: list[str] = []
        others: list[str] = []
        try:
            with os.scandir(os.path.join(top, rel) if rel else top) as entries:
                for entry in entries:
                    (dirs if entry.is_dir(follow_symlinks=False) else others).append(entry.name)
        except OSError:
            continue
        dirs.sort()
        others.sort()
        yield (f"{base}/{rel}" if rel else base or "/"), dirs, others
        stack.extend(f"{rel}/{d}" if rel else d for d in reversed(dirs))


def empty_directory_fd(fd: int, label: Path) -> None:
    """Remove everything below the directory open as ``fd``, iteratively, by directory fds
    (never following a symlink, never crossing into another filesystem)."""
    device = os.fstat(fd).st_dev
    # Each level: its fd, the names still to remove, and its own name in the level above.
    stack: list[tuple[int, list[str], str]] = [(os.dup(fd), os.listdir(fd), "")]
    try:
        while stack:
            dirfd, names, own = stack[-1]
            if not names:
                os.close(dirfd)
                stack.pop()
                if stack:
                    os.rmdir(own, dir_fd=stack[-1][0])
                continue
            name = names.pop()
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if not statmod.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=dirfd)
                continue
            if st.st_dev != device:
                raise WorkspaceError(f"refusing to delete below {label}: {name} is another filesystem "
                                     "(a mount)", hint="unmount it first, after checking what it is")
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            stack.append((child, os.listdir(child), name))
    finally:
        for dirfd, _, _ in stack:
            os.close(dirfd)


def _refuse_mounts(path: Path, doing: str) -> None:
    live = mounts_below(path)
    if live:
        raise WorkspaceError(
            f"refusing to {doing} {path}: still mounted below it: {', '.join(map(str, live))}",
            hint="unmount these (umount -R) first, after checking what they are",
        )
