"""What the lab's guests answer to guest-exec: the smoke test's checks, the package inventory, site commands.

fakepve's agent answers every exec with exit 0 and no output. LabGuestExec, a mixin of LabPve (next to
LabAgent, whose reported OS it uses), answers `exec-status` from the argv of that pid as a guest of the
VM's OS family would, FROM THE VM'S STATE (guest_state.GuestState, kept by simguest.py: what the answer
file installed and the provisioners changed): fresh_identity fails when machine-id or the host keys date
from an earlier boot (Windows: no CloneTag), password_locked reads the user's password state,
guest_agent_enabled asks the state's units (`systemctl is-enabled` as guest_shell answers it), cloud_init
fails as `not found` (127) without cloud-init, and sbom.inventory_command prints the state's packages in
the family's format (inventory.py). Any other command (a site command) exits 0 with no output. A test's
own vm.agent['exec'] answers still win.

Faults make a guest answer as one that was not generalized would, so tests can prove each check fails:
`lab_faults` maps a catalog key to fault names (FAULTS), applied to the VMs named `<key>-...` (smoke
clones are `<key>-smoke-<template vmid>`). `lab_ssh_keys` tells the lab's SSH guest (lab.guest.LabGuest)
which keys the cloud-init user of a running VM logs in with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from fakepve.model import FakeVm
from fakepve.schema import Match

from packer_assets.inspection import guest_checks, sbom
from packer_assets_lab.pve.guest_shell import Shell
from packer_assets_lab.pve.guest_state import GuestState, user_state
from packer_assets_lab.pve.inventory import format_inventory, inventory_output

FAULTS = frozenset(
    {"cloud_init", "fresh_identity", "password_locked", "guest_agent_enabled", "ssh_login", "inventory", "commands"}
)
INVENTORY, OTHER = "inventory", "commands"  # command kinds besides the checks' names
FAMILY_OF_OS = {"debian": "debian", "ubuntu": "ubuntu", "rocky": "rocky", "mswindows": "windows"}
# Dates in answers (boot, clone tag) count from here, so the same VM answers the same text in every run.
LAB_EPOCH = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Guest:
    """What a guest's answers depend on."""

    family: str  # debian, ubuntu, rocky, windows
    os_version: str
    release: int  # the lab mirror's release of the ISO the VM's system was installed from
    vmid: int
    boot: int  # which start of this vmid on the node was this VM's first: a new identity per clone
    host_keys: tuple[str, ...] = ()  # `type base64` of the SSH host keys (the lab guest's)
    faults: frozenset[str] = frozenset()
    state: GuestState | None = None  # what ran on it (simguest.py); None: answers as a generalized system

    @property
    def windows(self) -> bool:
        return self.family == "windows"

    @property
    def booted_at(self) -> dt.datetime:
        return LAB_EPOCH + dt.timedelta(hours=self.boot, seconds=self.vmid % 3600)

    @property
    def machine_id(self) -> str:
        return hashlib.sha256(f"lab-machine-id:{self.vmid}:{self.boot}".encode()).hexdigest()[:32]

    def text(self, *lines: str) -> str:
        """Lines as the guest prints them (PowerShell ends them with CRLF)."""
        end = "\r\n" if self.windows else "\n"
        return "".join(line + end for line in lines)


@dataclass(frozen=True)
class Answer:
    exitcode: int
    out: str = ""
    err: str = ""

    def status(self) -> dict[str, Any]:
        """As PVE's `agent/exec-status` answers for a process that exited."""
        return {"exited": True, "exitcode": self.exitcode, "out-data": self.out, "err-data": self.err}


def command_kind(argv: list[str], family: str) -> str:
    """The name of the family's agent check that argv runs (its argv is a prefix: params follow),
    INVENTORY for the family's inventory command, else OTHER."""
    for check in guest_checks.FAMILY_CHECKS.get(family, ()):
        if check.via == "agent" and tuple(argv[: len(check.argv)]) == check.argv:
            return check.name
    if argv == sbom.inventory_command(family):
        return INVENTORY
    return OTHER


def answer(argv: list[str], guest: Guest) -> Answer:
    """What the guest answers to argv run by its agent."""
    kind = command_kind(argv, guest.family)
    return ANSWERS[kind](guest, argv, kind in guest.faults)


def _cloud_init(guest: Guest, argv: list[str], broken: bool) -> Answer:
    if guest.state is not None and not guest.state.has("cloud-init"):
        return Answer(127, err=guest.text("sh: 1: cloud-init: not found"))
    status = "error" if broken else "done"
    errors = (
        ["errors:", "\t- ('scripts_user', RuntimeError('Runparts: 1 failures (part-001) in 1 attempted commands'))"]
        if broken
        else ["errors: []"]
    )
    out = guest.text(
        f"status: {status}",
        f"extended_status: {'error - done' if broken else 'done'}",
        "boot_status_code: enabled-by-generator",
        f"last_update: {guest.booted_at + dt.timedelta(seconds=21):%a, %d %b %Y %H:%M:%S +0000}",
        "detail:",
        "DataSourceNoCloud [seed=/dev/sr1][dsmode=net]",
        *errors,
        "recoverable_errors: {}",
    )
    return Answer(1 if broken else 0, out)


def _fresh_identity(guest: Guest, argv: list[str], broken: bool) -> Answer:
    state = guest.state
    if guest.windows:
        if broken or (state is not None and state.clone_tag_boot is None):
            return Answer(1, guest.text("HKLM:\\SYSTEM\\Setup has no CloneTag: sysprep /generalize never ran"))
        return Answer(0, guest.text(f"clone-tag {guest.booted_at:%a %b %d %H:%M:%S %Y}"))
    stale = state.identity_is_fresh() if state is not None else None
    if stale is not None and not broken:
        return Answer(1, guest.text(stale))
    if broken:
        return Answer(
            1,
            guest.text(
                "/etc/machine-id dates from before this boot: the template kept the "
                "install's identity (not generalized)"
            ),
        )
    machine_id = state.machine_id if state is not None else guest.machine_id
    return Answer(0, guest.text(f"machine-id {machine_id}", *(f"host-key {key}" for key in guest.host_keys)))


def _password_locked(guest: Guest, argv: list[str], broken: bool) -> Answer:
    user = argv[-1]  # the check appends the install user to its script's argv
    found = user_state(guest.state, user) if guest.state is not None else "locked"
    if found is None and not broken:
        return Answer(1, guest.text(f"user {user} does not exist: not the install user the template was built with"))
    if broken or found != "locked":
        return Answer(
            1, guest.text(f"{user} can still log in with the install password: the template was not generalized")
        )
    return Answer(0, guest.text(f"{user}: password locked"))


def _agent_enabled(guest: Guest, argv: list[str], broken: bool) -> Answer:
    state = guest.state
    if guest.windows:  # (Get-Service).StartType prints it and succeeds either way
        if state is not None and not state.agent_start_type and not broken:
            return Answer(1, err=guest.text("Get-Service : Cannot find any service with service name 'QEMU-GA'."))
        return Answer(0, guest.text("Manual" if broken else (state.agent_start_type if state else "Automatic")))
    if state is not None and not broken:
        shell = Shell(state)
        status = shell.simple(["systemctl", "is-enabled", "qemu-guest-agent"])
        return Answer(status, guest.text(*"".join(shell.out).splitlines()))
    if broken:
        return Answer(1, guest.text("disabled"))  # systemctl is-enabled exits 1 for a disabled unit
    # Debian's unit has no [Install] section (udev starts it): static; Rocky's is enabled by a preset
    return Answer(0, guest.text("enabled" if guest.family == "rocky" else "static"))


INVENTORY_ERRORS = {
    "debian": "dpkg-query: error: cannot access archive '/var/lib/dpkg/status': No such file or directory",
    "rocky": "error: cannot open Packages database in /var/lib/rpm",
    "windows": "Get-HotFix : Access is denied. (Exception from HRESULT: 0x80070005 (E_ACCESSDENIED))",
}


def _inventory(guest: Guest, argv: list[str], broken: bool) -> Answer:
    if broken:
        return Answer(1, err=guest.text(INVENTORY_ERRORS.get(guest.family, INVENTORY_ERRORS["debian"])))
    state = guest.state
    rows = [[name, *fields] for name, fields in sorted(state.packages.items())] if state else None
    if rows is None:
        return Answer(0, inventory_output(guest.family, guest.os_version, guest.release))
    return Answer(0, format_inventory(guest.family, rows, guest.release))


def _other(guest: Guest, argv: list[str], broken: bool) -> Answer:
    return Answer(1, err=guest.text("lab fault: command failed")) if broken else Answer(0)


ANSWERS: dict[str, Callable[[Guest, list[str], bool], Answer]] = {
    "cloud_init": _cloud_init,
    "fresh_identity": _fresh_identity,
    "password_locked": _password_locked,
    "guest_agent_enabled": _agent_enabled,
    INVENTORY: _inventory,
    OTHER: _other,
}


def decode_sshkeys(value: str) -> list[str]:
    """The public key lines of a VM's `sshkeys` config: PVE keeps it percent-encoded (smoke.encode_sshkeys);
    a value that still looks encoded after one pass (a client encoded it twice) is decoded again."""
    text = unquote(value)
    if "%" in text and " " not in text.strip():
        text = unquote(text)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class LabGuestExec:
    """Mixin of LabPve (before LabAgent): guest-exec answers per VM, faults, and the clones' SSH login keys.

    lab_faults: catalog key -> names from FAULTS; applies to VMs whose name starts with `<key>-`.
    lab_guest_host_keys: `type base64` of the lab guest's host keys (LabStack sets them), printed by
    fresh_identity as the clone's own. lab_starts: vmid -> how many starts the node had for that vmid.
    """

    def _init_guest_exec(self) -> None:
        self.lab_faults: dict[str, set[str]] = {}
        self.lab_guest_host_keys: list[str] = []
        self.lab_starts: dict[int, int] = {}

    async def _do_start(self, vm: FakeVm, user: str, p: dict[str, Any]) -> Any:
        self._lab_count_start(vm)
        return await super()._do_start(vm, user, p)

    def _lab_count_start(self, vm: FakeVm) -> int:
        count = self.lab_starts[vm.vmid] = self.lab_starts.get(vm.vmid, 0) + 1
        if getattr(vm, "lab_boot", None) is None:
            vm.lab_boot = count  # its identity is made on first boot and kept across reboots
        return vm.lab_boot

    async def _agent_call(self, match: Match, values: dict[str, Any]) -> dict[str, Any]:
        data = await super()._agent_call(match, values)
        if match.template.endswith("/exec-status"):
            vm = self.find(values["node"], values["vmid"])
            argv = vm.agent_execs.get(values["pid"])
            if argv and " ".join(argv) not in ((vm.agent or {}).get("exec") or {}):
                data = answer(list(argv), self.lab_guest(vm)).status()
        return data

    def lab_guest(self, vm: FakeVm) -> Guest:
        """What the VM's guest is: the OS its agent reports, its mirror release, identity and faults."""
        os_info = self.lab_reported_os(vm)
        boot = getattr(vm, "lab_boot", None)
        return Guest(
            family=FAMILY_OF_OS.get(str(os_info.get("id", "")).lower(), "debian"),
            os_version=str(os_info.get("version-id") or ""),
            release=getattr(vm, "lab_release", None) or 1,
            vmid=int(vm.vmid),
            boot=boot if boot is not None else self._lab_count_start(vm),  # started some other way
            host_keys=tuple(self.lab_guest_host_keys),
            faults=self.lab_vm_faults(vm),
            state=self.lab_state(vm),  # type: ignore[attr-defined]  # LabSimGuest
        )

    def lab_vm_faults(self, vm: FakeVm) -> frozenset[str]:
        """The faults that apply to vm (by its name). Read from other threads too: iterates copies."""
        name = str(vm.config.get("name") or vm.name or "")
        return frozenset(
            fault for key, names in list(self.lab_faults.items()) if name.startswith(f"{key}-") for fault in list(names)
        )

    def lab_ssh_keys(self, username: str) -> list[str]:
        """OpenSSH public key lines `username` logs in with: the decoded `sshkeys` of every running VM whose
        `ciuser` is username, but for VMs under an ssh_login fault. The SSH guest calls it from its own
        threads while the node's loop changes VMs: it reads copies."""
        keys = []
        for vm in list(self.vms):
            config = dict(vm.config)
            real = getattr(self, "lab_machines", {}).get(vm.vmid)  # a real guest has its own sshd
            if (
                vm.status == "running"
                and config.get("ciuser") == username
                and real is None
                and "ssh_login" not in self.lab_vm_faults(vm)
            ):
                keys += decode_sshkeys(str(config.get("sshkeys") or ""))
        return keys
