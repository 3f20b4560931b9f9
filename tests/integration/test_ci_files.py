"""The files in ci/ that schedule the release, checked offline by the tools that run them:
`systemd-analyze verify` for the service and timer, the GitHub workflow schema (vendored by
check-jsonschema) for the workflow."""

from __future__ import annotations

import datetime
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import imagebuild_cli, missing, require_tools

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "ci/imagebuild-release.service"
TIMER = REPO / "ci/imagebuild-release.timer"
WORKFLOW = REPO / "ci/github/release.yml"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given (systemd allows repeating a key)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    """A root with the host's system units, ours, and a stand-in for the ExecStart program
    (verify checks it is executable; the real one lives wherever pip put it)."""
    require_tools("systemd-analyze")
    system = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    if system is None:
        missing("no systemd unit directory on this host (Debian package systemd)")
        raise AssertionError  # not reached: missing() fails or skips
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in (SERVICE, TIMER):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    program = Path(unit_settings(SERVICE)["Service.ExecStart"][0].split()[0])
    assert program.is_absolute()
    stub = root / program.relative_to("/")
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return root


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args, f"--root={root}"], capture_output=True, text=True,
                          timeout=120, check=False)


def test_units_verify(unit_root: Path) -> None:
    result = analyze(unit_root, "verify", "--man=no", f"/etc/systemd/system/{SERVICE.name}",
                     f"/etc/systemd/system/{TIMER.name}")
    assert result.returncode == 0, result.stderr
    # verify exits 0 on unknown keys and bad values it ignores: any message is a defect.
    assert result.stderr.strip() == "", result.stderr


def test_verify_catches_a_bad_unit(unit_root: Path) -> None:
    """The check above is live: a typo in a key and a bad calendar are caught."""
    service = unit_root / "etc/systemd/system" / SERVICE.name
    service.write_text(service.read_text().replace("ProtectSystem=", "ProtectSytem="))
    timer = unit_root / "etc/systemd/system" / TIMER.name
    timer.write_text(re.sub(r"(?m)^OnCalendar=.*$", "OnCalendar=Mondy 25:00", timer.read_text()))
    result = analyze(unit_root, "verify", "--man=no", f"/etc/systemd/system/{SERVICE.name}",
                     f"/etc/systemd/system/{TIMER.name}")
    assert "Unknown key 'ProtectSytem'" in result.stderr
    assert result.returncode != 0 and "calendar" in result.stderr


def test_service_runs_the_release_as_a_hardened_oneshot(unit_root: Path) -> None:
    service = unit_settings(SERVICE)
    assert service["Service.Type"] == ["oneshot"]
    assert service["Service.ExecStart"][0].endswith(" release /etc/imagebuild/release.toml")
    assert service["Service.ProtectSystem"] == ["strict"]
    # It must still reach loop devices and KVM: no PrivateDevices, explicit device allowances.
    assert "Service.PrivateDevices" not in service
    assert {"block-loop rwm", "/dev/loop-control rw", "/dev/kvm rw"} <= set(service["Service.DeviceAllow"])
    assert "CAP_SYS_ADMIN" in service["Service.CapabilityBoundingSet"][0]
    # The hardening stays in place: systemd's own exposure score, 0 (best) to 10 (worst).
    result = analyze(unit_root, "security", "--offline=yes", "--threshold=65", f"/etc/systemd/system/{SERVICE.name}")
    assert result.returncode == 0, result.stdout[-2000:]


def test_timer_is_weekly_and_persistent(unit_root: Path) -> None:
    timer = unit_settings(TIMER)
    assert timer["Timer.Persistent"] == ["true"]
    delay = timer["Timer.RandomizedDelaySec"][0]
    assert re.fullmatch(r"\d+(min|h)", delay), delay
    assert timer["Install.WantedBy"] == ["timers.target"]
    [calendar] = timer["Timer.OnCalendar"]
    result = subprocess.run(["systemd-analyze", "calendar", "--iterations=3", calendar],
                            capture_output=True, text=True, check=True, timeout=60)
    elapses = [datetime.datetime.strptime(m, "%Y-%m-%d %H:%M:%S")
               for m in re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", result.stdout)]
    assert len(elapses) >= 3 and {b - a for a, b in itertools.pairwise(elapses)} == {datetime.timedelta(days=7)}


def check_jsonschema() -> list[str]:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        missing("check-jsonschema is not installed (pip install check-jsonschema; it is in the test extras)")
    return [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]


def test_workflow_matches_githubs_schema() -> None:
    result = subprocess.run([*check_jsonschema(), WORKFLOW], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_catches_a_bad_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "release.yml"
    bad.write_text(WORKFLOW.read_text().replace("runs-on: ${{ matrix.runner }}", "runs_on: ${{ matrix.runner }}"))
    result = subprocess.run([*check_jsonschema(), bad], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0


def load_workflow() -> dict[str, Any]:
    check_jsonschema()  # brings ruamel.yaml, a YAML 1.2 reader ("on" stays a string)
    from ruamel.yaml import YAML

    data: dict[str, Any] = YAML(typ="safe").load(WORKFLOW.read_text())
    return data


def test_workflow_is_a_native_matrix_then_one_publish() -> None:
    workflow = load_workflow()
    assert "schedule" in workflow["on"]
    build, publish = workflow["jobs"]["build"], workflow["jobs"]["publish"]
    matrix = {entry["arch"]: entry["runner"] for entry in build["strategy"]["matrix"]["include"]}
    assert matrix == {"amd64": "ubuntu-24.04", "arm64": "ubuntu-24.04-arm"}, "each arch on its own hardware"
    assert build["strategy"]["fail-fast"] is False
    build_run = " ".join(step.get("run", "") for step in build["steps"])
    assert "imagebuild release" in build_run and "--arch ${{ matrix.arch }}" in build_run
    assert any(step.get("uses", "").startswith("actions/upload-artifact@") for step in build["steps"])
    assert "build" in publish["needs"] and "!cancelled()" in publish["if"]
    publish_run = " ".join(step.get("run", "") for step in publish["steps"])
    assert "--assemble" in publish_run
    assert any(step.get("uses", "").startswith("actions/download-artifact@") for step in publish["steps"])


def test_workflow_uses_only_options_imagebuild_has() -> None:
    workflow = load_workflow()
    lines = [line for job in workflow["jobs"].values() for step in job["steps"]
             for line in step.get("run", "").splitlines() if "imagebuild release" in line]
    used = {option for line in lines for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line)}
    helped = imagebuild_cli("release", "--help", timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert used and all(option in helped.stdout for option in used), (used, helped.stdout)
