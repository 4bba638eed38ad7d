"""Asset checks: each calls the core and reports pass/fail with what was found."""

import dagster as dg

from packer_assets.config.envfile import read_env_file
from packer_assets.defs.assets import proxmox_env
from packer_assets.defs.resources import ProjectSettings
from packer_assets.pve.bootstrap import BootstrapError, build_access, token_privilege_gaps
from packer_assets.pve.client import PveAccessError


def _access(project: ProjectSettings):
    env_file = project.layout().env_file
    return build_access(read_env_file(env_file), str(env_file))


@dg.asset_check(asset=proxmox_env, blocking=True, description="The build token logs in (GET /version as the token).")
def token_authenticates(project: ProjectSettings) -> dg.AssetCheckResult:
    try:
        access = _access(project)
        version = access.connect().version.get()["version"]
    except (BootstrapError, PveAccessError) as exc:
        return dg.AssetCheckResult(passed=False, description=str(exc))
    return dg.AssetCheckResult(passed=True, metadata={"token_id": access.token_id, "pve_version": version})


@dg.asset_check(
    asset=proxmox_env,
    blocking=True,
    description="The build token holds every privilege a build, ISO staging and the smoke test need, on every "
    "path they touch (asked of /access/permissions as the token).",
)
def token_privileges(project: ProjectSettings) -> dg.AssetCheckResult:
    try:
        access = _access(project)
        grants, missing = token_privilege_gaps(access.connect(), access.discovery)
    except (BootstrapError, PveAccessError) as exc:
        return dg.AssetCheckResult(passed=False, description=str(exc))
    checked = {path: sorted(privs) for path, privs in grants.items()}
    if missing:
        text = "; ".join(f"{priv} on {path}" for path, priv in missing)
        return dg.AssetCheckResult(
            passed=False,
            description=f"token {access.token_id} lacks: {text}",
            metadata={
                "missing": dg.MetadataValue.json([list(m) for m in missing]),
                "checked": dg.MetadataValue.json(checked),
            },
        )
    return dg.AssetCheckResult(passed=True, metadata={"checked": dg.MetadataValue.json(checked)})
