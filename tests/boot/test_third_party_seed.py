"""The cloud-init images take a NoCloud seed made the way users make them: cloud-localds
(Debian's cloud-image-utils), as an ISO 9660 volume (genisoimage) and as a FAT one — not the
seed imagebuild writes itself with pycdlib."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from imagebuild.config import Arch, Variant
from imagebuild.render import render
from imagebuild.smoketest import smoke_test
from imagebuild.smoketest.seed import Seed

from conftest import qemu_processes, require_tools

pytestmark = pytest.mark.boot


def cloud_localds(fmt: str) -> object:
    def write(seed: Seed, path: Path) -> Path:
        user_data, meta_data = path.with_name("user-data"), path.with_name("meta-data")
        user_data.write_text(render("nocloud-user-data.j2", seed=seed))
        meta_data.write_text(render("nocloud-meta-data.j2", seed=seed))
        subprocess.run(["cloud-localds", "--filesystem", fmt, str(path), str(user_data), str(meta_data)],
                       check=True, capture_output=True)
        kind = subprocess.run(["blkid", "-o", "export", str(path)], capture_output=True, text=True).stdout
        assert "LABEL=cidata" in kind.replace("LABEL=CIDATA", "LABEL=cidata"), kind
        return path

    return write


@pytest.mark.parametrize(("fixture", "fmt"), [("cloudinit_openrc_image_amd64", "vfat"),
                                              ("cloudinit_image_amd64", "iso9660")])
def test_cloud_localds_seed(fixture: str, fmt: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    require_tools("cloud-localds", "genisoimage", "mkfs.vfat", "mcopy")
    image: Path = request.getfixturevalue(fixture)
    before = qemu_processes()
    result = smoke_test(image, arch=Arch.amd64, variant=Variant.cloudinit, results_dir=tmp_path,
                        write_seed=cloud_localds(fmt))  # type: ignore[arg-type]
    log = Path(result.console_log).read_text(errors="replace")
    assert result.passed, f"{result.reason}\n{log[-3000:]}"
    checks = {check.name for check in result.checks}
    assert {"cloud-init-done", "hostname-from-seed", "seeded-login", "root-empty-password-refused"} <= checks
    assert "DataSourceNoCloud" in log
    assert qemu_processes() - before == set()
