"""Ed25519 keys and signed notes (C2SP signed-note, Go's ``sumdb/note`` key encodings).

A signed note is UTF-8 text ending in a newline, a blank line, then one line per
signature: ``— <key name> <base64(4-byte key id || signature)>``. The key id is
``SHA-256(key name || "\\n" || 0x01 || public key)[:4]`` (0x01 = Ed25519).

Key files use Go's text encodings, so the same files work with Go tooling:

* private (signer) key: ``PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 || seed)>``
* public (verifier) key: ``<name>+<key id hex>+<base64(0x01 || public key)>``

The private key file must be mode 0600 (or stricter); a wider one is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from gateway.errors import ConfigError
from gateway.secrets import read_private_text

ALG_ED25519 = 0x01
EM_DASH = "\u2014"
_NAME = re.compile(r"^[^\s+]+$")  # non-empty, no Unicode space, no '+'
_RAW = serialization.Encoding.Raw


class NoteError(ValueError):
    """A note, key or checkpoint that does not parse."""


def key_id(name: str, public: bytes) -> bytes:
    """The 4-byte key id of an Ed25519 key named ``name``."""
    return hashlib.sha256(name.encode() + b"\n" + bytes((ALG_ED25519,)) + public).digest()[:4]


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise NoteError(f"key name {name!r} must be non-empty without spaces or '+'")
    return name


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError(f"{what} is not base64") from None


@dataclass(frozen=True)
class VerifierKey:
    """A public key and its name; verifies signatures of notes."""

    name: str
    public: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public)

    @property
    def vkey(self) -> str:
        """Go's verifier key encoding, one line: what a public key file holds."""
        data = base64.b64encode(bytes((ALG_ED25519,)) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{data}"

    @property
    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the 32-byte public key: compare it out of band."""
        return "sha256:" + hashlib.sha256(self.public).hexdigest()

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public).verify(signature, message)
        except InvalidSignature:
            return False
        return True

    @classmethod
    def parse(cls, vkey: str) -> VerifierKey:
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError("verifier key is not <name>+<key id>+<base64 key>")
        name, kid, data = parts
        _check_name(name)
        raw = _b64(data, "verifier key")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("verifier key is not an Ed25519 key (0x01 followed by 32 bytes)")
        key = cls(name, raw[1:])
        if kid != key.key_id.hex():
            raise NoteError(f"verifier key id {kid} does not match its name and key")
        return key


class SignerKey:
    """A private Ed25519 key and its name."""

    def __init__(self, name: str, private: Ed25519PrivateKey) -> None:
        self.name = _check_name(name)
        self._private = private
        public = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
        self.verifier = VerifierKey(name, public)
        self.key_id = self.verifier.key_id

    @classmethod
    def generate(cls, name: str) -> SignerKey:
        return cls(name, Ed25519PrivateKey.generate())

    @property
    def skey(self) -> str:
        """Go's signer key encoding (secret)."""
        seed = self._private.private_bytes(
            _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        data = base64.b64encode(bytes((ALG_ED25519,)) + seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{data}"

    @classmethod
    def parse(cls, skey: str) -> SignerKey:
        parts = skey.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise NoteError("signer key is not PRIVATE+KEY+<name>+<key id>+<base64 key>")
        name, kid, data = parts[2:]
        raw = _b64(data, "signer key")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("signer key is not an Ed25519 key (0x01 followed by a 32-byte seed)")
        key = cls(name, Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if kid != key.key_id.hex():
            raise NoteError(f"signer key id {kid} does not match its name and key")
        return key

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


# -- notes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    signature: bytes


def sign_note(text: str, *signers: SignerKey) -> str:
    """The signed note of ``text`` (which must end with a newline)."""
    _check_text(text)
    lines = []
    for s in signers:
        sig = base64.b64encode(s.key_id + s.sign(text.encode())).decode()
        lines.append(f"{EM_DASH} {s.name} {sig}\n")
    return text + "\n" + "".join(lines)


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if any(c < " " and c != "\n" for c in text):
        raise NoteError("note text must not contain control characters")


def parse_note(note: str) -> tuple[str, list[Signature]]:
    """Split a signed note into its text and signatures (none verified)."""
    if not note.endswith("\n"):
        raise NoteError("signed note must end with a newline")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("signed note has no blank line before its signatures")
    text, block = note[: cut + 1], note[cut + 2 :]
    _check_text(text)
    sigs: list[Signature] = []
    for line in block.splitlines():
        if not line.startswith(EM_DASH + " "):
            raise NoteError(f"malformed signature line {line[:80]!r}")
        fields = line[2:].split(" ")
        if len(fields) != 2:
            raise NoteError(f"malformed signature line {line[:80]!r}")
        raw = _b64(fields[1], "signature")
        if len(raw) < 5:
            raise NoteError("signature too short")
        sigs.append(Signature(fields[0], raw[:4], raw[4:]))
    if not sigs:
        raise NoteError("signed note has no signature")
    return text, sigs


def open_note(note: str, keys: Iterable[VerifierKey]) -> tuple[str, list[VerifierKey]]:
    """Verify ``note`` against trusted ``keys``; returns its text and the keys that signed.

    As the spec requires: signatures by unknown keys are ignored, a failing
    signature by a known key rejects the note, and so does having none by a
    known key. Raises NoteError saying which.
    """
    text, sigs = parse_note(note)
    known = {(k.name, k.key_id): k for k in keys}
    good: list[VerifierKey] = []
    for s in sigs:
        k = known.get((s.name, s.key_id))
        if k is None:
            continue
        if not k.verify(text.encode(), s.signature):
            raise NoteError(f"signature by {k.name}+{k.key_id.hex()} does not verify")
        good.append(k)
    if not good:
        by = ", ".join(f"{s.name}+{s.key_id.hex()}" for s in sigs)
        raise NoteError(f"no signature by a trusted key (signed by {by})")
    return text, good


# -- checkpoints (C2SP tlog-checkpoint body) ----------------------------------------------
def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    """Origin line, tree size line, base64 root hash line."""
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def parse_checkpoint(text: str) -> tuple[str, int, bytes]:
    """(origin, size, root hash) of a checkpoint note text."""
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("checkpoint text is not origin, size and hash lines")
    origin, size, root = lines[0], lines[1], lines[2]
    if not origin:
        raise NoteError("checkpoint origin is empty")
    if not size.isascii() or not size.isdigit() or (size != "0" and size.startswith("0")):
        raise NoteError(f"checkpoint size {size[:30]!r} is not a decimal number")
    digest = _b64(root, "checkpoint root hash")
    if len(digest) != 32:
        raise NoteError("checkpoint root hash is not 32 bytes")
    return origin, int(size), digest


# -- key files -------------------------------------------------------------------------------
def write_private(path: Path, key: SignerKey, *, force: bool = False) -> None:
    """Write the signer key with mode 0600; refuse to overwrite unless ``force``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if force:
            path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; refusing to overwrite a key (use --force)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # the umask may have narrowed it; never widened
        f.write(key.skey + "\n")


def load_private(path: Path, what: str = "checkpoints.key_file") -> SignerKey:
    """Read a signer key file; refused when group or others may read it."""
    text = read_private_text(path, what)
    try:
        return SignerKey.parse(text)
    except NoteError as exc:
        raise ConfigError(f"{what}: {path}: {exc}") from None


def write_public(path: Path, key: VerifierKey) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(key.vkey + "\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None


def load_public(paths: Sequence[Path]) -> list[VerifierKey]:
    """Verifier keys, one per non-empty line (``#`` starts a comment line)."""
    keys: list[VerifierKey] = []
    for p in paths:
        try:
            lines = p.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                keys.append(VerifierKey.parse(line))
            except NoteError as exc:
                raise ConfigError(f"{p}:{n}: {exc}") from None
    if not keys:
        raise ConfigError(f"{', '.join(map(str, paths))}: no public key found")
    return keys
