"""Tiny but real ISO9660 images for the lab mirror.

The images are real so that whatever reads them downstream (pycdlib in the tests, a PVE node in a
real demo) treats them as ISOs; they are tiny (tens of KB: ISO9660 reserves 32 KB of system area
before the first descriptor) so the lab stays fast. They are read with the product's one ISO reader,
packer_assets.render.read_iso.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pycdlib


def _iso9660_name(name: str) -> str:
    """An ISO9660 level-1 name (8.3, d-characters); Rock Ridge keeps the real name.

    No Joliet: its volume id holds only 16 UCS-2 characters, shorter than real ones.
    """
    stem, _, ext = name.upper().rpartition(".") if "." in name else (name.upper(), "", "")
    stem = re.sub(r"[^A-Z0-9_]", "_", stem)[:8] or "_"
    ext = re.sub(r"[^A-Z0-9_]", "_", ext)[:3]
    return f"/{stem}.{ext};1"


def _volume_id(volume_id: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", volume_id.upper())[:32]


def make_iso(path: str | os.PathLike[str], volume_id: str, files: dict[str, bytes]) -> Path:
    """Write an ISO9660 image (with Rock Ridge names) holding `files` (flat names) at `path`.

    Written to a temp file and renamed, so a reader never sees half an image.
    """
    path = Path(path)
    iso_names = [_iso9660_name(n) for n in files]
    if len(set(iso_names)) != len(iso_names):
        raise ValueError(f"file names collide in ISO9660 8.3 form: {sorted(files)}")
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=_volume_id(volume_id), rock_ridge="1.09")
    try:
        for (name, data), iso_name in zip(files.items(), iso_names, strict=True):
            if "/" in name:
                raise ValueError(f"make_iso takes flat file names, got {name!r}")
            iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        iso.write(str(tmp))
        os.replace(tmp, path)
    finally:
        iso.close()
    return path
