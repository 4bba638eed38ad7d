"""One run per key: the key lock, and two `dagster asset materialize` runs of one key at once."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.dagster_procs import BIN, wait_for
from support.packer import BuildGate

from packer_assets.runs.locks import KeyBusy, hold_key, holder, release_key

HOLD = """
import subprocess, sys
from packer_assets.runs.locks import hold_key
hold_key(sys.argv[1], "debian-12", "run-in-child")
if len(sys.argv) > 2:  # a child of ours that outlives us (as a packer left behind would)
    subprocess.Popen(["sleep", "300"])
print("held", flush=True)
sys.stdin.readline()
"""


def holding_child(lock: Path, *extra: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), *extra], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_held_key_names_its_holder_and_is_taken_once_per_process(tmp_path):
    lock = tmp_path / "locks/debian-12.lock"
    child = holding_child(lock)
    try:
        with pytest.raises(KeyBusy) as busy:
            hold_key(lock, "debian-12", "run-2", wait=False)
        assert f"run run-in-child (pid {child.pid}" in str(busy.value) and "debian-12" in str(busy.value)
    finally:
        child.communicate("\n", timeout=30)
    assert hold_key(lock, "debian-12", "run-2") is True
    try:
        assert hold_key(lock, "debian-12", "run-2") is False  # this process holds it already
        assert holder(lock)["run_id"] == "run-2" and holder(lock)["pid"] == os.getpid()
    finally:
        release_key(lock)


def test_a_waiting_run_is_told_who_holds_the_key_then_gets_it(tmp_path):
    lock = tmp_path / "debian-12.lock"
    child = holding_child(lock)
    said, got = [], threading.Event()

    def second_run():
        hold_key(lock, "debian-12", "run-2", on_wait=said.append, poll=0.05)
        got.set()

    thread = threading.Thread(target=second_run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: said, 60, "the waiting run to say why it waits")
        assert not got.is_set()
        assert "run run-in-child" in said[0] and said[0].endswith("waiting for it to finish")
    finally:
        child.communicate("\n", timeout=30)
    thread.join(60)
    assert got.is_set()
    release_key(lock)


def test_kill_9_of_the_holder_frees_the_key_even_with_its_child_alive(tmp_path):
    lock = tmp_path / "debian-12.lock"
    child = holding_child(lock, "spawn")
    try:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        # the holder's own child (sleep) still lives in its session: it must not hold the key
        assert hold_key(lock, "debian-12", "after-crash", wait=False) is True
    finally:
        release_key(lock)
        os.killpg(child.pid, signal.SIGKILL)


@pytest.mark.packer
@pytest.mark.e2e
@pytest.mark.timeout(2460)  # its own waits add up to 4 × 600 s
def test_two_cli_runs_of_one_key_build_once(lab_project, tmp_path):
    """The first run is held at the gate (the lab guest's first provisioner command) while the second
    starts: the second waits on the key lock, says for whom, then finds the template up to date."""
    gate = lab_project.stack.guest.exec_handler = BuildGate()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "CHECKPOINT_DISABLE": "1"}
    (tmp_path / "home").mkdir()
    argv = [str(BIN / "dagster"), "asset", "materialize", "--select", "unattended_files,staged_iso,template,template_proof",
            "--partition", "debian-12", "-m", "packer_assets.definitions"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with open(logs[0], "w") as out:
        first = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    second = None
    try:
        wait_for(gate.held, 600, "the first build to reach the gate", on_timeout=logs[0].read_text)
        with open(logs[1], "w") as out:
            second = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: "is working on this key: waiting for it to finish" in logs[1].read_text(), 600,
                 "the second run to wait for the first", on_timeout=logs[1].read_text)
        gate.open()
        assert first.wait(600) == 0, logs[0].read_text()[-3000:]
        assert second.wait(600) == 0, logs[1].read_text()[-3000:]
    finally:
        gate.open()
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.kill()
    text = logs[1].read_text()
    assert "promoted template" in text and "skipped" in text  # the second built nothing
    templates = [vm for vm in lab_project.pve.vms if vm.template and "debian-12" in vm.config.get("tags", "")]
    assert len(templates) == 1
