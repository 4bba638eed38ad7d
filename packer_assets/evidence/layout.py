"""The evidence layout of the shell toolkit, kept path for path, with atomic writes.

All paths are relative to an output root (default: the current directory). Files are written to a temp file
in the same folder and renamed, so a reader never sees half a file; `latest` links are swapped by
renaming a new symlink over the old one, so `latest` always points at a complete folder.
"""

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from packer_assets.evidence.chain import log_header

if TYPE_CHECKING:
    from packer_assets.evidence.signing import Signer

ENV_FILE = Path("infra/env/.env.proxmox")
SECRETS_FILE = Path("control/secrets.env")
INIT_LOGS = Path("output/logs/packer/init")
BUILD_LOGS = Path("output/logs/packer/builds")
INIT_PROOFS = Path("docs/proof/platform/packer-builds/init")
BUILD_PROOFS = Path("docs/proof/platform/packer-builds/builds")
RENDERED = Path("output/rendered")
BUILD_LOG_NAME = "packer.log"  # in each build's log folder and its proof bundle
BUILD_RECORD_NAME = "build.json"  # in a build's log folder, written only for a template that passed its smoke test
REGISTRY = Path("docs/proof/platform/packer-builds/registry.json")
WORK = Path("output/work")
LOCKS = Path("output/locks")


@dataclass(frozen=True)
class Layout:
    """Where everything lives under one output root."""

    output_root: Path

    @property
    def env_file(self) -> Path:
        return self.output_root / ENV_FILE

    @property
    def secrets_file(self) -> Path:
        return self.output_root / SECRETS_FILE

    def init_log_dir(self, stamp: str) -> Path:
        return self.output_root / INIT_LOGS / stamp

    def init_proof_dir(self, stamp: str) -> Path:
        return self.output_root / INIT_PROOFS / stamp

    def build_log_dir(self, key: str, stamp: str) -> Path:
        return self.output_root / BUILD_LOGS / key / stamp

    def build_proof_dir(self, key: str, stamp: str) -> Path:
        return self.output_root / BUILD_PROOFS / key / stamp

    def rendered_dir(self, key: str) -> Path:
        return self.output_root / RENDERED / key

    def work_dir(self, key: str) -> Path:
        """`output/work/<key>/`: one work directory per build (`<ts>/`) or validation (`validate-*/`)."""
        return self.output_root / WORK / key

    def lock_file(self, key: str) -> Path:
        """`output/locks/<key>.lock`: held by the run that works on the key (see locks.py)."""
        return self.output_root / LOCKS / f"{key}.lock"

    @property
    def registry_file(self) -> Path:
        """`docs/proof/platform/packer-builds/registry.json`: every key's templates and channels (registry.py)."""
        return self.output_root / REGISTRY

    @property
    def registry_lock(self) -> Path:
        """`output/locks/_registry.lock`: held while the registry is rebuilt and written (no key starts with `_`)."""
        return self.output_root / LOCKS / "_registry.lock"


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


# ------------------------------------------------------------------ run logs and proof bundles


class Redactor:
    """Replaces every known secret by *** (longest first, so a secret inside another goes too)."""

    def __init__(self, secrets: list[str] | tuple[str, ...] = ()):
        self._secrets: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        # Short values (a port, "1") would shred the log; nothing that short is a real secret.
        if secret and len(secret) >= 6 and secret not in self._secrets:
            self._secrets.append(secret)
            self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class RunLog:
    """A log file for one run: every line prefixed by the chain header, secrets redacted, also echoed.

    The file is appended line by line (a crash keeps what was written); `latest` is swapped only on
    `close()`, so it always points at a log that ended.
    """

    def __init__(
        self, path: Path, chain: str, redact: Redactor | None = None, echo: Callable[[str], object] | None = None
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.chain = chain
        self.redact = redact or Redactor()
        self.echo = echo
        self._out = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run, closed by close()

    def line(self, stage: str, text: str) -> str:
        clean = self.redact(text.rstrip("\n"))
        entry = f"{log_header(self.chain, stage)} {clean}"
        self._out.write(entry + "\n")
        self._out.flush()
        if self.echo:
            self.echo(entry)
        return entry

    def close(self) -> Path:
        if not self._out.closed:
            self._out.close()
            swap_latest(self.path.parent)
        return self.path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks (ISOs do not fit in memory): the one file hasher."""
    import hashlib

    digest = hashlib.new(algorithm)
    with open(path, "rb") as src:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
MANIFEST_FORMAT = "packer-assets bundle manifest 1"


def write_manifest(folder: Path, signer: "Signer | None" = None) -> Path:
    """manifest.json: every file of the bundle folder with its sha256 (and who signs it), then, with a
    signer, manifest.json.sig: its SSH signature (signing.py). `packer-assets proof verify` checks both."""
    import json

    folder = Path(folder)
    files = {
        p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
    }
    signed_by = {"key_id": signer.key_id, "public_key": signer.public_key()} if signer else None
    manifest = atomic_write(
        folder / MANIFEST,
        json.dumps({"format": MANIFEST_FORMAT, "files": files, "signed_by": signed_by}, indent=2, sort_keys=True)
        + "\n",
    )
    if signer:
        atomic_write(folder / SIGNATURE, signer.sign(manifest.read_bytes()))
    return manifest


def write_proof_bundle(
    proof_dir: Path,
    readme: str,
    proof: dict[str, Any],
    log_file: Path,
    log_name: str,
    extra_files: dict[str, Path] | None = None,
    signer: "Signer | None" = None,
) -> Path:
    """README.md, proof.json, a copy of the log (and of `extra_files`: name -> source) and the manifest
    (signed when a signer is given) in a fresh folder, then `latest` swapped to it.

    The folder is assembled under a temp name and renamed into place: a reader sees all of it or none.
    """
    import json
    import shutil

    proof_dir = Path(proof_dir)
    if proof_dir.exists():
        raise FileExistsError(f"proof folder already exists, refusing to overwrite: {proof_dir}")
    staging = proof_dir.with_name(f".{proof_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(log_file, staging / log_name)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, staging / name)
        atomic_write(staging / "README.md", readme)
        atomic_write(staging / "proof.json", json.dumps(proof, indent=2, sort_keys=True) + "\n")
        write_manifest(staging, signer)
        os.replace(staging, proof_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_latest(proof_dir)
    return proof_dir
