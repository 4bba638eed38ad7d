"""A real Debian 12 guest: a linked clone of the session's emulated install (support/realguest.py: the base
image plus what the preseed installed from the mirror) booted under QEMU with PVE's cloud-init drive, its
agent, cloud-init and SSH; the accelerator probe on the image's own kernel; and no QEMU left behind.

Deadlines are waits, never asserted durations: a loaded 2-core machine is slow, not wrong. The times are
printed (pytest -s) for docs/realguest.md.
"""

import base64
import gc
import shlex
import time

import paramiko
import pytest

from packer_assets.pve.guest_exec import EphemeralKey
from packer_assets.pve.smoke import encode_sshkeys
from packer_assets.runs.procs import process_alive
from packer_assets_lab.realguest.cidata import write_nocloud_drive
from packer_assets_lab.realguest.qemu import (
    QemuError,
    QemuVm,
    VmSpec,
    linked_clone_disk,
    probe_kernel,
    qemu_processes_under,
)

pytestmark = [pytest.mark.realguest, pytest.mark.timeout(300)]

MAC = "BC:24:11:5E:A1:01"


def spec_for(image, disk, name="realguest-test", **extra):
    return VmSpec(name, disk, image.kernel, image.initrd, image.cmdline, mac=MAC, **extra)


def test_the_accelerator_probe_boots_the_images_own_kernel_to_its_panic(base_image):
    # under TCG, which runs everywhere: the banner, then the panic (no root), then QEMU exits (-no-reboot)
    assert probe_kernel("tcg", base_image.kernel, bound=120) is None


def test_no_qemu_outlives_a_failing_test_or_a_forgotten_runner(base_image, tmp_path):
    disk = linked_clone_disk(base_image.disk, tmp_path / "disk.qcow2")
    with pytest.raises(RuntimeError), QemuVm(spec_for(base_image, disk), tmp_path / "a") as vm:
        pid = vm.pid
        assert vm.status() == "running"
        raise RuntimeError("the test failed while the guest was booting")
    assert not process_alive(pid)

    vm = QemuVm(spec_for(base_image, disk), tmp_path / "b").start()
    pid = vm.pid
    del vm
    gc.collect()
    assert not process_alive(pid)
    assert qemu_processes_under(tmp_path) == []


def os_release(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = shlex.split(value)[0] if value else ""
    return fields


def ssh_login(port: int, user: str, key: EphemeralKey, host_key: str, deadline: float) -> str:
    """`id -un` over SSH with the clone's cloud-init user and key, the host key pinned to the guest's."""
    client = paramiko.SSHClient()
    kind, blob = host_key.split()[:2]
    client.get_host_keys().add(f"[127.0.0.1]:{port}", kind, paramiko.PKey.from_type_string(kind, base64.b64decode(blob)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    while True:
        try:
            client.connect("127.0.0.1", port=port, username=user, pkey=key.key, allow_agent=False,
                           look_for_keys=False, timeout=30, banner_timeout=60, auth_timeout=60)
            break
        except (paramiko.SSHException, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(3)
    try:
        _, stdout, _ = client.exec_command("id -un", timeout=60)
        return stdout.read().decode().strip()
    finally:
        client.close()


@pytest.mark.timeout(2700)  # the session's install when first (2 x INSTALL_BOUND), then its own waits: 1463 s
def test_a_linked_clone_of_the_install_boots_with_pves_cloud_init_drive(installed, tmp_path):
    base_image = installed.image
    key = EphemeralKey.generate("realguest-test")
    config = {"name": "rg-clone", "ciuser": "smoke", "sshkeys": encode_sshkeys(key.public), "ipconfig0": "ip=dhcp",
              "net0": f"virtio={MAC},bridge=vmbr0",
              # no package upgrade: the guest's network reaches nothing but the host's forwards
              "ciupgrade": 0}
    seed = write_nocloud_drive(tmp_path / "vm-9301-cloudinit.iso", config, 9301)
    disk = linked_clone_disk(installed.disk, tmp_path / "vm-9301-disk-0.qcow2")
    started = time.monotonic()
    with QemuVm(spec_for(base_image, disk, name="rg-clone", cdroms=[seed]), tmp_path / "run") as vm:
        pid = vm.pid
        agent = vm.agent()
        agent.wait_ready(timeout=400)
        at_agent = time.monotonic() - started

        osinfo = agent.osinfo()
        release = os_release(agent.read_file("/etc/os-release").decode())
        assert (osinfo["id"], osinfo["version-id"], osinfo["pretty-name"]) == (
            release["ID"], release["VERSION_ID"], release["PRETTY_NAME"]) == (
            "debian", "12", "Debian GNU/Linux 12 (bookworm)")

        status = agent.exec(["cloud-init", "status", "--wait", "--long"], timeout=400)
        at_cloud_init = time.monotonic() - started
        assert status.exitcode == 0, status
        assert b"status: done" in status.stdout and b"DataSourceNoCloud" in status.stdout
        assert agent.exec(["hostname"]).stdout.decode().strip() == "rg-clone"  # user-data applied
        addresses = {a["ip-address"] for i in agent.network_interfaces() if i["name"] == "eth0"
                     for a in i.get("ip-addresses", [])}
        assert "10.0.2.15" in addresses  # network-config's eth0, matched by MAC, got slirp's DHCP lease

        host_key = agent.read_file("/etc/ssh/ssh_host_ed25519_key.pub").decode()
        assert ssh_login(vm.ssh_port, "smoke", key, host_key, deadline=time.monotonic() + 300) == "smoke"
        at_ssh = time.monotonic() - started
        assert vm.shutdown(timeout=120), "the guest did not power off on ACPI shutdown"
    print(f"boot to agent {at_agent:.0f} s, cloud-init done {at_cloud_init:.0f} s, SSH login {at_ssh:.0f} s, "
          f"powered off {time.monotonic() - started:.0f} s (accel {vm.accel})")
    assert not process_alive(pid)
    assert qemu_processes_under(tmp_path) == []


def test_a_qemu_that_fails_to_start_says_why_and_leaves_nothing(base_image, tmp_path):
    with pytest.raises(QemuError, match="exited"):
        QemuVm(spec_for(base_image, tmp_path / "no-such-disk.qcow2"), tmp_path / "run").start()
    assert qemu_processes_under(tmp_path) == []
