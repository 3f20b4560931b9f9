"""No module builds a host path into an image's tree by hand: imagebuild.tree is the one way.

``root / "etc/fstab"`` followed on the host is how a stage's absolute symlink reaches the host's
files. This test reads the source (ast, not grep, so strings and comments do not count) and
fails on any path arithmetic or file operation on a name that holds a tree's root.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "imagebuild"
# tree.py is the API itself; unpack.py creates the tree member by member and refuses, before
# writing each one, any member that would be written through a symlink it made earlier.
EXEMPT = {"tree.py", "unpack.py"}
# The workspace's own root directory, made before anything is unpacked into it.
ALLOWED = {("imagebuild/build.py", "ctx.root.mkdir(exist_ok=True)")}
_ROOT_NAMES = {"root", "root_tree", "mountpoint_root"}
_PATH_METHODS = {"joinpath", "glob", "rglob", "iterdir", "open", "read_text", "read_bytes", "write_text",
                 "write_bytes", "unlink", "mkdir", "rmdir", "exists", "is_file", "is_dir", "is_symlink",
                 "symlink_to", "chmod", "touch", "rename", "replace", "stat", "lstat", "resolve"}


def _is_root(node: ast.expr) -> bool:
    """``root``, ``ctx.root``, ``tree.root``, ``img.root``, ``self.root`` ..."""
    if isinstance(node, ast.Name):
        return node.id in _ROOT_NAMES
    return isinstance(node, ast.Attribute) and node.attr == "root"


def offences(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _is_root(node.left):
            found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in _PATH_METHODS and _is_root(node.func.value)):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_detector_detects() -> None:
    assert offences('(root / "etc/fstab").write_text("x")') != []
    assert offences("ctx.root.joinpath('etc')") != []
    assert offences("img.root.glob('*')") != []
    assert offences('tree.write_text("/etc/fstab", "x")') == []


def test_no_path_arithmetic_on_a_tree_root_outside_the_tree_api() -> None:
    problems = []
    for module in sorted(PACKAGE.rglob("*.py")):
        if module.name in EXEMPT:
            continue
        name = module.relative_to(PACKAGE.parent).as_posix()
        problems += [f"{name}:{line}: {text}" for line, text in offences(module.read_text())
                     if (name, text) not in ALLOWED]
    assert problems == [], "use imagebuild.tree instead:\n" + "\n".join(problems)
