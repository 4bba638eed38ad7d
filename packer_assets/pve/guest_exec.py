"""Commands in a running guest: through its QEMU guest agent (PVE's agent/exec), or over SSH as a user.

The smoke test uses both (guest_checks.py says what to run). The agent path needs no network and runs
as root; the SSH path proves what a user of a clone does: log in with a key and run a command. Its
host key is pinned to what the agent read from the guest (no trust on first use), and its key pair is
made for the one test, in memory only: the private key never touches a disk, a log or an argv.
"""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import time
from dataclasses import dataclass

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from packer_assets.errors import OperationError
from packer_assets.pve.client import PveResource

EXEC_POLL = 0.5  # seconds between exec-status calls: a check takes seconds, an inventory a few more


@dataclass(frozen=True)
class GuestOutput:
    exit_code: int | None  # None: ended by a signal
    out: str
    err: str = ""


class GuestExecTimeout(OperationError):
    """The command was still running at the deadline."""


def agent_exec(agent: PveResource, argv: list[str], deadline: float, poll: float = EXEC_POLL) -> GuestOutput:
    """Run argv in the guest as root (`agent` = proxmoxer's `nodes(n).qemu(id).agent`), wait for its end.

    PVE decodes the agent's base64 output; `exec-status` answers `exited: false` while it runs."""
    pid = agent.exec.post(command=list(argv))["pid"]
    while True:
        status = agent("exec-status").get(pid=pid)
        if status.get("exited"):
            code = status.get("exitcode")
            return GuestOutput(
                None if code is None else int(code),
                str(status.get("out-data") or ""),
                str(status.get("err-data") or ""),
            )
        if time.monotonic() >= deadline:
            raise GuestExecTimeout(f"{argv[0]} (pid {pid}) still running at the deadline")
        time.sleep(poll)


@dataclass(frozen=True)
class EphemeralKey:
    """An Ed25519 key pair for one smoke test: `public` goes into the clone's cloud-init `sshkeys`."""

    key: paramiko.PKey
    public: str

    @classmethod
    def generate(cls, comment: str = "packer-assets-smoke") -> EphemeralKey:
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        key = paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))
        return cls(key, f"{key.get_name()} {key.get_base64()} {comment}")

    def __repr__(self) -> str:
        return f"EphemeralKey({self.public!r})"


class SshLoginError(OperationError):
    """The SSH login or its command failed; the message says which and why (never a key)."""


def host_key_fingerprints(lines: list[str] | tuple[str, ...]) -> list[str]:
    """`type SHA256:...` (as ssh-keygen -lf shows them) of host keys given as `type base64` lines; any key
    type (a guest may still have an ssh-dss key, which paramiko no longer loads)."""
    found = []
    for line in lines:
        kind, _, blob = line.partition(" ")
        digest = base64.b64encode(hashlib.sha256(base64.b64decode(blob.split()[0])).digest()).decode().rstrip("=")
        found.append(f"{kind} SHA256:{digest}")
    return found


def _public_key(line: str) -> paramiko.PKey | None:
    """The host key of a `type base64` line; None for a type paramiko cannot use (ssh-dss): a server never
    presents paramiko such a key, so it has nothing to pin."""
    kind, _, blob = line.partition(" ")
    try:
        return paramiko.PKey.from_type_string(kind, base64.b64decode(blob.split()[0]))
    except paramiko.pkey.UnknownKeyType:  # the same class; the stubs know it only here
        return None


def host_key_entry(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def ssh_run(
    host: str,
    port: int,
    user: str,
    key: EphemeralKey,
    host_keys: list[str],
    command: str,
    *,
    deadline: float,
    poll: float = 2.0,
) -> GuestOutput:
    """Log in as `user` with `key`, trusting only `host_keys` (`type base64` lines), and run `command`.

    A refused or unreachable port is retried until `deadline` (sshd may still be starting); a refused
    key or an unknown host key is not: those are the answers the check is about."""
    pinned = [key for key in map(_public_key, host_keys) if key is not None]
    if not pinned:
        raise SshLoginError(
            f"no host key of {host}:{port} to pin: the guest reported "
            f"{'none' if not host_keys else 'only types SSH clients no longer use (ssh-dss)'}"
        )
    last = "no attempt"
    while True:
        client = paramiko.SSHClient()
        known = client.get_host_keys()
        for public in pinned:
            known.add(host_key_entry(host, port), public.get_name(), public)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                host,
                port=port,
                username=user,
                pkey=key.key,
                look_for_keys=False,
                allow_agent=False,
                timeout=min(30.0, max(1.0, deadline - time.monotonic())),
                banner_timeout=30,
                auth_timeout=30,
            )
            _stdin, stdout, stderr = client.exec_command(command, timeout=max(1.0, deadline - time.monotonic()))
            out = stdout.read().decode(errors="replace")
            code = stdout.channel.recv_exit_status()
            return GuestOutput(code, out, stderr.read().decode(errors="replace"))
        except paramiko.AuthenticationException:
            raise SshLoginError(f"{user}@{host}:{port}: the key given to the clone was refused") from None
        except paramiko.BadHostKeyException:
            raise SshLoginError(f"{host}:{port} presented a host key the guest agent did not report") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise SshLoginError(f"{host}:{port} presented a host key the guest agent did not report") from None
            last = str(exc)
        except (OSError, EOFError) as exc:
            last = f"{type(exc).__name__}: {exc}" if not isinstance(exc, socket.timeout) else "timed out"
        finally:
            client.close()
        if time.monotonic() >= deadline:
            raise SshLoginError(f"{user}@{host}:{port}: no SSH session before the deadline; last: {last}")
        time.sleep(poll)
