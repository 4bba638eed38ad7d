"""The installed packages of the lab's guests, per OS family, OS version and mirror release.

What `sbom.inventory_command(family)` prints on a real guest, in exactly its format (dpkg-query with
the `ii ` status column, rpm's `name<TAB>epoch:version-release<TAB>arch`, the Windows script's JSON),
so the smoke test's SBOM step reads a believable system. Versions follow the OS version
(`{major}`, `{v}`, `{el}` in the tables); each mirror release after the first adds one package and
updates one, the way a re-spun ISO installs newer packages, so consecutive templates of a key differ
by exactly one added and one changed component.
"""

from __future__ import annotations

import json
import re

# name version arch; `{major}`: the OS version's first part, `{v}`: the whole version-id, `{el}`: el<major>
DEBIAN = """\
adduser 3.134 all
apt 2.6.1 amd64
base-files {major}.4+deb{major}u7 amd64
base-passwd 3.6.1 amd64
bash 5.2.15-2+b7 amd64
ca-certificates 20230311 all
cloud-guest-utils 0.33-1 all
cloud-init 22.4.2-1+deb{major}u1 all
coreutils 9.1-1 amd64
cron 3.0pl1-162 amd64
curl 7.88.1-10+deb{major}u7 amd64
dbus 1.14.10-1~deb{major}u1 amd64
debconf 1.5.82 all
dpkg 1.21.22 amd64
e2fsprogs 1.47.0-2 amd64
grep 3.8-5 amd64
gzip 1.12-1 amd64
ifupdown 0.8.41 amd64
iproute2 6.1.0-3 amd64
less 590-2.1~deb{major}u2 amd64
libc6 2.36-9+deb{major}u8 amd64
libssl3 3.0.14-1~deb{major}u2 amd64
linux-image-amd64 6.1.106-3 amd64
locales 2.36-9+deb{major}u8 all
login 1:4.13+dfsg1-1+b1 amd64
openssh-client 1:9.2p1-2+deb{major}u3 amd64
openssh-server 1:9.2p1-2+deb{major}u3 amd64
openssl 3.0.14-1~deb{major}u2 amd64
passwd 1:4.13+dfsg1-1+b1 amd64
python3 3.11.2-1+b1 amd64
qemu-guest-agent 1:7.2+dfsg-7+deb{major}u7 amd64
sudo 1.9.13p3-1+deb{major}u1 amd64
systemd 252.30-1~deb{major}u2 amd64
tzdata 2024a-0+deb{major}u1 all
util-linux 2.38.1-5+deb{major}u1 amd64
vim-tiny 2:9.0.1378-2 amd64"""
DEBIAN_EXTRAS = """\
unattended-upgrades 2.9.1+nmu3 all
needrestart 3.6-4+deb{major}u2 all
apt-listchanges 3.24 all
chrony 4.3-2+deb{major}u1 amd64
rsyslog 8.2302.0-1 amd64"""

UBUNTU = """\
adduser 3.118ubuntu5 all
apt 2.4.13 amd64
base-files 12ubuntu4.6 amd64
bash 5.1-6ubuntu1.1 amd64
ca-certificates 20240203~{v}.1 all
cloud-guest-utils 0.32-22-g45fe84a5-0ubuntu1 all
cloud-init 24.1.3-0ubuntu1~{v}.1 all
coreutils 8.32-4.1ubuntu1.2 amd64
cron 3.0pl1-137ubuntu3 amd64
curl 7.81.0-1ubuntu1.18 amd64
dbus 1.12.20-2ubuntu4.1 amd64
dpkg 1.21.1ubuntu2.3 amd64
e2fsprogs 1.46.5-2ubuntu1.2 amd64
grep 3.7-1build1 amd64
gzip 1.10-4ubuntu4.1 amd64
iproute2 5.15.0-1ubuntu2 amd64
libc6 2.35-0ubuntu3.8 amd64
libssl3 3.0.2-0ubuntu1.18 amd64
linux-image-virtual 5.15.0.119.119 amd64
locales 2.35-0ubuntu3.8 all
login 1:4.8.1-2ubuntu2.2 amd64
lsb-release 11.1.0ubuntu4 all
netplan.io 0.106.1-7ubuntu0.{v}.4 amd64
openssh-client 1:8.9p1-3ubuntu0.10 amd64
openssh-server 1:8.9p1-3ubuntu0.10 amd64
openssl 3.0.2-0ubuntu1.18 amd64
passwd 1:4.8.1-2ubuntu2.2 amd64
python3 3.10.6-1~{v} amd64
qemu-guest-agent 1:6.2+dfsg-2ubuntu6.22 amd64
snapd 2.63+{v} amd64
sudo 1.9.9-1ubuntu2.4 amd64
systemd 249.11-0ubuntu3.12 amd64
tzdata 2024a-0ubuntu0.{v} all
ubuntu-minimal 1.481.1 amd64
ubuntu-server 1.481.1 amd64
util-linux 2.37.2-4ubuntu3.4 amd64"""
UBUNTU_EXTRAS = """\
needrestart 3.5-5ubuntu2.1 all
landscape-common 23.02-0ubuntu1~{v}.2 amd64
fwupd 1.7.9-1~{v}.1 amd64
htop 3.0.5-7build2 amd64"""

# rpm: epoch:version-release as RPM_QUERY prints it (%{EPOCHNUM}: 0 when the package has none)
ROCKY = """\
bash 0:5.1.8-9.{el} x86_64
ca-certificates 0:2024.2.69_v8.0.303-91.4.{el}_4 noarch
chrony 0:4.5-1.{el} x86_64
cloud-init 0:23.4-7.{el}_4.rocky.0.1 noarch
cloud-utils-growpart 0:0.33-1.{el} x86_64
coreutils 0:8.32-35.{el} x86_64
cronie 0:1.5.7-11.{el} x86_64
curl 0:7.76.1-29.{el}_4 x86_64
dbus 1:1.12.20-8.{el} x86_64
dnf 0:4.14.0-9.{el} noarch
e2fsprogs 0:1.46.5-5.{el} x86_64
filesystem 0:3.16-2.{el} x86_64
glibc 0:2.34-100.{el}_4.2 x86_64
glibc-langpack-en 0:2.34-100.{el}_4.2 x86_64
grep 0:3.6-5.{el} x86_64
gzip 0:1.12-1.{el} x86_64
iproute 0:6.2.0-6.{el}_4 x86_64
kernel 0:5.14.0-427.13.1.{el}_4 x86_64
kernel-core 0:5.14.0-427.13.1.{el}_4 x86_64
NetworkManager 1:1.46.0-8.{el}_4 x86_64
openssh 0:8.7p1-38.{el}_4.1 x86_64
openssh-clients 0:8.7p1-38.{el}_4.1 x86_64
openssh-server 0:8.7p1-38.{el}_4.1 x86_64
openssl 1:3.0.7-27.{el} x86_64
openssl-libs 1:3.0.7-27.{el} x86_64
passwd 0:0.80-12.{el} x86_64
python3 0:3.9.18-3.{el}_4.1 x86_64
qemu-guest-agent 17:8.2.0-11.{el}_4 x86_64
rocky-release 0:{v}-1.7.{el} noarch
rpm 0:4.16.1.3-29.{el} x86_64
selinux-policy-targeted 0:38.1.35-2.{el}_4 noarch
sudo 0:1.9.5p2-10.{el}_3 x86_64
systemd 0:252-32.{el}_4 x86_64
tar 2:1.34-6.{el}_1 x86_64
tzdata 0:2024a-1.{el} noarch
util-linux 0:2.37.4-18.{el} x86_64"""
ROCKY_EXTRAS = """\
dnf-automatic 0:4.14.0-9.{el} noarch
tuned 0:2.22.1-1.{el} noarch
rsyslog 0:8.2310.0-4.{el} x86_64
policycoreutils 0:3.6-2.1.{el} x86_64"""
# Not packages, but rpm lists them: the imported signing keys (the parser skips them).
ROCKY_KEYS = "gpg-pubkey\t0:350d275d-6279464b\t(none)\n"

# Where a release's system differs from its family's table above (lab data: the packages and versions of the
# release as public material names them, approximate, not read from its archive): (family, major) ->
# rows that replace a package or add one (name version arch), and names the release no longer installs.
RELEASE_ROWS: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    # Debian 13 "trixie": apt 3.0, OpenSSH 10, Python 3.13, Linux 6.12, the 64-bit time_t library names (t64)
    ("debian", "13"): (
        """\
apt 3.0.3 amd64
base-files 13.8+deb13u1 amd64
bash 5.2.37-2+b5 amd64
cloud-init 25.1.4-1 all
coreutils 9.7-3 amd64
libc6 2.41-12 amd64
libssl3t64 3.5.1-1 amd64
linux-image-amd64 6.12.48-1 amd64
openssh-client 1:10.0p1-7 amd64
openssh-server 1:10.0p1-7 amd64
openssl 3.5.1-1 amd64
python3 3.13.5-1 amd64
qemu-guest-agent 1:10.0.3+ds-0+deb13u1 amd64
sudo 1.9.16p2-3 amd64
systemd 257.8-1~deb13u2 amd64""",
        ("libssl3",),
    ),
    # Ubuntu 26.04 "Resolute Raccoon": sudo-rs and the uutils (Rust) coreutils by default, chrony, dracut
    ("ubuntu", "26"): (
        """\
sudo-rs 0.2.10-1ubuntu1 amd64
rust-coreutils 0.2.2-0ubuntu2 amd64
coreutils-from-uutils 0.0.0~ubuntu21 all
chrony 4.7-1ubuntu1 amd64
dracut 106-5ubuntu2 amd64
openssh-client 1:10.2p1-2ubuntu1 amd64
openssh-server 1:10.2p1-2ubuntu1 amd64
python3 3.13.7-1 amd64
systemd 258.2-2ubuntu1 amd64
cloud-init 25.3-0ubuntu1 all""",
        ("sudo", "coreutils"),
    ),
    # Rocky Linux 10 "Red Quartz": Linux 6.12, OpenSSH 9.9, Python 3.12, glibc 2.39, systemd 257
    ("rocky", "10"): (
        """\
glibc 0:2.39-37.{el}_0 x86_64
glibc-langpack-en 0:2.39-37.{el}_0 x86_64
kernel 0:6.12.0-55.37.1.{el}_0 x86_64
kernel-core 0:6.12.0-55.37.1.{el}_0 x86_64
openssh 0:9.9p1-7.{el}_0 x86_64
openssh-clients 0:9.9p1-7.{el}_0 x86_64
openssh-server 0:9.9p1-7.{el}_0 x86_64
python3 0:3.12.9-1.{el} x86_64
systemd 0:257-9.{el}_0 x86_64
dnf 0:4.20.0-14.{el} noarch
sudo 0:1.9.15-8.p5.{el} x86_64""",
        (),
    ),
}

# DisplayName|DisplayVersion|Publisher, as the registry's Uninstall keys hold them
WINDOWS_PROGRAMS = """\
Cloudbase-Init 1.1.6|1.1.6.0|Cloudbase Solutions Srl
Microsoft Edge|128.0.2739.79|Microsoft Corporation
Microsoft Edge Update|1.3.195.19|
Microsoft Update Health Tools|5.72.0.0|Microsoft Corporation
Microsoft Visual C++ 2015-2022 Redistributable (x64) - 14.40.33810|14.40.33810.0|Microsoft Corporation
Microsoft Visual C++ 2022 X64 Minimum Runtime - 14.40.33810|14.40.33810|Microsoft Corporation
PowerShell 7-x64|7.4.5.0|Microsoft Corporation
QEMU guest agent|108.0.2|RedHat
Virtio-win-driver-installer|0.1.262|Red Hat, Inc.
Virtio-win-guest-tools|0.1.262|Red Hat, Inc."""
WINDOWS_HOTFIXES = ("KB5012170", "KB5041160", "KB5041948", "KB5042881")
FIRST_NEW_HOTFIX = 5043000  # release r adds KB<FIRST_NEW_HOTFIX + r>

# A kernel removed with its config kept (status rc): dpkg-query -W lists it, the parser must skip it.
REMOVED_KERNELS = {
    "debian": "rc \tlinux-image-6.1.0-23-amd64\t6.1.99-1\tamd64\n",
    "ubuntu": "rc \tlinux-image-5.15.0-117-generic\t5.15.0-117.127\tamd64\n",
}
LINUX_TABLES = {"debian": (DEBIAN, DEBIAN_EXTRAS), "ubuntu": (UBUNTU, UBUNTU_EXTRAS), "rocky": (ROCKY, ROCKY_EXTRAS)}


def _rows(table: str, os_version: str) -> list[list[str]]:
    major = os_version.split(".")[0] or "1"
    text = table.format(major=major, v=os_version, el=f"el{major}")
    return [line.split(" ") for line in text.splitlines()]


def _bumped(family: str, version: str, times: int) -> str:
    """`version` after `times` updates, still in the format the family's parser reads."""
    if not times:
        return version
    if family == "rocky":
        return f"{version}.{times}"  # a new release (errata rebuild): 27.el9 -> 27.el9.1
    if family == "windows":
        head, number = re.fullmatch(r"(.*?)(\d+)", version).groups()
        return f"{head}{int(number) + times}"
    return f"{version}+lab{times}"


def _updated(family: str, rows: list[list[str]], release: int) -> list[list[str]]:
    """rows (name, version, ...) as mirror release `release` installs them: release r >= 2 updates row r-2 mod len."""
    updates = [0] * len(rows)
    for r in range(2, release + 1):
        updates[(r - 2) % len(rows)] += 1
    return [[row[0], _bumped(family, row[1], times), *row[2:]] for row, times in zip(rows, updates, strict=True)]


def _added(family: str, extras: list[list[str]], release: int) -> list[list[str]]:
    """The packages releases 2..`release` added, one each: the family's extras, then made-up ones."""
    made_up = ("0:1.0-1", "noarch") if family == "rocky" else ("1.0-1", "all")
    return [extras[r - 2] if r - 2 < len(extras) else [f"lab-update-{r}", *made_up] for r in range(2, release + 1)]


def inventory_rows(family: str, os_version: str, release: int) -> list[list[str]]:
    """The packages (name, version, arch; Windows: name, version, publisher) a full install of that OS version
    from mirror release `release` has: the tables, updated and added to per release."""
    if family == "windows":
        return _updated("windows", [line.split("|") for line in WINDOWS_PROGRAMS.splitlines()], release)
    family = family if family in LINUX_TABLES else "debian"
    table, extras = LINUX_TABLES[family]
    rows = _release_rows(family, os_version, _rows(table, os_version))
    return _updated(family, rows, release) + _added(family, _rows(extras, os_version), release)


def _release_rows(family: str, os_version: str, rows: list[list[str]]) -> list[list[str]]:
    """The family's rows as this OS version installs them (RELEASE_ROWS): replaced in place, dropped, added last."""
    changed, dropped = RELEASE_ROWS.get((family, os_version.split(".")[0]), ("", ()))
    own = {row[0]: row for row in _rows(changed, os_version)} if changed else {}
    kept = [own.pop(row[0], row) for row in rows if row[0] not in dropped]
    return [*kept, *own.values()]


def inventory_output(family: str, os_version: str, release: int) -> str:
    """What `sbom.inventory_command(family)` prints on a guest of that OS version, from mirror release `release`."""
    return format_inventory(family, inventory_rows(family, os_version, release), release)


def format_inventory(family: str, rows: list[list[str]], release: int) -> str:
    """rows as the family's inventory command prints them (guest_state keeps a guest's own rows)."""
    if family == "windows":
        return _windows_output(rows, release)
    family = family if family in LINUX_TABLES else "debian"
    rows = sorted(rows, key=lambda row: row[0])
    if family == "rocky":
        return "".join(f"{name}\t{evr}\t{arch}\n" for name, evr, arch in rows) + ROCKY_KEYS
    lines = [f"ii \t{name}\t{version}\t{arch}\n" for name, version, arch in rows]
    return REMOVED_KERNELS[family] + "".join(lines)


def _windows_output(programs: list[list[str]], release: int) -> str:
    # each release also installs one more cumulative update (a hotfix)
    hotfixes = [*WINDOWS_HOTFIXES, *(f"KB{FIRST_NEW_HOTFIX + r}" for r in range(2, release + 1))]
    data = {
        "programs": [{"DisplayName": n, "DisplayVersion": v, "Publisher": p} for n, v, p in programs],
        "hotfixes": [{"HotFixID": h} for h in hotfixes],
    }
    return json.dumps(data, separators=(",", ":")) + "\r\n"  # ConvertTo-Json -Compress, one CRLF line
