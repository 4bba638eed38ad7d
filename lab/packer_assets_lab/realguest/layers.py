"""pkgsel's result as a disk layer, cached per selection: what tasksel and pkgsel/include install, installed once.

Installing the template's packages from the mirror takes minutes under TCG (dpkg, Python byte-compiling,
certificates), and every build of the same template asks for the same ones. So the installer emulation
runs pkgsel in a boot of its own on a qcow2 overlay of the base image, and keeps that overlay as a layer
under `~/.cache/packer-assets/layers/<key>/disk.qcow2`; each install is an overlay on the layer, where the
rest of the preseed (host name, clock, locale, users, late_command) is applied.

The key is what decides what apt installs: the base image's recipe sha256, the packages in order, whether
Recommends are installed, and the sha256 of each apt line's `InRelease` as the mirror serves it now (a mirror
update is a new layer). A preseed that drops qemu-guest-agent is another selection: its own layer, its own
install. Built in `.build-<key>-<pid>/` and renamed into place, under an flock (as the base image).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .image import BaseImage
from .qemu import linked_clone_disk

LAYER_DISK, LAYER_MANIFEST = "disk.qcow2", "layer.json"
INDEX_TIMEOUT = 30.0


def layers_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "packer-assets" / "layers"


@dataclass(frozen=True)
class Selection:
    """What pkgsel installs: the packages (tasks first, then pkgsel/include) and whether with Recommends."""

    packages: tuple[str, ...]
    recommends: bool


def index_digests(apt_lines: list[str]) -> list[str]:
    """`<suite URL> <sha256 of its InRelease>` per apt line: the archive's state apt resolves against."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    found = []
    for line in apt_lines:
        words = line.split()
        url = f"{words[1].rstrip('/')}/dists/{words[2]}/InRelease"
        with opener.open(url, timeout=INDEX_TIMEOUT) as response:
            found.append(f"{url} {hashlib.sha256(response.read()).hexdigest()}")
    return found


def layer_key(image: BaseImage, selection: Selection, digests: list[str]) -> str:
    spec = {
        "image": image.recipe_sha256,
        "packages": list(selection.packages),
        "recommends": selection.recommends,
        "indexes": digests,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Layer:
    disk: Path
    key: str
    built_now: bool
    detail: str  # for the install report: how it was made, or when


def ensure_layer(
    image: BaseImage, selection: Selection, build: Callable[[Path], str], *, root: Path | None = None
) -> Layer:
    """The layer for this selection: from the cache, or made now by `build(disk)` (which runs pkgsel on `disk`,
    an overlay on the base image, and returns what it did; it raises to fail)."""
    key = layer_key(image, selection, index_digests(image.apt_lines))
    root = Path(root) if root else layers_root()
    final = root / key
    if (final / LAYER_MANIFEST).is_file():
        return _cached(final, key)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another install of the same selection builds it: wait, then reuse
        if (final / LAYER_MANIFEST).is_file():
            return _cached(final, key)
        for stale in root.glob(f".build-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = root / f".build-{key}-{os.getpid()}"
        work.mkdir()
        try:
            disk = linked_clone_disk(image.disk, work / LAYER_DISK)
            detail = build(disk)
            manifest = {
                "key": key,
                "image": image.recipe_sha256,
                "packages": list(selection.packages),
                "recommends": selection.recommends,
                "built": detail,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (work / LAYER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return Layer(final / LAYER_DISK, key, True, detail)
    finally:
        os.close(fd)


def _cached(folder: Path, key: str) -> Layer:
    manifest = json.loads((folder / LAYER_MANIFEST).read_text())
    return Layer(folder / LAYER_DISK, key, False, f"cached layer built {manifest.get('built_at')}")
