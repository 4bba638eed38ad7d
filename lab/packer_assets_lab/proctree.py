"""Watching packer's processes from outside, for the tests and the benchmarks: one sampler thread
scaffold (`Sampler`) and the two things sampled — a process tree under given roots (`TreeSampler`: packer
builds at once, their lifetimes, memory, CPU) and the process groups this process started
(`GroupSampler`: every command line seen, what is left). The runner itself never samples: it asks
`packer_assets.runs.procs` once when it needs to know."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from packer_assets.runs.procs import (
    group_members,
    memory_kb,
    proc_stats,
    proc_table,
    process_argv,
)

ProcTable = dict[int, tuple[int, list[str]]]  # pid -> (ppid, argv), as procs.proc_table reads it


def is_packer(argv: list[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == "packer"


def is_packer_build(argv: list[str]) -> bool:
    """`packer build ...` itself (not its plugin children, which are `packer plugin ...`)."""
    return is_packer(argv) and "build" in argv[1:2]


def descendants(table: ProcTable, roots: set[int]) -> set[int]:
    """The roots present in `table` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _argv) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


def top_builds(table: ProcTable, pids: set[int]) -> set[int]:
    """The `packer build` processes among `pids` whose parent is not one: packer 1.6.6 re-executes itself
    (panicwrap) and forks, and those are the same build."""
    return {
        pid
        for pid in pids
        if is_packer_build(table[pid][1]) and not is_packer_build(table.get(table[pid][0], (0, []))[1])
    }


def cmdline(pid: int) -> str:
    """A process's command line joined by spaces, "" if it is gone."""
    return " ".join(process_argv(pid) or [])


class Sampler:
    """Calls `sample()` every `interval` seconds on a daemon thread while the `with` block runs."""

    interval: float = 0.05

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=type(self).__name__)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


@dataclass
class TreeSampler(Sampler):
    """The processes under `roots()`: how many `packer build` at once (`max_builds`), each build's first and
    last sighting (`seen`: pid -> (first, last, argv)), and with `memory`: the peak VmHWM of every process
    (`hwm`: pid -> (kB, argv)), the peaks of the tree's summed VmRSS and Pss (shared pages counted once:
    packer's processes map one large binary), CPU seconds per process. (Not wait4's ru_maxrss: Linux
    carries a forking Python parent's RSS over exec into it.)"""

    roots: Callable[[], set[int]]
    interval: float = 0.05
    memory: bool = True
    max_builds: int = 0
    seen: dict[int, tuple[float, float, list[str]]] = field(default_factory=dict)
    hwm: dict[int, tuple[int, list[str]]] = field(default_factory=dict)
    peak_tree_rss: int = 0
    peak_tree_pss: int = 0
    samples: int = 0
    cpu: dict[int, float] = field(default_factory=dict)  # last sample: misses a process's last interval

    def sample(self) -> None:
        now = time.time()
        cpu: dict[int, float] = {}
        table = proc_table(cpu)
        tree = descendants(table, set(self.roots()))
        builds = top_builds(table, tree)
        for pid in builds:
            self.seen[pid] = (self.seen.get(pid, (now,))[0], now, table[pid][1])
        self.max_builds = max(self.max_builds, len(builds))
        self.samples += 1
        if self.memory:
            self._sample_memory(table, tree, cpu)

    def _sample_memory(self, table: ProcTable, tree: set[int], cpu: dict[int, float]) -> None:
        rss = pss = 0
        for pid in tree:
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu.get(pid, 0.0))
            memory = memory_kb(pid)  # Pss: shared pages divided among their users, what a tree really holds
            rss += memory.get("VmRSS", 0)
            pss += memory.get("Pss", 0)
            if memory.get("VmHWM", 0) > self.hwm.get(pid, (0, None))[0]:
                self.hwm[pid] = (memory["VmHWM"], table[pid][1])
        self.peak_tree_rss = max(self.peak_tree_rss, rss)
        self.peak_tree_pss = max(self.peak_tree_pss, pss)

    @property
    def builds_seen(self) -> set[int]:
        return set(self.seen)

    @property
    def cpu_seconds(self) -> float:
        """CPU time (user + system) of every process seen in the tree, summed."""
        return sum(self.cpu.values())

    def peak(self, match: Callable[[list[str]], bool]) -> tuple[int, list[str] | None]:
        """(largest VmHWM in kB, its argv) among the processes whose argv satisfies match(argv)."""
        found = [(kb, argv) for kb, argv in self.hwm.values() if argv and match(argv)]
        return max(found, key=lambda x: x[0]) if found else (0, None)


class GroupSampler(Sampler):
    """The process groups led by direct children of this process (the runner starts packer in a new
    session: its group ID is its PID), and every command line seen in them."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.argvs: set[str] = set()
        self.groups: set[int] = set()

    def sample(self) -> None:
        me = os.getpid()
        self.groups |= {pid for pid, _state, ppid, pgid in proc_stats() if ppid == me and pgid == pid} - {me}
        for group in self.groups:
            self.argvs.update(filter(None, map(cmdline, group_members(group))))

    def leftovers(self) -> list[int]:
        return [pid for group in self.groups for pid in group_members(group)]
