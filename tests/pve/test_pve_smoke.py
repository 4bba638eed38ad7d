"""The smoke test against the lab over HTTPS, as the build token: it passes, it fails naming the step,
and in every case the clone is gone afterwards (or its removal failure is reported)."""

from urllib.parse import parse_qs, unquote

import pytest
from support.templates import NODE, create_vm, description, make_entry, wait

from packer_assets.catalog import SmokeCommand, SmokeSpec
from packer_assets_lab.guest import LabGuest
from packer_assets_lab.pve.agent import os_release_text, osinfo_from_os_release
from packer_assets_lab.pve import guest_answers
from packer_assets.pve.smoke import (
    SmokeInternalError,
    SmokeOptions,
    SmokeTestError,
    encode_sshkeys,
    guest_ips,
    smoke_test,
)
from packer_assets.pve.templates import finish_template, template_name, template_tags

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl smoke@lab"
TEMPLATE = 9100
CLONE = 9108


@pytest.fixture
def entry():
    return make_entry()


def make_template(api, entry, vmid=TEMPLATE, family="ubuntu", **config):
    """A template as a build leaves it: created like Packer does, then finish_template."""
    from datetime import UTC, datetime

    config.setdefault("agent", "enabled=1")
    create_vm(api, vmid, name=template_name(entry.key, datetime(2026, 11, 25, tzinfo=UTC)), **config)
    finish_template(api, NODE, vmid, family=family, vm_storage="local-lvm", description=description(entry.key),
                    tags=template_tags(entry.key))


def lab_os(entry) -> dict:
    """What the lab's agent answers for a system installed from the key's ISO."""
    return osinfo_from_os_release(os_release_text(entry.expected_os))


@pytest.fixture
def smoke(lab_pve, tmp_path):
    """smoke_test with SSH to a lab guest that plays the clones: it lets in the cloud-init user with the keys
    of running VMs and presents the host key the clones' agent reports (as LabStack wires it)."""
    guest = LabGuest(tmp_path / "guest", username="packer", key_source=lab_pve.lab_ssh_keys).start()
    lab_pve.lab_guest_host_keys = [f"{guest.host_key.get_name()} {guest.host_key.get_base64()}"]
    try:
        def run(api, node, template_vmid, entry, **options):
            options.setdefault("ssh_address", (guest.host, guest.port))
            return smoke_test(api, node, template_vmid, entry, options=SmokeOptions(**options))

        yield run
    finally:
        guest.stop()


@pytest.fixture(autouse=True)
def _templates_run_their_keys_os(lab_pve):
    lab_pve.lab_default_os = lab_os(make_entry())  # ubuntu 22.04, the OS make_entry's key names


def vmids(lab_pve):
    return {vm.vmid for vm in lab_pve.vms}


def test_smoke_test_passes_and_the_clone_is_gone(api, lab_pve, entry, smoke):
    make_template(api, entry)
    lab_pve.lab_guest_ip = "192.0.2.50"
    result = smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, ssh_public_key=KEY, poll=0.05)
    assert result.clone_vmid == CLONE and result.template_vmid == TEMPLATE
    assert result.os_info["name"] == "Ubuntu" and result.found_os == "ubuntu 22.04" == result.expected_os
    assert result.ips == ["192.0.2.50"]
    assert any(i["name"] == "eth0" for i in result.interfaces)
    assert [s.name for s in result.steps] == ["clone", "configure", "start", "agent", "osinfo", "identity", "network",
                                                "cloud_init", "fresh_identity", "ssh_login", "password_locked",
                                                "guest_agent_enabled", "inventory", "cleanup"]
    assert all(s.passed for s in result.steps)
    details = {s.name: s.detail for s in result.steps}
    assert details["cloud_init"].startswith("status: done") and details["ssh_login"] == "packer-smoke"
    assert details["password_locked"] == "packer: password locked"
    assert details["inventory"] == f"{len(result.packages)} packages" and len(result.packages) > 10
    assert any(p.name == "openssh-server" and p.kind == "deb" for p in result.packages)
    assert len(result.machine_id) == 32 and result.host_keys == tuple(lab_pve.lab_guest_host_keys)
    assert vmids(lab_pve) == {TEMPLATE}  # the clone is gone, the template stays
    assert not [n for n, v in lab_pve.storages["local-lvm"]["volumes"].items() if v.get("vmid") == CLONE]
    # cloud-init user and key went to the clone, the key encoded twice on the wire (PVE's quirk)
    sent = [body for method, path, body in lab_pve.requests
            if method == "PUT" and path.endswith(f"/qemu/{CLONE}/config")]
    assert b"ciuser=packer-smoke" in sent[0] and b"sshkeys=ssh-ed25519%2520AAAA" in sent[0]
    assert result.ips == ["192.0.2.50"] and "Ubuntu" in result.os_name
    # both keys: the one given, and the one made for this test (whose private half only the test held)
    keys = unquote(unquote(sent[0].decode().split("sshkeys=")[1].split("&")[0])).splitlines()
    assert keys[0] == KEY and keys[1].endswith(" packer-assets-smoke") and keys[1] != KEY


CHECK_FAULTS = [("cloud_init", "status: error"),
                ("fresh_identity", "/etc/machine-id dates from before this boot"),
                ("ssh_login", "the key given to the clone was refused"),
                ("password_locked", "can still log in with the install password"),
                ("guest_agent_enabled", "disabled"),
                ("inventory", "the package query exited 1")]


@pytest.mark.parametrize(("fault", "said"), CHECK_FAULTS, ids=[f for f, _ in CHECK_FAULTS])
def test_each_check_fails_under_its_fault_naming_it_and_the_clone_is_gone(api, lab_pve, entry, smoke, fault, said):
    make_template(api, entry)
    lab_pve.lab_faults[entry.key] = {fault}
    with pytest.raises(SmokeTestError) as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05, timeout=300)
    err = caught.value
    assert err.step == fault and f"failed at step '{fault}'" in str(err) and said in str(err), str(err)
    assert [s.name for s in err.steps if not s.passed] == [fault]  # every step before it passed
    assert vmids(lab_pve) == {TEMPLATE}


def test_windows_checks_run_through_the_agent_and_fail_under_their_faults(api, lab_pve, smoke):
    win = make_entry(key="windows-2022", family="windows", first=9300, last=9309)
    lab_pve.lab_default_os = lab_os(win)
    make_template(api, win, vmid=9300, family="windows")
    result = smoke(api, NODE, 9300, win, clone_vmid=9301, poll=0.05)
    assert [s.name for s in result.steps][7:] == ["fresh_identity", "guest_agent_enabled", "inventory", "cleanup"]
    assert {p.kind for p in result.packages} == {"windows-program", "windows-hotfix"}
    lab_pve.lab_faults[win.key] = {"fresh_identity"}
    with pytest.raises(SmokeTestError, match="has no CloneTag") as caught:
        smoke(api, NODE, 9300, win, clone_vmid=9301, poll=0.05)
    assert caught.value.step == "fresh_identity" and vmids(lab_pve) == {9300}


def site_entry(*commands):
    return make_entry().model_copy(update={"smoke": SmokeSpec(commands=tuple(SmokeCommand(**c) for c in commands))})


def test_the_catalog_s_own_checks_run_after_the_family_s(api, lab_pve, smoke):
    entry = site_entry({"run": "test -x /usr/bin/curl", "name": "curl_installed"},
                       {"run": "id -un", "via": "ssh", "expect_output": "^packer-smoke$"})
    make_template(api, entry)
    result = smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert [s.name for s in result.steps][-4:] == ["curl_installed", "command_2", "inventory", "cleanup"]
    asked = [parse_qs(body.decode())["command"] for method, path, body in lab_pve.requests
             if method == "POST" and path.endswith(f"/qemu/{CLONE}/agent/exec")]
    assert ["sh", "-c", "test -x /usr/bin/curl", "sh"] in asked  # as root, through the agent
    assert ["id", "-un"] not in asked  # the SSH check went over SSH


@pytest.mark.parametrize(("command", "why"), [
    ({"run": "test -x /usr/bin/curl", "name": "curl_installed"}, "lab fault: command failed"),
    ({"run": "id -un", "via": "ssh", "expect_output": "^root$", "name": "runs_as_root"}, "does not match"),
    ({"run": "true", "expect_exit": 3, "name": "exits_three"}, "exit 0, expected 3")])
def test_a_failing_site_check_fails_the_smoke_test_by_its_name(api, lab_pve, smoke, command, why):
    entry = site_entry(command)
    make_template(api, entry)
    if "curl" in command["run"]:
        lab_pve.lab_faults[entry.key] = {"commands"}
    with pytest.raises(SmokeTestError) as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert caught.value.step == command["name"] and why in str(caught.value) and "site check" in str(caught.value)
    assert vmids(lab_pve) == {TEMPLATE}


def test_the_clone_vmid_is_allocated_from_the_range_when_not_given(api, lab_pve, entry, smoke):
    make_template(api, entry)
    result = smoke(api, NODE, TEMPLATE, entry, poll=0.05)
    assert result.clone_vmid == 9101 and vmids(lab_pve) == {TEMPLATE}


def test_a_template_of_another_os_fails_at_identity_naming_both_and_the_clone_is_gone(api, lab_pve, entry, smoke):
    make_template(api, entry)
    lab_pve.lab_default_os = lab_os(make_entry(key="debian-12", family="debian"))  # another key's system
    with pytest.raises(SmokeTestError) as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert caught.value.step == "identity"
    assert "expected ubuntu 22.04, found debian 12" in str(caught.value)
    assert vmids(lab_pve) == {TEMPLATE}


@pytest.mark.parametrize("found, passes", [("9.4", True), ("9", True), ("10.0", False), ("9a", False)])
def test_a_release_matches_its_point_releases_only(found, passes):
    assert make_entry(key="rocky-9", family="rocky").expected_os.matches("rocky", found) is passes


def test_windows_gets_no_cloud_init_settings(api, lab_pve, smoke):
    win = make_entry(key="windows-2022", family="windows", first=9300, last=9309)
    lab_pve.lab_default_os = lab_os(win)
    make_template(api, win, vmid=9300, family="windows")
    result = smoke(api, NODE, 9300, win, clone_vmid=9301, ssh_public_key=KEY, poll=0.05)
    assert result.ips
    sent = [body for method, path, body in lab_pve.requests if method == "PUT" and path.endswith("/qemu/9301/config")]
    assert b"ciuser" not in sent[0] and b"sshkeys" not in sent[0]
    assert vmids(lab_pve) == {9300}


def test_agent_not_enabled_fails_at_agent_and_removes_the_clone(api, lab_pve, entry, smoke):
    make_template(api, entry, agent="0")
    with pytest.raises(SmokeTestError) as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, timeout=1, poll=0.05)
    err = caught.value
    assert err.step == "agent" and err.clone_vmid == CLONE and err.template_vmid == TEMPLATE
    assert "failed at step 'agent' (clone 9108)" in str(err) and "agent=1" in str(err)
    assert f"cleanup: clone {CLONE} destroyed" in str(err)
    assert vmids(lab_pve) == {TEMPLATE}


def test_agent_that_never_answers_times_out_and_removes_the_clone(api, lab_pve, entry, smoke):
    make_template(api, entry)
    lab_pve.fail("POST", f"/qemu/{CLONE}/agent/ping", 500, "QEMU guest agent is not running")
    with pytest.raises(SmokeTestError, match=r"step 'agent'.*gave up.*QEMU guest agent is not running") as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, timeout=0.5, poll=0.05)
    assert caught.value.step == "agent"
    assert vmids(lab_pve) == {TEMPLATE}


def test_a_guest_without_an_address_fails_at_network(api, lab_pve, entry, smoke):
    make_template(api, entry, net0="virtio,bridge=vmbr0")
    lab_pve.fail("GET", f"/qemu/{CLONE}/agent/network-get-interfaces", 500, "guest network not up")
    with pytest.raises(SmokeTestError, match="step 'network'") as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, timeout=0.5, poll=0.05)
    assert caught.value.step == "network" and vmids(lab_pve) == {TEMPLATE}


def test_start_failure_names_the_step_and_removes_the_clone(api, lab_pve, entry, smoke):
    make_template(api, entry)
    lab_pve.fail("POST", f"/qemu/{CLONE}/status/start", 500, "start failed: QEMU exited with code 1")
    with pytest.raises(SmokeTestError, match=r"step 'start'.*QEMU exited with code 1") as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert caught.value.step == "start"
    assert vmids(lab_pve) == {TEMPLATE}


def test_a_template_without_cloud_init_fails_at_configure(api, lab_pve, entry, smoke):
    # a Linux template nobody finished: no cloud-init drive
    create_vm(api, TEMPLATE, agent=1)
    wait(api, api.nodes(NODE).qemu(TEMPLATE).template.post())
    with pytest.raises(SmokeTestError, match="step 'configure'.*no cloud-init drive"):
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert vmids(lab_pve) == {TEMPLATE}


def test_a_clone_vmid_in_use_or_out_of_range_is_refused_and_left_alone(api, lab_pve, entry, smoke):
    make_template(api, entry)
    create_vm(api, CLONE)
    with pytest.raises(SmokeTestError, match="step 'clone'.*VMID 9108 is in use"):
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    with pytest.raises(SmokeTestError, match="step 'clone'.*range 9100-9109"):
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=555, poll=0.05)
    assert vmids(lab_pve) == {TEMPLATE, CLONE}


def test_a_failed_cleanup_is_reported_never_hidden(api, lab_pve, entry, smoke):
    make_template(api, entry)
    lab_pve.fail("DELETE", f"/qemu/{CLONE}", 500, "storage 'local-lvm' is not online")
    # the test itself passes: the cleanup failure is the error
    with pytest.raises(SmokeTestError, match=r"step 'cleanup'.*FAILED to destroy clone 9108.*not online") as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert caught.value.step == "cleanup"
    lab_pve.failures.clear()
    wait(api, api.nodes(NODE).qemu(CLONE).delete())

    # the test fails and so does the cleanup: both are in the one error
    lab_pve.fail("DELETE", f"/qemu/{CLONE}", 500, "storage 'local-lvm' is not online")
    lab_pve.fail("POST", f"/qemu/{CLONE}/status/start", 500, "start failed")
    with pytest.raises(SmokeTestError) as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert caught.value.step == "start"
    assert "start failed" in str(caught.value) and "cleanup: FAILED to destroy clone 9108" in str(caught.value)


def test_sshkeys_encoding():
    two = KEY + "\nssh-rsa AAAAB3NzaC1yc2E= other@host"
    encoded = encode_sshkeys(two)
    assert unquote(encoded) == two + "\n"
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-%_.!~*'()")
    assert "%20" in encoded and "+" not in encoded


def test_guest_ips_skip_loopback_and_link_local():
    interfaces = [{"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1"}]},
                  {"name": "eth0", "ip-addresses": [{"ip-address": "10.0.0.5"}, {"ip-address": "fe80::1"}]},
                  {"name": "Loopback Pseudo-Interface 1", "ip-addresses": [{"ip-address": "::1"}]}]
    assert guest_ips(interfaces) == ["10.0.0.5"]


def test_tasks_running_in_the_background_are_waited_for(api, lab_pve, entry, smoke):
    make_template(api, entry)
    lab_pve.time_scale = 0.01  # tasks end after the request returned, as on a real node
    lab_pve.lock_wait = 200
    result = smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert result.ips and vmids(lab_pve) == {TEMPLATE}


def test_cloud_init_exit_2_passes_with_a_warning_that_names_the_errors(api, lab_pve, entry, smoke, monkeypatch):
    """cloud-init 23.4+: `status --wait` exits 2 when it finished with recoverable errors. Accepted, as the
    templates' provisioners accept it, with a warning naming each error (guest_checks.CLOUD_INIT)."""
    degraded = ("status: done\nextended_status: degraded done\nerrors: []\nrecoverable_errors:\nWARNING:\n"
                "\t- Failed to set locale en_US.UTF-8\nDEPRECATED:\n\t- Deprecated cloud-config provided: chpasswd.list\n")
    monkeypatch.setitem(guest_answers.ANSWERS, "cloud_init", lambda guest, argv, broken: guest_answers.Answer(2, degraded))
    make_template(api, entry)
    result = smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert all(s.passed for s in result.steps)
    [warning] = result.warnings
    assert warning.startswith(f"{entry.key}: smoke test: cloud_init passed with a warning: exit 2")
    assert "WARNING: Failed to set locale en_US.UTF-8" in warning and "DEPRECATED: Deprecated cloud-config" in warning
    assert {s.name: s.detail for s in result.steps}["cloud_init"] in warning


def test_a_parsing_bug_of_ours_is_an_internal_error_not_a_failed_template(api, lab_pve, entry, smoke, monkeypatch):
    """A KeyError in our own parsing (parse_identity, injected) is no verdict on the guest: SmokeInternalError,
    named a packer-assets bug, its cause kept for the traceback; the clone is removed all the same."""
    def broken(output):
        raise KeyError("machine-id")

    monkeypatch.setattr("packer_assets.pve.smoke.parse_identity", broken)
    make_template(api, entry)
    with pytest.raises(SmokeInternalError) as caught:
        smoke(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    err = caught.value
    assert not isinstance(err, SmokeTestError) and err.step == "fresh_identity"
    assert "internal error at step 'fresh_identity': KeyError: 'machine-id'" in str(err)
    assert "a bug in packer-assets, not a fault of the template" in str(err) and "failed at step" not in str(err)
    assert isinstance(err.__cause__, KeyError) and err.__cause__.__traceback__ is not None
    assert [(s.name, s.passed) for s in err.steps][-2:] == [("fresh_identity", False), ("cleanup", True)]
    assert vmids(lab_pve) == {TEMPLATE}
