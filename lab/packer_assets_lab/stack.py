"""The whole lab in one process: fake PVE (HTTPS), ISO mirror and guest SSH, wired to the catalog.

Used by `packer-assets lab up` (in its background process) and by the tests' `lab` fixture.
"""

import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from packer_assets.catalog import (
    CATALOG_ENV,
    MIRROR_CHECKSUMS_ENV,
    MIRROR_ENV,
    MIRROR_KEYRING_ENV,
    Catalog,
    load_catalog,
)
from packer_assets.errors import ConfigError

from .certs import LabPki, LabSigningKey, make_lab_pki, make_signing_key
from .console import console_template
from .guest import LabGuest
from .mirror import IsoMirror, MirrorItem
from .pve import LabPve, RealGuests, kill_stale_qemus
from .pve.agent import os_release_text
from .realguest.image import BaseImage
from .realguest.sources import SUITES, suite_for
from .serving import ServedPve

# The mirror writes SHA256SUMS beside every ISO: a pinned checksum (Windows media) names upstream's bytes, which the
# lab's tiny ISO cannot match, so the project reads that file instead (PACKER_ASSETS_ISO_MIRROR_CHECKSUMS, applied
# when the catalog is loaded: the user's own catalog stays the one every run reads).
MIRROR_CHECKSUMS = "SHA256SUMS"
# What a real guest's build waits for SSH: the emulated install and the first boot under TCG take minutes.
REAL_GUEST_SSH_TIMEOUT = "30m"
# What the lab's guests are, said in every proof through PACKER_ASSETS_GUEST_NOTES (the product's generic note
# per key): real VMs for the keys run for real, answering fakes for the rest.
GUEST_NOTES = {
    "real": "lab: real guest (a QEMU VM running Debian {release} ({suite}), installer emulated, not a real install, "
    "base image recipe sha256 {recipe_sha256})",
    "simulated": "lab: simulated guest (the lab answers for the installed system, nothing ran in a VM)",
}


def real_guest_note(recipe_sha256: str, suite: str = "bookworm") -> str:
    """The real guests' note: the image recipe names the system they started from, beside the ISO."""
    release = {name: number for number, name in SUITES.items()}[suite]
    return GUEST_NOTES["real"].format(release=release, suite=suite, recipe_sha256=recipe_sha256)


def _url_path(url: str) -> str:
    parts = urlsplit(url)
    return f"/{parts.netloc}{parts.path}"


def mirror_items(catalog: Catalog) -> list[MirrorItem]:
    """One mirror item per ISO of every entry (extra ISOs get `<key>--<name>`), at upstream URL paths. An ISO
    several keys share (windows-2022 and windows-2025 name the same virtio-win URL) is one upstream file: one
    item, named by the first key that names it."""
    items: list[MirrorItem] = []
    for entry in catalog:
        for iso in entry.all_isos():
            name = getattr(iso, "name", None)
            if any(item.iso_path == _url_path(iso.url) for item in items):
                continue
            items.append(
                MirrorItem(
                    key=f"{entry.key}--{name}" if name else entry.key,
                    iso_path=_url_path(iso.url),
                    checksum_path=_url_path(iso.checksum_url) if iso.checksum_url else None,
                    os_release=None if name else os_release_text(entry.expected_os),
                    signature_path=_url_path(iso.signature_url) if iso.signature_url else None,
                    clearsigned=bool(iso.keyring and not iso.signature_url),
                )
            )
    return items


def check_real_guest_keys(catalog: Catalog, keys: tuple[str, ...]) -> dict[str, str]:
    """The keys `--real-guest` marks must be catalog keys that expect a Debian release the real guest can be
    (sources.SUITES); each key's suite, the base image its VMs run."""
    suites = {}
    for key in keys:
        if key not in catalog:
            raise ConfigError(f"--real-guest {key}: no such key in {catalog.path} (keys: {', '.join(catalog.keys())})")
        expected = catalog.get(key).expected_os
        suites[key] = suite_for(key, expected.id, expected.version_id)
    return suites


def serve_simulated_keys(guest: LabGuest, pve: LabPve, keys: list[str]) -> dict[str, int]:
    """One lab guest port per key; a command on a key's port runs on that key's build VM (LabPve.lab_ssh_exec), one
    on the guest's shared port on the only build VM running (if there is exactly one)."""
    ports = {key: guest.listen() for key in keys}
    by_port, known = {port: key for key, port in ports.items()}, frozenset(keys)

    def answer(port: int, command: str) -> tuple[int, bytes]:
        # the shared port (a key added to the catalog since the lab started): the one build VM running, if any
        return pve.lab_ssh_exec(by_port.get(port), known, command, guest.read_text)

    guest.port_handler = answer
    guest.port_gate = lambda port: port not in by_port or pve.lab_sshd_runs(by_port[port], known)
    return ports


def real_guest_images(catalog: Catalog, keys: tuple[str, ...], progress) -> dict[str, BaseImage]:
    """Each key's base image: its Debian release's (built here the first time: minutes), one per suite."""
    from .realguest.image import ensure_base_image  # looked up when called: a stand-in may take the build's place

    suites = check_real_guest_keys(catalog, keys)
    built = {suite: ensure_base_image(suite=suite, progress=progress) for suite in sorted(set(suites.values()))}
    return {key: built[suite] for key, suite in suites.items()}


def real_guest_accel(images: dict[str, BaseImage], progress) -> str | None:
    """The accelerator, probed (or remembered) now on each image's kernel and logged once; None (each VM's QEMU
    finds its kernel's remembered choice) where the kernels disagree."""
    from .realguest.qemu import detect_accel

    found = {detect_accel(image.kernel, log=progress) for image in images.values()}
    return found.pop() if len(found) == 1 else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LabStack:
    state: Path
    pki: LabPki
    served: ServedPve
    mirror: IsoMirror
    guest: LabGuest
    catalog: Catalog
    catalog_path: Path
    root_password: str
    guest_password: str
    signing: LabSigningKey
    real_guests: dict[str, int] = field(default_factory=dict)  # key -> the host port of its guests' SSH
    # key -> the lab guest's port for that key's simulated builds: a session's port names the VM it changes
    sim_ports: dict[str, int] = field(default_factory=dict)
    real_images: dict[str, BaseImage] = field(default_factory=dict)  # key -> the base image its real guests run

    @property
    def pve(self) -> LabPve:
        return self.served.pve

    @classmethod
    def start(
        cls,
        state: Path,
        catalog_path: Path | None,
        root_password: str,
        guest_password: str,
        project_dir: Path | None = None,
        real_guests: tuple[str, ...] = (),
        progress=print,
    ) -> "LabStack":
        """real_guests: keys whose VMs run for real (QEMU on the cached base image of the key's Debian release,
        built here the first time: minutes, root and the apt mirror)."""
        state = Path(state)
        state.mkdir(parents=True, exist_ok=True)
        catalog = load_catalog(catalog_path, env={}, project_dir=project_dir)  # the user's, as written
        pki = make_lab_pki(state / "pki")
        pve = LabPve(password=root_password, data_dir=state / "pve-data")
        # A lab killed with kill -9 leaves its real guests' QEMUs (own sessions): this state's go now.
        kill_stale_qemus(state / "pve-data" / "realguest")
        ports: dict[str, int] = {}
        images: dict[str, BaseImage] = {}
        if real_guests:
            images = real_guest_images(catalog, tuple(real_guests), progress)
            ports = {key: _free_port() for key in real_guests}
            pve.enable_real_guests(
                RealGuests(
                    images=images,
                    accel=real_guest_accel(images, progress),
                    root=state / "pve-data" / "realguest",
                    ssh_ports=ports,
                )
            )
        served = ServedPve(pve, pki).start()
        mirror = IsoMirror(state / "mirror", mirror_items(catalog)).start()
        users = sorted({entry.install_user.name for entry in catalog})
        # The guest also plays the smoke test's clones: their cloud-init user logs in with the keys in the
        # clone's config, and the clone's agent reports the guest's host key as the clone's own.
        guest = LabGuest(
            state / "guest",
            username=users[0],
            password=guest_password,
            also_accept=users[1:],
            key_source=pve.lab_ssh_keys,
        ).start()
        pve.lab_guest_host_keys = [f"{guest.host_key.get_name()} {guest.host_key.get_base64()}"]
        sim_ports = serve_simulated_keys(guest, pve, [e.key for e in catalog if e.key not in ports])
        return cls(
            state,
            pki,
            served,
            mirror,
            guest,
            catalog,
            catalog.path,
            root_password,
            guest_password,
            make_signing_key(state / "signing"),
            ports,
            sim_ports,
            images,
        )

    def env(self) -> dict[str, str]:
        """What points the project at the lab (bootstrap login, trust, mirror, guest endpoint)."""
        values = {
            "PROXMOX_URL": f"{self.served.url}/api2/json",
            "PROXMOX_CA_FILE": str(self.pki.ca_file),
            "PROXMOX_BOOTSTRAP_USER": "root@pam",
            "PROXMOX_BOOTSTRAP_PASSWORD": self.root_password,
            MIRROR_ENV: self.mirror.base_url,
            MIRROR_CHECKSUMS_ENV: MIRROR_CHECKSUMS,
            # The mirror signs the checksum files it writes with its own invented key (mirror_key.py):
            # a catalog entry with a keyring is verified against this keyring, and its proof says so.
            MIRROR_KEYRING_ENV: str(self.mirror.signing_key.ensure().keyring),
            CATALOG_ENV: str(self.catalog_path),  # the catalog the lab was started with: an edit counts at the next run
            # Debian's packer ignores loopback agent addresses: builds talk to the lab guest directly.
            "PACKER_ASSETS_SSH_HOST": self.guest.host,
            "PACKER_ASSETS_SSH_PORT": str(self.guest.port),
            "PACKER_ASSETS_SSH_TIMEOUT": "60s",
            "PACKER_ASSETS_BOOT_WAIT": "100ms",
            # Debian's packer 1.6.6 cannot do EFI/TPM/extra CDs nor log in with a token: the lab builds
            # degraded (recorded as warnings), and packer logs in as the automation user with the password
            # proxmox_env gives it (PROXMOX_BUILD_LOGIN=auto), never as root.
            "PACKER_ASSETS_ALLOW_DEGRADED": "1",
            # The lab signs its proof bundles; `packer-assets proof verify --allowed-signers` with this file checks them.
            "PACKER_ASSETS_SIGNING_KEY": str(self.signing.key_file),
            "PACKER_ASSETS_SIGNING_KEY_ID": self.signing.key_id,
            # Every lab VM's console is a file (console.py): a build whose VM stops before SSH quotes its last lines.
            "PACKER_ASSETS_CONSOLE_LOG": console_template(self.pve.data_dir),
            "PACKER_ASSETS_GUEST_NOTES": ";".join(
                [
                    *(
                        f"{k}={real_guest_note(image.recipe_sha256, image.suite)}"
                        for k, image in sorted(self.real_images.items())
                    ),
                    f"*={GUEST_NOTES['simulated']}",
                ]
            ),
        }
        # Every key has its own port: a real guest's is QEMU's forward; a simulated key's is the lab guest's
        # port for that key, so what packer runs there changes that key's build VM (simguest.py).
        ports = {**self.sim_ports, **self.real_guests}
        if ports:
            values["PACKER_ASSETS_SSH_PORTS"] = ",".join(f"{k}={p}" for k, p in sorted(ports.items()))
        if self.real_guests:
            # A real guest takes minutes to install and boot.
            values["PACKER_ASSETS_SSH_TIMEOUT"] = REAL_GUEST_SSH_TIMEOUT
        for entry in self.catalog:
            values[entry.install_user.password_env] = self.guest_password
        return values

    def describe(self) -> dict:
        return {
            "pve_url": self.served.url,
            "ca_file": str(self.pki.ca_file),
            "mirror_url": self.mirror.base_url,
            "allowed_signers": str(self.signing.allowed_signers),
            "guest": f"{self.guest.host}:{self.guest.port}",
            "catalog": str(self.catalog_path),
            "real_guests": {key: f"127.0.0.1:{port}" for key, port in sorted(self.real_guests.items())},
        }

    def stop(self) -> None:
        self.pve.stop_real_guests()
        for part in (self.guest, self.mirror, self.served):
            part.stop()
