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


class Progress:
    """A one-line progress bar on a terminal for a long step (download, unpack, conversion).

    Elsewhere (a pipe, a CI log) nothing, or with ``pipe_quarters`` a line per quarter; silent
    when disabled. ``total`` may be an estimate: the bar stops at 100%."""

    def __init__(self, name: str, total: int, start: int = 0, *, enabled: bool = True,
                 pipe_quarters: bool = False) -> None:
        self.name, self.total, self.start = name, max(total, 1), start
        self.enabled, self.tty = enabled, enabled and sys.stderr.isatty()
        self.quarters = pipe_quarters
        self.began = self.shown = time.monotonic()
        self.quarter = start * 4 // self.total
        self.drawn = False

    def __enter__(self) -> Progress:
        return self

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` of the total so far (``total``: a better figure than the first one)."""
        if total is not None:
            self.total = max(total, 1)
        if not self.tty and not (self.enabled and self.quarters):
            return
        done = min(done, self.total)
        now = time.monotonic()
        if self.tty and (now - self.shown >= 0.2 or done == self.total):
            self.shown, self.drawn = now, True
            rate = (done - self.start) / max(now - self.began, 1e-3)
            percent = 100 * done // self.total
            bar = "#" * (percent // 4) + "." * (25 - percent // 4)
            sys.stderr.write(f"\r  [{bar}] {percent:3d}% {mib(done)} of {mib(self.total)} {mib(int(rate))}/s ")
            sys.stderr.flush()
        elif not self.tty and self.quarters and done * 4 // self.total > self.quarter:
            self.quarter = done * 4 // self.total
            logger.info("  %s: %d%% (%s of %s)", self.name, 25 * self.quarter, mib(done), mib(self.total))

    def __exit__(self, *exc: object) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
