"""/proc, read: the one place that knows its format. The packer runner asks whether its process group is
empty, the run recovery whether a run's worker still lives; the lab whether a pid is its own service
(`process_argv`) and which QEMU processes it left (`proc_table`); the tests and benchmarks sample packer's
process tree with `proc_table` and its memory with `memory_kb`."""

import os
from collections.abc import Iterator


def process_alive(pid: int, started_before: float | None = None) -> bool:
    """Is `pid` a live (non-zombie) process? With `started_before` (a Unix time): and is it the process
    that was running then, not a later one that reuses the PID?"""
    fields = _stat_fields(str(pid))
    if not fields or len(fields) < 20 or fields[0] in ("Z", "X"):
        return False
    if started_before is None:
        return True
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK") <= started_before + 1.0


def _boot_time() -> float:
    with open("/proc/stat", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _stat_fields(pid: str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgid, ...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().decode(errors="replace").rpartition(")")[2].split()
    except OSError:
        return None


def proc_stats() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgid) of every process, from /proc/<pid>/stat."""
    for entry in os.listdir("/proc"):
        fields = _stat_fields(entry) if entry.isdigit() else None
        if fields and len(fields) > 2:
            yield int(entry), fields[0], int(fields[1]), int(fields[2])


def process_argv(pid: int | str) -> list[str] | None:
    """A process's command line, from /proc/<pid>/cmdline; None if it is gone or not ours to read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return None


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS (/proc/<pid>/status) and Pss (smaps_rollup: shared pages divided among their users)
    of a process in kB; what is gone or unreadable is left out."""
    out: dict[str, int] = {}
    for name, keys in (("status", ("VmHWM:", "VmRSS:")), ("smaps_rollup", ("Pss:",))):
        try:
            with open(f"/proc/{pid}/{name}") as fh:
                for line in fh:
                    if line.startswith(keys):
                        out[line.split(":")[0]] = int(line.split()[1])
        except OSError:
            pass
    return out


def proc_table(cpu: dict[int, float] | None = None) -> dict[int, tuple[int, list[str]]]:
    """pid -> (ppid, argv) of every readable process; with `cpu`, also pid -> utime+stime seconds into it
    (the tests and benchmarks watch packer's process tree with it)."""
    table: dict[int, tuple[int, list[str]]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        fields = _stat_fields(entry) if entry.isdigit() else None
        if not fields or len(fields) < 13 or (argv := process_argv(entry)) is None:
            continue
        table[int(entry)] = (int(fields[1]), argv)
        if cpu is not None:
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    return table


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`, from /proc."""
    return [pid for pid, state, _ppid, group in proc_stats() if state != "Z" and group == pgid]
