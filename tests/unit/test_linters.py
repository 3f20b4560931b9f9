"""The code passes its type checker and linter (mkosi's tests/test_linters.py does the same):
`python3 -m mypy` (settings in pyproject.toml, over imagebuild/) and `ruff check`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import missing

REPO = Path(__file__).resolve().parents[2]


def test_mypy() -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        missing("mypy is not installed (pip install -e '.[test]')")
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff() -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        missing("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "imagebuild", "tests"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
