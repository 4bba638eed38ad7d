"""What a simulated guest's system holds, as far as the smoke test and the SBOM look (invented by the lab).

One `GuestState` per VM the lab's simulated installer installed (simguest.py): seeded from the rendered
answer file (answer_files.py), changed by what packer's provisioners run (guest_shell.py), copied to a
clone at clone time, and read by the smoke test's checks (guest_answers.py). Time is the lab-wide boot
counter: every start of a VM is a new boot stamp, larger than every one before, so "a file dates from
before this boot" is "written at an earlier stamp than the VM's current boot".

Modelled: machine-id (value and the boot that wrote it; empty after truncate), the SSH host keys (the boot
that made them, or none), the users' password state (set or locked: never the hash), installed packages
(name -> version, arch), enabled systemd units, cloud-init's instance (none, ran as instance X, cleaned),
and on Windows: the CloneTag sysprep /generalize writes, the QEMU-GA service (installed? StartType), the
virtio drivers and sshd. Not modelled: files in general, the network, anything a template cannot change.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

LOCKED, SET = "locked", "set"  # a user's password state
# Which package provides a systemd unit the templates name (a unit not listed here is taken as present).
UNIT_PACKAGES = {
    "qemu-guest-agent": "qemu-guest-agent",
    "ssh": "openssh-server",
    "sshd": "openssh-server",
    "cloud-init": "cloud-init",
    "cloud-init-local": "cloud-init",
    "chronyd": "chrony",
}
# The agent's unit on Debian/Ubuntu has no [Install] section (udev starts it): `static`, running when installed.
STATIC_AGENT = frozenset({"debian", "ubuntu"})
WINDOWS_TOOLS = ("QEMU guest agent", "Virtio-win-driver-installer", "Virtio-win-guest-tools")


@dataclass
class GuestState:
    """One simulated system. `boot` is the stamp of its current (or last) boot; 0 = never booted."""

    family: str  # debian, ubuntu, rocky, windows
    packages: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (version, arch or publisher)
    users: dict[str, str] = field(default_factory=dict)  # name -> SET | LOCKED
    enabled: set[str] = field(default_factory=set)  # systemd units (no .service)
    machine_id: str = ""
    machine_id_boot: int = 0
    host_keys_boot: int | None = None  # None: no host keys in /etc/ssh
    cloud_init: str = "none"  # none | ran | clean
    cloud_init_instance: str = ""
    boot: int = 0
    seen_start: float | None = None  # the PVE start (vm.started_at) this state booted for
    # Windows
    clone_tag_boot: int | None = None  # when sysprep /generalize wrote HKLM\SYSTEM\Setup\CloneTag
    agent_start_type: str = ""  # "" (QEMU-GA not installed), Automatic, Manual, Disabled
    drivers: bool = False  # virtio drivers (vioscsi, netkvm) installed
    sshd: bool = False

    @property
    def windows(self) -> bool:
        return self.family == "windows"

    def has(self, package: str) -> bool:
        if self.windows and package == "qemu-guest-agent":
            return bool(self.agent_start_type)
        return package in self.packages

    def unit_exists(self, unit: str) -> bool:
        provider = UNIT_PACKAGES.get(unit.removesuffix(".service"))
        return provider is None or self.has(provider)

    def agent_runs(self) -> bool:
        """Does qemu-ga answer? Installed, and (Rocky: enabled; Windows: started at boot)."""
        if self.windows:
            return self.agent_start_type == "Automatic"
        if not self.has("qemu-guest-agent"):
            return False
        return self.family in STATIC_AGENT or "qemu-guest-agent" in self.enabled

    def sshd_runs(self) -> bool:
        """Is there an sshd to log in to (Windows: the OpenSSH capability; Linux: openssh-server)?"""
        return self.sshd if self.windows else self.has("openssh-server")

    def identity_is_fresh(self) -> str | None:
        """None if machine-id and host keys were made at this boot, else why not (fresh_identity's wording)."""
        if not self.machine_id:
            return "/etc/machine-id is empty: this clone has no identity of its own"
        if self.machine_id_boot < self.boot:
            return "/etc/machine-id dates from before this boot: the template kept the install's identity (not generalized)"
        if self.host_keys_boot is None:
            return "no SSH host keys in /etc/ssh"
        if self.host_keys_boot < self.boot:
            return (
                "/etc/ssh/ssh_host_ed25519_key dates from before this boot: the template kept the install's "
                "identity (not generalized)"
            )
        return None


def machine_id_for(instance: str, boot: int) -> str:
    return hashlib.sha256(f"lab-machine-id:{instance}:{boot}".encode()).hexdigest()[:32]


def boot(state: GuestState, stamp: int, instance: str) -> GuestState:
    """The system after a start at boot `stamp` of the VM whose cloud-init instance is `instance`:
    systemd writes a machine-id only when it is empty; cloud-init (if installed) on a new instance, or after
    `cloud-init clean`, deletes and makes the host keys (ssh_deletekeys); sshd-keygen / the ssh unit make them
    only when missing."""
    new = copy.deepcopy(state)
    new.boot = stamp
    if new.windows:
        return new
    if not new.machine_id:
        new.machine_id, new.machine_id_boot = machine_id_for(instance, stamp), stamp
    if new.has("cloud-init") and (new.cloud_init != "ran" or new.cloud_init_instance != instance):
        new.cloud_init, new.cloud_init_instance = "ran", instance
        new.host_keys_boot = stamp if new.has("openssh-server") else new.host_keys_boot
    if new.host_keys_boot is None and new.has("openssh-server"):
        new.host_keys_boot = stamp
    return new


def clone(state: GuestState) -> GuestState:
    """The clone's disk is the template's: the same system, not booted yet."""
    new = copy.deepcopy(state)
    new.seen_start = None
    return new


def generalized_default(family: str, packages: dict[str, tuple[str, str]]) -> GuestState:
    """A VM the lab did not install (made through the API, no boot command typed, as unit tests do): it
    answers as a template its family's shipped template generalized would (every user locked)."""
    state = GuestState(family=family, packages=dict(packages))
    if family == "windows":
        state.clone_tag_boot, state.agent_start_type, state.drivers, state.sshd = 0, "Automatic", True, True
    else:
        state.enabled = {"qemu-guest-agent", "ssh" if family != "rocky" else "sshd"}
        state.cloud_init = "clean"
    state.users = {"*": LOCKED}
    return state


def user_state(state: GuestState, name: str) -> str | None:
    """The password state of `name`, or None if there is no such user."""
    return state.users.get(name, state.users.get("*"))
