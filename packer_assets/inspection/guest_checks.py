"""What the smoke test checks inside a clone, per OS family: a small declarative spec, like goss.

Each `GuestCheck` is one named step of the smoke test: a command, and what must come back (an exit
code, and optionally a regular expression its output must contain). `via="agent"` runs it in the
clone as root through the QEMU guest agent (`guest-exec`, `guest-exec-status`); `via="ssh"` runs it
as the clone's cloud-init user over SSH, logged in with the key the smoke test gave the clone (the
host key pinned to what the agent read from the clone: see `fresh_identity`).

`checks_for(entry)` is the family's list followed by the site's own from the catalog
(`smoke.commands: [{run: ..., expect_exit: 0}]`). Values a check needs (the install user, the
cloud-init user) are passed as arguments (`params`), never pasted into the script: no quoting to get
wrong. This module only says what to run and judges what came back; pve/smoke.py runs it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Literal

from packer_assets.catalog import SmokeCommand, TemplateEntry

Via = Literal["agent", "ssh"]
OUTPUT_SHOWN = 300  # characters of a check's output kept in its result (metadata, proofs)


@dataclass(frozen=True)
class GuestCheck:
    name: str
    argv: tuple[str, ...]
    purpose: str
    expect_exit: int = 0
    expect_output: str | None = None  # a regex the output (stdout) must contain; {name} = a value, escaped
    via: Via = "agent"
    params: tuple[str, ...] = ()  # values appended to argv ($1, $2, ... of a `sh -c` script)
    warn_exit: int | None = None  # an exit that passes with a warning naming the errors listed (cloud-init's 2)

    def command(self, values: dict[str, str]) -> list[str]:
        """The argv the guest agent runs."""
        return [*self.argv, *(values[p] for p in self.params)]

    def ssh_command(self, values: dict[str, str]) -> str:
        """The command line the SSH user's shell runs (a site check's `run` as written)."""
        return " ".join([*self.argv, *(shlex.quote(values[p]) for p in self.params)])

    def judge(self, exit_code: int | None, output: str, values: dict[str, str], err: str = "") -> tuple[bool, str]:
        """(passed, one line saying why) for what the command returned (its stderr shown when stdout is empty)."""
        shown = " ".join((output if output.strip() else err).split())[:OUTPUT_SHOWN] or "no output"
        if exit_code != self.expect_exit and not self.warned(exit_code):
            return False, f"exit {exit_code}, expected {self.expect_exit}: {shown}"
        if self.expect_output is not None:
            pattern = self.expect_output.format(**{k: re.escape(v) for k, v in values.items()})
            if not re.search(pattern, output, re.MULTILINE):
                return False, f"output does not match {pattern!r}: {shown}"
        if self.warned(exit_code):
            errors = "; ".join(listed_errors(output)) or shown
            return True, f"passed with a warning: exit {exit_code}, errors listed: {errors}"[: 2 * OUTPUT_SHOWN]
        return True, shown

    def warned(self, exit_code: int | None) -> bool:
        """Did the command pass with a warning (its warn_exit)?"""
        return self.warn_exit is not None and exit_code == self.warn_exit != self.expect_exit


def listed_errors(output: str) -> list[str]:
    """The errors `cloud-init status --long` lists: the `- ...` items under `errors:` and under
    `recoverable_errors:` (there grouped by level: `WARNING:`, `DEPRECATED:`, ...), each with its level."""
    found, level, inside = [], "ERROR", False
    for line in output.splitlines():
        text = line.strip()
        if line.startswith(("errors:", "recoverable_errors:")):
            inside, level = True, "ERROR"
        elif inside and text.startswith("- "):
            found.append(f"{level}: {' '.join(text[2:].split())}")
        elif inside and re.fullmatch(r"[A-Z_]+:", text):
            level = text[:-1]
        elif text and not line[0].isspace():
            inside = False  # the next key of the status
    return found


def _sh(script: str) -> tuple[str, ...]:
    # `sh -c SCRIPT sh ARG...`: the arguments are $1... of the script, never part of its text
    return ("sh", "-c", script, "sh")


def _powershell(script: str) -> tuple[str, ...]:
    return ("powershell.exe", "-NoProfile", "-NonInteractive", "-Command", script)


# The clone's identity is its own: /etc/machine-id and the SSH host keys were written during this boot
# (by systemd and cloud-init), not carried over from the install. Prints them for the record and for the
# SSH check, which pins the host key it reads here.
FRESH_IDENTITY = r"""boot=$(awk '$1 == "btime" {print $2}' /proc/stat)
etc=/etc
id=$(cat "$etc/machine-id" 2>/dev/null || true)
case "$id" in ""|uninitialized) echo "/etc/machine-id is empty: this clone has no identity of its own"; exit 1;; esac
found=0
for f in "$etc/machine-id" "$etc"/ssh/ssh_host_*_key; do
  [ -e "$f" ] || continue
  [ "$f" = "$etc/machine-id" ] || found=1
  if [ "$(stat -c %Y "$f")" -lt "$boot" ]; then
    echo "$f dates from before this boot: the template kept the install's identity (not generalized)"
    exit 1
  fi
done
[ "$found" = 1 ] || { echo "no SSH host keys in /etc/ssh"; exit 1; }
echo "machine-id $id"
for f in "$etc"/ssh/ssh_host_*_key.pub; do echo "host-key $(cut -d' ' -f1,2 "$f")"; done"""

# The install user's password login is gone: provisioners lock it (`passwd -l`) when they generalize. A user
# that does not exist (or has no shadow entry) proves nothing: the template is not the one that was built.
PASSWORD_LOCKED = r"""[ -n "$(getent passwd "$1")" ] || { echo "user $1 does not exist: not the install user the template was built with"; exit 1; }
entry=$(getent shadow "$1") || { echo "user $1 has no shadow entry: its password state is unknown"; exit 1; }
hash=$(printf '%s\n' "$entry" | cut -d: -f2)
case "$hash" in
  '!'*|'*'*) echo "$1: password locked";;
  *) echo "$1 can still log in with the install password: the template was not generalized"; exit 1;;
esac"""

# Exit 2 (cloud-init 23.4+): done, with recoverable errors. Accepted with a warning that names them, as the
# templates' provisioners accept it (local.wait_cloud_init in templates/common/common.pkr.hcl); 1 fails.
CLOUD_INIT = GuestCheck(
    "cloud_init",
    ("cloud-init", "status", "--wait", "--long"),
    expect_output=r"^status: done",
    warn_exit=2,
    purpose="cloud-init finished on the clone (status: done; exit 0, or 2 with a warning naming the errors it "
    "recovered from); --wait: it may still run",
)
SSH_LOGIN = GuestCheck(
    "ssh_login",
    ("id", "-un"),
    via="ssh",
    expect_output=r"^{ci_user}$",
    purpose="the cloud-init user and SSH key given to the clone log in and run a command",
)
FRESH_IDENTITY_CHECK = GuestCheck(
    "fresh_identity",
    _sh(FRESH_IDENTITY),
    expect_output=r"^machine-id [0-9a-f]{{32}}$",
    purpose="machine-id and SSH host keys were made on this clone's first boot (the template was generalized)",
)
PASSWORD_LOCKED_CHECK = GuestCheck(
    "password_locked",
    _sh(PASSWORD_LOCKED),
    params=("install_user",),
    purpose="the install user's password login was locked when the template was generalized",
)
AGENT_ENABLED = GuestCheck(
    "guest_agent_enabled",
    ("systemctl", "is-enabled", "qemu-guest-agent"),
    purpose="qemu-guest-agent starts at boot (enabled or static)",
)

WINDOWS_AGENT_ENABLED = GuestCheck(
    "guest_agent_enabled",
    _powershell("(Get-Service -Name 'QEMU-GA').StartType"),
    expect_output=r"Automatic",
    purpose="the QEMU-GA service starts automatically",
)
# sysprep /generalize writes HKLM\SYSTEM\Setup\CloneTag; an image that was never generalized has none.
WINDOWS_GENERALIZED = GuestCheck(
    "fresh_identity",
    _powershell(
        "$tag = (Get-ItemProperty -Path 'HKLM:\\SYSTEM\\Setup' -Name CloneTag -ErrorAction SilentlyContinue).CloneTag; "
        "if (-not $tag) { 'HKLM:\\SYSTEM\\Setup has no CloneTag: sysprep /generalize never ran'; exit 1 }; "
        '"clone-tag $tag"'
    ),
    expect_output=r"^clone-tag ",
    purpose="the image was generalized by sysprep (CloneTag set), so the clone got its own SID",
)

LINUX = (CLOUD_INIT, FRESH_IDENTITY_CHECK, SSH_LOGIN, PASSWORD_LOCKED_CHECK, AGENT_ENABLED)
FAMILY_CHECKS: dict[str, tuple[GuestCheck, ...]] = {
    "debian": LINUX,
    "ubuntu": LINUX,
    "rocky": LINUX,
    "windows": (WINDOWS_GENERALIZED, WINDOWS_AGENT_ENABLED),
}


def site_check(family: str, index: int, command: SmokeCommand) -> GuestCheck:
    """A catalog `smoke.commands` entry as a check: a shell (Linux) or PowerShell (Windows) command."""
    if command.via == "ssh":
        argv: tuple[str, ...] = (command.run,)  # the cloud-init user's login shell runs it
    else:
        argv = _powershell(command.run) if family == "windows" else _sh(command.run)
    return GuestCheck(
        command.name or f"command_{index + 1}",
        argv,
        purpose=f"site check: {command.run}",
        expect_exit=command.expect_exit,
        expect_output=command.expect_output,
        via=command.via,
    )


def checks_for(entry: TemplateEntry) -> tuple[GuestCheck, ...]:
    """The family's checks, then the catalog's `smoke.commands` of the entry."""
    own = entry.smoke.commands if entry.smoke else ()
    return FAMILY_CHECKS[entry.family] + tuple(site_check(entry.family, i, c) for i, c in enumerate(own))


def parse_identity(output: str) -> tuple[str | None, list[str]]:
    """(machine-id, host public keys as `type base64`) from fresh_identity's output."""
    machine_id, keys = None, []
    for line in output.splitlines():
        what, _, value = line.strip().partition(" ")
        if what == "machine-id":
            machine_id = value.strip()
        elif what == "host-key" and value.strip():
            keys.append(value.strip())
    return machine_id, keys
