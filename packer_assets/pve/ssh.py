"""The SSH path of the bootstrap: for a node where only SSH is open at first.

`init-packer-remote.sh` is uploaded over SFTP into a fresh private folder, run as root with its
settings in `env NAME=value ...` (nothing secret: root on the node needs no credentials), and
removed. Its `EXPORT:NAME=value` lines (protocol in the script's header) become the same
`BootstrapResult` the API path returns, plus the node's CA certificate, which makes every later
API call verify TLS.

Trust: the host key is checked against a known_hosts file. An unknown key is refused unless
`trust_on_first_use`, which records it there; a changed key is always refused. The token reuse rule
is the API path's: a secret we hold is kept only if it logs in over the API (then SKIP_TOKEN_GEN=1);
otherwise the token is created or replaced; rotation only when asked.
"""

import base64
import hashlib
import os
import re
import secrets
import shlex
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import paramiko

from packer_assets.pve.bootstrap import (
    BootstrapConfig,
    BootstrapError,
    BootstrapResult,
    Discovery,
    http_bind_address,
    required_privileges,
    token_works,
)
from packer_assets.pve.client import Endpoint, PveAccessError

SCRIPT = "remote/init-packer-remote.sh"
EXPORT = re.compile(r"^EXPORT:([A-Z][A-Z0-9_]*)=(.*)$")
REPEATED = {"CHANGE"}
NEEDED = (
    "PVE_VERSION",
    "NODE",
    "VM_STORAGE",
    "ISO_STORAGE",
    "BRIDGE",
    "PRIVILEGES",
    "TOKEN_ID",
    "TOKEN_ACTION",
    "CA_PEM",
    "DONE",
)  # names as parse_exports gives them (_B64 decoded and dropped)
MISSING_TOOLS = 3  # the script's exit code when pveum/pvesh are not there


class SshBootstrapError(BootstrapError):
    """The SSH bootstrap failed; the message names the host and the step, never a secret."""


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None
    password: str | None = field(default=None, repr=False)
    known_hosts: str | None = None  # default ~/.ssh/known_hosts
    trust_on_first_use: bool = False
    timeout: float = 15.0
    command_timeout: float = 600.0

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_file(self) -> Path:
        return Path(self.known_hosts or "~/.ssh/known_hosts").expanduser()

    @property
    def host_key_name(self) -> str:
        # how OpenSSH (and paramiko) name a host in known_hosts
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256:... form, as `ssh-keygen -lf` and ssh's prompts show it."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


# ------------------------------------------------------------------ connecting


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only for a host with no key in known_hosts: refuse, or record (trust on first use)."""

    def __init__(self, target: SshTarget, note: Callable[[str], object]):
        self.target, self.note = target, note

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        path = self.target.known_hosts_file
        if not self.target.trust_on_first_use:
            raise SshBootstrapError(
                f"{self.target.where}: host key check: unknown host key {host_key_fingerprint(key)} for {hostname} "
                f"(not in {path}); check it on the node (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and add it, "
                f"or allow trust on first use"
            )
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Appended, not rewritten: the file's other entries, comments and hashing stay as they are.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as out:
            out.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.note(f"trust on first use: recorded host key {host_key_fingerprint(key)} for {hostname} in {path}")


def open_ssh(target: SshTarget, note: Callable[[str], object] = lambda _text: None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    # Only the configured file: keys known elsewhere on this host are not this project's trust.
    if target.known_hosts_file.exists():
        try:
            client.load_host_keys(str(target.known_hosts_file))
        except (OSError, paramiko.SSHException) as exc:
            raise SshBootstrapError(
                f"{target.where}: host key check: cannot read {target.known_hosts_file}: {exc}"
            ) from None
    client.set_missing_host_key_policy(_HostKeyPolicy(target, note))
    # connect()'s keyword arguments for the login: typed per name in paramiko's stubs, passed here as one dict
    auth: dict[str, Any] = dict(key_filename=target.key_file, password=target.password)
    if target.key_file or target.password:
        auth.update(look_for_keys=False, allow_agent=False)
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.user,
            timeout=target.timeout,
            banner_timeout=target.timeout,
            auth_timeout=target.timeout,
            **auth,
        )
    except SshBootstrapError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise SshBootstrapError(
            f"{target.where}: host key check: the host key CHANGED: {target.host_key_name} offers "
            f"{host_key_fingerprint(exc.key)}, {target.known_hosts_file} has {host_key_fingerprint(exc.expected_key)}; refusing "
            f"(a reinstalled node, or someone in between). If the change is expected, remove the old entry: "
            f"ssh-keygen -R '{target.host_key_name}' -f {target.known_hosts_file}"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        how = f"key {target.key_file}" if target.key_file else "password" if target.password else "agent/default keys"
        raise SshBootstrapError(f"{target.where}: authentication failed ({how})") from None
    except (OSError, paramiko.SSHException) as exc:
        client.close()
        raise SshBootstrapError(f"{target.where}: connect failed: {exc}") from None
    return client


# ------------------------------------------------------------------ the remote script


def script_bytes() -> bytes:
    return resources.files("packer_assets").joinpath(SCRIPT).read_bytes()


def remote_env(config: BootstrapConfig, skip_token_gen: bool) -> dict[str, str]:
    """The script's settings. Both privilege lists go along: the script knows the node's PVE version."""
    values = {
        "PA_USER": config.user,
        "PA_ROLE": config.role,
        "PA_TOKEN": config.token_name,
        "PA_PRIVS": ",".join(required_privileges("9", config.extra_privileges)),
        "PA_PRIVS_PRE9": ",".join(required_privileges("8", config.extra_privileges)),
        "PA_PRIVSEP": str(int(config.privsep)),
        "PA_ROTATE": str(int(config.rotate)),
        "SKIP_TOKEN_GEN": str(int(skip_token_gen)),
        "PA_NODE": config.node or "",
        "PA_VM_STORAGE": config.vm_storage or "",
        "PA_ISO_STORAGE": config.iso_storage or "",
        "PA_BRIDGE": config.bridge or "",
    }
    return {k: v for k, v in values.items() if v != ""}


def remote_command(env: dict[str, str], script_path: str) -> str:
    words = ["env", *(f"{name}={value}" for name, value in env.items()), "bash", script_path]
    return " ".join(shlex.quote(w) for w in words)


@dataclass
class RemoteRun:
    exit_code: int
    stdout: str
    stderr: str
    command: str


def run_script(client: paramiko.SSHClient, target: SshTarget, env: dict[str, str]) -> RemoteRun:
    """Upload into a new 0700 folder (mkdir fails if the name exists: no symlink games in /tmp), run, remove."""
    folder = f"/tmp/packer-assets-init-{secrets.token_hex(8)}"
    path = f"{folder}/init-packer-remote.sh"
    step = "upload the script over SFTP"
    try:
        sftp = client.open_sftp()
    except (OSError, paramiko.SSHException) as exc:
        raise SshBootstrapError(f"{target.where}: {step}: {exc}") from None
    made: list[tuple[Callable[[str], object], str]] = []  # what to remove afterwards: only what this run created
    try:
        try:
            sftp.mkdir(folder, 0o700)
            made.insert(0, (sftp.rmdir, folder))
            made.insert(0, (sftp.remove, path))
            with sftp.open(path, "wb") as remote:
                remote.write(script_bytes())
            sftp.chmod(path, 0o700)
        except (OSError, paramiko.SSHException) as exc:
            raise SshBootstrapError(f"{target.where}: {step} to {path}: {exc}") from None
        command = remote_command(env, path)
        try:
            stdin, stdout, stderr = client.exec_command(command, timeout=target.command_timeout)
            stdin.close()
            out, err = stdout.read(), stderr.read()
            code = stdout.channel.recv_exit_status()
        except (OSError, paramiko.SSHException) as exc:
            raise SshBootstrapError(f"{target.where}: run {path}: {exc}") from None
        return RemoteRun(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), command)
    finally:
        for remove, what in made:
            try:
                remove(what)
            except (OSError, paramiko.SSHException):
                pass  # not uploaded after all, or the connection is gone; the script holds nothing secret
        sftp.close()


def parse_exports(stdout: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(values, changes, other lines). _B64 values are decoded; CHANGE may repeat, nothing else may."""
    values: dict[str, str] = {}
    changes: list[str] = []
    other: list[str] = []
    for line in stdout.splitlines():
        found = EXPORT.match(line)
        if not found:
            other.append(line)
            continue
        name, value = found.groups()
        if name in REPEATED:
            changes.append(value)
            continue
        if name in values:
            raise ValueError(f"EXPORT:{name} appears twice")
        if name.endswith("_B64"):
            name, value = name[:-4], base64.b64decode(value, validate=True).decode()
        values[name] = value
    return values, changes, other


# ------------------------------------------------------------------ the bootstrap


def known_secret_works(
    endpoint: Endpoint, config: BootstrapConfig, secret: str | None, note: Callable[[str], object]
) -> bool:
    """The reuse rule's test: log in over the API with the secret we hold."""
    if not secret or config.rotate:
        return False
    try:
        works = token_works(endpoint, config, secret)
    except PveAccessError as exc:
        # Not proven is not kept: the new token's secret is known to be right.
        note(f"the known secret of {config.token_id} cannot be checked over the API ({exc}); replacing the token")
        return False
    note(f"the known secret of {config.token_id} {'logs in: keeping it' if works else 'is refused: replacing it'}")
    return works


def ssh_bootstrap(
    target: SshTarget,
    endpoint: Endpoint,
    config: BootstrapConfig,
    known_secret: str | None,
    save_secret: Callable[[str], None] | None = None,
    note: Callable[[str], object] = lambda _text: None,
) -> BootstrapResult:
    skip = known_secret_works(endpoint, config, known_secret, note)
    client = open_ssh(target, note)
    try:
        run = run_script(client, target, remote_env(config, skip))
    finally:
        client.close()
    script = f"{target.where}: init-packer-remote.sh"
    try:
        values, changes, other = parse_exports(run.stdout)
    except ValueError as exc:
        raise SshBootstrapError(f"{script}: unreadable output: {exc}") from None
    new_secret = values.get("TOKEN_SECRET")
    if new_secret and save_secret:
        save_secret(new_secret)  # first, even if the script failed later: the token exists now
    hide = (new_secret, known_secret)
    for line in other:
        note(_redact(line, hide))
    if run.exit_code == MISSING_TOOLS:
        raise SshBootstrapError(
            f"{script}: pveum/pvesh not found: is this a Proxmox VE node? {_redact(run.stderr, hide).strip()}"
        )
    if run.exit_code != 0:
        raise SshBootstrapError(f"{script} failed (exit {run.exit_code}): {_redact(run.stderr, hide).strip()}")
    missing = [name for name in NEEDED if name not in values]
    if missing:
        raise SshBootstrapError(f"{script}: output lacks {', '.join(missing)}")
    return _result(values, changes, known_secret, skip, endpoint, config, script)


def _result(
    values: dict[str, str],
    changes: list[str],
    known_secret: str | None,
    skip: bool,
    endpoint: Endpoint,
    config: BootstrapConfig,
    script: str,
) -> BootstrapResult:
    action = values["TOKEN_ACTION"]
    if action == "reused":
        if not skip or known_secret is None:  # skip: known_secret_works proved the secret, so it is not None
            raise SshBootstrapError(f"{script}: kept a token whose secret we do not hold")
        secret = known_secret
    elif "TOKEN_SECRET" in values:
        secret = values["TOKEN_SECRET"]
    else:
        raise SshBootstrapError(f"{script}: token {action} but no secret printed")
    version = values["PVE_VERSION"]
    privileges = required_privileges(version, config.extra_privileges)
    if values["PRIVILEGES"] != ",".join(privileges):
        raise SshBootstrapError(
            f"{script}: set privileges {values['PRIVILEGES']} for PVE {version}, expected {','.join(privileges)}"
        )
    if values["TOKEN_ID"] != config.token_id:
        raise SshBootstrapError(f"{script}: made token {values['TOKEN_ID']}, expected {config.token_id}")
    found = Discovery(
        node=values["NODE"],
        # the API path's fallback too: the address the API name resolves to
        node_ip=values.get("NODE_IP") or socket.gethostbyname(endpoint.host),
        vm_storage=values["VM_STORAGE"],
        iso_storage=values["ISO_STORAGE"],
        bridge=values["BRIDGE"],
        http_bind_address=http_bind_address(endpoint, config),
        http_port=config.http_port,
    )
    return BootstrapResult(
        version, config.token_id, secret, action, privileges, found, changes, ca_pem=values["CA_PEM"]
    )


def _redact(text: str, hide: Iterable[str | None]) -> str:
    for value in hide:
        if value:
            text = text.replace(value, "***")
    return text


@dataclass(frozen=True)
class SshBootstrap:
    """The SSH path as a run_init Bootstrapper: run_init(layout, endpoint, SshBootstrap(target), ...)."""

    target: SshTarget
    method = "ssh"
    fetches_ca = True

    def describe(self, endpoint: Endpoint) -> str:
        trust = "trust on first use" if self.target.trust_on_first_use else "known host keys only"
        return (
            f"bootstrap over SSH as {self.target.where} (host keys: {self.target.known_hosts_file}, {trust}); "
            f"API {endpoint.base}"
        )

    def secrets(self) -> list[str | None]:
        return [self.target.password]

    def __call__(
        self,
        endpoint: Endpoint,
        config: BootstrapConfig,
        known_secret: str | None,
        save_secret: Callable[[str], None],
        note: Callable[[str], object],
        known_password: str | None = None,
        save_password: Callable[[str], None] | None = None,
    ) -> BootstrapResult:
        if config.build_password:
            # Setting it here would put the password on the node's command line (pvesh's argv).
            note(
                f"not setting a password for {config.user} over SSH: a Packer without token login (< 1.7.1) "
                "needs PROXMOX_BUILD_USER/PROXMOX_BUILD_PASSWORD set by you, or the API bootstrap"
            )
        return ssh_bootstrap(self.target, endpoint, config, known_secret, save_secret, note)
