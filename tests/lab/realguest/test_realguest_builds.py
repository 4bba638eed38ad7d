"""Builds whose guest is real (`lab up --real-guest`): packer, its provisioners, the generalize step, the clone,
cloud-init, the agent and SSH all run in QEMU VMs on the lab's Debian base image of the key's release.

What only a real guest can show: a provisioner that exits 1 fails the build and leaves no VM; a template
whose generalize step is gone fails the smoke test (its clone boots with the install's machine-id and host
keys); a clone given a wrong SSH key fails the SSH step; the agent's OS info is the guest's /etc/os-release
(here through the lab's API; test_realguest_boot.py compares it with the file itself).
Each build takes minutes under TCG (the install emulation, the first boot, the clone's boot): one good
build per key is shared by the module. Both releases are built end to end (debian-12 on bookworm's image,
debian-13 on trixie's, issue 27); everything else runs on debian-12 only.
"""

import json
import re
import shutil
import subprocess
import time
from dataclasses import replace

import dagster as dg
import pytest
from support import REPO
from support.builds import rebuild
from support.dagster_procs import BIN, dagster_env
from support.lab import started_lab_project
from support.realguest import project_with_debian_13

from packer_assets.build import pipeline
from packer_assets.config.envfile import read_env_file
from packer_assets.inspection.guest_checks import checks_for
from packer_assets.pve import smoke as smoke_module
from packer_assets.pve.bootstrap import build_access
from packer_assets.pve.smoke import SmokeOptions, SmokeTestError, smoke_test
from packer_assets_lab.realguest.qemu import qemu_processes_under

# a test's own waits add up to 3307 s at most (the linked clone's: three tasks, a boot, and the module's build of
# debian-12 when it runs first: BUILD_BOUND)
pytestmark = [pytest.mark.realguest, pytest.mark.lab, pytest.mark.packer, pytest.mark.timeout(3360)]

KEY = "debian-12"
KEYS = ("debian-12", "debian-13")  # the lab's real guests: a key per Debian release the real guest can be
OS_NAMES = {"debian-12": "Debian GNU/Linux 12 (bookworm)", "debian-13": "Debian GNU/Linux 13 (trixie)"}
REAL = {"smoke_timeout_seconds": 900}  # a clone's boot under TCG: minutes
# `make demo-real`'s selection and bound (Makefile REAL_ASSETS, DEMO_REAL_TIMEOUT): a key's first build on a
# machine also makes its release's package layer (~10 min under TCG)
REAL_ASSETS = "staged_iso,unattended_files,template,template_proof"
DEMO_REAL_ROWS = r"^\| (Guest|Packages \(SBOM\)|smoke_test) \|"  # the README rows `make demo-real` prints
BUILD_BOUND = 1800


@pytest.fixture(scope="module")
def real_lab(tmp_path_factory):
    """The lab with real guests for debian-12 and debian-13, on a copy of the project whose catalog has debian-13
    (support.realguest.DEBIAN_13 until the shipped catalog has it)."""
    folder = tmp_path_factory.mktemp("real")
    source = project_with_debian_13(folder / "source")
    with pytest.MonkeyPatch.context() as monkeypatch, \
            started_lab_project(folder, monkeypatch, real_guests=KEYS, source=source) as project:
        yield project, monkeypatch


@pytest.fixture(scope="module")
def real_build(real_lab, tmp_path_factory):
    """A key's real build, made once per key as `make demo-real` makes it: `dagster asset materialize` of its
    build assets in a process of its own (the catalog's keys are the definitions' partitions, read at load).
    Returns (lab project, the template's VMID, proof.json)."""
    project, _monkeypatch = real_lab
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    done = {}

    def build(key):
        if key not in done:
            run = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-m", "packer_assets.definitions",
                                  "--select", REAL_ASSETS, "--partition", key],
                                 env=dagster_env(home, {"PACKER_ASSETS_ENV_FILE": ""}), cwd=project.stack.catalog_path.parent.parent,
                                 capture_output=True, text=True, timeout=BUILD_BOUND)
            assert run.returncode == 0, run.stderr[-3000:] + _failure(project, key)
            proof = _latest_proof(project, key)
            done[key] = (project, proof["template"]["vmid"], proof)
        return done[key]
    return build


@pytest.fixture(scope="module")
def built(real_build):
    """The module's real build of debian-12: (lab project, the template's VMID, proof.json)."""
    return real_build(KEY)


def _latest_proof(project, key=KEY):
    found = sorted(p for p in project.root.rglob(f"builds/{key}/*/proof.json") if p.parent.name != "latest")
    assert found, f"no proof under {project.root}"
    return json.loads(found[-1].read_text())


def _failure(project, key=KEY) -> str:
    """The end of the key's newest build log."""
    logs = sorted((project.root / "output/logs/packer/builds" / key).glob("*/packer.log"))
    return logs[-1].read_text(errors="replace")[-4000:] if logs else "(no build log)"


def wait_task(api, upid, timeout=300):
    deadline = time.monotonic() + timeout
    while (status := api.nodes("pve1").tasks(upid).status.get())["status"] == "running":
        assert time.monotonic() < deadline, f"task {upid} still running"
        time.sleep(0.5)
    assert status["exitstatus"] == "OK", status
    return status


def _vms(project, key=KEY):
    return {vm.vmid: vm for vm in project.pve.vms if vm.name.startswith(f"{key}-")}


def _api(project):
    return build_access(read_env_file(project.layout.env_file), str(project.layout.env_file)).connect()


@pytest.mark.parametrize("key", KEYS)
def test_the_proof_carries_the_real_guests_facts(real_build, key):
    project, vmid, proof = real_build(key)
    image = project.stack.real_images[key]
    assert image.suite == {"debian-12": "bookworm", "debian-13": "trixie"}[key]
    assert proof["guest"].startswith("lab: real guest") and "installer emulated" in proof["guest"]
    # the system came from the base image's recipe: the proof names it beside the ISO
    assert f"running Debian {key[-2:]} ({image.suite})" in proof["guest"]
    assert f"base image recipe sha256 {image.recipe_sha256}" in proof["guest"]
    assert re.fullmatch(r"[0-9a-f]{64}", image.recipe_sha256)
    facts = proof["checks"][0]["details"]
    assert facts["found_os"] == f"debian {key[-2:]}"
    # the agent's answer is the guest's /etc/os-release (the lab's answering guests say "Debian GNU/Linux 12")
    assert facts["os"] == OS_NAMES[key]
    assert re.fullmatch(r"[0-9a-f]{32}", facts["machine_id"])
    # dpkg-query in the guest: the base image's ~125-140 packages and the ~90 the preseed installed from the mirror
    assert proof["sbom"]["packages"] > 200
    readme = (project.root.rglob(f"builds/{key}/*/README.md").__next__()).read_text()
    assert "installer emulated" in readme
    # what `make demo-real` checks and prints: the signed proof verifies; its Guest row names the real guest
    latest = project.layout.build_proof_dir(key, "latest")
    verify = subprocess.run([str(BIN / "packer-assets"), "proof", "verify", str(latest), "--allowed-signers",
                             str(project.stack.signing.allowed_signers)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    rows = [line for line in (latest / "README.md").read_text().splitlines() if re.match(DEMO_REAL_ROWS, line)]
    assert [row.split(" | ")[0] for row in rows] == ["| Guest", "| Packages (SBOM)", "| smoke_test"], rows
    assert "lab: real guest (a QEMU VM running Debian" in rows[0]
    # the name the guest's own /etc/os-release gives (qemu-ga reads it), and the base-files that ships that file
    assert f"booted {OS_NAMES[key]} (found debian {key[-2:]}, expected debian {key[-2:]})" in rows[2], rows[2]
    bom = json.loads((latest / "sbom.cdx.json").read_text())
    (base_files,) = [c["version"] for c in bom["components"] if c["name"] == "base-files"]
    assert base_files.startswith(f"{key[-2:]}."), base_files
    # the template is the only VM of the key; no QEMU runs (the build VM became it, the clone is gone)
    vms = _vms(project, key)
    assert list(vms) == [vmid] and vms[vmid].template
    assert qemu_processes_under(project.stack.state) == []
    info = project.pve.real_guest_info(vmid)
    assert info["install"]["preseed_url"].endswith("/preseed.cfg")  # fetched from packer's HTTP server
    assert any(line.startswith("passwd/user-password-crypted") for line in info["install"]["applied"])
    assert info["install"]["packages"].startswith("pkgsel: layer ")


def test_a_clone_given_a_wrong_ssh_key_fails_the_ssh_step(built, monkeypatch):
    project, vmid, _proof = built
    from packer_assets.pve.guest_exec import EphemeralKey

    wrong = EphemeralKey.generate("not-the-smoke-tests-key").public
    real_encode = smoke_module.encode_sshkeys
    # The clone's cloud-init drive gets another key than the one the smoke test logs in with.
    monkeypatch.setattr(smoke_module, "encode_sshkeys", lambda keys: real_encode(wrong))
    port = int(dict(item.split("=") for item in project.stack.env()["PACKER_ASSETS_SSH_PORTS"].split(","))[KEY])
    with pytest.raises(SmokeTestError) as err:
        smoke_test(_api(project), "pve1", vmid, project.stack.catalog.get(KEY),
                   options=SmokeOptions(timeout=900, ssh_address=("127.0.0.1", port)))
    assert err.value.step == "ssh_login", err.value
    assert list(_vms(project)) == [vmid]  # the clone is gone
    assert qemu_processes_under(project.stack.state) == []


def _edited_templates(tmp_path, monkeypatch, old: str, new: str, file: str = "debian/debian.pkr.hcl"):
    copy = tmp_path / "project-copy"
    shutil.copytree(REPO / "templates", copy / "templates")
    template = copy / "templates" / file
    text = template.read_text()
    assert old in text
    template.write_text(text.replace(old, new))
    monkeypatch.chdir(copy)  # the catalog's packer_dir folders are read from here


def test_a_provisioner_that_exits_1_fails_the_build_and_leaves_no_vm(built, tmp_path, monkeypatch):
    project, vmid, _proof = built
    _edited_templates(tmp_path, monkeypatch, '"apt-get clean",', '"apt-get clean",\n      "exit 1",')
    with dg.instance_for_test() as instance:
        result = rebuild(project, instance, key=KEY, **REAL)
    assert not result.success
    # the build's error leads with packer's verdict, not the provisioner's stderr
    assert "first errors: Script exited with non-zero exit status: 1" in _failure(project)
    assert list(_vms(project)) == [vmid]  # packer's VM destroyed; the promoted template untouched
    assert qemu_processes_under(project.stack.state) == []
    # only the real templates have machines (debian-13's, when its build ran first)
    templates = {f"vm-{vm.vmid}" for vm in project.pve.vms if vm.template and vm.name.startswith(KEYS)}
    assert f"vm-{vmid}" in templates
    assert {p.name for p in (project.stack.state / "pve-data/realguest").iterdir()} == templates


# fresh_identity's output without its verdict (packer_assets/inspection/guest_checks.py FRESH_IDENTITY's last lines)
READ_IDENTITY = ('echo "machine-id $(cat /etc/machine-id)"; '
                 "for f in /etc/ssh/ssh_host_*_key.pub; do echo \"host-key $(cut -d' ' -f1,2 \"$f\")\"; done")


def test_a_template_without_its_generalize_step_fails_fresh_identity_and_password_locked(built, tmp_path,
                                                                                         monkeypatch):
    """One real build for two of the template's duties (issue 26): generalize_linux both resets the identity
    and locks the install user (`passwd -l`), so a template without it fails the smoke test at fresh_identity;
    the same template, judged again with fresh_identity only reading the identity, fails at password_locked."""
    project, vmid, _proof = built
    _edited_templates(tmp_path, monkeypatch, "inline           = local.generalize_linux",
                      'inline           = ["true"]')
    second: list[SmokeTestError] = []
    real_smoke = pipeline.smoke_test

    def judged_twice(api, node, template_vmid, entry, options):
        try:
            return real_smoke(api, node, template_vmid, entry, options=options)
        except SmokeTestError:
            # The next duty's check, on the same template: fresh_identity only reads the identity (the machine-id
            # and the host keys ssh_login pins) without judging it; every other check as it is.
            with pytest.MonkeyPatch.context() as reading:
                reading.setattr(smoke_module, "checks_for", lambda e: tuple(
                    replace(c, argv=("sh", "-c", READ_IDENTITY)) if c.name == "fresh_identity" else c
                    for c in checks_for(e)))
                try:
                    real_smoke(api, node, template_vmid, entry, options=options)
                except SmokeTestError as exc:
                    second.append(exc)
            raise
    monkeypatch.setattr(pipeline, "smoke_test", judged_twice)
    with dg.instance_for_test() as instance:
        result = rebuild(project, instance, key=KEY, force=True, **REAL)
    assert not result.success
    log = _failure(project)
    # The clone booted with the install's machine-id and host keys: written before this boot
    assert re.search(r"failed at step 'fresh_identity'.*/etc/machine-id dates from before this boot", log), log[-2000:]
    assert [exc.step for exc in second] == ["password_locked"], second  # the install user can still log in
    remaining = _vms(project)
    assert vmid in remaining and remaining[vmid].template  # the promoted template is still the one
    assert all(not vm.name.startswith(f"{KEY}-smoke") for vm in remaining.values())
    assert qemu_processes_under(project.stack.state) == []


def test_a_preseed_without_qemu_guest_agent_fails_the_real_build_at_once_with_the_install_s_reason(
    built, tmp_path, monkeypatch
):
    """The whole chain on a real guest (issue 26): the emulated installer installs pkgsel/include from the mirror,
    the late_command's `systemctl enable qemu-guest-agent` fails, d-i stops and the VM powers off; packer would
    wait 30 minutes for SSH, the build's VM watch ends it at once, quoting the console."""
    project, vmid, _proof = built
    _edited_templates(tmp_path, monkeypatch, " qemu-guest-agent cloud-init", " cloud-init", file="debian/preseed.cfg.j2")
    with dg.instance_for_test() as instance:
        result = rebuild(project, instance, key=KEY, vm_watch_seconds=1, **REAL)
    assert not result.success
    error = str([e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0].event_specific_data.error)
    assert re.search(r"VM \d+ on node pve1 stopped before SSH came up; its console \(.*\) ends: ", error), error
    assert "qemu-guest-agent.service" in error, error
    assert list(_vms(project)) == [vmid]  # packer's VM destroyed; the promoted template untouched
    assert qemu_processes_under(project.stack.state) == []


def test_a_linked_clone_runs_powers_itself_off_and_is_destroyed_with_its_disk(built):
    """The lifecycle the builds do not walk: a linked clone (an overlay on the template's disk), the guest
    powering itself off (the VM is `stopped` without a PVE request), destroy removing the machine."""
    project, vmid, _proof = built
    api, node = _api(project), "pve1"
    clone_id = vmid + 50
    upid = api.nodes(node).qemu(vmid).clone.post(newid=clone_id, full=0, name=f"{KEY}-linked-{vmid}")
    wait_task(api, upid)
    info = project.pve.real_guest_info(clone_id)
    overlay = subprocess.run(["qemu-img", "info", "--output=json", info["disk"]], capture_output=True, text=True,
                             check=True)
    assert json.loads(overlay.stdout)["backing-filename"].endswith(f"vm-{vmid}/disk.qcow2")
    clone = api.nodes(node).qemu(clone_id)
    clone.config.put(ciuser="smoke", ipconfig0="ip=dhcp", ciupgrade=0)
    wait_task(api, clone.status.start.post())
    deadline = time.monotonic() + 600
    while True:  # the agent answers once the guest has booted
        try:
            clone.agent.ping.post()
            break
        except Exception:  # noqa: BLE001 - 500 "QEMU guest agent is not running" until then
            assert time.monotonic() < deadline, "the clone's agent never answered"
            time.sleep(2)
    while clone.agent("get-host-name").get()["result"]["host-name"] != f"{KEY}-linked-{vmid}":
        assert time.monotonic() < deadline, "cloud-init never set the hostname from the clone's drive"
        time.sleep(2)
    clone.agent.exec.post(command=["systemctl", "poweroff"])
    while clone.status.current.get()["status"] != "stopped":  # nobody asked PVE: the guest powered off
        assert time.monotonic() < deadline, "the VM never became stopped after the guest powered off"
        time.sleep(1)
    wait_task(api, clone.delete())
    assert not (project.stack.state / f"pve-data/realguest/vm-{clone_id}").exists()
    assert qemu_processes_under(project.stack.state) == []
