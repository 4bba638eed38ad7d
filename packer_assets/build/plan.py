"""Which keys need a run: a cheap pre-check, so unchanged keys cost (almost) nothing.

A build's input fingerprint (pve/templates.input_fingerprint) hashes the *rendered* files, which costs
a render (a 656,000-round SHA-512 crypt of the install password) and staging lookups. The plan
fingerprint hashes what those outputs are made of instead, reading files only: the catalog entry (its
build inputs), every file of the key's Packer folder and of templates/common (Packer templates and the
Jinja sources of the unattended files), the tool version, the ISO checksums as last observed (the
checksum sensor's observations, else the pinned or last staged ones), the authorized keys and an HMAC of
the install password under a key kept in the output root (0600), so the state file holds no digest of
a password anyone could test guesses against.

Every build and every up-to-date run of a key writes `output/state/plans/<key>.json` (plan fingerprint,
VMID, chain ID of the promoted template). `plan_runs` compares: a key runs when its state is missing,
its plan changed, or its template is no longer the promoted one on the node; every other key is skipped
with its reason. The weekly schedule and `make build-all` ask it before they launch anything.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packer_assets import __version__
from packer_assets.catalog import TemplateEntry
from packer_assets.catalog.eol import end_of_life
from packer_assets.evidence.layout import Layout, atomic_write
from packer_assets.pve.templates import catalog_entry_json
from packer_assets.upstream.digests import Checksum

PLAN_VERSION = "1"
OBSERVED_FILE = "iso-observed.json"  # source name -> checksum as the sensor last saw it
KEY_FILE = ".plan-key"


def _state_dir(layout: Layout) -> Path:
    return layout.output_root / "output" / "state"


def plan_key(layout: Layout) -> bytes:
    """The output root's HMAC key for passwords in plans: made once, 0600, never printed."""
    path = _state_dir(layout) / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()  # another process made it first
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
    return path.read_bytes()


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class SourceDigests:
    """Digests of the template folders, computed once per folder however many keys share it."""

    def __init__(self, project_dir: Path):
        self.project_dir = Path(project_dir)
        self._cache: dict[Path, str] = {}

    def of(self, relative: str | Path) -> str:
        folder = (self.project_dir / relative).resolve()
        if folder not in self._cache:
            self._cache[folder] = _folder_digest(folder) if folder.is_dir() else "missing"
        return self._cache[folder]


def read_observed(layout: Layout) -> dict[str, str]:
    path = _state_dir(layout) / OBSERVED_FILE
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def record_observed(layout: Layout, checksums: Mapping[str, str]) -> None:
    """Merge source name -> checksum into the observed file (the sensor, after a tick)."""
    if not checksums:
        return
    merged = {**read_observed(layout), **checksums}
    atomic_write(_state_dir(layout) / OBSERVED_FILE, json.dumps(merged, indent=1, sort_keys=True) + "\n")


def iso_checksums(
    entry: TemplateEntry,
    observed: Mapping[str, str],
    staged: Mapping[str, str] | None = None,
    known: Mapping[str, str] | None = None,
) -> str:
    """`name=checksum;...` of the entry's ISOs: the staged ones (a run), else as last observed by the
    sensor, else as the key's last build had them (`known`), else the catalog's pinned checksum, else `?`
    (unknown: the key runs)."""
    parts = []
    for iso in entry.all_isos():
        name = getattr(iso, "name", None)
        source = f"{entry.key}--{name}" if name else entry.key
        label = name or "iso"
        pinned = str(Checksum.parse(iso.checksum)) if iso.checksum else None
        checksum = (staged or {}).get(label) or observed.get(source) or (known or {}).get(label) or pinned or "?"
        parts.append(f"{label}={checksum}")
    return ";".join(sorted(parts))


def _parse_isos(text: str | None) -> dict[str, str]:
    return dict(part.split("=", 1) for part in (text or "").split(";") if "=" in part)


def _inputs(entry: TemplateEntry, env: Mapping[str, str], sources: SourceDigests, key: bytes) -> dict[str, str]:
    """What a key's rendered files and Packer configuration are made of (secrets as an HMAC)."""
    password = env.get(entry.install_user.password_env) or ""
    keys_env = entry.install_user.ssh_authorized_keys_env
    return {
        "plan": PLAN_VERSION,
        "tool": __version__,
        "entry": catalog_entry_json(entry),
        "packer_dir": sources.of(entry.packer_dir),
        "common": sources.of("templates/common"),
        "password": hmac.new(key, password.encode(), hashlib.sha256).hexdigest(),
        "ssh_keys": (env.get(keys_env) or "") if keys_env else "",
        "salt_seed": env.get("PACKER_ASSETS_SALT_SEED") or "",
        "schema_dir": env.get("PACKER_ASSETS_SCHEMA_DIR") or "",
    }


def _digest(blob: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def plan_fingerprint(
    entry: TemplateEntry, env: Mapping[str, str], sources: SourceDigests, key: bytes, isos: str
) -> str:
    """sha256 over everything a build of the entry is made of, from files and settings only."""
    return _digest({**_inputs(entry, env, sources, key), "isos": isos})


def render_key(
    entry: TemplateEntry, env: Mapping[str, str], sources: SourceDigests, key: bytes, validator: Mapping[str, str]
) -> str:
    """What a render and its `packer validate` depend on: the inputs, plus the validating Packer
    (`validator`: its path, size and mtime, and the build settings that change the prepared work dir)."""
    return _digest({**_inputs(entry, env, sources, key), "validator": dict(validator)})


@dataclass(frozen=True)
class KeyPlan:
    key: str
    run: bool
    reason: str
    note: str = ""  # past the catalog's end of life: since when (the end_of_life check warns)


@dataclass
class Plan:
    keys: list[KeyPlan] = field(default_factory=list)

    @property
    def to_run(self) -> list[str]:
        return [k.key for k in self.keys if k.run]

    @property
    def skipped(self) -> list[str]:
        return [k.key for k in self.keys if not k.run]

    def summary(self) -> str:
        return f"{len(self.to_run)} of {len(self.keys)} key(s) to run, {len(self.skipped)} unchanged" + (
            f": run {', '.join(self.to_run)}" if self.to_run else ""
        )


def state_file(layout: Layout, key: str) -> Path:
    return _state_dir(layout) / "plans" / f"{key}.json"


def record_plan(layout: Layout, key: str, fingerprint: str, isos: str, vmid: int | None, chain_id: str | None) -> Path:
    """After a build promoted `vmid`, or a run found it up to date: what the key's template was made of
    (the plan fingerprint, and the ISO checksums it was built from: `known` for the next pre-check)."""
    return atomic_write(
        state_file(layout, key),
        json.dumps({"plan_fingerprint": fingerprint, "isos": isos, "vmid": vmid, "chain_id": chain_id}, sort_keys=True)
        + "\n",
    )


def read_plan_state(layout: Layout, key: str) -> dict[str, Any] | None:
    """The state record_plan wrote (plan_fingerprint, isos, vmid, chain_id), or None when unreadable."""
    try:
        state: dict[str, Any] = json.loads(state_file(layout, key).read_text())
        return state
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class _Known:
    """What every key's decision reads: the sources' digests, the HMAC key, the checksums observed upstream."""

    sources: SourceDigests
    key: bytes
    observed: dict[str, str]


def _run_or_not(
    layout: Layout, entry: TemplateEntry, env: Mapping[str, str], known: _Known, promoted: Mapping[str, int] | None
) -> tuple[bool, str]:
    """Whether the key needs a run, and why."""
    sources, key, observed = known.sources, known.key, known.observed
    state = read_plan_state(layout, entry.key)
    if state is None:
        return True, "no build recorded here"
    isos = iso_checksums(entry, observed, known=_parse_isos(state.get("isos")))
    if plan_fingerprint(entry, env, sources, key, isos) != state.get("plan_fingerprint"):
        return True, "inputs changed (catalog, templates, ISO or secrets)"
    if promoted is not None and promoted.get(entry.key) != state.get("vmid"):
        now = promoted.get(entry.key)
        return True, (
            f"template {state.get('vmid')} is no longer the promoted one ({'none is' if now is None else f'{now} is'})"
        )
    return False, f"up to date: template {state.get('vmid')}"


def plan_runs(
    layout: Layout,
    entries: Iterable[TemplateEntry],
    env: Mapping[str, str],
    project_dir: Path,
    promoted: Mapping[str, int] | None,
) -> Plan:
    """Which keys need a run. `promoted`: key -> VMID of the promoted template as the node says now
    (one /cluster/resources call), or None when the node could not be asked (the state is trusted)."""
    known, plan = _Known(SourceDigests(project_dir), plan_key(layout), read_observed(layout)), Plan()
    for entry in entries:
        run, reason = _run_or_not(layout, entry, env, known, promoted)
        found = end_of_life(entry.key, entry.eol)  # a note, never a reason: an end of life rebuilds nothing
        plan.keys.append(KeyPlan(entry.key, run, reason, found.summary() if found.past else ""))
    return plan
