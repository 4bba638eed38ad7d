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

Also: a counting shim for PACKER_BINARY; the /proc sampler for process trees (how many `packer build` at
once, peak RSS of each process) is packer_assets_lab.proctree.TreeSampler, re-exported here.
"""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from packer_assets_lab.proctree import TreeSampler, is_packer  # noqa: F401 - the benchmarks import them from here

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
    def start(cls, tmp: Path, catalog: Path | None = None, real_guests: tuple[str, ...] = ()) -> "BenchLab":
        from packer_assets.evidence.chain import new_chain_id
        from packer_assets.config.envfile import write_env_file
        from packer_assets.evidence.layout import Layout
        from packer_assets_lab.stack import LabStack
        from packer_assets.pve.bootstrap import BootstrapConfig
        from packer_assets.pve.client import Endpoint
        from packer_assets.pve.init_env import AdminLogin, run_init

        tmp = Path(tmp)
        stack = LabStack.start(tmp / "lab", catalog or REPO / "templates/catalog.yaml", secrets.token_urlsafe(16),
                               secrets.token_urlsafe(16), project_dir=REPO, real_guests=real_guests)
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
