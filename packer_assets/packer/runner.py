"""`packer build` as a watched subprocess: streamed, parsed, bounded in time, cancellable.

- Packer runs in its own session / process group (start_new_session): a Ctrl-C or a SIGTERM meant for
  the calling process never reaches it directly, so Packer gets exactly the signals sent here.
- Credentials travel only in `env` (see env.py); argv is `packer build -machine-readable -color=false
  <workdir>` and the variables come from the work directory's *.auto.pkrvars.json.
- Every output line goes to the RunLog (redacted, chain-prefixed, echoed to stdout by the log's echo);
  stage lines (`==> source: ...`) and errors also go to `on_stage`, in the calling thread.
- A `watch` (RunWatch) sees every stage line and, between lines, may give a reason to stop (the build's
  VmWatch: the VM stopped while packer waits for SSH): packer is stopped as on a cancel, PackerStopped says why.
- Stopping (cancel_event set, overall timeout, a watch's reason, or ANY BaseException in the calling thread while it
  waits: KeyboardInterrupt, SystemExit, Dagster's interrupt): ONE SIGINT to the group, which is what
  Packer's own Ctrl-C cleanup (stop + delete the VM) answers to; a grace period; then SIGKILL to the
  group if anything is left. A second interrupt during the grace period skips to SIGKILL.
- The leader is not reaped until the group is known empty (waitid WNOWAIT), so its process group ID
  cannot be reused by an unrelated process while signals are still being sent to it.
- Packer dies with its run: it is started with PR_SET_PDEATHSIG = SIGINT, so should the calling process
  die without a word (`kill -9`, the OOM killer), Packer gets the same one SIGINT and cleans up as if
  cancelled, instead of going on alone; whatever it leaves, the key's next build sweeps.
"""

from __future__ import annotations

import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from packer_assets.errors import OperationError
from packer_assets.evidence.chain import ChainId
from packer_assets.evidence.layout import BUILD_LOG_NAME, Layout, Redactor, RunLog
from packer_assets.runs.procs import group_members

_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork
PR_SET_PDEATHSIG = 1
DEFAULT_GRACE = 60.0
STRAGGLER_GRACE = 5.0  # after packer exited: how long its plugins may take to follow
_COMMA = "%!(PACKER_COMMA)"


class PackerError(OperationError):
    """A build that did not produce a template; the message names the log and the first errors."""

    def __init__(
        self,
        message: str,
        *,
        log_path: Path | None,
        errors: Iterable[str] = (),
        exit_code: int | None = None,
        reason: str = "failed",
    ):
        super().__init__(message)
        self.log_path = log_path
        self.errors = list(errors)
        self.exit_code = exit_code
        self.reason = reason


class PackerCancelled(PackerError):
    """Stopped on request (cancel_event)."""


class PackerTimeout(PackerError):
    """Stopped because the overall timeout passed."""


class PackerStopped(PackerError):
    """Stopped because the run's watch gave a reason (its message leads with it)."""


class RunWatch(Protocol):
    """What else may end a build: told each stage line (`==> ...`, `error: ...`), asked between lines."""

    def see(self, text: str) -> None: ...

    def stop_reason(self) -> str | None: ...


@dataclass
class PackerResult:
    artifact_id: str | None
    vmid: int | None
    exit_code: int
    errors: list[str]
    duration: float
    log_path: Path | None  # None when the log given has no `path`
    stages: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MachineLine:
    timestamp: str
    target: str
    type: str
    data: tuple[str, ...]


class BuildLog(Protocol):
    """What run_packer writes to: a RunLog, or anything with `.line(stage, text)`; `.path` and `.redact` are
    read when present (getattr)."""

    def line(self, stage: str, text: str) -> object: ...


def unescape(value: str) -> str:
    return value.replace(_COMMA, ",").replace("\\n", "\n").replace("\\r", "\r")


def parse_machine_line(line: str) -> MachineLine | None:
    """`timestamp,target,type,data...` (Packer's -machine-readable), or None for any other line."""
    parts = line.rstrip("\r\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    return MachineLine(parts[0], parts[1], parts[2], tuple(unescape(p) for p in parts[3:]))


def open_build_log(
    layout: Layout,
    key: str,
    chain: ChainId,
    redactor: Redactor | None = None,
    echo: Callable[[str], None] | None = None,
) -> RunLog:
    """`output/logs/packer/builds/<key>/<chain stamp>/packer.log`; `latest` moves when it is closed."""
    return RunLog(layout.build_log_dir(key, chain.stamp) / BUILD_LOG_NAME, str(chain), redactor, echo or echo_stdout)


# ------------------------------------------------------------------ the stream


class _Stream:
    """Turns output lines into log lines, stage callbacks, errors and the artifact."""

    def __init__(self, log: BuildLog, on_stage: Callable[[str], None] | None):
        self.log = log
        self.redact: Callable[[str], str] = getattr(log, "redact", None) or (lambda text: text)
        self.on_stage = on_stage
        self.errors: list[str] = []
        self.build_errors: list[str] = []  # packer's own verdict per build (`<target>,error,...`): the cause
        self.stages: list[str] = []
        self.artifacts: dict[str, dict[str, str]] = {}

    def _error(self, text: str) -> None:
        text = self.redact(text.strip())
        if text and text not in self.errors:
            self.errors.append(text)
            if self.on_stage:
                self.on_stage("error: " + text)

    def feed(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        msg = parse_machine_line(line)
        if msg is None:
            if line.strip():
                self.log.line("packer", line)
            return
        if msg.type == "ui" and len(msg.data) >= 2:
            kind, text = msg.data[0], ",".join(msg.data[1:])
            for part in text.splitlines() or [""]:
                self.log.line("packer:error" if kind == "error" else "packer", part)
            if kind == "error":
                self._error(text)
            elif kind == "say" and text.startswith("==> "):
                clean = self.redact(text)
                self.stages.append(clean)
                if self.on_stage:
                    self.on_stage(clean)
            return
        if msg.type == "artifact" and len(msg.data) >= 2:
            index, name, value = msg.data[0], msg.data[1], ",".join(msg.data[2:])
            self.artifacts.setdefault(index, {})[name] = value
        if msg.type == "error" and msg.data:
            text = self.redact(",".join(msg.data).strip())
            if text and text not in self.build_errors:
                self.build_errors.append(text)
            self._error(",".join(msg.data))
        self.log.line("packer", " ".join(filter(None, [msg.target, msg.type, *msg.data])))

    def ordered_errors(self) -> list[str]:
        """Packer's verdicts first (e.g. "Script exited with non-zero exit status: 1"), then the error lines in
        order: a provisioner's stderr (systemctl's chatter, say) is error output too, but not the cause."""
        return self.build_errors + [e for e in self.errors if e not in self.build_errors]

    def artifact_id(self) -> str | None:
        for index in sorted(self.artifacts):
            if self.artifacts[index].get("id"):
                return self.artifacts[index]["id"]
        return None


# ------------------------------------------------------------------ process group helpers


def _exited(pid: int) -> bool:
    """Has the child exited? Leaves it unreaped (a zombie holds its PID and process group ID)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _interrupt_when_parent_dies(parent: int) -> Callable[[], None]:
    """For preexec_fn (runs in the child between fork and exec: async-signal-safe calls only)."""

    def setup() -> None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGINT)

    return setup


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


# ------------------------------------------------------------------ run


class _Run:
    def __init__(self, proc: subprocess.Popen[bytes], stream: _Stream, log: BuildLog, grace: float):
        if proc.stdout is None:
            raise ValueError("packer's process must be started with stdout=PIPE")
        self.proc, self.stream, self.log, self.grace = proc, stream, log, grace
        self.stdout = proc.stdout
        self.pgid = proc.pid  # start_new_session: the leader's PID is the group's ID
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.eof = threading.Event()
        self.reader = threading.Thread(target=self._read, name=f"packer-{proc.pid}-stdout", daemon=True)
        self.reader.start()
        self.signals: list[str] = []

    def _read(self) -> None:
        try:
            for raw in iter(self.stdout.readline, b""):
                self.lines.put(raw)
        finally:
            self.eof.set()
            self.lines.put(None)

    def pump(self, wait: float) -> None:
        """Feed every waiting line to the stream; wait up to `wait` seconds for the first."""
        try:
            item = self.lines.get(timeout=wait)
        except queue.Empty:
            return
        while item is not None:
            self.stream.feed(item)
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                return

    def finished(self) -> bool:
        return _exited(self.proc.pid) and self.eof.is_set()

    def wait_exit(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if _exited(self.proc.pid):
                return True
            self.pump(0.1)
        return _exited(self.proc.pid)

    def stop(self, why: str) -> None:
        """One SIGINT, the grace period, then SIGKILL for whatever is left of the group."""
        self.log.line(
            "packer-runner",
            f"{why}: SIGINT to packer's process group {self.pgid}; waiting up to "
            f"{self.grace:g}s for packer's own cleanup",
        )
        if _signal_group(self.pgid, signal.SIGINT):
            self.signals.append("SIGINT")
        try:
            exited = self.wait_exit(self.grace)
        except BaseException:
            self.log.line("packer-runner", "interrupted again during the grace period: SIGKILL now")
            self.kill()
            raise
        if not exited:
            self.log.line("packer-runner", f"packer did not exit within {self.grace:g}s: SIGKILL to the group")
            self.kill()
        # Exited in time: plugins still finishing get STRAGGLER_GRACE in reap() before any SIGKILL.

    def kill(self) -> None:
        if group_members(self.pgid) and _signal_group(self.pgid, signal.SIGKILL):
            self.signals.append("SIGKILL")

    def reap(self) -> int:
        """Make sure nothing of the group is left, then reap the leader."""
        if not _exited(self.proc.pid):
            self.kill()
        if group_members(self.pgid):
            # Packer exited, some plugin did not: give it a moment, then kill it.
            end = time.monotonic() + STRAGGLER_GRACE
            try:
                while group_members(self.pgid) and time.monotonic() < end:
                    time.sleep(0.05)
            finally:  # also when interrupted while waiting: nothing of the group outlives the run
                if group_members(self.pgid):
                    self.log.line("packer-runner", f"processes left in group {self.pgid} after packer exited: SIGKILL")
                    self.kill()
        code = self.proc.wait()
        self.reader.join(timeout=5)
        while not self.lines.empty():
            self.pump(0)
        self.stdout.close()
        return code


def _watched(on_stage: Callable[[str], None] | None, watch: RunWatch | None) -> Callable[[str], None] | None:
    """on_stage, with the watch told each stage line first."""
    if watch is None:
        return on_stage

    def stage(text: str) -> None:
        watch.see(text)
        if on_stage is not None:
            on_stage(text)

    return stage


def run_packer(
    workdir: Path,
    env: dict[str, str],
    log: BuildLog,
    *,
    timeout: float | None = None,
    on_stage: Callable[[str], None] | None = None,
    cancel_event: threading.Event | None = None,
    grace: float = DEFAULT_GRACE,
    packer: str = "packer",
    extra_args: Iterable[str] = (),
    poll: float = 0.1,
    watch: RunWatch | None = None,
) -> PackerResult:
    """Run `packer build` on a prepared work directory; see the module doc.

    log: a RunLog (or anything with `.line(stage, text)`, `.path` and optionally `.redact`); it is not
    closed here (the caller may log more and closes it, which moves `latest`).
    Returns a PackerResult for a build that made an artifact; raises PackerCancelled / PackerTimeout /
    PackerError otherwise; an interrupt of the calling thread is re-raised after the group is gone.
    """
    workdir = Path(workdir).resolve()
    log_path = Path(getattr(log, "path", "")) if getattr(log, "path", None) else None
    binary = shutil.which(packer, path=env.get("PATH")) if os.sep not in packer else packer
    if not binary or not workdir.is_dir():
        what = f"packer binary {packer!r} not found on PATH" if not binary else f"work directory {workdir} missing"
        log.line("packer-runner", what)
        raise PackerError(f"{what}; log: {log_path}", log_path=log_path)
    argv = [binary, "build", "-machine-readable", "-color=false", *extra_args, str(workdir)]
    log.line("packer-runner", "run: " + " ".join(argv))
    log.line("packer-runner", "environment: " + ", ".join(sorted(env)))  # names only

    stream = _Stream(log, _watched(on_stage, watch))
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_interrupt_when_parent_dies(os.getpid()),
        )
    except OSError as exc:
        log.line("packer-runner", f"cannot start packer: {exc}")
        raise PackerError(f"cannot start {binary}: {exc.strerror}; log: {log_path}", log_path=log_path) from None
    run = _Run(proc, stream, log, grace)
    reason, interrupt, exited_at, stopped_why = None, None, None, None
    try:
        try:
            while not run.finished():
                run.pump(poll)
                if cancel_event is not None and cancel_event.is_set():
                    reason = "cancelled"
                elif timeout is not None and time.monotonic() - started > timeout:
                    reason = "timeout"
                elif watch is not None and (stopped_why := watch.stop_reason()):
                    reason = "stopped"
                if reason:
                    break
                if _exited(proc.pid) and not run.eof.is_set():
                    # Packer exited but something still holds its output pipe: give it a moment, then
                    # let reap() deal with the group rather than hang here.
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > STRAGGLER_GRACE:
                        break
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt, SystemExit, Dagster's interrupt
            interrupt, reason = exc, "interrupted"
        if reason and not _exited(proc.pid):
            run.stop(
                {
                    "cancelled": "cancel requested",
                    "timeout": f"timeout after {timeout:g}s" if timeout else "",
                    "interrupted": f"interrupted ({type(interrupt).__name__})",
                    "stopped": f"{stopped_why}",
                }[reason]
            )
    finally:
        code = run.reap()
    duration = time.monotonic() - started
    errors = stream.ordered_errors()
    log.line(
        "packer-runner",
        f"packer exited {code} after {duration:.1f}s"
        + (f" ({reason}; signals sent: {', '.join(run.signals) or 'none'})" if reason else ""),
    )
    if interrupt is not None:
        raise interrupt
    first = "; ".join(errors[:3]) or "no error lines"
    # Stopped from here: the kind of stop names the error; its message is made only for the stop that happened.
    stops: dict[str, tuple[type[PackerError], Callable[[], str]]] = {
        "cancelled": (
            PackerCancelled,
            lambda: f"packer build cancelled (exit {code}); log: {log_path}; first errors: {first}",
        ),
        "stopped": (PackerStopped, lambda: f"{stopped_why}; packer stopped (exit {code}); log: {log_path}"),
        "timeout": (
            PackerTimeout,
            lambda: f"packer build timed out after {timeout:g}s (exit {code}); log: {log_path}; first errors: {first}",
        ),
    }
    if reason in stops:
        kind, message = stops[reason]
        raise kind(message(), log_path=log_path, errors=errors, exit_code=code, reason=reason)
    if code != 0:
        raise PackerError(
            f"packer build failed (exit {code}); log: {log_path}; first errors: {first}",
            log_path=log_path,
            errors=errors,
            exit_code=code,
        )
    artifact = stream.artifact_id()
    if artifact is None:
        raise PackerError(
            f"packer build exited 0 but reported no artifact; log: {log_path}",
            log_path=log_path,
            errors=errors,
            exit_code=code,
        )
    vmid = int(artifact) if artifact.isdigit() else None
    return PackerResult(artifact, vmid, code, errors, duration, log_path, stream.stages)


# ------------------------------------------------------------------ validate / init


@dataclass
class PackerCheck:
    ok: bool
    exit_code: int
    output: str
    argv: list[str]


def _simple(
    argv: list[str], workdir: Path, env: dict[str, str], timeout: float, redact: Callable[[str], str] | None = None
) -> PackerCheck:
    try:
        done = subprocess.run(
            argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
        code, output = done.returncode, (done.stdout + done.stderr)
    except subprocess.TimeoutExpired as exc:
        code, output = -1, f"{argv[1]} timed out after {timeout:g}s: {exc.output or ''}"
    output = redact(output) if redact else output
    return PackerCheck(code == 0, code, output.strip(), argv)


def packer_validate(
    workdir: Path,
    env: dict[str, str],
    *,
    packer: str = "packer",
    syntax_only: bool = False,
    timeout: float = 120.0,
    redact: Callable[[str], str] | None = None,
) -> PackerCheck:
    """`packer validate [-syntax-only] <workdir>` (1.6.6's full validate checks the builder config
    without connecting; it needs a login configured: env.validate_env gives a placeholder one)."""
    binary = shutil.which(packer, path=env.get("PATH")) or packer
    argv = [binary, "validate", *(["-syntax-only"] if syntax_only else []), str(Path(workdir).resolve())]
    return _simple(argv, Path(workdir), env, timeout, redact)


def packer_init(
    workdir: Path,
    env: dict[str, str],
    *,
    packer: str = "packer",
    timeout: float = 600.0,
    redact: Callable[[str], str] | None = None,
) -> PackerCheck:
    """`packer init <workdir>`: installs required_plugins (only generated where caps.needs_init)."""
    binary = shutil.which(packer, path=env.get("PATH")) or packer
    return _simple([binary, "init", str(Path(workdir).resolve())], Path(workdir), env, timeout, redact)


def echo_stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
