"""The outcome of one smoke test, written as JSON (for the release job) and JUnit XML (for CI)."""

from __future__ import annotations

import dataclasses
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# The boot phases in the order a guest passes through them; each is a JUnit test case.
BOOT_PHASES = ("firmware", "grub", "kernel", "login")
# What follows the boot: running the checks and shutting down.
PHASES = (*BOOT_PHASES, "checks", "shutdown")


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One named check run inside the booted guest."""

    name: str
    passed: bool
    detail: str = ""


@dataclasses.dataclass
class SmokeResult:
    """Everything one smoke test found out, in the shape of the JSON it is written as."""

    image: str
    arch: str
    variant: str
    accel: str  # "kvm" or "tcg"
    sector_size: int = 512  # of the virtual disk, the image's own
    passed: bool = False
    reason: str = ""  # why it failed; empty when it passed
    phase_reached: str = ""  # the phase the run was in when it ended (see PHASES)
    phase_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    checks: list[CheckResult] = dataclasses.field(default_factory=list)
    console_log: str | None = None
    screenshot: str | None = None
    total_seconds: float = 0.0
    firmware: str | None = None
    attempts: int = 1  # boots it took (a known TCG timing failure is retried once)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SmokeResult:
        fields = dict(data)
        fields["checks"] = [CheckResult(**c) for c in data.get("checks", [])]
        return cls(**fields)


def write_json(result: SmokeResult, path: Path) -> None:
    _write_atomically(path, json.dumps(result.to_dict(), indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> SmokeResult:
    return SmokeResult.from_dict(json.loads(path.read_text()))


def junit_tree(result: SmokeResult) -> ET.Element:
    """One test case per boot phase and per check; failures carry the reason."""
    suite = ET.Element(
        "testsuite",
        name=f"smoke-test.{result.arch}.{result.variant}",
        time=f"{result.total_seconds:.3f}",
    )
    props = ET.SubElement(suite, "properties")
    for key in ("image", "arch", "variant", "accel", "sector_size", "firmware", "console_log", "screenshot"):
        value = getattr(result, key)
        if value is not None:
            ET.SubElement(props, "property", name=key, value=str(value))

    failures = skipped = tests = 0
    classname = f"smoke.{result.arch}.{result.variant}"
    failed_phase = None if result.passed else result.phase_reached
    reached = PHASES.index(result.phase_reached) if result.phase_reached in PHASES else -1
    for index, phase in enumerate(BOOT_PHASES):
        tests += 1
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{classname}.boot",
            name=phase,
            time=f"{result.phase_seconds.get(phase, 0.0):.3f}",
        )
        if phase == failed_phase:
            failures += 1
            ET.SubElement(case, "failure", message=result.reason, type="BootFailure").text = (
                result.reason
            )
        elif index > reached:
            skipped += 1
            ET.SubElement(case, "skipped", message="not reached")

    for check in result.checks:
        tests += 1
        case = ET.SubElement(suite, "testcase", classname=f"{classname}.check", name=check.name)
        if not check.passed:
            failures += 1
            ET.SubElement(case, "failure", message=check.detail, type="CheckFailure").text = (
                check.detail
            )
        elif check.detail:
            ET.SubElement(case, "system-out").text = check.detail

    # A failure outside the boot phases and the checks (for example in shutdown) still counts.
    if not result.passed and failed_phase not in BOOT_PHASES and all(c.passed for c in result.checks):
        tests += 1
        failures += 1
        case = ET.SubElement(
            suite, "testcase", classname=f"{classname}.run", name=failed_phase or "run"
        )
        ET.SubElement(case, "failure", message=result.reason, type="RunFailure").text = (
            result.reason
        )

    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    ET.indent(suite)
    return suite


def write_junit(result: SmokeResult, path: Path) -> None:
    text = ET.tostring(junit_tree(result), encoding="unicode", xml_declaration=True)
    _write_atomically(path, text + "\n")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
