"""The template registry: per catalog key, the current template, its channels and the retained ones.

`docs/proof/platform/packer-builds/registry.json` under the output root is the file consumers read
(Terraform's `jsondecode(file(...))`, scripts, people): what HCP Packer's registry answers, from data
this project already has. It joins what the Proxmox node says (which templates exist, their tags:
promotion, channels, revocation; their descriptions: chain ID, ISO, build time) with the build records
in the output root (what the build recorded: degraded or not, the smoke test's result), and the proof
bundles that exist.

It is rebuilt from scratch and written atomically under a lock (`output/locks/_registry.lock`) after
every promotion and prune (build.py), proof (build.write_proof, which only adds the proof path),
channel change and revocation (channels.py), and by the `template_registry` asset. The lock covers the
reading of the node too, so a run that read the node earlier can never write an older picture over a
newer one. `updated_at` is when the content last changed: a rewrite that finds nothing new keeps the
file byte for byte. The schema (`docs/schema/registry.schema.json`) is generated from `Registry` by
`python -m packer_assets.evidence.proof`, as the proofs' are.
"""

import hashlib
import json
import re
import tempfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from packer_assets.catalog import Catalog, TemplateEntry
from packer_assets.catalog import eol as eol_clock
from packer_assets.catalog.eol import end_of_life
from packer_assets.errors import ConfigError
from packer_assets.evidence.chain import CHAIN_RE, parse_chain_id
from packer_assets.evidence.layout import BUILD_RECORD_NAME, Layout, atomic_write
from packer_assets.packer.workdir import DEGRADED
from packer_assets.pve.client import PveApi
from packer_assets.pve.templates import (
    Guest,
    Revocation,
    TemplateDescription,
    list_templates,
    name_time,
    read_description,
    read_revocation,
)
from packer_assets.runs.locks import exclusive

REGISTRY_SCHEMA_FILE = Path("docs/schema/registry.schema.json")
SCHEMA_VERSION: Literal[1] = 1
LATEST = "latest"  # the channel every key has while a template is promoted; set by builds, not by hand
# A channel name becomes the PVE tag `packer-assets-channel-<name>` (tags: [a-z0-9_][a-z0-9_+.-]*).
CHANNEL_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")

ChannelName = Annotated[str, Field(pattern=f"^{CHANNEL_RE.pattern}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistryIso(_Model):
    """The installation ISO the template was built from."""

    url: str = Field(description="The upstream URL in the catalog.")
    checksum: str = Field(description="`<algorithm>:<hex>` the node verified the download against.")


class SmokeSummary(_Model):
    """The smoke test of the template's build (a record exists only for a build whose test passed)."""

    passed: bool = Field(description="Whether the smoke test passed.")
    found_os: str | None = Field(default=None, description="The OS the clone's guest agent reported, `<id> <version>`.")
    expected_os: str | None = Field(default=None, description="The OS the key expects.")
    packages: int | None = Field(
        default=None, ge=0, description="Installed packages read from the clone (the SBOM's count)."
    )


class TemplateVersion(_Model):
    """One template of a key on the node."""

    vmid: int = Field(ge=100, description="The template's VMID: what a clone names (`clone { vm_id = ... }`).")
    name: str = Field(description="`<key>-<yyyymmddhhmmss>` (UTC build time).")
    node: str = Field(description="The node the template lives on.")
    chain_id: str | None = Field(
        default=None,
        pattern=f"^{CHAIN_RE.pattern}$",
        description="The build's chain ID (from the template's description); null when the "
        "description was edited away.",
    )
    built_at: datetime = Field(description="When its build started (UTC, ISO 8601).")
    iso: RegistryIso | None = Field(default=None, description="The installation ISO; null without a description.")
    guest: str | None = Field(
        default=None,
        description="What the build's guest was, as its record has it (PACKER_ASSETS_GUEST_NOTES: a lab's simulated or "
        "real guest, with what its system came from); null when nothing was stated or there is no build record.",
    )
    packer_version: str | None = Field(default=None, description="`packer version` of the binary that built it.")
    degraded: bool | None = Field(
        default=None,
        description="Built without something the installed Packer cannot do "
        "(EFI/TPM on 1.6.6); null when the build record is not in "
        "this output root.",
    )
    degraded_reasons: list[str] = Field(
        default_factory=list, description="What was left out (the build's `degraded build: ` warnings)."
    )
    smoke: SmokeSummary | None = Field(default=None, description="The smoke test; null without a build record.")
    proof: str | None = Field(
        default=None,
        description="The proof bundle's folder, relative to the output root; null until template_proof wrote it.",
    )
    promoted: bool = Field(description="Tagged `packer-assets-latest`: the key's current template.")
    channels: list[ChannelName] = Field(
        default_factory=list, description="Channels that point at it (`packer-assets-channel-<name>` tags)."
    )
    revoked: bool = Field(default=False, description="Revoked (`packer-assets revoke`): do not clone it.")
    revoked_at: datetime | None = Field(default=None, description="When it was revoked.")
    revoked_reason: str | None = Field(default=None, description="Why, as given to `packer-assets revoke --reason`.")


class KeyTemplates(_Model):
    """What a catalog key has on the node."""

    family: str = Field(description="The key's OS family.")
    eol: date | None = Field(
        default=None,
        description="The catalog's end-of-life date of the key's OS release (`eol`, the last day upstream supports "
        "it); null when the catalog names none.",
    )
    past_eol: bool = Field(
        default=False,
        description="Whether the registry was written after `eol`: the key's templates are past their OS's end "
        "of life (the `end_of_life` check warns).",
    )
    current: TemplateVersion | None = Field(
        description="The promoted, unrevoked template; null when there is none "
        "(never built, or revoked and not rebuilt yet)."
    )
    channels: dict[ChannelName, int] = Field(
        default_factory=dict,
        description="Channel -> VMID. `latest` is the current template; the "
        "others are set with `packer-assets channel set`.",
        json_schema_extra={"additionalProperties": False},
    )
    retained: list[TemplateVersion] = Field(
        default_factory=list,
        description="The key's other templates that passed their build (older, or revoked), newest first.",
    )


class Registry(_Model):
    """Every catalog key's templates on the node: current, channels, retained, revoked (registry.json)."""

    model_config = ConfigDict(title="packer-assets template registry")

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Version of this format.")
    kind: Literal["registry"] = Field(default="registry", description="Always `registry`.")
    updated_at: datetime = Field(
        description="When the content last changed (UTC); a rewrite that finds nothing new keeps it, and the file."
    )
    templates: dict[str, KeyTemplates] = Field(
        description="Catalog key -> its templates, in catalog order; every key of the catalog is listed."
    )

    def versions(self, key: str) -> list[TemplateVersion]:
        found = self.templates.get(key)
        return [] if found is None else ([found.current] if found.current else []) + list(found.retained)


# ------------------------------------------------------------------ from the node and the output root


def build_registry(layout: Layout, api: PveApi, catalog: Catalog, *, now: datetime | None = None) -> Registry:
    """The registry as the node and the output root say now (reads only); `now` (tests) also decides which
    keys are past their end of life, else the end-of-life clock (eol.today) does."""
    today = now.date() if now else eol_clock.today()
    return Registry(
        updated_at=now or datetime.now(UTC),
        templates={entry.key: key_templates(layout, api, entry, today) for entry in catalog},
    )


def key_templates(layout: Layout, api: PveApi, entry: TemplateEntry, today: date) -> KeyTemplates:
    """One key: its templates whose build passed, the current one (newest promoted, unrevoked, as
    `promoted_template` picks it), the channels (a channel on several templates, after a change cut
    short: the newest) and its end of life as of `today`."""
    versions = []
    for guest in list_templates(api, entry.key, entry.vmid_range):  # newest first
        text = api.nodes(guest.node).qemu(guest.vmid).config.get().get("description")
        version = template_version(layout, entry.key, guest, read_description(text), read_revocation(text))
        if version is not None:
            versions.append(version)
    current = next((v for v in versions if v.promoted and not v.revoked), None)
    channels: dict[str, int] = {}
    for version in (v for v in versions if not v.revoked):  # revoke takes the tags; one put back does not count
        for channel in version.channels:
            channels.setdefault(channel, version.vmid)
    if current is not None:
        channels[LATEST] = current.vmid
    return KeyTemplates(
        family=entry.family,
        eol=entry.eol,
        past_eol=end_of_life(entry.key, entry.eol, today).past,
        current=current,
        channels=dict(sorted(channels.items())),
        retained=[v for v in versions if v is not current],
    )


def template_version(
    layout: Layout, key: str, guest: Guest, described: TemplateDescription | None, revocation: Revocation | None
) -> TemplateVersion | None:
    """The template as the registry lists it, or None for one still under test.

    Listed is a template whose build passed: it carries the promotion, a channel or the revoked tag, or
    its build record (written only after the smoke test passed) is in this output root. A template
    another run of the key is testing right now has none of these."""
    stamp = _stamp(key, described)
    record = _record(layout, key, stamp, guest.vmid) if stamp else None
    if record is None and not (guest.promoted or guest.channels or guest.revoked):
        return None
    # degraded: a capability gap (the `degraded build: ` warnings), as the `degraded` check counts them; mere
    # notes (packer 1.6.6 leaves tags to the API) are in the proof, not here
    gaps = [w.removeprefix(DEGRADED) for w in (record or {}).get("warnings", []) if w.startswith(DEGRADED)]
    proof = layout.build_proof_dir(key, stamp) if stamp else None
    return TemplateVersion(
        vmid=guest.vmid,
        name=guest.name,
        node=guest.node,
        chain_id=described.chain_id if described else None,
        built_at=described.built_at if described else name_time(key, guest.name),
        iso=RegistryIso(url=described.iso_url, checksum=described.iso_checksum) if described else None,
        guest=(record or {}).get("guest"),
        packer_version=(record or {}).get("packer_version") or (described.packer_version if described else None),
        degraded=bool(gaps) if record else None,
        degraded_reasons=gaps,
        smoke=_smoke(record),
        proof=proof.relative_to(layout.output_root).as_posix() if proof and proof.is_dir() else None,
        promoted=guest.promoted,
        channels=list(guest.channels),
        revoked=guest.revoked,
        revoked_at=revocation.revoked_at if revocation else None,
        revoked_reason=revocation.reason if revocation else None,
    )


def _smoke(record: dict[str, Any] | None) -> SmokeSummary | None:
    """The smoke test as the build record has it (a record is written only when the test passed)."""
    record = record or {}
    smoke = record.get("smoke")
    if not smoke:
        return None
    packages = smoke.get("packages", (record.get("sbom") or {}).get("packages"))
    return SmokeSummary(
        passed=True, found_os=smoke.get("found_os"), expected_os=smoke.get("expected_os"), packages=packages
    )


def _stamp(key: str, described: TemplateDescription | None) -> str | None:
    try:
        chain = parse_chain_id(described.chain_id) if described else None
    except ValueError:
        return None
    return chain.stamp if chain and chain.key == key else None


def _record(layout: Layout, key: str, stamp: str, vmid: int) -> dict[str, Any] | None:
    """The build record of the template's chain, if it is in this output root and names this VMID."""
    try:
        record = json.loads((layout.build_log_dir(key, stamp) / BUILD_RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and (record.get("template") or {}).get("vmid") == vmid else None


# ------------------------------------------------------------------ the file


def registry_json(registry: Registry) -> str:
    return registry.model_dump_json(indent=2) + "\n"


def read_registry(layout: Layout) -> Registry | None:
    """registry.json as written, or None when it is missing or not a valid registry (it is then rewritten)."""
    try:
        return Registry.model_validate_json(layout.registry_file.read_bytes())
    except (OSError, ValidationError):
        return None


class RegistryError(ConfigError):
    """registry.json cannot be written where it belongs; found before anything is changed."""


def check_writable(layout: Layout) -> None:
    """Raise RegistryError (one line naming the path) unless registry.json can be written: a file or absent,
    in a folder where a file can be made (tried: a temp file, removed at once), and its lock likewise.
    Called before a channel change or a revocation touches the node: a registry that cannot be written
    must fail them while nothing is changed yet, not after the tag moved."""
    path = layout.registry_file
    if path.is_dir() and not path.is_symlink():
        raise RegistryError(
            f"{path} is a directory, not a file: remove or rename it (the registry is rewritten "
            "from the node); nothing was changed"
        )
    for folder in (path.parent, layout.registry_lock.parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".check"):
                pass
        except OSError as exc:
            raise RegistryError(
                f"{path} cannot be written: {folder}: {exc.strerror or type(exc).__name__}; nothing was changed"
            ) from None


def write_registry(layout: Layout, api: PveApi, catalog: Catalog) -> Registry:
    """Rebuild the registry from the node and the output root and write it; returns what the file holds.
    The node is read under the lock: whoever writes last read last."""
    with exclusive(layout.registry_lock):
        return _store(layout, build_registry(layout, api, catalog))


def record_proof(layout: Layout, key: str, chain_id: str) -> bool:
    """After template_proof wrote a bundle: the proof path of that build's template in the registry, with
    no call to the node (the next full rewrite finds it anyway). False when the registry does not list
    the template (no registry yet, or the template is gone)."""
    folder = layout.build_proof_dir(key, parse_chain_id(chain_id).stamp)
    with exclusive(layout.registry_lock):
        registry = read_registry(layout)
        found = registry.templates.get(key) if registry else None
        if registry is None or found is None or not folder.is_dir():
            return False
        proof = folder.relative_to(layout.output_root).as_posix()

        def proved(version: TemplateVersion | None) -> Any:
            return version.model_copy(update={"proof": proof}) if version and version.chain_id == chain_id else version

        updated = found.model_copy(
            update={"current": proved(found.current), "retained": [proved(v) for v in found.retained]}
        )
        if updated != found:
            _store(
                layout,
                registry.model_copy(
                    update={"templates": {**registry.templates, key: updated}, "updated_at": datetime.now(UTC)}
                ),
            )
        return any(v.chain_id == chain_id for v in registry.versions(key))


def content_digest(registry: Registry) -> str:
    """sha256 of what the registry says, without `updated_at` (a data version that changes with the content)."""
    return hashlib.sha256(registry.model_dump_json(exclude={"updated_at"}).encode()).hexdigest()


def _store(layout: Layout, registry: Registry) -> Registry:
    """Write registry unless the file already says the same (but for updated_at): then keep the file."""
    previous = read_registry(layout)
    if previous is not None and content_digest(previous) == content_digest(registry):
        return previous
    atomic_write(layout.registry_file, registry_json(registry))
    return registry


# ------------------------------------------------------------------ schema and a Markdown view


def registry_schema() -> dict[str, Any]:
    """The JSON Schema of registry.json (what `docs/schema/registry.schema.json` holds)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated from packer_assets.evidence.registry.Registry by `python -m packer_assets.evidence.proof`; do not edit.",
        **Registry.model_json_schema(mode="serialization"),
    }


def registry_table(registry: Registry) -> str:
    """One row per key: its current template (or none), ISO, degraded, channels, end of life, proof."""
    rows = [
        "| key | VMID | name | built | ISO | degraded | channels | end of life | proof |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, found in registry.templates.items():
        now = found.current
        channels = ", ".join(f"{c}={vmid}" for c, vmid in found.channels.items()) or "-"
        eol = "-" if found.eol is None else f"{found.eol.isoformat()}{' (PAST)' if found.past_eol else ''}"
        if now is None:
            rows.append(f"| {key} | - | none | - | - | - | {channels} | {eol} | - |")
            continue
        # the count only: the reasons are long, and a long table is folded away in the UI (registry_json has them)
        degraded = (
            "unknown" if now.degraded is None else (f"yes ({len(now.degraded_reasons)} gaps)" if now.degraded else "no")
        )
        rows.append(
            f"| {key} | {now.vmid} | {now.name} | {now.built_at.astimezone(UTC):%Y-%m-%d %H:%M} | "
            f"{Path(now.iso.url).name if now.iso else '-'} | {degraded.replace('|', '/')} | {channels} | {eol} | "
            f"{now.proof or '-'} |"
        )
    return "\n".join(rows)
