"""Notifications under `dagster-daemon run`, for runs however started: a failed run executed from a terminal
(`dagster job execute`, what `make build` runs; `dagster asset materialize`) has no remote job origin, a
launched one (`dagster job launch`, the UI) has; each is posted exactly once.

No lab: the `registry` job fails at once in an output root without `.env.proxmox`.
"""

import subprocess

import dagster as dg
import pytest
from dagster._core.scheduler.instigation import InstigatorType, TickStatus
from support.dagster_procs import BIN, REPO, Proc, dagster_cli, dagster_env, wait_for
from support.webhooks import Receiver

pytestmark = pytest.mark.e2e

MODULE = ["-m", "packer_assets.definitions"]
SENSOR = "notify_on_failure"


def ticks(instance) -> list:
    """The sensor's ticks, newest first ([] before its first)."""
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.name == SENSOR:
            return list(instance.get_ticks(state.instigator_origin_id, state.selector_id))
    return []


def finished(tick) -> bool:
    return tick.status in (TickStatus.SUCCESS, TickStatus.SKIPPED, TickStatus.FAILURE)


def executed_and_failed(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([str(BIN / "dagster"), *args, *MODULE], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0, result.stderr[-2000:]  # the run's failure: the three failed runs, below


@pytest.mark.timeout(1620)  # its own waits add up to 1560 s
def test_each_failed_run_is_posted_once_however_started(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    receiver = Receiver()
    env = dagster_env(home, {"PACKER_ASSETS_ROOT": str(tmp_path / "root"),
                             "PACKER_ASSETS_WEBHOOKS": f"json:{receiver.url('/hooks/secret-token')}"})
    env.pop("PACKER_ASSETS_ENV_FILE", None)
    (tmp_path / "root").mkdir()
    # the instance's storage made here first: a daemon and its code server creating it at once race
    with dg.DagsterInstance.from_config(str(home)) as instance:
        daemon = Proc.start("daemon", [str(BIN / "dagster-daemon"), "run", *MODULE], env, tmp_path / "logs")
        try:
            # the sensor's first tick starts its cursor at the newest run event: runs before it go unseen
            wait_for(lambda: any(finished(t) for t in ticks(instance)), 180, f"the first tick of {SENSOR}",
                     interval=0.5, on_timeout=daemon.tail)
            executed_and_failed(["job", "execute", "-j", "registry"], env)
            executed_and_failed(["asset", "materialize", "--select", "template_registry"], env)
            dagster_cli(["job", "launch", "-j", "registry", *MODULE], env)
            failed = wait_for(lambda: len(runs := instance.get_runs(dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.FAILURE]))) == 3 and runs, 300, "three failed runs",
                on_timeout=daemon.tail)
            wait_for(lambda: len(receiver.posts) >= 3, 180, "three posts", interval=0.5, on_timeout=daemon.tail)
            # Then one more finished tick of the sensor: whatever it would post twice, it has posted by then.
            seen = ticks(instance)[0].tick_id
            wait_for(lambda: any(finished(t) and t.tick_id > seen for t in ticks(instance)), 180,
                     f"a later tick of {SENSOR}", interval=0.5, on_timeout=daemon.tail)
            assert not [t for t in ticks(instance) if t.status == TickStatus.FAILURE], daemon.tail()
        finally:
            daemon.stop()
            receiver.close()

    posted = sorted(body["run_id"] for _, body in receiver.posts)
    assert posted == sorted(run.run_id for run in failed)
    by_origin = {run.run_id: run.remote_job_origin is not None for run in failed}
    assert sorted(by_origin.values()) == [False, False, True]  # two executed from a terminal, one launched
    assert {body["event"] for _, body in receiver.posts} == {"failed"}
