"""Definitions load time with catalogs of 5, 50 and 500 keys, as a ratio to the 5-key case (issue 8, item 5).

    .venv/bin/python bench/definitions_load.py [--keys 5 50 500] [--repeat 7] [--validate-repeat 3] [--no-validate]

For each size a synthetic catalog (bench/_catalogs.py) is written and PACKER_ASSETS_CATALOG points at
it. Every measurement is a fresh Python process (imports are not cached between runs; the OS page
cache is warm after the first), median of --repeat:
  import+graph  `import packer_assets.definitions` then `defs.resolve_asset_graph()`, timed inside the
                process (what a code server does before it can answer);
  +jobs         the same plus `defs.resolve_all_job_defs()`;
  catalog       one more `load_catalog()` in that process, warm (the catalog's own share of the load);
  validate      wall time of `dagster definitions validate -m packer_assets.definitions` (a CLI process,
                its interpreter start-up included; DAGSTER_HOME is a temporary directory).
Target: the 500-key load under 2x the 5-key one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TIMER = """
import json, time
t0 = time.perf_counter()
import packer_assets.definitions as d
d.defs.resolve_asset_graph()
t1 = time.perf_counter()
d.defs.resolve_all_job_defs()
t2 = time.perf_counter()
from packer_assets.catalog import load_catalog
n = len(load_catalog())
t3 = time.perf_counter()
print(json.dumps({"graph": t1 - t0, "jobs": t2 - t0, "catalog": t3 - t2, "keys": n}))
"""


def run_timer(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", TIMER], env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"definitions did not load:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_validate(env: dict[str, str]) -> float | None:
    dagster = Path(sys.executable).with_name("dagster")
    start = time.perf_counter()
    out = subprocess.run([str(dagster), "definitions", "validate", "-m", "packer_assets.definitions"], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        print(f"  dagster definitions validate failed (rc {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
        return None
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    from _catalogs import write_catalog

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[5, 50, 500])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--validate-repeat", type=int, default=3)
    parser.add_argument("--no-validate", action="store_true", help="skip `dagster definitions validate`")
    args = parser.parse_args(argv)
    sizes = sorted(args.keys)
    rows = []
    with tempfile.TemporaryDirectory(prefix="defs-bench-") as tmp:
        home = Path(tmp) / "dagster_home"
        home.mkdir()
        for keys in sizes:
            catalog = write_catalog(Path(tmp) / f"catalog-{keys}.yaml", keys)
            # set (even blank) wins over env files; no lab env file, so every machine loads the same
            env = {**os.environ, "PACKER_ASSETS_CATALOG": str(catalog), "PACKER_ASSETS_ISO_MIRROR": "",
                   "DAGSTER_HOME": str(home), "PYTHONWARNINGS": "ignore"}
            env.pop("PACKER_ASSETS_ENV_FILE", None)
            run_timer(env)  # warm the page cache and the .pyc files
            runs = [run_timer(env) for _ in range(args.repeat)]
            assert all(r["keys"] == keys for r in runs)
            validate = None
            if not args.no_validate:
                times = [run_validate(env) for _ in range(args.validate_repeat)]
                validate = median(times) if None not in times else None
            rows.append({"keys": keys, "graph": median([r["graph"] for r in runs]),
                         "jobs": median([r["jobs"] for r in runs]), "catalog": median([r["catalog"] for r in runs]),
                         "validate": validate})
    print(f"definitions load, fresh process each, median of {args.repeat} (validate: of {args.validate_repeat}); "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'keys':>5} {'import+graph':>13} {'ratio':>6} {'+jobs':>7} {'ratio':>6} {'catalog':>8} {'validate':>9} "
          f"{'ratio':>6}")
    base = rows[0]
    for r in rows:
        validate = f"{r['validate']:>8.3f}s {r['validate'] / base['validate']:>5.2f}x" if (
            r["validate"] and base["validate"]) else f"{'-':>9} {'-':>6}"
        print(f"{r['keys']:>5} {r['graph']:>12.3f}s {r['graph'] / base['graph']:>5.2f}x {r['jobs']:>6.3f}s "
              f"{r['jobs'] / base['jobs']:>5.2f}x {r['catalog'] * 1000:>6.1f}ms {validate}")
    big = rows[-1]
    ratio = big["graph"] / base["graph"]
    print(f"\n{big['keys']}-key load {ratio:.2f}x the {base['keys']}-key one (target < 2x): "
          f"{'meets' if ratio < 2 else 'MISSES'} the target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
