"""PVE's NoCloud cloud-init drive, written as a Proxmox node writes it, for a real guest to read.

A clone given `ciuser`/`cipassword`/`sshkeys`/`ipconfig0` on a real node boots with a small ISO (volume
id `cidata`) holding user-data, meta-data, network-config and vendor-data. The real guest's cloud-init
must see exactly what it would see there, so this is a line-for-line port of
PVE::QemuServer::Cloudinit (qemu-server, src/PVE/QemuServer/Cloudinit.pm: cloudinit_userdata,
nocloud_network, nocloud_gen_metadata, generate_nocloud, commit_cloudinit_disk), not a template of
our own. What it ports, and from where:

- user-data: `#cloud-config`, hostname/fqdn from `name` (default `VM<vmid>`) and `searchdomain`,
  `user`, `password` (the config's value: a crypt hash, see `encrypt_pw`), `ssh_authorized_keys` from
  the percent-encoded `sshkeys`, `chpasswd: expire: False`, `users: [default]`, and
  `package_upgrade: true` unless `ciupgrade` is 0.
- network-config: version 1, one physical `eth<N>` per `net<N>` that has an `ipconfig<N>`, matched
  by the NIC's MAC address; then a nameserver entry from `nameserver`/`searchdomain` or, as PVE does,
  from the host's resolv.conf.
- meta-data: `instance-id: <sha1 hex of user-data + network-config>` (a changed config is a new
  instance to cloud-init).
- vendor-data: empty.
- the ISO: `genisoimage -iso-level 3 -J -R -V cidata` of those four files, here with pycdlib.

The password never appears in plain: PVE's API stores `cipassword` as a SHA-256 crypt hash
(`encrypt_pw`, PVE::Tools::encrypt_pw) unless it is a hash already, and the drive carries that hash.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pycdlib
from passlib.hash import sha256_crypt

from packer_assets.evidence.layout import atomic_write

VOLUME_ID = "cidata"
# Names in the ISO as PVE writes them; ISO9660 names (level 3: d-characters) beside Joliet/Rock Ridge ones.
NOCLOUD_FILES = ("user-data", "network-config", "meta-data", "vendor-data")
MAX_SNIPPETS = 3 * 1024 * 1024  # PVE: "Cloud-Init sum of snippets too big (> 3 MiB)"

# PVE's API keeps a cipassword that already looks like a crypt hash (API2/Qemu.pm), else hashes it.
_CRYPT_HASH = re.compile(r"^\$(?:[156]|2[ay])(\$.+){2}")
_SALT_ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def encrypt_pw(password: str) -> str:
    """What PVE's API stores for a `cipassword`: a SHA-256 crypt hash (`$5$<8-char salt>$...`, crypt's
    default 5000 rounds), or the value itself when it already is a crypt hash."""
    if _CRYPT_HASH.match(password):
        return password
    salt = "".join(secrets.choice(_SALT_ALPHABET) for _ in range(8))
    return sha256_crypt.using(salt=salt, rounds=5000).hash(password)


def parse_property_string(value: str, default_key: str | None = None) -> dict[str, str]:
    """`k=v,k=v` (PVE property string); a bare first item goes to `default_key`."""
    props: dict[str, str] = {}
    for item in (part for part in str(value).split(",") if part):
        key, sep, val = item.partition("=")
        if not sep:
            if default_key is None:
                raise ValueError(f"property string item without a key: {item!r}")
            key, val = default_key, item
        props[key] = val
    return props


NET_MODELS = (
    "e1000",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "rtl8139",
    "virtio",
    "vmxnet3",
)


def parse_net(value: str) -> dict[str, str]:
    """A `net<N>` value (`virtio=BC:24:11:..,bridge=vmbr0` or `model=virtio,macaddr=..`) with `model`
    and `macaddr` split out, as PVE::QemuServer::Network::parse_net does."""
    props = parse_property_string(value, default_key="model")
    for model in NET_MODELS:
        if model in props:
            props["model"], props["macaddr"] = model, props.pop(model)
    return props


def parse_ipconfig(value: str) -> dict[str, str]:
    """An `ipconfig<N>` value: ip (CIDR or dhcp), gw, ip6 (CIDR, dhcp or auto), gw6. As PVE's
    parse_ipconfig: a contradictory one (a gateway without an address, or with DHCP) counts as empty
    (PVE warns and writes no subnet), and one with neither address means DHCP for both."""
    props = parse_property_string(value)
    ip, ip6 = props.get("ip"), props.get("ip6")
    if (
        (props.get("gw") and not ip)
        or (props.get("gw6") and not ip6)
        or (props.get("gw") and ip == "dhcp")
        or (props.get("gw6") and ip6 in ("dhcp", "auto"))
    ):
        return {}
    if not ip and not ip6:
        return {"ip": "dhcp", "ip6": "dhcp"}
    return props


def host_dns(resolv_conf: str | os.PathLike[str] = "/etc/resolv.conf") -> tuple[str | None, list[str]]:
    """(search, up to three nameservers) of a resolv.conf, read as PVE::INotify reads the host's: the
    last `search`/`domain` line's first word; `nameserver` lines with an IP address."""
    search, nameservers = None, []
    try:
        lines = Path(resolv_conf).read_text().splitlines()
    except OSError:
        return None, []
    for line in lines:
        if m := re.match(r"^(search|domain)\s+(\S+)\s*", line):
            search = m.group(2)
        elif (m := re.match(r"^\s*nameserver\s+(\S+)\s*", line)) and _is_ip(m.group(1)) and len(nameservers) < 3:
            nameservers.append(m.group(1))
    return search, nameservers


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def dns_conf(config: Mapping[str, Any], resolv_conf: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(search domains, nameservers): the VM's own, or the host's (PVE's get_dns_conf)."""
    host_search, host_nameservers = host_dns(resolv_conf)
    search = config.get("searchdomain")
    search = search if search is not None else (host_search or "")
    nameserver = config.get("nameserver")
    nameservers = host_nameservers if nameserver is None else str(nameserver).split()
    return str(search).split(), nameservers


def hostname_fqdn(config: Mapping[str, Any], vmid: int) -> tuple[str, str]:
    hostname = str(config.get("name") or f"VM{vmid}")
    if "." in hostname:
        return hostname.split(".", 1)[0], hostname
    if search := config.get("searchdomain"):
        return hostname, f"{hostname}.{search}"
    return hostname, hostname


def decode_sshkeys(value: str) -> list[str]:
    """The key lines of `sshkeys` (PVE keeps it percent-encoded): unescaped, split, blank lines dropped."""
    return [line for line in unquote(value).split("\n") if line.strip()]


def user_data(config: Mapping[str, Any], vmid: int) -> str:
    hostname, fqdn = hostname_fqdn(config, vmid)
    out = ["#cloud-config", f"hostname: {hostname}", "manage_etc_hosts: true", f"fqdn: {fqdn}"]
    username, password = config.get("ciuser"), config.get("cipassword")
    if username is not None:
        out.append(f"user: {username}")
        if username == "root":
            out.append("disable_root: False")
    if password is not None:
        out.append(f"password: {password}")
    if (keys := config.get("sshkeys")) is not None:
        out.append("ssh_authorized_keys:")
        out += [f"  - {key}" for key in decode_sshkeys(str(keys))]
    out += ["chpasswd:", "  expire: False"]
    if username is None or username != "root":
        out += ["users:", "  - default"]
    if config.get("ciupgrade") is None or _true(config["ciupgrade"]):
        out.append("package_upgrade: true")
    return "\n".join(out) + "\n"


def _true(value: Any) -> bool:
    return str(value).lower() not in ("0", "false", "no", "off", "")


def _netmask(prefix: str) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{int(prefix)}").netmask)


def network_config(config: Mapping[str, Any], resolv_conf: str | os.PathLike[str] = "/etc/resolv.conf") -> str:
    """cloud-init network config version 1, as PVE's nocloud_network writes it."""
    out = "version: 1\nconfig:\n"
    indent = "    "
    for iface in sorted(k for k in config if re.fullmatch(r"net\d+", k)):
        index = iface[3:]
        if not config.get(f"ipconfig{index}"):
            continue
        net, ipconfig = parse_net(str(config[iface])), parse_ipconfig(str(config[f"ipconfig{index}"]))
        if not net.get("macaddr"):
            raise ValueError(f"network interface '{iface}' has no mac address")
        i = indent
        out += (
            f"{i}- type: physical\n{i}  name: eth{index}\n{i}  mac_address: '{net['macaddr'].lower()}'\n{i}  subnets:\n"
        )
        i += "  "
        if (ip := ipconfig.get("ip")) is not None:
            if ip == "dhcp":
                out += f"{i}- type: dhcp4\n"
            else:
                addr, sep, prefix = ip.partition("/")
                if not sep:
                    raise ValueError(f"not a CIDR: {ip}")
                out += f"{i}- type: static\n{i}  address: '{addr}'\n{i}  netmask: '{_netmask(prefix)}'\n"
                if (gw := ipconfig.get("gw")) is not None:
                    out += f"{i}  gateway: '{gw}'\n"
        if (ip6 := ipconfig.get("ip6")) is not None:
            if ip6 == "dhcp":
                out += f"{i}- type: dhcp6\n"
            elif ip6 == "auto":
                out += f"{i}- type: ipv6_slaac\n"
            else:
                out += f"{i}- type: static6\n{i}  address: '{ip6}'\n"
                if (gw6 := ipconfig.get("gw6")) is not None:
                    out += f"{i}  gateway: '{gw6}'\n"
    # PVE tests two array references here, always true: the entry is written even when both are empty.
    search, nameservers = dns_conf(config, resolv_conf)
    out += f"{indent}- type: nameserver\n"
    if nameservers:
        out += f"{indent}  address:\n" + "".join(f"{indent}  - '{ns}'\n" for ns in nameservers)
    if search:
        out += f"{indent}  search:\n" + "".join(f"{indent}  - '{s}'\n" for s in search)
    return out


def meta_data(user: str, network: str) -> str:
    return f"instance-id: {hashlib.sha1((user + network).encode()).hexdigest()}\n"


def nocloud_files(
    config: Mapping[str, Any], vmid: int, resolv_conf: str | os.PathLike[str] = "/etc/resolv.conf"
) -> dict[str, bytes]:
    """The four files of a VM's NoCloud drive, by name, from its PVE config."""
    user = user_data(config, vmid)
    network = network_config(config, resolv_conf)
    files = {"user-data": user, "network-config": network, "meta-data": meta_data(user, network), "vendor-data": ""}
    if sum(len(v.encode()) for v in files.values()) > MAX_SNIPPETS:
        raise ValueError("Cloud-Init sum of snippets too big (> 3 MiB)")
    return {name: text.encode() for name, text in files.items()}


def write_cidata_iso(path: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """An ISO9660 image (level 3, Joliet, Rock Ridge; volume id `cidata`) holding `files` at its root,
    as genisoimage makes it for PVE. Written atomically, mode 0600 (it carries the password hash)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    out = io.BytesIO()
    try:
        for name, data in files.items():
            if "/" in name:
                raise ValueError(f"the cidata ISO holds flat names, got {name!r}")
            iso_name = "/" + re.sub(r"[^A-Z0-9_]", "_", name.upper())[:30] + ".;1"
            iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path=f"/{name}")
        iso.write_fp(out)
    finally:
        iso.close()
    return atomic_write(Path(path), out.getvalue(), mode=0o600)


def write_nocloud_drive(
    path: str | os.PathLike[str],
    config: Mapping[str, Any],
    vmid: int,
    resolv_conf: str | os.PathLike[str] = "/etc/resolv.conf",
) -> Path:
    """The cidata ISO of a VM's PVE config at `path` (what PVE writes to `vm-<vmid>-cloudinit`)."""
    return write_cidata_iso(path, nocloud_files(config, vmid, resolv_conf))
