"""The build's private scratch directory, removed on every exit path."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from imagebuild.errors import WorkspaceError
from imagebuild.log import logger
from imagebuild.mounts import remove_tree


class Workspace:
    """A fresh directory under ``base``; leaving the block removes it (never through a mount)."""

    def __init__(self, base: Path, name: str, keep: bool = False) -> None:
        self.base = base
        self.name = name
        self.keep = keep
        self.path: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.base))
        except OSError as exc:
            raise WorkspaceError(
                f"cannot create a workspace under {self.base}: {exc.strerror}",
                hint="point --work-dir at a writable directory with a few GiB free",
            ) from exc
        # Who owns this directory, for a later run that finds it after a crash.
        (self.path / "owner.json").write_text(
            json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n"
        )
        logger.debug("workspace %s", self.path)
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        if self.keep:
            logger.info("keeping workspace %s", self.path)
            return
        remove_tree(self.path)
        self.path = None
