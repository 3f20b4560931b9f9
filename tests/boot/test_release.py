"""The weekly release job end to end: real builds (the systemd images from the Portage stand-in
stage3s with real emerge, the OpenRC ones from the stand-in stages), real QEMU boots, a real
Gentoo-style tree, its summary page rendered by headless Chromium.

CI time is the budget: one full release, made the way ci/github/release.yml makes it (partial
trees, `release --arch ... --variant ...`, then `release --assemble`): nine images, Gentoo's four
on systemd, three on OpenRC and riscv64's two (the only boot tests of arm64 on OpenRC and of
riscv64; zstd to save ~20 s per image). The parts from the stand-ins are built early, beside the
integration and unit tiers (conftest's background jobs); the Portage ones two at a time. Then the
smallest runs that prove the rest: one broken image beside one good one, and a single image that
is killed as its smoke test starts (a concurrent run is refused meanwhile).
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import html.parser
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagebuild.config import Arch, ImageKind

from conftest import (
    CACHE_DIR,
    GentooBinhost,
    _standin,
    background_process,
    background_result,
    cli_command,
    cli_env,
    qemu_processes,
    require_root,
    require_tools,
    spawn_cli,
)
from test_images import EXPECTED_CHECKS

REPO = Path(__file__).resolve().parents[2]
FIRST, BROKEN, KILLED, CONCURRENT = ("20261124T000000Z", "20261201T000000Z", "20261208T000000Z",
                                     "20261215T000000Z")
# (arch, variant as the file names spell it), in the order the release publishes them. riscv64
# (Gentoo's rv64_lp64d) has the two images Gentoo publishes from releng's specs-qemu.
IMAGES = [(Arch(arch), variant) for arch, variants in (
    ("amd64", ("console", "cloudinit", "console-openrc")),
    ("arm64", ("console", "cloudinit", "console-openrc", "cloudinit-openrc")),
    ("riscv64", ("console", "cloudinit"))) for variant in variants]
POINTER = re.compile(r"# Latest as of (.+)\n# ts=(\d+)\n(\d{8}T\d{6}Z)/(\S+) (\d+)\n")


def image_name(arch: str, variant: str, stamp: str) -> str:
    return f"di-{Arch.parse(arch).gentoo}-{variant}-{stamp}.qcow2"


def write_config(path: Path, out: Path, *, arches: list[str], variants: list[str],
                 stages: dict[str, str], specs: dict[str, Path] | None = None,
                 settings: dict[str, str] | None = None) -> Path:
    stage_lines = "\n".join(f'"{arch}" = "{stage}"' for arch, stage in stages.items())
    spec_lines = "".join(f'"{image}" = "{spec}"\n' for image, spec in (specs or {}).items())
    setting_lines = "".join(f'{key} = "{value}"\n' for key, value in (settings or {}).items())
    path.write_text(textwrap.dedent(f"""\
        output = "{out}"
        architectures = {arches!r}
        variants = {variants!r}
        compression = "zstd"
        work_dir = "{path.parent / 'work'}"
        cache_dir = "{CACHE_DIR}"
    """).replace("'", '"') + setting_lines + "[stages]\n" + stage_lines + "\n"
                    + (f"[specs]\n{spec_lines}" if spec_lines else ""))
    return path


# What the release's systemd images emerge from the test binhost into the Portage stand-in
# stage3: one list for both variants (cloud-init is installed on the console image as on the
# stand-in, and not enabled there), so the second image of an arch reuses the first one's
# package and kernel steps from the cache, as a release's images of one stage should.
PACKAGES = dict.fromkeys(("console", "cloud-init"), "sys-boot/grub app-admin/sudo app-emulation/cloud-init")


def portage_spec(directory: Path, arch: str, variant: str) -> Path:
    """The shipped spec with a diskimage-stage1 package list: the build emerges it, then the kernel."""
    spec = directory / f"{arch}-{variant}.spec"
    spec.write_text((REPO / "specs" / arch / f"{variant}.spec").read_text()
                    + f"\ndiskimage/packages: {PACKAGES[variant]}\n")
    return spec


def release(*args: str | Path, log: Path, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    with log.open("w") as stderr:
        proc = subprocess.run(cli_command("release", *args), stdout=subprocess.PIPE, stderr=stderr, text=True,
                              timeout=timeout, env=cli_env(None), check=False)
    return proc


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file and symlink below ``root`` with its content hash (and every directory)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
            found[key] = digest.hexdigest()
    return found


def our_qemus(out: Path) -> set[int]:
    """QEMU processes booting an image of ``out`` (other tests may run QEMU of their own)."""
    ours = set()
    for pid in qemu_processes():
        try:
            if str(out).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                ours.add(pid)
        except OSError:
            pass
    return ours


@dataclasses.dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess[str]  # the assembly's
    logs: dict[str, Path]  # each part's and the assembly's
    seconds: float
    pointers: dict[str, bytes]
    page: Path  # a copy of the first run's index.html, beside it (its links stay relative)


# The first release is made as ci/github/release.yml makes it, in partial trees (`release
# --arch ARCH --variant ...`) that `release --assemble` publishes as one. The parts from the
# cached stand-ins are built early, beside the other tests (early_parts); the ones that emerge
# from the test binhost into the Portage stand-in stage3s are built by the fixture, two at a time.
EARLY_PARTS = {"amd64-openrc": ("amd64", ["console-openrc"]),
               "arm64-openrc": ("arm64", ["console-openrc", "cloud-init-openrc"]),
               "riscv64": ("riscv64", ["console", "cloud-init"])}
PORTAGE_PARTS = {"amd64": ("amd64", ["console", "cloud-init"]), "arm64": ("arm64", ["console", "cloud-init"])}
# Published in this order (IMAGES): the assembly takes the parts in this order.
PART_ORDER = ("amd64", "amd64-openrc", "arm64", "arm64-openrc", "riscv64")
VARIANTS = ["console", "cloud-init", "console-openrc", "cloud-init-openrc"]


def release_part(config: Path, name: str, arch: str, variants: list[str], parts: Path) -> list[str | Path]:
    return [config, "--arch", arch, *[f"--variant={v}" for v in variants], "--stamp", FIRST,
            "--output", parts / name]


def early_parts(directory: Path) -> None:
    """The first release's parts made from the stand-ins, one after another (at the lowest CPU
    priority, with QEMU's and the builds' scratch below ``directory``)."""
    config = write_config(directory / "release.toml", directory / "unused", arches=["amd64", "arm64", "riscv64"],
                          variants=VARIANTS, stages={a: "standin" for a in ("amd64", "arm64", "riscv64")})
    (directory / "tmp").mkdir()
    env = {**cli_env(None), "TMPDIR": str(directory / "tmp")}
    for name, (arch, variants) in EARLY_PARTS.items():
        log = directory / f"first-{name}.log"
        started = time.monotonic()
        code = background_process(cli_command("release", *release_part(config, name, arch, variants, directory)),
                                  log=log, env=env)
        (directory / f"{name}.seconds").write_text(f"{time.monotonic() - started:.0f}\n")
        assert code == 0, f"the {name} part failed ({code}):\n{tail(log)}"


pytestmark = [pytest.mark.boot, pytest.mark.standin("arm64"), pytest.mark.standin("arm64", "openrc"),
              pytest.mark.standin("riscv64"), pytest.mark.background.with_args(early_parts)]


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, gentoo_binhost: GentooBinhost) -> Iterator[Run]:
    """One release of nine images: Gentoo's four on systemd from the Portage stand-in stage3s
    (real emerge of packages and kernel from the signed loopback binhost), three on OpenRC and
    riscv64's two from the stand-in stages. (The amd64 cloud-init image on OpenRC is booted
    through the smoke test by test_third_party_seed, with a seed of cloud-localds.)"""
    require_root()
    require_tools("qemu-img", "qemu-system-x86_64", "qemu-system-aarch64", "qemu-system-riscv64", "mkfs.xfs",
                  "mkfs.vfat", "mcopy", "sfdisk")
    base = tmp_path_factory.mktemp("release")
    out = base / "out"
    arches = [arch for arch, _ in PORTAGE_PARTS.values()]
    # Both stage3s first: making arm64's rewrites the test repository the amd64 builds read.
    stages = {f"{a}/systemd": str(gentoo_binhost.stage3(Arch(a))) for a in arches}
    config = write_config(
        base / "release.toml", out, arches=arches, variants=VARIANTS, stages=stages,
        specs={f"{a}/{v}": portage_spec(base, a, v) for a in arches for v in PACKAGES},
        settings={"repo": str(gentoo_binhost.repo), "binhost": gentoo_binhost.url,
                  "binhost_keyring": str(gentoo_binhost.public_key)})
    logs = {name: base / f"first-{name}.log" for name in PORTAGE_PARTS}
    done: dict[str, tuple[subprocess.CompletedProcess[str], float]] = {}

    def part(name: str) -> None:
        arch, variants = PORTAGE_PARTS[name]
        started = time.monotonic()
        done[name] = (release(*release_part(config, name, arch, variants, base / "parts"), log=logs[name]),
                      time.monotonic() - started)

    started = time.monotonic()
    threads = [threading.Thread(target=part, args=(name,)) for name in PORTAGE_PARTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    early = background_result(early_parts, tmp_path_factory)
    for name, (proc, seconds) in done.items():
        print(f"\n{name} part: {seconds:.0f}s\n{proc.stdout}")
        assert proc.returncode == 0, f"the {name} part failed:\n{proc.stdout}\n{tail(logs[name])}"
    assert sorted(done) == sorted(PORTAGE_PARTS)
    for name in EARLY_PARTS:
        logs[name] = early / f"first-{name}.log"
        print(f"\n{name} part (early): {(early / f'{name}.seconds').read_text().strip()}s")
    logs["assemble"] = base / "assemble.log"
    parts = [early / name if name in EARLY_PARTS else base / "parts" / name for name in PART_ORDER]
    proc = release(config, "--assemble", *parts, log=logs["assemble"])
    seconds = time.monotonic() - started
    print(f"\nfirst release, the Portage parts and the assembly: {seconds:.0f}s\n{proc.stdout}")
    assert proc.returncode == 0, f"assembling failed:\n{proc.stdout}\n{tail(logs['assemble'])}"
    pointers = {p.name: p.read_bytes() for p in out.glob("releases/*/autobuilds/latest-*.txt")}
    page = out / "index-first.html"
    shutil.copy(out / "index.html", page)
    yield Run(out, proc, logs, seconds, pointers, page)
    for leftover in [*base.rglob("*.qcow2"), *early.rglob("*.qcow2")]:
        leftover.unlink()  # ~300 MB each; pytest keeps old temp directories


def test_release_publishes_every_image(first: Run) -> None:
    out = first.out
    assert sorted(first.pointers) == sorted(f"latest-di-{a.gentoo}-{v}.txt" for a, v in IMAGES)
    for arch, variant in IMAGES:
        autobuilds = out / "releases" / arch.gentoo_dir / "autobuilds"
        text = (autobuilds / f"latest-di-{arch.gentoo}-{variant}.txt").read_text()
        match = POINTER.fullmatch(text)
        assert match, f"not Gentoo's pointer format:\n{text}"
        when, ts, stamp, name, size = match.groups()
        assert email.utils.parsedate_to_datetime(when).timestamp() == int(ts)
        assert when.endswith("+0000")
        assert stamp == FIRST and name == image_name(arch, variant, FIRST)
        image = autobuilds / stamp / name
        assert image.stat().st_size == int(size), "the pointer gives the image's size"
        verify_digests(image)
        for suffix in (".CONTENTS.gz", ".manifest.json", ".smoke.json", ".smoke.xml", ".console.log",
                       ".inspect.json", ".build.log"):
            assert image.with_name(name + suffix).is_file(), suffix
        emerge_log = image.with_name(name + ".emerge.log")
        if variant.endswith("-openrc") or arch is Arch.riscv64:
            assert not emerge_log.exists(), "the stand-in has its kernel: nothing is emerged"
        else:
            # Real emerge put the kernel and the packages into the stage3, from the binhost.
            log = emerge_log.read_text()
            assert "Emerging binary" in log and "sys-kernel/gentoo-kernel-bin" in log and ">>> dracut" in log, name
            if variant == "cloudinit":  # built second: the console image's steps, from the cache
                build_log = image.with_name(name + ".build.log").read_text()
                assert "no emerge runs" in build_log and "  emerge --" not in build_log, name
        smoke = json.loads(image.with_name(name + ".smoke.json").read_text())
        assert smoke["passed"] and smoke["console_log"] == name + ".console.log"
        assert "<failure" not in image.with_name(name + ".smoke.xml").read_text()
        # Each image's own checks ran and passed (JUnit: one test case per check).
        suite = ET.parse(image.with_name(name + ".smoke.xml")).getroot()
        cases = {case.get("name") for case in suite.iter("testcase")}
        assert set(EXPECTED_CHECKS[ImageKind.parse(variant).variant.value]) <= cases, (variant, cases)
        # OpenRC colours its lines: compare the text without terminal escapes.
        console = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", image.with_name(name + ".console.log").read_text(errors="replace"))
        assert "GNU GRUB" in console and "Linux version" in console
        if arch is Arch.riscv64:
            # The whole chain on the serial line: the EFI firmware (U-Boot's UEFI on OpenSBI where
            # QEMU is too old for RISC-V edk2, as Debian 12's 7.2), GRUB, the kernel, the login.
            if "u-boot" in smoke["firmware"]:
                assert "OpenSBI v" in console and "U-Boot 20" in console, name
                assert "efi/boot/bootriscv64.efi" in console, name
            assert "riscv64" in console and "login: " in console, name
        if variant.endswith("-openrc"):
            # The serial login, and OpenRC's runlevels as the checks' rc-status shows them.
            assert "login: " in console and "Runlevel: default" in console, variant
            if variant.startswith("cloudinit"):
                # /dev/console is the serial line of a cloud-init image: OpenRC's boot is there.
                # (A console image's /dev/console is the VGA console, as Catalyst orders it.)
                assert "INIT: version" in console and "is starting up Linux" in console, variant
                assert "* cloud-init local stage" in console, variant
        manifest = json.loads(image.with_name(name + ".manifest.json").read_text())
        assert manifest["init"] == ("openrc" if variant.endswith("-openrc") else "systemd")
    assert not (out / "failed").exists()
    assert not list(out.glob(".staging-*")), "staging is gone"
    rows = [line.split() for line in first.proc.stdout.splitlines()[1:-1]]
    assert [row[0] for row in rows] == [image_name(a, v, FIRST) for a, v in IMAGES]
    assert all(row[-1] == "PASSED" for row in rows), first.proc.stdout
    assert first.proc.stdout.splitlines()[-1] == f"{len(IMAGES)} passed, 0 failed"
    for name in EARLY_PARTS:
        assert "STAND-IN" in first.logs[name].read_text(), "the stand-in says what it is"
    print(timings(first.proc.stdout))


def verify_digests(image: Path) -> None:
    lines = image.with_name(image.name + ".DIGESTS").read_text().splitlines()
    checked = set()
    for header, entry in zip(lines[::2], lines[1::2], strict=True):
        algo = re.fullmatch(r"# (BLAKE2B|SHA512) HASH", header).group(1)  # type: ignore[union-attr]
        digest, name = entry.split("  ")
        content = (image.parent / name).read_bytes()
        actual = (hashlib.blake2b(content) if algo == "BLAKE2B" else hashlib.sha512(content)).hexdigest()
        assert actual == digest, f"{algo} of {name}"
        checked.add((algo, name))
    assert {("SHA512", image.name), ("BLAKE2B", image.name)} <= checked


def timings(stdout: str) -> str:
    return "per image (build, boot):\n" + "\n".join(stdout.splitlines()[1:-1])


class SummaryPage(html.parser.HTMLParser):
    """The image rows of the page as Chromium's DOM has them: cell texts and link targets."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, list[str]]] = []
        self._cell: list[str] | None = None
        self.verdict = ""
        self._in_verdict = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("class") == "image":
            self.rows.append({"cells": [], "links": []})
        elif tag == "td" and self.rows:
            self._cell = []
        elif tag == "a" and self._cell is not None:
            self.rows[-1]["links"].append(attributes.get("href") or "")
        elif tag == "p" and attributes.get("id") == "verdict":
            self._in_verdict = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1]["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "p":
            self._in_verdict = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_verdict:
            self.verdict += data


def chromium(page: Path, scratch: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    require_tools("chromium")
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={scratch}",
         *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True)


def rendered(page: Path, scratch: Path) -> SummaryPage:
    parsed = SummaryPage()
    parsed.feed(chromium(page, scratch, "--dump-dom").stdout)
    return parsed


def test_summary_page_in_chromium(first: Run, tmp_path: Path) -> None:
    page = rendered(first.page, tmp_path / "profile")
    assert len(page.rows) == len(IMAGES), page.rows
    for row, (arch, variant) in zip(page.rows, IMAGES, strict=True):
        image, row_arch, row_variant, size, build, boot, result, reason, _links = row["cells"]
        assert image == image_name(arch, variant, FIRST) and row_arch == arch.value
        assert row_variant == str(ImageKind.parse(variant))
        assert result == "PASSED" and reason == ""
        assert re.fullmatch(r"\d+\.\d MiB", size) and re.fullmatch(r"\d+\.\ds", build), row
        assert re.fullmatch(r"\d+\.\ds", boot), row
        # The console log, JUnit and smoke JSON links lead to the files, relative to the page.
        for suffix in (".console.log", ".smoke.xml", ".smoke.json"):
            href = f"releases/{arch.gentoo_dir}/autobuilds/{FIRST}/{image}{suffix}"
            assert href in row["links"] and (first.out / href).is_file()
    assert f"{len(IMAGES)} passed, 0 failed" in page.verdict
    shot = tmp_path / "page.png"
    chromium(first.page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,700")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@pytest.fixture(scope="module")
def broken_arm64_stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The arm64 stand-in with its kernel replaced by garbage: it builds, and GRUB refuses to boot it.

    A later tar member replaces an earlier one of the same name, as GNU tar does.
    """
    standin = _standin(Arch.arm64)
    broken = tmp_path_factory.mktemp("broken") / "broken-arm64.tar"
    shutil.copyfile(standin, broken)
    with tarfile.open(broken, "a") as tar:
        kernel = next(m for m in tar.getmembers() if re.fullmatch(r"(\./)?boot/vmlinuz-.+", m.name))
        garbage = b"this is not a kernel\n" * 4096
        member = tarfile.TarInfo(kernel.name)
        member.size, member.mode, member.mtime = len(garbage), 0o644, kernel.mtime
        tar.addfile(member, io.BytesIO(garbage))
    yield broken
    broken.unlink()


def test_a_broken_image_keeps_its_old_pointer(first: Run, broken_arm64_stage: Path) -> None:
    out = first.out
    config = write_config(out.parent / "broken.toml", out, arches=["amd64", "arm64"], variants=["console"],
                          stages={"amd64": "standin", "arm64": str(broken_arm64_stage)})
    log = out.parent / "broken.log"
    started = time.monotonic()
    proc = release(config, "--stamp", BROKEN, log=log)
    print(f"\nrelease with a broken image: {time.monotonic() - started:.0f}s\n{proc.stdout}")
    assert proc.returncode == 1, f"{proc.stdout}\n{tail(log)}"

    pointers = {p.name: p.read_bytes() for p in out.glob("releases/*/autobuilds/latest-*.txt")}
    assert pointers["latest-di-arm64-console.txt"] == first.pointers["latest-di-arm64-console.txt"], \
        "the failed image's pointer is byte-identical"
    updated = POINTER.fullmatch(pointers["latest-di-amd64-console.txt"].decode())
    assert updated and updated.group(3) == BROKEN
    assert (out / "releases/amd64/autobuilds" / BROKEN / updated.group(4)).stat().st_size == int(updated.group(5))
    for untouched in ("latest-di-amd64-cloudinit.txt", "latest-di-arm64-cloudinit.txt",
                      "latest-di-amd64-console-openrc.txt", "latest-di-arm64-cloudinit-openrc.txt",
                      "latest-di-rv64_lp64d-console.txt"):
        assert pointers[untouched] == first.pointers[untouched], "images not in this run keep their pointers"
    assert not (out / "releases/arm64/autobuilds" / BROKEN).exists(), "nothing of the failure is published"

    failed = out / "failed" / BROKEN / "arm64"
    name = image_name("arm64", "console", BROKEN)
    console = (failed / f"{name}.console.log").read_text(errors="replace")
    assert "error:" in console, "GRUB's complaint about the kernel is in the log"
    assert json.loads((failed / f"{name}.smoke.json").read_text())["passed"] is False
    assert (failed / f"{name}.smoke.xml").is_file() and (failed / f"{name}.build.log").is_file()
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:-1]}
    assert "PASSED" in rows[image_name("amd64", "console", BROKEN)]
    assert "FAILED  smoke test: GRUB error" in rows[name]
    assert proc.stdout.splitlines()[-1] == "1 passed, 1 failed"
    assert not our_qemus(out)

    html = (out / "index.html").read_text()
    assert f'href="failed/{BROKEN}/arm64/{name}.console.log"' in html
    assert ">FAILED<" in html and ">PASSED<" in html


def test_concurrent_release_refuses_and_sigterm_leaves_the_tree(first: Run) -> None:
    out = first.out
    config = write_config(out.parent / "killed.toml", out, arches=["amd64"], variants=["console"],
                          stages={"amd64": "standin"})
    before = tree_hashes(out / "releases")
    log = out.parent / "killed.log"
    with log.open("w") as stderr:
        proc = spawn_cli("release", config, "--stamp", KILLED, stderr=stderr)
    try:
        lock = out / ".release.lock"
        wait_for(lambda: lock.read_text().strip() == str(proc.pid), proc, log, "the run to take the lock")
        second = release(config, "--stamp", CONCURRENT, log=out.parent / "concurrent.log", timeout=120)
        message = (out.parent / "concurrent.log").read_text()
        assert second.returncode == 2, message
        assert f"another imagebuild release (pid {proc.pid}) is already running on {out}" in message
        assert not (out / f".staging-{CONCURRENT}").exists()

        wait_for(lambda: "‣ Smoke-testing" in log.read_text(), proc, log, "the smoke test to start", 900)
        wait_for(lambda: bool(our_qemus(out)), proc, log, "QEMU to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 130, tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted by SIGTERM" in log.read_text()
    assert tree_hashes(out / "releases") == before, "the published tree is byte-identical"
    assert not (out / "failed" / KILLED).exists()
    assert not list(out.glob(".staging-*")), "staging is removed on the way out"
    assert not our_qemus(out), "a QEMU process was left behind"
    assert lock.read_text() == "", "the lock was given back"


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        assert proc.poll() is None, f"the release ended ({proc.returncode}) before {what}:\n{tail(log)}"
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}:\n{tail(log)}")
