"""The one place that builds the Dagster definitions (`dagster dev`, `dagster asset materialize -m`).

Env files (the lab's, or a site's) are read into the environment first, the way Dagster reads `.env`,
so resources take their secrets through dg.EnvVar whichever way they were provided.
"""

import os

import dagster as dg

from .settings import export_env_files

# Before the defs are imported: the partitions are read from the catalog at import (defs/partitions.py),
# and the catalog an env file names (PACKER_ASSETS_CATALOG, e.g. the lab's) must be the one they come from.
export_env_files()

from .defs import assets, checks, jobs, schedules, sensors  # noqa: E402
from .defs.resources import PackerSettings, ProjectSettings, ProxmoxBootstrap  # noqa: E402


def _env(name: str):
    """dg.EnvVar for a variable that is set (resolved at run time, never stored), else None."""
    return dg.EnvVar(name) if os.environ.get(name) else None


def _value(name: str, default=None):
    return os.environ.get(name) or default


defs = dg.Definitions(
    # Code references: the UI links every asset to the function that defines it.
    assets=dg.with_source_code_references(
        [assets.proxmox_env, assets.iso_release, assets.unattended_files, assets.staged_iso, assets.template,
         assets.template_proof]
    ),
    jobs=[jobs.bootstrap_job, jobs.rebuild_job, jobs.check_proxmox_env_job],
    # Every step of a run in the run's own process. Dagster's default (multiprocess) starts one more
    # Python process per step, each importing Dagster and these definitions again (4 per rebuild, each
    # 1.5-3 s of CPU and ~130 MiB): in the lab that was most of a rebuild's wall time and, with several
    # runs at once, what kept the pool from filling (bench/README.md, items 1 and 3). Given up:
    # unattended_files and staged_iso no longer overlap inside one run (seconds of rendering beside a
    # download), and a crashing step takes its run's process with it (the run fails either way). Pools
    # (op granularity) and run cancellation (one SIGINT to packer, its cleanup, the build VM destroyed)
    # behave the same.
    executor=dg.in_process_executor,
    sensors=[sensors.iso_checksum_sensor],
    schedules=[schedules.weekly_rebuild],
    asset_checks=[checks.token_authenticates, checks.token_privileges],
    resources={
        "packer": PackerSettings(
            binary=_value("PACKER_BINARY", "packer"),
            allow_degraded=_value("PACKER_ASSETS_ALLOW_DEGRADED", "0") == "1",
            ssh_host=_value("PACKER_ASSETS_SSH_HOST"),
            ssh_port=int(_value("PACKER_ASSETS_SSH_PORT", "0")) or None,
            ssh_timeout=_value("PACKER_ASSETS_SSH_TIMEOUT"),
            boot_wait=_value("PACKER_ASSETS_BOOT_WAIT"),
            build_user=_value("PROXMOX_BUILD_USER"),
            build_password=_env("PROXMOX_BUILD_PASSWORD"),
        ),
        "project": ProjectSettings(root=os.environ.get("PACKER_ASSETS_ROOT", ".")),
        "pve_admin": ProxmoxBootstrap(
            api_url=os.environ.get("PROXMOX_URL") or os.environ.get("PROXMOX_API_URL") or "https://pve.invalid:8006",
            ca_file=os.environ.get("PROXMOX_CA_FILE") or None,
            fingerprint=os.environ.get("PROXMOX_TLS_FINGERPRINT") or None,
            insecure=os.environ.get("PROXMOX_INSECURE") == "1",
            admin_user=os.environ.get("PROXMOX_BOOTSTRAP_USER", "root@pam"),
            admin_password=_env("PROXMOX_BOOTSTRAP_PASSWORD"),
            admin_token_name=os.environ.get("PROXMOX_BOOTSTRAP_TOKEN_NAME") or None,
            admin_token_secret=_env("PROXMOX_BOOTSTRAP_TOKEN_SECRET"),
            # the toolkit's names; after a first init, .env.proxmox pins what was discovered
            user=_value("PROXMOX_AUTOMATION_USER", "automation@pve"),
            role=_value("PROXMOX_ROLE", "PackerBuilder"),
            token_name=_value("PROXMOX_TOKEN_NAME", "packer"),
            privsep=_value("PROXMOX_PRIVSEP", "1") != "0",
            node=_value("PROXMOX_NODE"),
            vm_storage=_value("PROXMOX_VM_STORAGE"),
            iso_storage=_value("PROXMOX_ISO_STORAGE"),
            bridge=_value("PROXMOX_BRIDGE"),
            http_bind_address=_value("PROXMOX_HTTP_BIND_ADDRESS"),
            http_port=int(_value("PROXMOX_HTTP_PORT", "8802")),
            method=_value("PROXMOX_BOOTSTRAP_METHOD", "api"),
            ssh_host=_value("PROXMOX_SSH_HOST"),
            ssh_port=int(_value("PROXMOX_SSH_PORT", "22")),
            ssh_user=_value("PROXMOX_SSH_USER", "root"),
            ssh_key_file=_value("PROXMOX_SSH_KEY_FILE"),
            ssh_password=_env("PROXMOX_SSH_PASSWORD"),
            known_hosts=_value("PROXMOX_SSH_KNOWN_HOSTS"),
            trust_on_first_use=_value("PROXMOX_SSH_TRUST_ON_FIRST_USE", "0") == "1",
        ),
    },
)
