"""weekly_rebuild: every key, once a week; the up-to-date rule decides what actually builds."""

import dagster as dg

from .jobs import rebuild_job
from .partitions import template_partitions

KEY_TAG = "packer-assets/key"


def build_weekly_rebuild(cron: str) -> dg.ScheduleDefinition:
    """The schedule on `cron` (settings: PACKER_ASSETS_REBUILD_CRON, default Sunday 03:00 UTC)."""

    @dg.schedule(
        job=rebuild_job,
        cron_schedule=cron,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"One rebuild_template run per template key, cron `{cron}` UTC (PACKER_ASSETS_REBUILD_CRON); "
        "a key that is up to date builds nothing (its run's tag packer-assets/outcome says up-to-date).",
    )
    def weekly_rebuild(context: dg.ScheduleEvaluationContext):
        day = context.scheduled_execution_time.strftime("%Y%m%d")
        # the key first in the run key and as a tag of its own: what the UI's preview of a tick shows of a request
        return [dg.RunRequest(partition_key=key, run_key=f"{key}:weekly:{day}",
                              tags={KEY_TAG: key, "packer-assets/trigger": "weekly"})
                for key in template_partitions.get_partition_keys()]

    return weekly_rebuild
