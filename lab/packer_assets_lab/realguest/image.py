"""A Debian base image for real lab guests (12 bookworm or 13 trixie), built with debootstrap and cached
per recipe.

No Debian installer can run on a CI machine (its .udebs and ISOs are out of reach), but the Debian
archive is: debootstrap builds Debian's base system (minbase) plus what the emulation needs to boot and
reach it (SYSTEM_PACKAGES, each with its reason), and nothing of the template: the installer emulation
installs what the preseed asks for from the mirror (installer.py), and nothing here enables the guest
agent or sshd. The disk holds one ext4 filesystem (no partition table, no bootloader): QEMU boots
the kernel and initrd copied beside the disk (`-kernel/-initrd`, root by UUID, console on ttyS0).
The image also ships `/usr/local/sbin/packer-assets-installer`, the init of the installer emulation's
one-shot boot (installer.py): booted with `init=` it runs the payload QEMU passes as fw_cfg
`opt/org.packer-assets/installer` (Debian's kernel has `qemu_fw_cfg` as a module; the build checks it is
in /lib/modules), prints one result line on the console and powers off.

Building takes minutes, so it happens once per machine: the result lives under
`~/.cache/packer-assets/images/<recipe-sha256>/` where the recipe is everything that shapes the
image (suite, mirror and apt lines, package list, configure and packages scripts, disk size, builder
version). A changed recipe is
a new folder; an unchanged one is reused at once. Safety:

- built in `.build-<key>-<pid>/` beside it and renamed into place, so a kill -9 leaves no half image
  (the next builder removes the leftover);
- an flock on `.<key>.lock` so two builders do not race (the second waits, then reuses);
- every step that mounts (debootstrap, apt in the chroot) runs in its own mount and PID namespace
  (`unshare`), tied to this process by PR_SET_PDEATHSIG: if the builder dies, its helpers and their
  /proc, /sys, /dev mounts die with it instead of lingering on the host;
- the filesystem is made without loop devices (`mkfs.ext4 -d <dir>` into a sparse raw file, then
  `qemu-img convert -O qcow2`), as containers often have none.

A progress line per stage goes to stdout (debootstrap, packages, image, done) with elapsed seconds;
the tools' own output goes to `build.log` in the image folder (and is quoted when a step fails).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packer_assets.errors import OperationError

from .sources import debian_mirrors

SUITE = "bookworm"  # the default suite; a key's release picks its own (sources.SUITES)
# What debootstrap's minbase lacks for the emulation to boot the system and reach it: nothing the
# template's preseed asks for (openssh-server, qemu-guest-agent, cloud-init, sudo: the installer
# emulation installs those from the mirror, as d-i does). Each one, and why:
SYSTEM_PACKAGES = (
    "linux-image-amd64",  # the kernel QEMU boots directly (-kernel), with qemu_fw_cfg and virtio_net as modules
    "initramfs-tools",  # the initrd that finds root=UUID on the virtio disk
    "systemd-sysv",  # systemd as /sbin/init (minbase has systemd's libraries, not the init)
    "udev",  # device nodes and module loading at boot (the virtio NIC, the agent's virtio-serial port)
    "dbus",  # the system bus systemd-networkd, hostnamectl and logind talk over
    "iproute2",  # `ip`: the installer boot brings up its NIC by hand (no systemd runs then)
    "netbase",  # /etc/protocols and /etc/services, which networking and apt's resolver read
    "locales",  # locale-gen: the emulation applies debian-installer/locale, as d-i's localechooser does
    "procps",  # Priority important (d-i's base system has it, minbase does not): ps, sysctl, free
    "less",  # Priority important: a pager for the serial console
)
PACKAGES = SYSTEM_PACKAGES
DISK_SIZE = 4 * 1024**3  # the ext4 filesystem's size; a clone's overlay can be grown (resizefs grows it)
DISK_NAME, KERNEL_NAME, INITRD_NAME, MANIFEST_NAME, LOG_NAME = (
    "disk.qcow2",
    "vmlinuz",
    "initrd.img",
    "image.json",
    "build.log",
)
# Bumped when the build steps change in a way the recipe's text does not show.
BUILDER_VERSION = 2

# The lab's installer emulation (installer.py) boots a clone once with `init=` this script: PID 1, no
# systemd (the target is not running, as d-i's /target is not). It mounts what the initramfs did not
# hand over, remounts / read-write, reads the payload QEMU passes as fw_cfg (the module is loaded by
# hand: no udev), runs it with /bin/sh, prints one result line on the console and powers off. The payload
# is copied to /run (tmpfs), never to the disk. A missing payload or a failed mount is a failed result.
INSTALLER_INIT_PATH = "/usr/local/sbin/packer-assets-installer"
INSTALLER_FW_CFG_NAME = "opt/org.packer-assets/installer"
INSTALLER_RESULT_PREFIX = "packer-assets-installer: "
INSTALLER_INIT = r"""#!/bin/sh
# packer-assets installer emulation: PID 1 of a one-shot boot (init=/usr/local/sbin/packer-assets-installer).
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
payload=/sys/firmware/qemu_fw_cfg/by_name/opt/org.packer-assets/installer/raw
copy=/run/packer-assets-installer.sh
result() {
    rm -f "$copy"
    echo "packer-assets-installer: $1"
    mount -o remount,ro / 2>/dev/null || true
    sync
    echo o > /proc/sysrq-trigger
    while :; do sleep 60; done
}
mountpoint -q /proc || mount -t proc proc /proc || result "failed (cannot mount /proc)"
mountpoint -q /sys || mount -t sysfs sysfs /sys || result "failed (cannot mount /sys)"
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev || result "failed (cannot mount /dev)"
mountpoint -q /run || mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run || result "failed (cannot mount /run)"
mount -o remount,rw / || result "failed (cannot remount / read-write)"
modprobe qemu_fw_cfg || result "failed (modprobe qemu_fw_cfg)"
tries=0
while [ ! -r "$payload" ] && [ "$tries" -lt 50 ]; do sleep 0.2; tries=$((tries + 1)); done
[ -r "$payload" ] || result "failed (no payload: no fw_cfg opt/org.packer-assets/installer)"
(umask 077 && cp "$payload" "$copy") || result "failed (cannot copy the payload)"
echo "packer-assets-installer: running the payload ($(wc -c < "$copy") bytes)"
umask 022
sh "$copy" < /dev/null
status=$?
if [ "$status" -eq 0 ]; then result ok; else result "failed (exit $status)"; fi
"""

# Run inside the chroot (by /bin/sh) once the packages are in. $ROOT_UUID is the filesystem's UUID.
CONFIGURE_SCRIPT = (
    r"""set -eu
echo debian > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n' > /etc/hosts
printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$ROOT_UUID" > /etc/fstab
# The preseed's locale and clock
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' /etc/locale.gen
locale-gen >/dev/null
update-locale LANG=en_US.UTF-8
ln -sf /usr/share/zoneinfo/Etc/UTC /etc/localtime
echo Etc/UTC > /etc/timezone
# DHCP on whatever NIC there is, until cloud-init (when the template installs it) writes a config of its
# own (10-cloud-init-*.network sorts first, so it wins for the NICs it names). Nothing else is enabled:
# sshd, the guest agent and cloud-init are the template's to install and enable.
mkdir -p /etc/systemd/network
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' > /etc/systemd/network/90-dhcp.network
systemctl enable systemd-networkd serial-getty@ttyS0.service
# No identity in a shared image: every system booted from it makes its own machine-id (systemd, first boot).
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
passwd -l root >/dev/null
# The installer emulation's init (above); qemu_fw_cfg must be a module of this kernel (Debian's is).
mkdir -p /usr/local/sbin
cat > /usr/local/sbin/packer-assets-installer <<'INSTALLER_INIT'
"""
    + INSTALLER_INIT
    + r"""INSTALLER_INIT
chmod 755 /usr/local/sbin/packer-assets-installer
find /lib/modules -name 'qemu_fw_cfg.ko*' | grep -q . || { echo "no qemu_fw_cfg module in /lib/modules" >&2; exit 1; }
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/*.log /var/log/apt/* /tmp/* /var/tmp/*
"""
)

# Run in its own mount namespace with the root folder as $1: the chroot gets /proc, /sys, /dev,
# services are kept from starting (policy-rc.d), the packages go in with apt's real resolver.
PACKAGES_SCRIPT = r"""set -eu
root=$1; shift
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
chroot "$root" apt-get update
chroot "$root" apt-get -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold upgrade
chroot "$root" apt-get install -y --no-install-recommends "$@"
chroot "$root" /bin/sh -c "$CONFIGURE_SCRIPT"
rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
"""


class ImageBuildError(OperationError):
    """A step of the base image build failed; the message names the step and quotes its log."""


@dataclass(frozen=True)
class BaseImage:
    """A built image: the folder, its disk, kernel, initrd and the kernel command line to boot it."""

    folder: Path
    disk: Path
    kernel: Path
    initrd: Path
    cmdline: str
    manifest: dict

    @property
    def recipe_sha256(self) -> str:
        return str(self.manifest["recipe_sha256"])

    @property
    def suite(self) -> str:
        """The Debian suite the image was debootstrapped from (bookworm, trixie)."""
        return str(self.manifest.get("suite", SUITE))

    @property
    def apt_lines(self) -> list[str]:
        """The image's apt lines (its recipe's): the mirror hosts the installer emulation may reach."""
        return list(json.loads((self.folder / "recipe.json").read_text())["apt_lines"])

    @classmethod
    def load(cls, folder: Path) -> BaseImage:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        return cls(
            folder, folder / DISK_NAME, folder / KERNEL_NAME, folder / INITRD_NAME, manifest["cmdline"], manifest
        )


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "packer-assets" / "images"


def recipe(
    *,
    mirror: str | None = None,
    packages: Sequence[str] = PACKAGES,
    suite: str = SUITE,
    script: str = CONFIGURE_SCRIPT,
    disk_size: int = DISK_SIZE,
    apt_root: str | os.PathLike[str] = "/etc/apt",
) -> dict:
    """Everything that shapes the image; its sha256 names the cache folder."""
    mirrors = debian_mirrors(suite, mirror=mirror, apt_root=apt_root)
    return {
        "builder": BUILDER_VERSION,
        "suite": suite,
        "mirror": mirrors.mirror,
        "apt_lines": list(mirrors.lines),
        "variant": "minbase",
        "packages": sorted(set(packages)),
        "script": script,
        "packages_script": PACKAGES_SCRIPT,
        "disk_size": disk_size,
    }


def recipe_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _say(progress: Callable[[str], None] | None, started: float, stage: str, detail: str = "") -> None:
    if progress:
        progress(f"realguest image: {stage} ({time.monotonic() - started:.0f} s){': ' + detail if detail else ''}")


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """preexec_fn: the helper is killed when this builder's thread dies (kill -9 included)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# A new PID namespace: when its first process dies the kernel kills every process in it, and the
# mounts made inside go with the namespace. --kill-child ties that first process to unshare.
UNSHARE = ("unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--propagation", "private", "--")


def _run(argv: Sequence[str], log: Path, step: str, env: dict[str, str] | None = None, isolated: bool = False) -> None:
    argv = [*UNSHARE, *argv] if isolated else list(argv)
    with open(log, "ab") as out:
        out.write(f"\n### {step}: {' '.join(argv[:12])}{' ...' if len(argv) > 12 else ''}\n".encode())
        out.flush()
        proc = subprocess.run(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent,
            check=False,
        )
    if proc.returncode != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise ImageBuildError(f"base image: {step} failed (exit {proc.returncode}); end of {log}:\n{tail}")


def _remove_leftovers(root: Path, key: str) -> None:
    """Build folders of builders that died (we hold the lock: none of them is running)."""
    for stale in root.glob(f".build-{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build(work: Path, spec: dict, progress: Callable[[str], None] | None, started: float) -> None:
    log = work / LOG_NAME
    rootfs = work / "rootfs"
    root_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"packer-assets-realguest:{recipe_key(spec)}"))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"}

    _say(progress, started, "debootstrap", f"{spec['suite']} from {spec['mirror']}")
    _run(
        ["debootstrap", "--variant=minbase", "--components=main", spec["suite"], str(rootfs), spec["mirror"]],
        log,
        "debootstrap",
        env,
        isolated=True,
    )
    (rootfs / "etc/apt/sources.list").write_text("\n".join(spec["apt_lines"]) + "\n")

    _say(progress, started, "packages", f"{len(spec['packages'])} packages and their dependencies")
    _run(
        ["/bin/sh", "-c", spec["packages_script"], "sh", str(rootfs), *spec["packages"]],
        log,
        "packages",
        {**env, "CONFIGURE_SCRIPT": spec["script"], "ROOT_UUID": root_uuid},
        isolated=True,
    )

    _say(progress, started, "image", "ext4 filesystem, qcow2 disk, kernel and initrd")
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageBuildError(f"base image: no kernel in {rootfs}/boot after the packages step")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copy2(kernels[-1], work / KERNEL_NAME)
    shutil.copy2(rootfs / "boot" / f"initrd.img-{version}", work / INITRD_NAME)
    raw = work / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(spec["disk_size"])  # sparse
    _run(["mkfs.ext4", "-q", "-F", "-L", "debian-root", "-U", root_uuid, "-d", str(rootfs), str(raw)], log, "mkfs.ext4")
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / DISK_NAME)], log, "qemu-img convert")
    raw.unlink()
    packages = subprocess.run(
        ["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package}\n"], capture_output=True, text=True, check=False
    ).stdout.split()
    shutil.rmtree(rootfs)
    manifest = {
        "recipe_sha256": recipe_key(spec),
        "suite": spec["suite"],
        "mirror": spec["mirror"],
        "kernel_version": version,
        "root_uuid": root_uuid,
        "cmdline": f"root=UUID={root_uuid} ro console=ttyS0,115200n8",
        "installed_packages": len(packages),
        "disk_size": spec["disk_size"],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started),
    }
    (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    (work / "recipe.json").write_text(json.dumps(spec, indent=2) + "\n")


def ensure_base_image(
    *,
    suite: str = SUITE,
    mirror: str | None = None,
    packages: Sequence[str] = PACKAGES,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = print,
    apt_root: str | os.PathLike[str] = "/etc/apt",
) -> BaseImage:
    """The base image of `suite` for this recipe: from the cache, or built now (as root: debootstrap, chroot)."""
    spec = recipe(suite=suite, mirror=mirror, packages=packages, apt_root=apt_root)
    key = recipe_key(spec)
    root = Path(cache) if cache else cache_root()
    final = root / key
    if (final / MANIFEST_NAME).is_file():
        return BaseImage.load(final)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, started, "waiting", "another process is building this image")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if (final / MANIFEST_NAME).is_file():  # built by whoever held the lock
            return BaseImage.load(final)
        if os.geteuid() != 0:
            raise ImageBuildError("base image: building it needs root (debootstrap, chroot, mounts)")
        _remove_leftovers(root, key)
        work = root / f".build-{key}-{os.getpid()}"
        work.mkdir()
        try:
            _build(work, spec, progress, started)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _say(progress, started, "done", str(final))
        return BaseImage.load(final)
    finally:
        os.close(fd)  # closing drops the flock


def real_guest_unavailable(suite: str = SUITE) -> str | None:
    """Why this machine cannot run the lab's real guests, in one line; None when it can. Needs QEMU, qemu-img
    and the image builder's tools, root, the builder's PID/mount namespaces, and the apt mirror (unless the
    image for this recipe is cached). The tests skip with this reason; `lab up --real-guest` and .ci/run say it."""
    import urllib.request

    absent = [
        c for c in ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "unshare") if not shutil.which(c)
    ]
    if absent:
        return f"needs {', '.join(absent)}: apt-get install qemu-system-x86 qemu-utils debootstrap e2fsprogs util-linux"
    if os.geteuid() != 0:
        return "needs root: debootstrap and chroot build the real guest's base image"
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        return f"this machine refuses the image builder's PID/mount namespaces ({probe.stderr.strip()[:120]})"
    try:
        spec = recipe(suite=suite)
    except LookupError as exc:
        return f"no Debian mirror to build the base image from: {exc}"
    if (cache_root() / recipe_key(spec) / MANIFEST_NAME).is_file():
        return None
    release = f"{spec['mirror']}/dists/{spec['suite']}/Release"
    try:
        urllib.request.urlopen(urllib.request.Request(release, method="HEAD"), timeout=20).close()
    except OSError as exc:
        return f"the apt mirror is not reachable ({release}: {exc}): the base image cannot be built here"
    return None
