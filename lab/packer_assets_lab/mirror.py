"""An upstream ISO mirror on loopback: real files, real checksum files, HTTP caching semantics.

Files live under `root_dir` at their URL paths, so a restarted mirror (same root_dir) serves the
same bytes and checksums. Each key's ISO carries its key and a release number; `publish(key)` makes
a new release under the same URL, the way upstreams re-spin point releases, so the checksum sensor
sees a change. `corrupt(key)` serves bytes that do not match the published checksum.

A checksum file whose catalog entry names a signature is signed the way upstream signs it (a detached,
armoured signature at the item's `signature_path`, or the file clearsigned), with the lab's own invented key
(mirror_key.py): a mirror that writes its own checksum files cannot serve upstream's signature of them.
`tamper_checksums(key)` changes a checksum file without signing it again.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import posixpath
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packer_assets.evidence.layout import sha256_file
from packer_assets_lab.iso import make_iso
from packer_assets_lab.mirror_key import MirrorKey

STATE_FILE = ".lab-mirror.json"  # {key: release}; dotfiles are never served
SIGNING_DIR = ".lab-signing"  # the lab mirror's key, under the root (never served)
DEFAULT_CHECKSUM_NAMES = ("SHA256SUMS", "CHECKSUM")


@dataclass(frozen=True)
class MirrorItem:
    """One key's ISO at URL path `iso_path`; `checksum_path` is None when the catalog pins it."""

    key: str
    iso_path: str
    checksum_path: str | None = None
    # The installed system's /etc/os-release the ISO stands for (a boot ISO): the lab's VMs installed
    # from it report this OS through their guest agent (pve/agent.py).
    os_release: str | None = None
    # The signature the catalog names for the checksum file (URL path of a detached signature), or the
    # checksum file clearsigned (a keyring and no signature_url): the mirror signs it with its own key.
    signature_path: str | None = None
    clearsigned: bool = False


def checksum_text(name: str, entries: dict[str, str], sizes: dict[str, int]) -> str:
    """Checksum file body in the format its name implies: *CHECKSUM* → BSD (Rocky), else GNU."""
    lines = []
    for fname in sorted(entries):
        if "CHECKSUM" in name:
            lines.append(f"# {fname}: {sizes[fname]} bytes")  # Rocky prefixes each entry like this
            lines.append(f"SHA256 ({fname}) = {entries[fname]}")
        else:
            lines.append(f"{entries[fname]} *{fname}")  # binary-mode marker, as Ubuntu publishes
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file alone, so its Last-Modified survives restarts."""
    if path.exists() and path.read_bytes() == data:
        return
    prev = path.stat().st_mtime if path.exists() else 0
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    _advance_mtime(path, prev)


def _advance_mtime(path: Path, prev: float) -> None:
    # HTTP dates have 1 s resolution: a new version written within the same second as the one
    # before would look unmodified to If-Modified-Since, so move it to a later whole second.
    t = max(int(time.time()), int(prev) + 1)
    os.utime(path, (t, t))


class IsoMirror:
    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        items: list[MirrorItem],
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.root = Path(root_dir).resolve()
        self.items = {i.key: i for i in items}
        if len(self.items) != len(items):
            raise ValueError("IsoMirror: duplicate keys in items")
        if len({i.iso_path for i in items}) != len(items):
            raise ValueError("IsoMirror: two items share one iso_path")
        for i in items:
            if not i.iso_path.startswith("/"):
                raise ValueError(f"IsoMirror: iso_path of {i.key!r} must start with '/'")
            if i.checksum_path and posixpath.dirname(i.checksum_path) != posixpath.dirname(i.iso_path):
                raise ValueError(f"IsoMirror: checksum_path of {i.key!r} must sit next to its ISO")
            if (i.signature_path or i.clearsigned) and not i.checksum_path:
                raise ValueError(f"IsoMirror: {i.key!r} signs a checksum file: give its checksum_path")
        self.signing_key = MirrorKey(self.root / SIGNING_DIR)
        self.host, self._port = host, port
        self.hits: Counter[tuple[str, int]] = Counter()  # (url path, status)
        self.requests: list[tuple[str, str, int]] = []  # (method, url path, status)
        self._corrupt: set[str] = set()
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._releases = self._load_state()
        for key in self.items:
            if key not in self._releases or not self._file(self.items[key].iso_path).exists():
                self._build(key, self._releases.get(key, 0) + 1)
        for d in {posixpath.dirname(i.iso_path) for i in items}:
            self._write_checksums(d)

    # ---- files ---------------------------------------------------------------------------------

    def _file(self, url_path: str) -> Path:
        return self.root / url_path.lstrip("/")

    def _load_state(self) -> dict[str, int]:
        state = self.root / STATE_FILE
        return json.loads(state.read_text()) if state.exists() else {}

    def _build(self, key: str, release: int, os_release: str | None = None) -> None:
        content = {
            "key.txt": f"{key}\n".encode(),
            "release.txt": f"{release}\n".encode(),
            "README.txt": b"packer-assets lab mirror: a stand-in for an installer ISO\n",
        }
        os_release = os_release or self.items[key].os_release
        if os_release:
            content["os-release"] = os_release.encode()
        path = self._file(self.items[key].iso_path)
        prev = path.stat().st_mtime if path.exists() else 0
        make_iso(path, f"LAB {key} R{release}", content)
        _advance_mtime(path, prev)
        self._releases[key] = release
        state = self.root / STATE_FILE
        state.write_text(json.dumps(self._releases, indent=1, sort_keys=True))

    def _write_checksums(self, url_dir: str) -> None:
        isos = [i for i in self.items.values() if posixpath.dirname(i.iso_path) == url_dir]
        entries = {posixpath.basename(i.iso_path): self.sha256(i.key) for i in isos}
        sizes = {posixpath.basename(i.iso_path): self._file(i.iso_path).stat().st_size for i in isos}
        names = set(DEFAULT_CHECKSUM_NAMES)
        names |= {posixpath.basename(i.checksum_path) for i in isos if i.checksum_path}
        for name in names:
            self._write_checksum_file(posixpath.join(url_dir, name), checksum_text(name, entries, sizes).encode())

    def _write_checksum_file(self, url_path: str, text: bytes) -> None:
        """The checksum file, and signed as the items listed in it ask; a text signed before keeps its
        signatures (and their Last-Modified), so a restarted mirror serves the same bytes."""
        wanted = [i for i in self.items.values() if i.checksum_path == url_path]
        signatures = sorted({i.signature_path for i in wanted if i.signature_path})
        clear = any(i.clearsigned for i in wanted)
        path = self._file(url_path)
        if not signatures and not clear:
            return _write_if_changed(path, text)
        signed = path.with_name(f".{path.name}.signed")  # the text last signed
        outputs = [path, *(self._file(s) for s in signatures)]
        if signed.exists() and signed.read_bytes() == text and all(p.exists() for p in outputs):
            return None
        _write_if_changed(path, self.signing_key.sign([text], clear=True)[0] if clear else text)
        if signatures:
            detached = self.signing_key.sign([text], clear=False)[0]
            for sig in outputs[1:]:
                sig.parent.mkdir(parents=True, exist_ok=True)
                _write_if_changed(sig, detached)
        signed.write_bytes(text)
        return None

    # ---- the lab's knobs -----------------------------------------------------------------------

    def sha256(self, key: str) -> str:
        """The published checksum of key's ISO (what the checksum files say)."""
        return sha256_file(self._file(self.items[key].iso_path))

    def release(self, key: str) -> int:
        return self._releases[key]

    def publish(self, key: str, system_of: str | None = None) -> str:
        """A new release of `key`: new bytes under the same URL, checksum files updated. With `system_of`
        (another key), the ISO installs that key's OS: a mirror serving another release."""
        with self._lock:
            self._build(key, self._releases[key] + 1, self.items[system_of].os_release if system_of else None)
            self._write_checksums(posixpath.dirname(self.items[key].iso_path))
            return self.sha256(key)

    def tamper_checksums(self, key: str) -> None:
        """Change key's line in its checksum file without signing it again: the signature no longer matches."""
        with self._lock:
            path = self._file(urlsplit(self.checksum_url(key)).path)
            digest = self.sha256(key)
            path.write_text(path.read_text().replace(digest, digest[::-1]))
            path.with_name(f".{path.name}.signed").unlink(missing_ok=True)  # the next publish signs again

    def corrupt(self, key: str, on: bool = True) -> None:
        """Serve key's ISO with one byte flipped; checksum files keep the published value."""
        with self._lock:
            (self._corrupt.add if on else self._corrupt.discard)(self.items[key].iso_path)

    def downloads(self, key: str) -> int:
        """How many times key's ISO body was sent (GET answered 200)."""
        path = self.items[key].iso_path
        return sum(1 for m, p, s in self.requests if m == "GET" and p == path and s == 200)

    # ---- URLs ----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, key: str) -> str:
        return self.base_url + self.items[key].iso_path

    def checksum_url(self, key: str) -> str:
        """The item's checksum file, or the directory's SHA256SUMS when the item has none."""
        item = self.items[key]
        path = item.checksum_path or posixpath.join(posixpath.dirname(item.iso_path), "SHA256SUMS")
        return self.base_url + path

    # ---- serving -------------------------------------------------------------------------------

    def resource(self, url_path: str) -> tuple[bytes, int] | None:
        """(bytes served, mtime) at url_path, None for 404."""
        parts = [p for p in posixpath.normpath(url_path).split("/") if p]
        if not parts or any(p.startswith(".") for p in parts):  # no state file, no traversal
            return None
        path = self.root.joinpath(*parts)
        try:
            data, mtime = path.read_bytes(), int(path.stat().st_mtime)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        if "/" + "/".join(parts) in self._corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]  # byte 0 is system area: still a valid ISO
        return data, mtime

    def start(self) -> IsoMirror:
        mirror = self

        class Handler(_Handler):
            pass

        Handler.mirror = mirror
        self._server = _Server((self.host, self._port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() waits up to one poll interval
            name=f"lab-mirror:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> IsoMirror:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a sensor tick opens many connections at once; 5 (the default) stalls them


class _Handler(BaseHTTPRequestHandler):
    # Without this every response stalls ~40 ms on delayed ACKs (Nagle), which a many-key sensor tick feels.
    disable_nagle_algorithm = True
    mirror: IsoMirror
    protocol_version = "HTTP/1.1"  # keep-alive, as download clients expect

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        found = self.mirror.resource(path)
        if found is None:
            return self._reply(path, 404, b"not found\n", {"Content-Type": "text/plain"}, send_body)
        data, mtime = found
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'  # strong: changes with the bytes
        headers = {
            "ETag": etag,
            "Last-Modified": email.utils.formatdate(mtime, usegmt=True),
            "Content-Type": "application/octet-stream" if path.endswith(".iso") else "text/plain",
            "Accept-Ranges": "none",
        }
        if self._not_modified(etag, mtime):
            return self._reply(path, 304, data, headers, send_body)
        self._reply(path, 200, data, headers, send_body)

    def _not_modified(self, etag: str, mtime: int) -> bool:
        inm = self.headers.get("If-None-Match")
        if inm is not None:  # RFC 9110: If-None-Match wins over If-Modified-Since
            tags = [t.strip().removeprefix("W/") for t in inm.split(",")]
            return "*" in tags or etag in tags
        ims = self.headers.get("If-Modified-Since")
        if ims:
            try:
                since = email.utils.parsedate_to_datetime(ims).timestamp()
            except (TypeError, ValueError):
                return False
            return mtime <= since
        return False

    def _reply(self, path: str, status: int, data: bytes, headers: dict, send_body: bool) -> None:
        with self.mirror._lock:
            self.mirror.hits[(path, status)] += 1
            self.mirror.requests.append((self.command, path, status))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        # On a 304 this is the length a 200 would carry (allowed by RFC 9110); no body follows.
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body and status != 304:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # quiet: hits/requests are the log
        pass
