"""kill -9 of a run mid-build, against the lab with the real packer, and what the next runs do about it.

The run is held at the lab guest's first provisioner command (packer build running, its VM on the
node, its pool slot claimed), then packer and the run's process are killed with SIGKILL. With a pool of one slot, the
next `make build` of another key can only finish if the dead run's slot is freed by that run itself:
there is no daemon; it also removes the build VM the dead run left running. The killed key's next build
then leaves nothing of the dead one behind.
"""

import json
import os
import shutil
import signal
import subprocess

import dagster as dg
import pytest
from support.dagster_procs import BIN, REPO, dagster_cli, dagster_env, wait_for
from support.packer import BuildGate

from packer_assets.defs.recovery import PID_TAG
from packer_assets_lab.proctree import descendants
from packer_assets.runs.procs import proc_table

pytestmark = [pytest.mark.lab, pytest.mark.packer, pytest.mark.e2e]
KILLED, OTHER = "ubuntu-2204", "debian-12"
ASSETS = "unattended_files,staged_iso,template,template_proof"


def vms_of(pve, key, template):
    return {vm.vmid: vm.config.get("name") for vm in pve.vms
            if bool(vm.template) == template and str(vm.config.get("name", "")).startswith(key + "-")}


@pytest.mark.timeout(2640)  # its own waits add up to 2580 s
def test_kill_9_mid_build_then_the_next_builds_recover_by_themselves(lab_project, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")  # the instance `make` uses (SQLite, no daemon)
    env = dagster_env(home, {"PACKER_ASSETS_ENV_FILE": ""})
    dagster_cli(["instance", "concurrency", "set", "packer_builds", "1"], env)

    gate = lab_project.stack.guest.exec_handler = BuildGate()
    log = tmp_path / "killed-run.log"
    with open(log, "w") as out:
        doomed = subprocess.Popen([str(BIN / "dagster"), "asset", "materialize", "--select", ASSETS, "--partition",
                                   KILLED, "-m", "packer_assets.definitions"], env=env, cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(gate.held, 600, "the build to reach its provisioner", on_timeout=log.read_text)
        assert vms_of(lab_project.pve, KILLED, template=False), "packer's build VM should exist by now"
        # packer and its plugins first, so nothing cleans up (as a lost host or a killed container), then the run
        for pid in descendants(proc_table(), {doomed.pid}) - {doomed.pid}:
            os.kill(pid, signal.SIGKILL)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait(60)
    finally:
        gate.open()
        if doomed.poll() is None:
            doomed.kill()

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (dead,) = instance.get_run_records()
        assert dead.dagster_run.status == dg.DagsterRunStatus.STARTED and PID_TAG in dead.dagster_run.tags

    # Another key, with the pool's one slot still claimed by the dead run: finishes without help.
    make = subprocess.run(["make", "--no-print-directory", "build", f"KEY={OTHER}", "PACKER_ASSETS_ENV_FILE="],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert make.returncode == 0, make.stdout[-4000:] + make.stderr[-4000:]
    said = make.stdout + make.stderr  # the run says what it cleaned
    assert f"run {dead.dagster_run.run_id}" in said and f"partition {KILLED}" in said and "died without finishing" in said
    # the dead run's build VM, which packer could not destroy, is gone too: removed by this run of another key
    assert vms_of(lab_project.pve, KILLED, template=False) == {}
    assert f"dead run's leftover: {KILLED}: leftover VM" in said
    with dg.DagsterInstance.from_config(str(home)) as instance:
        closed = instance.get_run_by_id(dead.dagster_run.run_id)
        assert closed.status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(closed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[-1]
        assert "is gone without finishing the run" in failure.message
        assert instance.event_log_storage.get_concurrency_info("packer_builds").claimed_slots == []
        # `make build` is a run of the job rebuild_template for the key (its history in the UI), not an anonymous
        # asset run, and says what it did
        (built,) = [r for r in instance.get_runs() if r.run_id != dead.dagster_run.run_id]
        assert built.job_name == "rebuild_template" and built.tags["dagster/partition"] == OTHER
        assert built.tags["packer-assets/outcome"] == "built"

    # The killed key's next build: whatever packer could not clean up is swept, and it builds.
    again = subprocess.run(["make", "--no-print-directory", "build", f"KEY={KILLED}", "PACKER_ASSETS_ENV_FILE="],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert vms_of(lab_project.pve, KILLED, template=False) == {}
    assert len(vms_of(lab_project.pve, KILLED, template=True)) == 1


def promoted_vmid(pve, key) -> int:
    (vmid,) = [vm.vmid for vm in pve.vms if vm.template and "packer-assets-latest" in vm.config.get("tags", "")
               and key in vm.config.get("tags", "")]
    return vmid


@pytest.mark.timeout(3480)  # its own waits add up to 3420 s
def test_no_promoted_template_stays_without_its_signed_proof(lab_project, tmp_path):
    """template alone for one key (the UI's selection), then another key's run killed right after its
    promotion (before the final record, the registry and the proof): after one more run of any key, both
    promoted templates have signed proofs that `proof verify --allowed-signers` accepts, `latest` points at
    them and registry.json names them."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = dagster_env(home, {"PACKER_ASSETS_ENV_FILE": "", "PYTHONPATH": str(REPO / "tests")})
    layout, pve = lab_project.layout, lab_project.pve
    dagster_cli(["asset", "materialize", "--select", "unattended_files,staged_iso", "--partition", OTHER,
                 "-m", "packer_assets.definitions"], env, timeout=600)
    dagster_cli(["asset", "materialize", "--select", "template", "--partition", OTHER,
                 "-m", "packer_assets.definitions"], env, timeout=900)
    alone = layout.build_proof_dir(OTHER, "latest")
    assert (alone / "manifest.json.sig").is_file(), "template alone must leave the promoted template proved"

    # the killed key: SIGKILL at the first thing after the promotion (build.record_plan), a named point
    killed = subprocess.run([str(BIN / "python"), "-m", "support.killpoint", "packer_assets.build.pipeline:record_plan",
                             "dagster", "asset", "materialize", "--select", ASSETS, "--partition", KILLED,
                             "-m", "packer_assets.definitions"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    vmid = promoted_vmid(pve, KILLED)
    assert not layout.build_proof_dir(KILLED, "latest").exists()

    # one more run, of the other key (up to date: a no-op), repairs what the dead run left
    make = subprocess.run(["make", "--no-print-directory", "build", f"KEY={OTHER}", "PACKER_ASSETS_ENV_FILE="],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert make.returncode == 0, make.stdout[-4000:] + make.stderr[-4000:]
    assert f"proof repaired: {KILLED}: proof of the promoted template" in make.stdout + make.stderr
    registry = json.loads(layout.registry_file.read_text())
    allowed = lab_project.stack.signing.allowed_signers
    for key in (OTHER, KILLED):
        proof_dir = layout.build_proof_dir(key, "latest").resolve()
        proof = json.loads((proof_dir / "proof.json").read_text())
        assert proof["template"]["vmid"] == promoted_vmid(pve, key)
        assert registry["templates"][key]["current"]["proof"] == proof_dir.relative_to(layout.output_root).as_posix()
        verified = subprocess.run([str(BIN / "packer-assets"), "proof", "verify", str(proof_dir), "--allowed-signers",
                                   str(allowed)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert verified.returncode == 0 and "ok" in verified.stdout, verified.stdout + verified.stderr
    assert json.loads((layout.build_proof_dir(KILLED, "latest") / "proof.json").read_text())["template"]["vmid"] == vmid
