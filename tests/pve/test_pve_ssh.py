"""The SSH path of proxmox_env against a real sshd whose pveum/pvesh act on the lab's PVE."""

import itertools
import shlex
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paramiko
import pytest

from packer_assets.evidence.chain import new_chain_id
from packer_assets.config.envfile import read_env_file
from packer_assets.evidence.layout import Layout
from packer_assets.pve.bootstrap import BootstrapConfig, build_access
from packer_assets.pve.client import Endpoint, PveAccessError
from packer_assets.pve.init_env import CA_FILE, AdminLogin, run_init
from packer_assets.pve.ssh import (
    SshBootstrap,
    SshBootstrapError,
    parse_exports,
    remote_command,
    script_bytes,
)

# The values that differ between two bootstraps of the same node, and why: each run that makes a token
# gets its own secret (and everything built from it); PROXMOX_CA_FILE names the CA each path trusts:
# the API path the file it was given, the SSH path the copy it fetched from the node (same certificate).
DIFFERENT = {"PROXMOX_TOKEN_SECRET", "PROXMOX_TOKEN", "PROXMOX_VE_API_TOKEN", "PM_API_TOKEN_SECRET",
             "PROXMOX_CA_FILE"}
FIRST_RUN_CHANGES = ["created role PackerBuilder", "created user automation@pve",
                     "granted PackerBuilder on / to user automation@pve", "created token automation@pve!packer",
                     "granted PackerBuilder on / to token automation@pve!packer"]

_seconds = itertools.count()


@pytest.fixture
def layout(tmp_path):
    return Layout(tmp_path / "project")


@pytest.fixture
def endpoint(lab_pve):
    """The API as the SSH path knows it at first: a URL, no CA (it fetches the node's)."""
    return Endpoint(lab_pve.url)


@pytest.fixture
def commands(monkeypatch):
    """Every command line the client sends to sshd."""
    seen = []
    original = paramiko.SSHClient.exec_command

    def record(self, command, *args, **kwargs):
        seen.append(command)
        return original(self, command, *args, **kwargs)
    monkeypatch.setattr(paramiko.SSHClient, "exec_command", record)
    return seen


@pytest.fixture(autouse=True)
def no_leftover_scripts(commands):
    """The uploaded script and its folder are removed, whatever happened (sshd runs on this machine, so we
    can look; only at this test's folders, named in its command lines: other test runs may be under way)."""
    yield
    for command in commands:
        script = Path(shlex.split(command)[-1])
        assert script.parent.name.startswith("packer-assets-init-")
        assert not script.parent.exists(), f"{script.parent} left behind"


def init(layout, endpoint, how, **config):
    when = datetime(2026, 11, 25, tzinfo=UTC) + timedelta(seconds=next(_seconds))
    return run_init(layout, endpoint, how, BootstrapConfig(**config), new_chain_id("init", when))


def ssh(lab_sshd, **target):
    return SshBootstrap(lab_sshd.target(**target))


def token_calls(lab_sshd):
    return [c["argv"] for c in lab_sshd.pvecli_calls() if c["argv"][:2] == ["user", "token"]
            and c["argv"][2] in ("add", "remove", "delete")]


# ------------------------------------------------------------------ same result as the API path


def test_ssh_path_gives_the_api_paths_env_file(tmp_path, layout, endpoint, lab_sshd, lab_pve, lab_pki, pve_root):
    by_ssh = init(layout, endpoint, ssh(lab_sshd))
    assert by_ssh.result.token_action == "created"
    assert by_ssh.result.changes == FIRST_RUN_CHANGES  # the API path's wording, change for change
    assert by_ssh.proof["bootstrap"] == "ssh"
    for path in (layout.env_file, layout.secrets_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ssh_values = read_env_file(layout.env_file)

    api_layout = Layout(tmp_path / "api-project")
    by_api = init(api_layout, Endpoint(lab_pve.url, ca_file=lab_pki.ca_file), AdminLogin("root@pam",
                                                                                          lab_pve.root_password))
    assert by_api.result.token_action == "replaced"  # the SSH run's token, whose secret this layout lacks
    api_values = read_env_file(api_layout.env_file)

    assert list(ssh_values) == list(api_values)
    assert {k: v for k, v in ssh_values.items() if k not in DIFFERENT} == \
           {k: v for k, v in api_values.items() if k not in DIFFERENT}
    assert Path(ssh_values["PROXMOX_CA_FILE"]).read_bytes() == Path(api_values["PROXMOX_CA_FILE"]).read_bytes()
    assert ssh_values["PROXMOX_NODE_IP"] == "192.0.2.11"  # from /cluster/status, as the API path reads it
    acl = {(a["path"], a["roleid"], a["type"], a["ugid"]) for a in pve_root.access.acl.get()}
    assert {("/", "PackerBuilder", "user", "automation@pve"), ("/", "PackerBuilder", "token",
                                                               "automation@pve!packer")} <= acl


def test_second_ssh_run_reuses_the_secret(layout, endpoint, lab_sshd, lab_pve, commands):
    first = init(layout, endpoint, ssh(lab_sshd)).result
    tokens_before = dict(lab_pve.apitokens)
    calls_before = len(token_calls(lab_sshd))
    second = init(layout, endpoint, ssh(lab_sshd)).result
    assert second.token_action == "reused"
    assert second.token_secret == first.token_secret
    assert second.changes == []
    assert lab_pve.apitokens == tokens_before
    assert len(token_calls(lab_sshd)) == calls_before  # the token was not touched
    assert "SKIP_TOKEN_GEN=0" in commands[0] and "SKIP_TOKEN_GEN=1" in commands[1]
    assert read_env_file(layout.env_file)["PROXMOX_TOKEN_SECRET"] == first.token_secret


def test_rotation_only_when_asked_and_unknown_secret_replaced(layout, endpoint, lab_sshd):
    first = init(layout, endpoint, ssh(lab_sshd)).result
    rotated = init(layout, endpoint, ssh(lab_sshd), rotate=True).result
    assert rotated.token_action == "rotated" and rotated.token_secret != first.token_secret
    values = read_env_file(layout.env_file)
    with pytest.raises(PveAccessError, match="authentication failed"):
        build_access({**values, "PROXMOX_TOKEN_SECRET": first.token_secret}, "x").connect()
    build_access(values, "x").connect()
    layout.secrets_file.unlink()
    assert init(layout, endpoint, ssh(lab_sshd)).result.token_action == "replaced"


def test_fetched_ca_makes_later_api_calls_verify_tls(layout, endpoint, lab_sshd, lab_pki):
    outcome = init(layout, endpoint, ssh(lab_sshd))
    values = read_env_file(layout.env_file)
    ca_file = (layout.output_root / CA_FILE).absolute()
    assert values["PROXMOX_CA_FILE"] == str(ca_file)
    assert ca_file.read_bytes() == Path(lab_pki.ca_file).read_bytes()
    assert outcome.proof["tls"] == "ca_file"
    api = build_access(values, str(layout.env_file)).connect()  # verifies the lab's certificate with it
    assert api.nodes.get()[0]["node"] == "pve1"
    # without that CA the same call fails: verification is on, and the fetched CA is what satisfies it
    with pytest.raises(PveAccessError, match="TLS verification failed"):
        build_access({**values, "PROXMOX_CA_FILE": ""}, "x").connect()


def test_configured_trust_is_kept(layout, lab_pve, lab_sshd, lab_pki):
    pinned = Endpoint(lab_pve.url, tls_fingerprint=lab_pki.fingerprint_sha256)
    init(layout, pinned, ssh(lab_sshd))
    values = read_env_file(layout.env_file)
    assert values["PROXMOX_TLS_FINGERPRINT"] == lab_pki.fingerprint_sha256
    assert "PROXMOX_CA_FILE" not in values
    assert (layout.output_root / CA_FILE).exists()  # fetched and kept all the same


# ------------------------------------------------------------------ host keys


def test_unknown_host_key_refused_unless_trust_on_first_use(tmp_path, layout, endpoint, lab_sshd, lab_pve):
    known_hosts = tmp_path / "fresh" / "known_hosts"
    with pytest.raises(SshBootstrapError) as err:
        init(layout, endpoint, ssh(lab_sshd, known_hosts=str(known_hosts)))
    host_fp = _fingerprint(lab_sshd.host_key)
    assert f"unknown host key ssh-ed25519 {host_fp}" in str(err.value)
    assert f"root@127.0.0.1:{lab_sshd.port}: host key check" in str(err.value)
    assert not known_hosts.exists()
    assert lab_sshd.pvecli_calls() == [] and not layout.env_file.exists()

    outcome = init(layout, endpoint, ssh(lab_sshd, known_hosts=str(known_hosts), trust_on_first_use=True))
    assert known_hosts.read_text() == lab_sshd.known_hosts_line()
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    assert f"trust on first use: recorded host key ssh-ed25519 {host_fp}" in outcome.log_file.read_text()
    # from now on the key is known: no trust on first use needed
    assert init(layout, endpoint, ssh(lab_sshd, known_hosts=str(known_hosts))).result.token_action == "reused"


@pytest.mark.parametrize("tofu", [False, True])
def test_changed_host_key_is_refused(tofu, tmp_path, layout, endpoint, lab_sshd, ssh_keys):
    known_hosts = tmp_path / "known_hosts"
    kind, blob = ssh_keys["other_host"].with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{lab_sshd.port} {kind} {blob}\n")
    before = known_hosts.read_text()
    with pytest.raises(SshBootstrapError) as err:
        init(layout, endpoint, ssh(lab_sshd, known_hosts=str(known_hosts), trust_on_first_use=tofu))
    text = str(err.value)
    assert "host key CHANGED" in text and f"[127.0.0.1]:{lab_sshd.port}" in text
    assert _fingerprint(lab_sshd.host_key) in text and _fingerprint(ssh_keys["other_host"]) in text
    assert known_hosts.read_text() == before
    assert lab_sshd.pvecli_calls() == []


def _fingerprint(private_key: Path) -> str:
    import base64
    import hashlib

    blob = base64.b64decode(private_key.with_suffix(".pub").read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("login", ["wrong key", "password"])
def test_refused_login_is_an_authentication_error(login, layout, endpoint, lab_sshd, ssh_keys):
    password = "not-root's-password-4711"
    target = {"key_file": str(ssh_keys["other_host"])} if login == "wrong key" else \
        {"key_file": None, "password": password}
    with pytest.raises(SshBootstrapError) as err:
        init(layout, endpoint, ssh(lab_sshd, **target))
    how = "key " if login == "wrong key" else "password)"
    assert f"root@127.0.0.1:{lab_sshd.port}: authentication failed ({how}" in str(err.value)
    assert password not in str(err.value)
    assert password not in next((layout.output_root / "output/logs/packer/init").glob("*/init-packer.log")).read_text()


def test_missing_pveum_gives_a_clear_error(layout, endpoint, lab_sshd):
    (lab_sshd.bin_dir / "pveum").unlink()
    with pytest.raises(SshBootstrapError) as err:
        init(layout, endpoint, ssh(lab_sshd))
    text = str(err.value)
    assert text.startswith(f"root@127.0.0.1:{lab_sshd.port}: init-packer-remote.sh: pveum/pvesh not found: "
                           "is this a Proxmox VE node?")
    assert "pveum not found on PATH" in text and "step: check tools" in text
    assert not layout.env_file.exists()
    log = next((layout.output_root / "output/logs/packer/init").glob("*/init-packer.log")).read_text()
    assert "[error] SshBootstrapError: " in log


def test_bad_setting_changes_nothing(layout, endpoint, lab_sshd, pve_root):
    with pytest.raises(SshBootstrapError) as err:
        init(layout, endpoint, ssh(lab_sshd), vm_storage="fast-nvme")
    # the API path's wording for the same mistake
    assert "configured VM storage (content images) on node pve1 'fast-nvme' does not exist (usable: local-lvm)" \
           in str(err.value)
    assert "(exit 4)" in str(err.value)
    assert "PackerBuilder" not in [r["roleid"] for r in pve_root.access.roles.get()]
    assert [c for c in lab_sshd.pvecli_calls() if c["prog"] == "pveum"] == []


def test_failure_after_the_token_was_made_keeps_its_secret(layout, endpoint, lab_sshd, lab_pve):
    init(layout, endpoint, ssh(lab_sshd))
    env_before = layout.env_file.read_bytes()
    layout.secrets_file.unlink()  # the token gets replaced, and its ACL granted again
    lab_pve.fail("PUT", "/access/acl", 500, "cluster filesystem not writable", times=1)
    with pytest.raises(SshBootstrapError) as err:
        init(layout, endpoint, ssh(lab_sshd))
    text = str(err.value)
    assert "failed (exit 5)" in text and "ACL of token automation@pve!packer" in text
    assert "cluster filesystem not writable" in text
    saved = read_env_file(layout.secrets_file)["PROXMOX_TOKEN_SECRET"]
    assert saved not in text
    assert layout.env_file.read_bytes() == env_before  # a failed init leaves the env file alone
    again = init(layout, endpoint, ssh(lab_sshd)).result
    assert again.token_action == "reused" and again.token_secret == saved
    assert again.changes == ["granted PackerBuilder on / to token automation@pve!packer"]


def test_no_secret_in_logs_errors_command_lines_or_sshd_log(layout, endpoint, lab_sshd, lab_pve, commands, capsys):
    first = init(layout, endpoint, ssh(lab_sshd)).result.token_secret
    rotated = init(layout, endpoint, ssh(lab_sshd), rotate=True).result.token_secret
    layout.secrets_file.unlink()
    lab_pve.fail("PUT", "/access/acl", 500, "boom", times=1)
    with pytest.raises(SshBootstrapError) as err:
        init(layout, endpoint, ssh(lab_sshd))
    failed = read_env_file(layout.secrets_file)["PROXMOX_TOKEN_SECRET"]
    secrets = (first, rotated, failed, lab_pve.root_password)
    places = {"exception": str(err.value), "command lines": "\n".join(commands),
              "sshd log": lab_sshd.log_file.read_text(errors="replace"),
              "node command lines": lab_sshd.pvecli_log.read_text(),
              "output": "".join(capsys.readouterr())}
    for path in layout.output_root.rglob("*"):
        if path.is_file() and path not in (layout.env_file, layout.secrets_file):
            places[str(path)] = path.read_text(errors="replace")
    for where, text in places.items():
        for value in secrets:
            assert value not in text, f"a secret in {where}"
    assert len(commands) == 3 and "user token add" not in lab_sshd.log_file.read_text()


# ------------------------------------------------------------------ protocol pieces


def test_export_lines_are_parsed_strictly():
    values, changes, other = parse_exports("hello\nEXPORT:NODE=pve1\nEXPORT:CHANGE=a\nEXPORT:CHANGE=b\n"
                                           "EXPORT:CA_PEM_B64=bGluZTEKbGluZTIK\nEXPORT:lower=x\n")
    assert values == {"NODE": "pve1", "CA_PEM": "line1\nline2\n"}
    assert changes == ["a", "b"] and other == ["hello", "EXPORT:lower=x"]
    with pytest.raises(ValueError, match="twice"):
        parse_exports("EXPORT:NODE=a\nEXPORT:NODE=b\n")


def test_remote_command_quotes_every_value():
    env = {"PA_USER": "a b@pve", "PA_NODE": "x;rm -rf /", "SKIP_TOKEN_GEN": "1"}
    words = shlex.split(remote_command(env, "/tmp/p/init-packer-remote.sh"))
    assert words == ["env", "PA_USER=a b@pve", "PA_NODE=x;rm -rf /", "SKIP_TOKEN_GEN=1", "bash",
                     "/tmp/p/init-packer-remote.sh"]


def test_script_is_package_data():
    text = script_bytes().decode()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
