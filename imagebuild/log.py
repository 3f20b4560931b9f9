"""Logging setup and ``complete_step``: every pipeline step logs its name and duration."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

logger = logging.getLogger("imagebuild")

# Step name -> seconds, in the order the steps ran; the build manifest records it.
STEP_TIMINGS: dict[str, float] = {}


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("imagebuild")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def complete_step(text: str, done: str | None = None) -> Iterator[None]:
    """Log ``text`` when a step starts and its duration when it ends."""
    logger.info("‣ %s", text)
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    STEP_TIMINGS[text] = round(elapsed, 2)
    logger.info("  %s (%.1fs)", done or "done", elapsed)
