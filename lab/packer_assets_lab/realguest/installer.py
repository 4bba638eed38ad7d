"""Installer emulation: what the Debian template's preseed asks of the installed system, applied to a
copy of the base image before that copy's first boot.

No Debian installer runs here, so the lab does to a clone's disk what d-i would have done to /target
from the same answers: hostname and domain, time zone, locale, the first user (with its crypted
password, d-i's default groups and sudo when root cannot log in), root locked, tasksel's ssh-server task
and `pkgsel/include` installed from the mirror with apt in the guest (through the lab's proxy, aptproxy.py;
the result cached as a disk layer per selection, layers.py), and `preseed/late_command` run verbatim by
`sh -c` with d-i's conventions: `/target` is the target's root and `in-target` chroots into it; its
failure fails the install, as d-i stops. Everything else (partitioning, the bootloader, the standard
task, upgrades, NTP, ...) is not emulated and is reported as such, with the reason.

The work happens inside the guest, with its own kernel: a one-shot "installer boot" of the disk with
`init=` the image's `/usr/local/sbin/packer-assets-installer` (see image.py), which reads the payload
script this module writes (QEMU passes it as fw_cfg `opt/org.packer-assets/installer`), runs it with
/bin/sh, prints one result line on the serial console and powers off. No systemd runs during that
boot: like d-i's /target, the target system is not running. QEMU never outlives `emulate_install`.

The payload holds the crypted password hash (never a plain password): it is written mode 0600 and
only its path is on QEMU's command line; in the guest it is copied to /run (tmpfs), not to the disk.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from packer_assets.errors import OperationError

from .aptproxy import GUEST_ADDRESS, GUEST_PORT, AptProxy, mirror_hosts
from .image import (
    INSTALLER_FW_CFG_NAME,
    INSTALLER_INIT_PATH,
    INSTALLER_RESULT_PREFIX,
    BaseImage,
)
from .layers import Selection, ensure_layer
from .qemu import QemuError, QemuVm, VmSpec, linked_clone_disk

PAYLOAD_NAME = "installer-payload.sh"
# The first user's groups, as d-i's user-setup gives them (passwd/user-default-groups overrides), those
# that exist in the target; plus sudo when root cannot log in.
DEFAULT_GROUPS = "audio cdrom dip floppy video plugdev netdev"
DEBCONF_TYPES = frozenset({"select", "boolean", "string", "multiselect", "note", "password", "text", "title"})
USERNAME = re.compile(r"[a-z][-a-z0-9_]*")  # user-setup's check
ZONE = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")
LOCALE = re.compile(r"([A-Za-z]{2,3}(?:_[A-Za-z]{2})?)(?:\.([A-Za-z0-9-]+))?(@[A-Za-z0-9]+)?")
# Questions (by prefix) the emulation does not apply, and why.
NOT_EMULATED: tuple[tuple[str, str], ...] = (
    ("partman", "no partition table: the image is one ext4 filesystem"),
    ("grub-installer/", "no bootloader: QEMU boots the image's kernel directly"),
    ("mirror/", "the image's apt lines name this machine's mirror (reached through the lab's proxy)"),
    ("apt-setup/", "the image's apt lines name this machine's mirror (reached through the lab's proxy)"),
    ("pkgsel/upgrade", "the image was upgraded from the same mirror when it was built"),
    ("popularity-contest/", "popularity-contest is not in the image"),
    ("clock-setup/ntp", "offline: no NTP server is reachable during the emulation"),
    ("netcfg/", "the network is configured at boot (systemd-networkd DHCP, cloud-init on a clone)"),
    ("hw-detect/", "no hardware detection: the image's kernel and initramfs are fixed"),
    ("keyboard-configuration/", "no console keymap: the guest's console is serial"),
    ("console-setup/", "no console keymap: the guest's console is serial"),
    ("finish-install/", "the lab boots the disk itself after the emulation"),
    ("debian-installer/", "an installer setting, not the installed system's"),
)
RESULT_LINE = re.compile(rf"^{re.escape(INSTALLER_RESULT_PREFIX)}(ok|failed \(.*\))\s*$", re.MULTILINE)


class InstallerError(OperationError):
    """The preseed cannot be emulated, or the installer boot failed (its console is quoted)."""


# ------------------------------------------------------------------ the preseed


def preseed_url(typed: str) -> str | None:
    """The preseed URL (`url=` or `preseed/url=`) on the last complete line a boot command typed."""
    lines = typed.split("\n")[:-1]  # the part after the last newline was never entered
    if not lines:
        return None
    words = re.sub(r"<[A-Za-z0-9_-]+>", " ", lines[-1]).split()  # <esc>, <wait>, <enter>: keys, not text
    urls = [w.split("=", 1)[1] for w in words if w.startswith(("url=", "preseed/url="))]
    return urls[-1] if urls and urls[-1] else None


def parse_preseed(text: str) -> dict[str, str]:
    """{question: value} from debconf preseed lines, read as debconf-set-selections reads them:
    `owner question type value` (one blank after the type, the rest of the line is the value, which may
    be empty), `#` comments, blank lines, a trailing backslash joins the next line; later lines win.
    A line that is not of that form, or has an unknown type, raises InstallerError naming its number."""
    answers: dict[str, str] = {}
    physical = text.splitlines()
    index = 0
    while index < len(physical):
        start = index
        line = physical[index].removesuffix("\r")
        index += 1
        while line.endswith("\\") and index < len(physical):
            line = line[:-1] + physical[index].removesuffix("\r")
            index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"\s*(\S+)\s+(\S+)\s+(\S+)(?:\s(.*))?$", line)
        if match is None:
            raise InstallerError(f"preseed line {start + 1}: not 'owner question type value': {line.strip()[:80]!r}")
        _owner, question, kind, value = match.groups()
        if kind == "seen":  # a flag, not an answer
            continue
        if kind not in DEBCONF_TYPES:
            raise InstallerError(f"preseed line {start + 1}: unknown type {kind!r} for {question}")
        answers[question] = value or ""
    return answers


# ------------------------------------------------------------------ the payload


@dataclass
class InstallPlan:
    """The payloads (/bin/sh) and what they apply or leave out, one `question: what` line each: `packages_script`
    installs the selection from the mirror (its result is cached as a disk layer, layers.py; "" when nothing is
    selected), `script` applies everything else to the disk with those packages."""

    script: str
    applied: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    packages_script: str = ""
    selection: Selection = field(default_factory=lambda: Selection((), True))


def _required(answers: dict[str, str], question: str) -> str:
    value = answers.get(question, "")
    if not value:
        raise InstallerError(
            f"preseed: {question} is {'empty' if question in answers else 'missing'}; the installer would ask for it"
        )
    return value


def _false(answers: dict[str, str], question: str, default: str = "true") -> bool:
    return answers.get(question, default).strip().lower() == "false"


def _fail(message: str) -> str:
    """A shell command that reports `message` on the console and fails the payload."""
    return f"{{ echo {shlex.quote(INSTALLER_RESULT_PREFIX + message)} >&2; exit 1; }}"


def _netcfg(answers: dict[str, str], plan: InstallPlan, lines: list[str]) -> set[str]:
    hostname = answers.get("netcfg/hostname") or answers.get("netcfg/get_hostname") or "debian"
    domain = answers.get("netcfg/get_domain", "").strip().strip(".")
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", hostname):
        raise InstallerError(f"preseed: netcfg/hostname {hostname!r} is not a valid host name")
    if not re.fullmatch(r"[A-Za-z0-9.-]*", domain):
        raise InstallerError(f"preseed: netcfg/get_domain {domain!r} is not a valid domain")
    names = f"{hostname}.{domain}\t{hostname}" if domain else hostname
    hosts = (
        "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n\n# The following lines are desirable for IPv6 capable hosts\n"
        "::1     localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n"
    )
    lines += [
        "# netcfg: host name and domain, as netcfg writes them",
        f"printf '%s\\n' {shlex.quote(hostname)} > /etc/hostname",
        f"printf {shlex.quote(hosts)} {shlex.quote(names)} > /etc/hosts",
    ]
    used = {q for q in ("netcfg/hostname", "netcfg/get_hostname", "netcfg/get_domain") if q in answers}
    source = "netcfg/hostname" if answers.get("netcfg/hostname") else "netcfg/get_hostname"
    plan.applied.append(f"{source}: /etc/hostname {hostname}, /etc/hosts 127.0.1.1 {names.replace(chr(9), ' ')}")
    return used


def _clock(answers: dict[str, str], plan: InstallPlan, lines: list[str]) -> set[str]:
    used = set()
    if "time/zone" in answers:
        zone = answers["time/zone"].strip()
        if not ZONE.fullmatch(zone) or ".." in zone:
            raise InstallerError(f"preseed: time/zone {zone!r} is not a time zone name")
        lines += [
            "# tzsetup: the time zone",
            f"zone={shlex.quote(zone)}",
            '[ -f "/usr/share/zoneinfo/$zone" ] || ' + _fail(f"time/zone: no /usr/share/zoneinfo/{zone}"),
            'ln -sfn "/usr/share/zoneinfo/$zone" /etc/localtime',
            "printf '%s\\n' \"$zone\" > /etc/timezone",
        ]
        plan.applied.append(f"time/zone: /etc/localtime -> {zone}, /etc/timezone")
        used.add("time/zone")
    if "clock-setup/utc" in answers:
        utc = not _false(answers, "clock-setup/utc")
        lines += [
            "# clock-setup: the hardware clock's time scale",
            f"printf '0.0 0 0.0\\n0\\n{'UTC' if utc else 'LOCAL'}\\n' > /etc/adjtime",
        ]
        plan.applied.append(f"clock-setup/utc: /etc/adjtime {'UTC' if utc else 'LOCAL'}")
        used.add("clock-setup/utc")
    return used


def _locale(answers: dict[str, str], plan: InstallPlan, lines: list[str]) -> set[str]:
    if "debian-installer/locale" not in answers:
        return set()
    value = answers["debian-installer/locale"].strip()
    match = LOCALE.fullmatch(value)
    if match is None:
        raise InstallerError(f"preseed: debian-installer/locale {value!r} is not a locale name")
    language, charset, modifier = match.group(1), match.group(2) or "UTF-8", match.group(3) or ""
    locale = f"{language}.{charset}{modifier}"  # d-i's localechooser picks UTF-8 when none is named
    installed = f"{language}.{charset.lower().replace('-', '')}{modifier}"  # as `locale -a` lists it
    entry = f"{locale} {charset}"
    lines += [
        "# localechooser: the system locale, generated if the image lacks it",
        f"if ! locale -a 2>/dev/null | grep -qxF {shlex.quote(installed)}; then",
        f"    grep -qxF {shlex.quote(entry)} /usr/share/i18n/SUPPORTED || "
        + _fail(f"debian-installer/locale: {locale} is not a supported locale"),
        f"    printf '%s\\n' {shlex.quote(entry)} >> /etc/locale.gen",
        "    locale-gen >/dev/null",
        "fi",
        f"printf 'LANG=%s\\n' {shlex.quote(locale)} > /etc/default/locale",
    ]
    plan.applied.append(f"debian-installer/locale: /etc/default/locale LANG={locale}")
    return {"debian-installer/locale"}


def _accounts(answers: dict[str, str], plan: InstallPlan, lines: list[str]) -> set[str]:
    used = {q for q in answers if q.startswith("passwd/")}
    root_login = not _false(answers, "passwd/root-login")
    if root_login:
        root_hash = _required(answers, "passwd/root-password-crypted")
        _check_hash(root_hash, "passwd/root-password-crypted")
        lines += ["# user-setup: root's password (crypted)", f"usermod -p {shlex.quote(root_hash)} root"]
        plan.applied.append("passwd/root-login: root can log in (passwd/root-password-crypted: its hash)")
    else:
        lines += ["# user-setup: root cannot log in (locked)", "passwd -l root >/dev/null"]
        plan.applied.append("passwd/root-login: false: root locked")
    for plain in (
        "passwd/root-password",
        "passwd/root-password-again",
        "passwd/user-password",
        "passwd/user-password-again",
    ):
        if answers.get(plain):
            raise InstallerError(
                f"preseed: {plain} is a plain password: the emulation takes only crypted "
                "ones (passwd/*-password-crypted)"
            )
    if _false(answers, "passwd/make-user"):
        plan.applied.append("passwd/make-user: false: no user")
        return used
    user = _required(answers, "passwd/username")
    if not USERNAME.fullmatch(user):
        raise InstallerError(f"preseed: passwd/username {user!r} is not a user name user-setup accepts")
    hashed = _required(answers, "passwd/user-password-crypted")
    _check_hash(hashed, "passwd/user-password-crypted")
    fullname = answers.get("passwd/user-fullname", "")
    if ":" in fullname or "\n" in fullname:
        raise InstallerError("preseed: passwd/user-fullname holds ':' (not allowed in /etc/passwd)")
    uid = answers.get("passwd/user-uid", "").strip()
    if uid and not uid.isdigit():
        raise InstallerError(f"preseed: passwd/user-uid {uid!r} is not a number")
    groups = answers.get("passwd/user-default-groups", DEFAULT_GROUPS).replace(",", " ").split()
    if not root_login:
        groups.append("sudo")
    lines += [
        "# user-setup: the first user, its crypted password, its groups (those that exist)",
        "useradd -m -s /bin/bash -c "
        + shlex.quote(fullname)
        + (f" -u {uid}" if uid else "")
        + f" -p {shlex.quote(hashed)} {shlex.quote(user)}",
        "groups=",
        f"for group in {' '.join(shlex.quote(g) for g in groups)}; do",
        '    if getent group "$group" >/dev/null; then groups="${groups:+$groups,}$group"; fi',
        "done",
        f'if [ -n "$groups" ]; then usermod -a -G "$groups" {shlex.quote(user)}; fi',
    ]
    plan.applied.append(
        f"passwd/username: user {user} ({fullname or 'no full name'}), shell /bin/bash, "
        f"groups {' '.join(groups)} (those that exist)"
    )
    plan.applied.append("passwd/user-password-crypted: the user's password hash in /etc/shadow")
    return used


def _check_hash(value: str, question: str) -> None:
    if any(ch in value for ch in ":\n\t "):
        raise InstallerError(f"preseed: {question} is not a crypt hash")


# tasksel's tasks the emulation installs, as the package tasksel's task-* package brings (the task package
# itself only adds tasksel). Others are reported as not emulated.
TASKS = {"ssh-server": ("openssh-server",)}
TASKS_NOT_EMULATED = {
    "standard": "Priority: standard's ~50 packages (man-db, reportbug, ...): too slow to install under TCG",
}
PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]*(:[a-z0-9]+)?")


@dataclass(frozen=True)
class _Chosen:
    """What pkgsel installs (tasksel's tasks' packages, then pkgsel/include) and the report's lines on it."""

    selection: Selection
    notes: tuple[str, ...]  # applied lines
    skipped: tuple[str, ...]  # ignored lines


def _selection(answers: dict[str, str]) -> _Chosen:
    notes, skipped, packages = [], [], []
    for task in [t.strip() for t in answers.get("tasksel/first", "").split(",") if t.strip()]:
        if task in TASKS:
            packages += TASKS[task]
            notes.append(f"tasksel/first: {task}: {' '.join(TASKS[task])} from the mirror")
        else:
            skipped.append(f"tasksel/first: {task}: {TASKS_NOT_EMULATED.get(task, 'task not emulated')}")
    include = answers.get("pkgsel/include", "").replace(",", " ").split()
    for package in include:
        if not PACKAGE.fullmatch(package):
            raise InstallerError(f"preseed: pkgsel/include: {package!r} is not a package name")
    packages += include
    if "pkgsel/include" in answers:
        notes.append(f"pkgsel/include: {' '.join(include) or '(none)'} from the mirror")
    recommends = not _false(answers, "base-installer/install-recommends")
    notes.append(f"base-installer/install-recommends: {'true' if recommends else 'false'} (d-i's default: true)")
    return _Chosen(Selection(tuple(dict.fromkeys(packages)), recommends), tuple(notes), tuple(skipped))


# pkgsel as d-i runs it: apt in the target, from the mirror (here through the lab's proxy, reached by a
# guestfwd: aptproxy.py), services kept from starting (policy-rc.d, as d-i's in-target does; no systemd
# runs in this boot, so invoke-rc.d would otherwise run init scripts). The NIC is brought up by hand: no
# udev, no networkd here; QEMU's user network gives 10.0.2.15/24 and the gateway 10.0.2.2.
PKGSEL = r"""# pkgsel: %(what)s
modprobe virtio_net 2>/dev/null || true
nic=
for path in /sys/class/net/*; do case "${path##*/}" in lo) ;; *) nic=${path##*/}; break ;; esac; done
[ -n "$nic" ] || %(no_nic)s
ip link set lo up
ip link set "$nic" up
ip addr add 10.0.2.15/24 dev "$nic"
ip route add default via 10.0.2.2
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -q -o Acquire::http::Proxy=%(proxy)s -o Acquire::Languages=none "$@" \
        < /dev/null
}
apt_get update || %(no_update)s
apt_get install -y %(recommends)s -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    %(packages)s || %(no_install)s
rm -f /usr/sbin/policy-rc.d
ip addr flush dev "$nic"
ip link set "$nic" down
"""


# Per install, after the cached package layer: the SSH host keys openssh-server's postinst made when the layer
# was built are every install's from that layer; a real install makes its own, so this one does too.
FRESH_HOST_KEYS = """# openssh-server's postinst: this install's own SSH host keys (the package layer's are shared)
if [ -x /usr/sbin/sshd ]; then rm -f /etc/ssh/ssh_host_*; ssh-keygen -A >/dev/null; fi"""


def _packages(answers: dict[str, str], plan: InstallPlan, lines: list[str]) -> set[str]:
    chosen = _selection(answers)
    used = {q for q in ("tasksel/first", "pkgsel/include", "base-installer/install-recommends") if q in answers}
    plan.applied += chosen.notes
    plan.ignored += chosen.skipped
    plan.selection = selection = chosen.selection
    lines.append(FRESH_HOST_KEYS)
    if not selection.packages:
        return used
    words = " ".join(shlex.quote(p) for p in selection.packages)
    plan.packages_script = "\n".join(
        [
            *PAYLOAD_HEADER,
            PKGSEL
            % {
                "what": words,
                "proxy": shlex.quote(f"http://{GUEST_ADDRESS}:{GUEST_PORT}/"),
                "recommends": "" if selection.recommends else "--no-install-recommends",
                "packages": words,
                "no_nic": _fail("pkgsel: no network interface in the installer boot"),
                "no_update": _fail("pkgsel: apt-get update through the lab's mirror proxy failed"),
                "no_install": _fail(f"pkgsel: apt-get install {' '.join(selection.packages)} failed"),
            },
            "apt-get clean  # the layer keeps no .debs (the host's proxy cache has them)",
        ]
    )
    return used


# d-i's finish-install runs the late_command with `sh -c` while the target is mounted on /target, with
# `in-target` (chroot /target) on PATH. Here /target is a bind mount of the (only) root filesystem.
LATE_COMMAND = r"""# preseed/late_command, as finish-install runs it: sh -c, the target on /target, in-target on PATH
late_command=%(command)s
tools=$(mktemp -d /tmp/packer-assets-in-target.XXXXXX)  # /run is noexec
cleanup() {
    umount /target/dev /target/sys /target/proc 2>/dev/null || true
    umount /target 2>/dev/null || true
    rmdir /target 2>/dev/null || true
    rm -rf "$tools"
}
trap 'status=$?; cleanup; exit $status' EXIT
mkdir -p /target
mount --bind / /target
mount -t proc proc /target/proc
mount --bind /sys /target/sys
mount --bind /dev /target/dev
printf '#!/bin/sh\nexec chroot /target "$@"\n' > "$tools/in-target"
chmod 755 "$tools/in-target"
status=0
PATH="$tools:$PATH" DEBIAN_FRONTEND=noninteractive sh -c "$late_command" || status=$?
if [ "$status" -ne 0 ]; then
    echo "%(prefix)spreseed/late_command failed (exit $status)" >&2
    exit "$status"
fi
"""


PAYLOAD_HEADER = (
    "#!/bin/sh",
    "# packer-assets installer emulation payload (generated; run by the image's installer init)",
    "set -eu",
    "umask 022",
    "export LC_ALL=C.UTF-8",
)


def plan_install(answers: dict[str, str]) -> InstallPlan:
    """The payload for these answers and the list of what it applies and what it leaves out.
    Raises InstallerError naming the question when a required answer is missing or unusable."""
    plan = InstallPlan(script="")
    lines = list(PAYLOAD_HEADER)
    used: set[str] = set()
    for step in (_packages, _netcfg, _clock, _locale, _accounts):
        used |= step(answers, plan, lines)
    late = answers.get("preseed/late_command", "")
    if late.strip():
        lines.append(LATE_COMMAND % {"command": shlex.quote(late), "prefix": INSTALLER_RESULT_PREFIX})
        plan.applied.append("preseed/late_command: run verbatim by sh -c, /target bound to / and in-target on PATH")
    if "preseed/late_command" in answers:
        used.add("preseed/late_command")
    for question in sorted(set(answers) - used):
        reason = next((why for prefix, why in NOT_EMULATED if question.startswith(prefix)), "not emulated")
        plan.ignored.append(f"{question}: {reason}")
    plan.script = "\n".join(lines).rstrip("\n") + "\n"
    return plan


# ------------------------------------------------------------------ the installer boot


@dataclass(frozen=True)
class InstallReport:
    applied: list[str]
    ignored: list[str]
    seconds: float
    serial_log: Path
    packages: str = ""  # how pkgsel's packages got there (the layer: installed now from the mirror, or cached)


def console_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a serial console log, carriage returns dropped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no serial log)"
    return "\n".join(text.replace("\r", "").splitlines()[-lines:]) or "(empty serial log)"


def _write_payload(run_dir: Path, script: str) -> Path:
    payload = run_dir / PAYLOAD_NAME
    payload.unlink(missing_ok=True)
    fd = os.open(payload, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the password hash
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(script)
    return payload


def relay_command(port: int) -> str:
    """QEMU's guestfwd `cmd:` for one guest connection to the proxy on 127.0.0.1:port (relay.py)."""
    return f"{sys.executable} -I {Path(__file__).with_name('relay.py')} {port}"


@dataclass(frozen=True)
class InstallBoot:
    """How the installer boot runs: its bound, accelerator and memory."""

    timeout: float = 900.0
    accel: str | None = None
    memory_mb: int = 1024


def emulate_install(
    image: BaseImage, disk: Path, preseed_text: str, run_dir: Path, boot: InstallBoot | None = None
) -> InstallReport:
    """Install what `preseed_text` asks into a new `disk` (an overlay made here): pkgsel's packages from the
    mirror (a cached layer per selection, layers.py, else a boot that installs them now), then one installer
    boot applies the rest of the preseed and its late_command.

    Raises InstallerError if the preseed cannot be emulated, or if a boot does not end with
    `packer-assets-installer: ok` within `boot.timeout` seconds (quoting the end of its serial console).
    QEMU and the proxy are gone when this returns or raises."""
    boot = boot or InstallBoot()
    plan = plan_install(parse_preseed(preseed_text))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    below, packages = image.disk, "pkgsel: nothing to install"
    if plan.packages_script:
        layer = ensure_layer(
            image,
            plan.selection,
            lambda layer_disk: _run_payload(image, layer_disk, plan.packages_script, run_dir / "packages", boot),
        )
        below = layer.disk
        packages = f"pkgsel: layer {layer.key[:12]} ({'installed now: ' if layer.built_now else ''}{layer.detail})"
    Path(disk).unlink(missing_ok=True)
    linked_clone_disk(below, Path(disk))
    _run_payload(image, Path(disk), plan.script, run_dir, boot)
    return InstallReport(plan.applied, plan.ignored, time.monotonic() - started, run_dir / "serial.log", packages)


def _run_payload(image: BaseImage, disk: Path, script: str, run_dir: Path, boot: InstallBoot) -> str:
    """One installer boot of `disk` running `script`, the mirror reachable through the apt proxy; what it took."""
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = _write_payload(run_dir, script)
    started = time.monotonic()
    with AptProxy(mirror_hosts(image.apt_lines)) as proxy:
        spec = VmSpec(
            f"installer-{disk.stem}",
            disk,
            image.kernel,
            image.initrd,
            # panic=10 with -no-reboot: a missing init or a dying PID 1 ends QEMU instead of hanging
            f"{image.cmdline} init={INSTALLER_INIT_PATH} panic=10",
            memory_mb=boot.memory_mb,
            accel=boot.accel,
            fw_cfg=[(INSTALLER_FW_CFG_NAME, payload)],
            guestfwd_cmd=[(GUEST_ADDRESS, GUEST_PORT, relay_command(proxy.port))],
            no_reboot=True,
        )
        serial, finished = _installer_boot(spec, run_dir, boot.timeout)
        counts = proxy.counts
    seconds = time.monotonic() - started
    if not finished:
        raise InstallerError(
            f"installer boot of {disk}: no result after {boot.timeout:.0f} s (QEMU killed); "
            f"end of {serial}:\n{console_tail(serial)}"
        )
    results = RESULT_LINE.findall(serial.read_text(errors="replace").replace("\r", "") if serial.exists() else "")
    if results[-1:] != ["ok"]:
        outcome = results[-1] if results else "no result line (the installer init did not finish)"
        raise InstallerError(
            f"installer boot of {disk}: {outcome} after {seconds:.0f} s; end of {serial}:\n{console_tail(serial)}"
        )
    return f"{seconds:.0f} s, {counts.fetched} .debs fetched from the mirror, {counts.cached} from the cache"


def _installer_boot(spec: VmSpec, run_dir: Path, timeout: float) -> tuple[Path, bool]:
    """Run the installer boot to its end (True) or to the timeout (False, QEMU killed)."""
    vm = QemuVm(spec, run_dir)
    vm.serial_log.unlink(missing_ok=True)
    try:
        vm.start()
        return vm.serial_log, vm.wait_exit(timeout)
    except QemuError as err:
        raise InstallerError(f"installer boot of {spec.disk}: {err}") from err
    finally:
        vm.kill()
