"""`packer-assets chain`: everything that carries a chain ID, in one place.

What the toolkit's `grep -r CHAIN-...` did: the chain's log files, its build record (rendered files'
hashes) and proof bundle in the output root, the Dagster runs tagged with it, and the Proxmox templates
whose description names it. It works as well for a chain whose build failed (a log and a run, no
record, no proof). The runs and templates are asked through callables the caller hands in, so this
module stays free of Dagster and of a live node; what could not be asked is said, not hidden.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packer_assets.build.pipeline import RECORD
from packer_assets.evidence.chain import ChainId, parse_chain_id
from packer_assets.evidence.layout import Layout, sha256_file


@dataclass
class ChainReport:
    chain_id: str
    key: str
    logs: dict[str, str] = field(default_factory=dict)  # path -> sha256
    record: str | None = None  # build.json: only a build that passed its smoke test
    rendered_files: dict[str, str] = field(default_factory=dict)
    proof: str | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)  # run_id, status, job, url
    templates: list[dict[str, Any]] = field(default_factory=list)  # vmid, name, node, tags
    unknown: list[str] = field(default_factory=list)  # what could not be asked, and why

    @property
    def found(self) -> bool:
        return bool(self.logs or self.proof or self.runs or self.templates)

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def lines(self) -> list[str]:
        out = [f"{self.chain_id} (key {self.key})"]
        out += [f"  log       {path}  sha256 {digest}" for path, digest in sorted(self.logs.items())] or [
            "  log       none in this output root"
        ]
        out.append(
            f"  record    {self.record}"
            if self.record
            else "  record    none (the build failed, was interrupted, or ran elsewhere)"
        )
        out += [f"  rendered  {name}  sha256 {digest}" for name, digest in sorted(self.rendered_files.items())]
        out.append(
            f"  proof     {self.proof}" if self.proof else "  proof     none (written only for a build that passed)"
        )
        out += [
            f"  run       {r['run_id']}  {r['status']}  {r['job']}" + (f"  {r['url']}" if r.get("url") else "")
            for r in self.runs
        ] or ["  run       none found"]
        out += [f"  template  {t['vmid']} {t['name']} on {t['node']}  tags {t['tags']}" for t in self.templates] or [
            "  template  none names this chain"
        ]
        out += [f"  unknown   {why}" for why in self.unknown]
        return out


RunFinder = Callable[[str], list[dict[str, Any]]]
TemplateFinder = Callable[[str], list[dict[str, Any]]]


def chain_report(
    layout: Layout, chain_id: str, runs: RunFinder | None = None, templates: TemplateFinder | None = None
) -> ChainReport:
    """What the output root holds for chain_id, plus the runs and templates the finders return
    (a finder that raises is reported under `unknown`)."""
    chain = parse_chain_id(chain_id)
    report = ChainReport(str(chain), chain.key)
    log_dir, proof_dir = _folders(layout, chain)
    if log_dir.is_dir():
        report.logs = {str(p): sha256_file(p) for p in sorted(log_dir.iterdir()) if p.is_file()}
        record = log_dir / RECORD
        if record.is_file():
            report.record = str(record)
            report.rendered_files = dict(json.loads(record.read_text()).get("rendered_files") or {})
    if proof_dir.is_dir():
        report.proof = str(proof_dir)
    for name, finder, target in (
        ("Dagster runs", runs, report.runs),
        ("Proxmox templates", templates, report.templates),
    ):
        if finder is None:
            continue
        try:
            target += finder(str(chain))
        except Exception as exc:  # noqa: BLE001 - an unreachable node or instance is reported, not fatal
            report.unknown.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return report


def _folders(layout: Layout, chain: ChainId) -> tuple[Path, Path]:
    if chain.key == "init":
        return layout.init_log_dir(chain.stamp), layout.init_proof_dir(chain.stamp)
    return layout.build_log_dir(chain.key, chain.stamp), layout.build_proof_dir(chain.key, chain.stamp)


def chains_of_key(layout: Layout, key: str) -> list[tuple[str, str]]:
    """(chain ID, outcome) of every build of the key with a log here, newest first. Outcome: `proved`,
    `passed` (record, no proof yet) or `failed` (a log only: failed, interrupted or still running)."""
    parent = layout.build_log_dir(key, "x").parent
    found = []
    for folder in sorted((p for p in parent.glob("[0-9]*") if p.is_dir()), key=lambda p: p.name, reverse=True):
        chain = f"CHAIN-{folder.name}-{key}"
        if layout.build_proof_dir(key, folder.name).is_dir():
            outcome = "proved"
        elif (folder / RECORD).is_file():
            outcome = "passed"
        else:
            outcome = "failed"
        found.append((chain, outcome))
    return found
