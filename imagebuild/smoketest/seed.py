"""The NoCloud seed the cloud-init smoke test boots with: an ISO 9660 volume labelled ``cidata``.

Built in Python with pycdlib (no genisoimage/xorriso needed on the host). cloud-init's NoCloud
datasource finds it by its volume label and reads ``meta-data`` and ``user-data``.
"""

from __future__ import annotations

import dataclasses
import io
import secrets
from pathlib import Path

import pycdlib

from imagebuild.render import render


@dataclasses.dataclass(frozen=True)
class Seed:
    """What the seed asks cloud-init to do, so the checks know what to expect."""

    instance_id: str
    hostname: str
    user: str
    password: str

    @classmethod
    def make(cls) -> Seed:
        token = secrets.token_hex(4)
        return cls(instance_id=f"imagebuild-smoke-{token}", hostname=f"smoke-{token}",
                   user="smoketest", password=secrets.token_urlsafe(12))


def write_seed_iso(seed: Seed, path: Path) -> Path:
    files = {
        "meta-data": render("nocloud-meta-data.j2", seed=seed),
        "user-data": render("nocloud-user-data.j2", seed=seed),
    }
    iso = pycdlib.PyCdlib()
    # Joliet and Rock Ridge keep the lower-case names cloud-init looks for.
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    try:
        for name, text in files.items():
            data = text.encode()
            iso.add_fp(io.BytesIO(data), len(data), f"/{name.upper().replace('-', '')}.;1",
                       rr_name=name, joliet_path=f"/{name}")
        iso.write(str(path))
    finally:
        iso.close()
    return path
