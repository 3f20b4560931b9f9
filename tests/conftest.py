"""Test tiers and the rule that CI never skips: a missing prerequisite fails there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from imagebuild.config import Arch, InitSystem
from imagebuild.standin import is_foreign, standin_path

TIERS = ("unit", "integration", "boot")
STRICT = bool(os.environ.get("CI")) or bool(os.environ.get("IMAGEBUILD_STRICT"))
CACHE_DIR = Path(os.environ.get("IMAGEBUILD_CACHE_DIR", "/var/cache/imagebuild"))


_AT_START: dict[str, set] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    _AT_START["loops"] = loop_devices()
    _AT_START["qemu"] = qemu_processes()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole suite nothing may be left: no loop device, no QEMU, no mount in a test dir."""
    _stop_prebuild()
    _stop_background()
    loops = loop_devices(background=True) - _AT_START.get("loops", set())
    qemus = qemu_processes(background=True) - _AT_START.get("qemu", set())
    mounts = [m for m in mounts_under(Path("/tmp")) if "pytest-of-" in m or "imagebuild-" in m]
    if loops or qemus or mounts:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = (f"the test suite left resources behind: loop devices {sorted(loops)}, "
                f"QEMU processes {sorted(qemus)}, mounts {mounts}")
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if session.exitstatus == 0:
        shutil.rmtree(BACKGROUND_DIR, ignore_errors=True)
    else:  # the logs stay for a look; the images go (GBs)
        for image in BACKGROUND_DIR.rglob("*.qcow2"):
            image.unlink()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The directory decides the tier when a test module does not say it itself.
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts and not item.get_closest_marker(tier):
                item.add_marker(getattr(pytest.mark, tier))
    # Tests that need a foreign stand-in run last (see pytest_collection_finish); the sort is stable.
    items.sort(key=lambda item: bool(_foreign_standins(item)))


def _foreign_standins(item: pytest.Item) -> list[tuple[Arch, str]]:
    """The stand-ins of another architecture than the host's that ``item`` says it needs."""
    wanted = [(Arch(m.args[0]), m.args[1] if len(m.args) > 1 else "systemd")
              for m in item.iter_markers("standin")]
    return [(arch, init) for arch, init in wanted if is_foreign(arch)]


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what will not run
def pytest_collection_finish(session: pytest.Session) -> None:
    """Stand-ins of a foreign architecture take minutes under qemu-user (arm64 from nothing:
    ~6 min). When the selected tests need one that is not cached, it is built in the background
    from the start, at the lowest CPU priority, and the tests that need it run last: the build
    uses what the other tests leave idle instead of adding its minutes to the run (those tests
    wait for it in _standin)."""
    needed: list[tuple[Arch, str]] = []
    for item in session.items:
        needed += [s for s in _foreign_standins(item) if s not in needed]
    if session.config.option.collectonly or os.geteuid() != 0 or shutil.which("mmdebstrap") is None:
        return
    missing_ones = [(a, i) for a, i in needed if not standin_path(a, CACHE_DIR, InitSystem(i)).exists()]
    if missing_ones:
        thread = threading.Thread(target=_prebuild, args=(missing_ones,), name="standin-prebuild", daemon=True)
        _PREBUILD["thread"] = thread
        thread.start()
    jobs: list[Callable[[Path], None]] = []
    for item in session.items:
        jobs += [m.args[0] for m in item.iter_markers("background") if m.args[0] not in jobs]
    if jobs:
        shutil.rmtree(BACKGROUND_DIR, ignore_errors=True)
        BACKGROUND_DIR.mkdir(parents=True)
        for job in jobs:
            _BACKGROUND[job] = _BackgroundJob(job)


# -- work a test module asks to start early (marker "background(job)") ------------------------
# A module's slow preparation that needs no fixture (the release's parts built from the cached
# stand-ins) runs beside the other tests: it starts once the foreign stand-ins are built and the
# boot tier is over (the integration and unit tiers leave a core idle), at the lowest CPU
# priority, and the module's fixture waits for it (background_result). Its QEMU processes and
# loop devices live under BACKGROUND_DIR, and the checks of the other tests leave them out.
BACKGROUND_DIR = Path(tempfile.gettempdir()) / f"imagebuild-test-background-{os.getpid()}"
_BOOT_TIER_OVER = threading.Event()


class _BackgroundJob:
    def __init__(self, job: Callable[[Path], None]) -> None:
        self.job, self.directory = job, BACKGROUND_DIR / job.__name__
        self.error: BaseException | None = None
        self.processes: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name=f"background-{job.__name__}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        prebuild = _PREBUILD.get("thread")
        if prebuild is not None:
            prebuild.join()
        _BOOT_TIER_OVER.wait()
        if self.stopping:
            return
        self.directory.mkdir(parents=True)
        try:
            self.job(self.directory)
        except BaseException as exc:  # re-raised in the test that waits for it
            self.error = exc


_BACKGROUND: dict[Callable[[Path], None], _BackgroundJob] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Sorted as they are (collection_modifyitems), the boot tier is over at the first test of
    # another tier, or at the first test that needs a foreign stand-in.
    if not item.get_closest_marker("boot") or _foreign_standins(item):
        _BOOT_TIER_OVER.set()


def background_process(command: list[str], *, log: Path, env: dict[str, str]) -> int:
    """Run ``command`` from a background job at the lowest CPU priority; its exit status."""
    job = next(j for j in _BACKGROUND.values() if j.thread is threading.current_thread())
    with log.open("w") as out:
        return _niced(command, out=out, env=env, processes=job.processes)


def background_result(job: Callable[[Path], None], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory ``job`` wrote, once it is done; its failure is raised here. Run here and
    now when nothing started it (the module was not collected with its marker)."""
    started = _BACKGROUND.get(job)
    if started is None:
        directory = tmp_path_factory.mktemp(job.__name__)
        job(directory)
        return directory
    _BOOT_TIER_OVER.set()
    started.thread.join()
    if started.error is not None:
        raise started.error
    return started.directory


def _stop_background() -> None:
    for job in _BACKGROUND.values():
        job.stopping = True
        _BOOT_TIER_OVER.set()
        _terminate(job.processes)
        job.thread.join()


_PREBUILD: dict[str, threading.Thread] = {}
_PREBUILDING: list[subprocess.Popen[bytes]] = []


def _prebuild(standins: list[tuple[Arch, str]]) -> None:
    log = CACHE_DIR / "standin-prebuild.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        for arch, init in standins:
            # A failure shows again, with its message, when the test that needs the stand-in builds it.
            _niced(cli_command("standin", arch.value, "--init", init, "--cache-dir", CACHE_DIR), out=out,
                   env=cli_env(None), processes=_PREBUILDING)


def _niced(command: list[str], *, out: IO[str], env: dict[str, str], processes: list[subprocess.Popen[bytes]]) -> int:
    """Run ``command`` at the lowest CPU priority, its output to ``out``, recorded in ``processes``
    (for _terminate); its exit status."""
    proc = subprocess.Popen(["nice", "-n", "19", *command], stdout=out, stderr=subprocess.STDOUT, env=env)
    processes.append(proc)
    return proc.wait()


def _terminate(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()


def _stop_prebuild() -> None:
    """A session that ends before its foreign tests ran stops the build (it cleans up after itself)."""
    thread = _PREBUILD.pop("thread", None)
    if thread is None:
        return
    _terminate(_PREBUILDING)
    thread.join()


REPO = Path(__file__).resolve().parents[1]


def cli_command(*args: str | Path) -> list[str]:
    """``imagebuild ARGS`` as a user runs it, from this checkout whatever is installed."""
    return [sys.executable, "-m", "imagebuild", *map(str, args)]


def cli_env(env: dict[str, str] | None) -> dict[str, str]:
    env = dict(env if env is not None else os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def imagebuild_cli(*args: str | Path, env: dict[str, str] | None = None,
                   timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the CLI to the end; its exit status, stdout and stderr."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, env=cli_env(env),
                          check=False)


def spawn_cli(*args: str | Path, env: dict[str, str] | None = None, stdout: object = subprocess.PIPE,
              stderr: object = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start the CLI and return it running (to signal or kill it half-way)."""
    return subprocess.Popen(cli_command(*args), stdout=stdout, stderr=stderr, text=True,  # type: ignore[call-overload]
                            env=cli_env(env))


@contextlib.contextmanager
def attached(backing: Path, *, sector: int = 512, offset: int = 0, size: int | None = None,
             read_only: bool = False) -> Iterator[str]:
    """A loop device over (a byte range of) ``backing``, with ``sector``-byte sectors (sfdisk
    and the kernel read a 4Kn disk's table only through one); detached on the way out."""
    cmd = ["losetup", "--find", "--show", "--sector-size", str(sector), "--offset", str(offset),
           *(["--sizelimit", str(size)] if size else []), *(["--read-only"] if read_only else []), str(backing)]
    loop = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)


def missing(reason: str) -> None:
    """A prerequisite is missing: fail in CI (a skipped boot test proves nothing), skip elsewhere."""
    if STRICT:
        pytest.fail(f"prerequisite missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    if os.geteuid() != 0:
        missing("needs root (loop devices, mounts, chroot)")


def require_tools(*tools: str) -> None:
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        missing(f"host tools not installed: {', '.join(absent)} (run ci/setup)")


def loop_devices(under: Path | None = None, *, background: bool = False) -> set[str]:
    """Attached loop devices; with ``under``, only those whose backing file lies below it
    (other tests or builds on the machine may hold loop devices of their own). Those of the
    background jobs count only with ``background``."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=False).stdout
    found = set()
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        back = back.strip()
        if not name or (not background and back.startswith(str(BACKGROUND_DIR))):
            continue
        if under is None or back.startswith(str(under)):
            found.add(name)
    return found


def mounts_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line.split()[4] for line in text.splitlines() if line.split()[4].startswith(str(path))]


def qemu_processes(*, background: bool = False) -> set[int]:
    """PIDs of running qemu-system-* processes (read from /proc; zombies do not count). Those
    of the background jobs count only with ``background``."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith("qemu-system"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            ours = background or str(BACKGROUND_DIR).encode() not in (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if state != "Z" and ours:
            pids.add(int(entry.name))
    return pids


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def private_dirs() -> set[Path]:
    """The per-run directories (VARS copy, sockets) QemuMachine creates."""
    return set(Path(tempfile.gettempdir()).glob("imagebuild-qemu-*"))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return CACHE_DIR


def _standin(arch: Arch, init: str = "systemd") -> Path:
    require_root()
    require_tools("mmdebstrap")
    prebuild = _PREBUILD.get("thread")
    if prebuild is not None and is_foreign(arch):
        prebuild.join()  # the background build of the foreign stand-ins (pytest_collection_finish)
    from imagebuild.standin import ensure_standin

    return ensure_standin(arch, CACHE_DIR, InitSystem(init))


# What the binhost holds (the kernels twice: as configured and USE=-initramfs): what the builds
# of test_portage_build and test_release emerge. Each package takes seconds to build for amd64
# and ~25 s for arm64 under qemu-user; the rest of the test repository is not needed.
BINHOST_PACKAGES = ("sys-kernel/gentoo-kernel-bin", "sys-kernel/dracut", "sys-kernel/installkernel",
                    "sys-boot/grub", "app-emulation/cloud-init", "app-admin/sudo", "app-editors/nano")


class GentooBinhost:
    """The Portage stand-in stage3s (tests/gentoo_standin.py), the test ebuild repository and one
    signed binhost served on 127.0.0.1 for them all. Each architecture's stage3 and packages are
    made when a test first asks for them (arm64's take minutes under qemu-user).

    The packages and their throwaway signing key are kept between runs in ``cache`` (keyed by
    what makes them: binhost_cache); each architecture's are built once for its stage3."""

    def __init__(self, top: Path, url: str, distfiles_url: str, cache: Path) -> None:
        import gentoo_standin

        self.top, self.url, self.distfiles_url = top, url, distfiles_url
        self.pkgdir, self.repo, self.home = cache / "binpkgs", top / "repo", cache / "signing"
        self.cache = cache
        self.public_key = self.home.with_name(f"{self.home.name}-public.asc")
        known = cache / "fingerprint"
        if known.is_file() and self.public_key.is_file():
            self.fingerprint = known.read_text().strip()
        else:
            shutil.rmtree(cache, ignore_errors=True)
            self.pkgdir.mkdir(parents=True)
            self.fingerprint, self.public_key = gentoo_standin.make_signing_key(self.home)
            known.write_text(self.fingerprint + "\n")
        self._standins: dict[Arch, object] = {}
        self._lock = threading.Lock()

    def stage3(self, arch: Arch) -> Path:
        """The stand-in stage3 of ``arch``; its packages are on the binhost from now on."""
        import gentoo_standin

        with self._lock:
            if arch not in self._standins:
                if is_foreign(arch):
                    _standin(arch)  # the prebuilt foreign stand-in it is made from
                standin = gentoo_standin.make_stage3(arch, InitSystem.systemd, CACHE_DIR)
                self._standins[arch] = standin
                for distfile in standin.distfiles.iterdir():  # served for the kernel built from source
                    served = self.top / "distfiles" / distfile.name
                    if not served.exists():
                        try:
                            served.hardlink_to(distfile)
                        except OSError:
                            shutil.copyfile(distfile, served)
                gentoo_standin.write_repository(self.repo, list(self._standins.values()),  # type: ignore[arg-type]
                                                distfiles_url=self.distfiles_url)
                built = self.cache / f"built-{arch.value}-{standin.stage3.parent.name}"
                if not built.exists():
                    gentoo_standin.build_binhost(standin, self.repo, self.pkgdir, self.home, self.fingerprint,
                                                 packages=list(BINHOST_PACKAGES))
                    built.touch()
            return self._standins[arch].stage3  # type: ignore[attr-defined,no-any-return]

    def standin(self, arch: Arch) -> object:
        """The GentooStandin of ``arch`` (after stage3(arch))."""
        return self._standins[arch]


def binhost_cache() -> Path:
    """Where the test binhost is kept between runs: ``<cache>/test-stages/binhost-<key>``, the key
    hashing what makes its packages (tests/gentoo_standin.py and its files, the package list, the
    builder's USE). Binhosts of other keys are removed."""
    import gentoo_standin

    digest = hashlib.sha256(json.dumps([BINHOST_PACKAGES, gentoo_standin.BINHOST_PACKAGE_USE]).encode())
    for path in sorted([Path(gentoo_standin.__file__), *gentoo_standin.FILES.rglob("*")]):
        if path.is_file():
            digest.update(f"{path.relative_to(REPO)}\0".encode() + path.read_bytes())
    top = CACHE_DIR / "test-stages"
    cache = top / f"binhost-{digest.hexdigest()[:16]}"
    for stale in top.glob("binhost-*"):
        if stale != cache:
            shutil.rmtree(stale, ignore_errors=True)
    return cache


@pytest.fixture(scope="session")
def gentoo_binhost(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GentooBinhost]:
    require_root()
    require_tools("gpg", "mmdebstrap")
    import gentoo_standin

    top = tmp_path_factory.mktemp("gentoo")
    (top / "distfiles").mkdir()
    cache = binhost_cache()
    (cache / "binpkgs").mkdir(parents=True, exist_ok=True)
    with gentoo_standin.serve(cache / "binpkgs") as url, gentoo_standin.serve(top / "distfiles") as distfiles_url:
        binhost = GentooBinhost(top, url, distfiles_url, cache)
        try:
            yield binhost
        finally:
            gentoo_standin.stop_gpg_agent(binhost.home)


@pytest.fixture(scope="session")
def standin_amd64() -> Path:
    """The amd64 stand-in stage tarball (built once, then cached by recipe hash)."""
    return _standin(Arch.amd64)


STAMP = "20261124T000000Z"


@pytest.fixture(scope="session")
def build_images(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build arch × variant (× init) from the stand-in stage through the CLI (no smoke test),
    once per session."""
    built: dict[tuple[str, str, str], Path] = {}

    def build(arch: str, variant: str, init: str = "systemd") -> Path:
        if (arch, variant, init) not in built:
            stage = _standin(Arch(arch), init)
            require_tools("qemu-img", "mkfs.xfs", "mkfs.vfat", "mcopy", "sfdisk")
            out = tmp_path_factory.mktemp(f"{variant}-{arch}-{init}")
            from imagebuild.cli import main

            code = main(["build", arch, variant, "--stage", str(stage), "--init", init, "--no-test",
                         "-o", str(out), "--stamp", STAMP])
            assert code == 0, f"building the {arch} {variant} {init} image failed"
            suffix = "" if init == "systemd" else f"-{init}"
            image = out / f"di-{arch}-{variant.replace('-', '')}{suffix}-{STAMP}.qcow2"
            assert image.is_file()
            built[arch, variant, init] = image
        return built[arch, variant, init]

    return build


@pytest.fixture(scope="session")
def console_image_amd64(build_images: Callable[[str, str], Path]) -> Path:
    return build_images("amd64", "console")


@pytest.fixture(scope="session")
def cloudinit_image_amd64(build_images: Callable[[str, str], Path]) -> Path:
    return build_images("amd64", "cloud-init")


@pytest.fixture(scope="session")
def console_openrc_image_amd64(build_images: Callable[..., Path]) -> Path:
    return build_images("amd64", "console", "openrc")


@pytest.fixture(scope="session")
def cloudinit_openrc_image_amd64(build_images: Callable[..., Path]) -> Path:
    return build_images("amd64", "cloud-init", "openrc")


@pytest.fixture(scope="session")
def mini_stage_amd64(standin_amd64: Path) -> Path:
    """The amd64 stand-in cut down to what a build touches (tests/hostile.py): builds in seconds."""
    from hostile import mini_stage

    return mini_stage(standin_amd64)


@pytest.fixture(scope="session")
def mini_stage_openrc_amd64() -> Path:
    """The amd64 OpenRC stand-in cut down the same way."""
    from hostile import mini_stage

    return mini_stage(_standin(Arch.amd64, "openrc"), "openrc")
