"""Smoke-test results as JSON and JUnit XML."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imagebuild.smoketest.results import (
    CheckResult,
    SmokeResult,
    read_json,
    write_json,
    write_junit,
)

pytestmark = pytest.mark.unit


def passed_result() -> SmokeResult:
    return SmokeResult(
        image="/out/di-amd64-console.qcow2",
        arch="amd64",
        variant="console",
        accel="tcg",
        passed=True,
        phase_reached="shutdown",
        phase_seconds={"firmware": 4.1, "grub": 1.2, "kernel": 18.5, "login": 2.0, "checks": 6.0,
                       "shutdown": 3.3},  # fmt: skip
        checks=[
            CheckResult("arch", True, "uname -m: x86_64"),
            CheckResult("root-xfs", True, "/ is xfs"),
            CheckResult("boot-vfat", True, "/boot is vfat"),
        ],
        console_log="/res/di-amd64-console.qcow2.console.log",
        total_seconds=35.1,
    )


def junit(path: Path) -> ET.Element:
    return ET.parse(path).getroot()


def test_json_round_trip(tmp_path: Path) -> None:
    result = passed_result()
    path = tmp_path / "r.smoke.json"
    write_json(result, path)

    data = json.loads(path.read_text())
    assert data["passed"] is True
    assert data["checks"][0] == {"name": "arch", "passed": True, "detail": "uname -m: x86_64"}
    assert data["phase_seconds"]["kernel"] == 18.5
    assert data["screenshot"] is None
    assert read_json(path) == result


def test_junit_for_a_passed_run(tmp_path: Path) -> None:
    path = tmp_path / "r.smoke.xml"
    write_junit(passed_result(), path)

    suite = junit(path)
    cases = suite.findall("testcase")
    assert suite.get("tests") == "7" == str(len(cases))  # 4 boot phases + 3 checks
    assert suite.get("failures") == "0"
    assert suite.get("skipped") == "0"
    assert [c.get("name") for c in cases[:4]] == ["firmware", "grub", "kernel", "login"]
    assert cases[2].get("time") == "18.500"
    assert not suite.findall(".//failure")


def test_junit_for_a_boot_that_stopped_in_the_firmware(tmp_path: Path) -> None:
    result = SmokeResult(
        image="/tmp/blank.qcow2",
        arch="arm64",
        variant="console",
        accel="tcg",
        passed=False,
        reason="firmware found nothing bootable and started the UEFI shell",
        phase_reached="firmware",
        phase_seconds={"firmware": 6.2, "shutdown": 0.3},
        screenshot="/res/blank.qcow2.screen.png",
    )
    path = tmp_path / "r.smoke.xml"
    write_junit(result, path)

    suite = junit(path)
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "3")
    failure = suite.find("testcase[@name='firmware']/failure")
    assert failure is not None and "UEFI shell" in failure.get("message", "")
    for phase in ("grub", "kernel", "login"):
        assert suite.find(f"testcase[@name='{phase}']/skipped") is not None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["screenshot"] == "/res/blank.qcow2.screen.png"


def test_junit_for_failed_checks(tmp_path: Path) -> None:
    result = passed_result()
    result.passed = False
    result.reason = "failed checks: nothing-listening"
    result.checks.append(CheckResult("nothing-listening", False, "listening TCP sockets: 0.0.0.0:22"))
    path = tmp_path / "r.smoke.xml"
    write_junit(result, path)

    suite = junit(path)
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("8", "1", "0")
    failure = suite.find("testcase[@name='nothing-listening']/failure")
    assert failure is not None and "0.0.0.0:22" in (failure.text or "")


def test_junit_for_a_failed_shutdown(tmp_path: Path) -> None:
    result = passed_result()
    result.passed = False
    result.reason = "the guest did not power off within 180s of `poweroff`"
    path = tmp_path / "r.smoke.xml"
    write_junit(result, path)

    suite = junit(path)
    assert (suite.get("tests"), suite.get("failures")) == ("8", "1")
    assert suite.find("testcase[@name='shutdown']/failure") is not None
