"""Proxmox tasks (UPIDs): the one place that waits for them, follows their log and quotes PVE's words.

Many PVE calls answer with a task ID and do the work in the background (create, clone, start, stop,
destroy, download-url). `follow_task` waits for one, passing its log lines on as they come, and returns
its final status; `run_task` is the common case: wait, and raise unless it ended OK.
"""

import time
from collections.abc import Callable
from typing import Any

from proxmoxer.core import ResourceException
from proxmoxer.tools import Tasks

from packer_assets.errors import OperationError
from packer_assets.pve.client import PveApi

TASK_TIMEOUT = 300.0
Progress = Callable[[str], None]


class TaskError(OperationError):
    """A task failed, or did not finish in time; the message names what, the UPID and the exit status."""


class TaskTimeout(TaskError):
    pass


def said(exc: ResourceException) -> str:
    """PVE's own words for a failed request."""
    return f"HTTP {exc.status_code} {exc.status_message}: {str(exc.content).strip()}".strip()


def follow_task(
    api: PveApi,
    upid: str,
    *,
    timeout: float,
    on_progress: Progress | None = None,
    poll: float = 1.0,
    log_interval: float = 5.0,
    stop_on_timeout: bool = True,
) -> dict[str, Any]:
    """Wait for a task, passing its new log lines to on_progress every log_interval seconds and at the
    end. Returns the final status, whatever its exit status. On timeout raise TaskTimeout, with
    stop_on_timeout after asking the node to stop the task (a late finish would surprise the next run)."""
    node = Tasks.decode_upid(upid)["node"]
    deadline = time.monotonic() + timeout
    seen, next_log = 0, time.monotonic() + log_interval
    while True:
        status: dict[str, Any] = api.nodes(node).tasks(upid).status.get()
        now, done = time.monotonic(), status.get("status") == "stopped"
        if on_progress is not None and (done or now >= next_log):
            seen, next_log = _follow_log(api, node, upid, seen, on_progress), now + log_interval
        if done:
            return status
        if now >= deadline:
            stopped = ""
            if stop_on_timeout:
                try:
                    api.nodes(node).tasks(upid).delete()
                    stopped = " (asked the node to stop it)"
                except ResourceException:
                    pass
            raise TaskTimeout(f"task {upid} did not finish within {timeout:g}s{stopped}")
        time.sleep(poll)


def run_task(api: PveApi, upid: str | None, what: str, timeout: float = TASK_TIMEOUT, poll: float = 0.5) -> None:
    """Wait for a task and raise TaskError (naming `what`, with the exit status) unless it ended OK.
    Some calls answer null instead of a UPID when there was nothing to do: that is success."""
    if not upid:
        return
    try:
        status = follow_task(api, upid, timeout=timeout, poll=poll, stop_on_timeout=False)
    except TaskTimeout as exc:
        raise TaskTimeout(f"{what}: {exc}") from None
    if status.get("exitstatus") != "OK":
        raise TaskError(f"{what}: task {upid} failed: {status.get('exitstatus')}")


def _follow_log(api: PveApi, node: str, upid: str, seen: int, on_progress: Progress) -> int:
    while True:
        lines = api.nodes(node).tasks(upid).log.get(start=seen, limit=500)
        for line in lines:
            on_progress(line.get("t", ""))
        seen += len(lines)
        if len(lines) < 500:
            return seen
