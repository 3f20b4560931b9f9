"""Images are untrusted too: `inspect`, `smoke-test` and `qemu` refuse a qcow2 that names another
file to read (a backing file, an external data file) unless the user allows it, and never let
qemu-img or QEMU open that file. The files named here are FIFOs: anything that opened one for
reading would hang until the test's timeout, so a quick, clean refusal proves nothing opened it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import imagebuild_cli, qemu_processes, require_tools

COMMANDS = [("inspect",), ("smoke-test",), ("qemu",)]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "host-disk"
    os.mkfifo(path)
    return path


def refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_backing_file_is_refused(tmp_path: Path, fifo: Path, command: tuple[str, ...]) -> None:
    require_tools("qemu-img")
    image = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(fifo), "-F", "raw", str(image), "1G"],
                   check=True)
    before = qemu_processes()
    result = imagebuild_cli(*command, image, "--arch", "amd64", "--variant", "console", timeout=60)
    refused(result, "names another file to read", f"backing file {fifo}")
    assert "--allow-backing-file" in result.stderr
    assert qemu_processes() - before == set()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_an_external_data_file_is_refused(tmp_path: Path, fifo: Path, command: tuple[str, ...]) -> None:
    require_tools("qemu-img")
    data = tmp_path / "data.raw"
    image = tmp_path / "external.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(image), "64M"],
                   check=True)
    data.unlink()
    os.mkfifo(data)  # what the image now names is a FIFO
    result = imagebuild_cli(*command, image, "--arch", "amd64", "--variant", "console", timeout=60)
    refused(result, "names another file to read", f"external data file {data}")


def test_an_overlay_the_user_allows_is_inspected(console_image_amd64: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(console_image_amd64), "-F", "qcow2",
                    str(overlay)], check=True)
    args = ("inspect", overlay, "--arch", "amd64", "--variant", "console")
    refused(imagebuild_cli(*args, timeout=300), "names another file to read")
    allowed = imagebuild_cli(*args, "--allow-backing-file", timeout=300)
    assert allowed.returncode == 0 and "all checks passed" in allowed.stdout, allowed.stdout + allowed.stderr


@pytest.mark.parametrize("manifest", ["not json {", "[1, 2]", "fifo"])
def test_an_unusable_manifest_beside_an_image(tmp_path: Path, manifest: str) -> None:
    require_tools("qemu-img")
    image = tmp_path / "di-amd64-console.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    companion = tmp_path / "di-amd64-console.qcow2.manifest.json"
    if manifest == "fifo":
        os.mkfifo(companion)
    else:
        companion.write_text(manifest)
    refused(imagebuild_cli("inspect", image, timeout=60), "the build manifest", "is unusable")
