"""Simulated guests whose state follows from what ran on them (LabSimGuest, a mixin of LabPve; lab-invented).

- Install: when packer types the boot command (sendkey), the line that starts the installer names the
  answer file (answer_files.answer_url); the lab fetches it from packer's HTTP server, as the installer
  does, and installs (answer_files.install). A URL nothing serves, or a late command that fails, is a
  failed install: the VM powers off (status stopped) and the reason goes to its console log
  (console.append_console); so is a VM whose `cpu` is below the level the release's installer needs
  (cpu_levels: Rocky 10 below x86-64-v3, Rocky 9 and Windows Server 2025 below x86-64-v2).
  Windows: packer 1.6.6 cannot attach the answer ISO the product uploaded
  (`<key>-answers.iso`), so at the first key typed the lab reads that ISO from the node's ISO storage as
  if Setup had found it on a CD (a stand-in for the extra CD-ROM).
- Boot: every start of a VM is a new stamp of the lab-wide boot counter (guest_state.boot, applied when the
  running VM is next looked at).
- Provisioners: packer's SSH session on a key's own port (LabStack: PACKER_ASSETS_SSH_PORTS for every key)
  changes the state of that key's running build VM (`<key>-...`, not a `-smoke-` clone): `lab_ssh_exec`
  runs the command through guest_shell (Linux) or recognises the shipped PowerShell steps (Windows).
- Clones copy the template's state; destroy drops it. The agent of a VM whose state has no running
  qemu-ga answers PVE's 500 "QEMU guest agent is not running".

A VM the lab did not install (created through the API with no boot command typed, as many tests do)
answers as a generalized system of its family (guest_state.generalized_default).
"""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from fakepve.model import FakeVm, PveError
from fakepve.schema import Match

from packer_assets.pve.smoke import agent_enabled
from packer_assets.render import read_iso
from packer_assets_lab.console import append_console
from packer_assets_lab.pve import guest_state as gs
from packer_assets_lab.pve.answer_files import Base, InstallFailed, answer_url, boots_now, install, install_windows
from packer_assets_lab.pve.cpu_levels import boot_failure
from packer_assets_lab.pve.guest_shell import Shell
from packer_assets_lab.pve.inventory import inventory_rows
from packer_assets_lab.pve.packer_compat import keys_to_text

FETCH_TIMEOUT = 30.0
FAMILY_OF_OS = {"debian": "debian", "ubuntu": "ubuntu", "rocky": "rocky", "mswindows": "windows"}
ReadFile = Callable[[str], "str | None"]


class LabSimGuest:
    """Mixin of LabPve (before PackerCompat): the simulated guests' states (module docstring)."""

    def _init_sim_guest(self) -> None:
        self.lab_states: dict[int, gs.GuestState] = {}
        self.lab_boot_clock = 0
        self.lab_state_lock = threading.RLock()  # SSH sessions change states from their own threads

    # ---- lifecycle ------------------------------------------------------------------------------

    async def _qm_create(self, v: dict[str, Any], user: str) -> Any:
        answer = await super()._qm_create(v, user)  # type: ignore[misc]
        with self.lab_state_lock:
            self.lab_states.pop(int(v["vmid"]), None)  # a VMID used before: its system is gone
        return answer

    async def _qm_clone(self, v: dict[str, Any], user: str) -> Any:
        source = self.find(v["node"], v["vmid"])  # type: ignore[attr-defined]
        answer = await super()._qm_clone(v, user)  # type: ignore[misc]
        with self.lab_state_lock:
            state = self.lab_states.get(source.vmid)
            made = self.vm(int(v["newid"]))  # type: ignore[attr-defined]
            if made is not None:
                made.lab_installing = True  # a clone's disk holds a system: no installer runs on it
                if state is not None:
                    self.lab_states[made.vmid] = gs.clone(state)
        return answer

    async def _qm_destroy(self, v: dict[str, Any], user: str) -> Any:
        answer = await super()._qm_destroy(v, user)  # type: ignore[misc]
        with self.lab_state_lock:
            if self.vm(int(v["vmid"])) is None:  # type: ignore[attr-defined]
                self.lab_states.pop(int(v["vmid"]), None)
        return answer

    def lab_family(self, vm: FakeVm) -> str:
        os_info = self.lab_reported_os(vm)  # type: ignore[attr-defined]
        return FAMILY_OF_OS.get(str(os_info.get("id", "")).lower(), "debian")

    def lab_base(self, vm: FakeVm, family: str | None = None) -> Base:
        family = family or self.lab_family(vm)
        os_version = str(self.lab_reported_os(vm).get("version-id") or "")  # type: ignore[attr-defined]
        rows = inventory_rows(family, os_version, getattr(vm, "lab_release", None) or 1)
        return Base(family, {row[0]: (row[1], row[2]) for row in rows})

    def lab_state(self, vm: FakeVm) -> gs.GuestState:
        """The VM's system, booted for its current start (a VM the lab did not install: generalized_default)."""
        with self.lab_state_lock:
            state = self.lab_states.get(vm.vmid)
            if state is None:
                base = self.lab_base(vm)
                state = self.lab_states[vm.vmid] = gs.generalized_default(base.family, base.table)
            if vm.status == "running" and state.seen_start != getattr(vm, "started_at", None):
                self.lab_boot_clock += 1
                state = gs.boot(state, self.lab_boot_clock, f"iid-{vm.vmid}")
                state.seen_start = getattr(vm, "started_at", None)
                self.lab_states[vm.vmid] = state
            return state

    # ---- the install ----------------------------------------------------------------------------

    async def _qm_sendkey(self, v: dict[str, Any], user: str) -> None:
        await super()._qm_sendkey(v, user)  # type: ignore[misc]
        vm = self.find(v["node"], v["vmid"])  # type: ignore[attr-defined]
        if getattr(self, "lab_machines", {}).get(vm.vmid) is not None or getattr(vm, "lab_installing", False):
            return  # a real guest, a clone, or an install already started
        typed = keys_to_text(getattr(vm, "sendkeys", []))
        family = self.lab_family(vm)
        if family == "windows":
            vm.lab_installing = vm.lab_build = True
            await self._lab_install(vm, None)
        elif boots_now(typed) and (found := answer_url(typed)) is not None:
            vm.lab_installing = vm.lab_build = True
            await self._lab_install(vm, found)

    async def _lab_install(self, vm: FakeVm, found: tuple[str, str] | None) -> None:
        try:
            self._lab_check_cpu(vm)
            if found is None:
                state = install_windows(self._lab_answer_iso(vm), self.lab_base(vm, "windows"))
            else:
                kind, url = found
                text = await asyncio.to_thread(_fetch, url)
                family = (
                    self.lab_family(vm)
                    if getattr(vm, "lab_os", None)
                    else {"autoinstall": "ubuntu", "kickstart": "rocky"}.get(kind, "debian")
                )
                state = install(kind, text, self.lab_base(vm, family))
        except InstallFailed as e:
            append_console(self.data_dir, vm.vmid, f"lab (simulated installer): {e}")  # type: ignore[attr-defined]
            vm.status = vm.qmpstatus = "stopped"  # the installer stopped: the VM powers off
            return
        append_console(self.data_dir, vm.vmid, "lab (simulated installer): install finished, rebooting")  # type: ignore[attr-defined]
        with self.lab_state_lock:
            self.lab_states[vm.vmid] = state  # the next look boots it (the installer's reboot)
            state.seen_start = None

    def _lab_check_cpu(self, vm: FakeVm) -> None:
        """The installer kernel of a release whose CPU level the VM's `cpu` does not reach stops (cpu_levels)."""
        os_info = self.lab_reported_os(vm)  # type: ignore[attr-defined]
        os_id, version = str(os_info.get("id") or ""), str(os_info.get("version-id") or "")
        reason = boot_failure(os_id, version, vm.config.get("cpu"))
        if reason is not None:
            raise InstallFailed(reason)

    def _lab_answer_iso(self, vm: FakeVm) -> dict[str, bytes]:
        """The answer ISO the product uploaded for this VM's key (`<key>-answers[.<hash>].iso` on an ISO storage),
        the newest if there are several."""
        name = str(vm.config.get("name") or vm.name or "")
        found = [
            path
            for storage in list(self.storages)  # type: ignore[attr-defined]
            for path in (self.data_dir / storage).glob("**/*-answers*.iso")  # type: ignore[attr-defined]
            if name.startswith(path.name.split("-answers", 1)[0] + "-")
        ]
        if found:
            return read_iso(max(found, key=lambda p: p.stat().st_mtime_ns))[1]
        raise InstallFailed("Windows Setup: no answer file (Autounattend.xml) on any drive")

    # ---- the agent ------------------------------------------------------------------------------

    async def _agent_call(self, match: Match, values: dict[str, Any]) -> dict[str, Any]:
        vm = self.find(values["node"], values["vmid"])  # type: ignore[attr-defined]
        own = vm.agent is None or getattr(vm, "lab_agent_auto", False)  # not a test's own answers
        if vm.status == "running" and agent_enabled(vm.config) and own and not self.lab_state(vm).agent_runs():
            raise PveError(500, "QEMU guest agent is not running")
        return await super()._agent_call(match, values)  # type: ignore[misc]

    # ---- packer's SSH session -------------------------------------------------------------------

    def lab_build_vm(self, key: str | None, keys: frozenset[str]) -> FakeVm | None:
        """The key's running build VM (`<key>-...`, not a smoke clone): the longest key of `keys` names it.
        key None (a session on the guest's shared port: a key the lab has no port for): the one running VM the
        simulated installer installed, if there is exactly one."""
        if key is None:
            found = [
                vm
                for vm in list(self.vms)  # type: ignore[attr-defined]
                if getattr(vm, "lab_build", False) and vm.status == "running" and not vm.template
            ]
            return found[0] if len(found) == 1 else None
        for vm in list(self.vms):  # type: ignore[attr-defined]
            name = str(vm.config.get("name") or vm.name or "")
            owner = max((k for k in keys if name.startswith(f"{k}-")), key=len, default=None)
            if owner == key and "-smoke-" not in name and vm.status == "running" and not vm.template:
                return vm
        return None

    def lab_sshd_runs(self, key: str, keys: frozenset[str]) -> bool:
        """Does a running VM of the key (its build VM or a smoke clone) have an sshd to log in to?"""
        for vm in list(self.vms):  # type: ignore[attr-defined]
            name = str(vm.config.get("name") or vm.name or "")
            owner = max((k for k in keys if name.startswith(f"{k}-")), key=len, default=None)
            if owner == key and vm.status == "running" and not vm.template:
                with self.lab_state_lock:
                    if self.lab_state(vm).sshd_runs():
                        return True
        return False

    def lab_ssh_exec(
        self, key: str | None, keys: frozenset[str], command: str, read_file: ReadFile
    ) -> tuple[int, bytes]:
        """What the key's build VM answers to a command packer's SSH session runs (exit status, stdout)."""
        vm = self.lab_build_vm(key, keys)
        if vm is None:
            return 0, b""  # nothing of this key is being built: no state to change
        with self.lab_state_lock:
            state = self.lab_state(vm)
            if state.windows:
                return _powershell(state, command, read_file)
            shell = Shell(state, read_file=read_file, version_of=self.lab_base(vm, state.family).version_of)
            status = shell.run(command)
        return status, "".join(shell.out).encode()


def _fetch(url: str) -> str:
    """The answer file as the installer fetches it (packer's HTTP server serves it)."""
    if not url.startswith(("http://", "https://")):
        raise InstallFailed(f"the boot command's answer file URL {url!r} is not http(s)")
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InstallFailed(f"could not retrieve the answer file {url}: {e}") from None


SCRIPT_PATH = re.compile(r"&\s*'([^']+\.ps1)'")


def _powershell(state: gs.GuestState, command: str, read_file: ReadFile) -> tuple[int, bytes]:
    """The shipped windows.pkr.hcl steps, recognised in the uploaded script (not a PowerShell interpreter)."""
    found = SCRIPT_PATH.search(command)
    script = (read_file(found.group(1)) if found else None) or ""
    for line in script.splitlines():
        if "Get-Service -Name 'QEMU-GA'" in line and not state.agent_runs():
            return 1, b"the QEMU guest agent service (QEMU-GA) is not running\r\n"
        if (m := re.search(r"Set-Service -Name 'QEMU-GA' -StartupType (\w+)", line)) and state.agent_start_type:
            state.agent_start_type = m.group(1)
        if "pnputil.exe /enum-drivers" in line and not state.drivers:
            return 1, b"virtio driver vioscsi.inf is not installed\r\n"
        if re.search(r"Sysprep\.exe\S*\s.*/generalize", line, re.I):
            state.clone_tag_boot = state.boot
    return 0, b""
