"""The lab for the build benchmarks (items 1, 2, 3, 7): one in this process, a project that ran
proxmox_env, and the environment a Dagster process needs to build against it.

    from _lab import BenchLab, debian_clones
    lab = BenchLab.start(tmp)                       # shipped catalog
    lab = BenchLab.start(tmp, debian_clones(8))     # 8 keys cloned from debian-12
    env = lab.process_env(dagster_home)             # for a child: CLI, in-process runner, daemon
    lab.stop()

The lab (fake PVE over HTTPS, ISO mirror, guest SSH) runs in threads of the benchmark process, so the
process being measured (a `dagster` CLI, a child running `dagster.materialize`, the daemon's runs)
is never the lab's; and the benchmark can read what the lab saw: `pve.downloads`,
`mirror.downloads(key)`, `pve.vms`. A child gets the lab through its env file (`lab.env`, written
here the way `packer-assets lab up` writes `.lab/lab.env`) named by PACKER_ASSETS_ENV_FILE, plus
PACKER_ASSETS_ROOT and DAGSTER_HOME, and runs in the repository (packer_dir paths are relative to it).

Also: a counting shim for PACKER_BINARY, and a /proc sampler for process trees (how many `packer
build` at once, peak RSS of each process).
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from packer_assets.procs import proc_table  # noqa: F401 - the samplers below use it

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PACKER = shutil.which("packer") or "/usr/bin/packer"
# Variables of the caller that must not leak into a measured child (they would change what it does).
_OURS = ("PACKER_ASSETS_", "PROXMOX_", "DAGSTER_", "PACKER_INSTALL_PASSWORD", "PACKER_BINARY", "PYTEST_")


def debian_clones(n: int, path: Path) -> Path:
    """A catalog of n keys `deb-00`.. cloned from the shipped debian-12 entry: distinct keys, VMID ranges
    (100 each from 20000) and ISO names (one release directory, one SHA256SUMS), all templates/debian."""
    doc = yaml.safe_load((REPO / "templates/catalog.yaml").read_text())
    base = next(t for t in doc["templates"] if t["key"] == "debian-12")
    templates = []
    for i in range(n):
        entry = copy.deepcopy(base)
        entry["key"] = f"deb-{i:02d}"
        entry["description"] = f"benchmark clone {i} of debian-12"
        entry["iso"]["url"] = entry["iso"]["url"].replace("-netinst.iso", f"-netinst-b{i:02d}.iso")
        entry["vmid_range"] = {"first": 20000 + 100 * i, "last": 20000 + 100 * i + 99}
        templates.append(entry)
    doc["templates"] = templates
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# benchmark catalog: {n} clones of debian-12\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class BenchLab:
    stack: object
    tmp: Path
    root: Path
    env_file: Path

    @classmethod
    def start(cls, tmp: Path, catalog: Path | None = None) -> "BenchLab":
        from packer_assets.chain import new_chain_id
        from packer_assets.envfile import write_env_file
        from packer_assets.evidence import Layout
        from packer_assets.lab.stack import LabStack
        from packer_assets.pve.bootstrap import BootstrapConfig
        from packer_assets.pve.client import Endpoint
        from packer_assets.pve.init_env import AdminLogin, run_init

        tmp = Path(tmp)
        stack = LabStack.start(tmp / "lab", catalog or REPO / "templates/catalog.yaml", secrets.token_urlsafe(16),
                               secrets.token_urlsafe(16), root=REPO)
        root = tmp / "project"
        env_file = write_env_file(tmp / "lab.env", stack.env(), header="benchmark lab (bench/_lab.py)")
        # proxmox_env, as the tests' lab_project fixture runs it: API user, role, token, .env.proxmox
        run_init(Layout(root), Endpoint(stack.served.url, ca_file=str(stack.pki.ca_file)),
                 AdminLogin("root@pam", stack.root_password), BootstrapConfig(build_password=True), new_chain_id("init"),
                 echo=lambda _line: None)
        return cls(stack, tmp, root, env_file)

    @property
    def pve(self):
        return self.stack.pve

    @property
    def mirror(self):
        return self.stack.mirror

    @property
    def keys(self) -> list[str]:
        return self.stack.catalog.keys()

    def process_env(self, dagster_home: Path | None = None, **extra: str) -> dict[str, str]:
        """The environment of a measured child: the caller's minus anything of ours, plus the lab's env file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
        env.update(PACKER_ASSETS_ENV_FILE=str(self.env_file), PACKER_ASSETS_ROOT=str(self.root),
                   PYTHONUNBUFFERED="1", CHECKPOINT_DISABLE="1")
        if dagster_home is not None:
            env["DAGSTER_HOME"] = str(dagster_home)
        env.update(extra)
        return env

    # ---- what the lab saw

    def iso_bytes_downloaded(self) -> int:
        """Bytes the node fetched through download-url (every finished download)."""
        return sum(int(d.get("size") or 0) for d in self.pve.downloads)

    def mirror_iso_gets(self) -> int:
        return sum(self.mirror.downloads(key) for key in self.mirror.items)

    def templates(self) -> list[int]:
        return sorted(vm.vmid for vm in self.pve.vms if vm.template)

    def stop(self) -> None:
        self.stack.stop()


def dagster_home(path: Path, *, pool_limit: int | None = None, dequeue_threads: int = 0) -> Path:
    """A DAGSTER_HOME with the repo's dagster.yaml (queued runs, pool packer_builds), optionally another
    default pool limit, and the run coordinator launching queued runs from `dequeue_threads` threads."""
    path.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    if pool_limit is not None:
        config["concurrency"]["pools"]["default_limit"] = pool_limit
    if dequeue_threads:
        config["run_coordinator"]["config"] = {**(config["run_coordinator"].get("config") or {}),
                                               "dequeue_use_threads": True, "dequeue_num_workers": dequeue_threads}
    (path / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def counting_packer(folder: Path, real: str = PACKER) -> tuple[Path, Path]:
    """(shim, log): a PACKER_BINARY that appends `<pid> <args>` to log and execs the real packer (same
    pid, so the runner's signals reach packer unchanged; costs one bash start, ~2 ms)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "packer-calls.log"
    shim = folder / "packer"
    shim.write_text(f'#!/bin/bash\necho "$$ $*" >> {log}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    log.touch()
    return shim, log


def packer_calls(log: Path) -> dict[str, int]:
    """Invocations by subcommand (build, validate, version, ...) from a counting shim's log."""
    counts: dict[str, int] = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        sub = next((p for p in parts[1:] if not p.startswith("-")), "?")
        counts[sub] = counts.get(sub, 0) + 1
    return counts


# ------------------------------------------------------------------ /proc


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line[:5]] = int(line.split()[1])
    except OSError:
        pass
    return out


def _pss(pid: int) -> int:
    """Proportional set size in kB (shared pages divided among their users): what a tree really holds."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def is_packer(argv: list[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == "packer"


def is_packer_build(argv: list[str]) -> bool:
    return is_packer(argv) and "build" in argv[1:2]


def descendants(table: dict[int, tuple[int, list[str]]], roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _argv) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class TreeSampler:
    """Samples /proc every `interval` s for the processes under `roots()`: how many top-level `packer build`
    at once (packer 1.6.6 re-executes itself and starts plugin processes: one build is counted once), the
    peak VmHWM of every process seen (kB, with its argv), the peaks of the tree's summed VmRSS and summed
    Pss (shared pages counted once: packer's 5 processes map one 107 MB binary), and CPU seconds.
    (Not wait4's ru_maxrss: Linux carries the forking Python parent's RSS over exec into it.)"""

    roots: object  # callable -> set[int]
    interval: float = 0.05
    max_builds: int = 0
    builds_seen: set = field(default_factory=set)
    hwm: dict = field(default_factory=dict)        # pid -> (kB, argv)
    peak_tree_rss: int = 0
    peak_tree_pss: int = 0
    samples: int = 0
    cpu: dict = field(default_factory=dict)        # pid -> CPU seconds (last sample: misses a process's last 50 ms)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-sampler")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self):
        while not self._stop.is_set():
            cpu: dict[int, float] = {}
            table = proc_table(cpu)
            tree = descendants(table, set(self.roots()))
            for pid in tree:
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu.get(pid, 0.0))
            builds, rss, pss = set(), 0, 0
            for pid in tree:
                argv = table[pid][1]
                status = _status(pid)
                rss += status.get("VmRSS", 0)
                pss += _pss(pid)
                if status.get("VmHWM", 0) > self.hwm.get(pid, (0, None))[0]:
                    self.hwm[pid] = (status["VmHWM"], argv)
                if is_packer_build(argv) and not is_packer_build(table.get(table[pid][0], (0, []))[1]):
                    builds.add(pid)
            self.builds_seen |= builds
            self.max_builds = max(self.max_builds, len(builds))
            self.peak_tree_rss = max(self.peak_tree_rss, rss)
            self.peak_tree_pss = max(self.peak_tree_pss, pss)
            self.samples += 1
            self._stop.wait(self.interval)

    @property
    def cpu_seconds(self) -> float:
        """CPU time (user + system) of every process seen in the tree, summed."""
        return sum(self.cpu.values())

    def peak(self, match) -> tuple[int, list[str] | None]:
        """(largest VmHWM in kB, its argv) among the processes whose argv satisfies match(argv)."""
        found = [(kb, argv) for kb, argv in self.hwm.values() if argv and match(argv)]
        return max(found, key=lambda x: x[0]) if found else (0, None)


def mib(kb: int) -> str:
    return f"{kb / 1024:.0f} MiB"


def wait_until(check, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
