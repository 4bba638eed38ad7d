"""What QEMU is asked to run for a lab VM (no QEMU needed): the parts a PVE node gives a guest, and a
network that reaches nothing but the forwards."""

from pathlib import Path

import pytest

from packer_assets_lab.realguest.qemu import QemuVm, VmSpec, accel_args


def spec(**extra):
    return VmSpec("vm-9301", Path("/images/disk.qcow2"), Path("/images/vmlinuz"), Path("/images/initrd.img"),
                  "root=UUID=u ro console=ttyS0,115200n8", **extra)


def option(argv, flag, containing):
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag and containing in argv[i + 1]]
    assert values, f"no {flag} with {containing!r} in {argv}"
    return values[0]


def test_the_guest_gets_disk_agent_monitor_console_and_a_restricted_network(tmp_path):
    vm = QemuVm(spec(mac="BC:24:11:00:00:01", cdroms=[Path("/seed/ci.iso")],
                     guestfwd=[("10.0.2.100", 3142, "127.0.0.1", 43142)]), tmp_path)
    argv = vm.argv("tcg")
    assert argv[argv.index("-kernel") + 1] == "/images/vmlinuz"
    assert argv[argv.index("-append") + 1] == "root=UUID=u ro console=ttyS0,115200n8"
    assert "file=/images/disk.qcow2" in option(argv, "-drive", "disk.qcow2")
    assert option(argv, "-device", "virtserialport").endswith("name=org.qemu.guest_agent.0")
    assert f"path={vm.qga_socket},server=on,wait=off" in option(argv, "-chardev", "id=qga0")
    assert f"path={vm.qmp_socket}" in option(argv, "-chardev", "id=qmp")
    assert f"path={vm.serial_log}" in option(argv, "-chardev", "id=serial0")
    netdev = option(argv, "-netdev", "user")
    assert "restrict=on" in netdev and "hostfwd=tcp:127.0.0.1:0-:22" in netdev
    assert "guestfwd=tcp:10.0.2.100:3142-tcp:127.0.0.1:43142" in netdev
    assert option(argv, "-device", "virtio-net-pci").endswith("mac=BC:24:11:00:00:01")
    assert "media=cdrom" in option(argv, "-drive", "/seed/ci.iso")
    assert option(argv, "-device", "ide-cd").endswith("bus=ide.1,unit=0")  # PVE's ide2
    assert argv[argv.index("-accel") + 1] == "tcg,thread=multi"


def test_a_command_guestfwd_starts_a_relay_per_connection_and_keeps_the_network_restricted(tmp_path):
    argv = QemuVm(spec(guestfwd_cmd=[("10.0.2.100", 3142, "/usr/bin/python3 -I /x,y/relay.py 40001")]), tmp_path).argv("tcg")
    netdev = option(argv, "-netdev", "user")
    assert "restrict=on" in netdev
    assert netdev.endswith(",guestfwd=tcp:10.0.2.100:3142-cmd:/usr/bin/python3 -I /x,,y/relay.py 40001")


def test_kvm_means_the_host_cpu_and_too_many_cdroms_are_refused(tmp_path):
    assert accel_args("kvm") == ["-accel", "kvm", "-cpu", "host"]
    with pytest.raises(ValueError, match="three"):
        QemuVm(spec(cdroms=[Path(f"/c{i}.iso") for i in range(4)]), tmp_path).argv("tcg")


def test_long_run_folders_get_short_socket_paths(tmp_path):
    deep = tmp_path / ("x" * 90)
    vm = QemuVm(spec(), deep)
    assert len(str(vm.qga_socket)) < 108 and vm.serial_log.parent == deep
    vm.kill()  # never started: removes its socket folder
    assert not vm.qga_socket.parent.exists()
