"""The evidence layout of the shell toolkit, kept path for path, with atomic writes.

All paths are relative to a root (default: the current directory). Files are written to a temp file
in the same folder and renamed, so a reader never sees half a file; `latest` links are swapped by
renaming a new symlink over the old one, so `latest` always points at a complete folder.
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV_FILE = Path("infra/env/.env.proxmox")
SECRETS_FILE = Path("control/secrets.env")
INIT_LOGS = Path("output/logs/packer/init")
BUILD_LOGS = Path("output/logs/packer/builds")
INIT_PROOFS = Path("docs/proof/platform/packer-builds/init")
BUILD_PROOFS = Path("docs/proof/platform/packer-builds/builds")
RENDERED = Path("output/rendered")


@dataclass(frozen=True)
class Layout:
    """Where everything lives under one root."""

    root: Path

    @property
    def env_file(self) -> Path:
        return self.root / ENV_FILE

    @property
    def secrets_file(self) -> Path:
        return self.root / SECRETS_FILE

    def init_log_dir(self, stamp: str) -> Path:
        return self.root / INIT_LOGS / stamp

    def init_proof_dir(self, stamp: str) -> Path:
        return self.root / INIT_PROOFS / stamp

    def build_log_dir(self, key: str, stamp: str) -> Path:
        return self.root / BUILD_LOGS / key / stamp

    def build_proof_dir(self, key: str, stamp: str) -> Path:
        return self.root / BUILD_PROOFS / key / stamp

    def rendered_dir(self, key: str) -> Path:
        return self.root / RENDERED / key


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write data to path through a temp file and a rename; the file has `mode` from its first byte."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def swap_latest(target_dir: Path, link_name: str = "latest") -> Path:
    """Point `<parent>/latest` at target_dir (relative link) by renaming a fresh symlink over it."""
    target_dir = Path(target_dir)
    if not target_dir.is_dir():
        raise FileNotFoundError(f"cannot link {link_name} to a missing folder: {target_dir}")
    link = target_dir.parent / link_name
    tmp = target_dir.parent / f".{link_name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target_dir.name, tmp)
    os.replace(tmp, link)
    return link


def latest(parent: Path, link_name: str = "latest") -> Path | None:
    """The folder `latest` points at, or None."""
    link = Path(parent) / link_name
    return link.resolve() if link.is_symlink() else None
