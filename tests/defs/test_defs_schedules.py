from datetime import UTC, datetime

import dagster as dg

from packer_assets.catalog import load_catalog
from packer_assets.defs.schedules import build_weekly_rebuild
from packer_assets.settings import Settings

weekly_rebuild = build_weekly_rebuild(Settings.rebuild_cron)


def test_weekly_rebuild_requests_one_run_per_key_with_a_run_key():
    when = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        requests = weekly_rebuild(dg.build_schedule_context(instance=instance, scheduled_execution_time=when))
    assert [r.partition_key for r in requests] == list(load_catalog().keys())
    # the key leads the run key and has a tag of its own (the UI's preview of a tick shows tags, not partitions)
    assert {r.run_key for r in requests} == {f"{k}:weekly:20261129" for k in load_catalog().keys()}
    assert [r.tags["packer-assets/key"] for r in requests] == list(load_catalog().keys())
    assert weekly_rebuild.cron_schedule == "0 3 * * 0"
    assert weekly_rebuild.execution_timezone == "UTC"
