"""Cost of one iso_checksum_sensor tick with 10, 100 and 500 keys against the lab mirror (issue 8, items 4 and 7).

    .venv/bin/python bench/sensor_tick.py [--keys 10 100 500] [--repeat 7] [--per-file 4] [--gc-freeze]

For each size: a synthetic catalog (bench/_catalogs.py) and a lab IsoMirror on loopback serving its
ISOs and checksum files. The real sensor function `iso_checksum_sensor` runs in a child process
(PACKER_ASSETS_CATALOG and PACKER_ASSETS_ISO_MIRROR point it at them) through
`dagster.build_sensor_context` with a test instance, carrying its cursor from tick to tick:
  first      the first tick (empty cursor): every checksum file fetched (200), every key observed;
  unchanged  nothing changed: one conditional request per checksum file, all 304 (median of --repeat);
  one change mirror.publish(one key) before the tick: that file answers 200, one run requested
             (median of --repeat, a different key each time).
The mirror runs in this process and counts the requests; the child reports the tick's wall time and
its own peak RSS (VmHWM, item 7), so the figures are the sensor's, not the mirror's.
"Growth vs linear" is (t_N / t_smallest) / (N / smallest): 1.0 is linear, below 1 is better.
Targets: unchanged 500-key tick under 5 s; growth no worse than linear.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(gc_freeze: bool) -> int:
    """Run sensor ticks on request: one line `tick` on stdin -> one JSON line on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # keep the protocol channel clean
    import dagster as dg

    import tempfile

    from packer_assets.defs.resources import ProjectSettings
    from packer_assets.defs.sensors import build_iso_checksum_sensor

    iso_checksum_sensor = build_iso_checksum_sensor(3600)
    project = ProjectSettings(output_root=tempfile.mkdtemp(prefix="sensor-tick-"))  # the observed checksums' file

    if gc_freeze:  # what `gc.collect(); gc.freeze()` at the end of definitions.py would do
        import gc

        gc.collect()
        gc.freeze()

    with dg.instance_for_test() as instance:
        cursor = None
        print(json.dumps({"ready": True, "rss_kib": _status_kib("VmRSS"), "hwm_kib": _status_kib("VmHWM")}),
              file=out, flush=True)
        for line in sys.stdin:
            if line.strip() != "tick":
                break
            context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"project": project})
            start = time.perf_counter()
            result = iso_checksum_sensor(context)
            seconds = time.perf_counter() - start
            cursor = result.cursor
            print(json.dumps({"seconds": seconds, "runs": len(result.run_requests),
                              "observations": len(result.asset_events),
                              "rss_kib": _status_kib("VmRSS"), "hwm_kib": _status_kib("VmHWM")}),
                  file=out, flush=True)
    return 0


class Child:
    def __init__(self, env: dict[str, str], gc_freeze: bool):
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", *(["--gc-freeze"] if gc_freeze else [])], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     cwd=HERE.parent)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sensor child exited early (rc {self.proc.wait()}); run it with --child to see why")
        return json.loads(line)

    def tick(self, mirror) -> dict:
        before = mirror.hits.copy()
        self.proc.stdin.write("tick\n")
        self.proc.stdin.flush()
        got = self._read()
        statuses: Counter[int] = Counter()
        for (_path, status), n in (mirror.hits - before).items():
            statuses[status] += n
        got["requests"] = dict(sorted(statuses.items()))
        return got

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def measure(keys: int, repeat: int, per_file: int, tmp: Path, gc_freeze: bool) -> dict:
    from _catalogs import mirror_items_for, write_catalog

    from packer_assets_lab.mirror import IsoMirror

    catalog = write_catalog(tmp / f"catalog-{keys}.yaml", keys, per_file)
    items = mirror_items_for(catalog)
    with IsoMirror(tmp / f"mirror-{keys}", items) as mirror:
        env = {**os.environ, "PACKER_ASSETS_CATALOG": str(catalog), "PACKER_ASSETS_ISO_MIRROR": mirror.base_url,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
        child_proc = Child(env, gc_freeze)
        try:
            first = child_proc.tick(mirror)
            unchanged = [child_proc.tick(mirror) for _ in range(repeat)]
            changed = []
            for n in range(repeat):
                mirror.publish(items[(n * 7 + 1) % len(items)].key)
                changed.append(child_proc.tick(mirror))
        finally:
            child_proc.close()
    files = len({i.checksum_path for i in items})
    return {"keys": keys, "files": files, "first": first, "unchanged": unchanged, "changed": changed,
            "import": child_proc.ready, "hwm_kib": max(t["hwm_kib"] for t in [first, *unchanged, *changed])}


def median_s(ticks: list[dict]) -> float:
    return statistics.median(t["seconds"] for t in ticks)


def fmt_requests(req: dict) -> str:
    return " ".join(f"{n}x{status}" for status, n in req.items()) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--repeat", type=int, default=7, help="unchanged and one-change ticks per size (median)")
    parser.add_argument("--per-file", type=int, default=4, help="keys sharing one checksum file")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.collect(); gc.freeze() in the sensor process after its imports (see bench/README.md)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.gc_freeze)
    sizes = sorted(args.keys)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sensor-bench-") as tmp:
        for keys in sizes:
            rows.append(measure(keys, args.repeat, args.per_file, Path(tmp), args.gc_freeze))
    print(f"iso_checksum_sensor tick, lab mirror on loopback, {args.per_file} keys per checksum file, "
          f"median of {args.repeat} (first tick: once){', gc frozen after imports' if args.gc_freeze else ''}; python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'keys':>5} {'files':>5} {'tick':<10} {'seconds':>8} {'ms/key':>7} {'requests':<14} {'runs':>4} "
          f"{'obs':>4}")
    for r in rows:
        for label, ticks in (("first", [r["first"]]), ("unchanged", r["unchanged"]), ("one change", r["changed"])):
            seconds = median_s(ticks)
            sample = ticks[len(ticks) // 2]
            print(f"{r['keys']:>5} {r['files']:>5} {label:<10} {seconds:>8.3f} {seconds / r['keys'] * 1000:>7.2f} "
                  f"{fmt_requests(sample['requests']):<14} {sample['runs']:>4} {sample['observations']:>4}")
    base = rows[0]
    print(f"\ngrowth vs linear (t_N / t_{base['keys']}) / (N / {base['keys']}); 1.0 = linear, below = sublinear")
    for r in rows[1:]:
        scale = r["keys"] / base["keys"]
        parts = []
        for label, key in (("first", "first"), ("unchanged", "unchanged"), ("one change", "changed")):
            ticks_n = [r[key]] if key == "first" else r[key]
            ticks_b = [base[key]] if key == "first" else base[key]
            parts.append(f"{label} {median_s(ticks_n) / median_s(ticks_b) / scale:.2f}")
        print(f"{r['keys']:>5} keys (x{scale:g}): " + ", ".join(parts))
    if len(rows) > 2:
        print("step by step (t_N / t_previous) / (N / previous)")
        for prev, r in zip(rows[1:], rows[2:]):
            scale = r["keys"] / prev["keys"]
            print(f"{r['keys']:>5} keys vs {prev['keys']} (x{scale:g}): unchanged "
                  f"{median_s(r['unchanged']) / median_s(prev['unchanged']) / scale:.2f}, one change "
                  f"{median_s(r['changed']) / median_s(prev['changed']) / scale:.2f}")
    print("\npeak RSS of the sensor process (VmHWM; after imports -> after the ticks)")
    for r in rows:
        print(f"{r['keys']:>5} keys: {r['import']['hwm_kib'] / 1024:.0f} MiB -> {r['hwm_kib'] / 1024:.0f} MiB")
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"largest sensor child by getrusage(RUSAGE_CHILDREN).ru_maxrss: {children_kib / 1024:.0f} MiB")
    big = rows[-1]
    t_big = median_s(big["unchanged"])
    growth = max(median_s(r["unchanged"]) / median_s(base["unchanged"]) / (r["keys"] / base["keys"])
                 for r in rows[1:]) if len(rows) > 1 else 0
    verdict = "meets" if t_big < 5 and growth <= 1 else "MISSES"
    print(f"\nunchanged {big['keys']}-key tick {t_big:.3f} s (target < 5 s), worst growth {growth:.2f} x linear "
          f"(target <= 1): {verdict} the targets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
