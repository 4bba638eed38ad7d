"""Parallel scaling: 8 keys under pool limits 1, 2 and 4, through the real queued run coordinator and
`dagster-daemon` (issue 8, item 3).

    .venv/bin/python bench/parallel_scaling.py [--limits 1 2 4] [--keys 8] [--multiprocess] [--dequeue-threads N]
                                               [--timeline]

For each limit, a fresh lab (bench/_lab.py) with a catalog of 9 clones of the shipped debian-12 entry
(`deb-00`..`deb-08`: distinct keys, VMID ranges and ISO names; all templates/debian), a project that
ran proxmox_env, and a DAGSTER_HOME holding the repo's dagster.yaml (QueuedRunCoordinator, one run per
key, pool `packer_builds` at op granularity) with `concurrency.pools.default_limit` set to the limit,
plus a workspace.yaml loading `packer_assets.definitions`. `dagster-daemon run` is started on it (it
starts the code server and launches queued runs with the default run launcher: one run worker process
per run, and the definitions' executor inside it).
  one build  `deb-08` alone: `dagster job backfill -j rebuild_template --partitions deb-08`, submission
             to the run's end (and the run's own start..end): the "one build" of the ideal;
  8 keys     `dagster job backfill -j rebuild_template --partitions deb-00,..,deb-07`: submission to the
             last run's end (and first run start .. last run end).
A /proc sampler (50 ms) under the daemon counts `packer build` processes alive at once: it must never
exceed the limit. Ideal = ceil(8 / limit) x one build (run start..end); the ratio measured / ideal.
CPU seconds: every process under the daemon during the 8-key phase (sampled), per run.
--dequeue-threads N: the run coordinator launches queued runs from N threads (`dequeue_use_threads`,
`dequeue_num_workers`), which the repo's dagster.yaml does not set: by default the daemon launches one run
at a time, and each run worker's start (a Python process importing Dagster and the definitions) paces it.
--multiprocess: the code location is bench/_defs_multiprocess.py (the project's definitions with Dagster's
default executor, a process per step), the "before" of the project's in-process executor.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _lab import BIN, REPO, BenchLab, TreeSampler, dagster_home, debian_clones, wait_until  # noqa: E402

JOB = "rebuild_template"
POOL = "packer_builds"


def workspace(home: Path, multiprocess: bool = False) -> Path:
    path = home / "workspace.yaml"
    target = (f"  - python_file:\n      relative_path: {HERE / '_defs_multiprocess.py'}\n" if multiprocess
              else "  - python_module:\n      module_name: packer_assets.definitions\n")
    path.write_text(f"load_from:\n{target}      working_directory: {REPO}\n      location_name: packer_assets\n")
    return path


class Daemon:
    def __init__(self, env: dict[str, str], ws: Path, log: Path):
        self.log = open(log, "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(ws)], env=env, cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def tail(self, lines: int = 30) -> str:
        text = Path(self.log.name).read_text(errors="replace").splitlines()
        return "\n".join(line for line in text if "BetaWarning" not in line and "CodeReference" not in line)[-4000:]

    def stop(self) -> None:
        """SIGTERM to the process group this started (the daemon, its code server, run workers), then SIGKILL."""
        import signal

        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


def backfill(env: dict[str, str], ws: Path, keys: list[str]) -> None:
    done = subprocess.run([str(BIN / "dagster"), "job", "backfill", "-j", JOB, "-w", str(ws), "--partitions",
                           ",".join(keys), "--noprompt"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"dagster job backfill exited {done.returncode}:\n{done.stdout}\n{done.stderr}")


def wait_runs(instance, keys: list[str], timeout: float):
    import dagster as dg

    terminal = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}

    def finished():
        records = [r for r in instance.get_run_records(dg.RunsFilter(job_name=JOB))
                   if r.dagster_run.tags.get("dagster/partition") in keys]
        return len(records) == len(keys) and all(r.dagster_run.status in terminal for r in records) and records

    records = wait_until(finished, timeout, f"{len(keys)} runs of {JOB}", interval=0.2)
    failed = [r.dagster_run.tags["dagster/partition"] for r in records
              if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS]
    if failed:
        from dagster._core.events import DagsterEventType

        why = []
        for r in records:
            if r.dagster_run.status != dg.DagsterRunStatus.SUCCESS:
                for e in instance.all_logs(r.dagster_run.run_id, of_type={DagsterEventType.STEP_FAILURE,
                                                                          DagsterEventType.RUN_FAILURE}):
                    data = e.dagster_event.event_specific_data
                    error = getattr(data, "error", None)
                    why.append(f"{r.dagster_run.tags['dagster/partition']}: {e.message} "
                               f"{error.to_string()[-1500:] if error else ''}")
        raise RuntimeError(f"runs failed for {failed}:\n" + "\n".join(why))
    return records


def pool_step_intervals(instance, records) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(template step start..end, ready..end) per run; ready = every upstream step of the run succeeded, so
    from then on the run wanted a pool slot: the overlap of those says whether the limit was ever tested."""
    from dagster._core.events import DagsterEventType

    steps, ready = [], []
    for r in records:
        events = instance.all_logs(r.dagster_run.run_id,
                                   of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS})
        t = {e.dagster_event.event_type: e.timestamp for e in events if e.step_key == "template"}
        upstream = [e.timestamp for e in events if e.step_key in ("unattended_files", "staged_iso")
                    and e.dagster_event.event_type == DagsterEventType.STEP_SUCCESS]
        steps.append((t[DagsterEventType.STEP_START], t[DagsterEventType.STEP_SUCCESS]))
        ready.append((max(upstream), t[DagsterEventType.STEP_SUCCESS]))
    return steps, ready


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    best = cur = 0
    for _t, d in points:
        cur += d
        best = max(best, cur)
    return best


def measure(limit: int, n: int, tmp: Path, multiprocess: bool = False, dequeue_threads: int = 0) -> dict:
    import dagster as dg

    lab = BenchLab.start(tmp, debian_clones(n + 1, tmp / "catalog.yaml"))
    home = dagster_home(tmp / "dagster_home", pool_limit=limit, dequeue_threads=dequeue_threads)
    ws = workspace(home, multiprocess)
    env = lab.process_env(home)
    daemon = Daemon(env, ws, tmp / "daemon.log")
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance, \
                TreeSampler(roots=lambda: {daemon.proc.pid}) as sampler:
            wait_until(lambda: instance.get_daemon_heartbeats().get("QUEUED_RUN_COORDINATOR"), 120,
                       "the daemon's run coordinator heartbeat")
            solo_key, keys = f"deb-{n:02d}", [f"deb-{i:02d}" for i in range(n)]
            t = time.time()
            backfill(env, ws, [solo_key])
            solo = wait_runs(instance, [solo_key], 600)[0]
            solo_submit = time.time() - t
            solo_builds = sampler.max_builds
            sampler.max_builds = 0
            cpu_before = sampler.cpu_seconds
            t = time.time()
            backfill(env, ws, keys)
            records = wait_runs(instance, keys, 1800)
            wall = time.time() - t
            cpu = sampler.cpu_seconds - cpu_before
            steps, ready = pool_step_intervals(instance, records)
            t0 = min(r.create_timestamp.timestamp() for r in records)
            timeline = sorted((r.dagster_run.tags["dagster/partition"], r.create_timestamp.timestamp() - t0,
                               r.start_time - t0, r.end_time - t0, s - t0, e - t0)
                              for r, (s, e) in zip(records, steps))
        seen = len(sampler.builds_seen)
    except BaseException:
        print(f"daemon log ({daemon.log.name}):\n{daemon.tail()}", file=sys.stderr)
        raise
    finally:
        daemon.stop()
        lab.stop()
    return {"limit": limit, "solo_submit": solo_submit, "solo_run": solo.end_time - solo.start_time,
            "solo_builds": solo_builds, "wall": wall,
            "span": max(r.end_time for r in records) - min(r.start_time for r in records),
            "max_builds": sampler.max_builds, "builds_seen": seen, "max_steps": max_overlap(steps),
            "max_ready": max_overlap(ready),
            "packer_step": sorted(e - s for s, e in steps)[len(steps) // 2], "timeline": timeline,
            "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--timeline", action="store_true", help="print each run's queued/start/end times")
    parser.add_argument("--dequeue-threads", type=int, default=0, metavar="N",
                        help="run_coordinator config dequeue_use_threads + dequeue_num_workers N (not in dagster.yaml)")
    parser.add_argument("--multiprocess", action="store_true",
                        help="Dagster's multiprocess executor (bench/_defs_multiprocess.py) instead of the project's")
    args = parser.parse_args()
    n = args.keys
    print(f"# parallel_scaling: {n} keys, limits {args.limits}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          "real QueuedRunCoordinator + dagster-daemon (default run launcher), SQLite instance; executor: "
          + ("multiprocess (bench/_defs_multiprocess.py)" if args.multiprocess else "the project's (in-process)")
          + (f"; queued runs launched from {args.dequeue_threads} threads" if args.dequeue_threads else ""))
    rows = []
    for limit in args.limits:
        with tempfile.TemporaryDirectory(prefix=f"bench-scaling-{limit}-") as tmp:
            row = measure(limit, n, Path(tmp), args.multiprocess, args.dequeue_threads)
        rows.append(row)
        print(f"limit {limit}: {n} keys in {row['wall']:.1f}s (one build: run {row['solo_run']:.1f}s, "
              f"submitted-to-done {row['solo_submit']:.1f}s); max packer builds at once {row['max_builds']}",
              flush=True)
        if args.timeline:
            print("  key: queued, run start, run end, template step start, end (s after the first run was queued)")
            for key, *times in row["timeline"]:
                print(f"  {key}: " + ", ".join(f"{x:6.1f}" for x in times))

    executor = "multiprocess" if args.multiprocess else "in-process"
    print(f"\n## Item 3: parallel scaling ({n} keys, {executor} executor)\n")
    print("| pool limit | one build (run) | ideal ceil(8/limit) x one | 8 keys: submit to done | 8 keys: first run "
          "start .. last end | measured / ideal | template step (median) | max packer builds at once "
          "| max template steps at once | max builds ready at once | packer builds seen (incl. the one build) "
          "| CPU s per run |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ideal = math.ceil(n / r["limit"]) * r["solo_run"]
        print(f"| {r['limit']} | {r['solo_run']:.1f} s | {ideal:.1f} s | {r['wall']:.1f} s | {r['span']:.1f} s | "
              f"{r['span'] / ideal:.2f}x | {r['packer_step']:.1f} s | {r['max_builds']} | {r['max_steps']} | "
              f"{r['max_ready']} | "
              f"{r['builds_seen']} | {r['cpu'] / n:.1f} |")
    for r in rows:
        ok = r["max_builds"] <= r["limit"] and r["max_steps"] <= r["limit"]
        tested = "the limit held builds back" if r["max_ready"] > r["limit"] else (
            f"never more than {r['max_ready']} builds ready at once, so the limit was not what held them back")
        print(f"limit {r['limit']}: at most {r['max_builds']} packer builds and {r['max_steps']} template steps at "
              f"once: {'within the limit' if ok else 'OVER THE LIMIT'}; {tested}")


if __name__ == "__main__":
    main()
