"""Jobs: the bootstrap, and one partitioned rebuild of a key (kept apart: mixing the unpartitioned
proxmox_env into a partitioned selection breaks the UI's backfill options)."""

import dagster as dg

from packer_assets.defs import assets

bootstrap_job = dg.define_asset_job(
    "bootstrap",
    selection=dg.AssetSelection.assets(assets.proxmox_env),
    description="proxmox_env and its checks: API user, role, token, .env.proxmox.",
)

REBUILD_ASSETS = [assets.unattended_files, assets.staged_iso, assets.template, assets.template_proof]

rebuild_job = dg.define_asset_job(
    "rebuild_template",
    selection=dg.AssetSelection.assets(*REBUILD_ASSETS),
    description="Everything a template key needs, for one partition: rendered files, staged ISO, build, proof. "
    "**A no-op for a key that is up to date** (its promoted template was built from the same inputs): nothing is "
    "built, template_proof is skipped and the run's tag `packer-assets/outcome` says `up-to-date` (`built` or "
    "`failed` otherwise). `rebuild_template_forced` builds anyway.",
)

rebuild_forced_job = dg.define_asset_job(
    assets.FORCED_JOB,
    selection=dg.AssetSelection.assets(*REBUILD_ASSETS),
    config={"ops": {"template": {"config": {"force": True}}}},  # what the launchpad shows
    run_tags={assets.FORCE_TAG: "true"},  # shown on its runs; its name is what forces (assets.forced)
    description="rebuild_template with `force: true` preset (and the run tag `packer-assets/force: true`): builds "
    "a new template for the partition even when the promoted one was built from the same inputs (a re-spin: new "
    "VMID, smoke test, promotion, proof).",
)

# dagster 1.13's CLI has no `dagster asset check`: the checks alone are this job
# (`dagster job execute -j check_proxmox_env -m packer_assets.definitions`).
check_proxmox_env_job = dg.define_asset_job(
    "check_proxmox_env",
    selection=dg.AssetSelection.checks_for_assets(assets.proxmox_env),
    description="The checks of proxmox_env alone (token logs in, holds every privilege), without changing anything.",
)
