"""The mirror, as the installer emulation's guest reaches it: an HTTP forward proxy in the lab's process.

A guest runs with QEMU user networking and `restrict=on`: it reaches nothing but its forwards. For the
install boot (installer.py), apt in the guest is told `Acquire::http::Proxy=http://10.0.2.100:3142/`;
QEMU's `guestfwd=tcp:10.0.2.100:3142-cmd:<relay>` starts relay.py for each connection the guest makes
to that address, and the relay joins it to this proxy on 127.0.0.1. (A `guestfwd` to a TCP chardev
would serve one connection for QEMU's whole life; apt opens one per archive host.)

The proxy serves plain-HTTP GETs of the mirror hosts only (those of the image's apt lines); anything
else is refused with 403, and a `CONNECT` with 405, so the guest reaches the Debian archive and
nothing more. `.deb` files are immutable per name (a new version is a new file name), so they are kept
under `~/.cache/packer-assets/apt/<host>/<path>` and served from there the next time; index files
(Release, Packages, by-hash) are fetched each time, as a caching proxy must not serve a stale Release.
"""

from __future__ import annotations

import http.server
import os
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

GUEST_ADDRESS, GUEST_PORT = "10.0.2.100", 3142  # where apt in the guest finds the proxy (a guestfwd)
UPSTREAM_TIMEOUT = 60.0
CHUNK = 1 << 16


def apt_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "packer-assets" / "apt"


def mirror_hosts(apt_lines: Iterable[str]) -> frozenset[str]:
    """The host[:port] of every `deb URI ...` line: what the proxy lets the guest fetch from."""
    hosts = set()
    for line in apt_lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "deb":
            hosts.add(urllib.parse.urlsplit(words[1]).netloc.lower())
    return frozenset(hosts)


@dataclass
class ProxyCounts:
    """What the proxy did, for the install report and the tests."""

    fetched: int = 0  # .debs fetched from the mirror (and cached)
    cached: int = 0  # .debs served from the cache
    passed: int = 0  # index files passed through
    refused: list[str] = field(default_factory=list)  # "METHOD url: why"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # apt keeps its connection and pipelines
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the counts say what happened

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        host = url.netloc.lower()
        if url.scheme != "http" or host not in self.server.hosts:
            self._refuse(403, f"GET {self.path}: only http:// from {', '.join(sorted(self.server.hosts))}")
            return
        if ".." in url.path.split("/"):
            self._refuse(403, f"GET {self.path}: '..' in the path")
            return
        if url.path.endswith(".deb"):
            self._deb(host, url)
        else:
            self._pass(url.geturl())

    def do_CONNECT(self) -> None:
        self._refuse(405, f"CONNECT {self.path}: no tunnels, the guest gets the mirror over plain HTTP only")

    def _refuse(self, code: int, why: str) -> None:
        with self.server.counts.lock:
            self.server.counts.refused.append(why)
        self._answer(code, why.encode() + b"\n", "text/plain")

    def _answer(self, code: int, body: bytes, kind: str = "application/octet-stream") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _upstream(self, url: str) -> bytes | int:
        """The body at url, or the mirror's HTTP error code (502 when it cannot be reached)."""
        try:
            with self.server.opener.open(url, timeout=UPSTREAM_TIMEOUT) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 502

    def _pass(self, url: str) -> None:
        body = self._upstream(url)
        self.server.counts.count("passed")
        if isinstance(body, int):
            self._answer(body, b"")
        else:
            self._answer(200, body)

    def _deb(self, host: str, url: urllib.parse.SplitResult) -> None:
        cached = self.server.cache / host.replace(":", "_") / url.path.lstrip("/")
        if cached.is_file():
            self.server.counts.count("cached")
            self._send_file(cached)
            return
        body = self._upstream(url.geturl())
        if isinstance(body, int):
            self._answer(body, b"")
            return
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, prefix=".part-", delete=False) as out:
            out.write(body)
        os.replace(out.name, cached)  # whole or absent: a killed lab leaves no half .deb
        self.server.counts.count("fetched")
        self._answer(200, body)

    def _send_file(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.debian.binary-package")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        with path.open("rb") as source:
            while chunk := source.read(CHUNK):
                self.wfile.write(chunk)


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hosts: frozenset[str]
    cache: Path
    counts: ProxyCounts
    opener: urllib.request.OpenerDirector


class AptProxy:
    """The proxy on 127.0.0.1:<port> for as long as the `with` block (or until close())."""

    def __init__(self, hosts: Iterable[str], cache: Path | None = None):
        self.server = _ProxyServer(("127.0.0.1", 0), _Handler)
        self.server.hosts = frozenset(h.lower() for h in hosts)
        self.server.cache = Path(cache) if cache else apt_cache_root()
        self.server.counts = ProxyCounts()
        # The mirror directly: no proxy of this machine's environment is used (or leaks a credential).
        self.server.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self.server.serve_forever, name="lab-apt-proxy", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def counts(self) -> ProxyCounts:
        return self.server.counts

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
