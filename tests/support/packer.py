"""Shared pieces of the packer tests: a build plan for a catalog entry, fake packer scripts, a gate that holds builds in the lab guest, and the address packer serves HTTP on."""

from __future__ import annotations

import fcntl
import socket
import stat
import struct
import threading
from pathlib import Path

from packer_assets.catalog import TemplateEntry, load_catalog
from packer_assets.packer.workdir import BuildPlan
from support import REPO

PACKER = "/usr/bin/packer"


def catalog():
    return load_catalog(project_dir=REPO, env={})


def plan_for(entry: TemplateEntry, **over) -> BuildPlan:
    extra = tuple(f"local:iso/{x.filename}" for x in entry.extra_isos)
    if entry.family == "windows":
        extra += (f"local:iso/{entry.key}-answers.iso",)
    values = dict(vm_id=entry.vmid_range.first, vm_name=f"{entry.key}-20250101000000", node="pve1",
                  iso_file=f"local:iso/{entry.iso.filename}", vm_storage="local-lvm", vm_storage_type="lvmthin",
                  bridge="vmbr0", http_bind_address=None, http_port_min=8802, http_port_max=8812,
                  ssh_username=entry.install_user.name, extra_iso_files=extra,
                  description=f"packer-assets {entry.key}", tags=tuple(entry.tags), cpu_type=entry.hardware.cpu_type)
    values.update(over)
    return BuildPlan(**values)


def fake_packer(folder: Path, body: str, name: str = "packer") -> Path:
    """An executable bash script standing in for packer."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class BuildGate:
    """The lab guest's exec handler (`stack.guest.exec_handler = gate`): every provisioner command waits
    here until `open()`. A build runs its commands one at a time, so `waiting` is the number of builds
    in progress, and `most_waiting` the most that ever were at once. What waits here is in `packer build`
    with its VM on the node and, under Dagster, its pool slot claimed."""

    def __init__(self):
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.waiting = 0
        self.most_waiting = 0

    def __call__(self, command: str) -> tuple[int, bytes]:
        with self._lock:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            self._open.wait(600)
        finally:
            with self._lock:
                self.waiting -= 1
        return 0, b""

    def held(self) -> bool:
        return self.most_waiting > 0

    def open(self) -> None:
        self._open.set()


def host_ipv4():
    """The address packer 1.6.6 types as {{ .HTTPIP }}: the first non-loopback IPv4 of an interface, or None."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _index, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), 0x8915,  # SIOCGIFADDR
                                  struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            address = socket.inet_ntoa(raw[20:24])
            if not address.startswith("127."):
                return address
    finally:
        sock.close()
    return None
