"""Install passwords: read from the environment mapping, hashed for Linux, encoded for Windows.

Linux installers get only a SHA-512 crypt hash (`$6$...`), made by the system's crypt library
(libxcrypt/glibc `crypt_r` through ctypes, as every Linux has it: 0.4 s for the 656,000 rounds on the
2-core development machine, against 0.9 s in pure Python) and otherwise by `libpass` (the maintained fork of passlib, same `passlib.hash` API);
both give the same string. A hash is kept in memory for the process, keyed by (password, salt): a
re-render of the same key costs nothing, and what is written is the same full-strength hash. The salt is not random: a random salt would change the
rendered files on every run, and the rendered content is the asset's data version (an unchanged
render must leave downstream fresh). The salt is therefore derived by HMAC-SHA256 from
(template key, password) keyed with a per-site seed:

- same key + same password + same seed -> same hash (reproducible renders);
- another key or another password -> another salt (no two templates share a hash);
- `PACKER_ASSETS_SALT_SEED` (read from the env mapping, optional) makes the salts of one site
  unlike every other site's, so nobody can precompute hashes for this project's default seed;
- an explicit `salt=` overrides all of that (tests, or a caller who stores its own salt).

Windows needs a password it can recover, so Autounattend carries the documented `PlainText=false`
form: base64(UTF-16LE(password + suffix)). That is an encoding, not protection: the rendered
Autounattend.xml (and the answer ISO) must be handled like the password itself.

Nothing here logs or echoes the password; error messages name only the variable and the key.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from functools import lru_cache

from passlib.hash import sha512_crypt

from packer_assets.errors import ConfigError

SALT_SEED_ENV = "PACKER_ASSETS_SALT_SEED"
DEFAULT_SALT_SEED = "packer-assets/v1"
# Pinned (not the library default) so a library upgrade cannot change every rendered hash.
# 656000 is passlib's current default: slow enough to make guessing costly (0.4 s natively, see above).
CRYPT_ROUNDS = 656_000
SALT_LEN = 16  # the maximum for SHA-512 crypt
_CRYPT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# What Windows SIM appends before encoding (Microsoft's documented example decodes to
# "pwAdministratorPassword"); local accounts and AutoLogon use "Password".
ADMIN_SUFFIX = "AdministratorPassword"
USER_SUFFIX = "Password"


class PasswordError(ConfigError):
    """The install password is missing or unusable; the message never holds the value."""


def read_password(env: Mapping[str, str], variable: str, key: str) -> str:
    """The password from `env[variable]`; PasswordError naming the variable and key if unset/empty."""
    value = env.get(variable)
    if value is None or value == "":
        raise PasswordError(
            f"{key}: install_user.password_env: environment variable {variable} is "
            f"{'unset' if value is None else 'empty'}; set it to the install password for {key}"
        )
    if "\x00" in value:
        raise PasswordError(
            f"{key}: install_user.password_env: {variable} holds a NUL byte, which no installer accepts"
        )
    return value


def derive_salt(key: str, password: str, seed: str = DEFAULT_SALT_SEED) -> str:
    """A 16-character crypt salt from HMAC-SHA256(seed, key NUL password): stable, per key and password."""
    digest = hmac.new(seed.encode(), f"{key}\x00{password}".encode(), hashlib.sha256).digest()
    return "".join(_CRYPT_ALPHABET[b % 64] for b in digest[:SALT_LEN])


def _native_crypt() -> Callable[[bytes, bytes], bytes | None] | None:
    """`crypt_r` of the system's libcrypt, or None where there is none (the pure-Python backend is used)."""
    name = ctypes.util.find_library("crypt")
    try:
        crypt_r = ctypes.CDLL(name or "libcrypt.so.1").crypt_r
    except (OSError, AttributeError):
        return None
    crypt_r.restype = ctypes.c_char_p
    crypt_r.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]

    def run(phrase: bytes, setting: bytes) -> bytes | None:
        # struct crypt_data: 32 KiB in libxcrypt, ~128 KiB in old glibc; zeroed, one per call (thread-safe)
        data = ctypes.create_string_buffer(1 << 18)
        out: bytes | None = crypt_r(phrase, setting, data)
        return out

    return run


_NATIVE = _native_crypt()


@lru_cache(maxsize=64)
def _crypt(password: str, salt: str, rounds: int = CRYPT_ROUNDS) -> str:
    setting = f"$6$rounds={rounds}${salt}$"
    if _NATIVE is not None and "\x00" not in password:
        out = _NATIVE(password.encode("utf-8"), setting.encode("ascii"))
        # libxcrypt answers a failure with None or a string starting with "*"
        if out and out.startswith(setting.encode("ascii")):
            return out.decode("ascii")
    hashed: str = sha512_crypt.using(salt=salt, rounds=rounds).hash(password)  # passlib: untyped
    return hashed


def sha512_crypt_hash(password: str, salt: str) -> str:
    """`$6$rounds=656000$<salt>$<hash>` (glibc crypt(3) format, what every Linux installer takes)."""
    if not salt or len(salt) > SALT_LEN or any(ch not in _CRYPT_ALPHABET for ch in salt):
        raise PasswordError(f"a crypt salt must be 1-{SALT_LEN} characters of [./0-9A-Za-z]")
    return _crypt(password, salt)


def verify_sha512_crypt(password: str, hashed: str) -> bool:
    match = re.fullmatch(r"\$6\$rounds=(\d+)\$([./0-9A-Za-z]{1,16})\$[./0-9A-Za-z]{86}", hashed)
    if match is None:
        ok: bool = sha512_crypt.verify(password, hashed)  # another form of $6$: the library's parser
        return ok
    return hmac.compare_digest(_crypt(password, match.group(2), int(match.group(1))), hashed)


def windows_encode(password: str, suffix: str) -> str:
    """The Autounattend `<PlainText>false</PlainText>` form: base64(UTF-16LE(password + suffix))."""
    return base64.b64encode((password + suffix).encode("utf-16-le")).decode("ascii")


def windows_decode(value: str, suffix: str) -> str | None:
    """The password back from `windows_encode` output, or None if it is not in that form."""
    try:
        text = base64.b64decode(value, validate=True).decode("utf-16-le")
    except (ValueError, UnicodeDecodeError):
        return None
    return text[: -len(suffix)] if text.endswith(suffix) else None
