"""Watching the build VM while packer waits for SSH: a VM that stopped ends the build at once.

Packer 1.6.6 does not watch the VM while it waits for the communicator: when the install fails and the VM
powers off, packer waits until `ssh_timeout` (30-60 minutes). `VmWatch` is told packer's stage lines
(`see`) and asked between them (`stop_reason`, the runner's RunWatch):

- it arms on `Waiting for SSH to become available...` (WinRM alike): packer started the VM before that step;
- while armed it reads `GET /nodes/{node}/qemu/{vmid}/status/current`, at most once per `interval` seconds;
- `stopped` is the verdict: one line naming the VM, its node and the last lines of its console log where
  one is kept (PACKER_ASSETS_CONSOLE_LOG, `{vmid}` filled in); the runner then stops packer as on a cancel;
- it disarms for good on `Connected to SSH!` (the provisioners and packer's own shutdown follow) or on any
  error packer reports (packer's own verdict, then its cleanup, which stops the VM itself);
- an API error while polling is never a verdict: it is counted and said once through `note`, and the build
  goes on (packer's ssh_timeout still bounds it), so a flaky API cannot fail a good build.
"""

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packer_assets.pve.client import PveApi

POLL_INTERVAL = 5.0  # seconds between two status reads while packer waits for SSH
CONSOLE_LINES = 5  # the last lines of the console log quoted in the verdict
CONSOLE_TAIL_BYTES = 16 * 1024
WAITING = re.compile(r"Waiting for (SSH|WinRM) to become available")
CONNECTED = re.compile(r"Connected to (SSH|WinRM)")
# A console line that may carry a secret is withheld whole (known secrets are redacted besides): crypt hashes,
# any mention of a password, passphrase, secret, token, API key or private key (a preseed's
# `passwd/user-password password <text>` has no `=` to key on).
SECRET_LOOKING = re.compile(
    r"\$(1|2[abxy]?|5|6|y|gy|7)\$|pass(word|wd|phrase)|secret|token|api[_-]?key|private key", re.I
)
WITHHELD = "[line withheld: it looks like a secret]"


@dataclass(frozen=True)
class WatchedVm:
    """The build VM: where to ask for its status, and where its serial console is logged (if anywhere)."""

    api: PveApi
    node: str
    vmid: int
    console_log: str | None = None  # PACKER_ASSETS_CONSOLE_LOG: a path with `{vmid}`


def console_tail(path: Path, redact: Callable[[str], str], lines: int = CONSOLE_LINES) -> list[str]:
    """The file's last `lines` non-blank lines, redacted, secret-looking ones withheld; [] when unreadable."""
    try:
        with path.open("rb") as console:
            console.seek(max(0, path.stat().st_size - CONSOLE_TAIL_BYTES))
            text = console.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    last = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return [WITHHELD if SECRET_LOOKING.search(line) else redact(line) for line in last]


class VmWatch:
    """See the module doc. `clock` and `interval` are parameters so tests step time without sleeping."""

    def __init__(
        self,
        vm: WatchedVm,
        *,
        interval: float = POLL_INTERVAL,
        redact: Callable[[str], str] = str,
        note: Callable[[str], object] = lambda _text: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.vm, self.interval, self.redact, self.note, self.clock = vm, interval, redact, note, clock
        self.armed = False
        self.done = False  # SSH came up or packer failed on its own: nothing left to watch
        self.next_poll = 0.0
        self.polls = 0
        self.api_errors = 0

    def see(self, text: str) -> None:
        """A stage line of packer's (`==> ...`, `error: ...`)."""
        if text.startswith("error: ") or CONNECTED.search(text):
            self.armed, self.done = False, True
        elif WAITING.search(text) and not self.done:
            self.armed = True

    def stop_reason(self) -> str | None:
        """Why packer must stop now (the VM stopped before SSH came up), or None."""
        if not self.armed or self.clock() < self.next_poll:
            return None
        self.next_poll = self.clock() + self.interval
        self.polls += 1
        try:
            status = self.vm.api.nodes(self.vm.node).qemu(self.vm.vmid).status.current.get()
        except Exception as exc:  # noqa: BLE001 - any failure to ask is no verdict on the VM
            self.api_errors += 1
            if self.api_errors == 1:
                self.note(
                    self.redact(
                        f"cannot read VM {self.vm.vmid}'s status ({type(exc).__name__}): "
                        "the build goes on, packer's ssh_timeout still bounds it"
                    )
                )
            return None
        if (status or {}).get("status") != "stopped":
            return None
        self.armed, self.done = False, True
        return self.verdict()

    def verdict(self) -> str:
        """One line: the VM, its node, and its console's last lines where a console log is kept."""
        where = f"VM {self.vm.vmid} on node {self.vm.node} stopped before SSH came up"
        if not self.vm.console_log:
            return f"{where} (no console log kept: PACKER_ASSETS_CONSOLE_LOG is not set)"
        path = Path(self.vm.console_log.format(vmid=self.vm.vmid))
        tail = console_tail(path, self.redact)
        if not tail:
            return f"{where} (its console log {path} is empty or missing)"
        return f"{where}; its console ({path}) ends: " + " | ".join(tail)
