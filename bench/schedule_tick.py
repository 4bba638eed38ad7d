"""One weekly_rebuild tick over N unchanged keys, and over 500 keys with 3 changed (issue 18, item 3).

    .venv/bin/python bench/schedule_tick.py [--keys 5 50 500] [--changed 3] [--repeat 5]

For each N: a synthetic catalog (bench/_catalogs.py, the repo's real template folders), every key
recorded as built (output/state/plans/<key>.json, as a build writes it, ISO checksums as the checksum
sensor last observed them), then the real schedule function through `dagster.build_schedule_context`:
seconds per tick (median of --repeat) and runs requested (target: 0, tick under 5 s at 500 keys). Then
the checksum sensor observes a new release of --changed keys of the largest catalog: runs requested
(target: exactly those keys). The node is not asked here (no env file: the tick says so and trusts
the recorded state); with a node, a tick adds one /cluster/resources call whatever N is.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _catalogs import write_catalog  # noqa: E402
from _lab import REPO  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[5, 50, 500])
    parser.add_argument("--changed", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.chdir(REPO)  # the catalog's packer_dir folders
    os.environ["PACKER_INSTALL_PASSWORD"] = "bench-install-password"
    logging.getLogger("dagster").setLevel(logging.ERROR)  # the tick's per-key lines are not the measurement

    import dagster as dg

    from packer_assets.catalog import load_catalog
    from packer_assets.defs.resources import ProjectSettings
    from packer_assets.defs.schedules import build_weekly_rebuild
    from packer_assets.evidence.layout import Layout
    from packer_assets.build.plan import (SourceDigests, iso_checksums, plan_fingerprint, plan_key, record_observed,
                                    record_plan)

    schedule = build_weekly_rebuild("0 3 * * 0")
    when = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
    print(f"{'keys':>6}{'tick s':>10}{'runs':>7}   (median of {args.repeat})")
    with tempfile.TemporaryDirectory(prefix="schedule-tick-") as tmp, dg.instance_for_test() as instance:
        for n in args.keys:
            catalog_path = write_catalog(Path(tmp) / f"catalog-{n}.yaml", n)
            os.environ["PACKER_ASSETS_CATALOG"] = str(catalog_path)
            catalog = load_catalog(catalog_path, env={}, project_dir=REPO)
            layout = Layout(Path(tmp) / f"out-{n}")
            observed = {e.key: "sha256:" + f"{i:064x}" for i, e in enumerate(catalog)}
            record_observed(layout, observed)
            sources, key = SourceDigests(REPO), plan_key(layout)
            for entry in catalog:  # what each key's last build recorded
                isos = iso_checksums(entry, observed)
                record_plan(layout, entry.key, plan_fingerprint(entry, os.environ, sources, key, isos), isos,
                            entry.vmid_range.first, None)
            context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                                resources={"project": ProjectSettings(output_root=str(layout.output_root))})
            times, runs = [], 0
            for _ in range(args.repeat):
                start = time.perf_counter()
                result = schedule(context)
                times.append(time.perf_counter() - start)
                runs = 0 if isinstance(result, dg.SkipReason) else len(result)
            print(f"{n:>6}{statistics.median(times):>10.3f}{runs:>7}")
            last = (n, layout, observed, context, statistics.median(times), runs)
        n, layout, observed, context, seconds, runs = last
        changed = sorted(observed)[: args.changed]
        record_observed(layout, {k: "sha256:" + "f" * 64 for k in changed})  # a new release of each, observed
        start = time.perf_counter()
        result = schedule(context)
        tick = time.perf_counter() - start
        requested = [] if isinstance(result, dg.SkipReason) else sorted(r.partition_key for r in result)
    print(f"{n} keys, {args.changed} changed: {len(requested)} run(s) requested ({', '.join(requested)}), tick {tick:.3f} s")
    unchanged_ok = runs == 0 and seconds < 5
    print(f"target {n} unchanged keys: 0 runs, tick < 5 s: {'meets' if unchanged_ok else 'MISSES'}")
    print(f"target {args.changed} changed: exactly those: {'meets' if requested == changed else 'MISSES'}")


if __name__ == "__main__":
    main()
