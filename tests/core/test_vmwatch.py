"""The build VM's watch while packer waits for SSH (build/vmwatch.py), with a stand-in PveApi and a stepped clock."""

from unittest.mock import MagicMock

import pytest

from packer_assets.build.vmwatch import WITHHELD, VmWatch, WatchedVm, console_tail
from packer_assets.evidence.layout import Redactor

WAITING = "==> proxmox-iso.debian: Waiting for SSH to become available..."
CONNECTED = "==> proxmox-iso.debian: Connected to SSH!"
INTERVAL = 5.0


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def stand_in(*answers):
    """A PveApi whose nodes(n).qemu(v).status.current.get() gives each answer in turn (an exception is raised)."""
    api = MagicMock()
    api.nodes.return_value.qemu.return_value.status.current.get.side_effect = [
        a if isinstance(a, Exception) else {"status": a} for a in answers
    ]
    return api


def gets(api) -> int:
    return api.nodes.return_value.qemu.return_value.status.current.get.call_count


def watch_of(api, console_log=None, **options):
    notes = []
    clock = Clock()
    watch = VmWatch(WatchedVm(api, "pve1", 9100, console_log), interval=INTERVAL, clock=clock, note=notes.append,
                    redact=Redactor(["Sup3rS3cretPw"]), **options)
    return watch, clock, notes


def test_a_vm_that_stops_while_packer_waits_for_ssh_is_the_verdict_with_its_console_tail(tmp_path):
    console = tmp_path / "9100.log"
    console.write_text("".join(f"installer line {n}\n" for n in range(10)) + "lab: install failed: no disk\n")
    api = stand_in("running", "running", "stopped")
    watch, clock, _notes = watch_of(api, console_log=str(tmp_path / "{vmid}.log"))
    assert watch.stop_reason() is None and gets(api) == 0  # not waiting for SSH yet: nothing asked
    watch.see(WAITING)
    assert watch.stop_reason() is None and gets(api) == 1
    clock.now = 1.0
    assert watch.stop_reason() is None and gets(api) == 1  # within the interval: not asked again
    clock.now = 5.0
    assert watch.stop_reason() is None
    clock.now = 10.0
    reason = watch.stop_reason()
    api.nodes.assert_called_with("pve1")
    api.nodes.return_value.qemu.assert_called_with(9100)
    assert reason == (f"VM 9100 on node pve1 stopped before SSH came up; its console ({console}) ends: "
                      "installer line 6 | installer line 7 | installer line 8 | installer line 9 | "
                      "lab: install failed: no disk")
    assert "\n" not in reason
    clock.now = 20.0
    assert watch.stop_reason() is None and gets(api) == 3  # said once


def test_a_vm_that_never_stops_never_trips_it_and_ssh_up_ends_the_watch():
    api = stand_in(*["running"] * 5, "stopped")
    watch, clock, _notes = watch_of(api)
    watch.see(WAITING)
    for step in range(5):
        clock.now = step * INTERVAL
        assert watch.stop_reason() is None
    watch.see(CONNECTED)  # provisioners and packer's own shutdown follow: a stop is no longer a failure
    clock.now = 100.0
    assert watch.stop_reason() is None and gets(api) == 5


def test_packer_s_own_error_ends_the_watch():
    """Packer failed by itself (its verdict first), then its cleanup stops the VM: not the watch's verdict."""
    api = stand_in("stopped")
    watch, _clock, _notes = watch_of(api)
    watch.see(WAITING)
    watch.see("error: Timeout waiting for SSH.")
    assert watch.stop_reason() is None and gets(api) == 0


def test_api_errors_while_polling_are_said_once_and_never_end_a_good_build():
    api = stand_in(ConnectionError("reset"), RuntimeError("500 Sup3rS3cretPw"), "running", "stopped")
    watch, clock, notes = watch_of(api)
    watch.see(WAITING)
    for step in range(3):
        clock.now = step * INTERVAL
        assert watch.stop_reason() is None
    assert notes == ["cannot read VM 9100's status (ConnectionError): the build goes on, packer's ssh_timeout "
                     "still bounds it"]
    assert watch.api_errors == 2
    clock.now = 3 * INTERVAL
    assert watch.stop_reason().startswith("VM 9100 on node pve1 stopped before SSH came up")  # still watching


@pytest.mark.parametrize("console_log, said", [
    (None, "(no console log kept: PACKER_ASSETS_CONSOLE_LOG is not set)"),
    ("{tmp}/{{vmid}}.log", "(its console log {tmp}/9100.log is empty or missing)"),
])
def test_the_verdict_says_when_there_is_no_console_to_quote(tmp_path, console_log, said):
    watch, _clock, _notes = watch_of(stand_in("stopped"), console_log=console_log and console_log.format(tmp=tmp_path))
    watch.see(WAITING)
    assert watch.stop_reason() == "VM 9100 on node pve1 stopped before SSH came up " + said.format(tmp=tmp_path)


def test_the_console_tail_never_quotes_a_secret(tmp_path):
    console = tmp_path / "c.log"
    console.write_text("d-i passwd/user-password password hunter22\nuser:$6$salt$hash:19000:0\n"
                       "token: abc\n\nchpasswd for packer\n-----BEGIN OPENSSH PRIVATE KEY-----\n"
                       "login as packer with Sup3rS3cretPw\nInstallation step failed\n")
    tail = console_tail(console, Redactor(["Sup3rS3cretPw"]), lines=7)
    assert tail == [WITHHELD] * 5 + ["login as packer with ***", "Installation step failed"]
    assert console_tail(tmp_path / "missing.log", Redactor()) == []
