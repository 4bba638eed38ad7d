"""allowed_signers read as `ssh-keygen -Y verify` reads it (OpenSSH's sshsig.c, check_allowed_keys_line).

A line is `principals [options] keytype base64 [comment]`. `principals` is a pattern list (`*`, `?`,
`!negation`, comma-separated); options are `cert-authority`, `namespaces="pattern list"`,
`valid-after="YYYYMMDD[HHMM[SS]][Z|UTC]"` and `valid-before=...` (local time unless Z/UTC). As in
OpenSSH: lines are tried in order and the first one that allows the key wins; a line for another
principal, key, namespace or time is skipped, and so is a malformed line (an unknown option, a bad
time, a missing quote: ssh-keygen logs it and reads on); a `cert-authority` line never allows a plain
key. The file is read as bytes, one line per newline, as getline(3) does.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packer_assets.errors import ConfigError

WHITESPACE = " \t\r\n"
SUBPATTERN_MAX = 1023  # match.c: a longer subpattern never matches
# Key type names sshkey_read knows (OpenSSH 9.x keyimpls) -> the type the key blob must carry.
KEY_TYPES = {
    **{
        name: name
        for name in (
            "ssh-ed25519",
            "ssh-ed25519-cert-v01@openssh.com",
            "sk-ssh-ed25519@openssh.com",
            "sk-ssh-ed25519-cert-v01@openssh.com",
            "ecdsa-sha2-nistp256",
            "ecdsa-sha2-nistp384",
            "ecdsa-sha2-nistp521",
            "ecdsa-sha2-nistp256-cert-v01@openssh.com",
            "ecdsa-sha2-nistp384-cert-v01@openssh.com",
            "ecdsa-sha2-nistp521-cert-v01@openssh.com",
            "sk-ecdsa-sha2-nistp256@openssh.com",
            "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
            "ssh-dss",
            "ssh-dss-cert-v01@openssh.com",
            "ssh-rsa",
            "ssh-rsa-cert-v01@openssh.com",
        )
    },
    "webauthn-sk-ecdsa-sha2-nistp256@openssh.com": "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-256": "ssh-rsa",
    "rsa-sha2-512": "ssh-rsa",
    "rsa-sha2-256-cert-v01@openssh.com": "ssh-rsa-cert-v01@openssh.com",
    "rsa-sha2-512-cert-v01@openssh.com": "ssh-rsa-cert-v01@openssh.com",
}


class AllowedSignersError(ConfigError):
    """The allowed_signers file cannot be read (missing, a directory, unreadable)."""


class SignerRefused(ConfigError):
    """No line allows the key; the message says why (as ssh-keygen would log it)."""


class _BadLine(ConfigError):
    """A malformed line: ssh-keygen logs why and skips it."""


@dataclass(frozen=True)
class _Options:
    ca: bool = False
    namespaces: str | None = None
    valid_after: int = 0
    valid_before: int = 0


def read_allowed_signers(path: Path) -> bytes:
    """The file's bytes, or one line naming the file."""
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise AllowedSignersError(f"allowed signers file {path}: is a directory, not a file") from None
    except OSError as exc:
        raise AllowedSignersError(f"allowed signers file {path}: cannot read it ({exc.strerror})") from None


def check_allowed(
    data: bytes,
    key_blob: bytes,
    principal: str | None,
    namespace: str,
    verify_time: int | None = None,
    source: str = "allowed_signers",
) -> str:
    """The principal (else the line's principals) of the first line that allows `key_blob` (a plain
    key's wire blob) to sign for `principal` (ssh-keygen's -I; None: any, as find-principals) in
    `namespace` at `verify_time` (seconds; default now, as ssh-keygen without -Overify-time).
    Raises SignerRefused saying why."""
    when = int(time.time()) if verify_time is None else verify_time
    wanted = None if principal is None else _latin1(principal)
    why = f"{source}: no line allows this key" + (f" for principal {principal!r}" if principal else "")
    for number, line in enumerate(_lines(data), start=1):
        try:
            entry = _parse_line(line, wanted)
        except _BadLine as exc:  # logged and skipped by ssh-keygen too (check_allowed_keys_line)
            why = f"{source} line {number}: {exc}"
            continue
        if entry is None:
            continue
        principals, line_key, options = entry
        if options.ca or line_key != key_blob:
            continue  # a CA line allows certificates only; our signatures carry a plain key
        refusal = _refusal(options, namespace, when)
        if refusal is None:  # named as ssh-keygen names it: the -I principal, else the line's principals
            return principal if principal is not None else principals.encode("latin-1").decode("utf-8", "replace")
        why = f"{source} line {number}: {refusal}"
    raise SignerRefused(why)


def _latin1(text: str) -> str:
    return text.encode().decode("latin-1")  # compare bytes, as the C code does


def _lines(data: bytes) -> list[str]:
    """getline(3) lines, each with its newline, cut at a NUL as C strings are."""
    pieces = data.split(b"\n")
    lines = [p + b"\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    return [line.split(b"\0", 1)[0].decode("latin-1") for line in lines]


def _refusal(options: _Options, namespace: str, when: int) -> str | None:
    if options.namespaces is not None and match_pattern_list(namespace, options.namespaces) != 1:
        return f'key is not permitted for use in signature namespace "{namespace}"'
    if options.valid_after and when < options.valid_after:
        return f"key is not yet valid (valid-after {_utc(options.valid_after)})"
    if options.valid_before and when > options.valid_before:
        return f"key has expired (valid-before {_utc(options.valid_before)})"
    return None


def _utc(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# ------------------------------------------------------------------ one line (parse_principals_key_and_options)


def _parse_line(line: str, principal: str | None) -> tuple[str, bytes, _Options] | None:
    """(principals, key blob, options), or None for a blank/comment line or one for another principal."""
    rest = line.lstrip(WHITESPACE)
    if not rest or rest[0] == "#":
        return None
    principals, after = _strdelimw(rest)
    if principals is None or after is None:
        raise _BadLine("invalid line")
    rest = after
    if principal is not None and match_pattern_list(principal, principals) != 1:
        return None  # checked before the rest of the line is parsed, as ssh-keygen does
    key = _read_key(rest)
    options = ""
    if key is None:
        options, rest = _past_options(rest)
        if not rest:
            raise _BadLine("missing key")
        key = _read_key(rest[1:].lstrip(" \t"))
        if key is None:
            raise _BadLine("invalid key")
    return principals, key[1], _parse_options(options)


def _strdelimw(s: str) -> tuple[str | None, str | None]:
    """misc.c strdelimw: the first word (a leading quote quotes it), and the rest after whitespace."""
    at = next((i for i, c in enumerate(s) if c in WHITESPACE + '"'), None)
    if at is None:
        return s, None
    if s[at] == '"':
        s = s[:at] + s[at + 1 :]
        end = s.find('"', at)
        if end < 0:
            return None, None
        return s[:end], s[end + 1 :].lstrip(WHITESPACE)
    return s[:at], s[at + 1 :].lstrip(WHITESPACE)


def _past_options(s: str) -> tuple[str, str]:
    """authfile.c sshkey_advance_past_options: split at the first unquoted space or tab."""
    quoted, i = False, 0
    while i < len(s) and (quoted or s[i] not in " \t"):
        if s[i] == "\\" and s[i + 1 : i + 2] == '"':
            i += 1
        elif s[i] == '"':
            quoted = not quoted
        i += 1
    if i == len(s) and quoted:
        raise _BadLine("invalid options")
    return s[:i], s[i:]


def _read_key(s: str) -> tuple[str, bytes] | None:
    """sshkey_read: `type base64` -> (type the blob carries, blob), or None if that is not a key."""
    space = next((i for i, c in enumerate(s) if c in " \t"), None)
    if space is None or s[:space] not in KEY_TYPES:
        return None
    rest = s[space:].lstrip(" \t")
    token = re.split(r"[ \t]", rest, maxsplit=1)[0]
    try:
        blob = base64.b64decode(re.sub(r"[ \t\n\v\f\r]", "", token).encode("latin-1"), validate=True)
    except (binascii.Error, ValueError):
        return None
    kind = KEY_TYPES[s[:space]]
    return (kind, blob) if rest and _blob_is(blob, kind) else None


def _blob_is(blob: bytes, kind: str) -> bool:
    """The blob names a key type of the same kind; an Ed25519 blob is parsed whole (sshkey_fromb)."""
    name, at = _ssh_string(blob, 0)
    if name is None or KEY_TYPES.get(name.decode("latin-1")) != kind:
        return False
    if kind != "ssh-ed25519":
        return True  # never our signer's key; whether it parses fully only matters to its own kind
    public, at = _ssh_string(blob, at)
    return public is not None and len(public) == 32 and at == len(blob)


def _ssh_string(blob: bytes, at: int) -> tuple[bytes | None, int]:
    if at + 4 > len(blob):
        return None, at
    (size,) = struct.unpack(">I", blob[at : at + 4])
    if at + 4 + size > len(blob):
        return None, at
    return blob[at + 4 : at + 4 + size], at + 4 + size


# ------------------------------------------------------------------ options (sshsigopt_parse)


def _parse_options(opts: str) -> _Options:
    found: dict[str, Any] = {}
    i = 0
    while i < len(opts) and opts[i] not in " \t":
        i = _one_option(opts, i, found)
        if i >= len(opts) or opts[i] in " \t":
            break
        if opts[i] != ",":
            raise _BadLine("bad options: unknown key option")
        i += 1
        if i >= len(opts):
            raise _BadLine("bad options: unexpected end-of-options")
    options = _Options(**found)
    if options.valid_after and options.valid_before and options.valid_before <= options.valid_after:
        raise _BadLine('bad options: "valid-before" time is before "valid-after"')
    return options


def _one_option(opts: str, i: int, found: dict[str, Any]) -> int:
    """Parse the option at i into found; return where it ends (unchanged if none is known there)."""
    lower = opts[i:].lower()
    if lower.startswith("cert-authority"):  # a prefix match, as opt_flag
        found["ca"] = True
        return i + len("cert-authority")
    for name, field in (("namespaces", "namespaces"), ("valid-after", "valid_after"), ("valid-before", "valid_before")):
        if lower.startswith(name + "="):
            if field in found:
                raise _BadLine(f'bad options: multiple "{name}" clauses')
            value, i = _dequote(opts, i + len(name) + 1)
            found[field] = value if field == "namespaces" else _absolute_time(value, name)
            return i
    return i


def _dequote(s: str, i: int) -> tuple[str, int]:
    """misc.c opt_dequote: a "quoted" value, \\" for a quote inside."""
    if s[i : i + 1] != '"':
        raise _BadLine("bad options: missing start quote")
    out, i = [], i + 1
    while i < len(s) and s[i] != '"':
        if s[i] == "\\" and s[i + 1 : i + 2] == '"':
            i += 1
        out.append(s[i])
        i += 1
    if i >= len(s):
        raise _BadLine("bad options: missing end quote")
    return "".join(out), i + 1


def _absolute_time(text: str, name: str) -> int:
    """misc.c parse_absolute_time: YYYYMMDD[HHMM[SS]], UTC with a Z or UTC suffix, else local time."""
    bad = _BadLine(f'bad options: invalid "{name}" time')
    utc = False
    if len(text) > 1 and text[-1] in "zZ":
        text, utc = text[:-1], True
    elif len(text) > 3 and text[-3:].upper() == "UTC":
        text, utc = text[:-3], True
    if len(text) not in (8, 12, 14) or not text.isascii() or not text.isdigit():
        raise bad
    parts = [int(text[i : i + w]) for i, w in ((0, 4), (4, 2), (6, 2), (8, 2), (10, 2), (12, 2)) if i < len(text)]
    parts += [0] * (6 - len(parts))
    year, month, day, hour, minute, second = parts
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 61):
        raise bad  # strptime's ranges; mktime/timegm then roll e.g. Feb 31 over, as here
    stamp = (year, month, day, hour, minute, second, 0, 0, 0)
    try:
        seconds = calendar.timegm(stamp) if utc else int(time.mktime(stamp))
    except (OverflowError, ValueError):
        raise bad from None
    if seconds <= 0:
        raise bad  # negative is invalid, and 0 means "unset" to OpenSSH
    return seconds


# ------------------------------------------------------------------ match.c


def match_pattern(text: str, pattern: str) -> bool:
    """`*` any run, `?` one character, everything else itself; the whole string."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


def match_pattern_list(text: str, patterns: str) -> int:
    """1 if a pattern of the comma-separated list matches, -1 if a `!pattern` does (that wins), else 0.
    Split as match.c does: a trailing comma ends the list, an empty subpattern matches only ""."""
    positive, i = 0, 0
    while i < len(patterns):
        negated = patterns[i] == "!"
        i += negated
        end = patterns.find(",", i)
        end = len(patterns) if end < 0 else end
        sub, i = patterns[i:end], end + 1
        if len(sub) >= SUBPATTERN_MAX:
            return 0
        if match_pattern(text, sub):
            if negated:
                return -1
            positive = 1
    return positive
