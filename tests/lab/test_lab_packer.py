"""Debian's packer 1.6.6 builds a template in the lab, and the PVE behaviour it relies on (PackerCompat).

The build runs the real /usr/bin/packer against a LabPve served over verified TLS (SSL_CERT_FILE is
the lab CA), with the SSH communicator pointed at a LabGuest. Credentials reach packer through its
environment only.
"""

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")
from proxmoxer.core import ResourceException
from support import REPO
from support.packer import host_ipv4

from packer_assets_lab.certs import make_lab_pki
from packer_assets_lab.proctree import cmdline, descendants
from packer_assets_lab.pve.packer_compat import keys_to_text
from packer_assets.runs.procs import proc_table

PACKER = "/usr/bin/packer"
needs_packer = pytest.mark.packer

TEMPLATE = REPO / "tests" / "data" / "packer" / "minimal" / "minimal.pkr.hcl"
NODE = "pve1"
VMID = 9100
VM_NAME = "packer-minimal"
ISO = "packer-minimal.iso"
ISO_SIZE = 4 * 1024 ** 2
BUILD = "proxmox-iso.minimal"
BUILD_TIMEOUT = 60  # real seconds; a lab build takes about two
MARKER = "echo packer-assets-provisioned > /tmp/packer-assets.provisioned"


# ------------------------------------------------------------------------------------ helpers

@dataclass
class PackerRun:
    returncode: int
    stdout: str
    log: str
    argv: list
    # Every command line seen in packer's process tree while it ran (packer re-runs itself for plugins).
    argvs: set = field(default_factory=set)

    def machine(self):
        """The -machine-readable lines as (target, type, [data...])."""
        out = []
        for line in self.stdout.splitlines():
            parts = line.split(",")
            if len(parts) >= 3 and parts[0].isdigit():
                out.append((parts[1], parts[2], [p.replace("%!(PACKER_COMMA)", ",") for p in parts[3:]]))
        return out

    def artifacts(self, build=BUILD):
        """{index: {key: value}} of the build's artifacts."""
        found = {}
        for target, kind, data in self.machine():
            if target == build and kind == "artifact" and len(data) >= 3:
                found.setdefault(data[0], {})[data[1]] = ",".join(data[2:])
        return found

    def errors(self):
        return [",".join(data) for _target, kind, data in self.machine() if kind == "error"]

    def says(self):
        return [",".join(data[1:]) for _target, kind, data in self.machine() if kind == "ui"]

    def explain(self):
        return "packer exited {0}\n--- output (tail) ---\n{1}\n--- log (tail) ---\n{2}".format(
            self.returncode, "\n".join(self.stdout.splitlines()[-30:]), "\n".join(self.log.splitlines()[-40:]))


def run_packer(workdir, *, pve, ca_file, guest, proxmox_password, ssh_password, http_ip, ssh_timeout="20s"):
    """packer build of the minimal template: non-secret settings in a var file, secrets in the environment."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {"node": NODE, "vm_id": VMID, "vm_name": VM_NAME, "iso_file": "local:iso/" + ISO,
                "boot_wait": "100ms", "ssh_host": guest.host, "ssh_port": guest.port, "ssh_username": guest.username,
                "ssh_timeout": ssh_timeout, "template_description": "lab build"}
    lines = ['{0} = {1}'.format(k, v if isinstance(v, int) else '"{0}"'.format(v)) for k, v in settings.items()]
    if http_ip is None:
        lines.append("boot_command = []")  # packer 1.6.6 cannot type {{ .HTTPIP }} without a non-loopback IPv4
    var_file = workdir / "lab.pkrvars.hcl"
    var_file.write_text("\n".join(lines) + "\n")
    log_path = workdir / "packer.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "PACKER_CACHE_DIR": str(workdir / "packer_cache"),
        "PACKER_CONFIG_DIR": str(workdir),
        "CHECKPOINT_DISABLE": "1",
        "PACKER_LOG": "1",
        "PACKER_LOG_PATH": str(log_path),
        "SSL_CERT_FILE": str(ca_file),
        "PROXMOX_URL": pve.url + "/api2/json",
        "PROXMOX_USERNAME": "root@pam",
        "PROXMOX_PASSWORD": proxmox_password,
        "PKR_VAR_ssh_password": ssh_password,
    }
    argv = [PACKER, "build", "-machine-readable", "-color=false", "-var-file=" + str(var_file), str(TEMPLATE)]
    argvs = set()
    out_path = workdir / "packer.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + BUILD_TIMEOUT
        try:
            # Watch the command lines of packer's process tree (it re-runs itself for its plugins).
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    break
                argvs.update(filter(None, map(cmdline, descendants(proc_table(), {proc.pid}))))
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    stdout = out_path.read_text(errors="replace")
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    return PackerRun(proc.returncode, stdout, log, argv, argvs)


def stage_iso(served, name=ISO, size=ISO_SIZE):
    """Put an ISO on `local` the way an earlier staging step leaves it."""
    async def stage():
        served.pve.store_file("local", name, size)
    served.call(stage())


def volumes(pve_root, storage):
    return {item["volid"] for item in pve_root.nodes(NODE).storage(storage).content.get()}


def assert_no_secret(run, *secrets):
    for secret in secrets:
        assert secret not in " ".join(run.argv)
        for seen in run.argvs:
            assert secret not in seen, "a secret in a process's arguments: " + seen.split()[0]
        assert secret not in run.stdout
        assert secret not in run.log


# ------------------------------------------------------------------------------ the build

@needs_packer
def test_packer_builds_a_template_in_the_lab(lab_pve_serving, lab_pki, pve_root, lab_guest, guest_password,
                                             tmp_path):
    pve = lab_pve_serving.pve
    stage_iso(lab_pve_serving)
    http_ip = host_ipv4()

    run = run_packer(tmp_path / "build", pve=pve, ca_file=lab_pki.ca_file, guest=lab_guest,
                     proxmox_password=pve.root_password, ssh_password=guest_password, http_ip=http_ip)

    assert run.returncode == 0, run.explain()
    artifacts = run.artifacts()
    assert artifacts.get("0", {}).get("id") == str(VMID), run.explain()
    assert artifacts["0"]["builder-id"] == "proxmox.iso"

    # The VM is a template now, with its disk a base volume, the ISO still in ide2 (1.6.6 cannot eject
    # it) and packer's cloud-init drive allocated as PVE does.
    config = pve_root.nodes(NODE).qemu(VMID).config.get()
    assert config["template"] == 1
    assert config["name"] == VM_NAME
    assert config["description"] == "lab build"
    assert config["scsi0"].startswith("local-lvm:base-{0}-disk-0,".format(VMID))
    assert config["ide2"].startswith("local:iso/{0},media=cdrom".format(ISO))
    assert config["ide3"] == "local-lvm:vm-{0}-cloudinit,media=cdrom".format(VMID)
    assert "local-lvm:vm-{0}-cloudinit".format(VMID) in volumes(pve_root, "local-lvm")
    status = pve_root.nodes(NODE).qemu(VMID).status.current.get()
    assert status["status"] == "stopped" and status.get("template") == 1

    # The communicator reached the lab guest: the shell provisioner uploaded its script and ran it.
    scripts = [path for method, path in lab_guest.uploads if path.startswith("/tmp/script_")]
    assert scripts, lab_guest.commands
    script = scripts[0]
    assert MARKER in lab_guest.local_path(script).read_text()
    assert any(script in command and "chmod" not in command.split(";")[-1] for command in lab_guest.commands), \
        lab_guest.commands
    assert ("packer", "password", True) in lab_guest.auth_log

    # The boot command was typed through PVE's sendkey, HTTP address included.
    vm = pve.vm(VMID)
    if http_ip is not None:
        port = next(s.rsplit(" ", 1)[1] for s in run.says() if "Starting HTTP server on port" in s)
        assert pve.typed_text(VMID) == "<esc>auto url=http://{0}:{1}/preseed.cfg\n".format(http_ip, port)
        assert vm.sendkeys[0] == "esc"

    # Credentials went through the environment only, and the fake recorded no secret either.
    assert any(" plugin " in seen for seen in run.argvs), run.argvs  # the plugin processes were seen too
    assert_no_secret(run, pve.root_password, guest_password)
    assert all(pve.root_password not in body.decode(errors="replace") for _m, _p, body in pve.requests)


@needs_packer
def test_packer_with_a_wrong_password_fails_cleanly(lab_pve_serving, lab_pki, pve_root, lab_guest, guest_password,
                                                    tmp_path):
    pve = lab_pve_serving.pve
    stage_iso(lab_pve_serving)
    wrong = "not-" + pve.root_password

    run = run_packer(tmp_path / "build", pve=pve, ca_file=lab_pki.ca_file, guest=lab_guest,
                     proxmox_password=wrong, ssh_password=guest_password, http_ip=host_ipv4())

    assert run.returncode != 0
    assert any("401 authentication failure" in e for e in run.errors()), run.explain()
    assert not run.artifacts()
    assert VMID not in [vm["vmid"] for vm in pve_root.nodes(NODE).qemu.get()]
    assert not [v for v in volumes(pve_root, "local-lvm") if "-{0}-".format(VMID) in v]
    assert "local:iso/" + ISO in volumes(pve_root, "local")
    assert lab_guest.commands == []
    assert_no_secret(run, wrong, pve.root_password, guest_password)


@needs_packer
def test_packer_refuses_a_certificate_its_ca_file_does_not_sign(lab_pve_serving, lab_guest, guest_password, tmp_path):
    pve = lab_pve_serving.pve
    other_ca = make_lab_pki(tmp_path / "other-pki").ca_file

    run = run_packer(tmp_path / "build", pve=pve, ca_file=other_ca, guest=lab_guest,
                     proxmox_password=pve.root_password, ssh_password=guest_password, http_ip=host_ipv4())

    assert run.returncode != 0
    assert any("x509: certificate signed by unknown authority" in e for e in run.errors()), run.explain()
    assert pve.requests == []  # nothing got through: not even the login
    assert pve.vm(VMID) is None


@needs_packer
def test_a_failed_build_destroys_its_vm_but_keeps_the_iso(lab_pve_serving, lab_pki, pve_root, guest_password,
                                                          tmp_path):
    """SSH never comes up: packer stops and deletes the VM; the staged ISO must survive that."""
    pve = lab_pve_serving.pve
    stage_iso(lab_pve_serving)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    guest = type("NoGuest", (), {"host": "127.0.0.1", "port": closed.getsockname()[1], "username": "packer"})()
    workdir = tmp_path / "build"
    workdir.mkdir()
    try:
        run = run_packer(workdir, pve=pve, ca_file=lab_pki.ca_file, guest=guest,
                         proxmox_password=pve.root_password, ssh_password=guest_password, http_ip=host_ipv4(),
                         ssh_timeout="3s")
    finally:
        closed.close()

    assert run.returncode != 0
    assert any("Timeout waiting for SSH" in e for e in run.errors()), run.explain()
    assert pve.vm(VMID) is None
    assert not [v for v in volumes(pve_root, "local-lvm") if "-{0}-".format(VMID) in v]
    iso = [item for item in pve_root.nodes(NODE).storage("local").content.get() if item["volid"] == "local:iso/" + ISO]
    assert iso and iso[0]["size"] == ISO_SIZE


# ------------------------------------------------------------------ PackerCompat on its own

@pytest.fixture
def running_vm(lab_pve_serving, pve_root):
    """VM 120 (a disk on local-lvm, the ISO in ide2), started."""
    stage_iso(lab_pve_serving)
    api = pve_root.nodes(NODE).qemu
    api.post(vmid=120, name="compat", scsi0="local-lvm:1", ide2="local:iso/{0},media=cdrom".format(ISO),
             net0="virtio,bridge=vmbr0")
    api(120).status.start.post()
    return api(120)


def test_sendkey_types_into_a_running_vm(lab_pve_serving, running_vm):
    for key in ("shift-h", "i", "spc", "0x1e", "ret", "ctrl-alt-delete"):
        running_vm.sendkey.put(key=key)
    vm = lab_pve_serving.pve.vm(120)
    assert vm.sendkeys == ["shift-h", "i", "spc", "0x1e", "ret", "ctrl-alt-delete"]
    assert lab_pve_serving.pve.typed_text(120) == "Hi <0x1e>\n<ctrl-alt-delete>"


def test_sendkey_refuses_an_unknown_key(running_vm):
    with pytest.raises(ResourceException) as err:
        running_vm.sendkey.put(key="shift-notakey")
    assert err.value.status_code == 500
    assert "invalid parameter: notakey" in str(err.value)


def test_sendkey_needs_a_running_unlocked_vm(lab_pve_serving, running_vm):
    running_vm.status.stop.post()
    with pytest.raises(ResourceException) as err:
        running_vm.sendkey.put(key="a")
    assert "VM 120 not running" in str(err.value)
    running_vm.status.start.post()
    lab_pve_serving.pve.snapshot_lock(120, "backup")
    with pytest.raises(ResourceException) as err:
        running_vm.sendkey.put(key="a")
    assert "VM is locked (backup)" in str(err.value)
    running_vm.sendkey.put(key="a", skiplock=1)  # root may skip the lock check
    assert lab_pve_serving.pve.vm(120).sendkeys == ["a"]


def test_sendkey_needs_vm_console(lab_pve_serving, running_vm, pve_root, pve_login):
    pve_root.access.users.post(userid="viewer@pve", password="viewer-pw-1234")
    pve_root.access.acl.put(path="/vms/120", roles="PVEAuditor", users="viewer@pve")
    with pytest.raises(ResourceException) as err:
        pve_login("viewer@pve", password="viewer-pw-1234").nodes(NODE).qemu(120).sendkey.put(key="a")
    assert err.value.status_code == 403
    assert "VM.Console" in str(err.value)


def test_a_cloudinit_drive_is_allocated_on_config_update(lab_pve_serving, pve_root, running_vm):
    running_vm.status.stop.post()
    running_vm.config.post(ide3="local-lvm:cloudinit")
    assert running_vm.config.get()["ide3"] == "local-lvm:vm-120-cloudinit,media=cdrom"
    content = {i["volid"]: i for i in pve_root.nodes(NODE).storage("local-lvm").content.get()}
    assert content["local-lvm:vm-120-cloudinit"]["size"] == 4 * 1024 ** 2
    assert content["local-lvm:vm-120-cloudinit"]["vmid"] == 120

    with pytest.raises(ResourceException) as err:  # one cloud-init drive per VM
        running_vm.config.put(sata1="local-lvm:cloudinit")
    assert "sata1 - cloud-init drive is already attached at 'ide3'" in str(err.value)
    assert "local-lvm:vm-120-cloudinit" in volumes(pve_root, "local-lvm")

    running_vm.delete()
    assert not [v for v in volumes(pve_root, "local-lvm") if "-120-" in v]
    assert "local:iso/" + ISO in volumes(pve_root, "local")


def test_a_cloudinit_drive_on_create_is_named_as_pve_names_it(pve_root, lab_pve_serving):
    pve_root.nodes(NODE).qemu.post(vmid=121, ide2="local-lvm:cloudinit", scsi0="local-lvm:1")
    config = pve_root.nodes(NODE).qemu(121).config.get()
    assert config["ide2"] == "local-lvm:vm-121-cloudinit,media=cdrom"
    assert config["scsi0"].startswith("local-lvm:vm-121-disk-0,")


def test_keys_to_text():
    assert keys_to_text(["shift-a", "b", "shift-1", "minus", "shift-minus", "spc", "tab", "esc", "f2"]) == \
        "Ab!-_ \t<esc><f2>"
