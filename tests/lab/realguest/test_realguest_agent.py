"""The guest agent client against a stand-in agent on a UNIX socket (no QEMU): the sync handshake
throws away stale replies, exec output and file contents are decoded, a silent agent times out."""

import base64
import json
import socket
import threading

import pytest

from packer_assets_lab.realguest.agent import AgentError, AgentTimeout, GuestAgent


class FakeAgent:
    """Speaks qemu-ga's wire protocol: 0xFF resets its parser, guest-sync-delimited replies start with 0xFF."""

    def __init__(self, path, silent=False):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.silent, self.requests = silent, []
        self.exec_polls = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        conn, _ = self.server.accept()
        buffer, decoder = "", json.JSONDecoder()
        while chunk := conn.recv(65536):
            buffer += chunk.replace(b"\xff", b"").decode()
            while buffer.strip():
                try:
                    request, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break
                buffer = buffer.lstrip()[end:]
                self.requests.append(request["execute"])
                if not self.silent:
                    conn.sendall(self.answer(request["execute"], request.get("arguments", {})))

    def answer(self, name, args):
        def ok(value):
            return json.dumps({"return": value}).encode() + b"\n"
        if name == "guest-sync-delimited":
            # leftovers of an earlier caller, then a stale sync, then ours
            return ok({"stale": True}) + b"\xff" + ok(1) + b"\xff" + ok(args["id"])
        if name == "guest-get-osinfo":
            return ok({"id": "debian", "version-id": "12", "pretty-name": "Debian GNU/Linux 12 (bookworm)"})
        if name == "guest-exec":
            assert base64.b64decode(args["input-data"]) == b"stdin data"
            return ok({"pid": 42})
        if name == "guest-exec-status":
            self.exec_polls += 1
            if self.exec_polls < 2:
                return ok({"exited": False})
            return ok({"exited": True, "exitcode": 3, "out-data": base64.b64encode(b"out\n").decode(),
                       "err-data": base64.b64encode(b"err\n").decode()})
        if name == "guest-file-open":
            return ok(7)
        if name == "guest-file-read":
            self.reads = getattr(self, "reads", 0) + 1
            data = b"NAME=Debian\n" if self.reads == 1 else b"ID=debian\n"
            return ok({"count": len(data), "buf-b64": base64.b64encode(data).decode(), "eof": self.reads == 2})
        if name == "guest-file-close":
            return ok({})
        return json.dumps({"error": {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}}).encode() + b"\n"


def test_sync_skips_stale_replies_and_calls_decode(tmp_path):
    fake = FakeAgent(tmp_path / "qga.sock")
    with GuestAgent(tmp_path / "qga.sock", timeout=10) as agent:
        assert agent.wait_ready(30) >= 0
        assert agent.osinfo()["version-id"] == "12"
        result = agent.exec(["sh", "-c", "cat"], input_data=b"stdin data", timeout=30, poll=0.01)
        assert (result.exitcode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        assert agent.read_file("/etc/os-release") == b"NAME=Debian\nID=debian\n"
        with pytest.raises(AgentError, match="CommandNotFound"):
            agent.command("guest-nope")
    assert fake.requests[:2] == ["guest-sync-delimited", "guest-get-osinfo"]
    assert fake.requests[-2:] == ["guest-file-close", "guest-nope"]


def test_a_silent_agent_times_out_instead_of_hanging(tmp_path):
    FakeAgent(tmp_path / "qga.sock", silent=True)
    with GuestAgent(tmp_path / "qga.sock", timeout=0.5) as agent, pytest.raises(AgentTimeout):
        agent.ping()


def test_no_socket_is_an_agent_error(tmp_path):
    with pytest.raises(AgentError, match="qga.sock"):
        GuestAgent(tmp_path / "qga.sock").ping(timeout=1)
