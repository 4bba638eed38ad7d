"""The checksum sensor and the weekly schedule for real, under `dagster-daemon run` with the local instance.

The repo's dagster.yaml (SQLite, queued runs) in a fresh DAGSTER_HOME, the lab with a project that ran
proxmox_env, and the daemon serving packer_assets.definitions. A new ISO published in the lab mirror
must lead, by the daemon's own ticks, to one rebuild run of that key that succeeds.
"""



import dagster as dg
import pytest
import yaml
from support.dagster_procs import BIN, REPO, Proc, dagster_cli, dagster_env, wait_for

from packer_assets.defs import sensors

pytestmark = [pytest.mark.e2e, pytest.mark.lab, pytest.mark.packer]

MODULE = ["-m", "packer_assets.definitions"]
KEY = "debian-12"
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@pytest.fixture
def local_home(tmp_path):
    """The repo's dagster.yaml, plus one test-only limit: runs of the weekly schedule stay queued (the
    test is about its tick; five lab builds would only cost time)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config["concurrency"]["runs"]["tag_concurrency_limits"].append(
        {"key": "dagster/schedule_name", "value": "weekly_rebuild", "limit": 0})
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def observed_keys(instance) -> set[str]:
    records = instance.fetch_observations(dg.AssetKey("iso_release"), limit=1000).records
    return {r.partition_key for r in records}


def latest_observed_version(instance, key: str) -> str | None:
    records = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("iso_release"),
                                                                asset_partitions=[key]), limit=1).records
    return records[0].asset_observation.tags.get(sensors.DATA_VERSION_TAG) if records else None


def runs_of(instance, **tags) -> list:
    return instance.get_runs(dg.RunsFilter(tags=tags))


@pytest.mark.timeout(1050)  # its own waits add up to 990 s
def test_sensor_and_schedule_run_under_the_daemon(lab_project, local_home, tmp_path):
    keys = lab_project.stack.catalog.keys()
    # the sensor every 5 s; the weekly schedule every minute, so the daemon ticks it during the test
    env = dagster_env(local_home, {"PACKER_ASSETS_SENSOR_INTERVAL": "5", "PACKER_ASSETS_REBUILD_CRON": "* * * * *"})
    with dg.DagsterInstance.from_config(str(local_home)) as instance:
        # Every key already has a template, so the sensor's first tick only records what it sees (a key
        # never built would be requested at first sight) and the one sensor run below is the publish's.
        for key in keys:
            instance.report_runless_asset_event(dg.AssetMaterialization(sensors.BUILT_ASSET, partition=key))
        dagster_cli(["sensor", "start", "iso_checksum_sensor", *MODULE], env)
        daemon = Proc.start("daemon", [str(BIN / "dagster-daemon"), "run", *MODULE], env, tmp_path / "logs")
        try:
            wait_for(lambda: observed_keys(instance) == set(keys), 120, "the sensor's first tick to observe every key",
                     interval=0.5, on_timeout=daemon.tail)
            assert runs_of(instance, **{"dagster/sensor_name": "iso_checksum_sensor"}) == [], "nothing changed yet"

            new = lab_project.mirror.publish(KEY)

            def sensor_run_finished():
                runs = runs_of(instance, **{"dagster/sensor_name": "iso_checksum_sensor"})
                return runs and runs[0].status in TERMINAL and runs

            sensor_runs = wait_for(sensor_run_finished, 180, f"the sensor's rebuild run of {KEY}", interval=0.5,
                                   on_timeout=daemon.tail)
            # The schedule from now on: KEY was just built (its plan recorded), no other key was ever built here.
            dagster_cli(["schedule", "start", "weekly_rebuild", *MODULE], env)
            scheduled = wait_for(lambda: len(runs_of(instance, **{"dagster/schedule_name": "weekly_rebuild"}))
                                 >= len(keys) - 1 and runs_of(instance, **{"dagster/schedule_name": "weekly_rebuild"}),
                                 150, "a tick of weekly_rebuild", interval=1, on_timeout=daemon.tail)
        finally:
            daemon.stop()

        (run,) = sensor_runs
        assert run.status == dg.DagsterRunStatus.SUCCESS, daemon.tail()
        assert run.job_name == "rebuild_template"
        assert run.tags["dagster/partition"] == KEY
        assert run.tags["packer-assets/trigger"] == "iso-change"
        assert latest_observed_version(instance, KEY) == f"sha256:{new}"
        built = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=sensors.BUILT_ASSET,
                                                                      asset_partitions=[KEY]), limit=1).records
        assert built and built[0].run_id == run.run_id  # the template of the new ISO, built by that run

        # One tick of the schedule: one queued rebuild per key that needs one (KEY is up to date: no run),
        # each with the tick's run key.
        tick = [r for r in scheduled if r.tags["dagster/tick"] == scheduled[0].tags["dagster/tick"]]
        assert sorted(r.tags["dagster/partition"] for r in tick) == sorted(k for k in keys if k != KEY)
        assert {r.job_name for r in tick} == {"rebuild_template"}
        assert {r.tags["packer-assets/trigger"] for r in tick} == {"weekly"}
        assert len({r.tags["dagster/run_key"] for r in tick}) == len(keys) - 1
        # The daemon creates a tick's runs, then submits each to the queue: wait out that moment.
        ids = [r.run_id for r in tick]
        tick = wait_for(lambda: (runs := [instance.get_run_by_id(i) for i in ids]) and all(
            r.status != dg.DagsterRunStatus.NOT_STARTED for r in runs) and runs, 300, "the tick's runs to be queued")
        assert {r.status for r in tick} == {dg.DagsterRunStatus.QUEUED}
