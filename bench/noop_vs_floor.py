"""A no-op run of one key against Dagster's own floor, measured in the same run (issue 18, item 3).

    .venv/bin/python bench/noop_vs_floor.py [--key debian-12] [--pairs 5]

In the lab (bench/_lab.py), the key is built once; then `--pairs` rounds, each of:
  no-op   the job alone: `dagster job execute -j rebuild_template --tags '{"dagster/partition": "<key>"}'
          -m packer_assets.definitions`, nothing changed (a no-op);
  make    `make build KEY=<key>` as a user runs it (make, then `packer-assets build`: the settings and the
          key checked, then that job execute in the same process; issue 25, item 8);
  floor   `dagster asset materialize` of two trivial partitioned assets (bench/_trivial_defs.py).
Each is a fresh process: wall seconds, CPU seconds (user + system of it and its children, from wait4), peak
RSS (ru_maxrss, the largest). Target: the no-op's and the make target's medians at most the floor's + 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _lab import REPO, BenchLab, dagster_home  # noqa: E402

BIN = Path(sys.executable).parent


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one process, from its own rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{out.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", default="debian-12")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="noop-floor-") as tmp:
        lab = BenchLab.start(Path(tmp))
        try:
            env = lab.process_env(dagster_home(Path(tmp) / "home"))
            build = [str(BIN / "dagster"), "job", "execute", "-j", "rebuild_template", "-m", "packer_assets.definitions",
                     "--tags", f'{{"dagster/partition": "{args.key}"}}']
            make = ["make", "--no-print-directory", "-C", str(REPO), "build", f"KEY={args.key}"]
            floor = [str(BIN / "dagster"), "asset", "materialize", "--select", "first,second", "--partition", "debian-12",
                     "-f", str(HERE / "_trivial_defs.py")]
            first = timed(build, env)
            print(f"first build of {args.key}: {first[0]:.1f} s wall, {first[1]:.1f} s CPU, {first[2]:.0f} MiB peak RSS")
            noop, made, base = [], [], []
            for _ in range(args.pairs):
                noop.append(timed(build, env))
                made.append(timed(make, env))
                base.append(timed(floor, env))
        finally:
            lab.stop()
    print(f"{'':8}{'wall s':>9}{'CPU s':>9}{'peak MiB':>10}   (median of {args.pairs})")
    medians = {}
    for name, rows in (("no-op", noop), ("make", made), ("floor", base)):
        medians[name] = [statistics.median(r[i] for r in rows) for i in range(3)]
        print(f"{name:8}{medians[name][0]:9.2f}{medians[name][1]:9.2f}{medians[name][2]:10.0f}")
    for name in ("no-op", "make"):
        wall, cpu, rss = (medians[name][i] - medians["floor"][i] for i in range(3))
        ratio = medians[name][0] / medians["floor"][0]
        print(f"{name} - floor: {wall:+.2f} s wall ({ratio:.2f}x), {cpu:+.2f} s CPU, {rss:+.0f} MiB peak RSS")
        print(f"target {name} <= floor + 1 s: {'meets' if wall <= 1.0 else 'MISSES'}")


if __name__ == "__main__":
    main()
