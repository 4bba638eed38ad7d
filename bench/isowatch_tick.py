"""One checksum-sensor tick over many keys against the lab mirror, nothing changed: how long?

    .venv/bin/python bench/isowatch_tick.py [--keys 200] [--per-dir 4] [--workers 8] [--timeout 5]

Builds a lab IsoMirror with --keys ISOs (--per-dir of them share one checksum file, alternating GNU
SHA256SUMS and BSD CHECKSUM directories, as upstreams do), runs a first poll (the sensor's first
tick), then times a poll with nothing changed (only 304s), and one after a single publish.
Prints seconds and requests by status; the sensor's default timeout is 60 s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter

from packer_assets.catalog import IsoSource
from packer_assets.upstream.isowatch import poll
from packer_assets_lab.mirror import IsoMirror, MirrorItem

SENSOR_TIMEOUT = 60  # Dagster's default sensor evaluation timeout (DAGSTER_SENSOR_GRPC_TIMEOUT_SECONDS)


def items(keys: int, per_dir: int) -> list[MirrorItem]:
    out = []
    for i in range(keys):
        d = i // per_dir
        name = "CHECKSUM" if d % 2 else "SHA256SUMS"
        base = f"/mirror{d % 7}.example.org/release-{d}"
        out.append(MirrorItem(f"k{i:04d}", f"{base}/os-{i:04d}.iso", f"{base}/{name}"))
    return out


def timed(label: str, mirror: IsoMirror, fn):
    before = mirror.hits.copy()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    statuses = Counter()
    for (_path, status), n in (mirror.hits - before).items():
        statuses[status] += n
    print(f"{label:<22} {seconds:7.3f} s  requests {dict(sorted(statuses.items()))}  "
          f"changed {len(result.changed)} unchanged {len(result.unchanged)} first_seen {len(result.first_seen)} "
          f"errors {len(result.errors)}")
    return result, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--per-dir", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="isowatch-bench-") as tmp:
        built = time.perf_counter()
        with IsoMirror(tmp, items(args.keys, args.per_dir)) as mirror:
            print(f"mirror: {args.keys} keys, {len({i.checksum_path for i in mirror.items.values()})} checksum files, "
                  f"built in {time.perf_counter() - built:.1f} s; workers {args.workers}, timeout {args.timeout:g} s")
            sources = {k: IsoSource(url="https:/" + i.iso_path, checksum_url="https:/" + i.checksum_path)
                       .with_mirror(mirror.base_url) for k, i in mirror.items.items()}

            def tick(cursor):
                return lambda: poll(sources, cursor, max_workers=args.workers, timeout=args.timeout)

            first, _ = timed("first tick", mirror, tick({}))
            same, seconds = timed("nothing changed", mirror, tick(first.cursor))
            mirror.publish("k0001")
            timed("one key published", mirror, tick(same.cursor))
    share = seconds / SENSOR_TIMEOUT
    print(f"unchanged tick: {seconds:.3f} s = {share:.1%} of the {SENSOR_TIMEOUT} s sensor timeout")
    return 0  # a benchmark prints figures; it does not fail


if __name__ == "__main__":
    raise SystemExit(main())
