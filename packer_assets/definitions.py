"""The one place that builds the Dagster definitions (`dagster dev`, `dagster asset materialize -m`).

Settings are read once, through the one validated model (`settings.load_settings`: the environment over
the env files, the lab's or a site's): a contradiction or a bad value stops the load with one line naming
the variable and where it came from, before anything runs. The env files' values are then exported into
the environment, the way Dagster reads `.env`, so resources take their secrets through dg.EnvVar
whichever way they were provided.
"""

import os

import dagster as dg

from .settings import export_env_files, load_settings

SETTINGS = load_settings()
# Before the defs are imported: the partitions are read from the catalog at import (defs/partitions.py),
# and the catalog an env file names (PACKER_ASSETS_CATALOG, e.g. the lab's) must be the one they come from.
export_env_files()

from .defs import assets, checks, jobs, notifications, registry, schedules, sensors  # noqa: E402
from .defs.notifications import Notifier  # noqa: E402
from .defs.resources import PackerSettings, ProjectSettings, ProxmoxBootstrap  # noqa: E402


def _env(name: str):
    """dg.EnvVar for a variable that is set (resolved at run time, never stored), else None."""
    return dg.EnvVar(name) if os.environ.get(name) else None


defs = dg.Definitions(
    # No code references: dagster's local ones are vscode:// paths on the server (useless in a browser
    # elsewhere) and beta (11 BetaWarnings at every load).
    assets=[assets.proxmox_env, assets.iso_release, assets.unattended_files, assets.staged_iso, assets.template,
            assets.template_proof, registry.template_registry],
    jobs=[jobs.bootstrap_job, jobs.rebuild_job, jobs.rebuild_forced_job, jobs.check_proxmox_env_job,
          registry.registry_job],
    # Every step of a run in the run's own process. Dagster's default (multiprocess) starts one more
    # Python process per step, each importing Dagster and these definitions again (4 per rebuild, each
    # 1.5-3 s of CPU and ~130 MiB): in the lab that was most of a rebuild's wall time and, with several
    # runs at once, what kept the pool from filling (bench/README.md, items 1 and 3). Given up:
    # unattended_files and staged_iso no longer overlap inside one run (seconds of rendering beside a
    # download), and a crashing step takes its run's process with it (the run fails either way). Pools
    # (op granularity) and run cancellation (one SIGINT to packer, its cleanup, the build VM destroyed)
    # behave the same.
    executor=dg.in_process_executor,
    sensors=[sensors.build_iso_checksum_sensor(SETTINGS.sensor_interval),
             *notifications.build_notification_sensors(enabled=bool(os.environ.get("PACKER_ASSETS_WEBHOOKS")))],
    schedules=[schedules.build_weekly_rebuild(SETTINGS.rebuild_cron)],
    asset_checks=[checks.token_authenticates, checks.token_privileges],
    resources={
        "notifier": Notifier(webhooks=_env("PACKER_ASSETS_WEBHOOKS"), ui_url=SETTINGS.ui_url),
        "packer": PackerSettings(
            binary=SETTINGS.packer_binary,
            allow_degraded=SETTINGS.allow_degraded,
            ssh_host=SETTINGS.packer_ssh_host,
            ssh_port=SETTINGS.packer_ssh_port,
            ssh_ports=SETTINGS.packer_ssh_ports,
            lab_guests=SETTINGS.lab_guests,
            ssh_timeout=SETTINGS.packer_ssh_timeout,
            boot_wait=SETTINGS.boot_wait,
            build_user=SETTINGS.build_user,
            build_password=_env("PROXMOX_BUILD_PASSWORD"),
        ),
        "project": ProjectSettings(output_root=str(SETTINGS.output_root),
                                   signing_key=str(SETTINGS.signing_key) if SETTINGS.signing_key else None,
                                   signing_key_id=SETTINGS.signing_key_id),
        "pve_admin": ProxmoxBootstrap(
            api_url=SETTINGS.proxmox_url or "https://pve.invalid:8006",
            ca_file=str(SETTINGS.ca_file) if SETTINGS.ca_file else None,
            tls_fingerprint=SETTINGS.tls_fingerprint,
            insecure=SETTINGS.insecure,
            insecure_origin=SETTINGS.insecure_origin,
            admin_user=SETTINGS.bootstrap_user,
            admin_password=_env("PROXMOX_BOOTSTRAP_PASSWORD"),
            admin_token_name=SETTINGS.bootstrap_token_name,
            admin_token_secret=_env("PROXMOX_BOOTSTRAP_TOKEN_SECRET"),
            # the toolkit's names; after a first init, .env.proxmox pins what was discovered
            **ProxmoxBootstrap.config_fields(SETTINGS.bootstrap),
            method=SETTINGS.bootstrap_method,
            ssh_host=SETTINGS.ssh_host,
            ssh_port=SETTINGS.ssh_port,
            ssh_user=SETTINGS.ssh_user,
            ssh_key_file=SETTINGS.ssh_key_file,
            ssh_password=_env("PROXMOX_SSH_PASSWORD"),
            known_hosts=SETTINGS.ssh_known_hosts,
            trust_on_first_use=SETTINGS.ssh_trust_on_first_use,
            build_login=SETTINGS.build_login,
            packer_binary=SETTINGS.packer_binary,
        ),
    },
)
