"""Dead runs: found and closed by the next run, with or without a daemon.

A run whose process was killed (`kill -9`, the OOM killer, a reboot) stays STARTED in Dagster's storage
and keeps the pool slot its `packer build` step held, until something says otherwise. The daemon's run
monitoring cannot tell with the default run launcher (it has no worker health check), and `make build`
runs without a daemon at all. So every run, at its first per-key step, looks for runs of this instance
whose worker is gone, marks each failed with the reason, frees its pool slots, and says so.

A run's worker is known by the tags the first step writes (`packer-assets/host`, `packer-assets/pid`):
the run's own process, because every job runs its steps in process (definitions.py; a test pins it).
A run that died before writing them is judged only on a single-host (SQLite) instance, by the PID of
the process that reported its start. A PID now held by a process that started after the run did
counts as gone (PIDs are reused).
"""

import os
import socket

import dagster as dg
from dagster._core.events import DagsterEventType

from packer_assets.runs.procs import process_alive

HOST_TAG = "packer-assets/host"
PID_TAG = "packer-assets/pid"
UNFINISHED = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
_recovered: set[str] = set()  # runs whose first step did this already


def _worker(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The PID of the run's worker on this host, or None when it runs elsewhere or is unknown."""
    if HOST_TAG in run.tags:
        return int(run.tags[PID_TAG]) if run.tags[HOST_TAG] == socket.gethostname() else None
    if type(instance.run_storage).__name__ != "SqliteRunStorage":
        return None  # several hosts may share the storage: leave it to the daemon's monitoring
    started = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)
    return started[-1].dagster_event.pid if started and started[-1].dagster_event else None


def reap_dead_runs(instance: dg.DagsterInstance, this_run_id: str) -> list[str]:
    """Close the runs of this instance whose worker process is gone; one line per run closed."""
    closed = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=UNFINISHED)):
        run = record.dagster_run
        if run.run_id == this_run_id:
            continue
        pid = _worker(instance, run)
        started = record.start_time or record.create_timestamp.timestamp()
        if pid is None or process_alive(pid, started_before=started):
            continue
        reason = (
            f"packer-assets: the process of run {run.run_id} (pid {pid} on {socket.gethostname()}) is gone "
            "without finishing the run (killed?); closed by run " + this_run_id
        )
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message=reason)
        else:
            instance.report_run_failed(run, message=reason)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        partition = run.tags.get("dagster/partition", "-")
        closed.append(
            f"run {run.run_id} ({run.job_name}, partition {partition}, pid {pid}) died without "
            f"finishing: marked {'canceled' if run.status == dg.DagsterRunStatus.CANCELING else 'failed'}"
            ", its pool slots freed"
        )
    return closed


def recover(context: dg.AssetExecutionContext) -> None:
    """At a run's first step: record which process on which host executes it, then close dead runs and
    say what was closed."""
    run_id = context.run.run_id
    if run_id in _recovered:
        return
    _recovered.add(run_id)
    context.instance.add_run_tags(run_id, {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
    for line in reap_dead_runs(context.instance, run_id):
        context.log.warning(line)
