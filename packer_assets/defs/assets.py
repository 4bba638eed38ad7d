"""Assets: each body calls the core and reports the result as metadata."""

import dagster as dg

from ..chain import fresh_chain_id
from ..pve.init_env import run_init
from .resources import ProjectSettings, ProxmoxBootstrap

CHAIN_TAG = "packer-assets/chain-id"
OWNERS = ["team:platform"]


class ProxmoxEnvConfig(dg.Config):
    rotate: bool = False  # create a new token secret even though the known one still works


def tag_run(context: dg.AssetExecutionContext, chain: str) -> None:
    """Put the chain ID on the run, so the UI's run list leads to the logs and proofs."""
    context.instance.add_run_tags(context.run.run_id, {CHAIN_TAG: chain})


@dg.asset(
    kinds={"proxmox"},
    group_name="bootstrap",
    owners=OWNERS,
    description="API user, role, ACLs and token for builds, plus the discovered node, storages and bridge; "
    "writes infra/env/.env.proxmox (0600) and the init proof bundle.",
)
def proxmox_env(
    context: dg.AssetExecutionContext, config: ProxmoxEnvConfig, project: ProjectSettings, pve_admin: ProxmoxBootstrap
) -> dg.MaterializeResult:
    layout = project.layout()
    chain = fresh_chain_id("init", lambda stamp: layout.init_log_dir(stamp).exists())
    tag_run(context, str(chain))
    outcome = run_init(layout, pve_admin.endpoint(), pve_admin.bootstrapper(), pve_admin.config(config.rotate),
                       chain, run_id=context.run.run_id, echo=print)
    result, found = outcome.result, outcome.result.discovery
    context.log.info(f"[{chain}] token {result.token_id} {result.token_action}; {len(result.changes)} change(s)")
    return dg.MaterializeResult(
        metadata={
            "chain_id": str(chain),
            "pve_version": result.pve_version,
            "node": found.node,
            "vm_storage": found.vm_storage,
            "iso_storage": found.iso_storage,
            "bridge": found.bridge,
            "http_bind": f"{found.http_bind_address}:{found.http_port}",
            "token_id": result.token_id,
            "token_action": result.token_action,
            "privileges": dg.MetadataValue.json(list(result.privileges)),
            "changes": dg.MetadataValue.json(result.changes),
            "env_file": dg.MetadataValue.path(str(outcome.env_file)),
            "init_log": dg.MetadataValue.path(str(outcome.log_file)),
            "proof": dg.MetadataValue.path(str(outcome.proof_dir)),
            "proof_readme": dg.MetadataValue.md((outcome.proof_dir / "README.md").read_text()),
        },
        # The env file changes only when access or discovery changes: downstream stays fresh otherwise.
        data_version=dg.DataVersion(access_fingerprint(outcome.proof)),
    )


def access_fingerprint(proof: dict) -> str:
    """What builds depend on (API, token ID, node, storages, bridge), never the secret."""
    import hashlib
    import json

    basis = {k: proof[k] for k in ("api_url", "token_id", "discovery")}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]
