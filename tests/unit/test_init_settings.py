"""Which init a build expects, which spec and stand-in that picks, and what the image is called."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuild.config import Arch, InitSystem, Variant
from imagebuild.errors import ConfigError
from imagebuild.resolve import Overrides, resolve

pytestmark = pytest.mark.unit

STAMP = "20261204T000000Z"


def build(variant: Variant = Variant.console, *, stage: str | None = None, spec: Path | None = None,
          init: InitSystem | None = None) -> tuple[str, InitSystem | None, str, str]:
    settings = {"stage": stage} if stage else {}
    config = resolve(Arch.amd64, variant, Overrides(stamp=STAMP, spec=spec, init=init, settings=settings))
    assert config.spec_path is not None
    return str(config.stage), config.init, config.spec_path.name, config.image_name


def test_the_shipped_systemd_spec_by_default() -> None:
    assert build(stage="standin") == ("standin-systemd", InitSystem.systemd, "console.spec",
                                      f"di-amd64-console-{STAMP}.qcow2")


@pytest.mark.parametrize("how", [{"stage": "standin-openrc"}, {"stage": "standin", "init": InitSystem.openrc},
                                 {"init": InitSystem.openrc}])
def test_openrc_picks_the_openrc_spec_and_stand_in(how: dict[str, object]) -> None:
    stage, init, spec, image = build(Variant.cloudinit, **how)  # type: ignore[arg-type]
    assert (init, spec, image) == (InitSystem.openrc, "cloud-init-openrc.spec",
                                   f"di-amd64-cloudinit-openrc-{STAMP}.qcow2")
    assert stage == ("mirror https://distfiles.gentoo.org (stage3-amd64-openrc)" if "stage" not in how
                     else "standin-openrc")


def test_the_spec_profile_decides_the_stand_in(tmp_path: Path) -> None:
    spec = tmp_path / "mine.spec"
    spec.write_text("subarch: amd64\nprofile: default/linux/amd64/23.0\ndiskimage/type: console\n")
    assert build(stage="standin", spec=spec) == ("standin-openrc", InitSystem.openrc, "mine.spec",
                                                 f"di-amd64-console-openrc-{STAMP}.qcow2")
    spec.write_text("subarch: amd64\nprofile: default/linux/amd64/23.0/no-multilib/systemd\n")
    assert build(stage="standin", spec=spec)[:2] == ("standin-systemd", InitSystem.systemd)


def test_a_stand_in_of_the_other_init_is_refused() -> None:
    with pytest.raises(ConfigError, match="--stage standin-openrc is the openrc stand-in, but --init systemd"):
        build(stage="standin-openrc", init=InitSystem.systemd)


@pytest.mark.parametrize("stamp", ["x/../../escape", "../up", ".hidden", "two\nlines", "a b", "x" * 201])
def test_a_stamp_that_is_not_a_plain_name_is_refused(stamp: str) -> None:
    with pytest.raises(ConfigError, match="is not a plain name"):
        resolve(Arch.amd64, Variant.console, Overrides(stamp=stamp, settings={"stage": "standin"}))


@pytest.mark.parametrize("name", ["../escape.qcow2", "sub/dir.qcow2", "di-@STAMP@.qcow2", ".hidden.qcow2"])
def test_an_image_name_that_is_not_a_plain_name_is_refused(tmp_path: Path, name: str) -> None:
    spec = tmp_path / "evil.spec"
    spec.write_text(f"subarch: amd64\ndiskimage/qcow2: {name}\n")
    with pytest.raises(ConfigError, match="is not a plain file name"):
        resolve(Arch.amd64, Variant.console, Overrides(spec=spec, stamp=STAMP, settings={"stage": "standin"}))
