"""`packer-assets proof verify`: is a proof bundle what was written?

Checks, in order: the manifest (every file listed with its sha256 is there and unchanged, and no file
was added), the signature over the manifest (SSHSIG, signing.py; against an allowed_signers file when
given), and proof.json against its JSON Schema (build or init, by its `kind`). Each problem is one
line naming the file. Unsigned bundles pass on their digests and say "unsigned".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema

from .chain import parse_chain_id
from .errors import ConfigError
from .evidence import MANIFEST, MANIFEST_FORMAT, SIGNATURE, Layout, sha256_file
from .proof import build_proof_schema, init_proof_schema
from .signing import SignatureError, allowed_signer, verify

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
    folder = layout.init_proof_dir(chain.stamp) if chain.key == "init" else layout.build_proof_dir(chain.key, chain.stamp)
    if not folder.is_dir():
        raise BundleNotFound(f"{what}: no proof bundle at {folder} (a failed build has a log and no proof)")
    return folder


def all_bundles(layout: Layout) -> list[Path]:
    """Every build and init bundle under the output root (not the `latest` links), oldest first per folder."""
    builds = layout.build_proof_dir("x", "x").parent.parent
    init = layout.init_proof_dir("x").parent
    found = sorted(p for p in builds.glob("*/[0-9]*") if p.is_dir()) if builds.is_dir() else []
    return found + (sorted(p for p in init.glob("[0-9]*") if p.is_dir()) if init.is_dir() else [])


def verify_bundle(folder: Path, allowed_signers: Path | None = None, require_signature: bool = False) -> VerifyReport:
    folder = Path(folder)
    report = VerifyReport(folder)
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        report.problems.append(f"{MANIFEST} is missing: nothing to check the files against")
        return report
    try:
        manifest = json.loads(manifest_file.read_text())
        listed: dict[str, str] = dict(manifest["files"])
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"{MANIFEST} is not a bundle manifest ({exc})")
        return report
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}
    for name in sorted(listed):
        if name not in present:
            report.problems.append(f"{name}: missing")
        elif sha256_file(folder / name) != listed[name]:
            report.problems.append(f"{name}: changed (sha256 differs from the manifest)")
    report.problems += [f"{name}: added (not in the manifest)" for name in sorted(present - set(listed))]
    _check_signature(report, manifest_file, manifest, allowed_signers, require_signature)
    _check_schema(report, folder)
    return report


def _check_signature(report: VerifyReport, manifest_file: Path, manifest: dict, allowed_signers: Path | None,
                     required: bool) -> None:
    sig = manifest_file.with_name(SIGNATURE)
    if not sig.is_file():
        if manifest.get("signed_by"):
            report.problems.append(f"{SIGNATURE}: missing, but the manifest says it was signed")
            report.signature = "signature missing"
        elif required:
            report.problems.append(f"{SIGNATURE}: missing: the bundle is unsigned")
        return
    try:
        key = verify(manifest_file.read_bytes(), sig.read_text())
    except SignatureError as exc:
        report.problems.append(f"{SIGNATURE}: {exc}")
        report.signature = "bad signature"
        return
    if allowed_signers is None:
        report.signature = f"signature valid, key {key.split()[1][:16]}...; no allowed_signers file given"
        return
    principal = allowed_signer(allowed_signers, key)
    if principal is None:
        report.problems.append(f"{SIGNATURE}: signed by a key not in {allowed_signers}")
        report.signature = "signer not allowed"
    else:
        report.signature = f"signed by {principal}"


def _check_schema(report: VerifyReport, folder: Path) -> None:
    proof_file = folder / "proof.json"
    if not proof_file.is_file():
        return  # named above as missing
    try:
        proof = json.loads(proof_file.read_text())
        schema = init_proof_schema() if proof.get("kind") == "init" else build_proof_schema()
        jsonschema.validate(proof, schema)
    except (ValueError, AttributeError) as exc:
        report.problems.append(f"proof.json: not JSON ({exc})")
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        report.problems.append(f"proof.json: does not match its schema at {where}: {exc.message[:200]}")
