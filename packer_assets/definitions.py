"""The one place that builds the Dagster definitions (`dagster dev`, `dagster asset materialize -m`).

Settings are read once, through the one validated model (`settings.load_settings`: the process environment
over the env files, the lab's or a site's): a bad value or a contradiction stops the load with one line
naming the variable and where it came from. The resources are built from that model
(defs/resources.build_resources). Nothing is exported into os.environ: what runs need of the environment
(the catalog it names, install passwords, secrets) they read from the same merged, read-only view.
"""

import dagster as dg

from packer_assets.config.settings import load_settings

SETTINGS = load_settings()  # first: a bad setting is the one line, before the catalog the partitions read

from packer_assets.defs import assets, checks, jobs, notifications, registry, schedules, sensors  # noqa: E402
from packer_assets.defs.resources import build_resources  # noqa: E402

defs = dg.Definitions(
    # No code references: dagster's local ones are vscode:// paths on the server (useless in a browser
    # elsewhere) and beta (11 BetaWarnings at every load).
    assets=[
        assets.proxmox_env,
        assets.iso_release,
        assets.unattended_files,
        assets.staged_iso,
        assets.template,
        assets.template_proof,
        registry.template_registry,
    ],
    jobs=[
        jobs.bootstrap_job,
        jobs.rebuild_job,
        jobs.rebuild_forced_job,
        jobs.check_proxmox_env_job,
        registry.registry_job,
    ],
    # Every step of a run in the run's own process. Dagster's default (multiprocess) starts one more
    # Python process per step, each importing Dagster and these definitions again (4 per rebuild, each
    # 1.5-3 s of CPU and ~130 MiB): in the lab that was most of a rebuild's wall time and, with several
    # runs at once, what kept the pool from filling (bench/README.md, items 1 and 3). Given up:
    # unattended_files and staged_iso no longer overlap inside one run (seconds of rendering beside a
    # download), and a crashing step takes its run's process with it (the run fails either way). Pools
    # (op granularity) and run cancellation (one SIGINT to packer, its cleanup, the build VM destroyed)
    # behave the same.
    executor=dg.in_process_executor,
    sensors=[
        sensors.build_iso_checksum_sensor(SETTINGS.sensor_interval),
        *notifications.build_notification_sensors(enabled=bool(SETTINGS.environment.get("PACKER_ASSETS_WEBHOOKS"))),
    ],
    schedules=[schedules.build_weekly_rebuild(SETTINGS.rebuild_cron)],
    asset_checks=[checks.token_authenticates, checks.token_privileges],
    resources=build_resources(SETTINGS),
)
