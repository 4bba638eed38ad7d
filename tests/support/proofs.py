"""A sample build proof, and a bundle of it on disk (for the proof, verify and audit tests)."""

from datetime import UTC, datetime
from pathlib import Path

from packer_assets.evidence.layout import Layout, sha256_file
from packer_assets.evidence.proof import BuildProof, CheckResult, write_build_proof


def sample(log_sha256="0" * 64, **changes):
    data = {
        "chain_id": "CHAIN-20261125T100000Z-ubuntu-2204", "key": "ubuntu-2204", "dagster_run_id": "run-123",
        "template": {"vmid": 9101, "name": "ubuntu-2204-20261125100512", "node": "pve1",
                     "tags": ["packer-assets", "packer-assets-latest", "ubuntu-2204"]},
        "iso": {"url": "https://releases.ubuntu.com/22.04.5/ubuntu.iso",
                "effective_url": "http://127.0.0.1:8000/releases.ubuntu.com/22.04.5/ubuntu.iso",
                "checksum": "sha256:" + "ab" * 32,
                "checksum_source": "http://127.0.0.1:8000/releases.ubuntu.com/22.04.5/SHA256SUMS",
                "volid": "local:iso/ubuntu.abababababab.iso"},
        "rendered_files": {"user-data": "1" * 64, "meta-data": "2" * 64},
        "packer_template_sha256": "3" * 64, "packer_version": "1.6.6",
        "timings": {"started_at": datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
                    "finished_at": datetime(2026, 11, 25, 10, 7, 30, tzinfo=UTC),
                    "stages": {"stage_iso": 2.5, "packer_build": 400.0, "finish": 1.0, "smoke_test": 20.0}},
        "checks": [CheckResult(name="smoke_test", passed=True, description="clone 9102 booted; agent answered",
                               details={"ips": ["192.0.2.50"], "clone_vmid": 9102}),
                   {"name": "packer_validate", "passed": True, "description": "packer validate passed"}],
        "log_sha256": log_sha256, "input_fingerprint": "4" * 64, "tool_version": "0.1.0",
        "previous_template_vmid": 9100, "pruned_vmids": [9099],
    }
    data.update(changes)
    return BuildProof.model_validate(data)


def written_bundle(root: Path, signer=None, **changes) -> Path:
    """A build's log and its proof bundle under root (an output root), signed when a signer is given; changes
    go to the sample proof."""
    log = Layout(root).build_log_dir("ubuntu-2204", "20261125T100000Z") / "packer.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("[CHAIN-20261125T100000Z-ubuntu-2204] [packer] Build 'proxmox' finished.\n")
    return write_build_proof(Layout(root), sample(log_sha256=sha256_file(log), **changes), log, signer=signer)
