"""Logging setup and ``complete_step``: every pipeline step logs its name and duration."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import time
from collections.abc import Iterator

from imagebuild.errors import ImagebuildError

logger = logging.getLogger("imagebuild")

# Step name -> seconds, in the order the steps ran; the build manifest records it.
STEP_TIMINGS: dict[str, float] = {}


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("imagebuild")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def step_error(step: str, exc: OSError) -> ImagebuildError:
    """An OSError of ``step`` as a message for a person: what, where, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    hint = ("free space there (or point --work-dir / --output at a larger filesystem)"
            if exc.errno == errno.ENOSPC else "check the path and its permissions, then run again")
    return ImagebuildError(f"{step} failed: {exc.strerror or exc}{where}", hint=hint)


@contextlib.contextmanager
def complete_step(text: str, done: str | None = None) -> Iterator[None]:
    """Log ``text`` when a step starts and its duration when it ends."""
    logger.info("‣ %s", text)
    start = time.monotonic()
    try:
        yield
    except OSError as exc:
        # Whatever a step reads or writes on the host, a failure names the step and the path.
        raise step_error(text, exc) from exc
    elapsed = time.monotonic() - start
    STEP_TIMINGS[text] = round(elapsed, 2)
    logger.info("  %s (%.1fs)", done or "done", elapsed)
