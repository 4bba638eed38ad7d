"""The record of a render: the files it wrote and its validators passed (name -> sha256), and what a
build serves of the rendered folder: exactly those files, unchanged since the render.

A file in `output/rendered/<key>/` that the render did not write (`evil.cfg`) was never validated: it is
ignored (named in a warning), never copied into a work directory, never in a fingerprint or a build
record. A recorded file whose content changed since the render refuses the build with one line: the
next unattended_files renders anew (its reuse check sees the change). Dot files are a render's temp
files (atomic_write), never served and not worth a warning.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packer_assets.errors import ConfigError
from packer_assets.evidence.layout import atomic_write, sha256_file


class RenderRecordError(ConfigError):
    """The rendered folder is not what its render recorded (or there is no record): nothing is built."""


@dataclass(frozen=True)
class ServedFiles:
    """What a build serves of a rendered folder."""

    folder: Path
    files: dict[str, str]  # name -> sha256, as the render recorded them (checked on disk)
    ignored: tuple[str, ...] = ()  # in the folder, not written by the render: never served
    validated_by: dict[str, list[str]] | None = None  # name -> the upstream validators that checked it

    def warnings(self, key: str) -> list[str]:
        return [ignored_warning(key, self.folder, self.ignored)] if self.ignored else []


def ignored_warning(key: str, folder: Path, names: Iterable[str]) -> str:
    return (
        f"{key}: {folder}: ignored {', '.join(sorted(names))}: not written by the render nor checked by its "
        "validators, so never served to the installer"
    )


def stray_files(folder: Path, rendered: Iterable[str]) -> tuple[str, ...]:
    """Names in `folder` that are not among `rendered` (dot files aside)."""
    known = set(rendered)
    try:
        found = [p.name for p in Path(folder).iterdir()]
    except OSError:
        return ()
    return tuple(sorted(n for n in found if n not in known and not n.startswith(".")))


def write_render_record(
    path: Path, render_key: str | None, metadata: Mapping[str, Any], files: Mapping[str, str], argv: Iterable[str] = ()
) -> Path:
    """render_key: set only when `packer validate` passed too (then unattended_files may reuse the render);
    files: every file the render wrote (the answer ISO too), its sha256."""
    return atomic_write(
        path,
        json.dumps(
            {"render_key": render_key, "metadata": dict(metadata), "files": dict(files), "argv": list(argv)},
            indent=1,
            sort_keys=True,
        )
        + "\n",
    )


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def changed_file(path: Path, digest: str) -> str | None:
    """Why `path` is not the file the render wrote (None: it is)."""
    if path.is_symlink() or not path.is_file():
        return "missing since the render" if not path.exists() else "not a regular file since the render"
    if sha256_file(path) != digest:
        return "changed since the render that validated it"
    return None


def refusal(key: str, path: Path, why: str) -> str:
    return (
        f"{key}: {path}: {why}: refusing to serve it; materialize unattended_files[{key}] to render and "
        "validate it anew"
    )


def served_files(key: str, folder: Path, record_path: Path) -> ServedFiles:
    """The files of `folder` a build serves: those of the render's record, each unchanged on disk.
    RenderRecordError (one line) when there is no record or a recorded file changed."""
    folder = Path(folder)
    record = read_record(record_path)
    if record is None or not record["files"]:
        raise RenderRecordError(
            f"{key}: no record of a validated render ({record_path}): materialize "
            f"unattended_files[{key}] (or run `packer-assets validate {key}`) first"
        )
    files = {str(name): str(digest) for name, digest in record["files"].items()}
    for name in files:
        if "/" in name or name.startswith(".") or not name:
            raise RenderRecordError(f"{key}: {record_path}: files: {name!r} is not a file name a render writes")
    for name, digest in sorted(files.items()):
        why = changed_file(folder / name, digest)
        if why:
            raise RenderRecordError(refusal(key, folder / name, why))
    return ServedFiles(folder, files, stray_files(folder, files), recorded_validators(record))


def recorded_validators(record: Mapping[str, Any]) -> dict[str, list[str]]:
    """name -> validators ("pykickstart RHEL10") the render recorded for each file (older records: none)."""
    described = (record.get("metadata") or {}).get("files") or {}
    return {
        str(name): [str(v) for v in info.get("validated_by", ())]
        for name, info in sorted(described.items())
        if isinstance(info, dict) and info.get("validated_by")
    }
