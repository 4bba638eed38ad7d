"""The simulated installers: a GuestState from the rendered answer file the installer would read (lab-invented).

`answer_url(typed)` finds the URL on the boot command packer typed (d-i `url=`, subiquity
`ds=nocloud-net;s=<url>/` -> `<url>/user-data`, anaconda `inst.ks=`); simguest.py fetches it from
packer's HTTP server. `install(answer, base)` reads it and returns the installed system, or the reason the
install fails (then the VM powers off):

- preseed: `pkgsel/include`, tasksel `ssh-server` (openssh-server), passwd/username (+ a crypted
  password: SET), then `preseed/late_command` as d-i runs it (`sh -c`, the list's last status counts;
  /target is the system, `in-target` runs inside it);
- autoinstall: `packages`, `identity.username`, `ssh.install-server`, then every `late-commands` entry
  (each must succeed, as subiquity requires; `curtin in-target` runs inside the target);
- kickstart: `%packages` (groups skipped, `-name` removed), `user --name`, `services --enabled`, then
  each `%post` (in the installed system; a failure matters with `--erroronfail`);
- Windows: Autounattend.xml's FirstLogonCommands and the script they run (firstlogon.ps1 on the answer
  ISO): the virtio guest tools (drivers + QEMU-GA, Automatic), or the QEMU-GA MSI alone, only if the
  script installs them; OpenSSH Server if it adds the capability.

`base`: the family's packages (inventory.py tables) minus those the shipped templates' answer files add
(TEMPLATE_ADDED): so the SBOM lists what the answer file asked for, with the tables' versions (or a
synthetic `0.0-lab-synthetic` for a name the tables do not know).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import yaml

from packer_assets.errors import OperationError
from packer_assets_lab.realguest.installer import InstallerError, parse_preseed

from .guest_shell import Shell
from .guest_state import LOCKED, SET, WINDOWS_TOOLS, GuestState

# What the shipped answer files (or the installer's task they choose) add to the family's base system.
TEMPLATE_ADDED = {
    "debian": frozenset({"openssh-server", "qemu-guest-agent", "cloud-init", "sudo"}),
    "ubuntu": frozenset({"openssh-server", "qemu-guest-agent"}),
    "rocky": frozenset({"qemu-guest-agent", "cloud-init"}),
    "windows": frozenset(WINDOWS_TOOLS),
}
SYNTHETIC = "0.0-lab-synthetic"
FORMATS = {"preseed": "debian", "autoinstall": "ubuntu", "kickstart": "rocky"}


class InstallFailed(OperationError):
    """The installer stopped: the message is what its console shows (never a password or hash)."""


@dataclass(frozen=True)
class Base:
    """What the install starts from: the family, the full package table (name -> (version, arch))."""

    family: str
    table: dict[str, tuple[str, str]]

    def system(self) -> GuestState:
        added = TEMPLATE_ADDED.get(self.family, frozenset())
        return GuestState(family=self.family, packages={n: v for n, v in self.table.items() if n not in added})

    def version_of(self, name: str) -> tuple[str, str]:
        return self.table.get(name, (SYNTHETIC, "noarch" if self.family == "rocky" else "all"))

    def add(self, state: GuestState, names: list[str]) -> None:
        for name in names:
            state.packages[name] = self.version_of(name)


def answer_url(typed: str) -> tuple[str, str] | None:
    """(format, URL of the answer file) on the lines a boot command typed, or None."""
    text = re.sub(r"<[A-Za-z0-9_-]+>", " ", "\n".join(typed.split("\n")[:-1]))
    for word in reversed(text.split()):
        if word.startswith(("url=", "preseed/url=")):
            return "preseed", word.split("=", 1)[1]
        if word.startswith("inst.ks="):
            return "kickstart", word.split("=", 1)[1]
        found = re.match(r"ds=nocloud(?:-net)?\\?;s=(\S+)", word)
        if found:
            return "autoinstall", found.group(1).rstrip("/") + "/user-data"
    return None


def boots_now(typed: str) -> bool:
    """Has the installer been started? A GRUB command line (`linux ...`) boots at its `boot` line; any
    other boot command at the line that named the answer file. The `c` that opens GRUB's command line types
    nothing there, so a first line `clinux ...` is GRUB's `linux ...`."""
    lines = [re.sub(r"<[A-Za-z0-9_-]+>", "", line).strip() for line in typed.split("\n")[:-1]]
    if any(re.match(r"c?linux ", line) for line in lines):
        return bool(lines) and lines[-1] == "boot"
    return answer_url(typed) is not None


def install(kind: str, text: str, base: Base) -> GuestState:
    """The installed system an answer file of `kind` makes; InstallFailed if the installer stops."""
    return {"preseed": _preseed, "autoinstall": _autoinstall, "kickstart": _kickstart}[kind](text, base)


def _preseed(text: str, base: Base) -> GuestState:
    try:
        answers = parse_preseed(text)
    except InstallerError as e:
        raise InstallFailed(f"debian-installer: {e}") from None
    state = base.system()
    if "ssh-server" in answers.get("tasksel/first", ""):
        base.add(state, ["openssh-server"])
    base.add(state, answers.get("pkgsel/include", "").replace(",", " ").split())
    user = answers.get("passwd/username", "")
    if user:
        state.users[user] = SET if answers.get("passwd/user-password-crypted") else LOCKED
    state.machine_id = "install"  # the installer's systemd-machine-id-setup
    state.host_keys_boot = 0 if state.has("openssh-server") else None  # openssh-server's postinst
    late = answers.get("preseed/late_command", "")
    if late:
        shell = Shell(state, version_of=base.version_of, root="/target")
        if shell.run(late) != 0:
            raise InstallFailed(_failure("d-i: Execution of preseeded command (late_command) failed", shell))
    return state


def _autoinstall(text: str, base: Base) -> GuestState:
    try:
        data = (yaml.safe_load(text) or {}).get("autoinstall") or {}
    except (yaml.YAMLError, AttributeError) as e:
        raise InstallFailed(f"subiquity: user-data is not autoinstall YAML: {type(e).__name__}") from None
    state = base.system()
    if (data.get("ssh") or {}).get("install-server"):
        base.add(state, ["openssh-server"])
    base.add(state, [str(p) for p in data.get("packages") or []])
    identity = data.get("identity") or {}
    if identity.get("username"):
        state.users[str(identity["username"])] = SET if identity.get("password") else LOCKED
    state.machine_id, state.host_keys_boot = "install", (0 if state.has("openssh-server") else None)
    for command in data.get("late-commands") or []:
        line = command if isinstance(command, str) else shlex.join(map(str, command))
        shell = Shell(state, version_of=base.version_of, root="/target")
        if shell.run(line) != 0:
            raise InstallFailed(_failure(f"subiquity: late-commands failed: {line[:120]}", shell))
    return state


def _kickstart(text: str, base: Base) -> GuestState:
    state = base.system()
    posts: list[tuple[list[str], list[str]]] = []
    section: list[str] | None = None
    head: list[str] = []
    for line in text.splitlines():
        words = _split(line)
        if section is not None:
            if line.strip() == "%end":
                if head[0] == "%packages":
                    _packages(state, base, section)
                elif head[0] == "%post":
                    posts.append((head, section))
                section = None
            else:
                section.append(line)
        elif words[:1] and words[0].startswith("%"):
            head, section = words, []
        elif words[:1] == ["user"]:
            opts = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            if opts.get("--name"):
                state.users[opts["--name"]] = SET if opts.get("--password") else LOCKED
        elif words[:1] == ["services"]:
            _services(state, words[1:])
    state.machine_id, state.host_keys_boot = "install", None  # sshd-keygen makes them at first boot
    for options, body in posts:
        shell = Shell(state, version_of=base.version_of)
        if shell.run("\n".join(body)) != 0 and "--erroronfail" in options:
            raise InstallFailed(_failure("anaconda: %post --erroronfail script failed", shell))
    return state


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return line.split()


def _packages(state: GuestState, base: Base, lines: list[str]) -> None:
    for name in (line.strip() for line in lines):
        if not name or name.startswith(("#", "@", "%")):
            continue
        if name.startswith("-"):
            state.packages.pop(name[1:], None)
        else:
            base.add(state, [name])


def _services(state: GuestState, words: list[str]) -> None:
    for word in words:
        key, _, value = word.partition("=")
        units = [u for u in value.split(",") if u]
        if key == "--enabled":
            state.enabled.update(u for u in units if state.unit_exists(u))
        elif key == "--disabled":
            state.enabled.difference_update(units)


CRYPT_HASH = re.compile(r"\$[0-9a-z]{1,2}\$\S+")


def _failure(what: str, shell: Shell) -> str:
    """The console line of a failed step: what it printed (the tail), never anything shaped like a crypt hash."""
    said = CRYPT_HASH.sub("<hash>", " ".join("".join(shell.out).split()))[-300:]
    return f"{what} (exit {shell.status})" + (f": {said}" if said else "")


# ---- Windows ------------------------------------------------------------------------------------

FIRST_LOGON = re.compile(r"<FirstLogonCommands>(.*?)</FirstLogonCommands>", re.S)
SCRIPT_NAME = re.compile(r"Join-Path \$_\.Root '([^']+)'")


def install_windows(files: dict[str, bytes], base: Base) -> GuestState:
    """Windows Setup with the answer ISO's files: its FirstLogonCommands run the script they name."""
    xml = files.get("Autounattend.xml")
    if xml is None:
        raise InstallFailed("Windows Setup: no answer file (Autounattend.xml) on any drive")
    state = base.system()
    state.users["Administrator"] = SET
    block = FIRST_LOGON.search(xml.decode(errors="replace"))
    for name in SCRIPT_NAME.findall(block.group(1) if block else ""):
        script = files.get(name)
        if script is not None:
            _first_logon(state, base, script.decode(errors="replace"))
    return state


def _first_logon(state: GuestState, base: Base, script: str) -> None:
    """What firstlogon.ps1 installs (the statements of the shipped script, recognised, not interpreted)."""
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    if re.search(r"virtio-win-guest-tools\.exe", code) and "/install" in code:
        base.add(state, list(WINDOWS_TOOLS))
        state.agent_start_type, state.drivers = "Automatic", True
    elif re.search(r"qemu-ga-x86_64\.msi", code) and "msiexec" in code:
        base.add(state, ["QEMU guest agent"])
        state.agent_start_type = "Automatic"
    found = re.search(r"Set-Service -Name 'QEMU-GA' -StartupType (\w+)", code)
    if found and state.agent_start_type:
        state.agent_start_type = found.group(1)
    state.sshd = "Add-WindowsCapability" in code and "OpenSSH.Server" in code
