"""LabSimGuest: the served LabPve installs a simulated system from the answer file packer's boot command names,
powers the VM off when the install fails (the reason in its console log), keeps the agent silent without
qemu-ga, hands clones the template's state, and lets packer's SSH session change the key's build VM only."""

import http.server
import threading

import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")

from proxmoxer.core import ResourceException
from test_lab_guest_exec import NODE, install, ok, os_mirror  # noqa: F401 - os_mirror is a fixture

from packer_assets_lab.console import console_path
from packer_assets_lab.guest import LabGuest
from packer_assets_lab.pve import guest_state as gs

HASH = "$6$labsalt$notarealhashbutlookslikeone"
PRESEED = f"""d-i passwd/username string packer
d-i passwd/user-password-crypted password {HASH}
tasksel tasksel/first multiselect standard, ssh-server
d-i pkgsel/include string {{packages}}
d-i preseed/late_command string in-target systemctl enable qemu-guest-agent ssh; truncate -s 0 /target/etc/machine-id
"""
KICKSTART = f"""user --name=packer --groups=wheel --iscrypted --password={HASH}
%packages
@^minimal-environment
cloud-init
%end
%post --erroronfail
set -eu
systemctl enable sshd qemu-guest-agent
%end
"""
KEYS = frozenset({"debian-12", "rocky-9", "windows-2022"})
SHIFTED = {":": "semicolon", "_": "minus", "?": "slash"}
PLAIN = {"/": "slash", ".": "dot", "=": "equal", "-": "minus", " ": "spc", "\n": "ret", ";": "semicolon"}


def keys_for(text):
    """QEMU key names that type text on a US keyboard (what packer's boot command sends)."""
    return [f"shift-{SHIFTED[c]}" if c in SHIFTED else PLAIN.get(c, c) for c in text]


@pytest.fixture
def answers(tmp_path):
    """A tiny HTTP server (packer's) serving tmp_path/http; yields (folder, base URL)."""
    folder = tmp_path / "http"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(folder), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def type_line(vm, line):
    for key in keys_for(line + "\n"):
        vm.sendkey.put(key=key)


def installed_vm(pve_root, os_mirror, key, line, vmid=100, cpu="host"):  # noqa: F811 - the fixture's value
    vm = install(pve_root, os_mirror, key, vmid, cpu=cpu)
    type_line(vm, line)
    return vm


def test_the_answer_file_the_boot_command_names_is_what_gets_installed(pve_root, lab_pve, os_mirror, answers):  # noqa: F811
    folder, url = answers
    (folder / "preseed.cfg").write_text(PRESEED.format(packages="openssh-server qemu-guest-agent cloud-init jq"))
    vm = installed_vm(pve_root, os_mirror, "debian-12", f"auto url={url}/preseed.cfg priority=critical")
    state = lab_pve.lab_state(lab_pve.vm(100))
    assert state.has("jq") and state.has("qemu-guest-agent") and state.users == {"packer": gs.SET}
    assert "qemu-guest-agent" in state.enabled and state.machine_id_boot == state.boot  # made at first boot
    assert vm.agent.ping.post() is not None
    assert "install finished" in console_path(lab_pve.data_dir, 100).read_text()


def test_a_url_nothing_serves_fails_the_install_and_the_vm_powers_off(pve_root, lab_pve, os_mirror, answers):  # noqa: F811
    _folder, url = answers
    vm = installed_vm(pve_root, os_mirror, "debian-12", f"auto url={url}/missing.cfg")
    assert vm.status.current.get()["status"] == "stopped"
    said = console_path(lab_pve.data_dir, 100).read_text()
    assert "could not retrieve the answer file" in said and "missing.cfg" in said


def test_a_failing_post_erroronfail_stops_the_install_and_says_why_without_the_hash(
    pve_root, lab_pve, os_mirror, answers  # noqa: F811
):
    folder, url = answers
    (folder / "ks.cfg").write_text(KICKSTART)  # no qemu-guest-agent in %packages, enabled in %post
    vm = installed_vm(pve_root, os_mirror, "rocky-9", f" inst.text inst.ks={url}/ks.cfg")
    assert vm.status.current.get()["status"] == "stopped"
    said = console_path(lab_pve.data_dir, 100).read_text()
    assert "%post --erroronfail script failed" in said
    assert "Unit file qemu-guest-agent.service does not exist" in said
    assert HASH not in said and "labsalt" not in said


@pytest.mark.parametrize(("key", "cpu", "said"), [
    ("rocky-10", None, "Fatal glibc error: CPU does not support x86-64-v3 (lab: CPU type kvm64 is x86-64-v1)"),
    ("rocky-10", "x86-64-v2-AES", "CPU does not support x86-64-v3 (lab: CPU type x86-64-v2-AES is x86-64-v2)"),
    ("rocky-9", "cputype=qemu64,flags=+aes", "CPU does not support x86-64-v2 (lab: CPU type qemu64 is x86-64-v1)"),
    ("windows-2025", "kvm64", "lacks SSE4.2/POPCNT, which Windows Server 2025 requires (x86-64-v2)"),
])
def test_an_installer_below_its_release_s_cpu_level_stops_and_the_console_says_why(
    pve_root, lab_pve, os_mirror, answers, key, cpu, said  # noqa: F811
):
    """PVE's default CPU type (kvm64, cpu unset) and the other baseline models run no RHEL 10 installer; the VM
    powers off before any answer file is read, its console naming the level."""
    folder, url = answers
    (folder / "ks.cfg").write_text(KICKSTART)
    line = " inst.text inst.ks=" + url + "/ks.cfg" if key.startswith("rocky") else ""  # Setup: at the first key
    vm = installed_vm(pve_root, os_mirror, key, line, cpu=cpu or "")
    assert vm.status.current.get()["status"] == "stopped"
    assert said in console_path(lab_pve.data_dir, 100).read_text()


@pytest.mark.parametrize("key", ["rocky-10", "windows-2025"])
@pytest.mark.parametrize("cpu", ["host", "max", "x86-64-v3", "Haswell"])
def test_a_cpu_at_the_release_s_level_boots_its_installer(pve_root, lab_pve, os_mirror, answers, key, cpu):  # noqa: F811
    folder, url = answers
    (folder / "ks.cfg").write_text(KICKSTART.replace("cloud-init\n", "cloud-init\nqemu-guest-agent\n"))
    line = " inst.text inst.ks=" + url + "/ks.cfg" if key.startswith("rocky") else ""  # Setup: at the first key
    vm = installed_vm(pve_root, os_mirror, key, line, cpu=cpu)
    said = console_path(lab_pve.data_dir, 100).read_text()
    assert "x86-64-v" not in said and "SSE4.2" not in said, said


def test_without_qemu_ga_the_agent_is_not_running(pve_root, lab_pve, os_mirror, answers):  # noqa: F811
    folder, url = answers
    (folder / "preseed.cfg").write_text(PRESEED.format(packages="openssh-server cloud-init"))
    vm = installed_vm(pve_root, os_mirror, "debian-12", f"auto url={url}/preseed.cfg")
    assert vm.status.current.get()["status"] == "running"  # d-i judges late_command by its last command
    with pytest.raises(ResourceException) as failed:
        vm.agent.ping.post()
    assert failed.value.status_code == 500 and "QEMU guest agent is not running" in str(failed.value)


def test_packer_s_session_changes_the_key_s_build_vm_and_clones_inherit_it(
    pve_root, lab_pve, os_mirror, answers  # noqa: F811
):
    folder, url = answers
    (folder / "preseed.cfg").write_text(PRESEED.format(packages="openssh-server qemu-guest-agent cloud-init"))
    installed_vm(pve_root, os_mirror, "debian-12", f"auto url={url}/preseed.cfg")
    assert lab_pve.lab_ssh_exec("rocky-9", KEYS, "passwd -l packer", lambda _p: None) == (0, b"")  # no rocky VM
    assert lab_pve.lab_states[100].users["packer"] == gs.SET
    status, out = lab_pve.lab_ssh_exec("debian-12", KEYS, "passwd -l nobody-here", lambda _p: None)
    assert (status, out) == (1, b"passwd: user 'nobody-here' does not exist\n")
    assert lab_pve.lab_ssh_exec("debian-12", KEYS, "passwd -l packer", lambda _p: None)[0] == 0
    assert lab_pve.lab_sshd_runs("debian-12", KEYS) and not lab_pve.lab_sshd_runs("rocky-9", KEYS)
    ok(pve_root, pve_root.nodes(NODE).qemu(100).status.stop.post())
    pve_root.nodes(NODE).qemu(100).template.post()
    ok(pve_root, pve_root.nodes(NODE).qemu(100).clone.post(newid=200, full=1, name="debian-12-smoke-100"))
    ok(pve_root, pve_root.nodes(NODE).qemu(200).status.start.post())
    clone = lab_pve.lab_state(lab_pve.vm(200))
    assert clone.users["packer"] == gs.LOCKED
    assert clone.boot > lab_pve.lab_states[100].boot and clone.machine_id_boot < clone.boot  # not generalized
    # a smoke clone is not the build VM: packer's session never changes it
    assert lab_pve.lab_ssh_exec("debian-12", KEYS, "usermod -U packer; passwd -d packer", lambda _p: None) == (0, b"")


def test_a_key_port_reaches_its_handler_and_refuses_logins_when_nothing_runs_sshd(guest_state_dir, guest_password):
    from support.guest import guest_ssh_client

    seen, sshd = [], {"on": True}
    with LabGuest(guest_state_dir, "packer", password=guest_password) as guest:
        port = guest.listen()
        guest.port_handler = lambda p, command: (seen.append((p, command)), (3, b"from the key's VM\n"))[1]
        guest.port_gate = lambda p: sshd["on"]
        client = guest_ssh_client(guest, password=guest_password, port=port)
        _, stdout, _ = client.exec_command("true", timeout=10)
        assert (stdout.channel.recv_exit_status(), stdout.read()) == (3, b"from the key's VM\n")
        client.close()
        assert seen == [(port, "true")]
        sshd["on"] = False
        with pytest.raises(Exception, match="Authentication failed"):
            guest_ssh_client(guest, password=guest_password, port=port)
        guest_ssh_client(guest, password=guest_password).close()  # the shared port is not gated
