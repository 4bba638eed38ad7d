"""The lab's guests answer the smoke test's commands: checks, package inventory, faults, SSH login with a clone's key.

VMs are installed from the lab mirror's ISO of a key (downloaded into the served LabPve over HTTPS, as the
pipeline stages it), made a template and cloned as the smoke test does (`<key>-smoke-<template vmid>`).
"""

import base64
import secrets
from datetime import datetime, timezone

import paramiko
import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")

from support import REPO

from packer_assets.inspection import guest_checks

from packer_assets.inspection import sbom
from packer_assets.catalog import ExpectedOs, SmokeCommand
from packer_assets_lab.guest import LabGuest
from packer_assets_lab.mirror import IsoMirror, MirrorItem
from packer_assets_lab.pve import FAULTS, decode_sshkeys
from packer_assets_lab.pve.agent import os_release_text, osinfo_from_os_release
from packer_assets_lab.pve.inventory import inventory_rows
from packer_assets_lab.stack import LabStack
from packer_assets.pve.guest_exec import EphemeralKey
from packer_assets.pve.smoke import encode_sshkeys

NODE = "pve1"
# key -> (catalog family, os-release ID, VERSION_ID)
SYSTEMS = {"debian-12": ("debian", "debian", "12"), "rocky-9": ("rocky", "rocky", "9"),
           "windows-2022": ("windows", "mswindows", "2022"), "rocky-10": ("rocky", "rocky", "10"),
           "windows-2025": ("windows", "mswindows", "2025")}
VALUES = {"install_user": "packer", "ci_user": "packer-smoke"}
TEMPLATE_VMID = 100


# ----------------------------------------------------------------------------- helpers

@pytest.fixture
def os_mirror(tmp_path):
    """A lab mirror with one ISO per key of SYSTEMS, each carrying its system's os-release."""
    items = [MirrorItem(key, f"/isos.lab.test/{key}/{key}.iso", f"/isos.lab.test/{key}/SHA256SUMS",
                        os_release=os_release_text(ExpectedOs(id=os_id, version_id=version)))
             for key, (_family, os_id, version) in SYSTEMS.items()]
    with IsoMirror(tmp_path / "mirror", items) as mirror:
        yield mirror


def ok(api, upid):
    """Wait for nothing (time_scale 0: tasks end before the request returns); the task must have succeeded."""
    status = api.nodes(NODE).tasks(upid).status.get()
    assert (status["status"], status.get("exitstatus")) == ("stopped", "OK"), status


def install(api, mirror, key, vmid, name=None, cpu="host"):
    """A VM installed from key's current ISO on the mirror, started: its OS and release come from the ISO.
    cpu: the VM's CPU type (packer's default, host, unless a test says otherwise; "": unset, PVE's kvm64)."""
    filename = f"{key}-r{mirror.release(key)}.iso"
    # with the checksum, as the pipeline stages it: a second VM from the same ISO downloads nothing
    ok(api, api.nodes(NODE).storage("local")("download-url").post(
        url=mirror.url(key), filename=filename, content="iso", checksum=mirror.sha256(key),
        **{"checksum-algorithm": "sha256"}))
    ok(api, api.nodes(NODE).qemu.post(vmid=vmid, name=name or f"{key}-build", agent=1, net0="virtio,bridge=vmbr0",
                                      ide2=f"local:iso/{filename},media=cdrom", **({"cpu": cpu} if cpu else {})))
    ok(api, api.nodes(NODE).qemu(vmid).status.start.post())
    return api.nodes(NODE).qemu(vmid)


def smoke_clone(api, mirror, key, clone_vmid=200):
    """As the smoke test does: key's template (installed, stopped, converted), cloned and started."""
    install(api, mirror, key, TEMPLATE_VMID)
    ok(api, api.nodes(NODE).qemu(TEMPLATE_VMID).status.stop.post())
    api.nodes(NODE).qemu(TEMPLATE_VMID).template.post()
    ok(api, api.nodes(NODE).qemu(TEMPLATE_VMID).clone.post(newid=clone_vmid, full=1,
                                                           name=f"{key}-smoke-{TEMPLATE_VMID}"))
    ok(api, api.nodes(NODE).qemu(clone_vmid).status.start.post())
    return api.nodes(NODE).qemu(clone_vmid)


def run(vm, argv):
    """(exit code, stdout, stderr) of argv run by the VM's guest agent."""
    pid = vm.agent.exec.post(command=list(argv))["pid"]
    status = vm.agent("exec-status").get(pid=pid)
    assert status["exited"]
    return status["exitcode"], status.get("out-data", ""), status.get("err-data", "")


def agent_checks(key):
    return [c for c in guest_checks.FAMILY_CHECKS[SYSTEMS[key][0]] if c.via == "agent"]


def judged(vm, check):
    exit_code, out, _err = run(vm, check.command(VALUES))
    return check.judge(exit_code, out, VALUES)


def inventory(vm, key):
    family = SYSTEMS[key][0]
    exit_code, out, err = run(vm, sbom.inventory_command(family))
    assert exit_code == 0, err
    return sbom.parse_inventory(family, out)


def sbom_of(packages, key):
    family, os_id, version = SYSTEMS[key]
    return sbom.build_sbom(packages, family=family, os_id=os_id, os_version=version, template_name=key, key=key,
                           chain_id=secrets.token_hex(8), timestamp=datetime(2026, 1, 1, tzinfo=timezone.utc))


# ------------------------------------------------------------------------- the checks

@pytest.mark.parametrize("key", sorted(SYSTEMS))
def test_each_check_passes_on_a_clone_of_a_generalized_template(pve_root, lab_pve, os_mirror, key):
    lab_pve.lab_guest_host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBlabHostKey"]
    clone = smoke_clone(pve_root, os_mirror, key)
    checks = agent_checks(key)
    assert {c.name for c in checks} >= {"fresh_identity", "guest_agent_enabled"}
    for check in checks:
        passed, why = judged(clone, check)
        assert passed, f"{check.name}: {why}"
    # a site command from the catalog: exit 0, no output
    site = guest_checks.site_check(SYSTEMS[key][0], 0, SmokeCommand(run="test -d /etc"))
    assert run(clone, site.command(VALUES)) == (0, "", "")


def test_linux_answers_read_as_a_real_guest_prints_them(pve_root, lab_pve, os_mirror):
    lab_pve.lab_guest_host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBlabHostKey", "ssh-rsa AAAAB3NzaC1yc2E"]
    clone = smoke_clone(pve_root, os_mirror, "rocky-9")
    status = run(clone, guest_checks.CLOUD_INIT.command(VALUES))[1]
    assert status.startswith("status: done\n") and "errors: []" in status
    identity = run(clone, guest_checks.FRESH_IDENTITY_CHECK.command(VALUES))[1]
    machine_id, host_keys = guest_checks.parse_identity(identity)
    assert host_keys == lab_pve.lab_guest_host_keys and len(machine_id) == 32
    assert run(clone, guest_checks.PASSWORD_LOCKED_CHECK.command(VALUES)) == (0, "packer: password locked\n", "")
    assert run(clone, guest_checks.AGENT_ENABLED.command(VALUES))[1] == "enabled\n"  # debian/ubuntu: static


def test_machine_id_is_new_per_clone_and_kept_across_reboots(pve_root, lab_pve, os_mirror):
    first = smoke_clone(pve_root, os_mirror, "debian-12", clone_vmid=200)
    ok(pve_root, pve_root.nodes(NODE).qemu(TEMPLATE_VMID).clone.post(newid=201, full=1, name="debian-12-smoke-b"))
    ok(pve_root, pve_root.nodes(NODE).qemu(201).status.start.post())
    second = pve_root.nodes(NODE).qemu(201)

    def machine_id(vm):
        return guest_checks.parse_identity(run(vm, guest_checks.FRESH_IDENTITY_CHECK.command(VALUES))[1])[0]

    before = machine_id(first)
    assert before != machine_id(second)
    ok(pve_root, first.status.stop.post())
    ok(pve_root, first.status.start.post())
    # kept across a reboot; so fresh_identity now fails, as on a real guest (its file dates from the first boot)
    exit_code, said = run(first, guest_checks.FRESH_IDENTITY_CHECK.command(VALUES))[:2]
    assert exit_code == 1 and "/etc/machine-id dates from before this boot" in said
    assert lab_pve.lab_states[200].machine_id == before
    # the VMID again, for a new clone (the old one destroyed): a new identity all the same
    ok(pve_root, first.status.stop.post())
    ok(pve_root, first.delete())
    ok(pve_root, pve_root.nodes(NODE).qemu(TEMPLATE_VMID).clone.post(newid=200, full=1, name="debian-12-smoke-c"))
    ok(pve_root, first.status.start.post())
    assert machine_id(first) != before


def test_a_tests_own_exec_answer_still_wins(pve_root, lab_pve, os_mirror):
    clone = smoke_clone(pve_root, os_mirror, "debian-12")
    argv = list(guest_checks.CLOUD_INIT.command(VALUES))
    lab_pve.vm(200).agent = {"exec": {" ".join(argv): {"exitcode": 2, "out-data": "status: degraded done\n"}}}
    assert run(clone, argv)[:2] == (2, "status: degraded done\n")


# ------------------------------------------------------------------------- faults

FAULTED = [(key, check.name) for key in sorted(SYSTEMS) for check in agent_checks(key)]


@pytest.mark.parametrize(("key", "fault"), FAULTED)
def test_a_faulted_check_fails_and_the_others_still_pass(pve_root, lab_pve, os_mirror, key, fault):
    clone = smoke_clone(pve_root, os_mirror, key)
    lab_pve.lab_faults[key] = {fault}
    for check in agent_checks(key):
        passed, why = judged(clone, check)
        assert passed is (check.name != fault), f"{check.name}: {why}"
    lab_pve.lab_faults[f"{key}-other"] = set(FAULTS)  # another key's faults leave this clone alone
    lab_pve.lab_faults[key] = set()
    assert all(judged(clone, check)[0] for check in agent_checks(key))


def test_fault_answers_say_what_a_broken_guest_says(pve_root, lab_pve, os_mirror):
    clone = smoke_clone(pve_root, os_mirror, "debian-12")
    lab_pve.lab_faults["debian-12"] = set(FAULTS)
    exit_code, out, _ = run(clone, guest_checks.CLOUD_INIT.command(VALUES))
    assert exit_code == 1 and out.startswith("status: error\n") and "errors:\n\t- (" in out
    assert run(clone, guest_checks.FRESH_IDENTITY_CHECK.command(VALUES))[:2] == (
        1, "/etc/machine-id dates from before this boot: the template kept the install's identity "
           "(not generalized)\n")
    assert run(clone, guest_checks.PASSWORD_LOCKED_CHECK.command(VALUES))[:2] == (
        1, "packer can still log in with the install password: the template was not generalized\n")
    assert run(clone, guest_checks.AGENT_ENABLED.command(VALUES))[:2] == (1, "disabled\n")


@pytest.mark.parametrize("key", sorted(SYSTEMS))
def test_inventory_and_command_faults(pve_root, lab_pve, os_mirror, key):
    family = SYSTEMS[key][0]
    clone = smoke_clone(pve_root, os_mirror, key)
    site = guest_checks.site_check(family, 0, SmokeCommand(run="exit 0"))
    lab_pve.lab_faults[key] = {"inventory"}
    exit_code, out, err = run(clone, sbom.inventory_command(family))
    assert exit_code == 1 and err.strip() and not out
    with pytest.raises(sbom.SbomError):
        sbom.parse_inventory(family, out)
    assert run(clone, site.command(VALUES))[0] == 0  # only the inventory is broken
    lab_pve.lab_faults[key] = {"commands"}
    exit_code, out, err = run(clone, site.command(VALUES))
    assert (exit_code, err.strip()) == (1, "lab fault: command failed")
    assert not site.judge(exit_code, out, VALUES)[0]
    assert inventory(clone, key)  # the checks and the inventory are not "commands"
    assert all(judged(clone, check)[0] for check in agent_checks(key))


# ------------------------------------------------------------------------- inventory

@pytest.mark.parametrize("key", sorted(SYSTEMS))
def test_inventory_parses_and_a_new_mirror_release_adds_and_updates_one_package(pve_root, os_mirror, key):
    first = inventory(install(pve_root, os_mirror, key, 100), key)
    assert 10 <= len(first) <= 45
    names = {p.name for p in first}
    expected = {"debian-12": {"base-files", "linux-image-amd64", "openssh-server", "qemu-guest-agent", "cloud-init",
                              "sudo", "openssl"},
                "rocky-9": {"kernel", "openssh-server", "qemu-guest-agent", "cloud-init", "sudo", "openssl"},
                "windows-2022": {"QEMU guest agent", "Cloudbase-Init 1.1.6", "KB5041948"}}
    expected.update({"rocky-10": expected["rocky-9"], "windows-2025": expected["windows-2022"]})
    assert expected[key] <= names
    if key == "rocky-10":  # the release's own system (inventory.RELEASE_ROWS), not rocky-9's with el10 in it
        assert {p.version for p in first if p.name == "kernel"} == {"6.12.0-55.37.1.el10_0"}
    assert inventory(install(pve_root, os_mirror, key, 101), key) == first  # same ISO, same system

    os_mirror.publish(key)
    second = inventory(install(pve_root, os_mirror, key, 102), key)
    diff = sbom.diff_sboms(sbom_of(first, key), sbom_of(second, key))
    assert (len(diff.added), len(diff.changed), len(diff.removed)) == (1, 1, 0), diff.markdown()
    sbom.validate_sbom(sbom_of(second, key))

    os_mirror.publish(key)
    third = inventory(install(pve_root, os_mirror, key, 103), key)
    again = sbom.diff_sboms(sbom_of(second, key), sbom_of(third, key))
    assert again.counts == {"added": 1, "removed": 0, "changed": 1}
    assert again.added != diff.added and again.changed[0][0] != diff.changed[0][0]


def test_clones_keep_the_release_their_template_was_installed_from(pve_root, os_mirror):
    clone = smoke_clone(pve_root, os_mirror, "debian-12")
    before = inventory(clone, "debian-12")
    os_mirror.publish("debian-12")  # a newer ISO changes nothing already installed
    newer = inventory(install(pve_root, os_mirror, "debian-12", 150), "debian-12")
    assert inventory(clone, "debian-12") == before != newer


# ------------------------------------------------------------------------- SSH login with the clone's key

@pytest.fixture
def clone_guest(tmp_path, lab_pve):
    """The lab guest, taking the keys of the lab_pve's running clones (as LabStack wires it)."""
    with LabGuest(tmp_path / "guest", "packer", password="guest-pw-1", key_source=lab_pve.lab_ssh_keys) as guest:
        lab_pve.lab_guest_host_keys = [f"{guest.host_key.get_name()} {guest.host_key.get_base64()}"]
        yield guest


def login(guest, host_keys, username, **auth):
    """An SSH client logged in to the guest, trusting only `host_keys` (`type base64`, as fresh_identity prints)."""
    client = paramiko.SSHClient()
    for line in host_keys:
        kind, data = line.split()
        client.get_host_keys().add(f"[{guest.host}]:{guest.port}", kind,
                                   paramiko.PKey.from_type_string(kind, base64.b64decode(data)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(guest.host, guest.port, username=username, allow_agent=False, look_for_keys=False, timeout=10,
                   **auth)
    return client


def id_un(client):
    _, stdout, _ = client.exec_command(" ".join(guest_checks.SSH_LOGIN.argv), timeout=10)
    return stdout.channel.recv_exit_status(), stdout.read().decode()


def configured_vm(api, vmid, name, public_key, ci_user="packer-smoke"):
    ok(api, api.nodes(NODE).qemu.post(vmid=vmid, name=name, agent=1))
    api.nodes(NODE).qemu(vmid).config.put(ciuser=ci_user, sshkeys=encode_sshkeys(f"{public_key}\n# a comment"))
    return api.nodes(NODE).qemu(vmid)


def test_the_clones_cloud_init_user_logs_in_with_its_key(pve_root, lab_pve, clone_guest):
    login_key, other = EphemeralKey.generate(), paramiko.ECDSAKey.generate()  # the smoke test's kind of key
    key = login_key.key
    vm = configured_vm(pve_root, 200, "debian-12-smoke-100", login_key.public)
    with pytest.raises(paramiko.AuthenticationException):
        login(clone_guest, lab_pve.lab_guest_host_keys, "packer-smoke", pkey=key)  # not running: no such guest
    ok(pve_root, vm.status.start.post())

    host_keys = guest_checks.parse_identity(run(vm, guest_checks.FRESH_IDENTITY_CHECK.command(VALUES))[1])[1]
    assert host_keys == lab_pve.lab_guest_host_keys
    client = login(clone_guest, host_keys, "packer-smoke", pkey=key)
    try:
        exit_code, out = id_un(client)
    finally:
        client.close()
    assert (exit_code, out) == (0, "packer-smoke\n")
    assert guest_checks.SSH_LOGIN.judge(exit_code, out, VALUES)[0]

    with pytest.raises(paramiko.AuthenticationException):
        login(clone_guest, host_keys, "packer-smoke", pkey=other)  # a key no running VM has
    with pytest.raises(paramiko.AuthenticationException):
        login(clone_guest, host_keys, "someone-else", pkey=key)  # the key is the cloud-init user's only
    with pytest.raises(paramiko.AuthenticationException):
        login(clone_guest, host_keys, "packer-smoke", password="guest-pw-1")  # no password for that user
    client = login(clone_guest, host_keys, "packer", password="guest-pw-1")  # the build's login is unchanged
    try:
        assert id_un(client) == (0, "packer\n")
    finally:
        client.close()

    lab_pve.lab_faults["debian-12"] = {"ssh_login"}
    with pytest.raises(paramiko.AuthenticationException):
        login(clone_guest, host_keys, "packer-smoke", pkey=key)
    lab_pve.lab_faults["debian-12"] = set()
    login(clone_guest, host_keys, "packer-smoke", pkey=key).close()
    ok(pve_root, vm.status.stop.post())
    with pytest.raises(paramiko.AuthenticationException):
        login(clone_guest, host_keys, "packer-smoke", pkey=key)


def test_sshkeys_are_decoded_as_pve_keeps_them(pve_root, lab_pve):
    vm = configured_vm(pve_root, 300, "rocky-9-smoke-100", "ssh-ed25519 AAAAC3Nz first@lab", ci_user="ops")
    stored = lab_pve.vm(300).config["sshkeys"]
    assert "%20" in stored and " " not in stored  # percent-encoded once, as PVE stores it
    assert decode_sshkeys(stored) == ["ssh-ed25519 AAAAC3Nz first@lab"]
    assert decode_sshkeys(stored.replace("%", "%25")) == decode_sshkeys(stored)  # encoded twice
    assert lab_pve.lab_ssh_keys("ops") == []  # stopped
    ok(pve_root, vm.status.start.post())
    assert lab_pve.lab_ssh_keys("ops") == ["ssh-ed25519 AAAAC3Nz first@lab"]
    assert lab_pve.lab_ssh_keys("packer-smoke") == []


def test_the_stack_wires_the_guest_to_the_clones(tmp_path):
    stack = LabStack.start(tmp_path / "lab", REPO / "templates/catalog.yaml", secrets.token_urlsafe(16),
                           secrets.token_urlsafe(16), project_dir=REPO)
    try:
        key = stack.guest.host_key
        assert stack.pve.lab_guest_host_keys == [f"{key.get_name()} {key.get_base64()}"]
        assert stack.guest.key_source == stack.pve.lab_ssh_keys
    finally:
        stack.stop()


@pytest.mark.parametrize(("os_id", "version", "pretty", "codename"), [
    ("debian", "13", "Debian GNU/Linux 13 (trixie)", "trixie"),
    ("ubuntu", "26.04", "Ubuntu 26.04 LTS", "resolute"),
    ("rocky", "10", "Rocky Linux 10 (Red Quartz)", None),
    ("mswindows", "2025", "Windows Server 2025 Standard", None),
])
def test_each_release_s_iso_names_its_own_system(os_id, version, pretty, codename):
    """The os-release a lab ISO carries, and what the guest agent's get-osinfo makes of it."""
    text = os_release_text(ExpectedOs(id=os_id, version_id=version))
    info = osinfo_from_os_release(text)
    assert (info["id"], info["version-id"], info["pretty-name"]) == (os_id, version, pretty)
    assert (f"VERSION_CODENAME={codename}\n" in text) if codename else "VERSION_CODENAME" not in text
    if os_id == "ubuntu":
        assert info["version"] == "26.04 LTS (Resolute Raccoon)"
    if os_id == "mswindows":
        assert info["kernel-release"] == "26100"  # Server 2025's build; 2022's is 20348


def test_ubuntu_26_04_has_sudo_rs_and_the_rust_coreutils_instead_of_sudo_and_gnu_coreutils():
    names = {row[0] for row in inventory_rows("ubuntu", "26.04", 1)}
    assert {"sudo-rs", "rust-coreutils", "chrony", "dracut"} <= names and not {"sudo", "coreutils"} & names
    assert {"sudo", "coreutils"} <= {row[0] for row in inventory_rows("ubuntu", "24.04", 1)}
