"""Materializing a key's rebuild selection, for the build benchmarks: in a warm child process
(`dagster.materialize`), or through the CLI (`dagster asset materialize`); and what the run did
(step times from the event log, packer's time from the build record).

    python bench/_materialize.py      the child: one JSON command per stdin line, one answer per run
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _lab import BIN, REPO, BenchLab, TreeSampler  # noqa: E402

SELECT = "unattended_files,staged_iso,template,template_proof"
# Where the CLI and the daemon load the code from: the project's definitions (in-process executor), or the
# same definitions with Dagster's multiprocess executor (bench/_defs_multiprocess.py), the "before".
CODE = {"project": ["-m", "packer_assets.definitions"],
        "multiprocess": ["-f", str(HERE / "_defs_multiprocess.py")]}
STEPS = ("unattended_files", "staged_iso", "template", "template_proof")


def force_config(force: bool = True) -> dict:
    return {"ops": {"template": {"config": {"force": force}}}}


# ------------------------------------------------------------------ the in-process child


def child() -> None:
    """Reads one JSON command per line ({"key":..., "force":...}) and answers one JSON line per run."""
    t0 = time.perf_counter()
    import dagster as dg

    from packer_assets import definitions
    from packer_assets.defs import assets, jobs

    imported = time.perf_counter() - t0
    hwm_imports = _vmhwm()
    instance = dg.DagsterInstance.get()
    _reply({"ready": True, "import_s": imported, "vmhwm_kb": hwm_imports})
    for line in sys.stdin:
        cmd = json.loads(line)
        c = _cpu()
        t = time.perf_counter()
        result = dg.materialize(jobs.REBUILD_ASSETS + [assets.iso_release], selection=jobs.REBUILD_ASSETS,
                                partition_key=cmd["key"], instance=instance, resources=definitions.defs.resources,
                                run_config=force_config(cmd["force"]), raise_on_error=False)
        seconds = time.perf_counter() - t
        cpu = _cpu() - c
        errors = [e.message for e in result.all_events if e.is_failure]
        _reply({"seconds": seconds, "success": result.success, "run_id": result.run_id, "errors": errors[:3],
                "vmhwm_kb": _vmhwm(), "cpu_s": cpu})


def _cpu() -> float:
    """User + system CPU seconds of this process and its waited-for children (packer)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


MARK = "@@bench "


def _reply(obj: dict) -> None:
    """One answer line; the build's own output (packer lines echoed by the build log) shares stdout."""
    print(MARK + json.dumps(obj), flush=True)


def _vmhwm(pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class InProcess:
    def __init__(self, env: dict[str, str], log: Path):
        self.log = open(log, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen([sys.executable, __file__], env=env, cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.ready = self._answer()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"the in-process child exited ({self.proc.wait()}); see {self.log.name}")

    def run(self, key: str, force: bool = True) -> dict:
        self.proc.stdin.write(json.dumps({"key": key, "force": force}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)
        self.log.close()


# ------------------------------------------------------------------ the three ways


def run_cli(env: dict[str, str], key: str, force: bool = True, extra_config: dict | None = None,
            code: str = "project") -> tuple[float, subprocess.CompletedProcess, TreeSampler]:
    """`dagster asset materialize` of the key's rebuild selection, timed from process start to exit, its
    process tree sampled (sampler.root_pid is the CLI's pid)."""
    config = {**force_config(force), **(extra_config or {})}
    argv = [str(BIN / "dagster"), "asset", "materialize", "--select", SELECT, "--partition", key,
            *CODE[code], "--config-json", json.dumps(config)]
    pid = {}
    with TreeSampler(roots=lambda: set(pid.values())) as sampler:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pid["cli"] = proc.pid
        out, _ = proc.communicate()
        seconds = time.perf_counter() - t
    done = subprocess.CompletedProcess(argv, proc.returncode, out, "")
    sampler.root_pid = proc.pid
    if proc.returncode != 0:
        raise RuntimeError(f"dagster asset materialize exited {proc.returncode}:\n{out[-3000:]}")
    return seconds, done, sampler


# ------------------------------------------------------------------ reading what happened


def step_seconds(instance, run_id: str) -> dict[str, float]:
    from dagster._core.events import DagsterEventType

    events = instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS,
                                                DagsterEventType.RUN_START, DagsterEventType.RUN_SUCCESS})
    start, end = {}, {}
    for e in events:
        kind = e.dagster_event.event_type
        if kind == DagsterEventType.STEP_START:
            start[e.step_key] = e.timestamp
        elif kind == DagsterEventType.STEP_SUCCESS:
            end[e.step_key] = e.timestamp
        elif kind == DagsterEventType.RUN_START:
            start["<run>"] = e.timestamp
        elif kind == DagsterEventType.RUN_SUCCESS:
            end["<run>"] = e.timestamp
    return {k: end[k] - start[k] for k in start if k in end}


def packer_in_pipeline(lab: BenchLab, key: str) -> dict[str, float]:
    import json

    from packer_assets.build.pipeline import RECORD
    from packer_assets.evidence.layout import Layout

    record = Layout(lab.root).build_log_dir(key, "latest") / RECORD  # the build just run
    return json.loads(record.read_text())["timings"]["stages"] if record.is_file() else {}


if __name__ == "__main__":
    child()
