"""Check clearsigned files (Gentoo's DIGESTS and latest-stage3 pointers) with GnuPG.

The user controls the keyring: imagebuild ships no key (it could not be checked offline
anyway) and never fetches one. Verification runs in a throwaway GnuPG home, so the user's
own ~/.gnupg, trust database and agent are never touched, and only the text inside the
signature is returned: anything a mirror puts around the signed block is dropped by gpg.

Being in the keyring is not enough: a signature counts only if its key's *primary*
fingerprint is one of the trusted ones (Gentoo's release key unless the user names others).
Gentoo's ``gentoo-release.asc`` holds four keys (release, infrastructure, ebuild repository,
Portage snapshots); without this check a stage signed by any of them would pass. A signature
by a subkey counts as its primary key's, as gpg reports it (the last field of VALIDSIG).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from imagebuild.errors import StageError
from imagebuild.log import logger
from imagebuild.run import find_tool, run

# "Gentoo Linux Release Engineering (Automated Weekly Release Key) <releng@gentoo.org>",
# long key id BB572E0E2D182910; it signs the weekly autobuilds (stage3 DIGESTS and the
# latest-*.txt pointers). Published on https://www.gentoo.org/downloads/signatures/ and in
# the Handbook's "Verifying the downloaded files"; shipped on Gentoo by
# sec-keys/openpgp-keys-gentoo-release as /usr/share/openpgp-keys/gentoo-release.asc.
GENTOO_RELEASE_KEY_FINGERPRINT = "13EBBDBEDE7A12775DFDB1BABB572E0E2D182910"
# "Gentoo ebuild repository signing key (Automated Signing Key) <infrastructure@gentoo.org>",
# also "Gentoo Portage Snapshot Signing Key (Automated Signing Key)", long key id
# DB6B8C1F96D8BF6D: it signs the ebuild repository snapshots (snapshots/*.tar.xz.gpgsig, what
# emerge-webrsync checks), and is in the same gentoo-release.asc.
GENTOO_SNAPSHOT_KEY_FINGERPRINT = "DCD05B71EAB94199527F44ACDB6B8C1F96D8BF6D"

# A v4 fingerprint is 40 hex digits, a v5/v6 one 64; short and long key IDs (8, 16) can be
# forged by anyone who makes enough keys, so they are refused as trust anchors.
_FINGERPRINT = re.compile(r"[0-9A-F]{40}|[0-9A-F]{64}")

KEYRING_NAME = "gentoo-release.gpg"
SYSTEM_KEYRING = Path("/etc/imagebuild") / KEYRING_NAME


def user_keyring() -> Path:
    """``$XDG_CONFIG_HOME/imagebuild/gentoo-release.gpg`` (``~/.config/...`` by default)."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "imagebuild" / KEYRING_NAME


def keyring_how_to() -> str:
    """How a user gets Gentoo's release key into a keyring imagebuild finds."""
    return (
        f"get Gentoo's release key (fingerprint {GENTOO_RELEASE_KEY_FINGERPRINT}) and export it to "
        f"{user_keyring()} or {SYSTEM_KEYRING}: on Gentoo, "
        f"'gpg --dearmor -o {user_keyring()} /usr/share/openpgp-keys/gentoo-release.asc' "
        "(from sec-keys/openpgp-keys-gentoo-release); elsewhere "
        f"'gpg --keyserver hkps://keys.gentoo.org --recv-keys {GENTOO_RELEASE_KEY_FINGERPRINT}' then "
        f"'gpg --export {GENTOO_RELEASE_KEY_FINGERPRINT} > {user_keyring()}' (check the fingerprint "
        "against https://www.gentoo.org/downloads/signatures/). Or pass another keyring file "
        "(binary or ASCII-armored) with --keyring (spec: imagebuild/keyring). Other keys in the "
        "keyring are not trusted unless named with --trusted-key FPR (spec: imagebuild/trusted_keys)"
    )


def normalize_fingerprint(text: str) -> str | None:
    """``13EB BDBE ... 2910`` or ``0x13ebbdbe...`` -> upper-case hex without spaces; None if it is
    not a full fingerprint (a key ID, a typo)."""
    compact = re.sub(r"\s+", "", text).upper().removeprefix("0X")
    return compact if _FINGERPRINT.fullmatch(compact) else None


def fingerprint_problem(text: str) -> str | None:
    """Why ``text`` is not a usable trusted-key fingerprint, or None if it is one."""
    if normalize_fingerprint(text) is not None:
        return None
    compact = re.sub(r"\s+", "", text).upper().removeprefix("0X")
    if re.fullmatch(r"[0-9A-F]{8}|[0-9A-F]{16}", compact):
        return (f"'{text}' is a key ID, not a fingerprint; key IDs can be forged, so give the "
                "primary key's full fingerprint (40 hex digits, 'gpg --fingerprint KEY' shows it)")
    return (f"'{text}' is not an OpenPGP fingerprint: expected 40 hex digits, "
            f"for example {GENTOO_RELEASE_KEY_FINGERPRINT}")


def find_keyring(keyring: Path | None) -> Path:
    """The keyring to check against: ``keyring`` if given, else the user's, else the system's."""
    if keyring is not None:
        path = Path(keyring).expanduser()
        if not path.is_file():
            raise StageError(f"keyring {path} does not exist or is not a file", hint=keyring_how_to())
        return path
    for candidate in (user_keyring(), SYSTEM_KEYRING):
        if candidate.is_file():
            return candidate
    raise StageError(
        f"no keyring to verify Gentoo's signatures with (looked for {user_keyring()} and {SYSTEM_KEYRING})",
        hint=keyring_how_to(),
    )


@dataclasses.dataclass(frozen=True)
class Verified:
    """The signed text of a clearsigned file and who signed it."""

    text: str
    signing_key: str  # fingerprint of the (sub)key that made the signature
    primary_key: str  # fingerprint of its primary key: the one that is trusted
    uid: str  # the key's user ID as gpg reports it, for messages


def verify_clearsigned(signed: bytes, keyring: Path, *, what: str,
                       trusted: Iterable[str] = (GENTOO_RELEASE_KEY_FINGERPRINT,)) -> Verified:
    """Verify clearsigned ``signed`` (``what`` names it in messages) against ``keyring``.

    Returns only the text inside the signature. A bad signature, a key missing from the
    keyring, a key whose primary fingerprint is not in ``trusted``, an expired or revoked key
    and an unsigned file each raise their own StageError.
    """
    with tempfile.TemporaryDirectory(prefix="imagebuild-gpg-") as home:
        signed_path = Path(home) / "signed"
        signed_path.write_bytes(signed)
        plain_path = Path(home) / "plain"
        verified = _verify(Path(home), ["--output", plain_path, "--verify", signed_path], keyring,
                           what=what, trusted=trusted)
        return dataclasses.replace(verified, text=plain_path.read_bytes().decode("utf-8", errors="replace"))


def verify_detached(data: Path, signature: bytes, keyring: Path, *, what: str,
                    trusted: Iterable[str]) -> Verified:
    """Verify ``data`` against its detached ``signature`` (Gentoo's snapshots/*.gpgsig) by the
    same rules as verify_clearsigned; the returned text is empty."""
    with tempfile.TemporaryDirectory(prefix="imagebuild-gpg-") as home:
        signature_path = Path(home) / "signature"
        signature_path.write_bytes(signature)
        return _verify(Path(home), ["--verify", signature_path, data], keyring, what=what, trusted=trusted)


def _verify(home_dir: Path, args: list[str | Path], keyring: Path, *, what: str,
            trusted: Iterable[str]) -> Verified:
    gpg = find_tool("gpg")
    trusted_keys = frozenset(trusted)
    # A copy in the throwaway home: gpg takes locks beside its keyrings, and the user's
    # keyring may live in a read-only place such as /etc.
    ring = home_dir / "keyring.gpg"
    _load_keyring(gpg, keyring, ring, home_dir)
    result = run(
        [gpg, "--homedir", home_dir, "--batch", "--no-tty", "--no-default-keyring",
         "--keyring", ring, "--trust-model", "always", "--no-auto-key-retrieve",
         "--status-fd", "1", *args],
        env={"GNUPGHOME": str(home_dir)},
        check=False,
    )
    status = _status_lines(result.stdout)
    keys = _KeyLookup(gpg, home_dir, ring)
    verdict = _judge(status, result.returncode, what=what, keyring=keyring, trusted=trusted_keys,
                     describe=keys.describe)
    if verdict is not None:
        raise verdict
    validsig = status["VALIDSIG"][0]
    signing_key, primary_key = validsig[0], _primary_of(validsig)
    uid = " ".join(status["GOODSIG"][0][1:])
    logger.debug("  good signature on %s by key %s (primary %s, %s)", what, signing_key, primary_key, uid)
    return Verified(text="", signing_key=signing_key, primary_key=primary_key, uid=uid)


def _primary_of(validsig: list[str]) -> str:
    """VALIDSIG's primary-key fingerprint (its 10th field); the signing key's own without it."""
    return validsig[9] if len(validsig) > 9 else validsig[0]


def _load_keyring(gpg: str, keyring: Path, ring: Path, home: Path) -> None:
    try:
        data = keyring.read_bytes()
    except OSError as exc:
        raise StageError(f"cannot read keyring {keyring}: {exc.strerror}", hint=keyring_how_to()) from exc
    if b"-----BEGIN PGP PUBLIC KEY BLOCK-----" in data[:4096]:
        # gpg --keyring reads binary keyrings and keyboxes only; Gentoo ships .asc.
        run([gpg, "--homedir", home, "--batch", "--no-tty", "--dearmor", "--output", ring, keyring],
            env={"GNUPGHOME": str(home)})
    else:
        ring.write_bytes(data)


class _KeyLookup:
    """Primary fingerprint and user ID of a key in the keyring, by key ID or fingerprint.

    BADSIG, EXPKEYSIG and REVKEYSIG name only the long key ID of the signing (sub)key; the
    messages name the primary fingerprint, which a listing of the keyring gives. The listing
    runs only when a message needs it.
    """

    def __init__(self, gpg: str, home: Path, ring: Path) -> None:
        self.gpg, self.home, self.ring = gpg, home, ring
        self._keys: dict[str, tuple[str, str]] | None = None

    def describe(self, key: str) -> str:
        """``primary fingerprint FPR (uid)`` for key ID or fingerprint ``key``; ``key KEY`` if unknown."""
        primary, uid = self.lookup(key) or ("", "")
        if not primary:
            return f"key {key}"
        return f"primary key fingerprint {primary}" + (f" ({uid})" if uid else "")

    def lookup(self, key: str) -> tuple[str, str] | None:
        if self._keys is None:
            self._keys = self._list()
        key = key.upper()
        return self._keys.get(key) or self._keys.get(key[-16:])

    def _list(self) -> dict[str, tuple[str, str]]:
        result = run([self.gpg, "--homedir", self.home, "--batch", "--no-tty", "--no-default-keyring",
                      "--keyring", self.ring, "--with-colons", "--fixed-list-mode", "--with-fingerprint",
                      "--with-subkey-fingerprint", "--list-keys"],
                     env={"GNUPGHOME": str(self.home)}, check=False)
        keys: dict[str, tuple[str, str]] = {}
        primary, uid = "", ""
        fingerprints: list[str] = []

        def close() -> None:
            for fingerprint in fingerprints:
                keys[fingerprint] = keys[fingerprint[-16:]] = (primary, uid)

        for line in result.stdout.decode("utf-8", errors="replace").splitlines():
            fields = line.split(":")
            if fields[0] == "pub":
                close()
                primary, uid, fingerprints = "", "", []
            elif fields[0] == "fpr" and len(fields) > 9:
                primary = primary or fields[9]
                fingerprints.append(fields[9])
            elif fields[0] == "uid" and len(fields) > 9 and not uid:
                uid = fields[9]
        close()
        return keys


def _status_lines(stdout: bytes) -> dict[str, list[list[str]]]:
    """``[GNUPG:] KEYWORD args...`` lines from --status-fd, grouped by keyword."""
    status: dict[str, list[list[str]]] = {}
    for line in stdout.decode("utf-8", errors="replace").splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        keyword, *args = line[len("[GNUPG:] "):].split(" ")
        status.setdefault(keyword, []).append(args)
    return status


def trusted_keys_hint(trusted: frozenset[str], signer: str) -> str:
    """Which primary keys are trusted, and how to trust ``signer`` if the user means to."""
    trust = (f"if you publish your own stages with this key, trust it with --trusted-key {signer or 'FPR'} "
             "(spec: imagebuild/trusted_keys; it replaces the default, so name Gentoo's key too if you "
             "also want it)")
    if trusted == {GENTOO_RELEASE_KEY_FINGERPRINT}:
        return (f"only Gentoo's release key {GENTOO_RELEASE_KEY_FINGERPRINT} is trusted; if this mirror is "
                f"Gentoo's, do not use this file; {trust}")
    return (f"the trusted keys are {', '.join(sorted(trusted))}; do not use this file unless you know this "
            f"key; {trust}")


def _judge(status: dict[str, list[list[str]]], returncode: int, *, what: str, keyring: Path,
           trusted: frozenset[str], describe: Callable[[str], str]) -> StageError | None:
    """None when exactly one good, current signature by a trusted primary key covers the file."""
    if "BADSIG" in status:
        bad = status["BADSIG"][0]
        return StageError(
            f"BAD signature on {what}: made by key {bad[0]} ({describe(bad[0])}) but the content "
            "does not match it — the file was altered or corrupted",
            hint="do not use this download; try again later or from another mirror, and report it "
            "to the mirror's operators if it persists",
        )
    if "NO_PUBKEY" in status or any(err[5:6] == ["9"] for err in status.get("ERRSIG", [])):
        key = status["NO_PUBKEY"][0][0] if "NO_PUBKEY" in status else status["ERRSIG"][0][0]
        fingerprint = next((e[6] for e in status.get("ERRSIG", []) if len(e) > 6 and e[6] != "-"), None)
        return StageError(
            f"{what} is signed by key {key}{f' (fingerprint {fingerprint})' if fingerprint else ''}, "
            f"which is not in keyring {keyring}",
            hint="if this is the mirror you meant, the keyring may be out of date; otherwise do not "
            f"trust this file. Gentoo's autobuilds are signed by {GENTOO_RELEASE_KEY_FINGERPRINT}; "
            + keyring_how_to(),
        )
    if "ERRSIG" in status:
        err = status["ERRSIG"][0]
        code = err[5] if len(err) > 5 else "?"
        return StageError(f"cannot check the signature on {what} (key {err[0]}, gpg error code {code})",
                          hint="the signature uses an algorithm this GnuPG cannot check; update GnuPG")
    if "NEWSIG" not in status or "NODATA" in status:
        return StageError(f"{what} is not PGP-signed",
                          hint="the mirror must serve Gentoo's clearsigned file; check the mirror URL")
    if len(status["NEWSIG"]) != 1:
        return StageError(f"{what} carries {len(status['NEWSIG'])} signatures; exactly one is expected",
                          hint="do not use this download; try another mirror")
    # Who signed: VALIDSIG names the primary; gpg also writes it for expired and revoked keys.
    signer = next((status[k][0][0] for k in ("GOODSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG") if k in status), None)
    if "VALIDSIG" in status:
        signing_key, primary = status["VALIDSIG"][0][0], _primary_of(status["VALIDSIG"][0])
    else:
        signing_key, primary = signer or "", ""
    if (signer or primary) and primary not in trusted:
        subkey_note = ""
        if signing_key in trusted:
            subkey_note = (f" ({signing_key} is named as trusted, but it is a subkey: name primary "
                           "key fingerprints)")
        described = describe(primary or signer or "")
        return StageError(
            f"{what} is signed by {described}, which is in keyring {keyring} but is not a trusted "
            f"release key{subkey_note}",
            hint=trusted_keys_hint(trusted, primary),
        )
    if "EXPKEYSIG" in status:
        key = status["EXPKEYSIG"][0][0]
        return StageError(f"{what} is signed by key {key} ({describe(primary or key)}), which has expired "
                          f"in keyring {keyring}",
                          hint="refresh the key (Gentoo extends its expiry) — " + keyring_how_to())
    if "REVKEYSIG" in status:
        key = status["REVKEYSIG"][0][0]
        return StageError(f"{what} is signed by key {key} ({describe(primary or key)}), which is REVOKED "
                          f"in keyring {keyring}",
                          hint="do not use this download; check Gentoo's announcements for the current key")
    if "EXPSIG" in status:
        return StageError(f"the signature on {what} has expired", hint="use a current release")
    if returncode != 0 or "GOODSIG" not in status or "VALIDSIG" not in status:
        errors = " ".join(" ".join(e) for e in status.get("ERROR", [])) or f"exit status {returncode}"
        return StageError(f"gpg could not verify {what} ({errors})",
                          hint="do not use this download; try again or from another mirror")
    return None
