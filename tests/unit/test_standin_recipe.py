"""The stand-in recipes, read without building them."""

from __future__ import annotations

import re

from imagebuild import standin
from imagebuild.config import Arch, InitSystem

OPENRC_SCRIPTS = standin.FILES_DIR / "openrc/etc/init.d"
OPENRCS_OWN = {"cgroups"}  # in Debian's openrc package


def test_every_openrc_runlevel_service_is_an_openrc_script_the_layer_keeps() -> None:
    """The layer deletes every script with an LSB header (Debian's); its runlevels must name only
    scripts it ships, written for openrc-run, or OpenRC's own."""
    ours = {p.name for p in OPENRC_SCRIPTS.iterdir()}
    for level, services in standin._OPENRC_RUNLEVELS.items():
        for service in services:
            assert service in ours | OPENRCS_OWN, f"{level}/{service}: no such script"
    for script in OPENRC_SCRIPTS.iterdir():
        text = script.read_text()
        assert text.startswith("#!/sbin/openrc-run\n"), script.name
        assert "### BEGIN INIT INFO" not in text, f"{script.name} would be deleted as a Debian script"
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"


def test_openrc_inittab_shuts_down_through_openrc() -> None:
    inittab = (standin.FILES_DIR / "openrc/etc/inittab").read_text()
    assert re.search(r"^l0:0:wait:/sbin/openrc shutdown$", inittab, re.M)
    assert re.search(r"^l6:6:wait:/sbin/openrc reboot$", inittab, re.M)
    assert "/etc/init.d/rc" not in inittab


def test_each_deferred_tool_is_diverted_and_restored_in_the_base_layer() -> None:
    base = standin.base_layer(Arch.arm64)
    for tool, command in standin._DEFERRED_TOOLS:
        diverted = [h for h in base.essential_hooks if f"--add {tool}" in h]
        restored = [h for h in base.customize_hooks if f"--remove {tool}" in h]
        assert len(diverted) == 1 and len(restored) == 1, tool
        assert restored[0].endswith(command)
    # Restored only after mmdebstrap has installed everything: customize hooks run last.
    assert not any("--remove" in h for h in base.essential_hooks)


def test_the_recipe_names_the_cached_file() -> None:
    a = standin.standin_path(Arch.amd64, standin.Path("/c"), InitSystem.openrc)
    b = standin.standin_path(Arch.amd64, standin.Path("/c"), InitSystem.systemd)
    assert a != b and a.parent == b.parent == standin.Path("/c/standin")
    assert a == standin.init_layer(Arch.amd64, InitSystem.openrc).path(standin.Path("/c"))
