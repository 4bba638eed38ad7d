"""The mirror as the installer boot's guest reaches it (no QEMU): the lab's apt proxy serves the mirror
hosts only, keeps .debs and passes index files through; relay.py joins one guest connection (its stdin and
stdout, as QEMU's guestfwd `cmd:` gives it) to the proxy."""

import http.server
import socket
import subprocess
import sys
import threading

import pytest

from packer_assets_lab.realguest.aptproxy import AptProxy, mirror_hosts
from packer_assets_lab.realguest.installer import relay_command

DEB = b"!<arch>\ndebian-binary a .deb's bytes"


@pytest.fixture
def mirror():
    """A stand-in Debian mirror on 127.0.0.1 that counts what it served."""
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.append(self.path)
            body = {"/debian/pool/main/s/sudo/sudo_1.9_amd64.deb": DEB,
                    "/debian/dists/bookworm/InRelease": b"Suite: bookworm\n"}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *_args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def through_relay(proxy_port: int, request: bytes) -> bytes:
    """`request` sent as the guest would, through relay.py (stdin/stdout a socket, as QEMU runs it)."""
    guest, host = socket.socketpair()
    with guest, host:
        relay = subprocess.Popen(relay_command(proxy_port).split(), stdin=host, stdout=host, stderr=host)
        host.close()
        guest.sendall(request)
        guest.shutdown(socket.SHUT_WR)
        guest.settimeout(30)
        answer = b""
        while chunk := guest.recv(65536):
            answer += chunk
        assert relay.wait(timeout=30) == 0
    return answer


def get(netloc: str, path: str, method: str = "GET") -> bytes:
    return f"{method} http://{netloc}{path} HTTP/1.1\r\nHost: {netloc}\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.timeout(150)
def test_debs_are_fetched_once_and_indexes_always(mirror, tmp_path):
    netloc, served = mirror
    deb = "/debian/pool/main/s/sudo/sudo_1.9_amd64.deb"
    with AptProxy([netloc], cache=tmp_path / "apt") as proxy:
        for _ in range(2):
            answer = through_relay(proxy.port, get(netloc, deb))
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(DEB)
            assert through_relay(proxy.port, get(netloc, "/debian/dists/bookworm/InRelease")).endswith(b"bookworm\n")
        assert through_relay(proxy.port, get(netloc, "/debian/pool/none.deb")).startswith(b"HTTP/1.1 404")
        assert (proxy.counts.fetched, proxy.counts.cached, proxy.counts.passed) == (1, 1, 2)
    assert served.count(deb) == 1 and served.count("/debian/dists/bookworm/InRelease") == 2
    assert (tmp_path / "apt" / netloc.replace(":", "_") / deb.lstrip("/")).read_bytes() == DEB


@pytest.mark.timeout(150)
def test_only_the_mirror_hosts_are_reachable(mirror, tmp_path):
    netloc, served = mirror
    with AptProxy(["deb.example"], cache=tmp_path / "apt") as proxy:
        assert through_relay(proxy.port, get(netloc, "/debian/dists/bookworm/InRelease")).startswith(b"HTTP/1.1 403")
        assert through_relay(proxy.port, f"CONNECT {netloc} HTTP/1.1\r\n\r\n".encode()).startswith(b"HTTP/1.1 405")
        assert through_relay(proxy.port, get("deb.example", "/debian/../etc/passwd")).startswith(b"HTTP/1.1 403")
        assert len(proxy.counts.refused) == 3
    assert served == []


def test_the_mirror_hosts_are_those_of_the_images_apt_lines():
    assert mirror_hosts(["deb http://deb.debian.org/debian bookworm main",
                         "deb http://deb.debian.org/debian-security bookworm-security main",
                         "deb http://Mirror.Example:8080/debian bookworm-updates main"]) == {
        "deb.debian.org", "mirror.example:8080"}


def test_the_relay_runs_isolated_with_this_python():
    assert relay_command(3142).split()[:2] == [sys.executable, "-I"]
    assert relay_command(3142).split()[2].endswith("realguest/relay.py")
