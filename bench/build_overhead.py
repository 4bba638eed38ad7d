"""Orchestration overhead of one template build, and the memory of a build run (issue 8, items 1 and 7).

    .venv/bin/python bench/build_overhead.py [--key debian-12] [--repeat 3] [--real-build-minutes 15]
                                             [--no-multiprocess]

In the lab (fake PVE, mirror and guest in this process, bench/_lab.py; a project that ran proxmox_env),
one key is materialized with force (unattended_files + staged_iso + template + template_proof: render,
`packer validate`, stage, `packer build`, finish, smoke test, promote, prove) in these ways:
  in-process  `dagster.materialize(...)` in a warm child process (imports done; the definitions' own
              resources; DAGSTER_HOME below): the call alone;
  cli         `dagster asset materialize --select ... --partition KEY -m packer_assets.definitions
              --config-json '{force}'` with the lab's env file (PACKER_ASSETS_ENV_FILE) and a temporary
              DAGSTER_HOME holding the repo's dagster.yaml: process start to exit;
  cli, multiprocess executor   the same CLI on bench/_defs_multiprocess.py: the project's definitions
              with Dagster's default executor (a process per step), i.e. before the project chose the
              in-process executor (skip with --no-multiprocess);
  packer      `packer build -machine-readable -color=false <workdir>` alone, on a work directory prepared
              the way build_template prepares it (same catalog entry, rendered files, staged ISO, a free
              VMID of the key, packer.workdir.prepare_workdir + packer.env.packer_env): the process alone.
One warm-up of each first (the first build also renders and downloads the ISO), then --repeat rounds,
the ways interleaved; medians are reported.
Overhead = materialization - packer alone, in seconds and as % of the packer time here; and, since a
lab build takes seconds where a real one takes 10-30 minutes, projected as % of a --real-build-minutes
build (the overhead seconds do not grow with the build: process start, imports, Dagster's bookkeeping,
rendering + `packer validate`, the API calls of staging/finishing and the smoke test).
Each run's steps are timed from Dagster's event log, the packer time inside it from the build record.
CPU seconds: the CLI's process tree (sampled from /proc), the child's getrusage (self + children).
Item 7: a /proc sampler (50 ms) follows each process tree: peak RSS (VmHWM) of the materializing
process, of its largest other non-packer process (step processes under the multiprocess executor,
validators), of the largest packer process (1.6.6 runs itself twice plus a plugin process per
builder/provisioner), and the tree's peak summed RSS and summed PSS (shared pages counted once).
Targets: overhead under 10 % of a real build's wall time, and under 5 s absolute in the lab.
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

from _lab import PACKER, REPO, BenchLab, TreeSampler, dagster_home, is_packer, mib  # noqa: E402
from _materialize import STEPS, InProcess, packer_in_pipeline, run_cli, step_seconds  # noqa: E402


# ------------------------------------------------------------------ packer alone


class PackerAlone:
    """A work directory prepared as build_template prepares one, and `packer build` on it, timed alone."""

    def __init__(self, lab: BenchLab, key: str):
        from packer_assets.catalog import load_catalog
        from packer_assets.config.envfile import read_env_file
        from packer_assets.evidence.layout import Layout
        from packer_assets.pve.bootstrap import build_access

        self.lab, self.key = lab, key
        self.layout = Layout(lab.root)
        lab_env = lab.stack.env()
        self.catalog = load_catalog(lab.stack.catalog_path, env=lab_env, project_dir=REPO)  # mirror URLs, as runs see them
        self.entry = self.catalog.get(key)
        self.access = build_access(read_env_file(self.layout.env_file), str(self.layout.env_file))
        self.lab_env = lab_env

    def prepare(self, n: int) -> tuple[Path, dict[str, str], int]:
        from packer_assets.build.pipeline import BuildSettings, storage_type, plan_build
        from packer_assets.evidence.chain import new_chain_id
        from packer_assets.config.envfile import read_env_file
        from packer_assets.packer.env import packer_env
        from packer_assets.packer.version import BuildCredentials, detect_packer
        from packer_assets.packer.workdir import prepare_workdir
        from packer_assets.pve.staging import stage_entry
        from packer_assets.pve.templates import allocate_vmid, template_name

        entry, found, env = self.entry, self.access.discovery, self.lab_env
        api = self.access.connect()
        staged = stage_entry(api, found.node, found.iso_storage, entry)
        rendered = self.layout.rendered_dir(self.key)
        caps = detect_packer(PACKER)
        vmid = allocate_vmid(api, entry)
        chain = new_chain_id(self.key)
        settings = BuildSettings(ssh_host=env["PACKER_ASSETS_SSH_HOST"], ssh_port=int(env["PACKER_ASSETS_SSH_PORT"]),
                                 ssh_timeout=env["PACKER_ASSETS_SSH_TIMEOUT"], boot_wait=env["PACKER_ASSETS_BOOT_WAIT"])
        plan = plan_build(entry, settings, vmid=vmid, name=template_name(self.key) + f"-alone{n}", node=found.node,
                          iso_volid=staged["iso"].volid, extra_volids=[staged[x].volid for x in sorted(staged) if x != "iso"],
                          vm_storage=found.vm_storage, vm_storage_type=storage_type(api, found.node, found.vm_storage),
                          bridge=found.bridge, http_bind_address=found.http_bind_address, http_port=found.http_port,
                          description=f"packer-assets {self.key} {chain} (benchmark: packer alone)")
        workdir = self.layout.output_root / "output/work-alone" / self.key / chain.stamp
        kept = read_env_file(self.layout.secrets_file)  # proxmox_env gave the automation user Packer's password
        creds = BuildCredentials(token_id=self.access.token_id, token_secret=self.access.token_secret,
                                 user=kept["PROXMOX_BUILD_USER"], password=kept["PROXMOX_BUILD_PASSWORD"])
        penv = packer_env(self.access.endpoint, caps, creds, ssh_password=env[entry.install_user.password_env],
                          workdir=workdir.parent)
        prepare_workdir(workdir, entry, plan, caps, project_dir=REPO, http_dir=rendered, allow_degraded=True,
                        secrets=penv.secrets)
        return workdir, penv.env, vmid

    def run(self, n: int) -> tuple[float, int, int, float]:
        """(seconds of `packer build`, exit code, sampler (peak VmHWM per process, tree Pss), CPU seconds)."""
        from packer_assets.pve.templates import destroy_build_vm

        workdir, env, vmid = self.prepare(n)
        argv = [PACKER, "build", "-machine-readable", "-color=false", str(workdir)]
        pid = {}
        with open(workdir.parent / f"{workdir.name}.packer.log", "wb") as log, \
                TreeSampler(roots=lambda: set(pid.values())) as sampler:
            t = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            pid["packer"] = proc.pid
            _pid, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t
            proc.returncode = os.waitstatus_to_exitcode(status)
        # leave the key's VMIDs as the pipeline's runs expect them (the builds' own prune keeps 3)
        destroy_build_vm(self.access.connect(), self.access.discovery.node, vmid, self.entry)
        return seconds, proc.returncode, sampler, usage.ru_utime + usage.ru_stime


def med(values):
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", default="debian-12")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--real-build-minutes", type=float, default=15.0)
    parser.add_argument("--no-multiprocess", action="store_true",
                        help="skip the CLI with Dagster's multiprocess executor (the 'before')")
    args = parser.parse_args()

    import dagster as dg

    key = args.key
    clis = {"cli": "project"}
    if not args.no_multiprocess:
        clis["cli, multiprocess executor"] = "multiprocess"
    ways = ["packer", "in-process", *clis]
    print(f"# build_overhead: key {key}, {args.repeat} rounds after one warm-up, packer {PACKER}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    rows = {w: [] for w in ways}
    cpu = {w: [] for w in ways}
    steps = {w: [] for w in ways[1:]}
    inner = {w: [] for w in ways[1:]}
    mem = {w: {"main": [], "step": [], "packer": [], "tree": [], "pss": []} for w in ways}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        tmp = Path(tmp)
        lab = BenchLab.start(tmp)
        home = dagster_home(tmp / "dagster_home")
        env = lab.process_env(home)
        inproc = None
        try:
            t = time.perf_counter()
            inproc = InProcess(env, tmp / "in-process.log")
            print(f"in-process child ready in {time.perf_counter() - t:.2f}s (imports {inproc.ready['import_s']:.2f}s, "
                  f"VmHWM after imports {mib(inproc.ready['vmhwm_kb'])})")
            alone = PackerAlone(lab, key)
            # warm-up: the first build renders and stages (downloads) for real; later ones are forced rebuilds
            first = inproc.run(key, force=False)
            if not first["success"]:
                raise RuntimeError(f"warm-up materialization failed: {first['errors']}")
            for code in clis.values():
                run_cli(env, key, code=code)
            alone.run(0)
            print("warm-up done: one in-process materialization, one run of each CLI, one packer alone\n")

            for r in range(1, args.repeat + 1):
                seconds, rc, packer_sampler, packer_cpu = alone.run(r)
                if rc != 0:
                    raise RuntimeError(f"packer alone exited {rc}")
                rows["packer"].append(seconds)
                cpu["packer"].append(packer_cpu)
                mem["packer"]["packer"].append(packer_sampler.peak(is_packer)[0])
                mem["packer"]["tree"].append(packer_sampler.peak_tree_rss)
                mem["packer"]["pss"].append(packer_sampler.peak_tree_pss)

                res = inproc.run(key)
                if not res["success"]:
                    raise RuntimeError(f"in-process materialization failed: {res['errors']}")
                rows["in-process"].append(res["seconds"])
                cpu["in-process"].append(res["cpu_s"])
                mem["in-process"]["main"].append(res["vmhwm_kb"])
                with dg.DagsterInstance.from_config(str(home)) as instance:
                    steps["in-process"].append(step_seconds(instance, res["run_id"]))
                inner["in-process"].append(packer_in_pipeline(lab, key))

                for way, code in clis.items():
                    seconds, _done, sampler = run_cli(env, key, code=code)
                    rows[way].append(seconds)
                    cpu[way].append(sampler.cpu_seconds)
                    with dg.DagsterInstance.from_config(str(home)) as instance:
                        steps[way].append(step_seconds(instance, instance.get_runs(limit=1)[0].run_id))
                    inner[way].append(packer_in_pipeline(lab, key))
                    root = sampler.root_pid
                    mem[way]["main"].append(sampler.hwm[root][0])
                    mem[way]["step"].append(max((kb for pid, (kb, argv) in sampler.hwm.items()
                                                 if pid != root and not is_packer(argv)), default=0))
                    mem[way]["packer"].append(sampler.peak(is_packer)[0])
                    mem[way]["tree"].append(sampler.peak_tree_rss)
                    mem[way]["pss"].append(sampler.peak_tree_pss)
                print(f"round {r}: " + ", ".join(f"{w} {rows[w][-1]:.2f}s" for w in ways), flush=True)
        finally:
            if inproc:
                inproc.close()
            lab.stop()

    packer_s = med(rows["packer"])
    real = args.real_build_minutes * 60
    print(f"\n## Item 1: orchestration overhead, {key} (median of {args.repeat})\n")
    print("| way | wall s | CPU s | overhead vs packer alone | % of the lab build | projected % of a "
          f"{args.real_build_minutes:g}-min build |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| `packer build` alone | {packer_s:.2f} | {med(cpu['packer']):.2f} | - | - | - |")
    verdicts = []
    for way in ways[1:]:
        s = med(rows[way])
        over = s - packer_s
        print(f"| {way} | {s:.2f} | {med(cpu[way]):.2f} | {over:+.2f} s | {100 * over / packer_s:.0f} % | "
              f"{100 * over / real:.2f} % |")
        verdicts.append((way, over, 100 * over / real))
    print("\nsteps (median seconds; Dagster event log: STEP_START..STEP_SUCCESS, <run>: RUN_START..RUN_SUCCESS; "
          "packer and smoke: the build record)\n")
    print("| way | " + " | ".join(STEPS) + " | <run> | packer inside template | smoke test |")
    print("|---|" + "---:|" * (len(STEPS) + 3))
    for way in ways[1:]:
        cells = [f"{med([s.get(k, float('nan')) for s in steps[way]]):.2f}" for k in (*STEPS, "<run>")]
        cells += [f"{med([i.get('packer', float('nan')) for i in inner[way]]):.2f}",
                  f"{med([i.get('smoke', float('nan')) for i in inner[way]]):.2f}"]
        print(f"| {way} | " + " | ".join(cells) + " |")
    print()
    for way, over, pct in verdicts:
        print(f"target {way}: overhead {over:.2f} s {'<' if over < 5 else '>='} 5 s in the lab: "
              f"{'meets' if over < 5 else 'MISSES'}; {pct:.2f} % of a {args.real_build_minutes:g}-min build "
              f"{'<' if pct < 10 else '>='} 10 %: {'meets' if pct < 10 else 'MISSES'}")

    print("\n## Item 7: memory of a build run (max over the rounds; /proc sampled every 50 ms)\n")
    print("| way | materializing process (VmHWM) | largest other non-packer process | largest packer process "
          "| whole tree at its peak: summed RSS | summed PSS |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| in-process child (`dagster.materialize`, {args.repeat + 1} runs; {mib(inproc.ready['vmhwm_kb'])} after "
          f"imports) | {mib(max(mem['in-process']['main']))} | - | - | - | - |")
    for way in [*clis, "packer"]:
        m = mem[way]
        name = "`packer build` alone" if way == "packer" else way
        print(f"| {name} | {mib(max(m['main'])) if m['main'] else '-'} | "
              f"{mib(max(m['step'])) if m['step'] and max(m['step']) else '-'} | {mib(max(m['packer']))} | "
              f"{mib(max(m['tree']))} | {mib(max(m['pss']))} |")


if __name__ == "__main__":
    main()
