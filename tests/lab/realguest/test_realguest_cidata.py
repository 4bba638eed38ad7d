"""The NoCloud drive a real lab guest gets is the one a Proxmox node would write.

The expected files below are PVE's own output: they were produced by running cloudinit_userdata,
nocloud_network and nocloud_gen_metadata of qemu-server's src/PVE/QemuServer/Cloudinit.pm (commit
e6352be67f70) under perl on these configs, with the host's resolv.conf given as here.
"""

import textwrap

from passlib.hash import sha256_crypt

from packer_assets.pve.smoke import encode_sshkeys
from packer_assets.render import read_iso
from packer_assets_lab.realguest import cidata

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl smoke@test"
HASH = "$5$abcdefgh$0123456789abcdefghijklmnopqrstuvwxyzABCDE"


def resolv(tmp_path, text):
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    return path


def files_of(config, vmid, resolv_conf):
    return {name: data.decode() for name, data in cidata.nocloud_files(config, vmid, resolv_conf).items()}


def test_a_smoke_clone_config_gives_what_pve_writes(tmp_path):
    config = {"name": "c1", "ciuser": "smoke", "net0": "virtio=BC:24:11:2A:3B:4C,bridge=vmbr0", "ipconfig0": "ip=dhcp"}
    files = files_of(config, 9301, resolv(tmp_path, "search example.org\nnameserver 192.0.2.53\n"))
    assert files == {
        "user-data": "#cloud-config\nhostname: c1\nmanage_etc_hosts: true\nfqdn: c1\nuser: smoke\n"
                     "chpasswd:\n  expire: False\nusers:\n  - default\npackage_upgrade: true\n",
        "network-config": textwrap.dedent("""\
            version: 1
            config:
                - type: physical
                  name: eth0
                  mac_address: 'bc:24:11:2a:3b:4c'
                  subnets:
                  - type: dhcp4
                - type: nameserver
                  address:
                  - '192.0.2.53'
                  search:
                  - 'example.org'
            """),
        "meta-data": "instance-id: 27181c8094e40b2096a1dc23f7cbeab3d2c99ddf\n",
        "vendor-data": "",
    }


def test_static_addresses_two_nics_root_keys_and_no_upgrade_as_pve(tmp_path):
    config = {
        "name": "clone.lab.test", "ciuser": "root", "cipassword": HASH, "ciupgrade": 0,
        "sshkeys": encode_sshkeys(f"{KEY}\nssh-rsa AAAAB3Nza second@test"),
        "net0": "model=virtio,macaddr=BC:24:11:00:00:01", "net1": "e1000=bc:24:11:00:00:02,bridge=vmbr1",
        "ipconfig0": "ip=192.0.2.10/24,gw=192.0.2.1,ip6=2001:db8::10/64,gw6=2001:db8::1", "ipconfig1": "ip6=auto",
        "nameserver": "10.0.2.3 10.0.2.4", "searchdomain": "lab.test other.test",
    }
    files = files_of(config, 9302, resolv(tmp_path, "search example.org\nnameserver 192.0.2.53\n"))
    assert files["user-data"] == textwrap.dedent(f"""\
        #cloud-config
        hostname: clone
        manage_etc_hosts: true
        fqdn: clone.lab.test
        user: root
        disable_root: False
        password: {HASH}
        ssh_authorized_keys:
          - {KEY}
          - ssh-rsa AAAAB3Nza second@test
        chpasswd:
          expire: False
        """)
    assert files["network-config"] == textwrap.dedent("""\
        version: 1
        config:
            - type: physical
              name: eth0
              mac_address: 'bc:24:11:00:00:01'
              subnets:
              - type: static
                address: '192.0.2.10'
                netmask: '255.255.255.0'
                gateway: '192.0.2.1'
              - type: static6
                address: '2001:db8::10/64'
                gateway: '2001:db8::1'
            - type: physical
              name: eth1
              mac_address: 'bc:24:11:00:00:02'
              subnets:
              - type: ipv6_slaac
            - type: nameserver
              address:
              - '10.0.2.3'
              - '10.0.2.4'
              search:
              - 'lab.test'
              - 'other.test'
        """)
    assert files["meta-data"] == "instance-id: 7c20d162c11a25d90cfb2bd6c252c2cd86ef9215\n"


def test_contradictory_ipconfig_gives_no_subnet_and_a_nic_without_ipconfig_is_left_out(tmp_path):
    config = {"name": "x", "net0": "virtio=BC:24:11:00:00:05", "ipconfig0": "gw=10.0.0.1",
              "net1": "virtio=BC:24:11:00:00:06", "ipconfig1": "ip=10.1.2.3/16", "net2": "virtio=BC:24:11:00:00:07"}
    files = files_of(config, 9304, resolv(tmp_path, "nameserver 10.0.0.1\n"))
    assert files["network-config"] == textwrap.dedent("""\
        version: 1
        config:
            - type: physical
              name: eth0
              mac_address: 'bc:24:11:00:00:05'
              subnets:
            - type: physical
              name: eth1
              mac_address: 'bc:24:11:00:00:06'
              subnets:
              - type: static
                address: '10.1.2.3'
                netmask: '255.255.0.0'
            - type: nameserver
              address:
              - '10.0.0.1'
        """)
    assert files["meta-data"] == "instance-id: 89dd39201b1fb1ecc642146ace55122536e4ebe5\n"
    assert files["user-data"].endswith("users:\n  - default\npackage_upgrade: true\n")


def test_a_changed_config_is_a_new_instance_for_cloud_init(tmp_path):
    conf = resolv(tmp_path, "")
    base = {"ciuser": "smoke", "net0": "virtio=BC:24:11:00:00:01", "ipconfig0": "ip=dhcp"}
    first = files_of(base, 100, conf)["meta-data"]
    assert files_of(base, 100, conf)["meta-data"] == first
    assert files_of({**base, "sshkeys": encode_sshkeys(KEY)}, 100, conf)["meta-data"] != first
    assert files_of(base, 101, conf)["meta-data"] != first  # hostname VM101


def test_the_iso_reads_back_as_cloud_init_reads_it(tmp_path):
    config = {"name": "c1", "ciuser": "smoke", "cipassword": HASH, "sshkeys": encode_sshkeys(KEY),
              "net0": "virtio=BC:24:11:2A:3B:4C", "ipconfig0": "ip=dhcp"}
    written = cidata.nocloud_files(config, 9301, resolv(tmp_path, ""))
    iso = cidata.write_nocloud_drive(tmp_path / "vm-9301-cloudinit.iso", config, 9301, resolv(tmp_path, ""))
    volume_id, files = read_iso(iso)
    assert volume_id == "cidata"  # NoCloud finds the drive by this label
    assert files == written
    assert set(files) == {"user-data", "meta-data", "network-config", "vendor-data"}
    assert not list(tmp_path.glob(".*.tmp")) and iso.stat().st_mode & 0o777 == 0o600


def test_the_password_is_stored_and_written_only_as_pves_sha256_crypt_hash(tmp_path):
    stored = cidata.encrypt_pw("correct horse")
    assert stored.startswith("$5$") and len(stored.split("$")[2]) == 8  # PVE: crypt() with "$5$<8 chars>$"
    assert sha256_crypt.verify("correct horse", stored)
    assert cidata.encrypt_pw(stored) == stored  # a hash is kept, as PVE's API keeps it
    assert cidata.encrypt_pw("$6$saltsalt$" + "x" * 86).startswith("$6$saltsalt$")
    iso = cidata.write_nocloud_drive(tmp_path / "ci.iso", {"ciuser": "u", "cipassword": stored}, 1, resolv(tmp_path, ""))
    assert b"correct horse" not in iso.read_bytes()
    assert f"password: {stored}\n".encode() in read_iso(iso)[1]["user-data"]


def test_host_dns_is_read_as_pve_reads_resolv_conf(tmp_path):
    conf = resolv(tmp_path, "domain a.test\nsearch b.test c.test\nnameserver 10.0.0.1\nnameserver not-an-ip\n"
                            "nameserver 10.0.0.2\nnameserver ::1\nnameserver 10.0.0.4\n")
    assert cidata.host_dns(conf) == ("b.test", ["10.0.0.1", "10.0.0.2", "::1"])
    assert cidata.host_dns(tmp_path / "missing") == (None, [])
