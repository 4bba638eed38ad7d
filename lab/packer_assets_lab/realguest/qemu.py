"""A QEMU process per lab VM: start, status, stop, shutdown, kill; its disks; KVM or TCG.

The lab's VMs must really run, with the same parts a PVE node gives a guest: a virtio disk (qcow2:
a template's own, a linked clone's overlay on it, or a full copy), the guest agent on a virtio-serial
port whose host end is a UNIX socket, a QMP socket for status and power, the serial console in a log
file, and user-mode networking with `restrict=on` (the guest reaches nothing but its forwarded ports:
SSH from the host through `hostfwd`, host services through `guestfwd`). Extra CD-ROMs carry the
cloud-init drive; `-fw_cfg` files carry the installer emulation's payload (installer.py).

The boot is direct (`-kernel/-initrd/-append`): the base image has no bootloader (see image.py).

Every QEMU runs in its own process group and is killed with its runner: on `kill()`, on leaving the
`with` block, when the runner is garbage-collected, and at interpreter exit, so no QEMU outlives a
test, failed ones included. Nothing secret is put on QEMU's command line.

KVM is used only where it really runs a guest: /dev/kvm can exist without hardware virtualization
(nested or paravirtual setups where `-enable-kvm` aborts or hangs), so `detect_accel` boots a
512-byte probe under KVM and takes TCG (`thread=multi`) unless the probe exits as it should.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from packer_assets.errors import OperationError
from packer_assets.runs.procs import proc_table

from .agent import GuestAgent

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
ACCEL_ENV = "PACKER_ASSETS_QEMU_ACCEL"  # kvm | tcg: skip the probe
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes


class QemuError(OperationError):
    """QEMU refused to start, died, or did not answer on its monitor."""


# ------------------------------------------------------------------ disks


def linked_clone_disk(base: Path, overlay: Path, size: int | None = None) -> Path:
    """A qcow2 overlay whose backing file is `base` (PVE's linked clone of a template's disk)."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(Path(base).resolve()), str(overlay)]
    subprocess.run([*argv, *([str(size)] if size else [])], check=True, capture_output=True)
    return overlay


def full_clone_disk(source: Path, target: Path) -> Path:
    """A standalone qcow2 copy of `source`, backing chain flattened (PVE's full clone)."""
    tmp = target.with_name(f".{target.name}.tmp")
    subprocess.run([QEMU_IMG, "convert", "-q", "-O", "qcow2", str(source), str(tmp)], check=True, capture_output=True)
    os.replace(tmp, target)
    return target


# ------------------------------------------------------------------ accelerator

# mov al,0x31; out 0xf4,al (isa-debug-exit: QEMU exits with (0x31 << 1) | 1 = 99); hlt; jmp back to hlt
_PROBE_CODE = bytes.fromhex("b031e6f4f4ebfd")
_PROBE_EXIT = 99


def probe_accel(accel: str, timeout: float = 20.0) -> bool:
    """Does a guest really run under `accel`? Boots a 512-byte boot sector that exits QEMU with a code."""
    with tempfile.TemporaryDirectory(prefix="pa-accel-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(_PROBE_CODE.ljust(510, b"\0") + b"\x55\xaa")
        cpu = ["-cpu", "host"] if accel == "kvm" else []
        argv = [
            QEMU,
            "-accel",
            accel,
            *cpu,
            "-machine",
            "pc",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive",
            f"file={disk},format=raw,if=ide",
        ]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout, start_new_session=True, check=False)
        except subprocess.TimeoutExpired:
            return False
        except OSError:
            return False
        return proc.returncode == _PROBE_EXIT


@functools.lru_cache(maxsize=1)
def detect_accel() -> str:
    """'kvm' where KVM really runs a guest, else 'tcg' (PACKER_ASSETS_QEMU_ACCEL overrides)."""
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and probe_accel("kvm"):
        return "kvm"
    return "tcg"


def accel_args(accel: str) -> list[str]:
    return ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg,thread=multi"]


# ------------------------------------------------------------------ QMP


class Qmp:
    """A minimal QMP client: capabilities handshake, then one command at a time (events skipped)."""

    def __init__(self, path: Path, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.lock = threading.Lock()
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise QemuError("QMP socket closed")
            message = json.loads(line)
            if "event" not in message:
                return message

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        with self.lock:
            request = {"execute": name, **({"arguments": arguments} if arguments else {})}
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            reply = self._read()
        if "error" in reply:
            raise QemuError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


# ------------------------------------------------------------------ the VM


@dataclass
class VmSpec:
    """What to run. `cmdline` is the kernel's (the base image's manifest has it)."""

    name: str
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    memory_mb: int = 1024
    cpus: int = 2
    cdroms: Sequence[Path] = ()
    mac: str | None = None  # PVE's net0 macaddr: cloud-init's network-config matches the NIC by it
    ssh_host_port: int = 0  # 0: QEMU picks a free port (read back through QMP)
    # (guest address, guest port, host address, host port): the guest connects to a host service
    guestfwd: Sequence[tuple[str, int, str, int]] = ()
    smbios_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    accel: str | None = None  # None: detect_accel()
    # (name, file): firmware config files the guest reads under /sys/firmware/qemu_fw_cfg/by_name/<name>/raw
    # (the installer emulation's payload). Only the path is on QEMU's command line, never the content.
    fw_cfg: Sequence[tuple[str, Path]] = ()
    no_reboot: bool = False  # a guest reboot (a kernel panic with panic=N included) ends QEMU instead


def _qemu_opt(value: object) -> str:
    """A value inside a QEMU -opt list: commas are doubled."""
    return str(value).replace(",", ",,")


def _kill_group(pgid: int, proc: subprocess.Popen) -> None:
    """SIGKILL the group, unless QEMU was reaped already (its PID, the group's ID, may be reused)."""
    if proc.poll() is None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


class QemuVm:
    """One QEMU process. Use as a context manager (or call kill()): leaving it kills QEMU."""

    def __init__(self, spec: VmSpec, run_dir: Path):
        self.spec, self.run_dir = spec, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.run_dir / "serial.log"
        self.qemu_log = self.run_dir / "qemu.log"
        # UNIX socket paths are short (108 bytes): a private folder under /tmp when run_dir's is too long.
        sockets = self.run_dir
        if len(str(sockets / "qga.sock")) > SOCKET_PATH_MAX:
            sockets = Path(tempfile.mkdtemp(prefix="pa-vm-"))
            self._socket_tmp: Path | None = sockets
        else:
            self._socket_tmp = None
        self.qmp_socket, self.qga_socket = sockets / "qmp.sock", sockets / "qga.sock"
        self.proc: subprocess.Popen | None = None
        self.qmp: Qmp | None = None
        self.ssh_port: int | None = None
        self.accel: str | None = None
        self._agent: GuestAgent | None = None
        self._finalizer: weakref.finalize | None = None

    # -- argv -------------------------------------------------------------------------------------

    def argv(self, accel: str) -> list[str]:
        s = self.spec
        netdev = f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{s.ssh_host_port}-:22"
        for guest_addr, guest_port, host_addr, host_port in s.guestfwd:
            netdev += f",guestfwd=tcp:{guest_addr}:{guest_port}-tcp:{host_addr}:{host_port}"
        nic = "virtio-net-pci,netdev=net0" + (f",mac={s.mac}" if s.mac else "")
        argv = [
            QEMU,
            "-name",
            f"guest={s.name}",
            "-no-user-config",
            "-nodefaults",
            "-display",
            "none",
            *accel_args(accel),
            "-machine",
            "pc",
            "-smp",
            str(s.cpus),
            "-m",
            str(s.memory_mb),
            "-uuid",
            s.smbios_uuid,
            "-kernel",
            str(s.kernel),
            "-initrd",
            str(s.initrd),
            "-append",
            s.cmdline,
            "-chardev",
            f"socket,id=qmp,path={self.qmp_socket},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-chardev",
            f"file,id=serial0,path={self.serial_log}",
            "-device",
            "isa-serial,chardev=serial0",
            "-chardev",
            f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=qga-bus",
            "-device",
            "virtserialport,bus=qga-bus.0,chardev=qga0,name=org.qemu.guest_agent.0",
            "-device",
            "virtio-rng-pci",  # entropy early in boot (sshd keys, Python), as PVE can offer
            "-drive",
            f"file={s.disk},if=none,id=drive-virtio0,format=qcow2,cache=writeback,discard=unmap",
            "-device",
            "virtio-blk-pci,drive=drive-virtio0,bootindex=1",
            "-netdev",
            netdev,
            "-device",
            nic,
        ]
        if len(s.cdroms) > 3:
            raise ValueError("at most three CD-ROMs besides the disk")
        # CD-ROMs where PVE puts them: ide2 (bus 1 unit 0: the cloud-init drive's usual slot), ide3, ide0.
        for index, (iso, (bus, unit)) in enumerate(zip(s.cdroms, [(1, 0), (1, 1), (0, 0)], strict=False)):
            argv += [
                "-drive",
                f"file={iso},if=none,id=cd{index},media=cdrom,readonly=on",
                "-device",
                f"ide-cd,drive=cd{index},bus=ide.{bus},unit={unit}",
            ]
        for name, path in s.fw_cfg:
            argv += ["-fw_cfg", f"name={_qemu_opt(name)},file={_qemu_opt(path)}"]
        if s.no_reboot:
            argv.append("-no-reboot")
        return argv

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> QemuVm:
        if self.proc is not None:
            raise QemuError(f"{self.spec.name}: already started")
        for path in (self.qmp_socket, self.qga_socket):
            path.unlink(missing_ok=True)
        self.accel = self.spec.accel or detect_accel()
        with open(self.qemu_log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(self.accel),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Runs on kill(), on garbage collection and at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _kill_group, self.proc.pid, self.proc)
        try:  # a failed start leaves no QEMU behind (`with` does not call __exit__ when __enter__ raises)
            deadline = time.monotonic() + timeout
            while self.qmp is None:
                if self.proc.poll() is not None:
                    raise QemuError(
                        f"{self.spec.name}: QEMU exited ({self.proc.returncode}) at start: {self._log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise QemuError(f"{self.spec.name}: no QMP socket after {timeout:.0f} s: {self._log_tail()}")
                try:
                    self.qmp = Qmp(self.qmp_socket)
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.1)
            self.ssh_port = self._forwarded_ssh_port()
        except BaseException:
            self.kill()
            raise
        return self

    def _log_tail(self) -> str:
        try:
            return self.qemu_log.read_text(errors="replace")[-2000:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    def _forwarded_ssh_port(self) -> int:
        """The host port of the SSH forward (QEMU picked it when asked for port 0)."""
        if self.spec.ssh_host_port:
            return self.spec.ssh_host_port
        table = self.qmp.command("human-monitor-command", {"command-line": "info usernet"})
        for line in table.splitlines():
            if "HOST_FORWARD" in line:
                fields = line.split()
                # Protocol[State] FD SrcAddr SrcPort DestAddr DestPort RecvQ SendQ
                if len(fields) >= 6 and fields[-3] == "22":
                    return int(fields[3])
        raise QemuError(f"{self.spec.name}: no SSH forward in 'info usernet': {table!r}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> str:
        """QEMU's run state ('running', 'paused', 'shutdown', ...) or 'stopped' when no QEMU runs."""
        if not self.running() or self.qmp is None:
            return "stopped"
        try:
            return self.qmp.command("query-status")["status"]
        except (OSError, QemuError, ValueError):
            return "stopped" if not self.running() else "unknown"

    def wait_exit(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Hard stop (PVE's `stop`): QMP quit, then kill if QEMU lingers."""
        if self.running() and self.qmp is not None:
            try:
                self.qmp.command("quit")
            except (OSError, QemuError):
                pass
        if not self.wait_exit(timeout):
            self.kill()
        self._closed()

    def shutdown(self, timeout: float = 180.0) -> bool:
        """ACPI power button (PVE's `shutdown`), wait for the guest to power off, else kill.
        True if the guest powered off by itself."""
        clean = True
        if self.running() and self.qmp is not None:
            try:
                self.qmp.command("system_powerdown")
            except (OSError, QemuError):
                pass
            clean = self.wait_exit(timeout)
        if not clean:
            self.kill()
        self._closed()
        return clean

    def kill(self) -> None:
        """SIGKILL to QEMU's process group, reaped. Safe to call again."""
        if self._finalizer is not None:
            self._finalizer()  # _kill_group, once
        self._closed()

    def _closed(self) -> None:
        for client in (self.qmp, self._agent):
            if client is not None:
                try:
                    client.close()
                except OSError:
                    pass
        self.qmp, self._agent = None, None
        if self._socket_tmp is not None and not self.running():
            shutil.rmtree(self._socket_tmp, ignore_errors=True)

    def agent(self, timeout: float = 30.0) -> GuestAgent:
        """The VM's guest agent client (one per VM: the socket serves one connection at a time)."""
        if self._agent is None:
            self._agent = GuestAgent(self.qga_socket, timeout=timeout)
        return self._agent

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.kill()


def qemu_processes_under(folder: Path) -> list[int]:
    """PIDs of QEMU processes whose command line names a path under `folder` (the tests' orphan check)."""
    needle = str(Path(folder))
    return [
        pid
        for pid, (_ppid, argv) in proc_table().items()
        if argv and "qemu-system" in argv[0] and any(needle in arg for arg in argv)
    ]
