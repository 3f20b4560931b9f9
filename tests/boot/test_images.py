"""The product end to end: the README's main job — an amd64 console image built from the
stand-in stage and boot-tested under QEMU + edk2 — and its results read back.

All eight images (amd64/arm64 × console/cloud-init × systemd/OpenRC) are built and
boot-tested by the release job in test_release.py, which checks the same per-image results;
building them here again would double the slowest part of CI."""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imagebuild.config import Arch

from conftest import CACHE_DIR, _standin, imagebuild_cli, qemu_processes

pytestmark = pytest.mark.boot

EXPECTED_CHECKS = {
    "console": ["arch", "root-xfs", "boot-vfat", "no-failed-units", "nothing-listening",
                "root-login-empty-password"],
    "cloud-init": ["cloud-init-done", "cloud-init-config-valid", "arch", "root-xfs", "boot-vfat", "no-failed-units",
                   "hostname-from-seed", "hostname-resolves", "seeded-login", "root-empty-password-refused",
                   "ssh-host-keys-made-at-boot", "sshd-listening", "cloud-init-on-serial-console",
                   "root-grown-to-disk"],
}


@pytest.mark.parametrize(
    "arch, variant, sector",
    [("amd64", "console", 512), ("amd64", "console", 4096),
     pytest.param("arm64", "console", 4096, marks=pytest.mark.standin("arm64"))],
    ids=["amd64-console", "amd64-console-4kn", "arm64-console-4kn"],
)
def test_build_and_boot(arch: str, variant: str, sector: int, tmp_path: Path) -> None:
    """The README's job; and the same on request with 4096-byte sectors, booted on a 4Kn disk."""
    _standin(Arch(arch))  # built and cached once; the build below must reuse it
    before = qemu_processes()
    out = tmp_path / "out"
    result = imagebuild_cli("build", arch, variant, "--stage", "standin", "-o", out, "--cache-dir", CACHE_DIR,
                            *(["--sector-size", str(sector)] if sector != 512 else []), timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reusing cached stand-in" in result.stderr
    assert "STAND-IN" in result.stderr, "the stand-in must say what it is"
    [image] = out.glob("*.qcow2")
    assert image.name.startswith(f"di-{arch}-{variant.replace('-', '')}-")

    smoke = json.loads(image.with_name(image.name + ".smoke.json").read_text())
    assert smoke["passed"] and smoke["arch"] == arch and smoke["variant"] == variant
    assert smoke["sector_size"] == sector, "the smoke test's disk has the image's sector size"
    assert [c["name"] for c in smoke["checks"]] == EXPECTED_CHECKS[variant]
    assert all(c["passed"] for c in smoke["checks"])
    log = Path(smoke["console_log"]).read_text(errors="replace")
    assert "GNU GRUB" in log, "GRUB on the serial console"
    assert "Linux version" in log, "the kernel's log on the serial console"
    assert "__IB_END_" in log, "a shell answered commands"
    assert re.search(rf"\[vda\] \d+ {sector}-byte logical blocks", log), "the guest's disk has the image's sectors"

    suite = ET.parse(image.with_name(image.name + ".smoke.xml")).getroot()
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    for name in EXPECTED_CHECKS[variant]:
        assert name in cases and cases[name].find("failure") is None, name
    assert suite.get("failures") == "0"

    # Booting never wrote the image: it still matches the DIGESTS the build published.
    digests = image.with_name(image.name + ".DIGESTS").read_text().splitlines()
    assert digests[3] == f"{hashlib.sha512(image.read_bytes()).hexdigest()}  {image.name}"
    audit = json.loads(image.with_name(image.name + ".inspect.json").read_text())
    assert audit["passed"]
    assert f"{sector}-byte sectors" in json.dumps(audit)
    assert qemu_processes() - before == set(), "a QEMU process was left behind"
