"""The Windows answer ISO: a small ISO9660 + Joliet image holding Autounattend.xml and its scripts.

Windows Setup looks for Autounattend.xml at the root of every removable and optical drive, so an
extra CD-ROM carries the answer file; staged like any ISO, that works with every Packer version
(no `cd_files`, which needs xorriso/mkisofs on the control host and a newer proxmox plugin).

Joliet keeps the long, mixed-case names (`Autounattend.xml`, `firstlogon.ps1`); the ISO9660 names
beside them are upper-case level-3 names that only non-Joliet readers see.

Deterministic bytes: pycdlib stamps every volume and directory record with `time.time()` in local
time and has no parameter for it. `build_answer_iso` pins that clock (UTC, `epoch`) while it
builds, so identical files give identical bytes and an identical sha256 on every machine and time
zone. The pin swaps the `time` module seen by pycdlib's own modules, under a lock, and puts it back;
nothing outside pycdlib is affected. `tests/render/test_render_answer_iso.py` fails if a pycdlib upgrade
starts reading the clock another way.

`read_iso` is the project's one ISO reader: the answer ISO's files for checks and tests, and the lab's
images (Rock Ridge names) for the lab.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import re
import threading
import time as _time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pycdlib

from packer_assets.errors import ConfigError
from packer_assets.evidence.layout import atomic_write

VOLUME_ID = "AUTOUNATTEND"
DEFAULT_EPOCH = 946_684_800  # 2000-01-01T00:00:00Z: any fixed, non-zero instant will do
# pycdlib modules that read the clock (`time.time()` / `time.localtime()`).
_CLOCK_MODULES = ("pycdlib.dates", "pycdlib.headervd", "pycdlib.pycdlib", "pycdlib.utils")
_CLOCK_LOCK = threading.Lock()
_JOLIET_NAME = re.compile(r"^[^/\\:*?\"<>|;\x00-\x1f]{1,64}$")


class AnswerIsoError(ConfigError):
    """Files that cannot go on the answer ISO (name, collision)."""


@contextlib.contextmanager
def _pinned_clock(epoch: int) -> Iterator[None]:
    """pycdlib sees a clock stopped at `epoch`, in UTC (no local time zone in the bytes)."""
    fake = SimpleNamespace(**{name: getattr(_time, name) for name in dir(_time) if not name.startswith("__")})
    fake.time = lambda: float(epoch)
    fake.localtime = lambda secs=None: _time.gmtime(epoch if secs is None else secs)
    modules: list[Any] = [importlib.import_module(name) for name in _CLOCK_MODULES]  # each has a `time`
    with _CLOCK_LOCK:
        saved = [module.time for module in modules]
        try:
            for module in modules:
                module.time = fake
            yield
        finally:
            for module, original in zip(modules, saved, strict=True):
                module.time = original


def _iso9660_name(name: str) -> str:
    """Upper-case level-3 ISO9660 name (d-characters, 8.3 not required); Joliet keeps the real one."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    stem = re.sub(r"[^A-Z0-9_]", "_", stem.upper())[:24] or "_"
    ext = re.sub(r"[^A-Z0-9_]", "_", ext.upper())[:5]
    return f"/{stem}.{ext};1"


def iso_bytes(files: Mapping[str, bytes], volume_id: str = VOLUME_ID, epoch: int = DEFAULT_EPOCH) -> bytes:
    """The ISO image for `files` ({flat name: content}), in a name-sorted, deterministic layout."""
    if not files:
        raise AnswerIsoError("an answer ISO needs at least one file")
    names = sorted(files)
    for name in names:
        if not _JOLIET_NAME.match(name):
            raise AnswerIsoError(
                f'{name!r}: answer ISO files take flat names of 1-64 characters without / \\ : * ? " < > | ;'
            )
    iso_names = [_iso9660_name(n) for n in names]
    if len(set(iso_names)) != len(iso_names) or len({n.lower() for n in names}) != len(names):
        raise AnswerIsoError(f"file names collide on the ISO: {names}")
    vol = re.sub(r"[^A-Z0-9_]", "_", volume_id.upper())[:16]  # Joliet holds 16 characters
    with _pinned_clock(epoch):
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, joliet=3, vol_ident=vol)
        try:
            for name, iso_name in zip(names, iso_names, strict=True):
                data = files[name]
                iso.add_fp(io.BytesIO(data), len(data), iso_name, joliet_path=f"/{name}")
            out = io.BytesIO()
            iso.write_fp(out)
        finally:
            iso.close()
    return out.getvalue()


def build_answer_iso(
    files: Mapping[str, bytes],
    path: str | Path,
    *,
    volume_id: str = VOLUME_ID,
    epoch: int = DEFAULT_EPOCH,
    mode: int = 0o600,
) -> tuple[Path, str]:
    """Write the answer ISO to `path` atomically; return (path, sha256 hex).

    mode 0600 by default: the image carries the Windows password (encoded, not encrypted).
    """
    data = iso_bytes(files, volume_id=volume_id, epoch=epoch)
    written = atomic_write(Path(path), data, mode=mode)
    return written, hashlib.sha256(data).hexdigest()


def read_iso(path: str | Path) -> tuple[str, dict[str, bytes]]:
    """(volume id, {name: bytes}) of the files at an ISO image's root, by their Rock Ridge names where the
    image has them (the lab's images, a cloud-init cidata drive), else by their Joliet names (the answer ISO)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        volume = iso.pvd.volume_identifier.decode("ascii").rstrip()  # the ISO9660 label
        name_of: Callable[[Any], str]  # of a pycdlib directory record (pycdlib ships no types)
        if iso.has_rock_ridge():
            where, name_of = "rr_path", lambda child: child.rock_ridge.name().decode()
        elif iso.has_joliet():
            where, name_of = "joliet_path", lambda child: child.file_identifier().decode("utf-16-be").split(";")[0]
        else:
            raise AnswerIsoError(f"{path}: an ISO without Rock Ridge or Joliet names")
        files: dict[str, bytes] = {}
        for child in iso.list_children(**{where: "/"}):
            if child.is_dot() or child.is_dotdot() or child.is_dir():
                continue
            name = name_of(child)
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, **{where: f"/{name}"})
            files[name] = out.getvalue()
        return volume, files
    finally:
        iso.close()
