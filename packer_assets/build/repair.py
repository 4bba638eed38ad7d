"""What dead runs leave, repaired by the next run of any key: a promoted template without its proof, and
build VMs that keep running.

No promoted template without its proof: the template step writes the proof of the template it promoted
before the step ends, whatever else the run selected. A run killed between the promotion and that proof
leaves a promoted template without one; so every per-key run first calls `repair_proofs` for every key
of the catalog, and the next run of any key writes what a dead run could not. The record it proves from
is written before the promotion (build.py), so a promoted template always has one.

A killed run's build VM (packer killed before its own cleanup) is removed by `sweep_idle_keys`: a key
whose lock no live process holds has no build in progress, so whatever of it is not a template is left
over (build.sweep_leftovers), whichever key the run that finds it is for.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packer_assets.build.pipeline import NoPromotedBuild, promoted_record, sweep_leftovers, write_proof
from packer_assets.catalog import Catalog, TemplateEntry
from packer_assets.evidence.layout import Layout, latest, swap_latest
from packer_assets.evidence.registry import record_proof, write_registry
from packer_assets.evidence.signing import Signer
from packer_assets.pve.client import PveApi
from packer_assets.runs.locks import exclusive, key_if_free


@dataclass(frozen=True)
class ProofState:
    key: str
    chain_id: str
    proof_dir: Path
    written: bool  # the proof was missing and is now written
    relinked: bool  # `latest` pointed elsewhere and now points at it
    record: dict[str, Any]  # the build record it proves

    def line(self) -> str | None:
        """What was repaired, or None when the proof stood as it was."""
        done = [what for what, did in (("written", self.written), ("`latest` pointed at it", self.relinked)) if did]
        if not done:
            return None
        return f"{self.key}: proof of the promoted template ({self.chain_id}) {' and '.join(done)}: {self.proof_dir}"


def ensure_proof(layout: Layout, api: PveApi, catalog: Catalog, key: str, signer: Signer | None) -> ProofState:
    """The proof of the key's promoted template: written if missing, `latest` pointed at it, registry.json
    naming it (rewritten from the node when it does not list the template: a run killed before its own
    rewrite). Raises NoPromotedBuild when there is nothing this output root can prove."""
    folder, record = promoted_record(layout, api, key)
    proof_dir = layout.build_proof_dir(key, folder.name)
    lock = layout.lock_file(key).with_name(f"{key}.proof.lock")
    with exclusive(lock):  # two runs repairing one key: one writes, the other finds it written
        written = not proof_dir.is_dir()
        if written:
            write_proof(layout, record, folder / "packer.log", signer)
        relinked = latest(proof_dir.parent) != proof_dir.resolve()
        if relinked:
            swap_latest(proof_dir)
    if not record_proof(layout, key, record["chain_id"]):
        write_registry(layout, api, catalog)
    return ProofState(key, record["chain_id"], proof_dir, written, relinked, record)


def repair_proofs(layout: Layout, api: PveApi, catalog: Catalog, signer: Signer | None) -> list[str]:
    """ensure_proof for each key no other live run works on (that run writes its own proof); one line
    per repair and per key whose proof could not be written."""
    lines = []
    for key in catalog.keys():  # noqa: SIM118 - a Catalog iterates its entries; keys() are their names
        with key_if_free(layout.lock_file(key)) as free:
            line = _repair_one(layout, api, catalog, key, signer) if free else None
        if line:
            lines.append(line)
    return lines


def _repair_one(layout: Layout, api: PveApi, catalog: Catalog, key: str, signer: Signer | None) -> str | None:
    try:
        return ensure_proof(layout, api, catalog, key, signer).line()
    except NoPromotedBuild:
        return None  # nothing promoted, or built from another output root: nothing to repair here
    except Exception as exc:  # noqa: BLE001 - one key's failure must not stop the others' repair
        return f"{key}: the proof of its promoted template could not be written: {type(exc).__name__}: {exc}"


def sweep_idle_keys(layout: Layout, api: PveApi, node: str, entries: Iterable[TemplateEntry]) -> list[str]:
    """Remove what dead runs left of each key no live run works on (build VMs, smoke clones, recorded
    build VMs); one line per thing removed, naming the key."""
    lines = []
    for entry in entries:
        with key_if_free(layout.lock_file(entry.key)) as free:
            if not free:
                continue
            try:
                lines += [f"{entry.key}: {line}" for line in sweep_leftovers(api, node, entry, layout)]
            except Exception as exc:  # noqa: BLE001 - reported; that key's own next run sweeps again
                lines.append(f"{entry.key}: leftovers not removed: {type(exc).__name__}: {exc}")
    return lines
