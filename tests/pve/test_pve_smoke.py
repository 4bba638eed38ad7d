"""The smoke test against the lab over HTTPS, as the build token: it passes, it fails naming the step,
and in every case the clone is gone afterwards (or its removal failure is reported)."""

from urllib.parse import unquote

import pytest
from support.templates import NODE, create_vm, description, make_entry, wait

from packer_assets.lab.pve.agent import os_release_text, osinfo_from_os_release
from packer_assets.pve.smoke import (
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


@pytest.fixture(autouse=True)
def _templates_run_their_keys_os(lab_pve):
    lab_pve.lab_default_os = lab_os(make_entry())  # ubuntu 22.04, the OS make_entry's key names


def vmids(lab_pve):
    return {vm.vmid for vm in lab_pve.vms}


def test_smoke_test_passes_and_the_clone_is_gone(api, lab_pve, entry):
    make_template(api, entry)
    lab_pve.lab_guest_ip = "192.0.2.50"
    result = smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, ssh_public_key=KEY, poll=0.05)
    assert result.clone_vmid == CLONE and result.template_vmid == TEMPLATE
    assert result.os_info["name"] == "Ubuntu" and result.found_os == "ubuntu 22.04" == result.expected_os
    assert result.ips == ["192.0.2.50"]
    assert any(i["name"] == "eth0" for i in result.interfaces)
    assert [s.name for s in result.steps] == ["clone", "configure", "start", "agent", "osinfo", "identity", "network",
                                                "cleanup"]
    assert all(s.passed for s in result.steps)
    assert vmids(lab_pve) == {TEMPLATE}  # the clone is gone, the template stays
    assert not [n for n, v in lab_pve.storages["local-lvm"]["volumes"].items() if v.get("vmid") == CLONE]
    # cloud-init user and key went to the clone, the key encoded twice on the wire (PVE's quirk)
    sent = [body for method, path, body in lab_pve.requests
            if method == "PUT" and path.endswith(f"/qemu/{CLONE}/config")]
    assert b"ciuser=packer-smoke" in sent[0] and b"sshkeys=ssh-ed25519%2520AAAA" in sent[0]
    assert result.ips == ["192.0.2.50"] and "Ubuntu" in result.os_name


def test_the_clone_vmid_is_allocated_from_the_range_when_not_given(api, lab_pve, entry):
    make_template(api, entry)
    result = smoke_test(api, NODE, TEMPLATE, entry, poll=0.05)
    assert result.clone_vmid == 9101 and vmids(lab_pve) == {TEMPLATE}


def test_a_template_of_another_os_fails_at_identity_naming_both_and_the_clone_is_gone(api, lab_pve, entry):
    make_template(api, entry)
    lab_pve.lab_default_os = lab_os(make_entry(key="debian-12", family="debian"))  # another key's system
    with pytest.raises(SmokeTestError) as caught:
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert caught.value.step == "identity"
    assert "expected ubuntu 22.04, found debian 12" in str(caught.value)
    assert vmids(lab_pve) == {TEMPLATE}


@pytest.mark.parametrize("found, passes", [("9.4", True), ("9", True), ("10.0", False), ("9a", False)])
def test_a_release_matches_its_point_releases_only(found, passes):
    assert make_entry(key="rocky-9", family="rocky").expected_os.matches("rocky", found) is passes


def test_windows_gets_no_cloud_init_settings(api, lab_pve):
    win = make_entry(key="windows-2022", family="windows", first=9300, last=9309)
    lab_pve.lab_default_os = lab_os(win)
    make_template(api, win, vmid=9300, family="windows")
    result = smoke_test(api, NODE, 9300, win, clone_vmid=9301, ssh_public_key=KEY, poll=0.05)
    assert result.ips
    sent = [body for method, path, body in lab_pve.requests if method == "PUT" and path.endswith("/qemu/9301/config")]
    assert b"ciuser" not in sent[0] and b"sshkeys" not in sent[0]
    assert vmids(lab_pve) == {9300}


def test_agent_not_enabled_fails_at_agent_and_removes_the_clone(api, lab_pve, entry):
    make_template(api, entry, agent="0")
    with pytest.raises(SmokeTestError) as caught:
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, timeout=1, poll=0.05)
    err = caught.value
    assert err.step == "agent" and err.clone_vmid == CLONE and err.template_vmid == TEMPLATE
    assert "failed at step 'agent' (clone 9108)" in str(err) and "agent=1" in str(err)
    assert f"cleanup: clone {CLONE} destroyed" in str(err)
    assert vmids(lab_pve) == {TEMPLATE}


def test_agent_that_never_answers_times_out_and_removes_the_clone(api, lab_pve, entry):
    make_template(api, entry)
    lab_pve.fail("POST", f"/qemu/{CLONE}/agent/ping", 500, "QEMU guest agent is not running")
    with pytest.raises(SmokeTestError, match=r"step 'agent'.*gave up.*QEMU guest agent is not running") as caught:
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, timeout=0.5, poll=0.05)
    assert caught.value.step == "agent"
    assert vmids(lab_pve) == {TEMPLATE}


def test_a_guest_without_an_address_fails_at_network(api, lab_pve, entry):
    make_template(api, entry, net0="virtio,bridge=vmbr0")
    lab_pve.fail("GET", f"/qemu/{CLONE}/agent/network-get-interfaces", 500, "guest network not up")
    with pytest.raises(SmokeTestError, match="step 'network'") as caught:
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, timeout=0.5, poll=0.05)
    assert caught.value.step == "network" and vmids(lab_pve) == {TEMPLATE}


def test_start_failure_names_the_step_and_removes_the_clone(api, lab_pve, entry):
    make_template(api, entry)
    lab_pve.fail("POST", f"/qemu/{CLONE}/status/start", 500, "start failed: QEMU exited with code 1")
    with pytest.raises(SmokeTestError, match=r"step 'start'.*QEMU exited with code 1") as caught:
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert caught.value.step == "start"
    assert vmids(lab_pve) == {TEMPLATE}


def test_a_template_without_cloud_init_fails_at_configure(api, lab_pve, entry):
    # a Linux template nobody finished: no cloud-init drive
    create_vm(api, TEMPLATE, agent=1)
    wait(api, api.nodes(NODE).qemu(TEMPLATE).template.post())
    with pytest.raises(SmokeTestError, match="step 'configure'.*no cloud-init drive"):
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert vmids(lab_pve) == {TEMPLATE}


def test_a_clone_vmid_in_use_or_out_of_range_is_refused_and_left_alone(api, lab_pve, entry):
    make_template(api, entry)
    create_vm(api, CLONE)
    with pytest.raises(SmokeTestError, match="step 'clone'.*VMID 9108 is in use"):
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    with pytest.raises(SmokeTestError, match="step 'clone'.*range 9100-9109"):
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=555, poll=0.05)
    assert vmids(lab_pve) == {TEMPLATE, CLONE}


def test_a_failed_cleanup_is_reported_never_hidden(api, lab_pve, entry):
    make_template(api, entry)
    lab_pve.fail("DELETE", f"/qemu/{CLONE}", 500, "storage 'local-lvm' is not online")
    # the test itself passes: the cleanup failure is the error
    with pytest.raises(SmokeTestError, match=r"step 'cleanup'.*FAILED to destroy clone 9108.*not online") as caught:
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert caught.value.step == "cleanup"
    lab_pve.failures.clear()
    wait(api, api.nodes(NODE).qemu(CLONE).delete())

    # the test fails and so does the cleanup: both are in the one error
    lab_pve.fail("DELETE", f"/qemu/{CLONE}", 500, "storage 'local-lvm' is not online")
    lab_pve.fail("POST", f"/qemu/{CLONE}/status/start", 500, "start failed")
    with pytest.raises(SmokeTestError) as caught:
        smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
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


def test_tasks_running_in_the_background_are_waited_for(api, lab_pve, entry):
    make_template(api, entry)
    lab_pve.time_scale = 0.01  # tasks end after the request returned, as on a real node
    lab_pve.lock_wait = 200
    result = smoke_test(api, NODE, TEMPLATE, entry, clone_vmid=CLONE, poll=0.05)
    assert result.ips and vmids(lab_pve) == {TEMPLATE}
