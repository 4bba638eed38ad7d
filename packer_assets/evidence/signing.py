"""SSH signatures (OpenSSH's SSHSIG, the format of `ssh-keygen -Y sign` and git) over proof manifests.

Written with `cryptography` from OpenSSH's PROTOCOL.sshsig: the signature covers
`"SSHSIG" || string(namespace) || string(reserved="") || string("sha512") || string(SHA-512(message))`
and is stored armoured (`-----BEGIN SSH SIGNATURE-----`), so stock
`ssh-keygen -Y verify -f allowed_signers -I <principal> -n packer-assets-proof -s manifest.json.sig`
checks it. Ed25519 keys only: the one key type every OpenSSH since 6.5 makes and verifies alike.
The private key is read from its file when signing and never kept, printed or passed in an argv.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from packer_assets.errors import ConfigError, OperationError
from packer_assets.evidence.allowed_signers import SignerRefused, check_allowed, read_allowed_signers

NAMESPACE = "packer-assets-proof"
MAGIC = b"SSHSIG"
HASH = "sha512"
ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
ARMOR_END = "-----END SSH SIGNATURE-----"
KEY_TYPE = "ssh-ed25519"


class SigningKeyError(ConfigError):
    """The configured signing key cannot be used; the message names the file, never its content."""


class SignatureError(OperationError):
    """A signature that is malformed, for another namespace, or does not verify."""


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _read_string(buf: bytes, at: int) -> tuple[bytes, int]:
    if at + 4 > len(buf):
        raise SignatureError("signature truncated")
    (size,) = struct.unpack(">I", buf[at : at + 4])
    if at + 4 + size > len(buf):
        raise SignatureError("signature truncated")
    return buf[at + 4 : at + 4 + size], at + 4 + size


def _signed_data(namespace: str, message: bytes, hash_name: str = HASH) -> bytes:
    return (
        MAGIC
        + _string(namespace.encode())
        + _string(b"")
        + _string(hash_name.encode())
        + _string(hashlib.new(hash_name, message).digest())
    )


def public_key_line(public: Ed25519PublicKey) -> str:
    """`ssh-ed25519 AAAA...` as in authorized_keys and allowed_signers."""
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _public_blob(public: Ed25519PublicKey) -> bytes:
    return base64.b64decode(public_key_line(public).split()[1])


@dataclass(frozen=True)
class Signer:
    """Where the signing key lives and the ID to name it by (`key_id`, e.g. `builds@example.org`)."""

    key_file: Path
    key_id: str | None = None

    def _private(self) -> Ed25519PrivateKey:
        data = read_private_key_file(Path(self.key_file))
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except (ValueError, TypeError):
            raise SigningKeyError(
                f"signing key {self.key_file}: not an unencrypted OpenSSH private key "
                "(make one with: ssh-keygen -t ed25519 -N '' -f <file>)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"signing key {self.key_file}: an Ed25519 key is needed (ssh-keygen -t ed25519)")
        return key

    def public_key(self) -> str:
        return public_key_line(self._private().public_key())

    def sign(self, message: bytes, namespace: str = NAMESPACE) -> str:
        """The armoured SSHSIG signature of message."""
        private = self._private()
        signature = _string(KEY_TYPE.encode()) + _string(private.sign(_signed_data(namespace, message)))
        blob = (
            MAGIC
            + struct.pack(">I", 1)
            + _string(_public_blob(private.public_key()))
            + _string(namespace.encode())
            + _string(b"")
            + _string(HASH.encode())
            + _string(signature)
        )
        text = base64.b64encode(blob).decode()
        lines = [text[i : i + 70] for i in range(0, len(text), 70)]
        return "\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + "\n"


def read_private_key_file(path: Path) -> bytes:
    """The key file's bytes, refused as ssh-keygen refuses it (authfile.c sshkey_perm_ok): a file we own
    that group or others may read or write, or anything that is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: a FIFO named as the key must not hang
    except OSError as exc:
        raise SigningKeyError(f"signing key {path}: cannot read it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SigningKeyError(f"signing key {path}: is a directory, not a key file")
        if not stat.S_ISREG(info.st_mode):
            raise SigningKeyError(f"signing key {path}: not a regular file")
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            raise SigningKeyError(
                f"signing key {path}: UNPROTECTED PRIVATE KEY FILE: permissions "
                f"0{info.st_mode & 0o777:03o} are too open, ssh-keygen ignores such a key too "
                f"(chmod 600 {path})"
            )
        with os.fdopen(os.dup(fd), "rb") as key_file:
            return key_file.read()
    finally:
        os.close(fd)


def verify(message: bytes, armored: str, namespace: str = NAMESPACE) -> str:
    """Check an armoured SSHSIG signature of message; return the signer's public key line.

    Raises SignatureError naming what is wrong. Whether that key may sign is the caller's question
    (allowed_signers)."""
    text = armored.strip()
    if not (text.startswith(ARMOR_BEGIN) and text.endswith(ARMOR_END)):
        raise SignatureError("not an armoured SSH signature")
    try:
        blob = base64.b64decode("".join(text[len(ARMOR_BEGIN) : -len(ARMOR_END)].split()), validate=True)
    except ValueError:
        raise SignatureError("signature is not valid base64") from None
    if blob[:6] != MAGIC or blob[6:10] != struct.pack(">I", 1):
        raise SignatureError("not an SSHSIG version 1 signature")
    public, at = _read_string(blob, 10)
    signed_namespace, at = _read_string(blob, at)
    _reserved, at = _read_string(blob, at)
    hash_name, at = _read_string(blob, at)
    signature, at = _read_string(blob, at)
    if signed_namespace.decode(errors="replace") != namespace:
        raise SignatureError(
            f"signature is for namespace {signed_namespace.decode(errors='replace')!r}, not {namespace!r}"
        )
    kind, rest = _read_string(public, 0)
    sig_kind, sig_at = _read_string(signature, 0)
    if kind.decode() != KEY_TYPE or sig_kind.decode() != KEY_TYPE:
        raise SignatureError(f"signature key type {kind.decode(errors='replace')!r} is not {KEY_TYPE}")
    raw_public, _ = _read_string(public, rest)
    raw_signature, _ = _read_string(signature, sig_at)
    if hash_name.decode() not in ("sha512", "sha256"):
        raise SignatureError(f"unknown hash {hash_name.decode(errors='replace')!r}")
    key = Ed25519PublicKey.from_public_bytes(raw_public)
    try:
        key.verify(raw_signature, _signed_data(namespace, message, hash_name.decode()))
    except InvalidSignature:
        raise SignatureError(
            "signature does not verify: the signed file changed, or it was signed by another key"
        ) from None
    return public_key_line(key)


def allowed_signer(
    path: Path,
    public_key: str,
    namespace: str = NAMESPACE,
    principal: str | None = None,
    verify_time: int | None = None,
) -> str | None:
    """The principals of the allowed_signers line that lets `public_key` sign for `principal` (the
    `-I` of `ssh-keygen -Y verify`; None: any) in `namespace` now (or at `verify_time`), or None.
    Read exactly as ssh-keygen reads it (allowed_signers.py); an unreadable file raises
    AllowedSignersError (one line)."""
    try:
        return check_allowed_signer(path, public_key, namespace, principal, verify_time)
    except SignerRefused:
        return None


def check_allowed_signer(
    path: Path,
    public_key: str,
    namespace: str = NAMESPACE,
    principal: str | None = None,
    verify_time: int | None = None,
) -> str:
    """As allowed_signer, but a refusal raises SignerRefused saying why (the line and the reason)."""
    blob = base64.b64decode(public_key.split()[1])
    return check_allowed(read_allowed_signers(path), blob, principal, namespace, verify_time, source=str(path))
