"""A Gentoo-layout mirror on 127.0.0.1 for tests: a real HTTP server and real GnuPG signatures.

No machine here reaches Gentoo's mirrors, so this stands in for one — not a mock: imagebuild
talks HTTP to it and verifies its files with gpg exactly as it would Gentoo's.

    releases/<arch>/autobuilds/latest-stage3-<flavour>.txt            clearsigned pointer
    releases/<arch>/autobuilds/<stamp>/stage3-<flavour>-<stamp>.tar.xz
    releases/<arch>/autobuilds/<stamp>/...tar.xz.DIGESTS              clearsigned, Catalyst's format
    releases/<arch>/autobuilds/<stamp>/...tar.xz.CONTENTS.gz

Signing keys are throwaway ed25519 keys made in a temporary GNUPGHOME (one of them signs with a
subkey, as Gentoo's release key may). The pointer carries ``# Latest as of`` and ``# ts=`` as
releng's copy_buildsync.sh writes them; ``write_pointer(ts=...)`` publishes an older or newer
one (``ts=None``: no ts line). The server does HTTP
Range (SimpleHTTPRequestHandler does not) and can misbehave on request: ``missing`` (404),
``hangup`` (close without answering), ``drop_after`` (close after N body bytes), ``stall_after``
(go silent after N body bytes), ``ignore_range`` (answer 200 to a Range request). Every request
is recorded in ``requests``.

Run it by hand to try ``imagebuild build --mirror`` against it:
``python tests/loopback_mirror.py [--tarball STAGE.tar.xz] [--port 8080]`` prints the mirror URL
and the keyring to pass to imagebuild, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import io
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

STAMP = "20261124T000000Z"
EPOCH = 1795478400  # 2026-11-24T00:00:00Z
RELEASE_UID = "Loopback Release Engineering (TEST KEY) <releng@example.invalid>"


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """A throwaway OpenPGP key in its own GNUPGHOME."""

    home: Path
    fingerprint: str  # the primary key's
    uid: str
    faked_time: str | None = None  # gpg --faked-system-time, to make a key that has expired since
    subkey: str | None = None  # fingerprint of the signing subkey that makes the signatures, if any

    def _gpg(self, *args: str, input: bytes | None = None) -> bytes:
        faked = ["--faked-system-time", self.faked_time] if self.faked_time else []
        return subprocess.run(
            ["gpg", "--homedir", str(self.home), "--batch", "--no-tty", "--pinentry-mode", "loopback",
             "--passphrase", "", *faked, *args],
            input=input, capture_output=True, check=True, timeout=60,
        ).stdout

    def clearsign(self, text: str) -> bytes:
        # "FPR!" makes gpg sign with exactly that (sub)key.
        signer = f"{self.subkey}!" if self.subkey else self.fingerprint
        return self._gpg("--local-user", signer, "--clearsign", input=text.encode())

    def detach_sign(self, data: bytes) -> bytes:
        """An armoured detached signature of ``data`` (as Portage signs a gpkg's archives)."""
        signer = f"{self.subkey}!" if self.subkey else self.fingerprint
        return self._gpg("--local-user", signer, "--digest-algo", "SHA512", "--armor", "--detach-sign", input=data)

    def export(self, path: Path, *, armor: bool = False) -> Path:
        path.write_bytes(self._gpg("--export", *(["--armor"] if armor else []), self.fingerprint))
        return path


def export_keyring(path: Path, *keys: SigningKey) -> Path:
    """One binary keyring holding the public parts of ``keys`` (binary keyrings concatenate)."""
    path.write_bytes(b"".join(key._gpg("--export", key.fingerprint) for key in keys))
    return path


def make_signing_key(home: Path, uid: str, *, expired: bool = False, subkey: bool = False) -> SigningKey:
    """A new passphrase-less ed25519 signing key in GNUPGHOME ``home`` (fast to make).

    ``expired``: made at midnight on 2020-01-01 with a one-day lifetime and used at noon that
    day, so it has expired now. (gpg's faked clock runs on while the key is made: a signature
    at the key's own creation second can come out "created in the future" on a loaded host.)
    ``subkey``: the key gets a signing subkey, and signatures are made with the subkey.
    """
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    faked_time = "20200101T000000" if expired else None
    base = ["gpg", "--homedir", str(home), "--batch", "--no-tty"]
    if faked_time:
        base += ["--faked-system-time", faked_time]
    subprocess.run([*base, "--pinentry-mode", "loopback", "--passphrase", "",
                    "--quick-gen-key", uid, "ed25519", "sign", "1d" if expired else "never"],
                   capture_output=True, check=True, timeout=120)
    listing = subprocess.run([*base, "--with-colons", "--list-keys"],
                             capture_output=True, text=True, check=True).stdout
    fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    sub = None
    if subkey:
        subprocess.run([*base, "--pinentry-mode", "loopback", "--passphrase", "",
                        "--quick-add-key", fingerprint, "ed25519", "sign", "never"],
                       capture_output=True, check=True, timeout=120)
        listing = subprocess.run([*base, "--with-colons", "--with-subkey-fingerprint", "--list-keys"],
                                 capture_output=True, text=True, check=True).stdout
        sub = [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")][-1]
    used = "20200101T120000" if expired else None
    return SigningKey(home=home, fingerprint=fingerprint, uid=uid, faked_time=used, subkey=sub)


def stop_gpg_agent(home: Path) -> None:
    """End the gpg-agent that signing started for GNUPGHOME ``home`` (only that one)."""
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, check=False)


def make_stage_tarball(path: Path, payload_size: int = 256 << 10) -> Path:
    """A small stage-like .tar.xz; the payload is incompressible so transfers have a body to cut."""
    members = {
        "etc/os-release": b'NAME="Loopback test stage"\nID=gentoo\nPRETTY_NAME="not a real Gentoo stage3"\n',
        "etc/hostname": b"localhost\n",
        "usr/share/imagebuild-test/payload.bin": random.Random(4).randbytes(payload_size),
    }
    with tarfile.open(path, "w:xz", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("etc", "usr", "usr/bin", "usr/share", "usr/share/imagebuild-test"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
            tar.addfile(info)
        link = tarfile.TarInfo("bin")
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "usr/bin", EPOCH
        tar.addfile(link)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            tar.addfile(info, io.BytesIO(data))
    return path


def digests_text(files: list[Path], algorithms: tuple[str, ...] = ("blake2b", "sha512")) -> str:
    """A DIGESTS file as Catalyst writes it (catalyst/base/genbase.py): per file, per algorithm."""
    out = []
    for file in files:
        for algorithm in algorithms:
            digest = hashlib.new(algorithm, file.read_bytes()).hexdigest()
            out.append(f"# {algorithm.upper()} HASH\n{digest}  {file.name}\n")
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    path: str  # relative to the mirror root, no leading slash
    range: str | None


class LoopbackMirror:
    """A context manager: builds the mirror tree under ``root``, serves it, always shuts down."""

    def __init__(self, root: Path, key: SigningKey, *, arch: str = "amd64", flavour: str = "amd64-openrc",
                 stamp: str = STAMP, tarball: Path | None = None, port: int = 0) -> None:
        self.port = port
        self.root, self.key, self.arch, self.flavour, self.stamp = root, key, arch, flavour, stamp
        self.source_tarball = tarball
        self.autobuilds = f"releases/{arch}/autobuilds"
        suffix = ".tar.xz"
        if tarball is not None:
            known = (".tar.xz", ".tar.zst", ".tar.gz", ".tar.bz2", ".tar", "")
            suffix = next(s for s in known if tarball.name.endswith(s))
        self.tarball_name = f"stage3-{flavour}-{stamp}{suffix}"
        self.tarball = f"{self.autobuilds}/{stamp}/{self.tarball_name}"
        self.digests = f"{self.tarball}.DIGESTS"
        self.contents = f"{self.tarball}.CONTENTS.gz"
        self.pointer = f"{self.autobuilds}/latest-stage3-{flavour}.txt"
        self.keyring = root.parent / f"{root.name}-keyring.gpg"
        # Misbehaviour switches (paths relative to the root, as in self.tarball).
        self.missing: set[str] = set()
        self.hangup: set[str] = set()
        self.drop_after: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- the tree ---
    def build(self) -> None:
        tarball = self.path(self.tarball)
        tarball.parent.mkdir(parents=True, exist_ok=True)
        if self.source_tarball is not None:
            # Hard-linked to spare a copy of a large stage: do not tamper() with it then.
            with contextlib.suppress(OSError):
                tarball.unlink()
            try:
                tarball.hardlink_to(self.source_tarball)
            except OSError:
                shutil.copyfile(self.source_tarball, tarball)
        else:
            make_stage_tarball(tarball)
        self.path(self.contents).write_bytes(gzip.compress(b"dir etc\nobj etc/hostname\n", mtime=0))
        self.write_digests()
        self.write_pointer()
        self.key.export(self.keyring)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def write_signed(self, relative: str, text: str, key: SigningKey | None = None) -> None:
        self.path(relative).write_bytes((key or self.key).clearsign(text))

    def write_digests(self, algorithms: tuple[str, ...] = ("blake2b", "sha512"),
                      key: SigningKey | None = None) -> None:
        files = [self.path(self.tarball), self.path(self.contents)]
        self.write_signed(self.digests, digests_text(files, algorithms), key)

    def pointer_text(self, entry: str | None = None, ts: int | None = EPOCH) -> str:
        """The pointer as copy_buildsync.sh writes it; ``ts=None`` leaves out both header lines."""
        size = self.path(self.tarball).stat().st_size
        entry = entry or f"{self.stamp}/{self.tarball_name} {size}"
        if ts is None:
            return f"{entry}\n"
        stamp_time = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(ts))
        return f"# Latest as of {stamp_time}\n# ts={ts}\n{entry}\n"

    def write_pointer(self, entry: str | None = None, key: SigningKey | None = None,
                      ts: int | None = EPOCH) -> None:
        self.write_signed(self.pointer, self.pointer_text(entry, ts), key)

    def publish_snapshot(self, repo: Path, *, key: SigningKey | None = None, date: str = "20261124") -> str:
        """``repo`` as Gentoo's snapshots/gentoo-latest.tar.xz (one top directory, gentoo-DATE/)
        with its armoured detached signature .gpgsig; returns the tarball's path in the mirror."""
        relative = "snapshots/gentoo-latest.tar.xz"
        tarball = self.path(relative)
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball, "w:xz", format=tarfile.PAX_FORMAT) as tar:
            tar.add(repo, arcname=f"gentoo-{date}")
        signer = key or self.key
        signature = signer._gpg("--local-user", f"{signer.subkey}!" if signer.subkey else signer.fingerprint,
                                "--armor", "--detach-sign", "--output", "-", str(tarball))
        self.path(f"{relative}.gpgsig").write_bytes(signature)
        return relative

    def tamper(self, relative: str, old: bytes, new: bytes) -> None:
        """Change bytes of a served file in place, without re-signing or re-digesting it."""
        data = self.path(relative).read_bytes()
        assert old in data, f"{old!r} not in {relative}"
        self.path(relative).write_bytes(data.replace(old, new, 1))

    # --- the server ---
    @property
    def url(self) -> str:
        assert self._server is not None, "the mirror is not serving"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def requested(self, relative: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == relative]

    def __enter__(self) -> LoopbackMirror:
        self.root.mkdir(parents=True, exist_ok=True)
        self.build()
        handler = type("Handler", (_Handler,), {"mirror": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-mirror", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()  # releases stalled handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    mirror: LoopbackMirror
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet: pytest shows failures
        pass

    def do_HEAD(self) -> None:
        relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        self.mirror.requests.append(RecordedRequest(relative, None))
        self.close_connection = True
        file = (self.mirror.root / relative).resolve()
        if relative in self.mirror.missing or not file.is_relative_to(self.mirror.root.resolve()) or not file.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(file.stat().st_size))
        self.send_header("Connection", "close")
        self.end_headers()

    def do_GET(self) -> None:
        mirror = self.mirror
        relative = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        mirror.requests.append(RecordedRequest(relative, self.headers.get("Range")))
        self.close_connection = True
        if relative in mirror.hangup:
            self._abort()
            return
        file = (mirror.root / relative).resolve()
        if relative in mirror.missing or not file.is_relative_to(mirror.root.resolve()) or not file.is_file():
            self.send_error(404)
            return
        size = file.stat().st_size
        start, status = 0, 200
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted and not mirror.ignore_range:
            start, status = int(wanted.group(1)), 206
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Connection", "close")
        self.end_headers()
        limit = mirror.drop_after.get(relative, mirror.stall_after.get(relative))
        with open(file, "rb") as stream:
            stream.seek(start)
            sent = 0
            while chunk := stream.read(1 << 16 if limit is None else min(1 << 16, limit - sent)):
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
        if relative in mirror.drop_after:
            self._abort()
        elif relative in mirror.stall_after:
            mirror._stopping.wait()

    def _abort(self) -> None:
        """Close the connection now, mid-response, as a dying server or network would."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


# --- pytest fixtures (import them into a test module by name) ---

@dataclasses.dataclass(frozen=True)
class SigningKeys:
    release: SigningKey  # the mirror's key; its public part is the keyring the tests trust
    stranger: SigningKey  # a second key, never in the mirror's keyring
    expired: SigningKey  # a key whose lifetime ended in 2020
    subkeyed: SigningKey  # a key that signs with its signing subkey


@pytest.fixture(name="signing_keys", scope="session")
def signing_keys_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKeys]:
    from conftest import require_tools

    require_tools("gpg", "gpgconf")
    base = tmp_path_factory.mktemp("gnupg")
    keys = SigningKeys(
        release=make_signing_key(base / "release", RELEASE_UID),
        stranger=make_signing_key(base / "stranger", "Someone Else (TEST KEY) <stranger@example.invalid>"),
        expired=make_signing_key(base / "expired", "Expired Key (TEST KEY) <old@example.invalid>", expired=True),
        subkeyed=make_signing_key(base / "subkeyed", "Subkey Signer (TEST KEY) <sub@example.invalid>", subkey=True),
    )
    try:
        yield keys
    finally:
        for key in (keys.release, keys.stranger, keys.expired, keys.subkeyed):
            stop_gpg_agent(key.home)


@pytest.fixture(name="mirror")
def mirror_fixture(tmp_path: Path, signing_keys: SigningKeys) -> Iterator[LoopbackMirror]:
    with LoopbackMirror(tmp_path / "mirror", signing_keys.release) as mirror:
        yield mirror


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a loopback Gentoo mirror until Ctrl-C.")
    parser.add_argument("--tarball", type=Path, help="serve this stage tarball (default: a tiny test one)")
    parser.add_argument("--arch", default="amd64")
    parser.add_argument("--flavour", default=None, help="default: <arch>-openrc")
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    args = parser.parse_args()
    # SIGTERM ends the server like Ctrl-C does, so the key's gpg-agent and the tree are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="loopback-mirror-") as tmp:
        key = make_signing_key(Path(tmp) / "gnupg", RELEASE_UID)
        try:
            flavour = args.flavour or f"{args.arch}-openrc"
            with LoopbackMirror(Path(tmp) / "mirror", key, arch=args.arch, flavour=flavour,
                                tarball=args.tarball, port=args.port) as mirror:
                print(f"mirror:  {mirror.url}/\nkeyring: {mirror.keyring}\nflavour: {mirror.flavour}\n"
                      f"trust:   --trusted-key {key.fingerprint}", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    threading.Event().wait()
        finally:
            stop_gpg_agent(key.home)


if __name__ == "__main__":
    sys.exit(main())
