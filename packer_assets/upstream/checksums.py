"""Checksum files (SHA256SUMS, CHECKSUM, SHA512SUMS, ...): parse, fetch conditionally, verify signatures.

- `ChecksumFile.parse(text, source)` reads GNU lines (`<hex>  file`, `<hex> *file`) and BSD lines
  (`SHA256 (file) = <hex>`), skipping comments, blank lines and PGP armour (a clearsigned file's
  headers and signature block). The algorithm comes from the BSD name or the GNU hex length; names
  match by basename (`./dir/file`, `*file`); hex is lower-cased.
- `fetch_checksum_file(url, etag, last_modified)` sends If-None-Match / If-Modified-Since, so an
  unchanged upstream costs a 304 and no body.
- `verify_signature(data, signature, keyring=...)` runs the real `gpg` in a throw-away GNUPGHOME
  against only the given keyring, and returns the text the signature covers (for a clearsigned
  file that is NOT the whole file: text outside the armour is unsigned and must not be trusted).
- `resolve_checksum(iso)`: the pinned value, or the (mirrored) checksum file's line for the ISO.

Every error is a `ChecksumError` naming the URL (or source) and, for a lookup, the file name.
No Dagster import here: this is the ground floor.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import requests

from packer_assets import __version__
from packer_assets.catalog import IsoSource, mirror_url
from packer_assets.errors import OperationError
from packer_assets.upstream.digests import ALGORITHMS, HEX_ALGORITHMS, Checksum

# hex length -> algorithm; exactly the set PVE's download-url/upload take as `checksum-algorithm`.
_STRENGTH = ("sha512", "sha384", "sha256", "sha224", "sha1", "md5")  # preferred first
MAX_CHECKSUM_FILE = 4 << 20  # a checksum file is kilobytes; a bigger body is a wrong URL (an ISO?)
USER_AGENT = f"packer-assets/{__version__}"

_BSD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*) ?\((.+)\) ?= ?([0-9A-Fa-f]+)$")
_GNU = re.compile(r"^(\\?)([0-9A-Fa-f]+) [ *]?(.+)$")


class ChecksumError(OperationError):
    """A checksum could not be had or trusted; the message names the URL/source and the file."""


def _norm_algorithm(name: str) -> str:
    """`SHA256`, `SHA-256`, `SHA2-256`, `sha256` -> `sha256`."""
    name = name.lower().replace("sha2-", "sha").replace("sha-", "sha")
    return name.replace("-", "")


def _gnu_unescape(name: str) -> str:
    # coreutils prefixes a line with '\' when the name holds '\' or a newline, and escapes those.
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", "r": "\r"}.get(m.group(1), m.group(0)), name)


@dataclass(frozen=True)
class Entry:
    path: str  # as listed (may carry ./dir/)
    checksum: Checksum


class ChecksumFile:
    """A parsed checksum file. `lookup(name)` by basename; `names` for messages."""

    def __init__(self, entries: dict[str, list[Entry]], source: str, skipped: list[int]):
        self.entries, self.source, self.skipped = entries, source, skipped

    @classmethod
    def parse(cls, text: str | bytes, source: str = "<checksum file>") -> ChecksumFile:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        entries: dict[str, list[Entry]] = {}
        skipped: list[int] = []  # line numbers that look like neither format (not comments)
        state = "body"  # body | armour-headers | signature
        signed = False
        for number, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
            line = raw.rstrip("\r")
            marker = line.strip()
            if marker == "-----BEGIN PGP SIGNED MESSAGE-----":
                state, signed = "armour-headers", True
                continue
            if marker == "-----BEGIN PGP SIGNATURE-----":
                state = "signature"
                continue
            if state == "signature":
                if marker == "-----END PGP SIGNATURE-----":
                    state = "body"
                continue
            if state == "armour-headers":  # `Hash: SHA256` and friends, up to the first blank line
                if not marker:
                    state = "body"
                continue
            if signed and line.startswith("- "):  # RFC 4880 dash-escaping inside a clearsigned body
                line = line[2:]
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            entry = _parse_line(line)
            if entry is None:
                skipped.append(number)
                continue
            entries.setdefault(entry.path.rsplit("/", 1)[-1], []).append(entry)
        return cls(entries, source, skipped)

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, name: str) -> Checksum:
        """The checksum of `name` (matched by basename); the strongest algorithm if several are listed."""
        base = name.rsplit("/", 1)[-1]
        found = self.entries.get(base)
        if not found:
            raise ChecksumError(f"{self.source}: no checksum for {base!r}; {self._listing(base)}")
        best = min(found, key=lambda e: _STRENGTH.index(e.checksum.algorithm))
        rivals = {
            e.path for e in found if e.checksum.algorithm == best.checksum.algorithm and e.checksum != best.checksum
        }
        if rivals:
            raise ChecksumError(
                f"{self.source}: {base!r} is listed with different {best.checksum.algorithm} "
                f"checksums ({', '.join(sorted(rivals | {best.path}))}); cannot tell which applies"
            )
        return best.checksum

    def _listing(self, base: str) -> str:
        if not self.entries:
            return "the file lists no checksums at all (wrong URL, or a format this parser does not read?)"
        names = self.names
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        close = difflib.get_close_matches(base, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"it lists {shown}{hint}"


def _parse_line(line: str) -> Entry | None:
    bsd = _BSD.match(line)
    if bsd:
        algo = _norm_algorithm(bsd.group(1))
        digest = bsd.group(3)
        if algo in ALGORITHMS and HEX_ALGORITHMS.get(len(digest)) == algo:
            return Entry(bsd.group(2), Checksum(algo, digest))
        return None
    gnu = _GNU.match(line)
    if gnu and len(gnu.group(2)) in HEX_ALGORITHMS:
        name = _gnu_unescape(gnu.group(3)) if gnu.group(1) else gnu.group(3)
        return Entry(name, Checksum(HEX_ALGORITHMS[len(gnu.group(2))], gnu.group(2)))
    return None


# ------------------------------------------------------------------ fetching


@dataclass(frozen=True)
class FetchResult:
    status: str  # "changed": a body came (200); "unchanged": 304, no body
    text: str | None
    etag: str | None
    last_modified: str | None
    url: str


@dataclass(frozen=True)
class HttpBody:
    status: int  # 200 or 304
    content: bytes  # empty for a 304
    headers: Mapping[str, str]


def http_get(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
    session: requests.Session | None = None,
    limit: int = MAX_CHECKSUM_FILE,
) -> HttpBody:
    """GET with a total deadline (requests' timeout is per socket read) and a body size limit.

    A 200 or 304 is returned; anything else raises ChecksumError naming the URL.
    """
    getter = session or requests
    deadline = time.monotonic() + timeout
    try:
        resp = getter.get(url, headers={"User-Agent": USER_AGENT, **(headers or {})}, timeout=timeout, stream=True)
        with resp:
            if resp.status_code == 304:
                resp.content  # noqa: B018 - reads the (empty) body, so the connection goes back to the pool
                return HttpBody(304, b"", resp.headers)
            if resp.status_code != 200:
                raise ChecksumError(f"{url}: HTTP {resp.status_code} {resp.reason or ''}".rstrip())
            body = bytearray()
            for chunk in resp.iter_content(65536):
                body += chunk
                if len(body) > limit:
                    raise ChecksumError(f"{url}: more than {limit} bytes; not a checksum file (wrong URL?)")
                if time.monotonic() > deadline:
                    raise requests.Timeout()
            return HttpBody(200, bytes(body), resp.headers)
    except requests.exceptions.SSLError as exc:
        raise ChecksumError(f"{url}: TLS verification failed: {_reason(exc)}") from None
    except requests.Timeout:
        raise ChecksumError(f"{url}: timed out after {timeout:g}s") from None
    except requests.ConnectionError as exc:
        raise ChecksumError(f"{url}: unreachable: {_reason(exc)}") from None
    except requests.RequestException as exc:
        raise ChecksumError(f"{url}: {type(exc).__name__}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in ("NewConnectionError(", "SSLError(", "ConnectTimeoutError(", "RemoteDisconnected("):
        if marker in text:
            text = text[text.index(marker) :]
    return text[:300]


def fetch_checksum_file(
    url: str,
    etag: str | None = None,
    last_modified: str | None = None,
    timeout: float = 10,
    session: requests.Session | None = None,
) -> FetchResult:
    """Conditional GET of a checksum file: 304 -> status 'unchanged' (no text); 200 -> 'changed' + text.

    The validators a 304 omits are carried over from the request, so the caller can store them as is.
    """
    headers = {}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    resp = http_get(url, headers=headers, timeout=timeout, session=session)
    new_etag = resp.headers.get("ETag") or (etag if resp.status == 304 else None)
    new_lm = resp.headers.get("Last-Modified") or (last_modified if resp.status == 304 else None)
    if resp.status == 304:
        return FetchResult("unchanged", None, new_etag, new_lm, url)
    return FetchResult("changed", resp.content.decode("utf-8", "replace"), new_etag, new_lm, url)


# ------------------------------------------------------------------ signatures


@dataclass(frozen=True)
class VerifiedText:
    text: str  # only what the signature covers
    fingerprints: tuple[str, ...]  # primary-key fingerprints of the good signatures


def verify_signature(
    data: str | bytes,
    signature: bytes | str | None = None,
    *,
    keyring: str | os.PathLike[str],
    source: str = "<checksum file>",
    timeout: float = 30,
) -> VerifiedText:
    """Verify a clearsigned file (signature=None) or `data` against a detached signature (.gpg/.sig/.sign,
    binary or armoured), trusting exactly the keys in `keyring` (binary keyring, keybox or armoured export).

    gpg runs with a temporary GNUPGHOME and `--no-default-keyring --keyring <copy>`: the user's own
    keyrings and trust settings play no part, and gpg's lock files land in the temporary directory.
    """
    gpg = shutil.which("gpg")
    if gpg is None:
        raise ChecksumError(f"{source}: cannot verify the signature: the gpg binary is not installed")
    keyring = Path(keyring)
    if not keyring.is_file():
        raise ChecksumError(f"{source}: keyring {keyring} does not exist")
    data_bytes = data.encode() if isinstance(data, str) else bytes(data)
    with tempfile.TemporaryDirectory(prefix="packer-assets-gpg-") as home:
        home_path = Path(home)
        os.chmod(home, 0o700)
        ring = home_path / "trusted.gpg"
        key_bytes = keyring.read_bytes()
        base = [
            gpg,
            "--batch",
            "--no-tty",
            "--homedir",
            home,
            "--no-default-keyring",
            "--keyring",
            str(ring),
            "--trust-model",
            "always",
            "--no-auto-key-retrieve",
        ]
        env = {"GNUPGHOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

        def run(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
            try:
                return subprocess.run(args, input=stdin, capture_output=True, env=env, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise ChecksumError(f"{source}: gpg did not finish within {timeout:g}s") from None

        if b"-----BEGIN PGP PUBLIC KEY BLOCK-----" in key_bytes:  # armoured export: --keyring wants binary
            out = run([gpg, "--batch", "--homedir", home, "--dearmor"], key_bytes)
            if out.returncode != 0:
                raise ChecksumError(f"{source}: keyring {keyring} is not a readable OpenPGP key: {_gpg_said(out)}")
            key_bytes = out.stdout
        ring.write_bytes(key_bytes)
        data_file = home_path / "data"
        data_file.write_bytes(data_bytes)
        if signature is None:
            plain = home_path / "plain"
            out = run([*base, "--status-fd", "1", "--output", str(plain), "--decrypt", str(data_file)])
            text = plain.read_bytes().decode("utf-8", "replace") if out.returncode == 0 and plain.exists() else ""
        else:
            sig_file = home_path / "sig"
            sig_file.write_bytes(signature.encode() if isinstance(signature, str) else bytes(signature))
            out = run([*base, "--status-fd", "1", "--verify", str(sig_file), str(data_file)])
            text = data_bytes.decode("utf-8", "replace")
    status = out.stdout.decode("utf-8", "replace").splitlines()
    tokens = [line.split()[1:] for line in status if line.startswith("[GNUPG:] ")]
    valid = tuple(t[-1] if len(t) > 10 else t[1] for t in tokens if t and t[0] == "VALIDSIG")
    bad = [t[0] for t in tokens if t and t[0] in ("BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG")]
    if out.returncode != 0 or not valid or bad:
        why = ", ".join(bad) or ("no signature found" if not valid else "") or _gpg_said(out)
        raise ChecksumError(f"{source}: signature verification against {keyring} failed: {why}: {_gpg_said(out)}")
    return VerifiedText(text, valid)


def _gpg_said(out: subprocess.CompletedProcess[bytes]) -> str:
    lines = [ln for ln in out.stderr.decode("utf-8", "replace").splitlines() if ln.startswith("gpg:")]
    return "; ".join(" ".join(ln.removeprefix("gpg: ").split()) for ln in lines[-3:]) or f"exit {out.returncode}"


# ------------------------------------------------------------------ resolving an ISO's checksum


def resolve_checksum(
    iso: IsoSource,
    *,
    cache: MutableMapping[str, ChecksumFile] | None = None,
    timeout: float = 10,
    keyring: str | os.PathLike[str] | None = None,
    signature_url: str | None = None,
    session: requests.Session | None = None,
) -> Checksum:
    """The pinned checksum, or the line for `iso.upstream_name` in its (mirrored) checksum file.

    cache: url -> parsed file, so the ISOs of one run sharing a SHA256SUMS fetch it once.
    keyring: verify the checksum file first (signature_url: a detached signature, given as the
    upstream URL and mirrored like the rest; None: the file is clearsigned).
    """
    if iso.checksum:
        return Checksum.parse(iso.checksum)
    url = iso.effective_checksum_url
    assert url is not None  # the catalog holds exactly one of checksum and checksum_url
    parsed = cache.get(url) if cache is not None else None
    if parsed is None:
        body = http_get(url, timeout=timeout, session=session).content
        if keyring is not None:
            sig = None
            if signature_url:
                sig_url = mirror_url(signature_url, iso.mirror) if iso.mirror else signature_url
                sig = http_get(sig_url, timeout=timeout, session=session).content
            body = verify_signature(body, sig, keyring=keyring, source=url).text.encode()
        parsed = ChecksumFile.parse(body, source=url)
        if cache is not None:
            cache[url] = parsed
    return parsed.lookup(iso.upstream_name)
