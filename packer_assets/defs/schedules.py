"""weekly_rebuild: every key, once a week; the up-to-date rule decides what actually builds."""

import os

import dagster as dg

from .jobs import rebuild_job
from .partitions import template_partitions

CRON = os.environ.get("PACKER_ASSETS_REBUILD_CRON", "0 3 * * 0")  # Sunday 03:00 UTC


@dg.schedule(
    job=rebuild_job,
    cron_schedule=CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="One rebuild run per template key (cron: PACKER_ASSETS_REBUILD_CRON, default Sunday 03:00 UTC).",
)
def weekly_rebuild(context: dg.ScheduleEvaluationContext):
    day = context.scheduled_execution_time.strftime("%Y%m%d")
    return [dg.RunRequest(partition_key=key, run_key=f"weekly:{day}:{key}", tags={"packer-assets/trigger": "weekly"})
            for key in template_partitions.get_partition_keys()]
