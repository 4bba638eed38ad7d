"""The lab's guest SSH endpoint: exec, SCP, SFTP, auth, host key, and the real packer 1.6.6."""

import io
import json
import os
import stat
import subprocess
import threading

import paramiko
import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")

from support.guest import GUEST_USER, guest_ssh_client

from packer_assets_lab.guest import LabGuest


def run(client: paramiko.SSHClient, command: str, **kw) -> tuple[int, bytes]:
    _, stdout, _ = client.exec_command(command, timeout=10, **kw)
    out = stdout.read()
    return stdout.channel.recv_exit_status(), out


def test_exec_exits_0_and_is_recorded(lab_guest, guest_ssh):
    assert run(guest_ssh, "chmod 0755 /tmp/script_1234.sh") == (0, b"")
    assert run(guest_ssh, "PACKER_BUILD_NAME='x' /tmp/script_1234.sh") == (0, b"")
    expected = ["chmod 0755 /tmp/script_1234.sh", "PACKER_BUILD_NAME='x' /tmp/script_1234.sh"]
    assert lab_guest.commands == expected
    assert LabGuest.read_commands_log(lab_guest.state_dir) == expected


def test_pty_and_env_requests_are_accepted(lab_guest, guest_ssh):
    assert run(guest_ssh, "env", get_pty=True, environment={"LANG": "C"}) == (0, b"")


def test_many_execs_sequential_and_concurrent(lab_guest, guest_ssh, guest_password):
    # The exit must never overtake the exec reply (see _Transport); a tight loop would expose it.
    for i in range(40):
        assert run(guest_ssh, f"true {i}") == (0, b"")
    results = []

    def worker(n):
        client = guest_ssh_client(lab_guest, password=guest_password)
        try:
            results.extend(run(client, f"echo {n}-{j}")[0] for j in range(5))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(5)]
    for t in threads:
        t.start()
    # ...and several channels open at once on one session.
    channels = [guest_ssh.get_transport().open_session() for _ in range(5)]
    for n, ch in enumerate(channels):
        ch.exec_command(f"parallel {n}")
    assert [ch.recv_exit_status() for ch in channels] == [0] * 5
    for t in threads:
        t.join(30)
    assert results == [0] * 25
    assert len(lab_guest.commands) == 40 + 25 + 5


def test_exec_handler_sets_status_and_output(guest_state_dir, guest_password):
    handler = lambda cmd: (3, b"nope\n") if "fail" in cmd else (0, b"ok\n")  # noqa: E731
    with LabGuest(guest_state_dir, "packer", password=guest_password, exec_handler=handler) as guest:
        client = guest_ssh_client(guest, password=guest_password)
        assert run(client, "please fail") == (3, b"nope\n")
        assert run(client, "fine") == (0, b"ok\n")
        client.close()


def test_sftp_upload_lands_under_files(lab_guest, guest_ssh):
    sftp = guest_ssh.open_sftp()
    with sftp.open("/tmp/uploaded.sh", "w") as f:
        f.write(b"#!/bin/sh\necho hi\n")
    sftp.chmod("/tmp/uploaded.sh", 0o755)
    sftp.mkdir("/tmp/d")
    sftp.putfo(io.BytesIO(b"x" * 100_000), "/tmp/d/../d/big.bin")
    assert sftp.normalize(".") == "/home/packer"
    sftp.putfo(io.BytesIO(b"in home"), "note.txt")
    assert "uploaded.sh" in sftp.listdir("/tmp")
    assert sftp.stat("/tmp/uploaded.sh").st_size == 18
    sftp.close()
    assert lab_guest.local_path("/tmp/uploaded.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert lab_guest.local_path("/tmp/uploaded.sh").stat().st_mode & 0o755 == 0o755
    assert lab_guest.local_path("/tmp/d/big.bin").stat().st_size == 100_000
    assert (lab_guest.state_dir / "files/home/packer/note.txt").read_bytes() == b"in home"
    assert ("sftp", "/tmp/uploaded.sh") in lab_guest.uploads


def test_sftp_cannot_escape_the_files_root(lab_guest, guest_ssh):
    sftp = guest_ssh.open_sftp()
    sftp.putfo(io.BytesIO(b"x"), "/../../../escaped.txt")
    sftp.close()
    assert (lab_guest.files_dir / "escaped.txt").exists()
    assert not (lab_guest.state_dir / "escaped.txt").exists()


def scp_session(client, command: str, records: list[bytes]) -> int:
    """A minimal SCP source, as Go's packer speaks it: expects \\0 before and after each record."""
    ch = client.get_transport().open_session()
    ch.exec_command(command)
    assert ch.recv(1) == b"\0"
    for rec in records:
        ch.sendall(rec)
        if rec.startswith(b"C"):
            assert ch.recv(1) == b"\0"
            continue  # the data record follows as its own element
        assert ch.recv(1) == b"\0", rec
    ch.shutdown_write()
    return ch.recv_exit_status()


def test_scp_sink_file_and_directory_like_packer(lab_guest, guest_ssh):
    data = b"echo provisioned\n"
    # Packer's file upload: `scp -vt <dir>` with the file's base name.
    assert scp_session(guest_ssh, "scp -vt /tmp", [b"C0644 %d script_1.sh\n" % len(data), data + b"\0"]) == 0
    assert lab_guest.local_path("/tmp/script_1.sh").read_bytes() == data
    # Packer's directory upload without trailing slash: `scp -rvt <dst>` wrapping it in a D record.
    records = [b"D0755 0 conf\n", b"C0600 3 a.cfg\n", b"abc\0", b"D0755 0 sub\n", b"C0644 0 empty\n", b"\0",
               b"E\n", b"E\n"]
    assert scp_session(guest_ssh, "scp -rvt /etc/app", records) == 0
    assert lab_guest.local_path("/etc/app/a.cfg").read_bytes() == b"abc"  # /etc/app did not exist
    assert lab_guest.local_path("/etc/app/sub/empty").read_bytes() == b""
    assert ("scp", "/etc/app/sub/empty") in lab_guest.uploads
    assert lab_guest.commands == ["scp -vt /tmp", "scp -rvt /etc/app"]


def test_the_env_var_file_holding_the_install_password_is_0600(lab_guest, guest_ssh):
    # packer 1.6.6 (use_env_var_file): upload /tmp/varfile_<n>.sh with no mode (scp: C0644), then `chmod 0600` it
    data = b"export PACKER_INSTALL_PASSWORD='pw-not-for-others'\n"
    assert scp_session(guest_ssh, "scp -vt /tmp", [b"C0644 %d varfile_1234.sh\n" % len(data), data + b"\0"]) == 0
    assert run(guest_ssh, "chmod 0600 /tmp/varfile_1234.sh") == (0, b"")
    assert stat.S_IMODE(lab_guest.local_path("/tmp/varfile_1234.sh").stat().st_mode) == 0o600
    # over SFTP the file is created 0600 before any chmod; a mode the client sets still applies
    sftp = guest_ssh.open_sftp()
    with sftp.open("/tmp/varfile_5678.sh", "w") as f:
        f.write(data)
    assert stat.S_IMODE(lab_guest.local_path("/tmp/varfile_5678.sh").stat().st_mode) == 0o600
    sftp.chmod("/tmp/varfile_5678.sh", 0o644)
    assert stat.S_IMODE(lab_guest.local_path("/tmp/varfile_5678.sh").stat().st_mode) == 0o644
    sftp.close()
    # only a plain octal chmod of files is applied; anything else changes nothing
    assert run(guest_ssh, "chmod 0600 /tmp/varfile_5678.sh; rm -rf /")[0] == 0
    assert stat.S_IMODE(lab_guest.local_path("/tmp/varfile_5678.sh").stat().st_mode) == 0o644


def test_scp_rejects_bad_names_and_source_mode(lab_guest, guest_ssh):
    assert scp_session(guest_ssh, "scp -t /tmp", []) == 0  # nothing sent is fine
    ch = guest_ssh.get_transport().open_session()
    ch.exec_command("scp -t /tmp")
    assert ch.recv(1) == b"\0"
    ch.sendall(b"C0644 1 ../evil\n")
    assert ch.recv(1) == b"\x02" and ch.recv_exit_status() == 1
    assert run(guest_ssh, "scp -f /etc/passwd")[0] == 1


needs_scp = pytest.mark.sshd


@needs_scp
def test_real_scp_binary_uploads_file_and_directory(lab_guest, guest_client_key_file, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(lab_guest.known_hosts_line() + "\n")
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    (src / "inner" / "deep.txt").write_text("deep")
    (tmp_path / "one.txt").write_text("one")
    base = ["scp", "-O", "-P", str(lab_guest.port), "-i", str(guest_client_key_file),
            "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"]
    target = f"{GUEST_USER}@{lab_guest.host}"
    for args in ([str(tmp_path / "one.txt"), f"{target}:/tmp/"], ["-r", str(src), f"{target}:/opt/"],
                 [str(tmp_path / "one.txt"), f"{target}:renamed.txt"]):
        proc = subprocess.run(base + args, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    assert lab_guest.local_path("/tmp/one.txt").read_text() == "one"
    assert lab_guest.local_path("/opt/src/inner/deep.txt").read_text() == "deep"
    assert lab_guest.local_path("/home/packer/renamed.txt").read_text() == "one"


@needs_scp
def test_real_scp_refuses_a_changed_host_key(lab_guest, guest_state_dir, tmp_path, guest_client_key_file):
    known = tmp_path / "known_hosts"
    other = LabGuest(tmp_path / "other", "packer")  # a different host key
    known.write_text(f"[{lab_guest.host}]:{lab_guest.port} ssh-rsa {other.host_key.get_base64()}\n")
    (tmp_path / "f").write_text("x")
    proc = subprocess.run(
        ["scp", "-O", "-P", str(lab_guest.port), "-i", str(guest_client_key_file), "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", str(tmp_path / "f"),
         f"packer@{lab_guest.host}:/tmp/"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in proc.stderr


def test_wrong_password_and_wrong_user_are_refused(lab_guest, guest_password):
    with pytest.raises(paramiko.AuthenticationException):
        guest_ssh_client(lab_guest, password="wrong")
    with pytest.raises(paramiko.AuthenticationException):
        guest_ssh_client(lab_guest, password=guest_password, username="root")
    assert lab_guest.auth_log == [("packer", "password", False), ("root", "password", False)]
    assert guest_password not in json.dumps(lab_guest.auth_log)


def test_key_auth_accepts_authorized_and_refuses_others(lab_guest, guest_client_key):
    client = guest_ssh_client(lab_guest, pkey=guest_client_key)
    assert run(client, "whoami")[0] == 0
    client.close()
    with pytest.raises(paramiko.AuthenticationException):
        guest_ssh_client(lab_guest, pkey=paramiko.ECDSAKey.generate())


def test_key_auth_from_openssh_public_key_line(guest_state_dir, guest_client_key):
    line = f'from="127.0.0.1" {guest_client_key.get_name()} {guest_client_key.get_base64()} me@host'
    with LabGuest(guest_state_dir, "root", authorized_keys=[line]) as guest:  # no password at all
        client = guest_ssh_client(guest, pkey=guest_client_key)
        assert run(client, "true")[0] == 0
        client.close()
        with pytest.raises(paramiko.AuthenticationException):
            guest_ssh_client(guest, password="anything")


def test_host_key_persists_across_restart(guest_state_dir, guest_password):
    with LabGuest(guest_state_dir, "packer", password=guest_password) as first:
        fingerprint, key = first.host_key_fingerprint, first.host_key.get_base64()
    assert (guest_state_dir / "ssh_host_rsa_key").stat().st_mode & 0o077 == 0
    with LabGuest(guest_state_dir, "packer", password=guest_password) as second:
        assert (second.host_key_fingerprint, second.host_key.get_base64()) == (fingerprint, key)
        client = guest_ssh_client(second, password=guest_password)  # verifies the host key
        client.close()
    assert LabGuest(guest_state_dir.parent / "elsewhere", "packer").host_key_fingerprint != fingerprint


@pytest.mark.sshd
def test_fingerprint_matches_ssh_keygen(lab_guest, tmp_path):
    pub = tmp_path / "host.pub"
    pub.write_text(lab_guest.known_hosts_line().split(" ", 1)[1] + "\n")
    out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == lab_guest.host_key_fingerprint
    assert lab_guest.host_key_fingerprint.startswith("SHA256:")
    assert lab_guest.known_hosts_line().startswith(f"[127.0.0.1]:{lab_guest.port} ssh-rsa ")


# ---- the real consumer: Debian's packer 1.6.6 and its Go SSH communicator -------------------------

needs_packer = pytest.mark.packer


@needs_packer
@pytest.mark.parametrize("transfer", ["scp", "sftp"])
def test_packer_null_builder_provisions_through_the_guest(lab_guest, guest_password, tmp_path, transfer):
    (tmp_path / "payload.txt").write_text("payload\n")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "leaf.txt").write_text("leaf\n")
    template = {
        "variables": {"ssh_password": "{{env `LAB_GUEST_PASSWORD`}}"},  # secrets via the environment
        "builders": [{
            "type": "null",
            "communicator": "ssh",
            "ssh_host": lab_guest.host,
            "ssh_port": lab_guest.port,
            "ssh_username": lab_guest.username,
            "ssh_password": "{{user `ssh_password`}}",
            "ssh_timeout": "30s",
            "ssh_file_transfer_method": transfer,
        }],
        "provisioners": [
            {"type": "shell", "inline": ["echo hello from the lab", "touch /tmp/marker"]},
            {"type": "file", "source": "payload.txt", "destination": "/tmp/payload.txt"},
            {"type": "file", "source": "tree", "destination": "/opt"},
        ],
    }
    (tmp_path / "build.json").write_text(json.dumps(template))
    env = {**os.environ, "LAB_GUEST_PASSWORD": guest_password, "HOME": str(tmp_path),
           "CHECKPOINT_DISABLE": "1", "PACKER_LOG": "1", "PACKER_NO_COLOR": "1"}
    proc = subprocess.run(["packer", "build", "-color=false", "build.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert guest_password not in proc.stdout
    # The shell provisioner uploads its script, makes it executable and runs it.
    scripts = [p for m, p in lab_guest.uploads if p.startswith("/tmp/script_")]
    assert len(scripts) == 1
    script = lab_guest.local_path(scripts[0]).read_text()
    assert "echo hello from the lab" in script and "touch /tmp/marker" in script
    assert any(c.startswith("chmod 0755 " + scripts[0]) for c in lab_guest.commands)
    # packer 1.6.6 sends e.g. "chmod +x /tmp/script_1.sh; PACKER_BUILDER_TYPE='null' ... /tmp/script_1.sh\n"
    assert any("PACKER_BUILDER_TYPE='null'" in c and scripts[0] in c for c in lab_guest.commands)
    assert lab_guest.local_path("/tmp/payload.txt").read_text() == "payload\n"
    assert lab_guest.local_path("/opt/tree/sub/leaf.txt").read_text() == "leaf\n"
    assert {m for m, _ in lab_guest.uploads} == {transfer}


@needs_packer
@pytest.mark.parametrize("transfer", ["scp", "sftp"])
def test_packer_env_var_file_with_the_password_lands_0600(lab_guest, guest_password, tmp_path, transfer):
    template = {
        "variables": {"password": "{{env `LAB_GUEST_PASSWORD`}}"},  # secrets via the environment
        "builders": [{"type": "null", "communicator": "ssh", "ssh_host": lab_guest.host, "ssh_port": lab_guest.port,
                      "ssh_username": lab_guest.username, "ssh_password": "{{user `password`}}",
                      "ssh_timeout": "30s", "ssh_file_transfer_method": transfer}],
        "provisioners": [{"type": "shell", "use_env_var_file": True, "inline": ["true"],
                          "environment_vars": ["PACKER_INSTALL_PASSWORD={{user `password`}}"]}],
    }
    (tmp_path / "build.json").write_text(json.dumps(template))
    env = {**os.environ, "LAB_GUEST_PASSWORD": guest_password, "HOME": str(tmp_path), "CHECKPOINT_DISABLE": "1"}
    proc = subprocess.run(["packer", "build", "-color=false", "build.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    varfiles = [lab_guest.local_path(p) for _, p in lab_guest.uploads if "/varfile_" in p]
    assert len(varfiles) == 1 and guest_password in varfiles[0].read_text()
    assert stat.S_IMODE(varfiles[0].stat().st_mode) == 0o600


def test_further_login_names_share_the_credentials(tmp_path):
    import paramiko

    from packer_assets_lab.guest import LabGuest

    with LabGuest(tmp_path / "g", "packer", password="pw-123456", also_accept=["Administrator"]) as guest:
        for user, ok in (("Administrator", True), ("packer", True), ("root", False)):
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect("127.0.0.1", guest.port, username=user, password="pw-123456", look_for_keys=False,
                               allow_agent=False, timeout=10)
                assert ok, user
            except paramiko.AuthenticationException:
                assert not ok, user
            finally:
                client.close()
