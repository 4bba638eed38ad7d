"""The QEMU guest agent of the lab's VMs, and the node's network listing.

LabAgent, a mixin of LabPve, makes the agent answer for a running VM whose config enables it,
reporting an eth0 with the VM's MAC and the address the lab's guests are reached on, and keeps the
node's networks as state. Not to be confused with lab.guest.LabGuest, the SSH server those guests are.
"""

from __future__ import annotations

import re
from typing import Any

from fakepve import agent as guest_agent
from fakepve.model import FakeVm
from fakepve.schema import Match
from fakepve.shapes import networks

from packer_assets.catalog import ExpectedOs
from packer_assets.pve.smoke import agent_enabled
from packer_assets.render import read_iso

# What the lab's ISOs stand for: the OS name per os-release ID (Windows: the agent's id is mswindows).
OS_NAMES = {"ubuntu": "Ubuntu", "debian": "Debian GNU/Linux", "rocky": "Rocky Linux", "mswindows": "Microsoft Windows"}
# Each release's codename as its own /etc/os-release writes it (VERSION="13 (trixie)", VERSION_CODENAME=trixie;
# Ubuntu: VERSION="26.04 LTS (Resolute Raccoon)"; Rocky names its releases in VERSION only).
RELEASE_NAMES: dict[tuple[str, str], tuple[str, str]] = {  # (id, major) -> (VERSION_CODENAME, the name in VERSION)
    ("debian", "12"): ("bookworm", "bookworm"),
    ("debian", "13"): ("trixie", "trixie"),
    ("ubuntu", "22"): ("jammy", "Jammy Jellyfish"),
    ("ubuntu", "24"): ("noble", "Noble Numbat"),
    ("ubuntu", "26"): ("resolute", "Resolute Raccoon"),
    ("rocky", "9"): ("", "Blue Onyx"),
    ("rocky", "10"): ("", "Red Quartz"),
}
# Windows Server releases: the OS build the guest agent reports as kernel-release.
WINDOWS_BUILDS = {"2022": "20348", "2025": "26100"}
ISO_VOLUME = re.compile(r"(?:^|,)(?:file=)?([^:,=]+):iso/([^,]+\.iso)(?:,|$)")


def os_release_text(expected: ExpectedOs) -> str:
    """/etc/os-release of the system a lab ISO installs (the OS its key expects), with the release's own
    NAME, VERSION, VERSION_CODENAME and PRETTY_NAME where the lab knows the release."""
    name = OS_NAMES.get(expected.id, expected.id)
    version_id = expected.version_id or "1"  # any release will do: the lab's is 1
    if expected.id == "mswindows":
        pretty = f"Windows Server {version_id} Standard"
        return f'NAME="{name}"\nID={expected.id}\nVERSION_ID="{version_id}"\nPRETTY_NAME="{pretty}"\n'
    codename, called = RELEASE_NAMES.get((expected.id, version_id.split(".")[0]), ("", ""))
    lts = " LTS" if expected.id == "ubuntu" and version_id.split(".")[0] in ("22", "24", "26") else ""
    version = f"{version_id}{lts} ({called})" if called else version_id
    pretty = f"{name} {version_id}{lts}" + (f" ({called})" if called and expected.id != "ubuntu" else "")
    lines = [f'NAME="{name}"', f'VERSION="{version}"', f"ID={expected.id}", f'VERSION_ID="{version_id}"']
    lines += [f"VERSION_CODENAME={codename}"] if codename else []
    return "\n".join([*lines, f'PRETTY_NAME="{pretty}"']) + "\n"


def osinfo_from_os_release(text: str) -> dict[str, str]:
    """What the QEMU guest agent's get-osinfo answers for that os-release."""
    fields = {}
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq:
            fields[name.strip()] = value.strip().strip('"')
    info = {
        "id": fields.get("ID", ""),
        "name": fields.get("NAME", ""),
        "pretty-name": fields.get("PRETTY_NAME", ""),
        "version-id": fields.get("VERSION_ID", ""),
        "version": fields.get("VERSION") or fields.get("VERSION_ID", ""),
        "kernel-release": "6.1.0",
        "kernel-version": "#1 SMP",
        "machine": "x86_64",
    }
    if info["id"] == "mswindows":
        info.update(
            {
                "kernel-release": WINDOWS_BUILDS.get(info["version-id"], "20348"),
                "kernel-version": "10.0",
                "machine": "x86_64",
                "version": f"Microsoft Windows Server {info['version-id']}",
            }
        )
    return info


def _release_number(files: dict[str, bytes]) -> int | None:
    """The mirror release a lab ISO is (its release.txt), None if it names none."""
    text = files.get("release.txt", b"").decode().strip()
    return int(text) if text.isdigit() else None


class LabAgent:
    """Mixin: the guest agent of running VMs that enable it, and a stateful network listing of the node.

    lab_guest_ip is the address the agent reports for eth0 (the lab's guests are reached on loopback).
    The OS get-osinfo reports is the VM's own: read, when the VM is created, from the `os-release` file of
    the ISO it boots (the lab mirror writes one into each key's ISO), and carried over to its clones; a
    VM without one reports lab_default_os (a test sets it). The ISO's `release.txt` (the mirror release)
    is kept as vm.lab_release the same way: it decides the packages the guest has (guest_answers). A test
    can still set vm.agent to a dict of its own answers (fakepve's keys: 'interfaces', 'os', ...).
    """

    lab_guest_ip = "127.0.0.1"
    lab_default_os: dict[str, str] | None = None  # None: fakepve's answer

    def _init_agent(self) -> None:
        # fakepve's generic answer (vmbr0 and eno1), kept here so a type filter works and tests can add bridges.
        self.lab_networks: list[dict[str, Any]] = networks({})

    def _routes_lab_node(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/nodes/{node}/network", self._network_list)]

    async def _network_list(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        wanted = v.get("type")
        kinds = {
            "any_bridge": ("bridge", "OVSBridge"),
            "any_local_bridge": ("bridge", "OVSBridge"),
            "include_sdn": None,
        }.get(wanted, (wanted,) if wanted else None)
        return [dict(n) for n in self.lab_networks if kinds is None or n["type"] in kinds]

    async def _agent_call(self, match: Match, values: dict[str, Any]) -> dict[str, Any]:
        vm = self.find(values["node"], values["vmid"])
        auto = getattr(vm, "lab_agent_auto", False)
        if agent_enabled(vm.config) and vm.agent is None:
            vm.agent, vm.lab_agent_auto = {}, True  # the agent comes up with the enabled VM
        elif not agent_enabled(vm.config) and auto:
            vm.agent, vm.lab_agent_auto = None, False  # disabled in the config: it is gone
        data = await super()._agent_call(match, values)
        command = match.template.rsplit("/", 1)[1]
        if command == "network-get-interfaces" and "interfaces" not in vm.agent:
            data = {"result": self.lab_interfaces(vm)}
        elif command == "get-osinfo" and "os" not in vm.agent:
            data["result"] = self.lab_reported_os(vm)
        return data

    def lab_reported_os(self, vm: FakeVm) -> dict[str, str]:
        """What get-osinfo answers for vm: a test's vm.agent['os'], the VM's own OS, lab_default_os, fakepve's."""
        own = (vm.agent or {}).get("os") or getattr(vm, "lab_os", None) or self.lab_default_os
        return dict(own) if own else guest_agent.default(vm, "get-osinfo")

    async def _qm_create(self, v: dict[str, Any], user: str) -> Any:
        answer = await super()._qm_create(v, user)
        vm = self.vm(int(v["vmid"]))
        if vm is not None:
            files = self._installed_iso_files(vm)
            vm.lab_os = osinfo_from_os_release(files["os-release"].decode()) if files else None
            vm.lab_release = _release_number(files) if files else None
        return answer

    async def _qm_clone(self, v: dict[str, Any], user: str) -> Any:
        source = self.find(v["node"], v["vmid"])
        answer = await super()._qm_clone(v, user)
        clone = self.vm(int(v["newid"]))
        if clone is not None:
            # the clone's disk is the template's system
            clone.lab_os, clone.lab_release = getattr(source, "lab_os", None), getattr(source, "lab_release", None)
        return answer

    def _installed_iso_files(self, vm: FakeVm) -> dict[str, bytes] | None:
        """The files of the lab ISO the VM boots to install its system: the first attached ISO with an os-release."""
        for value in vm.config.values():
            found = ISO_VOLUME.search(str(value))
            path = self.content_file(found.group(1), "iso", found.group(2)) if found else None
            if path is not None and path.is_file():
                try:
                    _volume, files = read_iso(path)
                except Exception:  # noqa: BLE001 - not one of the lab's ISOs: it says nothing about the OS
                    continue
                if "os-release" in files:
                    return files
        return None

    def lab_interfaces(self, vm: FakeVm) -> list[dict[str, Any]]:
        """What the agent reports: loopback, and eth0 with net0's MAC and lab_guest_ip."""
        found = re.search(r"([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})", str(vm.config.get("net0", "")))
        mac = found.group(1).lower() if found else "bc:24:11:00:00:01"
        family = "ipv6" if ":" in self.lab_guest_ip else "ipv4"
        prefix = 64 if family == "ipv6" else 8 if self.lab_guest_ip.startswith("127.") else 24
        return [
            {
                "name": "lo",
                "hardware-address": "00:00:00:00:00:00",
                "ip-addresses": [
                    {"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8},
                    {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128},
                ],
            },
            {
                "name": "eth0",
                "hardware-address": mac,
                "ip-addresses": [{"ip-address": self.lab_guest_ip, "ip-address-type": family, "prefix": prefix}],
            },
        ]
