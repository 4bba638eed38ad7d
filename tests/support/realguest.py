"""Helpers and fixtures of the realguest tests: the project's Debian preseed as a build renders it; the cached
base image and one emulated install of that preseed (tasksel's ssh-server task and pkgsel/include from the
mirror, through the lab's apt proxy, then the late_command), made once per session: the first boot of
test_realguest_installer.py and the clone of test_realguest_boot.py start from it, as a build's clone starts
from its template. A test that requests `installed` first pays for the install: its timeout holds INSTALL_BOUND.
"""

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from packer_assets.catalog import InstallUser, load_catalog
from packer_assets.pve.guest_exec import EphemeralKey
from packer_assets.render.engine import render_files
from packer_assets_lab.realguest.image import SUITE, BaseImage, ensure_base_image
from packer_assets_lab.realguest.installer import InstallBoot, InstallReport, emulate_install

from . import REPO

PASSWORD = "correct horse 'battery' $(staple)"

# Issue 27: a debian-13 entry for the tests until templates/catalog.yaml ships one (a copy of debian-12's, trixie's
# 13.2.0 netinst; the same templates/debian preseed and packer template).
DEBIAN_13 = {
    "key": "debian-13",
    "family": "debian",
    "description": "Debian 13",
    "iso": {
        "url": "https://cdimage.debian.org/cdimage/archive/13.2.0/amd64/iso-cd/debian-13.2.0-amd64-netinst.iso",
        "checksum_url": "https://cdimage.debian.org/cdimage/archive/13.2.0/amd64/iso-cd/SHA256SUMS",
    },
    "vmid_range": {"first": 9600, "last": 9699},
    "packer_dir": "templates/debian",
    "tags": ["packer", "debian", "trixie"],
}


def project_with_debian_13(folder: Path) -> Path:
    """A copy of the project's templates/ (catalog and Packer folders) under folder, its catalog with a debian-13
    entry (DEBIAN_13, unless the shipped catalog has the key already); returns folder."""
    shutil.copytree(REPO / "templates", folder / "templates")
    catalog = folder / "templates/catalog.yaml"
    data = yaml.safe_load(catalog.read_text())
    if all(entry["key"] != "debian-13" for entry in data["templates"]):
        data["templates"].append(DEBIAN_13)
        catalog.write_text(yaml.safe_dump(data, sort_keys=False))
    assert "debian-13" in load_catalog(catalog, env={}, project_dir=folder)
    return folder


def rendered_preseed(user: str = "packer", keys: tuple[str, ...] = ()) -> tuple[str, dict]:
    """The project's Debian preseed, rendered as a build renders it (the hash only, never the password)."""
    entry = load_catalog(project_dir=REPO, env={})["debian-12"]  # debian-13's is the same template
    install_user = entry.install_user
    entry = entry.model_copy(update={"install_user": InstallUser(
        name=user, password_env=install_user.password_env, ssh_authorized_keys_env=install_user.ssh_authorized_keys_env)})
    env = {install_user.password_env: PASSWORD, install_user.ssh_authorized_keys_env: "".join(f"{k}\n" for k in keys)}
    files, context = render_files(entry, env, project_dir=REPO)
    return files["preseed.cfg"].decode(), context


def without_package(preseed: str, package: str) -> str:
    """The preseed with `package` dropped from pkgsel/include (a template that forgot it)."""
    lines = []
    for line in preseed.splitlines(keepends=True):
        if line.startswith("d-i pkgsel/include string "):
            words = line.split()
            assert package in words[3:], line
            line = " ".join(w for w in words if w != package) + "\n"
        lines.append(line)
    return "".join(lines)


# Each of the install's boots (pkgsel's, once per selection and machine: ~8 min under TCG; then ~30 s)
INSTALL_BOUND = 600


@dataclass(frozen=True)
class Installed:
    image: BaseImage
    disk: Path  # never booted: tests boot linked clones of it
    report: InstallReport
    key: EphemeralKey  # the install user's authorized key
    context: dict  # the rendering's context (the password hash)


@pytest.fixture(scope="session")
def base_image() -> BaseImage:
    started = time.monotonic()
    image = ensure_base_image(suite=SUITE, progress=print)  # built once per machine, minutes; then from the cache
    print(f"base image ready in {time.monotonic() - started:.0f} s: {image.folder}")
    return image


@pytest.fixture(scope="session")
def installed(base_image, tmp_path_factory) -> Installed:
    key = EphemeralKey.generate("realguest-installer")
    text, context = rendered_preseed(user="debian", keys=(key.public,))
    folder = tmp_path_factory.mktemp("installed")
    disk = folder / "vm-9401-disk-0.qcow2"
    report = emulate_install(base_image, disk, text, folder / "install", InstallBoot(timeout=INSTALL_BOUND))
    print(f"emulated install {report.seconds:.0f} s ({report.packages})")
    return Installed(base_image, disk, report, key, context)
