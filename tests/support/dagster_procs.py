"""Real Dagster processes for the end-to-end tests: code server, daemon, webserver; and what they did.

Every process is started in its own session and stopped by its process group id (its own pid), so a
test ends exactly what it started. The packer builds under them are watched with
packer_assets_lab.proctree.TreeSampler: the concurrency the tests assert is observed, not inferred from
Dagster's bookkeeping.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from support import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.25,
             on_timeout: Callable[[], str] = lambda: ""):
    """check() until truthy (returned); AssertionError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen

    @classmethod
    def start(cls, name: str, argv: list[str], env: dict[str, str], logdir: Path, cwd: Path = REPO) -> "Proc":
        _children_get_default_sigint()
        logdir.mkdir(parents=True, exist_ok=True)
        log = logdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, argv, log, proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group this Proc started (its pid), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} (pid {self.proc.pid}) still running {timeout:.0f}s after SIGTERM: SIGKILL")
        try:  # children (run workers) left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)


def _children_get_default_sigint() -> None:
    """Dagster's processes make SIGTERM do what SIGINT does; if SIGINT came in ignored (a background job
    of a non-interactive shell), they would ignore SIGTERM too. A handler here is reset to the
    default in a child, an ignored signal is not."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def dagster_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({"DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1", "CHECKPOINT_DISABLE": "1"})
    env.update(extra or {})
    return env


def dagster_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "dagster"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"dagster {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


# ------------------------------------------------------------------ observing packer processes


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at t closes before a start at t)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda p: (p[0], p[1]))
    best = current = 0
    for _t, delta in points:
        current += delta
        best = max(best, current)
    return best
