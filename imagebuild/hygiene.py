"""Hygiene: nothing of the build host or of one machine's identity ships in an image.

The build cleans the tree with clean_tree(); the audit (imagebuild.inspect) checks the same
things in the finished image.
"""

from __future__ import annotations

from imagebuild.tree import Tree

# Shell and tool histories that must not ship in an image, in every home.
HISTORY_FILES = (".bash_history", ".ash_history", ".sh_history", ".python_history", ".lesshst", ".viminfo")


def clean_tree(tree: Tree) -> None:
    """Hygiene: nothing of the build host or of one machine's identity ships in the image."""
    # An empty machine-id: systemd makes a new one at first boot and treats the system as
    # initialised (Catalyst does the same). A machine-id that is a symlink (to
    # /run/machine-id, say) is replaced by the empty file.
    tree.write_text("/etc/machine-id", "", mode=0o444)
    if tree.lstat("/var/lib/dbus/machine-id") is not None and not tree.is_symlink("/var/lib/dbus/machine-id"):
        tree.unlink("/var/lib/dbus/machine-id")
    tree.unlink("/var/lib/systemd/random-seed")
    for key in tree.glob("/etc/ssh", "ssh_host_*") if tree.is_dir("/etc/ssh") else []:
        tree.remove(key)
    homes = ["/root", *(h for h in tree.glob("/home", "*") if tree.is_dir(h) and not tree.is_symlink(h))]
    for home in homes:
        if tree.is_dir(home):
            for name in HISTORY_FILES:
                tree.remove(f"{home}/{name}")
    for scratch in ("/tmp", "/var/tmp", "/var/cache/distfiles", "/var/cache/binpkgs"):
        if tree.is_dir(scratch) and not tree.is_symlink(scratch):
            tree.empty(scratch)
