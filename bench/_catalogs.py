"""Synthetic catalogs of N keys for the benchmarks, and the lab mirror items that serve them.

    from _catalogs import write_catalog, mirror_items_for
    path = write_catalog(tmp / "catalog.yaml", 500)
    items = mirror_items_for(path)          # -> [MirrorItem, ...] for IsoMirror

The catalogs pass packer_assets/catalog/: unique keys (`bench-0000` ...), one non-overlapping
VMID range of 100 per key, Linux families in turn (ubuntu / debian / rocky) with their real
packer_dir, ISOs on a few fake upstream hosts. As at real upstreams, one checksum file lists the
ISOs of one release directory, so `keys_per_file` keys share each checksum_url: GNU `SHA256SUMS`
for ubuntu/debian-style directories, BSD `CHECKSUM` for rocky-style ones. No pinned checksums and
no keyrings: every key costs the sensor a checksum-file lookup, which is what the benchmarks measure.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

HOSTS = ("releases.example-one.org", "cdimage.example-two.org", "download.example-three.org")
FAMILIES = ("ubuntu", "debian", "rocky")
VMID_BASE, VMID_SPAN = 10_000, 100


def catalog_doc(keys: int, keys_per_file: int = 4) -> dict:
    """The catalog as a YAML-ready mapping: `keys` entries, `keys_per_file` keys per checksum file."""
    if keys < 1 or keys_per_file < 1:
        raise ValueError("keys and keys_per_file must be at least 1")
    templates = []
    for i in range(keys):
        group = i // keys_per_file  # one release directory = one checksum file
        family = FAMILIES[group % len(FAMILIES)]  # a directory holds one family, like upstreams
        host = HOSTS[group % len(HOSTS)]
        directory = f"https://{host}/{family}/release-{group:04d}"
        checksum_name = "CHECKSUM" if family == "rocky" else "SHA256SUMS"
        first = VMID_BASE + i * VMID_SPAN
        entry = {
            "key": f"bench-{i:04d}",
            "family": family,
            "description": f"synthetic {family} key {i} for the benchmarks",
            "iso": {"url": f"{directory}/{family}-{i:04d}-amd64.iso",
                    "checksum_url": f"{directory}/{checksum_name}"},
            "vmid_range": {"first": first, "last": first + VMID_SPAN - 1},
            "packer_dir": f"templates/{family}",
            "tags": ["packer", family, f"g{group:04d}"],
        }
        if family == "ubuntu":
            entry["autoinstall_schema"] = "24.04.1"
        templates.append(entry)
    return {
        "version": 1,
        "defaults": {
            "hardware": {"cores": 2, "sockets": 1, "memory": 2048, "disk": "32G", "bios": "seabios",
                         "efi": False, "tpm": False, "os_type": "l26"},
            "install_user": {"name": "packer", "password_env": "PACKER_INSTALL_PASSWORD"},
            "retention": 3,
            "tags": ["packer"],
        },
        "templates": templates,
    }


def write_catalog(path: str | os.PathLike[str], keys: int, keys_per_file: int = 4) -> Path:
    """Write a synthetic catalog of `keys` keys to `path` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# synthetic benchmark catalog: {keys} keys, {keys_per_file} per checksum file\n"
                    + yaml.safe_dump(catalog_doc(keys, keys_per_file), sort_keys=False))
    return path


def mirror_items_for(path: str | os.PathLike[str]) -> list:
    """The lab mirror items for the catalog at `path` (validated by load_catalog on the way)."""
    from packer_assets.catalog import load_catalog
    from packer_assets_lab.stack import mirror_items

    return mirror_items(load_catalog(path, env={}))
