"""A QEMU guest agent client over the VM's virtio-serial socket (the host end of org.qemu.guest_agent.0).

What PVE's `agent/*` endpoints do on a real node, done here for a real lab guest: the smoke test's
OS info, network interfaces, `exec`/`exec-status` and `file-read` must come from the guest itself.

The channel is a byte stream with no sessions: a reply can be left over from a command whose caller
gave up, and the agent may not even be running yet (the socket accepts as soon as QEMU starts). So
every conversation starts with `guest-sync-delimited`: a 0xFF byte resets the agent's parser, the
agent prefixes its reply with 0xFF, and everything before that byte and every reply that does not
carry our random id is thrown away. Every call has a deadline; a guest that does not answer raises
AgentTimeout instead of hanging the caller.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from packer_assets.errors import OperationError


class AgentError(OperationError):
    """The agent answered with an error (its class and description in the message)."""


class AgentTimeout(AgentError):
    """The agent did not answer in time (not running yet, or the guest is gone)."""


@dataclass(frozen=True)
class ExecResult:
    exitcode: int | None
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    truncated: bool = False


class GuestAgent:
    """One connection to one VM's agent socket; calls are serialized (the channel is one stream)."""

    def __init__(self, socket_path: str | Path, timeout: float = 30.0):
        self.socket_path, self.timeout = str(socket_path), timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._lock = threading.RLock()
        self._synced = False

    # -- connection -------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
            self._sock, self._buffer, self._synced = None, b"", False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
            except OSError as err:
                sock.close()
                raise AgentError(f"guest agent socket {self.socket_path}: {err}") from err
            self._sock, self._buffer, self._synced = sock, b"", False
        return self._sock

    def _send(self, payload: bytes) -> None:
        try:
            self._connected().sendall(payload)
        except OSError as err:
            self.close()
            raise AgentError(f"guest agent socket {self.socket_path}: {err}") from err

    def _read_more(self, deadline: float) -> None:
        sock = self._connected()
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout(f"the guest agent did not answer in time ({self.socket_path})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError as err:
            raise AgentTimeout(f"the guest agent did not answer in time ({self.socket_path})") from err
        except OSError as err:
            self.close()
            raise AgentError(f"guest agent socket {self.socket_path}: {err}") from err
        if not chunk:
            self.close()
            raise AgentError(f"guest agent socket {self.socket_path} closed (QEMU gone?)")
        self._buffer += chunk

    def _next_message(self, deadline: float) -> dict:
        decoder = json.JSONDecoder()
        while True:
            text = self._buffer.lstrip(b" \t\r\n\xff").decode(errors="replace")
            if text:
                try:
                    message, end = decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass  # incomplete: read more
                else:
                    self._buffer = text[end:].encode()
                    return message
            self._read_more(deadline)

    # -- protocol ---------------------------------------------------------------------------------

    def sync(self, timeout: float | None = None) -> None:
        """guest-sync-delimited: afterwards the stream is clean and the agent is known to be up."""
        with self._lock:
            deadline = time.monotonic() + (timeout or self.timeout)
            token = random.randrange(1, 2**31)
            self._send(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
            while True:
                # Discard up to the 0xFF that precedes the sync reply (stale replies, partial output).
                while b"\xff" not in self._buffer:
                    self._buffer = b""
                    self._read_more(deadline)
                self._buffer = self._buffer.split(b"\xff")[-1]
                message = self._next_message(deadline)
                if message.get("return") == token:
                    self._synced = True
                    return

    def wait_ready(self, timeout: float, attempt: float = 10.0) -> float:
        """Sync until the agent answers or `timeout` seconds pass; the seconds it took."""
        started = time.monotonic()
        while True:
            left = timeout - (time.monotonic() - started)
            try:
                self.sync(timeout=max(0.5, min(attempt, left)))
                return time.monotonic() - started
            except AgentError:
                if left <= attempt:
                    raise
                self.close()  # a new connection: QEMU may have dropped the old one
                time.sleep(1.0)

    def command(self, name: str, arguments: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        with self._lock:
            if not self._synced:
                self.sync(timeout)
            deadline = time.monotonic() + (timeout or self.timeout)
            request = {"execute": name, **({"arguments": arguments} if arguments else {})}
            self._send(json.dumps(request).encode())
            try:
                message = self._next_message(deadline)
            except AgentTimeout:
                self._synced = False  # a late reply may still come: sync again before the next call
                raise
            if "error" in message:
                error = message["error"]
                raise AgentError(f"{name}: {error.get('class', 'GenericError')}: {error.get('desc', error)}")
            return message.get("return")

    # -- the calls the project uses ----------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> None:
        self.command("guest-ping", timeout=timeout)

    def osinfo(self) -> dict:
        return self.command("guest-get-osinfo")

    def network_interfaces(self) -> list[dict]:
        return self.command("guest-network-get-interfaces")

    def exec_start(self, argv: list[str], input_data: bytes | None = None, capture: bool = True) -> int:
        arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": capture}
        if input_data is not None:
            arguments["input-data"] = base64.b64encode(input_data).decode()
        return int(self.command("guest-exec", arguments)["pid"])

    def exec_status(self, pid: int) -> dict:
        """guest-exec-status with out-data/err-data decoded from base64 to bytes."""
        status = dict(self.command("guest-exec-status", {"pid": pid}))
        for field in ("out-data", "err-data"):
            if field in status:
                status[field] = base64.b64decode(status[field])
        return status

    def exec(
        self, argv: list[str], input_data: bytes | None = None, timeout: float = 300.0, poll: float = 0.5
    ) -> ExecResult:
        """Run a command in the guest and wait for it (as PVE's agent/exec then agent/exec-status)."""
        pid = self.exec_start(argv, input_data)
        deadline = time.monotonic() + timeout
        while True:
            status = self.exec_status(pid)
            if status.get("exited"):
                return ExecResult(
                    status.get("exitcode"),
                    status.get("out-data", b""),
                    status.get("err-data", b""),
                    status.get("signal"),
                    bool(status.get("out-truncated") or status.get("err-truncated")),
                )
            if time.monotonic() > deadline:
                raise AgentTimeout(f"guest-exec {argv[0]!r} (pid {pid}) still running after {timeout:.0f} s")
            time.sleep(poll)

    def read_file(self, path: str, limit: int = 16 * 1024 * 1024) -> bytes:
        """guest-file-open/read/close: the file's bytes (at most `limit`)."""
        handle = self.command("guest-file-open", {"path": path, "mode": "r"})
        try:
            data = b""
            while len(data) < limit:
                chunk = self.command("guest-file-read", {"handle": handle, "count": min(65536, limit - len(data))})
                data += base64.b64decode(chunk.get("buf-b64", ""))
                if chunk.get("eof") or not chunk.get("count"):
                    break
            return data
        finally:
            self.command("guest-file-close", {"handle": handle})
