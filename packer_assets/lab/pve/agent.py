"""The QEMU guest agent of the lab's VMs, and the node's network listing.

LabAgent, a mixin of LabPve, makes the agent answer for a running VM whose config enables it,
reporting an eth0 with the VM's MAC and the address the lab's guests are reached on, and keeps the
node's networks as state. Not to be confused with lab.guest.LabGuest, the SSH server those guests are.
"""

from __future__ import annotations

import re
from typing import Any

from fakepve.model import FakeVm
from fakepve.schema import Match
from fakepve.shapes import networks


def agent_enabled(config: dict[str, Any]) -> bool:
    """True if a VM config's `agent` option enables the guest agent ('1', 'enabled=1,...', '1,fstrim...')."""
    for part in str(config.get("agent", "0")).split(","):
        key, eq, value = part.partition("=")
        if (not eq and key.strip().lower() in ("1", "yes", "on", "true")) or \
                (eq and key.strip() == "enabled" and value.strip().lower() in ("1", "yes", "on", "true")):
            return True
    return False


class LabAgent:
    """Mixin: the guest agent of running VMs that enable it, and a stateful network listing of the node.

    lab_guest_ip is the address the agent reports for eth0 (the lab's guests are reached on loopback);
    lab_guest_os_name the OS name get-osinfo reports. A test can still set vm.agent to a dict of its own
    answers (fakepve's keys: 'interfaces', 'os', ...).
    """

    lab_guest_ip = "127.0.0.1"
    lab_guest_os_name = "Debian GNU/Linux"

    def _init_agent(self) -> None:
        # fakepve's generic answer (vmbr0 and eno1), kept here so a type filter works and tests can add bridges.
        self.lab_networks: list[dict[str, Any]] = networks({})

    def _routes_lab_node(self) -> list[tuple[str, str, Any]]:
        return [("GET", "/nodes/{node}/network", self._network_list)]

    async def _network_list(self, v: dict[str, Any], user: str) -> list[dict[str, Any]]:
        wanted = v.get("type")
        kinds = {"any_bridge": ("bridge", "OVSBridge"), "any_local_bridge": ("bridge", "OVSBridge"),
                 "include_sdn": None}.get(wanted, (wanted,) if wanted else None)
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
            pretty = f"{self.lab_guest_os_name} {data['result'].get('version', '')}"
            data["result"] = dict(data["result"], name=self.lab_guest_os_name, **{"pretty-name": pretty})
        return data

    def lab_interfaces(self, vm: FakeVm) -> list[dict[str, Any]]:
        """What the agent reports: loopback, and eth0 with net0's MAC and lab_guest_ip."""
        found = re.search(r"([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})", str(vm.config.get("net0", "")))
        mac = found.group(1).lower() if found else "bc:24:11:00:00:01"
        family = "ipv6" if ":" in self.lab_guest_ip else "ipv4"
        prefix = 64 if family == "ipv6" else 8 if self.lab_guest_ip.startswith("127.") else 24
        return [{"name": "lo", "hardware-address": "00:00:00:00:00:00",
                 "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8},
                                  {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128}]},
                {"name": "eth0", "hardware-address": mac,
                 "ip-addresses": [{"ip-address": self.lab_guest_ip, "ip-address-type": family, "prefix": prefix}]}]
