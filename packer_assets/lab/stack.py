"""The whole lab in one process: fake PVE (HTTPS), ISO mirror and guest SSH, wired to the catalog.

Used by `packer-assets lab up` (in its background process) and by the tests' `lab` fixture.
"""

import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from ..catalog import CATALOG_ENV, MIRROR_ENV, Catalog, load_catalog
from .certs import LabPki, LabSigningKey, make_lab_pki, make_signing_key
from .guest import LabGuest
from .mirror import IsoMirror, MirrorItem
from .pve import LabPve
from .pve.agent import os_release_text
from .serving import ServedPve

LAB_CATALOG = "lab-catalog.yaml"


def _url_path(url: str) -> str:
    parts = urlsplit(url)
    return f"/{parts.netloc}{parts.path}"


def mirror_items(catalog: Catalog) -> list[MirrorItem]:
    """One mirror item per ISO of every entry (extra ISOs get `<key>--<name>`), at upstream URL paths."""
    items = []
    for entry in catalog:
        for iso in entry.all_isos():
            name = getattr(iso, "name", None)
            items.append(MirrorItem(key=f"{entry.key}--{name}" if name else entry.key, iso_path=_url_path(iso.url),
                                    checksum_path=_url_path(iso.checksum_url) if iso.checksum_url else None,
                                    os_release=None if name else os_release_text(entry.expected_os)))
    return items


def write_lab_catalog(source: Path, target: Path) -> Path:
    """The shipped catalog with pinned checksums swapped for the mirror's SHA256SUMS next to the ISO.

    A pinned sha256 (Windows media) names the real upstream bytes, which the lab's tiny ISO cannot
    match; everything else about the entry stays as shipped.
    """
    data = yaml.safe_load(source.read_text())
    for entry in data.get("templates", []):
        for iso in [entry.get("iso", {}), *entry.get("extra_isos", [])]:
            if "checksum" in iso:
                del iso["checksum"]
                iso["checksum_url"] = posixpath.join(posixpath.dirname(iso["url"]), "SHA256SUMS")
                iso.setdefault("filename", posixpath.basename(urlsplit(iso["url"]).path))
    target.write_text("# Written by the lab from " + str(source) + " (pinned checksums -> mirror SHA256SUMS)\n"
                      + yaml.safe_dump(data, sort_keys=False))
    return target


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

    @property
    def pve(self) -> LabPve:
        return self.served.pve

    @classmethod
    def start(cls, state: Path, catalog_path: Path | None, root_password: str, guest_password: str,
              project_dir: Path | None = None) -> "LabStack":
        state = Path(state)
        state.mkdir(parents=True, exist_ok=True)
        shipped = load_catalog(catalog_path, env={}, project_dir=project_dir)
        lab_catalog_path = write_lab_catalog(shipped.path, state / LAB_CATALOG)
        catalog = load_catalog(lab_catalog_path, env={}, project_dir=shipped.project_dir)
        pki = make_lab_pki(state / "pki")
        pve = LabPve(password=root_password, data_dir=state / "pve-data")
        served = ServedPve(pve, pki).start()
        mirror = IsoMirror(state / "mirror", mirror_items(catalog)).start()
        users = sorted({entry.install_user.name for entry in catalog})
        # The guest also plays the smoke test's clones: their cloud-init user logs in with the keys in the
        # clone's config, and the clone's agent reports the guest's host key as the clone's own.
        guest = LabGuest(state / "guest", username=users[0], password=guest_password, also_accept=users[1:],
                         key_source=pve.lab_ssh_keys).start()
        pve.lab_guest_host_keys = [f"{guest.host_key.get_name()} {guest.host_key.get_base64()}"]
        return cls(state, pki, served, mirror, guest, catalog, lab_catalog_path, root_password, guest_password,
                   make_signing_key(state / "signing"))

    def env(self) -> dict[str, str]:
        """What points the project at the lab (bootstrap login, trust, mirror, guest endpoint)."""
        values = {
            "PROXMOX_URL": f"{self.served.url}/api2/json",
            "PROXMOX_CA_FILE": str(self.pki.ca_file),
            "PROXMOX_BOOTSTRAP_USER": "root@pam",
            "PROXMOX_BOOTSTRAP_PASSWORD": self.root_password,
            MIRROR_ENV: self.mirror.base_url,
            CATALOG_ENV: str(self.catalog_path),
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
        }
        for entry in self.catalog:
            values[entry.install_user.password_env] = self.guest_password
        return values

    def describe(self) -> dict:
        return {"pve_url": self.served.url, "ca_file": str(self.pki.ca_file), "mirror_url": self.mirror.base_url,
                "allowed_signers": str(self.signing.allowed_signers),
                "guest": f"{self.guest.host}:{self.guest.port}", "catalog": str(self.catalog_path)}

    def stop(self) -> None:
        for part in (self.guest, self.mirror, self.served):
            part.stop()
