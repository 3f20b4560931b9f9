"""Shipped data (templates, specs, cloud-init configuration) and rendering it with jinja2.

Templates render with StrictUndefined: a value left out is an error, never a silent blank.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2

from imagebuild.errors import ImagebuildError

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """A top-level data directory of the repository (``specs``, ``cloud-init``).

    Installed from a wheel it lives inside the package; in a checkout (or an editable
    install) beside it.
    """
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise ImagebuildError(
        f"imagebuild's '{name}' directory is missing from this installation ({PACKAGE_DIR})",
        hint="reinstall imagebuild (pip install .) from a complete checkout",
    )


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader([
            jinja2.PackageLoader("imagebuild", "templates"),
            jinja2.PrefixLoader({"cloud-init": jinja2.FileSystemLoader(shipped_dir("cloud-init"))}),
        ]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render(template: str, **values: Any) -> str:
    return _environment().get_template(template).render(**values)
