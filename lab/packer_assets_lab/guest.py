"""A guest's SSH endpoint for Packer's communicator: a paramiko server in a background thread.

It accepts the build's credentials (password and/or public keys for one user), records every
`exec` command, answers exit status 0, and takes uploads by SCP (`scp -t`, as Packer's SSH
communicator does by default) and SFTP. Uploaded files land under `<state_dir>/files/<guest path>`.
It also plays the smoke test's clones: `key_source` names the keys other users (a clone's cloud-init
user) log in with, and `id -un` prints the logged-in user.

Go's SSH client (Packer) hangs or errors unless a command's channel gets, in this order: the reply
to the exec request, exit-status, EOF, close. See `_Transport` and `_finish`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import json
import os
import posixpath
import re
import shlex
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST

from .guest_sftp import LabSftp

# Directories a fresh Linux guest has, so uploads into e.g. /tmp behave as on a real guest
# (scp's sink writes *into* an existing directory, but *as* the target path otherwise).
SEED_DIRS = ("tmp", "var/tmp", "etc", "opt", "srv", "root", "usr/local/bin", "c:/Windows/Temp")

ExecHandler = Callable[[str], tuple[int, bytes]]
# (the port the session came in on, command) -> (exit status, stdout): what the guest behind that port answers
PortHandler = Callable[[int, str], tuple[int, bytes]]
PortGate = Callable[[int], bool]  # port -> is an sshd behind it (a login there may succeed)?
KeySource = Callable[[str], Iterable[str]]  # username -> OpenSSH public key lines it may log in with


class LabGuest:
    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        username: str,
        password: str | None = None,
        authorized_keys: Iterable[paramiko.PKey | str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        host_key_path: str | os.PathLike[str] | None = None,
        exec_handler: ExecHandler | None = None,
        also_accept: Iterable[str] = (),
        key_source: KeySource | None = None,
    ):
        """`authorized_keys`: paramiko keys or OpenSSH public key lines ("ssh-ed25519 AAAA... c").

        `exec_handler(command) -> (exit status, stdout bytes)` overrides the default answer
        (0, b"") for commands other than scp, e.g. to make a provisioner step fail.
        `key_source(username)`: further public key lines that user logs in with, asked at each login
        (the lab's PVE: the keys of running clones whose cloud-init user that is); such a user logs in
        with those keys only, never with the password, and need not be one of `usernames`.
        """
        self.state_dir = Path(state_dir)
        self.files_dir = self.state_dir / "files"
        self.username, self._password = username, password
        # Further login names with the same credentials (the catalog's Windows user, say).
        self.usernames = {username, *also_accept}
        self._authorized = {_key_blob(k) for k in authorized_keys}
        self.host, self._port = host, port
        self.exec_handler = exec_handler
        self.key_source = key_source
        self.home = "/root" if username == "root" else f"/home/{username}"
        self.commands: list[str] = []
        self.uploads: list[tuple[str, str]] = []  # (scp|sftp, guest path)
        self.auth_log: list[tuple[str, str, bool]] = []  # (username, method, accepted)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._transports: set[paramiko.Transport] = set()
        # Further listening ports (one per catalog key in the lab): port_handler answers by the port used.
        self.port_handler: PortHandler | None = None
        self.port_gate: PortGate | None = None
        self._extra: list[tuple[socket.socket, threading.Thread]] = []
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for d in (*SEED_DIRS, self.home.lstrip("/")):
            (self.files_dir / d).mkdir(parents=True, exist_ok=True)
        self.host_key = _load_or_create_host_key(
            Path(host_key_path) if host_key_path else self.state_dir / "ssh_host_rsa_key"
        )

    # ---- identity ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._sock.getsockname()[1] if self._sock else self._port

    @property
    def host_key_fingerprint(self) -> str:
        """As `ssh-keygen -lf` and OpenSSH print it: SHA256:<unpadded base64>."""
        return self.host_key.fingerprint

    def known_hosts_line(self) -> str:
        where = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        return f"{where} {self.host_key.get_name()} {self.host_key.get_base64()}"

    # ---- what happened -------------------------------------------------------------------------

    def local_path(self, guest_path: str) -> Path:
        """Where a guest path lives on this host; relative paths are relative to the user's home. A Windows
        path (`c:/Windows/Temp/...`, where packer's powershell provisioner uploads) is under files/c:/."""
        drive = re.match(r"^[A-Za-z]:/", guest_path)
        start = "/" if drive else self.home
        normal = posixpath.normpath(
            posixpath.join(start, guest_path.lower()[:2] + guest_path[2:] if drive else guest_path)
        )
        return self.files_dir / normal.lstrip("/")

    def guest_path(self, local: Path) -> str:
        return "/" + local.relative_to(self.files_dir).as_posix()

    @staticmethod
    def read_commands_log(state_dir: str | os.PathLike[str]) -> list[str]:
        """The commands recorded in `<state_dir>/commands.log` (one JSON object a line)."""
        log = Path(state_dir) / "commands.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [json.loads(line)["command"] for line in lines if line]

    def _record(self, command: str) -> None:
        entry = {"ts": dt.datetime.now(dt.UTC).isoformat(), "user": self.username, "command": command}
        with self._lock:
            self.commands.append(command)
            with (self.state_dir / "commands.log").open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def _uploaded(self, method: str, local: Path) -> None:
        with self._lock:
            self.uploads.append((method, self.guest_path(local)))

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> LabGuest:
        self._sock = socket.create_server((self.host, self._port))
        self._sock.settimeout(0.1)  # lets the accept loop notice stop()
        self._thread = threading.Thread(
            target=self._accept_loop, args=(self._sock,), name=f"lab-guest:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def listen(self, port: int = 0) -> int:
        """Also serve on `port` (0: a free one); returns it. Sessions there reach port_handler with it."""
        sock = socket.create_server((self.host, port))
        sock.settimeout(0.1)
        thread = threading.Thread(target=self._accept_loop, args=(sock,), name=f"lab-guest:{port}", daemon=True)
        self._extra.append((sock, thread))
        thread.start()
        return int(sock.getsockname()[1])

    def stop(self) -> None:
        if not self._sock:
            return
        sock, self._sock = self._sock, None
        sock.close()
        extra, self._extra = self._extra, []
        for other, _thread in extra:
            other.close()
        for _other, thread in extra:
            thread.join(timeout=5)
        self._thread.join(timeout=5)
        with self._lock:
            transports, self._transports = list(self._transports), set()
        for t in transports:
            t.close()

    def __enter__(self) -> LabGuest:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self, sock: socket.socket) -> None:
        while self._sock is not None:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if _is_probe(conn):
            conn.close()  # a port check (packer dials before it speaks SSH): nothing to log
            return
        t = _Transport(conn)
        t.add_server_key(self.host_key)
        t.set_subsystem_handler("sftp", paramiko.SFTPServer, LabSftp, self)
        with self._lock:
            self._transports = {x for x in self._transports if x.is_active()} | {t}
        try:
            # handshake; channels are then served by callbacks
            t.start_server(server=_Server(self, conn.getsockname()[1]))
        except (paramiko.SSHException, EOFError, OSError):
            t.close()

    # ---- authentication ------------------------------------------------------------------------

    def accepts_key(self, username: str, key: paramiko.PKey) -> bool:
        """True if `username` may log in with `key`: an authorized key of one of `usernames`, or a key
        `key_source` names for that user."""
        blob = key.asbytes()
        if username in self.usernames and blob in self._authorized:
            return True
        try:
            return any(_is_key(line, blob) for line in (self.key_source(username) if self.key_source else ()))
        except Exception:  # noqa: BLE001 - a broken source accepts nobody (and must not kill the server)
            return False

    # ---- exec ----------------------------------------------------------------------------------

    def _run(self, chan: paramiko.Channel, command: str, username: str | None, port: int = 0) -> None:
        status = 1
        try:
            argv = _split(command)
            if argv and posixpath.basename(argv[0]) == "scp":
                status = _scp(self, chan, argv[1:])
            elif argv == ["id", "-un"] and username:
                # the smoke test's login check: who logged in is the server's to say, not a test handler's
                chan.sendall(f"{username}\n".encode())
                status = 0
            else:
                self._chmod(argv)
                status, out = self._answer(command, port)
                chan.sendall(out)
        except Exception as e:  # noqa: BLE001 - a lab bug must still end the channel, or the client hangs
            try:
                chan.sendall_stderr(f"lab guest: {type(e).__name__}: {e}\n".encode())
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the client went away (a killed packer mid-upload): nobody to tell
        finally:
            _finish(chan, status)

    def _answer(self, command: str, port: int) -> tuple[int, bytes]:
        """A test's exec_handler first (a failure it returns wins); then the guest behind the port (port_handler)."""
        status, out = self.exec_handler(command) if self.exec_handler else (0, b"")
        if status == 0 and self.port_handler is not None:
            status, more = self.port_handler(port, command)
            out += more
        return status, out

    def read_text(self, guest_path: str) -> str | None:
        """An uploaded file's text (what a guest-side shell reads), or None if there is none."""
        path = self.local_path(guest_path)
        return path.read_text(errors="replace") if path.is_file() else None

    def _chmod(self, argv: list[str]) -> None:
        """`chmod <octal> <path>...` changes the uploaded files as a real guest's chmod would (packer makes
        its env var file, which holds the install password, 0600 this way). Anything else changes nothing."""
        if len(argv) < 3 or argv[0] != "chmod" or not re.fullmatch(r"[0-7]{3,4}", argv[1]):
            return
        for path in map(self.local_path, argv[2:]):
            if path.is_file() and not path.is_symlink():
                path.chmod((int(argv[1], 8) & 0o777) | 0o600)  # the lab must still read what it holds


def _is_probe(conn: socket.socket) -> bool:
    """True if the peer hung up without sending anything (clients send their banner at once)."""
    conn.settimeout(0.5)
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except TimeoutError:
        return False  # a client that waits for our banner first: serve it
    except OSError:
        return True
    finally:
        conn.settimeout(None)


def _finish(chan: paramiko.Channel, status: int) -> None:
    # exit-status first, then close (paramiko sends EOF before CLOSE): Go's session.Wait needs
    # both, and reports "exited without exit status" if CLOSE comes first.
    try:
        chan.send_exit_status(status)
        chan.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the client went away first


def _split(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return []


def _key_blob(key: paramiko.PKey | str) -> bytes:
    if isinstance(key, paramiko.PKey):
        return key.asbytes()
    parts = str(key).split()
    for i, tok in enumerate(parts[:-1]):  # authorized_keys lines may start with options
        if tok.startswith(("ssh-", "ecdsa-", "sk-")):
            return base64.b64decode(parts[i + 1])
    raise ValueError(f"not an OpenSSH public key line: {key!r}")


def _is_key(line: str, blob: bytes) -> bool:
    try:
        return hmac.compare_digest(_key_blob(line), blob)
    except ValueError:  # not a key line (base64 errors are ValueErrors too): sshd skips it as well
        return False


def _load_or_create_host_key(path: Path) -> paramiko.PKey:
    if path.exists():
        return paramiko.PKey.from_path(path)
    # RSA: every SSH client has it; paramiko signs with rsa-sha2-256/512, which Go's x/crypto in
    # Debian's packer 1.6.6 negotiates. paramiko writes the file with mode 0600.
    key = paramiko.RSAKey.generate(2048)
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key_file(str(path))
    path.with_name(path.name + ".pub").write_text(f"{key.get_name()} {key.get_base64()}\n")
    return key


class _Server(paramiko.ServerInterface):
    def __init__(self, guest: LabGuest, port: int = 0):
        self.guest = guest
        self.port = port  # the local port this connection came in on
        self.pending: dict[int, threading.Thread] = {}  # channel id -> exec worker not yet started
        self.username: str | None = None  # who this connection logged in as

    def get_allowed_auths(self, username: str) -> str:
        return "publickey,password" if self.guest._password is not None else "publickey"

    def check_auth_password(self, username: str, password: str) -> int:
        ok = (
            self.guest._password is not None
            and username in self.guest.usernames
            and _same(password, self.guest._password)
        )
        return self._answer(username, "password", ok)

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return self._answer(username, "publickey", self.guest.accepts_key(username, key))

    def _answer(self, username: str, method: str, ok: bool) -> int:
        gate = self.guest.port_gate
        if ok and gate is not None and self.port != self.guest.port and not gate(self.port):
            ok = False  # nothing behind this port runs sshd (the VM is off, or its system has none)
        self.guest.auth_log.append((username, method, ok))
        if ok:
            self.username = username
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_pty_request(self, channel, term, width, height, pw, ph, modes) -> bool:
        return True

    def check_channel_env_request(self, channel, name, value) -> bool:
        return True

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        text = command.decode("utf-8", "replace")
        self.guest._record(text)
        self.pending[channel.get_id()] = threading.Thread(
            target=self.guest._run, args=(channel, text, self.username, self.port), daemon=True
        )
        return True

    def start_pending(self, channel: paramiko.Channel) -> None:
        worker = self.pending.pop(channel.get_id(), None)
        if worker:
            worker.start()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _handle_request_then_start(chan: paramiko.Channel, m: paramiko.Message) -> None:
    paramiko.Channel._handle_request(chan, m)  # calls check_channel_exec_request, sends the reply
    server = chan.transport.server_object
    if isinstance(server, _Server):
        server.start_pending(chan)


class _Transport(paramiko.Transport):
    """Starts an exec's worker only after the exec request's reply is on the wire.

    paramiko replies *after* check_channel_exec_request returns; a worker started inside it can
    close the channel first, and Go's client then loses the reply (Start fails with EOF).
    """

    _channel_handler_table: ClassVar[dict[int, Any]] = {  # paramiko's own table, one entry replaced
        **paramiko.Transport._channel_handler_table,
        MSG_CHANNEL_REQUEST: _handle_request_then_start,
    }


# ---- SCP sink (the receiving side of `scp -t`) ---------------------------------------------------


def _scp(guest: LabGuest, chan: paramiko.Channel, args: list[str]) -> int:
    flags, paths = set(), []
    for i, a in enumerate(args):
        if a == "--":
            paths += args[i + 1 :]
            break
        if a.startswith("-"):
            flags |= set(a[1:])
        else:
            paths.append(a)
    if "t" not in flags or len(paths) != 1:
        chan.sendall(b"\x02scp: the lab guest only receives files (scp -t <path>)\n")
        return 1
    return _ScpSink(guest, chan, guest.local_path(paths[0])).run()


class _ScpSink:
    """OpenSSH's sink(): C<mode> <size> <name> / D<mode> 0 <name> / E / T records, each acked \\0.

    Like scp, the target is a directory to write into if it already is one (or for records nested
    in a D); otherwise it is the path to write (a file, or the directory a top-level D creates).
    """

    def __init__(self, guest: LabGuest, chan: paramiko.Channel, target: Path):
        self.guest, self.chan, self.target = guest, chan, target
        self.stream = chan.makefile("rb")

    def run(self) -> int:
        dirs: list[Path] = []
        self.chan.sendall(b"\0")
        while line := self.stream.readline():
            code, rest = line[:1], line[1:].rstrip(b"\n").decode("utf-8", "replace")
            if code in (b"\x01", b"\x02"):  # the source reports a warning / fatal error
                if code == b"\x02":
                    return 1
                continue
            if code == b"T":  # times (-p): accepted, not applied
                self.chan.sendall(b"\0")
            elif code == b"E":
                if dirs:
                    dirs.pop()
                self.chan.sendall(b"\0")
            elif code in (b"C", b"D"):
                mode, size, name = rest.split(" ", 2)
                if "/" in name or name in (".", ".."):
                    return self._fail(f"scp: protocol error: bad name {name!r}")
                if dirs:
                    dest = dirs[-1] / name
                elif self.target.is_dir():
                    dest = self.target / name
                else:
                    dest = self.target
                if code == b"D":
                    dest.mkdir(parents=True, exist_ok=True)
                    dirs.append(dest)
                    self.chan.sendall(b"\0")
                else:
                    self._receive(dest, int(mode, 8), int(size))
            else:
                return self._fail(f"scp: protocol error: unexpected {line[:40]!r}")
        return 0

    def _receive(self, dest: Path, mode: int, size: int) -> None:
        self.chan.sendall(b"\0")
        data = self.stream.read(size)
        if len(data) != size or self.stream.read(1) != b"\0":
            raise EOFError(f"scp: short upload of {self.guest.guest_path(dest)}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.scp-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others meanwhile
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        tmp.chmod((mode & 0o777) | 0o600)  # keep it readable by the lab whatever the guest mode
        os.replace(tmp, dest)
        self.guest._uploaded("scp", dest)
        self.chan.sendall(b"\0")

    def _fail(self, message: str) -> int:
        self.chan.sendall(b"\x02" + message.encode() + b"\n")
        return 1
