"""Real guests behind the lab's API: a VM of a key marked for it is a QEMU process with a real disk.

`packer-assets lab up --real-guest` marks keys (debian-12 by default, debian-13 too: each on its Debian
release's base image). A VM created for such a key (its name is `<key>-...`, as packer's and the smoke
test's are) gets a machine (`Machine`): a folder under the
lab's data with its qcow2 disk and one `boot-<n>` folder per start (serial console, QEMU's log). Then:

- start: a VM that was created from an installer ISO and has no system yet waits for its boot command
  (the installer is "running"). When packer types a line with `url=...` (sendkey), the lab fetches the
  preseed from packer's HTTP server at that URL, runs the installer emulation (realguest/installer.py:
  the preseed's packages from the mirror as a cached layer on the base image, the disk an overlay on it,
  what the preseed asks of the installed system, its late_command in a chroot) and boots the installed
  system. A failed install stops the VM; its reason goes to failure.txt and the VM's console log
  (console.py), where the end of a real guest's serial console also goes whenever its QEMU exits. A VM with a disk
  boots it; a cloud-init drive in its config is written as PVE writes it (realguest/cidata.py) and
  attached. SSH reaches the guest on 127.0.0.1:<the key's port> (QEMU's hostfwd; PACKER_ASSETS_SSH_PORTS
  in lab.env tells the project).
- stop is QMP quit, shutdown the ACPI power button (PVE's timeout and forceStop), and a guest that
  powers itself off is `stopped` (a thread per QEMU watches it exit).
- template conversion keeps the disk; a full clone copies it (qemu-img convert), a linked clone is an
  overlay on it; destroy kills any QEMU of the VM and removes its folder.
- the agent endpoints go to the guest's qemu-ga over its virtio-serial socket (realguest/agent.py) and
  answer in PVE's shapes; a guest whose agent does not answer yet is PVE's 500 "QEMU guest agent is not
  running", which callers retry.

VMs of other keys keep the lab's answering guests (agent.py, guest_answers.py, lab.guest.LabGuest).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakepve.model import FakeVm, PveError, TaskError
from fakepve.routing import die
from fakepve.schema import Match

from packer_assets_lab.console import append_console
from packer_assets_lab.pve.packer_compat import keys_to_text
from packer_assets_lab.realguest import cidata
from packer_assets_lab.realguest.agent import AgentError, AgentTimeout, GuestAgent
from packer_assets_lab.realguest.image import BaseImage
from packer_assets_lab.realguest.installer import (
    InstallBoot,
    InstallerError,
    console_tail,
    emulate_install,
    parse_preseed,
    plan_install,
    preseed_url,
)
from packer_assets_lab.realguest.qemu import (
    QemuError,
    QemuVm,
    VmSpec,
    full_clone_disk,
    linked_clone_disk,
    qemu_processes_under,
)

__all__ = ["LabRealGuest", "Machine", "RealGuests", "kill_stale_qemus"]

CONSOLE_TAIL_LINES = 80
MAC = re.compile(r"([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})")
AGENT_WAIT = 5.0  # seconds a call waits for the guest's agent before PVE's "not running" answer
PRESEED_TIMEOUT = 30.0


class _NotRunning(AgentError):
    """The guest's agent did not answer the sync: PVE's 'QEMU guest agent is not running'."""


@dataclass(frozen=True)
class RealGuests:
    """Which keys get real guests and the base image each runs (its Debian release's: debian-12 bookworm's,
    debian-13 trixie's), where their disks live, their SSH ports."""

    images: Mapping[str, BaseImage]  # key -> its base image
    root: Path
    ssh_ports: dict[str, int]
    accel: str | None = None  # None: detect per VM's kernel (KVM where it really runs, else TCG)
    install_timeout: float = 900.0

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self.images)

    def key_of(self, name: str) -> str | None:
        """The marked key a VM name `<key>-...` belongs to (the longest that matches), or None."""
        found = [key for key in self.keys if name.startswith(f"{key}-")]
        return max(found, key=len) if found else None


@dataclass
class Machine:
    """The real side of one lab VM."""

    vmid: int
    key: str
    folder: Path
    disk: Path | None = None  # None: nothing installed yet (an installer ISO boots)
    qemu: QemuVm | None = None
    phase: str = "off"  # off | installer (waiting for the boot command) | installing | running | failed
    failure: str | None = None
    install: dict[str, Any] | None = None  # what the installer emulation applied and ignored
    boots: int = 0
    installer: asyncio.Future[None] | None = None  # the running install: held so the loop does not drop it
    agent_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def disk_path(self) -> Path:
        return self.folder / "disk.qcow2"

    def next_boot_dir(self) -> Path:
        self.boots += 1
        return self.folder / f"boot-{self.boots}"


def _memory_mb(config: dict[str, Any]) -> int:
    try:
        return max(256, int(str(config.get("memory") or 1024)))
    except ValueError:
        return 1024


def _cpus(config: dict[str, Any]) -> int:
    try:
        wanted = int(config.get("cores") or 1) * int(config.get("sockets") or 1)
    except ValueError:
        wanted = 1
    return max(1, min(wanted, os.cpu_count() or 1))


ANSI = re.compile(r"\x1b\[[0-9;]*m")
SAYS_WHY = re.compile(r"fail|error|does not exist|not found", re.IGNORECASE)


def failure_summary(reason: str, most: int = 3) -> str:
    """The lines of a failed install's output that say why (an installer's or a command's words, not the kernel's
    timestamped lines), joined on one line: the end of the VM's console log, which a failed build quotes."""
    lines = [ANSI.sub("", line).strip() for line in reason.splitlines()]
    why = [line for line in lines if line and not line.startswith("[") and SAYS_WHY.search(line)]
    return " | ".join(dict.fromkeys(why[-most:])) or (lines[0] if lines else "no reason given")


def kill_stale_qemus(folder: Path) -> None:
    """SIGKILL every QEMU whose command line names a path under folder (a dead lab's guests)."""
    for pid in qemu_processes_under(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LabRealGuest:
    """Mixin of LabPve (first in its bases): the VMs of marked keys run for real (module docstring)."""

    lab_real: RealGuests | None = None

    def enable_real_guests(self, real: RealGuests) -> None:
        """Mark keys for real guests (QEMUs a dead lab left are killed by LabStack.start, on every start)."""
        real.root.mkdir(parents=True, exist_ok=True)
        self.lab_real = real
        self.lab_machines: dict[int, Machine] = {}

    def machine(self, vm: FakeVm | int) -> Machine | None:
        if self.lab_real is None:
            return None
        return self.lab_machines.get(vm if isinstance(vm, int) else vm.vmid)

    def stop_real_guests(self) -> None:
        """Kill every QEMU of the lab (lab down)."""
        for machine in list(getattr(self, "lab_machines", {}).values()):
            if machine.qemu is not None:
                machine.qemu.kill()
        if self.lab_real is not None:
            kill_stale_qemus(self.lab_real.root)

    # ------------------------------------------------------------------ create, clone, template, destroy

    async def _qm_create(self, v: dict[str, Any], user: str) -> Any:
        answer = await super()._qm_create(v, user)
        vm = self.vm(int(v["vmid"]))
        key = self.lab_real.key_of(vm.name) if self.lab_real and vm is not None else None
        if key is not None:
            self.lab_machines[vm.vmid] = Machine(vm.vmid, key, self._fresh_folder(vm.vmid))
        return answer

    def _fresh_folder(self, vmid: int) -> Path:
        folder = self.lab_real.root / f"vm-{vmid}"
        shutil.rmtree(folder, ignore_errors=True)  # a VMID used before: its old machine is gone
        folder.mkdir(parents=True)
        return folder

    async def _qm_clone(self, v: dict[str, Any], user: str) -> Any:
        source = self.find(v["node"], v["vmid"])
        machine = self.machine(source)
        newid = int(v["newid"])
        if machine is None or self.vm(newid) is not None:
            return await super()._qm_clone(v, user)
        folder = self._fresh_folder(newid)
        clone = Machine(newid, machine.key, folder)
        if machine.disk is not None:
            full = v.get("full")
            full = (not source.template) if full is None else str(full) in ("1", "true")
            make = full_clone_disk if full else linked_clone_disk
            try:
                clone.disk = await asyncio.to_thread(make, machine.disk, clone.disk_path)
            except Exception as exc:
                shutil.rmtree(folder, ignore_errors=True)
                raise die(f"clone failed: copy of disk {machine.disk.name}: {exc}") from exc
        try:
            answer = await super()._qm_clone(v, user)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if self.vm(newid) is None:  # the clone task failed
            shutil.rmtree(folder, ignore_errors=True)
        else:
            clone.install = machine.install
            self.lab_machines[newid] = clone
        return answer

    async def _qm_destroy(self, v: dict[str, Any], user: str) -> Any:
        vm = self.find(v["node"], v["vmid"])
        machine = self.machine(vm)
        answer = await super()._qm_destroy(v, user)
        if machine is not None and self.vm(vm.vmid) is None:
            await asyncio.to_thread(self._drop_machine, machine)
        return answer

    def _drop_machine(self, machine: Machine) -> None:
        if machine.qemu is not None:
            machine.qemu.kill()
        kill_stale_qemus(machine.folder)  # an installer boot in flight
        shutil.rmtree(machine.folder, ignore_errors=True)
        self.lab_machines.pop(machine.vmid, None)

    # ------------------------------------------------------------------ power

    async def _do_start(self, vm: FakeVm, user: str, p: dict[str, Any]) -> Any:
        machine = self.machine(vm)
        if machine is None:
            return await super()._do_start(vm, user, p)

        async def body() -> None:
            if vm.template:
                raise TaskError("you can't start a vm if it's a template")
            if vm.lock and vm.lock != "suspended":
                raise TaskError(f"VM is locked ({vm.lock})")
            if vm.status == "running":
                raise TaskError(f"VM {vm.vmid} already running")
            vm.apply_pending()
            machine.failure = None
            if machine.disk is None:
                machine.phase = "installer"  # the installer ISO boots and waits for its boot command
            else:
                try:
                    await asyncio.to_thread(self._boot, vm, machine, asyncio.get_running_loop())
                except (QemuError, OSError) as exc:
                    raise TaskError(f"start failed: {exc}") from exc
            vm.status = vm.qmpstatus = "running"
            vm.started_at = time.time()

        return await self.task(vm.node, "qmstart", vm.vmid, user, body, vm=vm)

    def _boot(self, vm: FakeVm, machine: Machine, loop: asyncio.AbstractEventLoop) -> None:
        """Start QEMU on the machine's disk, with the config's cloud-init drive written as PVE does."""
        real, config = self.lab_real, dict(vm.config)
        image = real.images[machine.key]
        run_dir = machine.next_boot_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        cdroms = []
        if self._ci_attached(config):
            cdroms.append(cidata.write_nocloud_drive(run_dir / "cidata.iso", config, vm.vmid))
        found = MAC.search(str(config.get("net0", "")))
        spec = VmSpec(
            name=f"{vm.name}-{vm.vmid}",
            disk=machine.disk,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=image.cmdline,
            memory_mb=_memory_mb(config),
            cpus=_cpus(config),
            cdroms=cdroms,
            mac=found.group(1).lower() if found else None,
            ssh_host_port=real.ssh_ports.get(machine.key, 0),
            accel=real.accel,
        )
        qemu = QemuVm(spec, run_dir).start()
        machine.qemu, machine.phase = qemu, "running"
        threading.Thread(
            target=self._watch, args=(vm, machine, qemu, loop), name=f"lab-vm-{vm.vmid}", daemon=True
        ).start()

    def _console(self, vmid: int, serial: Path, why: str) -> None:
        """The end of a real guest's serial console into the VM's console log (console.py), where the
        project reads what a VM printed before it stopped."""
        text = console_tail(serial, CONSOLE_TAIL_LINES)
        append_console(self.data_dir, vmid, f"--- lab: real guest {why}: last lines of {serial} ---\n{text}")

    def _watch(self, vm: FakeVm, machine: Machine, qemu: QemuVm, loop: asyncio.AbstractEventLoop) -> None:
        """A guest that powers off (or a QEMU that dies) is a stopped VM, as on PVE."""
        qemu.wait_exit(timeout=None)
        try:
            self._console(vm.vmid, qemu.serial_log, f"VM {vm.vmid} stopped")
        except OSError:
            pass  # the VM's folder or the data dir went away (destroyed, lab down)

        def stopped() -> None:
            if machine.qemu is qemu:
                machine.qemu, machine.phase = None, "off"
                vm.status = vm.qmpstatus = "stopped"

        if not loop.is_closed():
            loop.call_soon_threadsafe(stopped)

    async def _do_stop(self, vm: FakeVm, user: str, p: dict[str, Any]) -> Any:
        machine = self.machine(vm)
        if machine is None:
            return await super()._do_stop(vm, user, p)
        if not p.get("skiplock"):
            self._check_lock(vm)

        async def body() -> None:
            await asyncio.to_thread(self._power_off, machine)
            vm.status = vm.qmpstatus = "stopped"

        return await self.task(vm.node, "qmstop", vm.vmid, user, body, vm=vm)

    def _power_off(self, machine: Machine) -> None:
        qemu, machine.qemu, machine.phase = machine.qemu, None, "off"
        if qemu is not None:
            qemu.stop()
        kill_stale_qemus(machine.folder)  # an installer boot in flight dies with the VM

    async def _do_shutdown(self, vm: FakeVm, user: str, p: dict[str, Any]) -> Any:
        machine = self.machine(vm)
        if machine is None:
            return await super()._do_shutdown(vm, user, p)
        self._need_running(vm)
        self._check_lock(vm)
        timeout = int(p.get("timeout") or self.shutdown_default_timeout)
        force = str(p.get("forceStop", "0")) in ("1", "true")

        async def body() -> str | None:
            qemu = machine.qemu
            # the installer (emulated, no QEMU yet) has no ACPI to ask: PVE would wait, then give up
            clean = qemu is not None and await asyncio.to_thread(self._acpi_powerdown, qemu, timeout)
            if not clean and not force:
                raise TaskError("VM quit/powerdown failed - got timeout")
            await asyncio.to_thread(self._power_off, machine)
            vm.status = vm.qmpstatus = "stopped"
            return None if clean else "VM still running - terminating now with SIGTERM"

        return await self.task(vm.node, "qmshutdown", vm.vmid, user, body, vm=vm)

    @staticmethod
    def _acpi_powerdown(qemu: QemuVm, timeout: float) -> bool:
        if qemu.qmp is not None:
            try:
                qemu.qmp.command("system_powerdown")
            except (OSError, QemuError):
                pass
        return qemu.wait_exit(timeout)

    # ------------------------------------------------------------------ the boot command and the install

    async def _qm_sendkey(self, v: dict[str, Any], user: str) -> None:
        await super()._qm_sendkey(v, user)
        vm = self.find(v["node"], v["vmid"])
        machine = self.machine(vm)
        if machine is None or machine.phase != "installer":
            return
        url = preseed_url(keys_to_text(getattr(vm, "sendkeys", [])))
        if url is not None:
            machine.phase = "installing"
            machine.installer = asyncio.ensure_future(self._install(vm, machine, url))

    async def _install(self, vm: FakeVm, machine: Machine, url: str) -> None:
        """Fetch the preseed the boot command names, emulate the install, boot the installed system."""
        try:
            preseed = await asyncio.to_thread(_fetch, url)
            plan_install(parse_preseed(preseed))  # a preseed the emulation refuses fails before any disk work
            machine.disk = machine.disk_path  # made by emulate_install (an overlay on the image's package layer)
            run_dir = machine.next_boot_dir()
            report = await asyncio.to_thread(
                emulate_install,
                self.lab_real.images[machine.key],
                machine.disk,
                preseed,
                run_dir,
                InstallBoot(self.lab_real.install_timeout, self.lab_real.accel, _memory_mb(vm.config)),
            )
            machine.install = {
                "preseed_url": url,
                "applied": list(report.applied),
                "ignored": list(report.ignored),
                "packages": report.packages,
                "seconds": round(report.seconds, 1),
            }
            # what the emulation did, beside the disk (the installer boot's console is in run_dir/serial.log)
            (machine.folder / "install.json").write_text(json.dumps(machine.install, indent=2) + "\n")
            if machine.phase != "installing" or vm.status != "running":
                return  # stopped or destroyed meanwhile
            await asyncio.to_thread(self._boot, vm, machine, asyncio.get_running_loop())
        except Exception as exc:  # noqa: BLE001 - a background task: whatever failed is the VM's failure, kept
            reason = (
                exc.stderr.decode(errors="replace").strip()
                if isinstance(exc, subprocess.CalledProcessError) and exc.stderr
                else str(exc)
            )
            machine.failure, machine.phase = f"installer emulation failed: {reason}", "failed"
            try:
                (machine.folder / "failure.txt").write_text(machine.failure + "\n")
                append_console(self.data_dir, vm.vmid, f"lab: VM {vm.vmid} stopped: {machine.failure}")
                # last, the lines that say why: a build quotes the end of this log (the kernel's power-off is noise)
                append_console(self.data_dir, vm.vmid, f"lab: VM {vm.vmid} install failed: {failure_summary(reason)}")
            except OSError:
                pass  # the VM was destroyed meanwhile: its folder is gone
            print(f"lab: VM {vm.vmid} ({vm.name}): {machine.failure}", flush=True)
            if machine.disk is not None:
                machine.disk.unlink(missing_ok=True)
                machine.disk = None
            # The installer stopped: the VM is off (packer then waits for SSH until its timeout).
            vm.status = vm.qmpstatus = "stopped"

    # ------------------------------------------------------------------ the guest agent

    async def _agent_call(self, match: Match, values: dict[str, Any]) -> dict[str, Any]:
        vm = self.find(values["node"], values["vmid"])
        machine = self.machine(vm)
        if machine is None:
            return await super()._agent_call(match, values)
        command = match.template.rsplit("/", 1)[1]
        qemu = machine.qemu
        if vm.status != "running" or qemu is None:
            raise PveError(500, "QEMU guest agent is not running")
        try:
            return await asyncio.to_thread(self._agent_answer, machine, qemu, command, values)
        except _NotRunning:
            raise PveError(500, "QEMU guest agent is not running") from None
        except AgentTimeout:
            raise PveError(500, f"VM {vm.vmid} qmp command 'guest-{command}' failed - got timeout") from None
        except AgentError as exc:
            raise PveError(500, f"Agent error: {exc}") from None

    @staticmethod
    def _agent_answer(machine: Machine, qemu: QemuVm, command: str, values: dict[str, Any]) -> dict[str, Any]:
        """One agent command through qemu-ga, answered in the shape PVE's API gives it."""
        with machine.agent_lock:
            agent: GuestAgent = qemu.agent(timeout=AGENT_WAIT)
            try:
                agent.sync(timeout=AGENT_WAIT)
            except AgentError as exc:  # the guest (or its agent) is not up yet
                agent.close()
                raise _NotRunning from exc
            if command == "exec":
                argv = [str(a) for a in values.get("command") or []]
                data = values.get("input-data")
                pid = agent.exec_start(argv, input_data=None if data is None else str(data).encode())
                return {"pid": pid}
            if command == "exec-status":
                status = agent.exec_status(int(values["pid"]))
                for name in ("out-data", "err-data"):  # PVE decodes the agent's base64
                    if name in status:
                        status[name] = status[name].decode(errors="replace")
                return status
            if command == "file-read":
                data = agent.read_file(str(values["file"]))
                return {"content": data.decode(errors="replace"), "truncated": False}
            name = {
                "ping": "guest-ping",
                "get-osinfo": "guest-get-osinfo",
                "info": "guest-info",
                "network-get-interfaces": "guest-network-get-interfaces",
                "get-host-name": "guest-get-host-name",
                "get-time": "guest-get-time",
                "get-timezone": "guest-get-timezone",
                "get-fsinfo": "guest-get-fsinfo",
                "get-vcpus": "guest-get-vcpus",
                "get-users": "guest-get-users",
                "get-memory-blocks": "guest-get-memory-blocks",
                "fsfreeze-status": "guest-fsfreeze-status",
                "shutdown": "guest-shutdown",
            }.get(command)
            if name is None:
                raise AgentError(f"the lab's real guest does not answer {command!r}")
            return {"result": agent.command(name)}

    # ------------------------------------------------------------------ what the lab says about a VM

    def real_guest_info(self, vmid: int) -> dict[str, Any] | None:
        """For tests and the bench: the machine's phase, folder, failure and install report."""
        machine = self.machine(vmid)
        if machine is None:
            return None
        return {
            "key": machine.key,
            "phase": machine.phase,
            "folder": str(machine.folder),
            "failure": machine.failure,
            "disk": str(machine.disk) if machine.disk else None,
            "install": machine.install,
            "ssh_port": machine.qemu.ssh_port if machine.qemu else None,
        }


def _fetch(url: str) -> str:
    """The preseed as the installer would fetch it (packer's HTTP server serves it)."""
    if not url.startswith(("http://", "https://")):
        raise InstallerError(f"the boot command's preseed URL {url!r} is not http(s)")
    with urllib.request.urlopen(url, timeout=PRESEED_TIMEOUT) as response:
        return response.read().decode()
