"""The proofs: pydantic models, their JSON Schemas, the README tables and the bundles on disk.

`docs/proof/platform/packer-builds/builds/<key>/<ts>/` holds README.md, proof.json and packer.log;
`docs/proof/platform/packer-builds/init/<ts>/` README.md, proof.json and init-packer.log; `latest`
points at the newest of each. The JSON Schemas in `docs/schema/` (build-proof, init-proof) are generated
from `BuildProof` and `InitProof` (`python -m packer_assets.evidence.proof` rewrites them); a test keeps them equal.

A proof exists only for a build that passed its checks: the model refuses a failed or missing
check, and `write_build_proof` refuses a log whose sha256 differs from the one recorded.
"""

from __future__ import annotations

import json
import sys
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from packer_assets.catalog.eol import days
from packer_assets.evidence.chain import CHAIN_RE, parse_chain_id
from packer_assets.evidence.layout import BUILD_LOG_NAME, Layout, sha256_file, write_proof_bundle
from packer_assets.evidence.registry import REGISTRY_SCHEMA_FILE, registry_schema
from packer_assets.evidence.signing import Signer
from packer_assets.inspection.sbom import GUEST_UNKNOWN

SCHEMA_FILE = Path("docs/schema/build-proof.schema.json")
INIT_SCHEMA_FILE = Path("docs/schema/init-proof.schema.json")
SCHEMA_VERSION: Literal[1] = 1

Day = date  # the field EndOfLifeRef.date would shadow the type's name in its class
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256, 64 lower-case hex digits")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemplateRef(_Model):
    """The Proxmox template the build produced."""

    vmid: int = Field(ge=100, description="The template's VMID (from the key's vmid_range).")
    name: str = Field(description="The template's name, `<key>-<yyyymmddhhmmss>` (UTC build time).")
    node: str = Field(description="The node the template lives on.")
    tags: list[str] = Field(default_factory=list, description="Its PVE tags, as they were when the proof was written.")


class IsoRef(_Model):
    """The installation ISO the template was built from."""

    url: str = Field(description="The upstream URL in the catalog.")
    effective_url: str = Field(description="The URL actually fetched (differs from `url` behind a mirror).")
    checksum: str = Field(description="`<algorithm>:<hex>` the node verified the download against.")
    checksum_source: str | None = Field(
        default=None,
        description="Where that checksum came from: the checksum file's URL as fetched (the catalog's, or the "
        "mirror's own with PACKER_ASSETS_ISO_MIRROR_CHECKSUMS), or `pinned in the catalog`; absent in older proofs.",
    )
    signed_by: str | None = Field(
        default=None,
        description="Whose key verified the checksum file's signature: `upstream: <keyring> (the catalog's keyring)`, "
        "or `mirror: <keyring> (PACKER_ASSETS_ISO_MIRROR_KEYRING)` for a mirror that signs the checksum files it "
        "serves; null when the catalog names no keyring (the file was not signature-checked) or in older proofs.",
    )
    volid: str = Field(description="The ISO's volume on the node's ISO storage, e.g. `local:iso/x.iso`.")


class Timings(_Model):
    """When the build ran, and how long each stage took."""

    started_at: datetime = Field(description="Start of the run (UTC, ISO 8601).")
    finished_at: datetime = Field(description="End of the run (UTC, ISO 8601).")
    stages: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds per timed stage, in run order: `packer` (packer build), `smoke` (the clone's smoke test).",
    )

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    @model_validator(mode="after")
    def _ordered(self) -> Timings:
        if self.finished_at < self.started_at:
            raise ValueError("finished_at is before started_at")
        return self


class CheckResult(_Model):
    """One check of the build (an asset check in Dagster)."""

    name: str = Field(description="The check's name, e.g. `smoke_test` or `packer_validate`.")
    passed: bool = Field(description="Whether it passed (always true in a proof).")
    description: str = Field(description="What was checked and what was seen, in one sentence.")
    details: dict[str, Any] = Field(default_factory=dict, description="Facts the check recorded.")


class PackageChanges(_Model):
    """The template's packages against the previous proved template of the key (its SBOM)."""

    previous_chain_id: str = Field(description="The chain ID of the proved build compared with.")
    added: list[str] = Field(default_factory=list, description="`name version` of packages it did not have.")
    removed: list[str] = Field(default_factory=list, description="`name version` of packages it had.")
    changed: list[str] = Field(default_factory=list, description="`name old -> new` of packages whose version changed.")


class SbomRef(_Model):
    """The software bill of materials of the template, `sbom.cdx.json` next to this file."""

    file: Literal["sbom.cdx.json"] = Field(default="sbom.cdx.json", description="Its file name in the bundle.")
    format: Literal["CycloneDX 1.5"] = Field(default="CycloneDX 1.5", description="Validated against this schema.")
    sha256: Sha256 = Field(description="sha256 of sbom.cdx.json.")
    packages: int = Field(ge=0, description="Installed packages (components) it lists, read from the smoke-test clone.")
    changes: PackageChanges | None = Field(
        default=None, description="Against the key's previous proved template; absent for the key's first SBOM."
    )


class EndOfLifeRef(_Model):
    """The end of life of the key's OS release as the build saw it (the catalog's `eol` on the build's day)."""

    date: Day | None = Field(
        description="The catalog's `eol`: the last day upstream supports the OS release; null when it names none."
    )
    past: bool = Field(description="Whether the build ran after that day (the `end_of_life` check warned).")
    days_past: int = Field(ge=0, description="How many days after it the build ran; 0 when not past.")

    def line(self) -> str:
        """The proof README's words: the date, or `past end of life since <date>`."""
        if self.date is None:
            return "none in the catalog"
        if self.past:
            return f"past end of life since {self.date.isoformat()} ({days(self.days_past)} at build time)"
        return f"{self.date.isoformat()} (not past at build time)"


class BuildProof(_Model):
    """Evidence of one successful, checked template build (proof.json)."""

    model_config = ConfigDict(title="packer-assets build proof")

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Version of this format.")
    kind: Literal["build"] = Field(default="build", description="Always `build` (init proofs have `init`).")
    chain_id: str = Field(
        pattern=f"^{CHAIN_RE.pattern}$",
        description="`CHAIN-<UTC yyyymmddThhmmssZ>-<key>`: the ID in the run tags, every log line "
        "and the template description.",
    )
    key: str = Field(description="The catalog template key (= the Dagster partition).")
    dagster_run_id: str | None = Field(default=None, description="The Dagster run that built it, if any.")
    template: TemplateRef = Field(description="The template built (promoted when the proof was written).")
    iso: IsoRef = Field(description="The installation ISO.")
    rendered_files: dict[str, Sha256] = Field(description="Unattended files served to the installer: name -> sha256.")
    validated_by: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Rendered file name -> the upstream validators and releases that checked it "
        "(`pykickstart RHEL10`, `subiquity autoinstall schema 26.04`); empty for builds from before.",
    )
    packer_template_sha256: Sha256 | None = Field(
        default=None,
        description="sha256 of the Packer input used: the family's template and "
        "templates/common/common.pkr.hcl, combined (packer.workdir.template_sha256).",
    )
    packer_version: str = Field(description="`packer version` of the binary that ran.")
    timings: Timings = Field(description="Start, end and seconds per stage.")
    checks: list[CheckResult] = Field(min_length=1, description="Every check run on the template; all passed.")
    log_sha256: Sha256 = Field(description="sha256 of packer.log next to this file.")
    input_fingerprint: Sha256 = Field(
        description="sha256 over ISO checksum, rendered files, Packer template and "
        "catalog entry; equal fingerprints mean nothing to rebuild."
    )
    tool_version: str = Field(description="The packer-assets version that ran the build.")
    previous_template_vmid: int | None = Field(
        default=None, description="The template that was promoted before this one."
    )
    pruned_vmids: list[int] = Field(default_factory=list, description="Older templates removed by retention.")
    sbom: SbomRef | None = Field(
        default=None, description="The installed packages as a CycloneDX SBOM (absent for builds from before SBOMs)."
    )
    guest: str | None = Field(
        default=None,
        description="What the guest was, as the environment noted it for the "
        "key (PACKER_ASSETS_GUEST_NOTES; the lab notes `lab: real "
        "guest (...)` or `lab: simulated guest (...)`); absent when "
        "nothing was stated: the README then says the guest is unknown.",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="The build's warnings, as its log has them: each gap of a degraded build "
        "(`degraded build: ...`, something the template asks for that the "
        "installed Packer cannot do and the build went without: EFI disk, TPM, "
        "q35, extra ISOs; allowed by PACKER_ASSETS_ALLOW_DEGRADED=1) and notes "
        "such as tags set through the API. Empty when there were none.",
    )
    eol: EndOfLifeRef | None = Field(
        default=None,
        description="The OS release's end of life as the build saw it; a build past it is proved all the same "
        "(the check only warns). Absent in proofs from before end-of-life dates.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BuildProof:
        if parse_chain_id(self.chain_id).key != self.key:
            raise ValueError(f"chain ID {self.chain_id} is not of key {self.key}")
        failed = [c.name for c in self.checks if not c.passed]
        if failed:
            raise ValueError(f"a proof is only written for a build whose checks passed; failed: {', '.join(failed)}")
        return self

    @property
    def stamp(self) -> str:
        """The proof folder's name: the chain ID's timestamp (as for the build log)."""
        return parse_chain_id(self.chain_id).stamp


class Discovered(_Model):
    """What proxmox_env found (configured names win): where builds run."""

    node: str = Field(description="The node builds run on.")
    node_ip: str = Field(description="The node's address.")
    vm_storage: str = Field(description="Storage for VM disks.")
    iso_storage: str = Field(description="Storage for ISO images.")
    bridge: str = Field(description="The network bridge of build VMs.")
    http_bind_address: str = Field(description="The address Packer's HTTP server binds to.")
    http_port: int = Field(ge=1, le=65535, description="The first port of Packer's HTTP server range.")


class InitProof(_Model):
    """Evidence of one proxmox_env run: API access for builds was set up (proof.json of an init bundle)."""

    model_config = ConfigDict(title="packer-assets init proof")

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Version of this format.")
    kind: Literal["init"] = Field(default="init", description="Always `init` (build proofs have `build`).")
    bootstrap: Literal["api", "ssh"] = Field(description="How: an admin login over the API, or the script over SSH.")
    chain_id: str = Field(pattern=f"^{CHAIN_RE.pattern}$", description="`CHAIN-<UTC yyyymmddThhmmssZ>-init`.")
    dagster_run_id: str | None = Field(default=None, description="The Dagster run, if any.")
    tool_version: str = Field(description="The packer-assets version that ran.")
    started_at: datetime = Field(description="Start (UTC, ISO 8601).")
    finished_at: datetime = Field(description="End (UTC, ISO 8601).")
    api_url: str = Field(description="The API, `https://host:port/api2/json`.")
    tls: Literal["ca_file", "fingerprint", "insecure", "system"] = Field(description="How the API's TLS was trusted.")
    pve_version: str = Field(description="The PVE version the API reported.")
    token_id: str = Field(description="The build token, `user@realm!name` (never its secret).")
    token_action: Literal["reused", "created", "replaced", "rotated"] = Field(description="What happened to it.")
    build_login: str = Field(description="How Packer logs in: `token`, or `password as <user>` (Packer < 1.7.1).")
    role: str = Field(description="The role holding the build's privileges.")
    privileges: list[str] = Field(description="The role's privileges, for this PVE version.")
    changes: list[str] = Field(description="What this run changed on the node (empty: nothing).")
    discovery: Discovered = Field(description="Where builds run.")
    env_file: str = Field(description="The env file written, relative to the output root.")
    log_sha256: Sha256 = Field(description="sha256 of init-packer.log next to this file.")

    @model_validator(mode="after")
    def _consistent(self) -> InitProof:
        if parse_chain_id(self.chain_id).key != "init":
            raise ValueError(f"chain ID {self.chain_id} is not an init chain ID")
        if self.finished_at < self.started_at:
            raise ValueError("finished_at is before started_at")
        return self


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"Generated from packer_assets.evidence.proof.{model.__name__} by `python -m packer_assets.evidence.proof`; "
        "do not edit.",
        **model.model_json_schema(mode="serialization"),
    }


def build_proof_schema() -> dict[str, Any]:
    """The JSON Schema of a build's proof.json (what `docs/schema/build-proof.schema.json` holds)."""
    return _schema(BuildProof)


def init_proof_schema() -> dict[str, Any]:
    """The JSON Schema of an init's proof.json (what `docs/schema/init-proof.schema.json` holds)."""
    return _schema(InitProof)


SCHEMAS = {SCHEMA_FILE: build_proof_schema, INIT_SCHEMA_FILE: init_proof_schema, REGISTRY_SCHEMA_FILE: registry_schema}


def schema_text(file: Path = SCHEMA_FILE) -> str:
    return json.dumps(SCHEMAS[file](), indent=2) + "\n"


def write_schema(source_tree: Path = Path(".")) -> list[Path]:
    """Every committed schema (the proofs', the registry's), regenerated under `source_tree` (the checkout)."""
    written = []
    for file in SCHEMAS:
        path = Path(source_tree) / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(schema_text(file), encoding="utf-8")
        written.append(path)
    return written


# ------------------------------------------------------------------ README


def _cell(value: object) -> str:
    text = "-" if value is None or value == "" else str(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _packages_cell(sbom: SbomRef, guest: str | None) -> str:
    """The package count, and beside it what they were read from: a simulated guest's are invented."""
    return f"{sbom.packages} in {sbom.file}, read from: {guest or GUEST_UNKNOWN}"


def render_build_readme(proof: BuildProof) -> str:
    """The proof as Markdown: a summary table, then stages, checks and rendered files."""
    t = proof.template
    rows = [
        ("Chain ID", proof.chain_id),
        ("Key", proof.key),
        ("Dagster run", proof.dagster_run_id),
        ("Template", f"{t.vmid} {t.name} on {t.node}"),
        ("Tags", ";".join(t.tags)),
        ("Guest", proof.guest or GUEST_UNKNOWN),
        ("ISO", proof.iso.url),
        ("ISO fetched from", proof.iso.effective_url),
        ("ISO checksum", proof.iso.checksum),
        ("ISO checksum from", proof.iso.checksum_source),
        ("ISO checksum signed by", proof.iso.signed_by or "not signature-checked"),
        ("ISO volume", proof.iso.volid),
        ("Packer", proof.packer_version),
        ("Packer template sha256", proof.packer_template_sha256),
        ("Input fingerprint", proof.input_fingerprint),
        ("Started", proof.timings.started_at.isoformat()),
        ("Finished", proof.timings.finished_at.isoformat()),
        ("Duration", f"{proof.timings.seconds:.1f} s"),
        ("Previous template", proof.previous_template_vmid),
        ("Pruned", ", ".join(map(str, proof.pruned_vmids)) or None),
        ("Packages (SBOM)", _packages_cell(proof.sbom, proof.guest) if proof.sbom else None),
        ("Package changes", _changes_cell(proof.sbom) if proof.sbom else None),
        ("Warnings", f"{len(proof.warnings)} (see Warnings)" if proof.warnings else "none"),
        ("End of life", proof.eol.line() if proof.eol else None),
        ("Log sha256", proof.log_sha256),
        ("Tool", f"packer-assets {proof.tool_version}"),
    ]
    out = [f"# Template build {proof.chain_id}", "", "| | |", "|---|---|"]
    out += [f"| {name} | {_cell(value)} |" for name, value in rows]
    out += ["", "## Stages", "", "| Stage | Seconds |", "|---|---:|"]
    out += [f"| {name} | {seconds:.1f} |" for name, seconds in proof.timings.stages.items()] or ["| - | - |"]
    out += ["", "## Checks", "", "| Check | Result | Description |", "|---|---|---|"]
    out += [
        f"| {c.name} | {'passed' if c.passed else 'FAILED'} | {c.description.replace('|', '/')} |" for c in proof.checks
    ]
    out += ["", "## Warnings", ""]
    out += [f"- {w}" for w in proof.warnings] or ["None: the build had everything the catalog entry asks for."]
    if proof.sbom and proof.sbom.changes:
        c = proof.sbom.changes
        out += ["", f"## Package changes since {c.previous_chain_id}", "", "| Change | Package |", "|---|---|"]
        out += [
            f"| {what} | {_cell(item)} |"
            for what, items in (("changed", c.changed), ("added", c.added), ("removed", c.removed))
            for item in items
        ] or ["| - | no changes |"]
    out += ["", "## Rendered files", "", "| File | sha256 | Validated by |", "|---|---|---|"]
    out += [
        f"| {name} | {_cell(digest)} | {_cell(', '.join(proof.validated_by.get(name, ())) or '-')} |"
        for name, digest in sorted(proof.rendered_files.items())
    ] or ["| - | - | - |"]
    return "\n".join(out) + "\n"


def _changes_cell(sbom: SbomRef) -> str:
    c = sbom.changes
    if c is None:
        return "first SBOM of this key"
    return f"+{len(c.added)} added, -{len(c.removed)} removed, ~{len(c.changed)} changed vs {c.previous_chain_id}"


def render_init_readme(proof: InitProof) -> str:
    found = proof.discovery
    rows = [
        ("Chain ID", proof.chain_id),
        ("Dagster run", proof.dagster_run_id),
        ("Bootstrap", proof.bootstrap),
        ("API", proof.api_url),
        ("TLS trust", proof.tls),
        ("PVE version", proof.pve_version),
        ("Node", found.node),
        ("VM storage", found.vm_storage),
        ("ISO storage", found.iso_storage),
        ("Bridge", found.bridge),
        ("Token", f"{proof.token_id} ({proof.token_action})"),
        ("Packer login", proof.build_login),
        ("Role", proof.role),
        ("Log sha256", proof.log_sha256),
    ]
    out = [f"# Proxmox API bootstrap {proof.chain_id}", "", "| | |", "|---|---|"]
    out += [f"| {name} | {_cell(value)} |" for name, value in rows]
    out += ["", "## Changes", ""] + ([f"- {c}" for c in proof.changes] or ["- nothing to change"])
    out += ["", f"## Privileges of {proof.role}", "", ", ".join(proof.privileges)]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ the bundle


def write_build_proof(
    layout: Layout, proof: BuildProof, log_file: Path, sbom_file: Path | None = None, signer: Signer | None = None
) -> Path:
    """README.md, proof.json, packer.log (and sbom.cdx.json) in `builds/<key>/<ts>/`, then `latest` swapped
    to it. Each file must have the sha256 the proof names."""
    log_file = Path(log_file)
    actual = sha256_file(log_file)
    if actual != proof.log_sha256:
        raise ValueError(f"{log_file}: sha256 {actual} differs from the proof's log_sha256 {proof.log_sha256}")
    extra: dict[str, Path] = {}
    if proof.sbom is not None:
        if sbom_file is None or sha256_file(Path(sbom_file)) != proof.sbom.sha256:
            raise ValueError(
                f"{sbom_file}: missing, or its sha256 differs from the proof's sbom.sha256 {proof.sbom.sha256}"
            )
        extra[proof.sbom.file] = Path(sbom_file)
    return write_proof_bundle(
        layout.build_proof_dir(proof.key, proof.stamp),
        render_build_readme(proof),
        proof.model_dump(mode="json"),
        log_file,
        BUILD_LOG_NAME,
        extra,
        signer,
    )


def previous_sbom(layout: Layout, key: str, stamp: str) -> tuple[str, Path] | None:
    """(chain ID, sbom.cdx.json) of the key's newest proof bundle before `stamp` that has an SBOM."""
    parent = layout.build_proof_dir(key, stamp).parent
    for folder in sorted((p for p in parent.glob("[0-9]*") if p.is_dir() and p.name < stamp), reverse=True):
        sbom, proof = folder / "sbom.cdx.json", folder / "proof.json"
        if sbom.is_file() and proof.is_file():
            return json.loads(proof.read_text())["chain_id"], sbom
    return None


def write_init_proof(layout: Layout, proof: InitProof, log_file: Path, signer: Signer | None = None) -> Path:
    """README.md, proof.json and init-packer.log in `init/<ts>/`, then `latest` swapped to it."""
    return write_proof_bundle(
        layout.init_proof_dir(parse_chain_id(proof.chain_id).stamp),
        render_init_readme(proof),
        proof.model_dump(mode="json"),
        log_file,
        Path(log_file).name,
        signer=signer,
    )


if __name__ == "__main__":  # python -m packer_assets.evidence.proof [source tree]: regenerate the committed schemas
    for written in write_schema(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")):
        print(written)
