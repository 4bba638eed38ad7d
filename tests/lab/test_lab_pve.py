"""The lab's fake PVE node, driven over HTTPS with proxmoxer (certificate verification on)."""

import functools
import hashlib
import os
import socket
import ssl
import stat
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")
from cryptography import x509
from proxmoxer import AuthenticationError, ResourceException
from requests.exceptions import SSLError
from support.pve import pve_client

from packer_assets_lab.certs import cert_fingerprint, make_lab_pki

NODE = "pve1"
ISO = b"\x00" * 32768 + b"\x01CD001\x01" + os.urandom(70000)  # shaped like ISO9660; content is opaque to PVE


# ----------------------------------------------------------------------------- helpers

class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """A plain-HTTP file server on loopback: (directory it serves, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, "http://127.0.0.1:{0}".format(server.server_port)
    server.shutdown()
    server.server_close()


def status_code(call, *args, **kwargs):
    with pytest.raises(ResourceException) as caught:
        call(*args, **kwargs)
    return caught.value.status_code


def task(api, upid):
    """(status, log lines) of a finished task (time_scale 0: tasks end before the request returns)."""
    status = api.nodes(NODE).tasks(upid).status.get()
    assert status["status"] == "stopped"
    return status, [line["t"] for line in api.nodes(NODE).tasks(upid).log.get(limit=500)]


def create_vm(api, vmid, **config):
    return api.nodes(NODE).qemu.post(vmid=vmid, name="vm{0}".format(vmid), **config)


def volids(api, storage="local"):
    return {item["volid"]: item for item in api.nodes(NODE).storage(storage).content.get()}


@pytest.fixture
def builder(pve_root):
    """A user packer@pve with password, a role LabBuilder (create VMs) granted on /, and its login."""
    pve_root.access.users.post(userid="packer@pve", password="packer-pass-1", comment="lab")
    pve_root.access.roles.post(roleid="LabBuilder", privs="VM.Allocate,VM.Config.Options,VM.Audit")
    pve_root.access.acl.put(path="/", roles="LabBuilder", users="packer@pve")
    return "packer@pve"


def new_token(api, userid, tokenid, **options):
    answer = api.access.users(userid).token(tokenid).post(**options)
    assert answer["full-tokenid"] == "{0}!{1}".format(userid, tokenid)
    return answer


# ------------------------------------------------------------------------- TLS and PKI

def test_the_lab_signing_key_is_0600_whatever_the_umask_and_signs(tmp_path):
    from packer_assets_lab.certs import make_signing_key
    from packer_assets.evidence.signing import Signer, allowed_signer

    old = os.umask(0)  # a careless umask must not leave the key readable: Signer would refuse it
    try:
        made = make_signing_key(tmp_path / "signing")
    finally:
        os.umask(old)
    assert stat.S_IMODE(made.key_file.stat().st_mode) == 0o600
    signer = Signer(made.key_file, made.key_id)
    assert allowed_signer(made.allowed_signers, signer.public_key(), principal=made.key_id) == made.key_id


def test_pki_is_a_real_ca_chain(lab_pki, lab_pve):
    ca = x509.load_pem_x509_certificate(open(lab_pki.ca_file, "rb").read())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert stat.S_IMODE(os.stat(lab_pki.key_file).st_mode) == 0o600
    # Python verifies the served certificate against the CA alone, host name included.
    context = ssl.create_default_context(cafile=lab_pki.ca_file)
    with socket.create_connection((lab_pve.host, lab_pve.port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert cert_fingerprint(tls.getpeercert(binary_form=True)) == lab_pki.fingerprint_sha256


def test_unverified_ca_is_refused(lab_pve, tmp_path):
    other = make_lab_pki(tmp_path / "other")
    with pytest.raises(SSLError):
        pve_client(lab_pve, other.ca_file, user="root@pam", password=lab_pve.root_password)


# ------------------------------------------------------------------------ users, tokens

def test_user_and_token_log_in(pve_root, pve_login, builder, lab_pve):
    assert pve_login(builder, password="packer-pass-1").version.get()["version"] == lab_pve.version
    created = new_token(pve_root, builder, "ci", comment="pipeline")
    assert created["info"] == {"privsep": 1, "comment": "pipeline"}
    token = pve_login(created["full-tokenid"], secret=created["value"])
    assert token.version.get()["release"] == lab_pve.release_version
    assert pve_root.access.users(builder).token.get() == [
        {"tokenid": "ci", "privsep": 1, "expire": 0, "comment": "pipeline"}]
    users = {u["userid"]: u for u in pve_root.access.users.get(full=1)}
    assert users[builder]["tokens"] == [{"tokenid": "ci", "privsep": 1, "expire": 0, "comment": "pipeline"}]
    assert users[builder]["realm-type"] == "pve"


def test_wrong_password_and_disabled_user_cannot_log_in(pve_root, pve_login, builder):
    with pytest.raises(AuthenticationError):
        pve_login(builder, password="wrong-password")
    pve_root.access.users(builder).put(enable=0)
    with pytest.raises(AuthenticationError):
        pve_login(builder, password="packer-pass-1")


def test_deleted_token_gets_401(pve_root, pve_login, builder):
    created = new_token(pve_root, builder, "ci")
    token = pve_login(created["full-tokenid"], secret=created["value"])
    token.version.get()
    pve_root.access.users(builder).token("ci").delete()
    assert status_code(token.version.get) == 401
    assert status_code(pve_root.access.users(builder).token("ci").get) == 500


def test_token_already_exists(pve_root, builder):
    new_token(pve_root, builder, "ci")
    with pytest.raises(ResourceException) as caught:
        pve_root.access.users(builder).token("ci").post()
    assert caught.value.status_code == 400
    assert "Token already exists." in str(caught.value)


def test_schema_validation_still_applies(pve_root):
    with pytest.raises(ResourceException) as caught:
        pve_root.access.users.post(userid="invalid")
    assert caught.value.status_code == 400
    assert "does not look like a valid user name" in str(caught.value)
    assert status_code(pve_root.access.users.post, userid="short@pve", password="1234") == 400
    assert status_code(pve_root.access.acl.put, path="/", users="root@pam") == 400  # roles missing


# ------------------------------------------------------------------ ACLs and privsep

def test_acls_are_on_from_the_start(pve_root, pve_login):
    pve_root.access.users.post(userid="nobody@pve", password="nobody-pass")
    nobody = pve_login("nobody@pve", password="nobody-pass")
    assert status_code(create_vm, nobody, 150) == 403
    assert nobody.nodes(NODE).qemu.get() == []
    status, _ = task(pve_root, create_vm(pve_root, 150))
    assert status["exitstatus"] == "OK"
    assert [vm["vmid"] for vm in nobody.nodes(NODE).qemu.get()] == []


def test_privilege_separation(pve_root, pve_login, builder):
    user = pve_login(builder, password="packer-pass-1")
    status, _ = task(pve_root, create_vm(user, 200))
    assert status["exitstatus"] == "OK" and status["user"] == builder

    separated = new_token(pve_root, builder, "sep")
    token = pve_login(separated["full-tokenid"], secret=separated["value"])
    assert status_code(create_vm, token, 201) == 403

    full = new_token(pve_root, builder, "full", privsep=0)
    assert full["info"]["privsep"] == 0
    token_full = pve_login(full["full-tokenid"], secret=full["value"])
    assert task(pve_root, create_vm(token_full, 202))[0]["exitstatus"] == "OK"

    # Its own ACL lets the separated token act, but only within what its user holds.
    pve_root.access.acl.put(path="/vms/203", roles="PVEVMAdmin", tokens=separated["full-tokenid"])
    assert task(pve_root, create_vm(token, 203))[0]["exitstatus"] == "OK"
    assert status_code(token.nodes(NODE).qemu(203).config.put, memory=1024) == 403  # VM.Config.Memory: user lacks it


def test_role_change_applies_at_once(pve_root, pve_login, builder):
    user = pve_login(builder, password="packer-pass-1")
    pve_root.access.roles("LabBuilder").put(privs="VM.Audit")
    assert status_code(create_vm, user, 210) == 403
    pve_root.access.roles("LabBuilder").put(privs="VM.Allocate,VM.Config.Options", append=1)
    assert pve_root.access.roles("LabBuilder").get() == {"VM.Allocate": 1, "VM.Audit": 1, "VM.Config.Options": 1}
    assert task(pve_root, create_vm(user, 210))[0]["exitstatus"] == "OK"
    pve_root.access.acl.put(path="/", roles="LabBuilder", users=builder, delete=1)
    assert status_code(create_vm, user, 211) == 403


def test_permissions_of_a_separated_token_are_the_intersection(pve_root, pve_login, builder):
    created = new_token(pve_root, builder, "audit")
    pve_root.access.acl.put(path="/", roles="PVEAuditor", tokens=created["full-tokenid"])
    token = pve_login(created["full-tokenid"], secret=created["value"])
    user = pve_login(builder, password="packer-pass-1")

    assert token.access.permissions.get(path="/vms/100") == {"/vms/100": {"VM.Audit": 1}}
    assert token.access.permissions.get()["/"] == {"VM.Audit": 1}
    # The owner may ask about its token by name; the answer is the token's, not the user's.
    assert user.access.permissions.get(userid=created["full-tokenid"], path="/") == {"/": {"VM.Audit": 1}}
    assert user.access.permissions.get(path="/")["/"] == {"VM.Allocate": 1, "VM.Audit": 1, "VM.Config.Options": 1}
    # Someone else's privileges need Sys.Audit on /access.
    assert status_code(token.access.permissions.get, userid="root@pam") == 403
    # privsep=0: exactly the user's.
    pve_root.access.users(builder).token("audit").put(privsep=0)
    assert token.access.permissions.get(path="/")["/"] == {"VM.Allocate": 1, "VM.Audit": 1, "VM.Config.Options": 1}


def test_acl_listing_and_errors(pve_root, builder):
    assert {"path": "/", "type": "user", "ugid": builder, "roleid": "LabBuilder", "propagate": 1} \
        in pve_root.access.acl.get()
    with pytest.raises(ResourceException) as caught:
        pve_root.access.acl.put(path="/", roles="NoSuchRole", users=builder)
    assert caught.value.status_code == 500 and "role 'NoSuchRole' does not exist" in str(caught.value)
    assert status_code(pve_root.access.acl.put, path="/bogus", roles="PVEAuditor", users=builder) == 400
    assert status_code(pve_root.access.acl.put, path="/", roles="PVEAuditor", users="ghost@pve") == 500


def test_builtin_roles(pve_root):
    roles = {r["roleid"]: r for r in pve_root.access.roles.get()}
    for name in ("Administrator", "NoAccess", "PVEAdmin", "PVEAuditor", "PVEVMAdmin", "PVEDatastoreUser"):
        assert roles[name]["special"] == 1
    assert "Permissions.Modify" not in roles["PVEAdmin"]["privs"].split(",")
    assert pve_root.access.roles("PVEAuditor").get()["VM.Audit"] == 1
    assert status_code(pve_root.access.roles("PVEAdmin").put, privs="VM.Audit") == 500
    assert status_code(pve_root.access.roles.post, roleid="Broken", privs="VM.Fly") == 400
    assert status_code(pve_root.access.roles.post, roleid="pveMine") == 400


# -------------------------------------------------------------------- download and upload

def download(api, url, filename, **options):
    return api.nodes(NODE).storage("local")("download-url").post(url=url, filename=filename, content="iso",
                                                                  **options)


def test_download_url_stores_the_real_file(pve_root, lab_pve, mirror):
    root, base = mirror
    (root / "debian.iso").write_bytes(ISO)
    digest = hashlib.sha256(ISO).hexdigest()
    status, log = task(pve_root, download(pve_root, base + "/debian.iso", "debian.iso", checksum=digest,
                                          **{"checksum-algorithm": "sha256"}))
    assert status["exitstatus"] == "OK" and status["type"] == "download" and status["id"] == "debian.iso"
    assert "calculating checksum...OK, checksum verified" in log and log[-1] == "TASK OK"
    assert volids(pve_root)["local:iso/debian.iso"]["size"] == len(ISO)
    assert lab_pve.volume_file("local:iso/debian.iso").read_bytes() == ISO
    assert lab_pve.downloads == [{"url": base + "/debian.iso", "storage": "local", "content": "iso",
                                  "filename": "debian.iso", "size": len(ISO), "checksum": digest,
                                  "checksum-algorithm": "sha256", "error": None}]

    # PVE keeps a file whose checksum matches: nothing is fetched again.
    status, log = task(pve_root, download(pve_root, base + "/debian.iso", "debian.iso", checksum=digest.upper(),
                                          **{"checksum-algorithm": "sha256"}))
    assert status["exitstatus"] == "OK" and any("no need to download" in line for line in log)
    assert len(lab_pve.downloads) == 1
    # Without a checksum it refuses to overwrite.
    status, _ = task(pve_root, download(pve_root, base + "/debian.iso", "debian.iso"))
    assert status["exitstatus"] == "refusing to override existing file '/var/lib/vz/template/iso/debian.iso'"


def test_download_url_with_a_wrong_checksum_leaves_nothing(pve_root, lab_pve, mirror):
    root, base = mirror
    (root / "debian.iso").write_bytes(ISO)
    wrong = hashlib.sha512(b"something else").hexdigest()
    status, log = task(pve_root, download(pve_root, base + "/debian.iso", "debian.iso", checksum=wrong,
                                          **{"checksum-algorithm": "sha512"}))
    message = "checksum mismatch: got '{0}' != expect '{1}'".format(hashlib.sha512(ISO).hexdigest(), wrong)
    assert status["exitstatus"] == message
    assert log[-1] == "TASK ERROR: " + message
    assert "local:iso/debian.iso" not in volids(pve_root)
    assert lab_pve.downloads == [] and len(lab_pve.failed_downloads) == 1
    assert list((lab_pve.data_dir / "local" / "template" / "iso").iterdir()) == []


def test_download_url_errors(pve_root, lab_pve, mirror):
    _, base = mirror
    status, log = task(pve_root, download(pve_root, base + "/missing.iso", "missing.iso"))
    assert status["exitstatus"].startswith("download failed: command 'wget ")
    assert status["exitstatus"].endswith("failed: exit code 8") and "ERROR 404: File not found." in log
    status, _ = task(pve_root, download(pve_root, "http://127.0.0.1:9/x.iso", "x.iso"))
    assert status["exitstatus"].endswith("failed: exit code 4")
    assert "local:iso/missing.iso" not in volids(pve_root) and lab_pve.downloads == []
    with pytest.raises(ResourceException) as caught:
        download(pve_root, base + "/debian.iso", "debian.txt")
    assert caught.value.status_code == 400 and "wrong file extension" in str(caught.value)
    assert status_code(download, pve_root, "ftp://example.org/x.iso", "x.iso") == 400  # schema: https?://
    assert status_code(download, pve_root, base + "/x.iso", "x.iso", checksum="ab") == 400  # needs the algorithm


def test_download_url_needs_pve9_privileges(pve_root, pve_login, lab_pve, mirror):
    root, base = mirror
    (root / "a.iso").write_bytes(b"a" * 1000)
    pve_root.access.users.post(userid="fetch@pve", password="fetch-pass-1")
    pve_root.access.roles.post(roleid="Fetch", privs="Datastore.AllocateTemplate")
    pve_root.access.acl.put(path="/storage/local", roles="Fetch", users="fetch@pve")
    fetch = pve_login("fetch@pve", password="fetch-pass-1")
    assert status_code(download, fetch, base + "/a.iso", "a.iso") == 403
    pve_root.access.roles.post(roleid="Net", privs="Sys.AccessNetwork")
    pve_root.access.acl.put(path="/nodes/" + NODE, roles="Net", users="fetch@pve")
    assert task(pve_root, download(fetch, base + "/a.iso", "a.iso"))[0]["exitstatus"] == "OK"
    assert lab_pve.volume_file("local:iso/a.iso").stat().st_size == 1000


def test_upload_keeps_the_bytes_and_checks_the_checksum(pve_root, lab_pve, tmp_path):
    path = tmp_path / "seed.iso"
    path.write_bytes(ISO)
    with open(path, "rb") as fh:
        upid = pve_root.nodes(NODE).storage("local").upload.post(
            content="iso", filename=fh, checksum=hashlib.md5(ISO).hexdigest(), **{"checksum-algorithm": "md5"})
    assert task(pve_root, upid)[0]["exitstatus"] == "OK"
    assert volids(pve_root)["local:iso/seed.iso"]["size"] == len(ISO)
    assert lab_pve.volume_file("local:iso/seed.iso").read_bytes() == ISO

    path.write_bytes(b"other bytes")
    with open(path, "rb") as fh:
        upid = pve_root.nodes(NODE).storage("local").upload.post(
            content="iso", filename=fh, checksum="0" * 32, **{"checksum-algorithm": "md5"})
    status, _ = task(pve_root, upid)
    assert status["exitstatus"].startswith("checksum mismatch: got '")
    assert lab_pve.volume_file("local:iso/seed.iso").read_bytes() == ISO  # the earlier upload is untouched


# ----------------------------------------------------------------------- guest agent

def test_guest_agent_answers_for_a_started_vm_with_agent_enabled(pve_root, lab_pve):
    task(pve_root, create_vm(pve_root, 300, agent="enabled=1,fstrim_cloned_disks=1", net0="virtio,bridge=vmbr0"))
    task(pve_root, create_vm(pve_root, 301))
    agent = pve_root.nodes(NODE).qemu(300).agent
    assert status_code(agent("network-get-interfaces").get) == 500  # not started yet
    for vmid in (300, 301):
        task(pve_root, pve_root.nodes(NODE).qemu(vmid).status.start.post())

    lab_pve.lab_guest_ip = "127.0.0.5"
    interfaces = agent("network-get-interfaces").get()["result"]
    eth0 = next(i for i in interfaces if i["name"] == "eth0")
    assert eth0["ip-addresses"][0]["ip-address"] == "127.0.0.5"
    mac = pve_root.nodes(NODE).qemu(300).config.get()["net0"].split(",")[0].split("=")[1]
    assert eth0["hardware-address"] == mac.lower()
    lab_pve.lab_default_os = {"id": "lab", "name": "Lab Linux", "version-id": "1"}
    assert agent("get-osinfo").get()["result"]["name"] == "Lab Linux"

    with pytest.raises(ResourceException) as caught:
        pve_root.nodes(NODE).qemu(301).agent("network-get-interfaces").get()
    assert caught.value.status_code == 500 and "QEMU guest agent is not running" in str(caught.value)

    task(pve_root, pve_root.nodes(NODE).qemu(300).status.stop.post())
    assert status_code(agent("ping").post) == 500


def test_network_lists_the_bridge(pve_root):
    bridges = pve_root.nodes(NODE).network.get(type="bridge")
    assert [(b["iface"], b["active"]) for b in bridges] == [("vmbr0", 1)]


# ------------------------------------------------------------------ more of PVE's model

def test_a_root_token_is_not_root(pve_root, pve_login):
    separated = new_token(pve_root, "root@pam", "sep")
    token = pve_login(separated["full-tokenid"], secret=separated["value"])
    assert status_code(create_vm, token, 400) == 403
    assert token.access.permissions.get(path="/") == {"/": {}}
    full = new_token(pve_root, "root@pam", "full", privsep=0)
    token_full = pve_login(full["full-tokenid"], secret=full["value"])
    assert task(pve_root, create_vm(token_full, 400))[0]["exitstatus"] == "OK"


def test_deleting_a_user_drops_its_tokens_acls_and_sessions(pve_root, pve_login, builder, lab_pve):
    created = new_token(pve_root, builder, "ci")
    pve_root.access.acl.put(path="/vms", roles="PVEAuditor", tokens=created["full-tokenid"])
    user = pve_login(builder, password="packer-pass-1")
    token = pve_login(created["full-tokenid"], secret=created["value"])
    pve_root.access.users(builder).delete()
    assert status_code(user.version.get) == 401
    assert status_code(token.version.get) == 401
    assert builder not in {u["userid"] for u in pve_root.access.users.get()}
    assert all(a["ugid"] not in (builder, created["full-tokenid"]) for a in pve_root.access.acl.get())
    assert created["full-tokenid"] not in lab_pve.apitokens


def test_python_setup_api(lab_pve, pve_login):
    lab_pve.add_user("ops@pve", "ops-pass-12", comment="set up without HTTP")
    answer = lab_pve.add_token("ops@pve", "auto", privsep=0)
    lab_pve.acl_assign("/", "PVEAuditor", "ops@pve")
    token = pve_login(answer["full-tokenid"], secret=answer["value"])
    assert "Sys.Audit" in token.access.permissions.get(path="/nodes")["/nodes"]
    lab_pve.grant("ops@pve", "/vms/500", "VM.Allocate", "VM.Config.Options")  # fakepve's shortcut still works
    assert task(pve_login("ops@pve", password="ops-pass-12"), create_vm(token, 500))[0]["exitstatus"] == "OK"


def test_download_runs_in_the_background(pve_root, lab_pve, mirror):
    root, base = mirror
    (root / "slow.iso").write_bytes(ISO)
    lab_pve.time_scale = 0.001  # tasks now run after the request returned, as on a real node
    upid = download(pve_root, base + "/slow.iso", "slow.iso")
    deadline = time.monotonic() + 120  # bounds a hang only
    while pve_root.nodes(NODE).tasks(upid).status.get()["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert pve_root.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "OK"
    assert lab_pve.volume_file("local:iso/slow.iso").read_bytes() == ISO
