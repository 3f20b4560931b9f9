"""One image, made and proven: build, audit, boot-test — in that order, in one place.

``imagebuild build`` and every image of ``imagebuild release`` run this same function, so both
follow the same rule: an image that fails its audit (``imagebuild.inspect``) is never booted,
and a release never publishes it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.config import BuildConfig, Companion
from imagebuild.log import complete_step, logger

if TYPE_CHECKING:
    from imagebuild.build import SharedStage
    from imagebuild.inspect import Report
    from imagebuild.smoketest import SmokeResult


@dataclasses.dataclass(frozen=True)
class Product:
    """A built image, its audit, and its smoke test (None when it was not booted)."""

    image: Path
    build_seconds: float
    report: Report
    smoke: SmokeResult | None

    @property
    def passed(self) -> bool:
        return self.report.passed and (self.smoke is None or self.smoke.passed)

    @property
    def reason(self) -> str:
        """Why it failed, in one line ("" when it passed)."""
        if not self.report.passed:
            return "inspect failed: " + ", ".join(c.name for c in self.report.failed())
        if self.smoke is not None and not self.smoke.passed:
            return f"smoke test: {self.smoke.reason}"
        return ""


def make_image(config: BuildConfig, *, shared: SharedStage | None = None, keep_workspace: bool = False) -> Product:
    """Build ``config``'s image, audit it (``.inspect.json`` beside it), and boot-test it when
    the config asks for a smoke test and the audit passed."""
    from imagebuild.build import build_image
    from imagebuild.inspect import inspect_image
    from imagebuild.smoketest import smoke_test

    reports: list[Report] = []

    def audit(image: Path, raw: Path) -> None:
        # The raw image the qcow2 was converted from, proven equal to it: no copy to make.
        with complete_step(f"Inspecting {image.name}"):
            reports.append(inspect_image(image, config.arch, config.variant, work_dir=config.work_dir, raw=raw))
            Companion.inspect.of(image).write_text(reports[0].to_json())

    if config.smoke_test:
        # A test that cannot run here says so before minutes of building, not after.
        from imagebuild.run import find_tool
        from imagebuild.smoketest.firmware import check_sector_size, find_firmware

        find_tool(config.arch.qemu_system)
        check_sector_size(find_firmware(config.arch), config.arch, config.layout.sector_size)
    started = time.monotonic()
    image = build_image(config, keep_workspace=keep_workspace, shared=shared, audit=audit)
    build_seconds = round(time.monotonic() - started, 1)
    [report] = reports
    smoke = None
    if not report.passed:
        logger.error("✗ %s failed its audit (%s): not boot-testing it", image.name,
                     ", ".join(c.name for c in report.failed()))
    elif config.smoke_test:
        smoke = smoke_test(image, arch=config.arch, variant=config.variant, results_dir=config.output_dir,
                           boot_timeout=config.boot_timeout)
    return Product(image=image, build_seconds=build_seconds, report=report, smoke=smoke)
