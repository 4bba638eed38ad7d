"""One run per key, whatever starts it (the UI, a schedule, `make build`, a second terminal).

A run takes an exclusive `flock` on `output/locks/<key>.lock` before it touches the key and keeps it
until its process ends. The kernel drops the lock when the process ends, however it ends (`kill -9`,
the OOM killer, a reboot), so a dead run never leaves a stale lock behind. A Dagster run executes all
its steps in one process (the in-process executor), so the first step's lock covers the whole run;
the later steps find it held by their own process and go on.

The lock file also says who holds it (pid, run ID, since when), so the one who waits is told.
The descriptor is not inherited by children (Python opens it close-on-exec): a `packer` that outlives
its run does not keep the key locked.
"""

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packer_assets.errors import OperationError

# lock file -> descriptor, for the locks this process holds
_HELD: dict[Path, int] = {}


class KeyBusy(OperationError):
    """Another live run holds the key (only raised when not waiting)."""


def holder(lock_file: Path) -> dict[str, Any]:
    """Who holds (or last held) the lock, as written by that process; {} when unknown."""
    try:
        info = json.loads(Path(lock_file).read_text() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return (
        f"run {info.get('run_id') or '(no run ID)'} (pid {info.get('pid')} on {info.get('host')}, "
        f"since {info.get('since')})"
    )


def hold_key(
    lock_file: Path,
    key: str,
    run_id: str | None,
    *,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    poll: float = 1.0,
    say_every: float = 60.0,
) -> bool:
    """Take the key's lock for the rest of this process. True if taken now, False if this process held it.

    Held by another process: wait (polling, so a run cancellation still interrupts the wait), telling
    `on_wait` who holds it, at once and then every `say_every` seconds; or with wait=False raise KeyBusy.
    """
    lock_file = Path(lock_file).resolve()
    if lock_file in _HELD:
        return False
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    said_at = None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                message = f"{key}: {describe(holder(lock_file))} is working on this key"
                if not wait:
                    raise KeyBusy(f"{message}: try again when it has finished") from None
                now = time.monotonic()
                if on_wait and (said_at is None or now - said_at >= say_every):
                    on_wait(f"{message}: waiting for it to finish")
                    said_at = now
                time.sleep(poll)
    except BaseException:
        os.close(fd)
        raise
    info = {
        "key": key,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "run_id": run_id,
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[lock_file] = fd
    return True


def holds(lock_file: Path) -> bool:
    """Whether this process holds the key's lock (hold_key)."""
    return Path(lock_file).resolve() in _HELD


@contextmanager
def key_if_free(lock_file: Path) -> Iterator[bool]:
    """For work on a key this run does not own: True, with the key's lock held for the block, when no
    process works on the key (or this one holds it already); False when another live run does."""
    if holds(lock_file):
        yield True
        return
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def release_key(lock_file: Path) -> None:
    """Let go before the process ends (tests, long-lived callers); a no-op if not held here."""
    fd = _HELD.pop(Path(lock_file).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an flock on lock_file for a short critical section (a file rewrite), waiting for whoever holds
    it. Unlike hold_key, released when the block ends; the kernel drops it too if the process dies."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
