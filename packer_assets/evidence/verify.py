"""`packer-assets proof verify`: is a proof bundle exactly what was written?

Checks, in order: every entry of the bundle folder, walked recursively without following links (each
must be a regular file the manifest lists with its sha256, unchanged; a subdirectory, symlink, FIFO,
socket or unlisted file fails; so does a file every bundle has that is absent, listed or not), the
signature over the manifest (SSHSIG, signing.py; with an allowed_signers file, a signature is required
and its signer must be allowed for the manifest's key_id exactly as `ssh-keygen -Y verify -I <key_id>`
decides, allowed_signers.py), proof.json's chain_id against the chain the folder stands for, and
proof.json against its JSON Schema (build or init, by its `kind`). Each problem is one line naming the
file. Unsigned bundles pass on their digests alone only when no signature is asked for.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from packer_assets.errors import ConfigError
from packer_assets.evidence.allowed_signers import SignerRefused, check_allowed, read_allowed_signers
from packer_assets.evidence.chain import parse_chain_id
from packer_assets.evidence.layout import (
    BUILD_LOG_NAME,
    BUILD_PROOFS,
    INIT_PROOFS,
    MANIFEST,
    MANIFEST_FORMAT,
    SIGNATURE,
    Layout,
    sha256_file,
)
from packer_assets.evidence.proof import build_proof_schema, init_proof_schema
from packer_assets.evidence.signing import NAMESPACE, SignatureError, verify

OK, FAILED = 0, 1  # exit codes; a bundle that cannot be found is a ConfigError (2)


class BundleNotFound(ConfigError):
    """No proof bundle at that path or for that chain ID."""


@dataclass
class VerifyReport:
    folder: Path
    problems: list[str] = field(default_factory=list)
    signature: str = "unsigned"  # unsigned | "signed by <principal or key>" | the problem with it

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = f"{'ok' if self.ok else 'FAILED'}  {self.folder} ({self.signature})"
        return [head, *(f"  {p}" for p in self.problems)]


def find_bundle(layout: Layout, what: str) -> Path:
    """A bundle folder from a path (a folder, or a file in it) or a chain ID (build or init)."""
    path = Path(what)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        return folder.resolve()
    try:
        chain = parse_chain_id(what)
    except ValueError:
        raise BundleNotFound(f"{what}: neither a proof bundle folder nor a chain ID (CHAIN-<ts>-<key>)") from None
    folder = (
        layout.init_proof_dir(chain.stamp) if chain.key == "init" else layout.build_proof_dir(chain.key, chain.stamp)
    )
    if not folder.is_dir():
        raise BundleNotFound(f"{what}: no proof bundle at {folder} (a failed build has a log and no proof)")
    return folder


def all_bundles(layout: Layout) -> list[Path]:
    """Every build and init bundle under the output root (not the `latest` links), oldest first per folder."""
    builds = layout.build_proof_dir("x", "x").parent.parent
    init = layout.init_proof_dir("x").parent
    found = sorted(p for p in builds.glob("*/[0-9]*") if p.is_dir()) if builds.is_dir() else []
    return found + (sorted(p for p in init.glob("[0-9]*") if p.is_dir()) if init.is_dir() else [])


def bundle_chain(layout: Layout, folder: Path) -> str | None:
    """The chain ID a bundle folder stands for by where it is (`builds/<key>/<ts>`, `init/<ts>`), else None.
    The folder's own name is not resolved: a stamp folder that is a link to another bundle stays itself."""
    folder = Path(os.path.abspath(folder))
    where = folder.parent.resolve()
    if where.parent == (layout.output_root / BUILD_PROOFS).resolve():
        return f"CHAIN-{folder.name}-{where.name}"
    if where == (layout.output_root / INIT_PROOFS).resolve():
        return f"CHAIN-{folder.name}-init"
    return None


def verify_bundle(
    folder: Path, allowed_signers: Path | None = None, require_signature: bool = False, chain_id: str | None = None
) -> VerifyReport:
    """Check one bundle. Allowed signers given: a signature is required and its signer must be allowed.
    chain_id given: proof.json must carry it. An unreadable allowed_signers file raises ConfigError."""
    folder = Path(folder)
    signers = read_allowed_signers(allowed_signers) if allowed_signers is not None else None
    report = VerifyReport(folder)
    entries = _entries(folder, report)
    manifest = _read_manifest(report, folder, entries)
    if manifest is None:
        return report
    _check_files(report, folder, entries, manifest["files"])
    proof = _read_proof(report, folder, entries)
    _check_required(report, entries, manifest["files"], proof)
    _check_signature(
        report,
        folder,
        entries,
        manifest,
        None if signers is None or allowed_signers is None else (allowed_signers, signers),
        require_signature or signers is not None,
    )
    if proof is not None:
        _check_proof(report, proof, chain_id)
    return report


def _entries(folder: Path, report: VerifyReport) -> dict[str, str]:
    """Every entry under folder, recursively (relative path -> kind), by lstat: links are never followed."""
    found: dict[str, str] = {}

    def walk(directory: Path, prefix: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            report.problems.append(f"{prefix or './'}: cannot be read ({exc.strerror})")
            return
        for name in names:
            path = directory / name
            try:
                found[prefix + name] = kind = _kind(os.lstat(path).st_mode)
            except OSError:
                continue  # gone since listed: nothing there to judge
            if kind == "directory":
                walk(path, f"{prefix}{name}/")

    walk(folder, "")
    return found


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "device or other special file"


def _not_a_file(name: str, kind: str) -> str:
    return f"{name}: a {kind}, not a regular file (a bundle holds its listed files and nothing else)"


def _read_manifest(report: VerifyReport, folder: Path, entries: dict[str, str]) -> dict[str, Any] | None:
    kind = entries.get(MANIFEST)
    if kind != "file":
        report.problems.append(
            _not_a_file(MANIFEST, kind) if kind else f"{MANIFEST} is missing: nothing to check the files against"
        )
        return None
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        signed_by = manifest.get("signed_by")
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise ValueError("files is not a name -> sha256 map")
        if signed_by is not None and not isinstance(signed_by, dict):
            raise ValueError("signed_by is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        report.problems.append(f"{MANIFEST} is not a bundle manifest ({exc})")
        return None
    return manifest


def _check_files(report: VerifyReport, folder: Path, entries: dict[str, str], listed: dict[str, str]) -> None:
    for name in sorted(listed):
        kind = entries.get(name) if "/" not in name else None
        if kind is None:
            report.problems.append(f"{name}: missing")
        elif kind != "file":
            report.problems.append(_not_a_file(name, kind))
        elif sha256_file(folder / name) != listed[name]:
            report.problems.append(f"{name}: changed (sha256 differs from the manifest)")
    for name, kind in entries.items():
        if name in listed or name in (MANIFEST, SIGNATURE):
            continue
        report.problems.append(f"{name}: added (not in the manifest)" if kind == "file" else _not_a_file(name, kind))


def _read_proof(report: VerifyReport, folder: Path, entries: dict[str, str]) -> dict[str, Any] | None:
    if entries.get("proof.json") != "file":
        return None  # named as missing or not a file
    try:
        proof = json.loads((folder / "proof.json").read_text())
        if not isinstance(proof, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        report.problems.append(f"proof.json: not JSON ({exc})")
        return None
    return proof


def _check_required(
    report: VerifyReport, entries: dict[str, str], listed: dict[str, str], proof: dict[str, Any] | None
) -> None:
    """Files every bundle has are named when absent, listed in the manifest or not."""
    required = ["README.md", "proof.json"]
    if proof is not None:
        required.append("init-packer.log" if proof.get("kind") == "init" else BUILD_LOG_NAME)
        sbom = proof.get("sbom")
        if isinstance(sbom, dict) and isinstance(sbom.get("file"), str):
            required.append(sbom["file"])
    for name in required:
        if name not in entries and name not in listed:
            report.problems.append(f"{name}: missing (every {(proof and proof.get('kind')) or 'proof'} bundle has it)")


def _check_signature(
    report: VerifyReport,
    folder: Path,
    entries: dict[str, str],
    manifest: dict[str, Any],
    signers: tuple[Path, bytes] | None,
    required: bool,
) -> None:
    kind = entries.get(SIGNATURE)
    if kind is None:
        if manifest.get("signed_by"):
            report.problems.append(f"{SIGNATURE}: missing, but the manifest says it was signed")
            report.signature = "signature missing"
        elif required:
            why = "--allowed-signers" if signers else "--require-signature"
            report.problems.append(f"{SIGNATURE}: missing: the bundle is unsigned ({why} asks for a signature)")
        return
    if kind != "file":
        report.problems.append(_not_a_file(SIGNATURE, kind))
        report.signature = "bad signature"
        return
    try:
        key = verify((folder / MANIFEST).read_bytes(), (folder / SIGNATURE).read_text(errors="replace"))
        _check_signer(report, key, manifest.get("signed_by") or {}, signers)
    except SignatureError as exc:
        report.problems.append(f"{SIGNATURE}: {exc}")
        report.signature = "bad signature"
    except SignerRefused as exc:
        report.problems.append(f"{SIGNATURE}: signer not allowed: {exc}")
        report.signature = "signer not allowed"


def _check_signer(
    report: VerifyReport, key: str, signed_by: dict[str, Any], signers: tuple[Path, bytes] | None
) -> None:
    """The signature's key is the one the manifest names; with allowed signers, it may sign for the
    manifest's key_id (what `ssh-keygen -Y verify -I <key_id>` checks; no key_id: any principal)."""
    named = signed_by.get("public_key")
    if isinstance(named, str) and named.split()[:2] != key.split()[:2]:
        raise SignatureError("made with another key than the one the manifest names in signed_by")
    if signers is None:
        report.signature = f"signature valid, key {key.split()[1][:16]}...; no allowed_signers file given"
        return
    key_id = signed_by.get("key_id")
    path, data = signers
    blob = base64.b64decode(key.split()[1])
    principal = check_allowed(data, blob, key_id if isinstance(key_id, str) else None, NAMESPACE, source=str(path))
    report.signature = f"signed by {principal}"


def _check_proof(report: VerifyReport, proof: dict[str, Any], chain_id: str | None) -> None:
    if chain_id is not None and proof.get("chain_id") != chain_id:
        report.problems.append(
            f"proof.json: chain_id {proof.get('chain_id')!r} is not {chain_id}, the bundle "
            "asked for (another build's proof in its folder)"
        )
    try:
        schema = init_proof_schema() if proof.get("kind") == "init" else build_proof_schema()
        jsonschema.validate(proof, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        report.problems.append(f"proof.json: does not match its schema at {where}: {exc.message[:200]}")
