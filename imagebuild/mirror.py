"""Fetch the latest stage3 from a Gentoo mirror, the way Gentoo publishes it, and verify it.

Under ``<mirror>/releases/<arch>/autobuilds/``, ``latest-stage3-<flavour>.txt`` (clearsigned)
names ``<stamp>/stage3-<flavour>-<stamp>.tar.xz <size>``; beside the tarball,
``<tarball>.DIGESTS`` (clearsigned, written by Catalyst) has ``# BLAKE2B HASH`` and
``# SHA512 HASH`` sections of ``<hex>  <file name>`` lines.

Both signed files are checked with GnuPG against a keyring the user controls (imagebuild.gpg),
and count only if signed by a trusted primary key (Gentoo's release key unless the user names
others); only the text inside the signatures is read.

The pointer's header (``# Latest as of <date>`` and ``# ts=<epoch>``, written by releng's
scripts/copy_buildsync.sh each time it publishes) says how new it is. The newest ``ts`` seen
for each arch and flavour is kept in ``<cache>/pointers/<arch>/latest-stage3-<flavour>.json``;
a pointer older than it, or one without ``ts`` once one with it was seen, is refused as a
mirror that is behind or a replayed (rollback/freeze) release unless ``allow_older`` is set.

The tarball is downloaded, resumably, to ``<cache>/downloads/<name>.partial``, checked against
the pointer's size and every SHA512 and BLAKE2B digest the DIGESTS file gives, and only then
renamed to ``<cache>/stages/<name>`` with a ``<name>.verified.json`` record of its digests. A
later fetch whose verified DIGESTS names the same digests re-hashes the cached file and uses
it without downloading; a cached file that no longer matches is deleted and fetched again.

Failure leaves nothing in ``stages/``. A transfer cut short (dropped connection, timeout,
Ctrl-C) keeps its ``.partial`` so the next run resumes it with an HTTP Range request; a
partial that turns out wrong (too long, digest mismatch) is deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from imagebuild import __version__
from imagebuild.config import Arch, strip_stage_suffix
from imagebuild.errors import StageError
from imagebuild.gpg import (
    GENTOO_RELEASE_KEY_FINGERPRINT,
    GENTOO_SNAPSHOT_KEY_FINGERPRINT,
    Verified,
    find_keyring,
    fingerprint_problem,
    normalize_fingerprint,
    verify_clearsigned,
    verify_detached,
)
from imagebuild.log import Progress, complete_step, logger, mib
from imagebuild.pointers import cache_lock, check_freshness, parse_pointer
from imagebuild.run import find_tool, run

# Seconds a connection may stay silent before the transfer counts as stalled. A whole
# stage3 takes minutes, but a healthy mirror never goes a minute without sending a byte.
HTTP_TIMEOUT = 60.0
# The pointer and DIGESTS files are a few kB; refuse to buffer anything much larger.
SMALL_FILE_LIMIT = 1 << 20
CHUNK = 1 << 16

# The digests we check; Catalyst writes them with hashlib.new(name) (BLAKE2B is blake2b-512).
ALGORITHMS: dict[str, Callable[[], Any]] = {"sha512": hashlib.sha512, "blake2b": hashlib.blake2b}

_REACH_HINT = "check the mirror URL and that this machine can reach it; try again, or use another mirror"
_SYNC_HINT = "the mirror may be mid-sync; try again later or use another mirror"

_FLAVOUR = re.compile(r"[a-z0-9][a-z0-9_.+-]*")
_STAMP_SUFFIX = re.compile(r"-(@[A-Z_]+@|\d{8}(T\d{6}Z)?|latest)$")


def flavour_from_source_subpath(text: str) -> str:
    """``23.0-default/stage3-amd64-nomultilib-systemd-@TIMESTAMP@`` -> ``amd64-nomultilib-systemd``.

    Accepts what releng and Catalyst users write: a ``@TIMESTAMP@`` placeholder or an expanded
    stamp, ``-latest``, or no stamp, with or without a tarball suffix.
    """
    name = strip_stage_suffix(PurePosixPath(text.strip()).name)
    if not name.startswith("stage3-"):
        raise StageError(
            f"source_subpath '{text}' does not name a stage3, so it cannot come from a mirror",
            hint="only stage3 seeds are published on Gentoo's mirrors; give the seed as a local "
            "tarball with --stage FILE",
        )
    flavour = _STAMP_SUFFIX.sub("", name.removeprefix("stage3-"))
    if not _FLAVOUR.fullmatch(flavour):
        raise StageError(f"cannot tell the stage3 flavour from source_subpath '{text}'",
                         hint="expected something like 23.0-default/stage3-amd64-openrc-@TIMESTAMP@")
    return flavour


def trusted_fingerprints(keys: Iterable[str] | None) -> frozenset[str]:
    """Normalized primary fingerprints to trust; Gentoo's release key when ``keys`` is None or empty."""
    names = list(keys or ())
    if not names:
        return frozenset({GENTOO_RELEASE_KEY_FINGERPRINT})
    for name in names:
        if problem := fingerprint_problem(name):
            raise StageError(f"trusted key {problem}", hint="check --trusted-key (spec: imagebuild/trusted_keys)")
    return frozenset(normalize_fingerprint(name) or name for name in names)


def parse_digests(text: str, filename: str, *, what: str) -> dict[str, str]:
    """SHA512 and BLAKE2B digests (lower-case hex) that a (verified) DIGESTS text gives ``filename``.

    Other files (the .CONTENTS.gz) and other algorithms are ignored; at least one of the two
    must be there, and an algorithm listed twice with different values is an error.
    """
    found: dict[str, str] = {}
    algorithm: str | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            header = re.fullmatch(r"#\s*(\S+)\s+HASH", line, re.IGNORECASE)
            algorithm = header.group(1).lower() if header else None
            continue
        fields = line.split()
        if algorithm not in ALGORITHMS or len(fields) != 2:
            continue
        hexdigest, name = fields[0].lower(), PurePosixPath(fields[1].lstrip("*")).name
        if name != filename:
            continue
        if not re.fullmatch(r"[0-9a-f]{128}", hexdigest):
            raise StageError(f"{what}: malformed {algorithm.upper()} digest for {filename}",
                             hint="the DIGESTS file is damaged; try another mirror")
        if found.setdefault(algorithm, hexdigest) != hexdigest:
            raise StageError(f"{what} gives {filename} two different {algorithm.upper()} digests",
                             hint="do not use this download; try another mirror")
    if not found:
        raise StageError(f"{what} lists no SHA512 or BLAKE2B digest for {filename}",
                         hint=f"the DIGESTS file does not belong to this tarball; {_SYNC_HINT}")
    return found


def fetch_stage(base_url: str, arch: Arch, flavour: str, cache_dir: Path, *,
                keyring: Path | None = None, trusted_keys: Iterable[str] | None = None,
                allow_older: bool = False, progress: bool = True) -> Path:
    """The verified latest stage3-<flavour> tarball for ``arch`` from the mirror at ``base_url``.

    Downloads it (resuming a partial download) unless the cache already holds a file with the
    digests of the current release. ``keyring`` defaults to imagebuild.gpg.find_keyring's choice;
    ``trusted_keys`` (primary fingerprints) to Gentoo's release key. ``allow_older`` accepts,
    with a warning, a pointer older than the newest one seen for this flavour.
    """
    if not _FLAVOUR.fullmatch(flavour):
        raise StageError(f"invalid stage3 flavour '{flavour}'", hint="for example amd64-openrc or arm64-systemd")
    trusted = trusted_fingerprints(trusted_keys)
    keyring_path = find_keyring(keyring)  # before any network traffic: fail fast without a key
    find_tool("gpg")
    cache_dir = Path(cache_dir)
    autobuilds = f"{base_url.rstrip('/')}/releases/{arch.gentoo_dir}/autobuilds"
    pointer_url = f"{autobuilds}/latest-stage3-{flavour}.txt"
    with complete_step(f"Fetching the latest stage3-{flavour} from {base_url}"):
        signed = _get_small(pointer_url, hint=f"check the mirror URL and that Gentoo publishes a "
                            f"stage3-{flavour} for {arch.value} (releases/{arch.gentoo_dir}/autobuilds/)")
        verified = verify_clearsigned(signed, keyring_path, what=pointer_url, trusted=trusted)
        pointer = parse_pointer(verified.text, flavour, what=pointer_url)
        logger.info("  %s: %s, signed by %s", PurePosixPath(pointer_url).name, pointer.when, _signer(verified))
        with _cache_errors(cache_dir):
            check_freshness(cache_dir, arch, flavour, pointer, url=pointer_url, base_url=base_url,
                            signed_by=verified.primary_key, allow_older=allow_older)
        tarball_url = f"{autobuilds}/{pointer.path}"
        digests_url = f"{tarball_url}.DIGESTS"
        signed = _get_small(digests_url, hint=_SYNC_HINT)
        verified = verify_clearsigned(signed, keyring_path, what=digests_url, trusted=trusted)
        digests = parse_digests(verified.text, pointer.name, what=digests_url)
        logger.info("  %s (%s), DIGESTS signed by %s", pointer.name, mib(pointer.size), _signer(verified))

        stages, downloads = cache_dir / "stages", cache_dir / "downloads"
        with _cache_errors(cache_dir):
            downloads.mkdir(parents=True, exist_ok=True)
            with cache_lock(downloads / f"{pointer.name}.lock", f"fetching {pointer.name}"):
                cached = _cached_stage(stages / pointer.name, pointer.size, digests)
                if cached is not None:
                    logger.info("  cache hit: %s", cached)
                    return cached
                partial = downloads / f"{pointer.name}.partial"
                _download(tarball_url, partial, pointer.size, progress=progress)
                actual = _check_digests(partial, digests, tarball_url)
                record = {"name": pointer.name, "url": tarball_url, "size": pointer.size, "digests": actual,
                          "signed_by": verified.primary_key, "pointer_ts": pointer.ts,
                          "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                return _store(partial, stages, record)


SNAPSHOT = "gentoo-latest.tar.xz"


def snapshot_signature(base_url: str) -> bytes:
    """The detached signature of the mirror's latest repository snapshot (small; it names the snapshot)."""
    url = f"{base_url.rstrip('/')}/snapshots/{SNAPSHOT}.gpgsig"
    return _get_small(url, hint="check the mirror URL, or give the ebuild repository with --repo DIR")


def snapshot_id(signature: bytes) -> str:
    return hashlib.sha256(signature).hexdigest()[:16]


def fetch_snapshot(base_url: str, cache_dir: Path, *, keyring: Path | None = None,
                   trusted_keys: Iterable[str] = (GENTOO_SNAPSHOT_KEY_FINGERPRINT,),
                   progress: bool = True) -> tuple[Path, str]:
    """The gentoo ebuild repository from the mirror's ``snapshots/gentoo-latest.tar.xz``, its
    detached signature (``.gpgsig``, what emerge-webrsync checks) verified with the keyring and
    trust rules of the stage3 (the trusted key is Gentoo's snapshot key unless the user names
    others), unpacked and cached as ``<cache>/snapshots/gentoo-<id>/``. Returns the directory
    and the snapshot's id (from its signature: a new snapshot has a new one)."""
    keyring_path = find_keyring(keyring)
    find_tool("gpg")
    url = f"{base_url.rstrip('/')}/snapshots/{SNAPSHOT}"
    with complete_step(f"Fetching the gentoo repository snapshot from {base_url}"):
        signature = snapshot_signature(base_url)
        ident = snapshot_id(signature)
        snapshots, downloads = cache_dir / "snapshots", cache_dir / "downloads"
        tree = snapshots / f"gentoo-{ident}"
        with _cache_errors(cache_dir):
            downloads.mkdir(parents=True, exist_ok=True)
            with cache_lock(downloads / "snapshot.lock", "fetching the repository snapshot"):
                if (tree / "profiles" / "repo_name").is_file():
                    logger.info("  cache hit: %s (the snapshot the mirror's signature names)", tree)
                    return tree, ident
                partial = downloads / f"gentoo-{ident}.tar.xz.partial"
                _download(url, partial, _content_length(url), progress=progress)
                try:
                    verified = verify_detached(partial, signature, keyring_path, what=url,
                                               trusted=trusted_fingerprints(trusted_keys))
                except StageError:
                    partial.unlink()
                    raise
                logger.info("  %s signed by %s", SNAPSHOT, _signer(verified))
                unpacking = snapshots / f".gentoo-{ident}.partial"
                shutil.rmtree(unpacking, ignore_errors=True)
                unpacking.mkdir(parents=True)
                try:
                    # Its one top directory (gentoo-YYYYMMDD/) goes, as emerge-webrsync strips it.
                    run(["tar", "--strip-components=1", "--no-same-owner", "-C", unpacking, "-xJf", partial])
                    if not (unpacking / "profiles" / "repo_name").is_file():
                        raise StageError(f"{url} holds no ebuild repository (no profiles/repo_name)",
                                         hint="check the mirror URL, or give the repository with --repo DIR")
                    unpacking.rename(tree)
                finally:
                    shutil.rmtree(unpacking, ignore_errors=True)
                    partial.unlink(missing_ok=True)
                for old in snapshots.glob("gentoo-*"):
                    if old != tree:
                        shutil.rmtree(old, ignore_errors=True)
                logger.info("  unpacked to %s", tree)
                return tree, ident


def _content_length(url: str) -> int:
    with _answer(url, _SYNC_HINT, method="HEAD") as response:
        length = response.headers.get("Content-Length")
    if length is None or not length.isdigit():
        raise StageError(f"{url}: the server does not say how large it is (no Content-Length)",
                         hint="use another mirror, or give the repository with --repo DIR")
    return int(length)


def _signer(verified: Verified) -> str:
    return f"primary key {verified.primary_key}" + (f" ({verified.uid})" if verified.uid else "")


@contextlib.contextmanager
def _cache_errors(cache_dir: Path) -> Iterator[None]:
    """OSError -> StageError: network errors are StageErrors by now, so this is the local disk."""
    try:
        yield
    except OSError as exc:
        raise StageError(f"cannot write the stage cache under {cache_dir}: {exc.strerror or exc}",
                         hint="check free space and permissions, or choose another --cache-dir") from exc


# --- HTTP -----------------------------------------------------------------------------------

def _request(url: str, headers: dict[str, str] | None = None, *, method: str = "GET") -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": f"imagebuild/{__version__}", **(headers or {})},
                                     method=method)
    return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)  # noqa: S310 - URL is the mirror setting


@contextlib.contextmanager
def _answer(url: str, hint: str, *, method: str = "GET") -> Iterator[http.client.HTTPResponse]:
    """The server's answer to ``method`` on ``url``; an HTTP error status is a StageError with
    ``hint``, any other failure (also while the body is read) one with the reachability hint."""
    try:
        with _request(url, method=method) as response:
            yield response
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _network_error(url, exc, hint) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _network_error(url, exc) from exc


def _network_error(url: str, exc: BaseException, hint: str = _REACH_HINT) -> StageError:
    """A StageError naming ``url`` and what went wrong, with ``hint`` saying what to do."""
    if isinstance(exc, urllib.error.HTTPError):
        return StageError(f"{url}: the server answered HTTP {exc.code} {exc.reason}", hint=hint)
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):
        what = f"no data for {HTTP_TIMEOUT:g}s (timed out)"
    elif isinstance(exc, ConnectionRefusedError):
        what = "connection refused"
    elif isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead)):
        what = "the server closed the connection"
    else:
        what = str(exc) or type(exc).__name__
    return StageError(f"cannot fetch {url}: {what}", hint=hint)


def _get_small(url: str, *, hint: str) -> bytes:
    """The body of a small file (pointer, DIGESTS), read whole."""
    logger.debug("  GET %s", url)
    with _answer(url, hint) as response:
        body = response.read(SMALL_FILE_LIMIT + 1)
        length = response.headers.get("Content-Length")
    if len(body) > SMALL_FILE_LIMIT:
        raise StageError(f"{url} is larger than {SMALL_FILE_LIMIT} bytes; that is not a Gentoo pointer or "
                         "DIGESTS file", hint="check the mirror URL")
    if length is not None and length.isdigit() and len(body) != int(length):
        raise StageError(f"cannot fetch {url}: the server closed the connection after {len(body)} of "
                         f"{length} bytes", hint="try again; if it persists, use another mirror")
    return body


def _download(url: str, partial: Path, size: int, *, progress: bool) -> None:
    """Bring ``partial`` to ``size`` bytes from ``url``, resuming it with an HTTP Range request."""
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:  # cannot be the start of this release
        partial.unlink()
        have = 0
    if have == size:
        logger.info("  %s is complete from an earlier run; verifying it", partial.name)
        return
    resume_hint = f"run again to resume the download (kept in {partial}), or try another mirror"
    response, have = _open_at(url, partial, have, size)
    with response, open(partial, "ab" if have else "wb") as out, \
            Progress(partial.name.removesuffix(".partial"), size, have, enabled=progress, pipe_quarters=True) as bar:
        while True:
            try:
                # read1 returns what has arrived, so a stall keeps every byte received before it.
                chunk = response.read1(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise _network_error(url, exc, resume_hint) from exc
            if not chunk:
                break
            if have + len(chunk) > size:
                out.close()
                partial.unlink()
                raise StageError(f"{url} is longer than the {size} bytes the signed pointer file says",
                                 hint=f"the partial download was deleted; {_SYNC_HINT}")
            out.write(chunk)
            have += len(chunk)
            bar.update(have)
    if have < size:
        raise StageError(f"cannot fetch {url}: the server closed the connection after {have} of {size} bytes",
                         hint=resume_hint)


def _open_at(url: str, partial: Path, have: int, size: int) -> tuple[http.client.HTTPResponse, int]:
    """A response that continues ``partial`` (206) or starts over (200), and the offset it starts at."""
    try:
        response = _request(url, {"Range": f"bytes={have}-"} if have else None)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and have:  # the server's file does not extend our partial one
            logger.info("  the server refused to resume %s; starting over", partial.name)
            partial.unlink()
            return _open_at(url, partial, 0, size)
        raise _network_error(url, exc, _SYNC_HINT) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _network_error(url, exc) from exc
    if have and response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start == have and total in (None, size):
            logger.info("  resuming %s at %s", partial.name, mib(have))
            return response, have
        response.close()
        partial.unlink()
        raise StageError(f"{url}: the server resumed at the wrong place (Content-Range "
                         f"{response.headers.get('Content-Range')!r} for byte {have})",
                         hint="the partial download was deleted; run again to start over")
    if have:
        logger.info("  the server ignored the Range request; downloading %s from the start", partial.name)
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) != size:
        response.close()
        raise StageError(f"{url} is {length} bytes but the signed pointer file says {size}",
                         hint=_SYNC_HINT)
    return response, 0


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-999/1000`` -> (100, 1000); unknown parts are None."""
    match = re.fullmatch(r"bytes\s+(\d+)-\d+/(\d+|\*)", (header or "").strip())
    if not match:
        return None, None
    return int(match.group(1)), (int(match.group(2)) if match.group(2) != "*" else None)


# --- verification and the cache ------------------------------------------------------------

def _hash_file(path: Path) -> dict[str, str]:
    hashers = {name: make() for name, make in ALGORITHMS.items()}
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            for hasher in hashers.values():
                hasher.update(block)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def _check_digests(partial: Path, expected: dict[str, str], url: str) -> dict[str, str]:
    """Every digest DIGESTS gives must match; on a mismatch the partial file is deleted."""
    tarball = partial.name.removesuffix(".partial")
    with complete_step(f"Verifying {' and '.join(a.upper() for a in sorted(expected))} of {tarball}"):
        actual = _hash_file(partial)
    wrong = [algorithm.upper() for algorithm, value in expected.items() if actual[algorithm] != value]
    if wrong:
        partial.unlink()
        raise StageError(f"{' and '.join(wrong)} of {url} does not match its signed DIGESTS file",
                         hint="the download was corrupted or tampered with and has been deleted; run "
                         "again, and use another mirror if it happens again")
    return actual


def _sidecar(tarball: Path) -> Path:
    return tarball.with_name(f"{tarball.name}.verified.json")


def _cached_stage(tarball: Path, size: int, digests: dict[str, str]) -> Path | None:
    """``tarball`` if the cache holds it with exactly these digests, re-hashed now; else None.

    A cached file is never trusted on its record alone: a disk error, a stray write or a copy
    cut short would otherwise be a "cache hit" forever. Anything that does not match is removed.
    """
    sidecar = _sidecar(tarball)
    if not tarball.exists() and not tarball.is_symlink():
        sidecar.unlink(missing_ok=True)
        return None
    problem = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        recorded = json.loads(sidecar.read_text())["digests"]
        problem = "" if all(recorded.get(a) == v for a, v in digests.items()) else "is another release"
    if problem is None:
        problem = "has no readable record of its verification"
    elif not problem:
        info = tarball.lstat()
        if not stat.S_ISREG(info.st_mode):
            problem = "is not a regular file"
        elif info.st_size != size:
            problem = f"is {info.st_size} bytes, not the {size} the signed pointer gives (damaged)"
        else:
            with complete_step(f"Re-checking the cached {tarball.name} against its signed DIGESTS"):
                actual = _hash_file(tarball)
            wrong = [a.upper() for a, v in digests.items() if actual[a] != v]
            if not wrong:
                return tarball
            problem = f"no longer matches its signed DIGESTS ({' and '.join(wrong)} differ: damaged)"
    if "damaged" in problem:
        logger.warning("warning: the cached %s %s; deleting it and fetching it again", tarball.name, problem)
    else:
        logger.info("  the cached %s %s; deleting it and fetching it again", tarball.name, problem)
    sidecar.unlink(missing_ok=True)
    tarball.unlink(missing_ok=True)
    return None


def _store(partial: Path, stages: Path, record: dict[str, object]) -> Path:
    """Move a verified download into the cache, its record first: a tarball in stages/ always has one."""
    stages.mkdir(parents=True, exist_ok=True)
    target = stages / str(record["name"])
    staged_record = partial.with_name(f"{record['name']}.verified.json.tmp")
    staged_record.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    # Both renames stay on one filesystem (downloads/ and stages/ share the cache directory);
    # a record left without its tarball by a crash in between is removed by _cached_stage.
    os.replace(staged_record, _sidecar(target))
    os.replace(partial, target)
    logger.info("  stored %s", target)
    return target
