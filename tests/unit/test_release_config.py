"""The release job's pure parts: its config, Gentoo's pointer format, what to prune, the lock,
and publishing (on fake trees of empty files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imagebuild.config import Arch, ImageKind, InitSystem, Variant
from imagebuild.errors import ConfigError
from imagebuild.publish import (
    ImageResult,
    assemble,
    gather,
    pointer_name,
    pointer_text,
    prune,
    prune_plan,
    publish,
    read_pointer,
    release_lock,
    signals_deferred,
    staging_area,
    summary_table,
    tree_dir,
)
from imagebuild.release import load_release_config, parse_release_config, select

from conftest import missing
from loopback_mirror import stop_gpg_agent

REPO = Path(__file__).resolve().parents[2]
STAMPS = ["20261103T000000Z", "20261110T000000Z", "20261117T000000Z", "20261124T000000Z"]
EPOCH = 1795478400  # 2026-11-24T00:00:00Z, a Tuesday
CONSOLE, CLOUD = ImageKind(Variant.console), ImageKind(Variant.cloudinit)
CONSOLE_OPENRC = ImageKind(Variant.console, InitSystem.openrc)
CLOUD_OPENRC = ImageKind(Variant.cloudinit, InitSystem.openrc)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "release.toml"
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """
    output = "public"
    architectures = ["amd64", "arm64"]
    variants = ["console", "cloud-init"]
"""


# -- the config ------------------------------------------------------------------------------


def test_minimal_config_takes_gentoo_defaults(tmp_path: Path) -> None:
    config = load_release_config(write_config(tmp_path, MINIMAL))
    assert config.output == tmp_path / "public", "relative paths are relative to the file"
    assert config.architectures == (Arch.amd64, Arch.arm64)
    assert config.variants == (CONSOLE, CLOUD)
    assert config.stages == {(arch, init): "mirror" for arch in (Arch.amd64, Arch.arm64) for init in InitSystem}
    assert config.keep == 4 and config.settings == {} and config.sign is None, "the builds take the defaults"


def test_full_config(tmp_path: Path) -> None:
    config = load_release_config(write_config(tmp_path, """
        output = "/srv/imagebuild"
        architectures = ["arm64"]
        variants = ["cloudinit", "console-openrc", "cloudinit-openrc"]
        keep = 2
        compression = "zstd"
        sign = "0x1234ABCD"
        work_dir = "work"
        cache_dir = "/var/cache/imagebuild"
        mirror = "http://127.0.0.1:8080"
        keyring = "keys/gentoo.gpg"
        boot_timeout = 900
        [stages]
        arm64 = "stages/seed.tar.xz"
        "arm64/openrc" = "stages/seed-openrc.tar.xz"
        amd64 = "standin"
        [specs]
        "arm64/cloud-init" = "specs/cloud.spec"
        "amd64/console-openrc" = "specs/console-openrc.spec"
    """))
    assert config.variants == (CLOUD, CONSOLE_OPENRC, CLOUD_OPENRC), "Catalyst's spelling cloudinit is accepted"
    assert config.keep == 2 and config.sign == "0x1234ABCD"
    assert config.settings == {"compression": "zstd", "work_dir": str(tmp_path / "work"),
                               "cache_dir": "/var/cache/imagebuild", "mirror": "http://127.0.0.1:8080",
                               "keyring": str(tmp_path / "keys/gentoo.gpg"), "boot_timeout": "900"}
    assert config.stages == {(Arch.arm64, InitSystem.systemd): str(tmp_path / "stages/seed.tar.xz"),
                             (Arch.arm64, InitSystem.openrc): str(tmp_path / "stages/seed-openrc.tar.xz")}, \
        "stages only for the architectures the release builds"
    assert config.specs == {(Arch.arm64, CLOUD): tmp_path / "specs/cloud.spec",
                            (Arch.amd64, CONSOLE_OPENRC): tmp_path / "specs/console-openrc.spec"}


def test_shipped_config_is_valid() -> None:
    config = load_release_config(REPO / "ci/release.toml")
    assert set(config.architectures) == {Arch.amd64, Arch.arm64}
    assert set(config.variants) == {CONSOLE, CLOUD}
    assert set(config.stages.values()) == {"mirror"}, "the weekly release builds from Gentoo's mirror"
    assert config.output.is_absolute()


def problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_release_config(write_config(tmp_path, text))
    message = str(info.value)
    assert str(tmp_path / "release.toml") in message, "the error names the file"
    return message


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    message = problems(tmp_path, MINIMAL + 'kepp = 3\n')
    assert "unknown key 'kepp'" in message
    assert "ci/release.toml" in message, "the hint says where every key is shown"


def test_bad_arch_is_an_error(tmp_path: Path) -> None:
    message = problems(tmp_path, """
        output = "public"
        architectures = ["amd64", "mips"]
        variants = ["console"]
    """)
    assert "'architectures': unknown architecture 'mips'" in message
    assert "amd64, arm64, riscv64" in message, "it says what is allowed"


@pytest.mark.parametrize("keep", ["0", "-1", "true", '"4"', "1.5"])
def test_keep_must_be_at_least_one(tmp_path: Path, keep: str) -> None:
    assert "'keep' must be a whole number of releases, at least 1" in problems(tmp_path, MINIMAL + f"keep = {keep}\n")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    message = problems(tmp_path, """
        architectures = []
        variants = ["desktop"]
        compression = "lz4"
        colour = "blue"
        [stages]
        sparc = "mirror"
        "amd64/upstart" = "mirror"
        [specs]
        amd64 = "x.spec"
        "amd64/console-runit" = "x.spec"
    """)
    for part in ("unknown key 'colour'", "'output' is missing", "'architectures' must be a non-empty list",
                 "unknown image variant 'desktop'", "'compression' must be one of: zlib, zstd, not 'lz4'",
                 "[stages] 'sparc' is not ARCH or ARCH/INIT", "[stages] 'amd64/upstart' is not ARCH or ARCH/INIT",
                 "[specs] 'amd64' is not ARCH/VARIANT", "[specs] 'amd64/console-runit' is not ARCH/VARIANT"):
        assert part in message
    assert "9 problem(s)" in message


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    assert "not valid TOML" in problems(tmp_path, 'output = "x\n')


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read release config"):
        load_release_config(tmp_path / "nope.toml")


def test_select_narrows_to_arch_and_variant(tmp_path: Path) -> None:
    config = load_release_config(write_config(tmp_path, MINIMAL))
    assert select(config, None, None) == [(Arch.amd64, CONSOLE), (Arch.amd64, CLOUD),
                                          (Arch.arm64, CONSOLE), (Arch.arm64, CLOUD)]
    assert select(config, [Arch.arm64], None) == [(Arch.arm64, CONSOLE), (Arch.arm64, CLOUD)]
    assert select(config, None, [CLOUD]) == [(Arch.amd64, CLOUD), (Arch.arm64, CLOUD)]
    with pytest.raises(ConfigError, match="has no variant console-openrc"):
        select(config, None, [CONSOLE_OPENRC])
    narrow = parse_release_config({"output": "x", "architectures": ["amd64"], "variants": ["console"]},
                                  tmp_path / "r.toml")
    with pytest.raises(ConfigError, match="has no architecture arm64"):
        select(narrow, [Arch.arm64], None)


# -- pointers --------------------------------------------------------------------------------


def test_pointer_is_gentoos_format() -> None:
    text = pointer_text(STAMPS[-1], "di-amd64-console-20261124T000000Z.qcow2", 354418688, EPOCH)
    assert text == (
        "# Latest as of Tue, 24 Nov 2026 00:00:00 +0000\n"
        "# ts=1795478400\n"
        "20261124T000000Z/di-amd64-console-20261124T000000Z.qcow2 354418688\n"
    )
    assert pointer_name(Arch.arm64, CLOUD) == "latest-di-arm64-cloudinit.txt"
    assert pointer_name(Arch.amd64, CONSOLE_OPENRC) == "latest-di-amd64-console-openrc.txt"
    assert pointer_name(Arch.amd64, CLOUD_OPENRC) == "latest-di-amd64-cloudinit-openrc.txt"


@pytest.mark.parametrize(("text", "kind", "name"), [
    ("console", CONSOLE, "console"), ("cloud-init", CLOUD, "cloud-init"), ("cloudinit", CLOUD, "cloud-init"),
    ("console-systemd", CONSOLE, "console"), ("console-openrc", CONSOLE_OPENRC, "console-openrc"),
    ("cloud-init-openrc", CLOUD_OPENRC, "cloud-init-openrc"), ("cloudinit-openrc", CLOUD_OPENRC, "cloud-init-openrc"),
])
def test_image_kinds(text: str, kind: ImageKind, name: str) -> None:
    assert ImageKind.parse(text) == kind and str(kind) == name


@pytest.mark.parametrize("text", ["desktop", "console-runit", "openrc", "-openrc", "console-"])
def test_unknown_image_kinds(text: str) -> None:
    with pytest.raises(ConfigError, match="unknown image variant"):
        ImageKind.parse(text)


def test_read_pointer_reads_plain_and_clearsigned(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text(pointer_text(STAMPS[0], "di-arm64-console-20261103T000000Z.qcow2", 12, EPOCH))
    assert read_pointer(plain) == (STAMPS[0], "di-arm64-console-20261103T000000Z.qcow2", 12)
    signed = tmp_path / "signed.txt"  # how Gentoo publishes latest-stage3-*.txt
    signed.write_text(
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\n"
        "# Latest as of Sun, 23 Nov 2025 17:03:21 +0000\n# ts=1763917401\n"
        "20251123T170321Z/stage3-amd64-openrc-20251123T170321Z.tar.xz 289104348\n"
        "-----BEGIN PGP SIGNATURE-----\n\niHUEARYKAB0WIQ=\n-----END PGP SIGNATURE-----\n")
    assert read_pointer(signed) == ("20251123T170321Z", "stage3-amd64-openrc-20251123T170321Z.tar.xz", 289104348)
    assert read_pointer(tmp_path / "absent.txt") is None


# -- pruning ---------------------------------------------------------------------------------


def test_prune_plan_keeps_the_newest_and_the_pointed() -> None:
    assert prune_plan(STAMPS, set(), keep=2) == STAMPS[:2]
    assert prune_plan(STAMPS, {STAMPS[0]}, keep=2) == [STAMPS[1]]
    assert prune_plan(STAMPS, set(), keep=4) == []
    assert prune_plan(STAMPS, set(), keep=10) == []
    assert prune_plan([*STAMPS, "current", "2026-11-24"], set(), keep=3) == STAMPS[:1], "only stamps count"
    with pytest.raises(ConfigError):
        prune_plan(STAMPS, set(), keep=0)


def fake_release(out: Path, arch: str, stamp: str, variants: tuple[str, ...] = ("console", "cloudinit")) -> None:
    directory = out / "releases" / arch / "autobuilds" / stamp
    directory.mkdir(parents=True)
    for variant in variants:
        for suffix in ("", ".DIGESTS", ".CONTENTS.gz"):
            (directory / f"di-{arch}-{variant}-{stamp}.qcow2{suffix}").touch()


def test_prune_on_a_tree_never_deletes_what_a_pointer_names(tmp_path: Path) -> None:
    autobuilds = tmp_path / "releases/amd64/autobuilds"
    for stamp in STAMPS:
        fake_release(tmp_path, "amd64", stamp)
    # The console image failed in the last three releases: its pointer still names the first.
    (autobuilds / "latest-di-amd64-console.txt").write_text(
        pointer_text(STAMPS[0], f"di-amd64-console-{STAMPS[0]}.qcow2", 0, EPOCH))
    (autobuilds / "latest-di-amd64-cloudinit.txt").write_text(
        pointer_text(STAMPS[3], f"di-amd64-cloudinit-{STAMPS[3]}.qcow2", 0, EPOCH))
    # Gentoo's own stage3 releases may share the directory: not ours to delete.
    (autobuilds / "20261001T000000Z").mkdir()
    (autobuilds / "20261001T000000Z/stage3-amd64-openrc-20261001T000000Z.tar.xz").touch()
    trash = tmp_path / "trash"
    trash.mkdir()

    from imagebuild.publish import pointed_stamps
    removed = prune(autobuilds, 2, trash, pointed=pointed_stamps(autobuilds))

    assert removed == [STAMPS[1]]
    assert sorted(p.name for p in autobuilds.iterdir() if p.is_dir()) == ["20261001T000000Z", STAMPS[0], *STAMPS[2:]]
    assert len(list(trash.iterdir())) == 1


# -- the lock --------------------------------------------------------------------------------

_TRY_LOCK = """
import sys
from pathlib import Path
from imagebuild.errors import ConfigError
from imagebuild.publish import release_lock
try:
    with release_lock(Path(sys.argv[1])):
        print("LOCKED")
except ConfigError as exc:
    print(exc)
"""


def try_lock(out: Path) -> str:
    return subprocess.run([sys.executable, "-c", _TRY_LOCK, str(out)], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60).stdout


def test_second_lock_refuses_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with release_lock(out):
        message = try_lock(out)
        assert f"another imagebuild release (pid {os.getpid()}) is already running on {out}" in message
        assert "wait for it to finish" in message
    assert try_lock(out).strip() == "LOCKED", "the lock is free again afterwards"


# -- publishing, on empty files --------------------------------------------------------------


def result(arch: Arch, variant: Variant, stamp: str, passed: bool, reason: str = "") -> ImageResult:
    image = f"di-{arch.gentoo}-{variant.file_part}-{stamp}.qcow2"
    suffixes = ["", ".DIGESTS", ".CONTENTS.gz", ".smoke.json", ".smoke.xml", ".console.log"]
    return ImageResult(arch=arch, variant=variant, image=image, passed=passed, reason=reason, size=0,
                       build_seconds=30.0, boot_seconds=40.0, files=[image + s for s in suffixes])


def publish_fake(out: Path, stamp: str, results: list[ImageResult], keep: int = 4) -> None:
    source = out.parent / f"built-{stamp}"
    with release_lock(out), staging_area(out, stamp) as staging:
        for r in results:
            (source / r.arch.value).mkdir(parents=True, exist_ok=True)
            for name in r.files:
                (source / r.arch.value / name).write_text(name)
            gather(r, source / r.arch.value, staging, stamp, move=True)
        assert (tree_dir(staging) / "releases").exists() or not any(r.passed for r in results)
        publish(out, staging, stamp, results, keep=keep, sign=None, now=EPOCH)
    assert not list(out.glob(".staging-*")), "staging is removed"


def test_publish_updates_only_the_pointers_of_passed_images(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = [result(a, v, STAMPS[0], True) for a in Arch for v in Variant]
    publish_fake(out, STAMPS[0], first)
    pointers = {p.name: p.read_bytes() for p in out.glob("releases/*/autobuilds/latest-*.txt")}
    assert len(pointers) == 6
    # riscv64 under Gentoo's names: releases/riscv/, di-rv64_lp64d-* (releng's specs-qemu/riscv).
    riscv = out / "releases/riscv/autobuilds"
    assert (riscv / "latest-di-rv64_lp64d-console.txt").read_text().startswith("# Latest as of")
    assert (riscv / STAMPS[0] / f"di-rv64_lp64d-console-{STAMPS[0]}.qcow2").is_file()

    second = [result(Arch.amd64, Variant.console, STAMPS[1], True),
              result(Arch.arm64, Variant.console, STAMPS[1], False, "smoke test: GRUB error: <bad> & worse")]
    publish_fake(out, STAMPS[1], second)

    amd64 = out / "releases/amd64/autobuilds"
    assert read_pointer(amd64 / "latest-di-amd64-console.txt") == (STAMPS[1], second[0].image, 0)
    assert (amd64 / "latest-di-amd64-cloudinit.txt").read_bytes() == pointers["latest-di-amd64-cloudinit.txt"]
    arm64 = out / "releases/arm64/autobuilds"
    assert (arm64 / "latest-di-arm64-console.txt").read_bytes() == pointers["latest-di-arm64-console.txt"]
    assert not (arm64 / STAMPS[1]).exists(), "a failed image stays out of the published tree"
    assert (out / "failed" / STAMPS[1] / "arm64" / (second[1].image + ".console.log")).is_file()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["stamp"] == STAMPS[1] and [i["passed"] for i in summary["images"]] == [True, False]
    html = (out / "index.html").read_text()
    assert "&lt;bad&gt; &amp; worse" in html and "<bad>" not in html, "the page escapes what it shows"
    assert f'href="failed/{STAMPS[1]}/arm64/{second[1].image}.console.log"' in html
    assert f'href="releases/amd64/autobuilds/{STAMPS[1]}/{second[0].image}.smoke.xml"' in html


def test_publish_keeps_the_last_n(tmp_path: Path) -> None:
    out = tmp_path / "out"
    publish_fake(out, STAMPS[0], [result(Arch.amd64, v, STAMPS[0], True) for v in Variant], keep=2)
    for stamp in STAMPS[1:]:
        publish_fake(out, stamp, [result(Arch.amd64, Variant.console, stamp, True),
                                  result(Arch.amd64, Variant.cloudinit, stamp, False, "broken")], keep=2)
    stamps = sorted(p.name for p in (out / "releases/amd64/autobuilds").iterdir() if p.is_dir())
    assert stamps == [STAMPS[0], *STAMPS[2:]], "the oldest stays: the cloud-init pointer names it"
    assert sorted(p.name for p in (out / "failed").iterdir()) == STAMPS[2:]


def test_assemble_merges_partial_trees(tmp_path: Path) -> None:
    parts = []
    for arch in Arch:
        part = tmp_path / f"part-{arch}"
        publish_fake(part, STAMPS[3], [result(arch, Variant.console, STAMPS[3], True),
                                       result(arch, Variant.cloudinit, STAMPS[3], arch is Arch.amd64, "x")])
        parts.append(part)
    out = tmp_path / "public"
    results = assemble(parts, out, keep=4)
    assert [r.passed for r in results] == [True, True, True, False, True, False]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("releases/*/autobuilds/latest-*.txt")) == [
        "releases/amd64/autobuilds/latest-di-amd64-cloudinit.txt",
        "releases/amd64/autobuilds/latest-di-amd64-console.txt",
        "releases/arm64/autobuilds/latest-di-arm64-console.txt",
        "releases/riscv/autobuilds/latest-di-rv64_lp64d-console.txt"]
    assert (out / "failed" / STAMPS[3] / "arm64" / f"di-arm64-cloudinit-{STAMPS[3]}.qcow2.console.log").is_file()
    assert (out / "failed" / STAMPS[3] / "riscv" / f"di-rv64_lp64d-cloudinit-{STAMPS[3]}.qcow2.console.log").is_file()
    assert len(json.loads((out / "summary.json").read_text())["images"]) == 6
    with pytest.raises(ConfigError, match="already exists"):
        assemble(parts, out, keep=4)
    with pytest.raises(ConfigError, match="is in both"):
        assemble([parts[0], parts[0]], tmp_path / "other", keep=4)


def test_summary_table() -> None:
    table = summary_table([result(Arch.amd64, Variant.console, STAMPS[0], True),
                           result(Arch.arm64, Variant.cloudinit, STAMPS[0], False, "smoke test: kernel panic")])
    lines = table.splitlines()
    assert lines[0].split() == ["image", "size", "build", "boot", "result", "reason"]
    assert lines[1].split() == [f"di-amd64-console-{STAMPS[0]}.qcow2", "0.0", "MiB", "30.0s", "40.0s", "PASSED"]
    assert lines[2].endswith("FAILED  smoke test: kernel panic")
    assert lines[-1] == "1 passed, 1 failed"


def test_signals_wait_until_publishing_is_done() -> None:
    seen: list[str] = []

    def handler(_signum: int, _frame: object) -> None:
        seen.append("handled")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(KeyboardInterrupt), signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("renames done")
        assert seen == ["renames done", "handled"]
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- signing (real gpg, so the integration tier) ---------------------------------------------


@pytest.mark.integration
def test_signed_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    import shutil

    if shutil.which("gpg") is None:
        missing("gpg not installed (run ci/setup)")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(home))
    # Signing starts a gpg-agent for this GNUPGHOME: end it with the test, not with the machine.
    request.addfinalizer(lambda: stop_gpg_agent(home))
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                    "Release Test <release@example.invalid>", "ed25519", "sign", "never"],
                   check=True, capture_output=True)
    out = tmp_path / "out"
    images = [result(Arch.amd64, Variant.console, STAMPS[0], True)]
    source = tmp_path / "built/amd64"
    source.mkdir(parents=True)
    for name in images[0].files:
        (source / name).write_text(name)
    with release_lock(out), staging_area(out, STAMPS[0]) as staging:
        gather(images[0], source, staging, STAMPS[0], move=True)
        publish(out, staging, STAMPS[0], images, keep=4, sign="release@example.invalid", now=EPOCH)

    published = out / "releases/amd64/autobuilds" / STAMPS[0]
    for name in (images[0].image, images[0].image + ".DIGESTS"):
        subprocess.run(["gpg", "--batch", "--verify", published / (name + ".asc"), published / name],
                       check=True, capture_output=True)
    pointer = out / "releases/amd64/autobuilds/latest-di-amd64-console.txt"
    assert pointer.read_text().startswith("-----BEGIN PGP SIGNED MESSAGE-----")
    subprocess.run(["gpg", "--batch", "--verify", pointer], check=True, capture_output=True)
    assert read_pointer(pointer) == (STAMPS[0], images[0].image, 0)
    assert images[0].image + ".asc" in json.loads((out / "summary.json").read_text())["images"][0]["files"]


# -- a whole run whose stages cannot be had (no build starts, so it is quick) ----------------


def test_stage_failure_fails_that_arch_and_the_run_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imagebuild.release import run_release

    config = write_config(tmp_path, """
        output = "public"
        architectures = ["amd64", "arm64"]
        variants = ["console", "cloud-init"]
        work_dir = "work"
        cache_dir = "cache"
        [stages]
        amd64 = "missing-amd64.tar.xz"
        arm64 = "missing-arm64.tar.xz"
    """)
    assert run_release(config, stamp=STAMPS[0], arches=[Arch.arm64]) == 1
    out = tmp_path / "public"
    assert not (out / "releases").exists() or not list(out.glob("releases/*/autobuilds/latest-*.txt"))
    failed = out / "failed" / STAMPS[0]
    assert sorted(p.name for p in failed.iterdir()) == ["arm64"], "--arch arm64 made a partial tree"
    log = failed / "arm64" / f"di-arm64-console-{STAMPS[0]}.qcow2.build.log"
    assert "missing-arm64.tar.xz does not exist" in log.read_text()
    table = capsys.readouterr().out.splitlines()
    assert table[-1] == "0 passed, 2 failed"
    assert "FAILED  stage: stage tarball" in table[1]
    summary = json.loads((out / "summary.json").read_text())
    assert [i["image"] for i in summary["images"]] == [f"di-arm64-{v}-{STAMPS[0]}.qcow2" for v in ("console", "cloudinit")]
    assert not list(out.glob(".staging-*"))
    assert list((tmp_path / "work").iterdir()) == [], "the shared stage's workspace is removed"
