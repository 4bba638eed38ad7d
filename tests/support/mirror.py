"""pytest fixtures for the lab's mirror (loaded by conftest.py)."""

import pytest

from packer_assets_lab.mirror import IsoMirror, MirrorItem

UBUNTU = "/releases.ubuntu.com/22.04.5"
ROCKY = "/download.rockylinux.org/pub/rocky/9/isos/x86_64"
DEBIAN = "/cdimage.debian.org/debian-cd/12.7.0/amd64/iso-cd"

# One item per upstream style: GNU SHA256SUMS (Ubuntu, Debian), BSD CHECKSUM (Rocky, two ISOs in
# one directory), and a pinned checksum with no checksum URL (Windows).
LAB_MIRROR_ITEMS = [
    MirrorItem("ubuntu-2204", f"{UBUNTU}/ubuntu-22.04.5-live-server-amd64.iso", f"{UBUNTU}/SHA256SUMS"),
    MirrorItem("debian-12", f"{DEBIAN}/debian-12.7.0-amd64-netinst.iso", f"{DEBIAN}/SHA256SUMS"),
    MirrorItem("rocky-9", f"{ROCKY}/Rocky-9.4-x86_64-minimal.iso", f"{ROCKY}/CHECKSUM"),
    MirrorItem("rocky-9-boot", f"{ROCKY}/Rocky-9.4-x86_64-boot.iso", f"{ROCKY}/CHECKSUM"),
    MirrorItem("windows-2022", "/software.download.prss.microsoft.com/SERVER_EVAL_x64FRE_en-us.iso", None),
]


@pytest.fixture
def mirror_items() -> list[MirrorItem]:
    """The lab's default mirror items (override this fixture to serve others)."""
    return list(LAB_MIRROR_ITEMS)


@pytest.fixture
def mirror_root(tmp_path):
    """Where the mirror keeps its files; reuse it to restart a mirror with the same state."""
    return tmp_path / "mirror"


@pytest.fixture
def iso_mirror(mirror_root, mirror_items):
    """A started IsoMirror on 127.0.0.1 (ephemeral port), stopped after the test."""
    with IsoMirror(mirror_root, mirror_items) as mirror:
        yield mirror


def signed_catalog(key: str, item: MirrorItem, keyring: str, signature_path: str) -> str:
    """A one-entry catalog whose Debian ISO is `item` (upstream URL = https:/<mirror path>), its checksum file
    signed as `keyring` (a path under the project) and the detached signature at `signature_path`."""
    return f"""version: 1
defaults:
  hardware: {{cores: 1, memory: 1024, disk: 8G, bios: seabios, os_type: l26}}
  install_user: {{name: packer, password_env: PW}}
  retention: 1
templates:
  - key: {key}
    family: debian
    iso:
      url: https:/{item.iso_path}
      checksum_url: https:/{item.checksum_path}
      keyring: {keyring}
      signature_url: https:/{signature_path}
    vmid_range: {{first: 9000, last: 9009}}
    packer_dir: templates/debian
"""
