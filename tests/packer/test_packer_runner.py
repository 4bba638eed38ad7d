"""The packer runner: a real build in the lab, a crash, cancellation (one SIGINT, grace, SIGKILL),
timeout and interrupts of the calling thread, with no secret in the log, stdout or any argv."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")
from support.packer import PACKER, REPO, catalog, fake_packer, host_ipv4, plan_for

from packer_assets.evidence.chain import new_chain_id
from packer_assets.evidence.layout import Layout, Redactor, latest
from packer_assets_lab.proctree import GroupSampler
from packer_assets.packer.env import PackerEnvError, packer_env
from packer_assets.packer.runner import (
    PackerCancelled,
    PackerError,
    PackerStopped,
    PackerTimeout,
    group_members,
    open_build_log,
    parse_machine_line,
    run_packer,
)
from packer_assets.packer.version import BuildCredentials, detect_packer
from packer_assets.packer.workdir import prepare_workdir
from packer_assets.pve.client import Endpoint

needs_packer = pytest.mark.packer
ISO_SIZE = 4 * 1024 ** 2
# packer 1.6.6 types {{ .HTTPIP }} only with a non-loopback IPv4 on this host ("No host IP found").
HTTP_IP = host_ipv4()
RENDERED = {"ubuntu": ["user-data", "meta-data"], "debian": ["preseed.cfg"], "rocky": ["ks.cfg"], "windows": []}


# ------------------------------------------------------------------ parsing


def test_parse_machine_line_unescapes_commas_and_newlines():
    line = "1700000000,proxmox-iso.ubuntu,ui,error,Build 'x' errored: a%!(PACKER_COMMA) b\\nsecond line\n"
    msg = parse_machine_line(line)
    assert (msg.timestamp, msg.target, msg.type) == ("1700000000", "proxmox-iso.ubuntu", "ui")
    assert msg.data == ("error", "Build 'x' errored: a, b\nsecond line")
    assert parse_machine_line("panic: something\n") is None
    assert parse_machine_line("1700000000,,artifact-count,1").data == ("1",)


# ------------------------------------------------------------------ a real build in the lab


def stage_iso(served, name, size=ISO_SIZE):
    async def stage():
        served.pve.store_file("local", name, size)
    served.call(stage())


def lab_build(tmp_path, served, ca_file, *, key="ubuntu-2404", ssh_host, ssh_port, ssh_password, ssh_timeout="30s",
              **plan_over):
    """Prepare a work directory for `key` against the lab; returns (entry, plan, workdir, penv)."""
    pve = served.pve
    entry = catalog().get(key)
    stage_iso(served, entry.iso.filename)
    if HTTP_IP is None:
        plan_over.setdefault("boot_command", ())
    plan = plan_for(entry, ssh_host=ssh_host, ssh_port=ssh_port, ssh_timeout=ssh_timeout, boot_wait="100ms",
                    **plan_over)
    http = tmp_path / "rendered"
    http.mkdir()
    for name in RENDERED[entry.family]:  # stand-ins: rendering is tested in test_render_*
        (http / name).write_text(f"# {name} for {key}\n")
    caps = detect_packer(PACKER)
    creds = BuildCredentials(user="root@pam", password=pve.root_password)
    workdir = tmp_path / "work"
    penv = packer_env(Endpoint(pve.url, ca_file=str(ca_file)), caps, creds, ssh_password=ssh_password,
                      workdir=tmp_path)
    prepare_workdir(workdir, entry, plan, caps, project_dir=REPO, http_dir=http, allow_degraded=True, secrets=penv.secrets)
    return entry, plan, workdir, penv


@needs_packer
def test_a_real_build_in_the_lab(lab_pve_serving, lab_pki, pve_root, lab_guest, guest_password, tmp_path, capfd):
    pve = lab_pve_serving.pve
    entry, plan, workdir, penv = lab_build(tmp_path, lab_pve_serving, lab_pki.ca_file, ssh_host=lab_guest.host,
                                           ssh_port=lab_guest.port, ssh_password=guest_password)
    chain = new_chain_id(entry.key)
    layout = Layout(tmp_path / "root")
    stages = []
    with GroupSampler() as watcher:
        with open_build_log(layout, entry.key, chain, Redactor(penv.secrets)) as log:
            result = run_packer(workdir, penv.env, log, timeout=120, on_stage=stages.append, grace=10)

    # The artifact is the template's VMID, parsed from the machine-readable stream.
    assert result.exit_code == 0 and result.errors == []
    assert result.artifact_id == str(plan.vm_id) and result.vmid == plan.vm_id
    config = pve_root.nodes("pve1").qemu(plan.vm_id).config.get()
    assert config["template"] == 1 and config["name"] == plan.vm_name
    assert config["scsi0"].startswith(f"local-lvm:base-{plan.vm_id}-disk-0,")
    assert int(config["cores"]) == entry.hardware.cores and int(config["memory"]) == entry.hardware.memory

    # Subiquity's boot line was typed, with Packer's HTTP address and port filled in.
    typed = pve.typed_text(plan.vm_id)
    if HTTP_IP is not None:
        assert f"linux /casper/vmlinuz --- autoinstall ds=nocloud-net\\;s=http://{HTTP_IP}:" in typed
        assert typed.startswith("c") and typed.endswith("initrd /casper/initrd\nboot\n")

    # Provisioners ran through the lab guest; sudo got the password on stdin, never on a command line.
    assert any("cloud-init status --wait" in lab_guest.local_path(p).read_text(errors="replace")
               for _m, p in lab_guest.uploads if p.startswith("/tmp/script_"))
    assert any("sudo -S" in c for c in lab_guest.commands), lab_guest.commands
    assert not any(guest_password in c for c in lab_guest.commands)

    # Every line in packer.log (chain-prefixed), `latest` pointing at it, stage lines to on_stage.
    log_path = layout.build_log_dir(entry.key, chain.stamp) / "packer.log"
    assert result.log_path == log_path
    text = log_path.read_text()
    assert latest(log_path.parent.parent) == log_path.parent.resolve()
    assert all(line.startswith(f"[{chain}] [") for line in text.splitlines())
    assert f"proxmox-iso.ubuntu artifact 0 id {plan.vm_id}" in text
    assert "==> proxmox-iso.ubuntu: Creating VM" in text
    assert any(s.startswith("==> proxmox-iso.ubuntu: ") for s in stages)
    assert any("Creating VM" in s for s in stages) and not any(s.startswith("error") for s in stages)
    out = capfd.readouterr().out
    assert "==> proxmox-iso.ubuntu: Creating VM" in out

    # No secret in the log, stdout, or the command line of any process of packer's group.
    assert any(" build -machine-readable -color=false " in a for a in watcher.argvs), watcher.argvs
    assert any(" plugin " in a for a in watcher.argvs), watcher.argvs  # packer's plugin processes were seen
    for secret in (pve.root_password, guest_password):
        assert secret not in text and secret not in out
        assert not [a for a in watcher.argvs if secret in a]
    assert watcher.leftovers() == []


@needs_packer
def test_cancelling_a_real_build_lets_packer_clean_up(lab_pve_serving, lab_pki, pve_root, guest_password, tmp_path):
    """SSH never answers; on cancel, ONE SIGINT makes packer stop and delete its VM by itself."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening
    try:
        entry, plan, workdir, penv = lab_build(tmp_path, lab_pve_serving, lab_pki.ca_file, ssh_host="127.0.0.1",
                                               ssh_port=closed.getsockname()[1], ssh_password=guest_password,
                                               ssh_timeout="10m", key="debian-12")
        cancel = threading.Event()
        stages = []

        def on_stage(text):
            stages.append(text)
            if "Waiting for SSH" in text:
                cancel.set()

        log = open_build_log(Layout(tmp_path / "root"), entry.key, new_chain_id(entry.key), Redactor(penv.secrets),
                             echo=lambda _line: None)
        with GroupSampler() as watcher, log, pytest.raises(PackerCancelled) as err:
            run_packer(workdir, penv.env, log, timeout=120, on_stage=on_stage, cancel_event=cancel, grace=30)
    finally:
        closed.close()
    assert str(log.path) in str(err.value)
    assert plan.vm_id not in [vm["vmid"] for vm in pve_root.nodes("pve1").qemu.get()]
    text = log.path.read_text()
    assert "SIGINT to packer's process group" in text and "SIGKILL" not in text
    assert "signals sent: SIGINT" in text
    assert watcher.leftovers() == []


# ------------------------------------------------------------------ fakes: crash, cancel, timeout, interrupt


class ListLog:
    """A RunLog-like sink for the fake runs."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[tuple[str, str]] = []
        self.redact = Redactor(["s3cr3t-value"])

    def line(self, stage, text):
        self.lines.append((stage, self.redact(text)))

    def text(self):
        return "\n".join(f"[{s}] {t}" for s, t in self.lines)


def fake_env(folder: Path) -> dict[str, str]:
    return {"PATH": f"{folder}:/usr/bin:/bin", "PROXMOX_PASSWORD": "s3cr3t-value"}


CRASH = r"""
echo "1700000000,,ui,say,==> proxmox-iso.ubuntu: Creating VM"
echo "1700000001,proxmox-iso.ubuntu,error,Error creating VM: 500 storage 'nope' does not exist%!(PACKER_COMMA) password s3cr3t-value"
echo "1700000001,,ui,error,Build 'proxmox-iso.ubuntu' errored after 1 second: Error creating VM"
echo "1700000002,,error-count,1"
echo "panic-ish stderr line" >&2
exit 1
"""


def test_a_packer_crash_raises_packer_error_naming_the_log(tmp_path):
    fake = fake_packer(tmp_path / "bin", CRASH)
    log = ListLog(tmp_path / "packer.log")
    stages = []
    with pytest.raises(PackerError) as err:
        run_packer(tmp_path, fake_env(fake.parent), log, packer=str(fake), on_stage=stages.append, grace=2)
    assert not isinstance(err.value, (PackerCancelled, PackerTimeout))
    message = str(err.value)
    assert str(log.path) in message and "exit 1" in message
    assert "Error creating VM: 500 storage 'nope' does not exist, password ***" in message
    assert "s3cr3t-value" not in message and "s3cr3t-value" not in log.text()
    assert err.value.errors[0].startswith("Error creating VM") and err.value.exit_code == 1
    assert stages[0] == "==> proxmox-iso.ubuntu: Creating VM"
    assert [s for s in stages if s.startswith("error: ")] == [f"error: {e}" for e in err.value.errors]
    assert ("packer", "panic-ish stderr line") in log.lines


PROVISIONER_FAILS = """
echo "1700000000,,ui,say,==> proxmox-iso.debian: Provisioning with shell script: /tmp/packer-shell1"
echo "1700000001,,ui,error,==> proxmox-iso.debian: Synchronizing state of qemu-guest-agent.service with SysV"
echo "1700000001,,ui,error,==> proxmox-iso.debian: The unit files have no installation config (WantedBy=%!(PACKER_COMMA)"
echo "1700000002,,ui,error,Build 'proxmox-iso.debian' errored after 1 minute: Script exited with non-zero exit status: 1"
echo "1700000002,proxmox-iso.debian,error,Script exited with non-zero exit status: 1.Allowed exit codes are: [0]"
exit 1
"""


def test_the_error_names_packers_verdict_before_a_provisioners_stderr(tmp_path):
    """A real guest's provisioner writes to stderr (systemctl's notes): packer shows those as errors too,
    but the message leads with what packer says failed."""
    fake = fake_packer(tmp_path / "bin", PROVISIONER_FAILS)
    with pytest.raises(PackerError) as err:
        run_packer(tmp_path, {"PATH": os.environ["PATH"]}, ListLog(tmp_path / "packer.log"), packer=str(fake))
    assert err.value.errors[0] == "Script exited with non-zero exit status: 1.Allowed exit codes are: [0]"
    assert "first errors: Script exited with non-zero exit status: 1" in str(err.value)


def test_exit_zero_without_an_artifact_is_an_error(tmp_path):
    fake = fake_packer(tmp_path / "bin", 'echo "1700000000,,ui,say,nothing to do"\nexit 0\n')
    with pytest.raises(PackerError, match="no artifact"):
        run_packer(tmp_path, fake_env(fake.parent), ListLog(tmp_path / "l"), packer=str(fake))


def test_an_artifact_line_gives_the_vmid(tmp_path):
    fake = fake_packer(tmp_path / "bin", 'echo "1700000000,proxmox-iso.x,artifact,0,builder-id,proxmox.iso"\n'
                                          'echo "1700000000,proxmox-iso.x,artifact,0,id,9123"\nexit 0\n')
    result = run_packer(tmp_path, fake_env(fake.parent), ListLog(tmp_path / "l"), packer=str(fake))
    assert (result.artifact_id, result.vmid, result.exit_code) == ("9123", 9123, 0)


# A packer that starts a "plugin" child in its group; both record each SIGINT they get.
# POLITE exits 1 s after SIGINT (Packer's cleanup); STUBBORN records it and keeps running.
# The plugin is Python: bash starts `&` children with SIGINT ignored, and a shell cannot trap a signal
# ignored on entry; Python can.
_MAIN = r"""
rec="$PACKER_FAKE_RECORD"
on_int() {{ echo "INT $$ main" >> "$rec"; {action}; }}
trap on_int INT
"{python}" "{plugin}" "$rec" {polite} &
echo "1700000000,,ui,say,==> proxmox-iso.fake: Waiting for SSH to become available..."
echo "started $$" >> "$rec"
while true; do sleep 0.1; done
"""
_PLUGIN = r"""
import os, signal, sys, time
rec, polite = sys.argv[1], sys.argv[2] == "1"
def on_int(signum, frame):
    with open(rec, "a") as fh:
        fh.write(f"INT {os.getpid()} plugin\n")
    if polite:
        time.sleep(1)
        sys.exit(1)
signal.signal(signal.SIGINT, on_int)
with open(rec, "a") as fh:
    fh.write(f"started {os.getpid()}\n")
while True:
    time.sleep(0.1)
"""


def trapper(tmp_path: Path, polite: bool) -> tuple[Path, Path]:
    plugin = tmp_path / "bin" / "packer-plugin-fake.py"
    plugin.parent.mkdir(parents=True, exist_ok=True)
    plugin.write_text(_PLUGIN)
    action = "sleep 1; exit 1" if polite else ":"
    script = fake_packer(tmp_path / "bin", _MAIN.format(action=action, python=sys.executable, plugin=plugin,
                                                        polite=int(polite)))
    return script, tmp_path / "signals.txt"


def wait_for(path: Path, count: int, timeout: float = 120):  # bounds a failure only
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().count("started") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"fake packer did not start: {path.read_text() if path.exists() else 'no record'}")


def int_lines(record: Path) -> list[str]:
    return [line for line in record.read_text().splitlines() if line.startswith("INT ")]


def start_cancel_when_started(record: Path, cancel: threading.Event):
    def go():
        wait_for(record, 2)
        cancel.set()
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("polite", [True, False], ids=["exits-on-sigint", "ignores-sigint"])
def test_cancel_sends_one_sigint_then_sigkill_after_the_grace_period(tmp_path, polite):
    script, record = trapper(tmp_path, polite)
    env = dict(fake_env(script.parent), PACKER_FAKE_RECORD=str(record))
    cancel = threading.Event()
    log = ListLog(tmp_path / "packer.log")
    start_cancel_when_started(record, cancel)
    # polite: it exits 1 s after SIGINT; a grace far above that keeps a loaded machine from sending SIGKILL
    grace = 60.0 if polite else 2.0
    with GroupSampler() as watcher:
        began = time.monotonic()
        with pytest.raises(PackerCancelled) as err:
            run_packer(tmp_path, env, log, packer=str(script), cancel_event=cancel, grace=grace)
        took = time.monotonic() - began
    ints = int_lines(record)
    # Exactly one SIGINT reached each process of the group (packer and its plugin): one was sent.
    assert len(ints) == 2 and {line.split()[2] for line in ints} == {"main", "plugin"}, ints
    assert str(log.path) in str(err.value) and err.value.reason == "cancelled"
    text = log.text()
    if polite:  # it exited by itself within the grace period: no SIGKILL was needed
        assert "signals sent: SIGINT)" in text and "SIGKILL" not in text
    else:
        assert "did not exit within 2s: SIGKILL" in text and "signals sent: SIGINT, SIGKILL" in text
        assert took >= grace
    assert watcher.groups and watcher.leftovers() == []


class TripsAfterSshWait:
    """A RunWatch that gives its reason once packer said it waits for SSH and both processes started."""

    def __init__(self, record: Path):
        self.record, self.seen = record, []

    def see(self, text):
        self.seen.append(text)

    def stop_reason(self):
        if any("Waiting for SSH" in text for text in self.seen):
            wait_for(self.record, 2)
            return "VM 9100 on node pve1 stopped before SSH came up; its console ends: install failed"
        return None


def test_a_watch_s_reason_stops_packer_as_a_cancel_does_and_leads_the_error(tmp_path):
    script, record = trapper(tmp_path, polite=True)
    env = dict(fake_env(script.parent), PACKER_FAKE_RECORD=str(record))
    log = ListLog(tmp_path / "packer.log")
    stages = []
    with GroupSampler() as watcher, pytest.raises(PackerStopped) as err:
        run_packer(tmp_path, env, log, packer=str(script), on_stage=stages.append, grace=60,
                   watch=TripsAfterSshWait(record))
    assert str(err.value).startswith("VM 9100 on node pve1 stopped before SSH came up; its console ends: install "
                                     "failed; packer stopped (exit ")
    assert str(log.path) in str(err.value) and err.value.reason == "stopped"
    assert len(int_lines(record)) == 2  # one SIGINT, reaching packer and its plugin
    assert "signals sent: SIGINT)" in log.text() and "SIGKILL" not in log.text()
    assert any("Waiting for SSH" in text for text in stages)  # on_stage still gets every stage line
    assert watcher.leftovers() == []


def test_timeout_takes_the_same_path(tmp_path):
    script, record = trapper(tmp_path, polite=False)
    env = dict(fake_env(script.parent), PACKER_FAKE_RECORD=str(record))
    log = ListLog(tmp_path / "packer.log")
    with GroupSampler() as watcher, pytest.raises(PackerTimeout) as err:
        run_packer(tmp_path, env, log, packer=str(script), timeout=5, grace=1)
    assert "timed out after 5s" in str(err.value) and str(tmp_path / "packer.log") in str(err.value)
    # SIGINT first, as for a cancel (what the runner says it sent: whether packer had set its trap within
    # 5 s depends on the machine's load, so the record is not asked)
    assert "(timeout; signals sent: SIGINT" in log.text()
    assert watcher.leftovers() == []


class FakeDagsterInterrupt(BaseException):
    """Like dagster's DagsterExecutionInterruptedError: a BaseException raised in the calling thread."""


def test_an_exception_in_the_calling_thread_stops_packer_and_is_reraised(tmp_path):
    script, record = trapper(tmp_path, polite=True)
    env = dict(fake_env(script.parent), PACKER_FAKE_RECORD=str(record))

    def on_stage(text):  # raised where Dagster would raise it: in the calling thread, mid-wait
        wait_for(record, 2)
        raise FakeDagsterInterrupt()

    log = ListLog(tmp_path / "packer.log")
    with GroupSampler() as watcher, pytest.raises(FakeDagsterInterrupt):
        run_packer(tmp_path, env, log, packer=str(script), on_stage=on_stage, grace=60)
    assert len(int_lines(record)) == 2
    assert "interrupted (FakeDagsterInterrupt)" in log.text()
    assert watcher.leftovers() == []


def test_ctrl_c_of_the_caller_reaches_packer_once_through_the_runner(tmp_path):
    """A real SIGINT to this process: packer, in its own session, gets only the runner's one SIGINT."""
    script, record = trapper(tmp_path, polite=True)
    env = dict(fake_env(script.parent), PACKER_FAKE_RECORD=str(record))
    main = threading.main_thread().ident

    def press_ctrl_c():
        wait_for(record, 2)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with GroupSampler() as watcher, pytest.raises(KeyboardInterrupt):
        run_packer(tmp_path, env, ListLog(tmp_path / "packer.log"), packer=str(script), grace=60)
    assert len(int_lines(record)) == 2
    assert watcher.leftovers() == []
    assert group_members(next(iter(watcher.groups))) == []


@needs_packer
@pytest.mark.parametrize("key", ["debian-12", "rocky-9", "windows-2022"])
def test_every_family_builds_in_the_lab(key, lab_pve_serving, lab_pki, pve_root, guest_state_dir, guest_password,
                                        tmp_path):
    from packer_assets_lab.guest import LabGuest

    entry = catalog().get(key)
    with LabGuest(guest_state_dir, "packer", password=guest_password, also_accept=("Administrator",)) as guest:
        entry, plan, workdir, penv = lab_build(tmp_path, lab_pve_serving, lab_pki.ca_file, key=key,
                                               ssh_host=guest.host, ssh_port=guest.port, ssh_password=guest_password)
        log = open_build_log(Layout(tmp_path / "root"), key, new_chain_id(key), Redactor(penv.secrets),
                             echo=lambda _line: None)
        with log:
            result = run_packer(workdir, penv.env, log, timeout=120, grace=10)
        commands = guest.commands
    assert result.vmid == plan.vm_id
    assert pve_root.nodes("pve1").qemu(plan.vm_id).config.get()["template"] == 1
    typed = lab_pve_serving.pve.typed_text(plan.vm_id)
    marker = {"debian-12": "auto url=http://", "rocky-9": " inst.text inst.ks=http://", "windows-2022": "   "}[key]
    assert HTTP_IP is None or marker in typed, typed
    assert commands and not any(guest_password in c for c in commands)
    assert guest_password not in log.path.read_text()


@needs_packer
def test_a_pinned_certificate_is_what_packer_trusts(lab_pve_serving, lab_guest, guest_password, tmp_path):
    """No CA file, only the certificate's fingerprint: packer gets that certificate as its one root."""
    import hashlib
    import ssl

    pve = lab_pve_serving.pve
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((pve.host, pve.port)))
    digest = hashlib.sha256(der).hexdigest().upper()
    pinned = Endpoint(pve.url, tls_fingerprint=":".join(digest[i:i + 2] for i in range(0, 64, 2)))
    entry = catalog().get("debian-12")
    stage_iso(lab_pve_serving, entry.iso.filename)
    caps = detect_packer(PACKER)
    penv = packer_env(pinned, caps, BuildCredentials(user="root@pam", password=pve.root_password),
                      ssh_password=guest_password, workdir=tmp_path)
    assert penv.env["SSL_CERT_FILE"] == str((tmp_path / "pve-pinned-cert.pem").resolve())
    plan = plan_for(entry, ssh_host=lab_guest.host, ssh_port=lab_guest.port, boot_wait="100ms", ssh_timeout="30s",
                    boot_command=None if HTTP_IP else ())
    prepare_workdir(tmp_path / "work", entry, plan, caps, project_dir=REPO, allow_degraded=True, secrets=penv.secrets)
    log = ListLog(tmp_path / "packer.log")
    assert run_packer(tmp_path / "work", penv.env, log, timeout=120, grace=10).vmid == plan.vm_id

    wrong = Endpoint(pve.url, tls_fingerprint="AA:" * 31 + "AA")
    with pytest.raises(PackerEnvError, match="does not match the pinned"):
        packer_env(wrong, caps, BuildCredentials(user="root@pam", password=pve.root_password),
                   ssh_password=guest_password, workdir=tmp_path / "other")


def test_a_binary_that_cannot_start_is_a_packer_error(tmp_path):
    bad = tmp_path / "bin" / "packer"
    bad.parent.mkdir()
    bad.write_text("not a program")
    bad.chmod(0o755)
    with pytest.raises(PackerError, match="cannot start"):
        run_packer(tmp_path, fake_env(bad.parent), ListLog(tmp_path / "l"), packer=str(bad))


RUN_IN_CHILD = """
import sys
from pathlib import Path
from packer_assets.evidence.layout import RunLog
from packer_assets.packer.runner import run_packer
workdir, script, record = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
env = {"PATH": "/usr/bin:/bin", "PACKER_FAKE_RECORD": record}
run_packer(workdir, env, RunLog(workdir / "packer.log", "CHAIN-20261130T000000Z-x"), packer=script)
"""


def test_packer_gets_one_sigint_when_its_run_is_killed(tmp_path):
    """kill -9 of the process running packer (the OOM killer, a lost pod): packer is told as if cancelled,
    through PR_SET_PDEATHSIG, instead of going on alone in its own session."""
    script, record = trapper(tmp_path, polite=False)
    run = subprocess.Popen([sys.executable, "-c", RUN_IN_CHILD, str(tmp_path), str(script), str(record)])
    started = []
    try:
        wait_for(record, 2, timeout=120)
        started = [int(line.split()[1]) for line in record.read_text().splitlines() if line.startswith("started")]
        os.kill(run.pid, signal.SIGKILL)
        run.wait(30)
        deadline = time.monotonic() + 120  # bounds a failure only
        while not any(line.endswith(" main") for line in int_lines(record)) and time.monotonic() < deadline:
            time.sleep(0.05)
        told = [line for line in int_lines(record) if line.endswith(" main")]
        assert len(told) == 1 and int(told[0].split()[1]) in started, record.read_text()
    finally:
        if run.poll() is None:
            run.kill()
        for pid in started:  # the fake packer ignores SIGINT: end its group
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
