"""No-op rerun: the second materialization of every key with nothing changed (issue 8, item 2).

    .venv/bin/python bench/noop_rerun.py [--keys debian-12 ...] [--no-cli] [--multiprocess]

In the lab (bench/_lab.py: fake PVE, mirror and guest in this process; the shipped catalog, 9 keys;
the Windows keys build degraded, as the lab's env file says), with PACKER_BINARY set to a counting shim
(bash, logs `<pid> <args>` and execs the real packer):
  first   every key materialized once (unattended_files + staged_iso + template + template_proof,
          no force): the builds, for reference;
  second  every key again, nothing changed, in the same warm child process (`dagster.materialize`);
  cli     every key again through `dagster asset materialize` (a new process per key, as a user or
          `make` would run it), unless --no-cli; with --multiprocess also on bench/_defs_multiprocess.py
          (Dagster's default executor: a process per step), the "before" of the project's executor.
For each pass: `packer build` runs (the shim's log, cross-checked with new build log folders and new
templates in the lab), other packer invocations (`validate` from unattended_files' blocking check,
`version` probes), ISO bytes the node downloaded (lab PVE `download-url` results) and ISO bodies the
mirror served (GET 200, `mirror.downloads(key)`), bytes through the control host (staged_iso's metadata
is not read; the Windows answer ISO upload happens only in a build), and the wall time per key and in all.
Target: zero packer builds and zero ISO bytes on the second materialization.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _lab import BenchLab, counting_packer, dagster_home, packer_calls  # noqa: E402
from _materialize import InProcess, run_cli  # noqa: E402


def log_folders(root: Path) -> int:
    base = root / "output/logs/packer/builds"
    return sum(1 for p in base.glob("*/*") if p.name != "latest") if base.exists() else 0


def snapshot(lab: BenchLab, calls_log: Path) -> dict:
    return {"calls": packer_calls(calls_log), "iso_bytes": lab.iso_bytes_downloaded(),
            "downloads": len(lab.pve.downloads), "mirror_gets": lab.mirror_iso_gets(),
            "templates": len(lab.templates()), "log_folders": log_folders(lab.root)}


def delta(before: dict, after: dict) -> dict:
    calls = {k: after["calls"].get(k, 0) - before["calls"].get(k, 0) for k in after["calls"]}
    out = {k: after[k] - before[k] for k in ("iso_bytes", "downloads", "mirror_gets", "templates", "log_folders")}
    out["builds"] = calls.get("build", 0)
    out["validates"] = calls.get("validate", 0)
    out["versions"] = calls.get("version", 0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", nargs="*", help="default: every key of the shipped catalog")
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI pass")
    parser.add_argument("--multiprocess", action="store_true",
                        help="also a CLI pass with Dagster's multiprocess executor (bench/_defs_multiprocess.py)")
    args = parser.parse_args()

    print(f"# noop_rerun: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp:
        tmp = Path(tmp)
        lab = BenchLab.start(tmp)
        keys = args.keys or lab.keys
        shim, calls_log = counting_packer(tmp / "shim")
        env = lab.process_env(dagster_home(tmp / "dagster_home"), PACKER_BINARY=str(shim))
        passes: dict[str, dict] = {}
        inproc = None
        try:
            inproc = InProcess(env, tmp / "in-process.log")
            for name in ("first", "second, in-process"):
                before, per_key, t0 = snapshot(lab, calls_log), {}, time.perf_counter()
                for key in keys:
                    res = inproc.run(key, force=False)
                    if not res["success"]:
                        raise RuntimeError(f"{name} materialization of {key} failed: {res['errors']}")
                    per_key[key] = res["seconds"]
                passes[name] = {"total": time.perf_counter() - t0, "per_key": per_key,
                                **delta(before, snapshot(lab, calls_log))}
                print(f"{name}: {len(keys)} keys in {passes[name]['total']:.1f}s", flush=True)
            clis = {} if args.no_cli else {"again, CLI": "project"}
            if args.multiprocess and not args.no_cli:
                clis["again, CLI, multiprocess executor"] = "multiprocess"
            for name, code in clis.items():
                before, per_key, t0 = snapshot(lab, calls_log), {}, time.perf_counter()
                for key in keys:
                    per_key[key] = run_cli(env, key, force=False, code=code)[0]
                passes[name] = {"total": time.perf_counter() - t0, "per_key": per_key,
                                **delta(before, snapshot(lab, calls_log))}
                print(f"{name}: {len(keys)} keys in {passes[name]['total']:.1f}s", flush=True)
        finally:
            if inproc:
                inproc.close()
            lab.stop()

    print(f"\n## Item 2: no-op rerun ({len(keys)} keys: {', '.join(keys)})\n")
    print("| pass | packer builds | new templates | new build logs | other packer calls | ISO bytes downloaded "
          "| node downloads | mirror ISO GETs | wall time | per key (median) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, p in passes.items():
        print(f"| {name} | {p['builds']} | {p['templates']} | {p['log_folders']} | "
              f"{p['validates']} validate, {p['versions']} version | {p['iso_bytes']:,} | {p['downloads']} | "
              f"{p['mirror_gets']} | {p['total']:.1f} s | {statistics.median(p['per_key'].values()):.2f} s |")
    print("\nper key, seconds: " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {s:.2f}" for k, s in p["per_key"].items()) for name, p in passes.items()))
    for name, p in passes.items():
        if name == "first":
            continue
        ok = p["builds"] == 0 and p["iso_bytes"] == 0 and p["mirror_gets"] == 0
        print(f"target ({name}): {p['builds']} packer builds, {p['iso_bytes']} ISO bytes: "
              f"{'meets' if ok else 'MISSES'} (zero of both)")


if __name__ == "__main__":
    main()
