"""Every host program the package runs is in one table (run.HOST_TOOLS): its Debian and Gentoo
packages, why it is needed, whether every build needs it. doctor, require_tools and the build's
pre-flight check all read that table, so a program missing from it is missing from all three."""

from __future__ import annotations

import ast
from pathlib import Path

from imagebuild.run import BUILD_TOOLS, HOST_TOOLS

PACKAGE = Path(__file__).resolve().parents[2] / "imagebuild"
RUNNERS = {"run", "output_stream", "spawn", "require_tools", "find_tool"}


def _programs() -> dict[str, str]:
    """Host programs named as string literals at the start of a runner's argument list."""
    found: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in RUNNERS):
                continue
            first = node.args[0] if node.args else None
            names = []
            if isinstance(first, ast.List | ast.Tuple) and first.elts and isinstance(first.elts[0], ast.Constant):
                names = [first.elts[0].value]
            elif node.func.id in ("require_tools", "find_tool"):
                names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            for name in names:
                if isinstance(name, str) and "/" not in name:
                    found.setdefault(name, f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_every_host_program_is_in_the_table() -> None:
    programs = _programs()
    assert len(programs) > 10, programs  # the scan sees the package's commands
    unknown = {name: where for name, where in programs.items() if name not in HOST_TOOLS}
    assert not unknown, f"host programs missing from run.HOST_TOOLS: {unknown}"


def test_every_build_tool_has_packages() -> None:
    assert {"qemu-img", "mkfs.xfs", "mkfs.vfat", "mcopy", "sfdisk", "losetup", "sync"} <= set(BUILD_TOOLS)
    assert all(HOST_TOOLS[name].debian and HOST_TOOLS[name].gentoo for name in HOST_TOOLS)
