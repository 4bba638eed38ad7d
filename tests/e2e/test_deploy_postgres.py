"""deploy/ for real: PostgreSQL, a gRPC code server and `dagster-daemon run` as separate processes.

A backfill of several keys, plus a second run of one key, goes through the queued run coordinator
of deploy/dagster.yaml; the daemon launches the runs against the lab. The limits are proven by
construction, not by luck of timing: the lab guest holds every build at its first provisioner
command (a gate the test controls) until all the other keys' builds are queued and blocked by the
pool, and no more builds than the limit may ever reach the gate. Asserted from what happened:
- the `packer build` processes alive at once (sampled from /proc) never exceed the pool limit;
- the pool step's execution intervals (from the event log in Postgres) agree, and every build held
  back by the pool started only after another build had finished;
- the two runs of one key never overlap (tag limit on dagster/partition).
The pool limit is set to 1 with the documented `dagster instance concurrency set` (it wins over the
file's default_limit of 2). Raise POOL_LIMIT in the CLI call alone and the gate sees two builds: the test fails.
"""

import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType
from support.dagster_procs import (
    BIN,
    REPO,
    Proc,
    dagster_cli,
    dagster_env,
    free_port,
    max_overlap,
    port_open,
    wait_for,
)
from support.packer import BuildGate

from packer_assets_lab.proctree import TreeSampler

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.lab, pytest.mark.packer]

# The code location and job under test: the project's own rebuild job, whose template[key] step runs
# `packer build` (Debian's packer against the lab) in pool packer_builds.
CODE = ["-m", "packer_assets.definitions"]
JOB = "rebuild_template"
POOL_STEP = "template"

POOL = "packer_builds"
POOL_LIMIT = 1
KEYS = ["ubuntu-2204", "ubuntu-2404", "debian-12", "rocky-9"]
REPEATED = "ubuntu-2204"  # submitted a second time while the first run may still be going
OUTPUT = REPO / "test-output"
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def deploy_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy/dagster.yaml", home / "dagster.yaml")
    shutil.copy(REPO / "deploy/workspace.yaml", home / "workspace.yaml")
    return home


@pytest.fixture
def deployment(lab_project, postgres_server, tmp_path, monkeypatch):
    """Postgres + code server + daemon, configured only by deploy/'s files and DAGSTER_PG_*/DAGSTER_CODE_*."""
    pg = postgres_server.create_database(f"deploy_{tmp_path.name[-12:].replace('-', '_')}".lower())
    home = deploy_home(tmp_path)
    code_port = free_port()
    extra = {**pg.env(), "DAGSTER_CODE_HOST": "127.0.0.1", "DAGSTER_CODE_PORT": str(code_port)}
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    env = dagster_env(home, extra)
    logs = tmp_path / "logs"
    procs = []
    try:
        code = Proc.start("code-server", [str(BIN / "dagster"), "code-server", "start", *CODE, "-h", "127.0.0.1",
                                          "-p", str(code_port), "--location-name", "packer_assets"], env, logs)
        procs.append(code)
        wait_for(lambda: port_open(code_port) or not code.alive(), 60, "the code server's port", on_timeout=code.tail)
        assert code.alive(), code.tail()
        daemon = Proc.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(home / "workspace.yaml")],
                            env, logs)
        procs.append(daemon)
        with dg.DagsterInstance.from_config(str(home)) as instance:  # the Postgres instance, as deployed
            yield home, env, instance, procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def run_records(instance):
    return instance.get_run_records(dg.RunsFilter(job_name=JOB))


@pytest.mark.timeout(1980)  # its own waits add up to 1921 s
def test_daemon_runs_keys_within_the_pool_and_one_run_per_key(deployment, lab_project):
    home, env, instance, procs = deployment
    gate = lab_project.stack.guest.exec_handler = BuildGate()
    code, daemon = procs
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    workspace = ["-w", str(home / "workspace.yaml")]
    dagster_cli(["instance", "concurrency", "set", POOL, str(POOL_LIMIT)], env)
    assert instance.event_log_storage.get_concurrency_info(POOL).limit == POOL_LIMIT
    with TreeSampler(roots=lambda: {code.pid, daemon.pid}, memory=False) as watch:
        dagster_cli(["job", "backfill", "-j", JOB, *workspace, "--partitions", ",".join(KEYS), "--noprompt"], env)
        dagster_cli(["job", "backfill", "-j", JOB, *workspace, "--partitions", REPEATED, "--noprompt"], env)
        total = len(KEYS) + 1

        def state() -> str:
            return "\n".join([f"builds at the gate: {gate.waiting}",
                              str([(r.dagster_run.tags.get("dagster/partition"), r.dagster_run.status)
                                   for r in run_records(instance)]), code.tail(), daemon.tail()])

        def others_blocked():
            """True once one build is at the gate and every other key's build waits for the pool."""
            assert gate.most_waiting <= POOL_LIMIT, f"{gate.most_waiting} builds ran at once (pool limit {POOL_LIMIT})"
            runs = run_records(instance)
            held = {r.dagster_run.run_id for r in runs if blocked_times(instance, r.dagster_run.run_id, POOL_STEP)}
            return gate.waiting == POOL_LIMIT and len(held) >= len(KEYS) - POOL_LIMIT

        # generous: this only bounds how long a broken setup takes to fail, nothing depends on it
        wait_for(others_blocked, 600, "one build at the gate and the other keys' builds blocked by the pool",
                 interval=1, on_timeout=state)
        gate.open()

        def finished():
            records = run_records(instance)
            return len(records) == total and all(r.dagster_run.status in TERMINAL for r in records) and records

        records = wait_for(finished, 900, f"{total} runs of {JOB} to finish", interval=1, on_timeout=state)
    assert gate.most_waiting <= POOL_LIMIT, f"{gate.most_waiting} builds ran at once (pool limit {POOL_LIMIT})"
    failed = [r.dagster_run.run_id for r in records if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]
    assert not failed, "\n".join(failure_text(instance, run_id) for run_id in failed)

    by_key: dict[str, list] = {}
    for record in records:
        by_key.setdefault(record.dagster_run.tags["dagster/partition"], []).append(record)
    assert sorted(by_key) == sorted(KEYS) and len(by_key[REPEATED]) == 2

    # Pool, observed in /proc: a `packer build` for every key (the repeated key's second run finds its
    # template up to date and builds nothing), never more of them at once than the limit.
    built = {m.group(1) for _f, _l, argv in watch.seen.values() for m in [re.search(r"/work/([^/]+)/", argv[-1])] if m}
    assert built == set(KEYS), f"packer builds seen for {sorted(built)}, expected {KEYS}: {watch.seen}"
    assert watch.max_builds <= POOL_LIMIT, f"{watch.max_builds} packer builds at once (limit {POOL_LIMIT})"

    # The same from Dagster's own event log (Postgres): the pool step's start..end intervals.
    steps = {r.dagster_run.run_id: step_interval(instance, r.dagster_run.run_id, POOL_STEP) for r in records}
    assert max_overlap(list(steps.values())) <= POOL_LIMIT
    # And the limit was really tested (by construction: the gate held one build until the others were
    # blocked): each build held back started only after another build, running when it began to wait,
    # had finished.
    blocked = {run_id: blocked_times(instance, run_id, POOL_STEP) for run_id in steps}
    blocked = {run_id: min(times) for run_id, times in blocked.items() if times}
    assert len(blocked) >= len(KEYS) - POOL_LIMIT, "fewer builds waited for the pool than the gate saw"
    for run_id, since in blocked.items():
        start = steps[run_id][0]
        freed = [end for other, (_s, end) in steps.items() if other != run_id and since <= end <= start]
        assert freed, f"run {run_id}: its build waited from {since} but no other build ended before it started {start}"

    # One run per key at a time: the repeated key's second run was queued while the first was going
    # (it was submitted before the gate opened), and the two are disjoint.
    first, second = sorted(by_key[REPEATED], key=lambda r: r.start_time)
    assert second.create_timestamp.timestamp() < first.end_time
    assert first.end_time <= second.start_time, (
        f"two runs of {REPEATED} overlapped: {first.start_time}-{first.end_time} and "
        f"{second.start_time}-{second.end_time}")

    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "deploy-postgres-concurrency.json").write_text(json.dumps({
        "pool_limit": POOL_LIMIT,
        "max_packer_builds_at_once": watch.max_builds,
        "max_pool_steps_at_once": max_overlap(list(steps.values())),
        "builds_held_back_by_the_pool": len(blocked),
        "packer_builds": [{"pid": pid, "seconds": round(last - first_seen, 2)}
                          for pid, (first_seen, last, _argv) in sorted(watch.seen.items())],
        "runs": [{"key": r.dagster_run.tags["dagster/partition"], "start": r.start_time, "end": r.end_time}
                 for r in sorted(records, key=lambda r: r.start_time)],
    }, indent=2))


def step_interval(instance, run_id: str, step_key: str) -> tuple[float, float]:
    events = instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS})
    times = {e.dagster_event.event_type: e.timestamp for e in events if e.step_key == step_key}
    return times[DagsterEventType.STEP_START], times[DagsterEventType.STEP_SUCCESS]



def blocked_times(instance, run_id: str, step_key: str) -> list[float]:
    """When the step reported that the pool held it back ("Step blocked by limit for pool ...")."""
    events = instance.all_logs(run_id, of_type={DagsterEventType.ENGINE_EVENT})
    return [e.timestamp for e in events
            if e.step_key == step_key and (e.message or "").startswith(f"Step blocked by limit for pool {POOL}")]


def failure_text(instance, run_id: str) -> str:
    lines = []
    for event in instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}):
        error = getattr(event.dagster_event.event_specific_data, "error", None)
        detail = error.to_string() if error is not None else ""
        lines.append(f"{event.step_key or ''}: {event.message}\n{detail[-1500:]}")
    return f"run {run_id}:\n" + "\n".join(lines)
