"""proxmox_env's core against the lab over HTTPS: bootstrap, reuse, rotation, env files, failures."""

import itertools
import stat
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")

from support import REPO

from packer_assets.evidence.chain import new_chain_id
from packer_assets.config.envfile import read_env_file, write_env_file
from packer_assets.evidence.layout import Layout, latest
from packer_assets.pve.bootstrap import (
    BootstrapConfig,
    BootstrapError,
    build_access,
    missing_privileges,
    needed_grants,
    required_privileges,
)
from packer_assets.pve.client import Endpoint, PveAccessError
from packer_assets.pve.init_env import AdminLogin, run_init


@pytest.fixture
def layout(tmp_path):
    return Layout(tmp_path / "project")


@pytest.fixture
def endpoint(lab_pve, lab_pki):
    return Endpoint(lab_pve.url, ca_file=str(lab_pki.ca_file))


@pytest.fixture
def admin(lab_pve):
    return AdminLogin("root@pam", lab_pve.root_password)


_seconds = itertools.count()


def init(layout, endpoint, admin, **config):
    # one chain ID per run: runs a second apart, as real ones are (two in one second would share a chain ID)
    when = datetime(2026, 11, 25, tzinfo=UTC) + timedelta(seconds=next(_seconds))
    return run_init(layout, endpoint, admin, BootstrapConfig(**config), new_chain_id("init", when))


def tokens_on_server(pve_root, user="automation@pve"):
    return [t["tokenid"] for t in pve_root.access.users(user).token.get()]


def test_first_run_creates_everything_and_writes_both_env_files(layout, endpoint, admin, pve_root):
    outcome = init(layout, endpoint, admin)
    result = outcome.result
    assert result.token_action == "created"
    assert "PackerBuilder" in [r["roleid"] for r in pve_root.access.roles.get()]
    assert "automation@pve" in [u["userid"] for u in pve_root.access.users.get()]
    acl = {(a["path"], a["roleid"], a["type"], a["ugid"]) for a in pve_root.access.acl.get()}
    assert ("/", "PackerBuilder", "user", "automation@pve") in acl
    assert ("/", "PackerBuilder", "token", "automation@pve!packer") in acl
    assert tokens_on_server(pve_root) == ["packer"]
    for path in (layout.env_file, layout.secrets_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    values = read_env_file(layout.env_file)
    assert values["PROXMOX_TOKEN_SECRET"] == result.token_secret == read_env_file(layout.secrets_file)[
        "PROXMOX_TOKEN_SECRET"]
    assert values["PROXMOX_VE_ENDPOINT"] == endpoint.base + "/"
    assert values["PM_API_URL"] == values["PROXMOX_URL"] == endpoint.base + "/api2/json"
    assert values["PROXMOX_VE_API_TOKEN"] == f"automation@pve!packer={result.token_secret}"
    assert (values["PROXMOX_NODE"], values["PROXMOX_VM_STORAGE"], values["PROXMOX_ISO_STORAGE"],
            values["PROXMOX_BRIDGE"]) == ("pve1", "local-lvm", "local", "vmbr0")
    # the written token works, and holds every needed privilege
    access = build_access(values, str(layout.env_file))
    api = access.connect()
    assert missing_privileges(api, needed_grants(required_privileges("9.0"), access.discovery)) == []
    # evidence: log and proof with latest links
    assert latest(outcome.log_file.parent.parent) == outcome.log_file.parent.resolve()
    assert sorted(p.name for p in outcome.proof_dir.iterdir()) == ["README.md", "init-packer.log", "manifest.json", "proof.json"]


def test_second_run_reuses_the_secret_without_a_new_token(layout, endpoint, admin, lab_pve):
    first = init(layout, endpoint, admin).result
    tokens_before = dict(lab_pve.apitokens)
    second = init(layout, endpoint, admin).result
    assert second.token_action == "reused"
    assert second.token_secret == first.token_secret
    assert second.changes == []
    assert lab_pve.apitokens == tokens_before


def test_token_deleted_on_the_server_is_recreated(layout, endpoint, admin, pve_root):
    first = init(layout, endpoint, admin).result
    pve_root.access.users("automation@pve").token("packer").delete()
    second = init(layout, endpoint, admin).result
    assert second.token_action == "created"
    assert second.token_secret != first.token_secret
    assert read_env_file(layout.secrets_file)["PROXMOX_TOKEN_SECRET"] == second.token_secret


def test_server_token_with_unknown_secret_is_replaced(layout, endpoint, admin):
    init(layout, endpoint, admin)
    layout.secrets_file.unlink()
    assert init(layout, endpoint, admin).result.token_action == "replaced"


def test_rotation_only_when_asked(layout, endpoint, admin):
    first = init(layout, endpoint, admin).result
    rotated = init(layout, endpoint, admin, rotate=True).result
    assert rotated.token_action == "rotated"
    assert rotated.token_secret != first.token_secret
    # the old secret no longer logs in, the new one does
    with pytest.raises(PveAccessError, match="authentication failed"):
        build_access({**read_env_file(layout.env_file), "PROXMOX_TOKEN_SECRET": first.token_secret}, "x").connect()
    build_access(read_env_file(layout.env_file), "x").connect()


def test_privilege_removed_on_the_server_is_named_by_the_check(layout, endpoint, admin, pve_root):
    init(layout, endpoint, admin)
    role = pve_root.access.roles("PackerBuilder").get()
    privs = [p for p in _privs(role) if p != "VM.Allocate"]
    pve_root.access.roles("PackerBuilder").put(privs=",".join(privs))
    access = build_access(read_env_file(layout.env_file), "env")
    missing = missing_privileges(access.connect(), needed_grants(required_privileges("9.0"), access.discovery))
    assert missing == [("/vms", "VM.Allocate")]
    # and the next bootstrap repairs the role
    assert any("set role PackerBuilder" in c for c in init(layout, endpoint, admin).result.changes)


def _privs(role):
    privs = role.get("privs", role)
    return [p for p, on in privs.items() if on] if isinstance(privs, dict) else str(privs).split(",")


def test_bash_reads_back_every_value(layout, endpoint, admin):
    init(layout, endpoint, admin)
    values = read_env_file(layout.env_file)
    script = 'source "$1"; for n in ' + " ".join(values) + '; do printf "%s\\0" "${!n}"; done'
    out = subprocess.run(["bash", "-c", script, "bash", str(layout.env_file)], capture_output=True, check=True)
    assert out.stdout.decode().split("\0")[:-1] == list(values.values())


def _snapshot(layout):
    return {p: p.read_bytes() for p in (layout.env_file, layout.secrets_file) if p.exists()}


@pytest.mark.parametrize("case", ["wrong_password", "unreachable", "tls_mismatch", "missing_storage"])
def test_failures_give_one_clear_error_and_leave_env_files_alone(case, layout, endpoint, admin, lab_pve, tmp_path,
                                                                  lab_pki):
    init(layout, endpoint, admin)
    before = _snapshot(layout)
    config = {}
    if case == "wrong_password":
        admin, message = AdminLogin("root@pam", "not-the-password"), "authentication failed for root@pam"
    elif case == "unreachable":
        endpoint, message = Endpoint("https://127.0.0.1:9", ca_file=endpoint.ca_file, timeout=3), "API unreachable"
    elif case == "tls_mismatch":
        from packer_assets_lab.certs import make_lab_pki
        other = make_lab_pki(tmp_path / "other-pki")
        endpoint, message = Endpoint(endpoint.url, ca_file=str(other.ca_file)), "TLS verification failed"
    else:
        config, message = {"vm_storage": "fast-nvme"}, "configured VM storage (content images) on node pve1 " \
                                                       "'fast-nvme' does not exist"
    with pytest.raises((PveAccessError, BootstrapError)) as err:
        init(layout, endpoint, admin, **config)
    assert message in str(err.value)
    assert lab_pve.root_password not in str(err.value)
    assert _snapshot(layout) == before
    proofs = layout.output_root / "docs/proof/platform/packer-builds/init"
    assert len([p for p in proofs.iterdir() if p.name != "latest"]) == 1  # only the first run's


def test_fingerprint_pinning(layout, endpoint, admin, lab_pki):
    good = Endpoint(endpoint.url, tls_fingerprint=lab_pki.fingerprint_sha256)
    assert init(layout, good, admin).result.token_action == "created"
    bad = Endpoint(endpoint.url, tls_fingerprint=":".join(["AA"] * 32))
    with pytest.raises(PveAccessError, match="does not match the pinned"):
        init(layout, bad, admin)


def test_secrets_never_reach_files_logs_or_output(layout, endpoint, admin, capsys, lab_pve):
    outcome = init(layout, endpoint, admin)
    secret = outcome.result.token_secret
    rotated = init(layout, endpoint, admin, rotate=True).result.token_secret
    allowed = {layout.env_file, layout.secrets_file}
    for path in layout.output_root.rglob("*"):
        if path.is_file() and path not in allowed:
            text = path.read_text(errors="replace")
            for value in (secret, rotated, lab_pve.root_password):
                assert value not in text, f"secret found in {path}"
    captured = capsys.readouterr()
    for value in (secret, rotated, lab_pve.root_password):
        assert value not in captured.out + captured.err
    assert "***" not in read_env_file(layout.env_file)["PROXMOX_TOKEN_SECRET"]


def test_existing_toolkit_secrets_file_keeps_other_values(layout, endpoint, admin):
    write_env_file(layout.secrets_file, {"OTHER_SECRET": "keep-me"})
    init(layout, endpoint, admin)
    assert read_env_file(layout.secrets_file)["OTHER_SECRET"] == "keep-me"


def test_pinned_session_refuses_another_certificate(endpoint, lab_pve, lab_pki):
    from packer_assets.pve.client import connect

    api = connect(Endpoint(endpoint.url, tls_fingerprint=lab_pki.fingerprint_sha256), "root@pam",
                  password=lab_pve.root_password)
    api._store["session"].adapters[endpoint.base].fingerprint = "00" * 32  # as if the server's cert changed
    api._store["session"].close()
    with pytest.raises(Exception, match="[Ff]ingerprint"):
        api.version.get()


def test_build_password_for_an_old_packer_is_set_kept_and_never_logged(layout, endpoint, admin, lab_pve):
    """Packer < 1.7.1 has no token login: the automation user gets a password, kept 0600 beside the token,
    proven by logging in and reused on the next init; a wrong one is replaced."""
    from packer_assets.pve.bootstrap import logs_in

    first = init(layout, endpoint, admin, build_password=True)
    kept = read_env_file(layout.secrets_file)
    password = kept["PROXMOX_BUILD_PASSWORD"]
    assert kept["PROXMOX_BUILD_USER"] == "automation@pve" and len(password) >= 24
    assert stat.S_IMODE(layout.secrets_file.stat().st_mode) == 0o600
    assert first.result.build_password_action == "set" and first.proof["build_login"] == "password as automation@pve"
    assert logs_in(endpoint, "automation@pve", password=password)
    assert password not in first.log_file.read_text() and password not in str(first.proof)

    again = init(layout, endpoint, admin, build_password=True)
    assert again.result.build_password_action == "reused"
    assert read_env_file(layout.secrets_file)["PROXMOX_BUILD_PASSWORD"] == password

    write_env_file(layout.secrets_file, {**read_env_file(layout.secrets_file), "PROXMOX_BUILD_PASSWORD": "wrong-one-1"})
    replaced = init(layout, endpoint, admin, build_password=True)
    assert replaced.result.build_password_action == "set"
    assert logs_in(endpoint, "automation@pve", password=read_env_file(layout.secrets_file)["PROXMOX_BUILD_PASSWORD"])


def test_build_password_needs_a_password_login_for_the_bootstrap(layout, endpoint, admin, pve_root):
    made = pve_root.access.users("root@pam").token("admin").post(privsep=0)
    by_token = AdminLogin("root@pam", token_name="admin", token_secret=made["value"])
    with pytest.raises(BootstrapError, match="needs a password login for the bootstrap: PVE refuses it to API tokens"):
        init(layout, endpoint, by_token, build_password=True)


def test_the_init_proof_validates_against_its_committed_schema(layout, endpoint, admin):
    import json

    import jsonschema

    outcome = init(layout, endpoint, admin)
    schema = json.loads((REPO / "docs/schema/init-proof.schema.json").read_text())
    on_disk = json.loads((outcome.proof_dir / "proof.json").read_text())
    jsonschema.validate(on_disk, schema)
    assert on_disk == outcome.proof and on_disk["kind"] == "init"
    assert "| Packer login | `token` |" in (outcome.proof_dir / "README.md").read_text()
