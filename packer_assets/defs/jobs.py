"""Jobs: the bootstrap, and one partitioned rebuild of a key (kept apart: mixing the unpartitioned
proxmox_env into a partitioned selection breaks the UI's backfill options)."""

import dagster as dg

from . import assets

bootstrap_job = dg.define_asset_job(
    "bootstrap", selection=dg.AssetSelection.assets(assets.proxmox_env),
    description="proxmox_env and its checks: API user, role, token, .env.proxmox.",
)

REBUILD_ASSETS = [assets.unattended_files, assets.staged_iso, assets.template, assets.template_proof]

rebuild_job = dg.define_asset_job(
    "rebuild_template",
    selection=dg.AssetSelection.assets(*REBUILD_ASSETS),
    description="Everything a template key needs, for one partition: rendered files, staged ISO, build, proof.",
)

# dagster 1.13's CLI has no `dagster asset check`: the checks alone are this job
# (`dagster job execute -j check_proxmox_env -m packer_assets.definitions`).
check_proxmox_env_job = dg.define_asset_job(
    "check_proxmox_env", selection=dg.AssetSelection.checks_for_assets(assets.proxmox_env),
    description="The checks of proxmox_env alone (token logs in, holds every privilege), without changing anything.",
)
