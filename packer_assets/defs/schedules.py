"""weekly_rebuild: once a week, a run for each key whose inputs changed since its promoted template.

The tick asks before it launches (plan.py): a key runs when its recorded plan fingerprint differs from
one computed now from files and settings (catalog entry, templates, ISO checksums as last observed,
secrets as an HMAC), when nothing was recorded, or when its template is no longer the promoted one on
the node (one /cluster/resources call). Every other key is counted in the tick's log, and costs no run.
Chosen over Dagster's declarative automation (AutomationCondition with code and data versions): the
inputs that matter live outside Dagster (the node, the catalog, secrets), a condition would need an
observable source per input and still launch the run to find out, and this check is one function with
one reason per key that `make build-all` shares.
"""

import dagster as dg

from packer_assets.build.plan import plan_runs
from packer_assets.defs.jobs import rebuild_job
from packer_assets.defs.resources import ProjectSettings
from packer_assets.pve.templates import promoted_vmids

KEY_TAG = "packer-assets/key"


def build_weekly_rebuild(cron: str) -> dg.ScheduleDefinition:
    """The schedule on `cron` (settings: PACKER_ASSETS_REBUILD_CRON, default Sunday 03:00 UTC)."""

    @dg.schedule(
        job=rebuild_job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Cron `{cron}` UTC (PACKER_ASSETS_REBUILD_CRON): one rebuild_template run per key whose inputs "
        "changed since its promoted template (catalog entry, templates, ISO as last observed, secrets) or whose "
        "template is missing; unchanged keys are counted in the tick's log and launch nothing.",
    )
    def weekly_rebuild(context: dg.ScheduleEvaluationContext, project: ProjectSettings):
        day = context.scheduled_execution_time.strftime("%Y%m%d")
        catalog, layout = project.catalog(), project.layout()
        try:
            promoted = promoted_vmids(project.build_access().connect(), catalog.keys())
        except Exception as exc:  # noqa: BLE001 - the recorded state still decides; said, not hidden
            context.log.warning(
                f"the node could not be asked which templates are promoted ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the recorded state decides"
            )
            promoted = None
        plan = plan_runs(layout, catalog, project.environment(), catalog.project_dir, promoted)
        for item in plan.keys:
            if item.run:
                context.log.info(f"{item.key}: run ({item.reason})")
        context.log.info(f"weekly_rebuild: {plan.summary()}")
        if not plan.to_run:
            return dg.SkipReason(f"all {len(plan.keys)} key(s) up to date: no run requested")
        # the key first in the run key and as a tag of its own: what the UI's preview of a tick shows of a request
        return [
            dg.RunRequest(
                partition_key=key, run_key=f"{key}:weekly:{day}", tags={KEY_TAG: key, "packer-assets/trigger": "weekly"}
            )
            for key in plan.to_run
        ]

    return weekly_rebuild
