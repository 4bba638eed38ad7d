"""pytest fixtures: a real OpenSSH server on loopback, standing in for a PVE node's sshd (loaded by conftest.py).

root logs in with a test key. The session's PATH starts with a bin folder holding the lab's `pveum`
and `pvesh` (packer_assets_lab.pvecli), and PVE_ROOT_CA names the lab CA, so init-packer-remote.sh
acts on the same LabPve the API path uses. sshd logs at DEBUG3 to a file, so tests can check that
no secret reaches it.
"""

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from packer_assets_lab.pvecli import install_shims
from packer_assets.pve.ssh import SshTarget

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 10.0


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


@dataclass
class LabSshd:
    host: str
    port: int
    client_key: Path
    host_key: Path
    bin_dir: Path
    log_file: Path
    pvecli_log: Path
    known_hosts: Path  # holds this server's key already

    def known_hosts_line(self) -> str:
        kind, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"[{self.host}]:{self.port} {kind} {blob}\n"

    def target(self, **overrides) -> SshTarget:
        settings = dict(host=self.host, port=self.port, user="root", key_file=str(self.client_key),
                        known_hosts=str(self.known_hosts), timeout=10)
        settings.update(overrides)
        return SshTarget(**settings)

    def pvecli_calls(self) -> list[dict]:
        if not self.pvecli_log.exists():
            return []
        return [json.loads(line) for line in self.pvecli_log.read_text().splitlines()]


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory):
    """The test's client key, the server's host key, and another host key (a 'reinstalled' node)."""
    if not Path(SSHD).exists() or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH server (openssh-server) is not installed")
    folder = tmp_path_factory.mktemp("ssh-keys")
    return {"client": keygen(folder / "client_ed25519"), "host": keygen(folder / "ssh_host_ed25519_key"),
            "other_host": keygen(folder / "other_host_ed25519_key")}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log_file.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on {port}: {log_file.read_text()[-2000:]}")


@pytest.fixture
def lab_sshd(tmp_path, lab_pve, lab_pki, ssh_keys):
    """A running sshd for lab_pve's 'node' (one per test, as lab_pve is)."""
    folder = tmp_path / "sshd"
    folder.mkdir()
    password_file = folder / "root-password"
    password_file.write_text(lab_pve.root_password)
    password_file.chmod(0o600)
    bin_dir, pvecli_log = folder / "bin", folder / "pvecli.log"
    install_shims(bin_dir, lab_pve.url, lab_pki.ca_file, password_file, log_file=pvecli_log)
    authorized = folder / "authorized_keys"
    shutil.copyfile(ssh_keys["client"].with_suffix(".pub"), authorized)
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {ssh_keys["host"]}
PidFile {folder}/sshd.pid
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
SetEnv PATH={bin_dir}:/usr/bin:/bin PVE_ROOT_CA={lab_pki.ca_file}
LogLevel DEBUG3
""")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    log_file = folder / "sshd.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc, log_file)
        server = LabSshd("127.0.0.1", port, ssh_keys["client"], ssh_keys["host"], bin_dir, log_file, pvecli_log,
                         folder / "known_hosts")
        server.known_hosts.write_text(server.known_hosts_line())
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
