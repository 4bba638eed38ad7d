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

KVM is used only where it really runs the guest's kernel: /dev/kvm can exist without hardware
virtualization (nested or paravirtual setups where `-enable-kvm` aborts, or runs a boot sector and then
hangs in Linux), so `detect_accel(kernel)` boots that kernel under KVM to its panic (no root) within a
bound and takes TCG (`thread=multi`) unless it gets there; the choice is remembered and logged.
"""

from __future__ import annotations

import hashlib
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
from collections.abc import Callable, Sequence
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

ACCEL_PROBE_BOUND = 60.0  # seconds the kernel gets under KVM to reach its panic (it needs about 1 s there)
KVM_DEVICE = Path("/dev/kvm")
KERNEL_MARKERS = ("Linux version", "Kernel panic")  # in this order on the probe's serial console


def accel_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "packer-assets" / "accel.json"


def probe_kernel(accel: str, kernel: Path, bound: float = ACCEL_PROBE_BOUND) -> str | None:
    """Does `kernel` really run under `accel`? None if it does, else why not (one line).

    Boots the kernel with no disk and no initrd (`console=ttyS0 panic=-1`, `-no-reboot`): it must print
    its banner and then panic (no root) on the serial console, and QEMU must exit, within `bound` s.
    What will run is what is probed: a machine whose KVM runs a boot sector but not Linux is caught."""
    with tempfile.TemporaryDirectory(prefix="pa-accel-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [QEMU, *accel_args(accel), "-machine", "pc", "-m", "256", "-nodefaults", "-display", "none"]
        argv += ["-no-reboot", "-serial", f"file:{serial}", "-kernel", str(kernel)]
        argv += ["-append", "console=ttyS0,115200n8 panic=-1"]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=bound, start_new_session=True, check=False)
        except subprocess.TimeoutExpired:
            proc = None
        except OSError as exc:
            return f"{QEMU} did not start ({exc})"
        text = serial.read_text(errors="replace") if serial.exists() else ""
    seen = [marker for marker in KERNEL_MARKERS if marker in text]
    if proc is None:
        return f"the kernel printed {len(text)} bytes (markers seen: {', '.join(seen) or 'none'}) in {bound:.0f} s"
    if len(seen) < len(KERNEL_MARKERS) or text.index(KERNEL_MARKERS[0]) > text.index(KERNEL_MARKERS[1]):
        last = (proc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no error"]
        return f"QEMU exited {proc.returncode} before the kernel's banner and panic ({last[0][:160]})"
    return None


@dataclass(frozen=True)
class AccelChoice:
    accel: str
    why: str


_CHOSEN: dict[str, str] = {}  # this process's choices by cache key (logged once each)


def _accel_key(kernel: Path) -> str:
    """What decides the choice: QEMU (path and version), the kernel's bytes, /dev/kvm being there."""
    binary = shutil.which(QEMU) or QEMU
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
        qemu = f"{binary} {version.stdout.splitlines()[0] if version.stdout else version.returncode}"
    except (OSError, subprocess.TimeoutExpired):
        qemu = f"{binary} (no --version)"
    kernel_sha = hashlib.sha256(Path(kernel).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps([qemu, kernel_sha, KVM_DEVICE.exists()]).encode()).hexdigest()


def _remembered(key: str) -> AccelChoice | None:
    try:
        entry = json.loads(accel_cache_path().read_text()).get(key)
        return AccelChoice(entry["accel"], entry["why"]) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _remember(key: str, choice: AccelChoice) -> None:
    path = accel_cache_path()
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        known = {}
    known[key] = {"accel": choice.accel, "why": choice.why, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(known, indent=2) + "\n")
    os.replace(tmp, path)


def _choose(kernel: Path, bound: float) -> AccelChoice:
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"no usable {KVM_DEVICE}")
    failed = probe_kernel("kvm", kernel, bound)
    if failed is None:
        return AccelChoice("kvm", f"the kernel {Path(kernel).name} booted to its panic under KVM")
    return AccelChoice("tcg", f"KVM probe failed: {failed}")


def detect_accel(kernel: Path, bound: float = ACCEL_PROBE_BOUND, log: Callable[[str], None] = print) -> str:
    """'kvm' where `kernel` really runs under KVM, else 'tcg'; PACKER_ASSETS_QEMU_ACCEL=kvm|tcg overrides.

    The choice is remembered in ~/.cache/packer-assets/accel.json under a key of what decides it (QEMU's
    path and version, the kernel's sha256, /dev/kvm present), so the probe runs once per machine and
    kernel; each choice is logged once per process, with why."""
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced in ("kvm", "tcg"):
        choice, key = AccelChoice(forced, f"{ACCEL_ENV}={forced}"), f"env:{forced}"
    else:
        key = _accel_key(kernel)
        remembered = _remembered(key)
        choice = remembered or _choose(kernel, bound)
        if remembered is None:
            _remember(key, choice)
        else:
            choice = AccelChoice(choice.accel, f"{choice.why} (remembered in {accel_cache_path()})")
    if _CHOSEN.get(key) != choice.accel:
        _CHOSEN[key] = choice.accel
        log(f"realguest: accelerator {choice.accel}: {choice.why}")
    return choice.accel


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
    # (guest address, guest port, command): QEMU starts the command for each connection the guest makes,
    # the connection as its stdin/stdout (a TCP chardev guestfwd above serves one connection only)
    guestfwd_cmd: Sequence[tuple[str, int, str]] = ()
    smbios_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    accel: str | None = None  # None: detect_accel(kernel)
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
        for guest_addr, guest_port, command in s.guestfwd_cmd:
            netdev += f",guestfwd=tcp:{guest_addr}:{guest_port}-cmd:{_qemu_opt(command)}"
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
        self.accel = self.spec.accel or detect_accel(self.spec.kernel)
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
