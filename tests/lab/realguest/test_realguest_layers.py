"""pkgsel's result cached as a disk layer per selection (layers.py), with a stand-in build (no boot): the key
follows what decides what apt installs, a cached layer is reused, a failed build leaves nothing."""

import subprocess

import pytest

from packer_assets_lab.realguest import layers
from packer_assets_lab.realguest.image import BaseImage
from packer_assets_lab.realguest.layers import Selection, ensure_layer, layer_key

pytestmark = pytest.mark.realguest  # qemu-img makes the disks

FULL = Selection(("openssh-server", "qemu-guest-agent", "cloud-init", "sudo"), True)


@pytest.fixture
def image(tmp_path, monkeypatch):
    folder = tmp_path / "image"
    folder.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(folder / "disk.qcow2"), "64M"], check=True)
    (folder / "recipe.json").write_text('{"apt_lines": ["deb http://m/debian bookworm main"]}')
    monkeypatch.setattr(layers, "index_digests", lambda lines: ["http://m/debian/dists/bookworm/InRelease abc"])
    return BaseImage(folder, folder / "disk.qcow2", folder / "vmlinuz", folder / "initrd.img", "ro",
                     {"recipe_sha256": "1" * 64})


def test_the_key_follows_the_image_the_packages_recommends_and_the_mirrors_indexes(image):
    key = layer_key(image, FULL, ["a 1"])
    assert key == layer_key(image, Selection(FULL.packages, True), ["a 1"])
    assert key != layer_key(image, Selection(("openssh-server", "cloud-init", "sudo"), True), ["a 1"])
    assert key != layer_key(image, Selection(FULL.packages, False), ["a 1"])
    assert key != layer_key(image, FULL, ["a 2"])  # the mirror moved on: a new layer
    other = BaseImage(image.folder, image.disk, image.kernel, image.initrd, "ro", {"recipe_sha256": "2" * 64})
    assert key != layer_key(other, FULL, ["a 1"])


def test_a_layer_is_built_once_then_reused(image, tmp_path):
    built = []

    def build(disk):
        built.append(disk)
        return "installed by the stand-in"
    first = ensure_layer(image, FULL, build, root=tmp_path / "layers")
    again = ensure_layer(image, FULL, build, root=tmp_path / "layers")
    assert len(built) == 1 and first.built_now and not again.built_now
    assert first.disk == again.disk and again.disk.is_file() and again.detail.startswith("cached layer built ")
    info = subprocess.run(["qemu-img", "info", str(again.disk)], capture_output=True, text=True, check=True).stdout
    assert f"backing file: {image.disk}" in info  # an overlay on the base image


def test_a_failed_build_leaves_no_layer(image, tmp_path):
    def failing(disk):
        raise RuntimeError("apt-get install failed")
    with pytest.raises(RuntimeError):
        ensure_layer(image, FULL, failing, root=tmp_path / "layers")
    assert [p.name for p in (tmp_path / "layers").iterdir() if not p.name.endswith(".lock")] == []
