"""`packer-assets lab up | status | publish | down` as a user runs them: a real background process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")
import requests
import yaml
from support import REPO as ROOT

from packer_assets.config.envfile import read_env_file


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "packer_assets.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def lab_state(tmp_path):
    state = tmp_path / "lab"
    yield state
    cli("lab", "down", "--state", str(state), check=False)


@pytest.mark.timeout(1290)  # its own waits add up to 1230 s
def test_up_status_publish_down(lab_state):
    cli("lab", "up", "--state", str(lab_state))
    info = json.loads((lab_state / "state.json").read_text())
    assert os.stat(lab_state / "lab.env").st_mode & 0o777 == 0o600
    env = read_env_file(lab_state / "lab.env")
    # the API answers over HTTPS, verified against the lab CA
    version = requests.get(env["PROXMOX_URL"] + "/version", verify=env["PROXMOX_CA_FILE"], timeout=10)
    assert version.status_code == 401  # up, and asking for a login
    # up again is a no-op on the running lab
    cli("lab", "up", "--state", str(lab_state))
    assert json.loads((lab_state / "state.json").read_text())["pid"] == info["pid"]
    assert "running" in cli("lab", "status", "--state", str(lab_state)).stdout

    sums_url = env["PACKER_ASSETS_ISO_MIRROR"] + "/releases.ubuntu.com/22.04.5/SHA256SUMS"
    before = requests.get(sums_url, timeout=10).text
    published = json.loads(cli("lab", "publish", "ubuntu-2204", "--state", str(lab_state)).stdout)
    after = requests.get(sums_url, timeout=10).text
    assert before != after and published["publish"] in after
    bad = cli("lab", "publish", "no-such-key", "--state", str(lab_state), check=False)
    assert bad.returncode == 2 and "unknown key 'no-such-key'" in bad.stderr
    slashed = cli("lab", "publish", "../x", "--state", str(lab_state), check=False)  # not the control server's JSON
    assert slashed.returncode == 2 and "Traceback" not in slashed.stderr and len(slashed.stderr.splitlines()) == 1

    # a process that merely looks like ours is never signalled
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (lab_state / "state.json").write_text(json.dumps({**info, "pid": decoy.pid}))
    assert "no lab was running" in cli("lab", "down", "--state", str(lab_state)).stdout
    assert decoy.poll() is None
    decoy.kill()
    (lab_state / "state.json").write_text(json.dumps(info))

    assert "lab stopped" in cli("lab", "down", "--state", str(lab_state)).stdout
    assert not Path(f"/proc/{info['pid']}").exists() or b"packer_assets_lab.service" not in Path(
        f"/proc/{info['pid']}/cmdline").read_bytes()
    assert cli("lab", "status", "--state", str(lab_state), check=False).returncode == 3


def test_broken_catalog_fails_before_starting(lab_state, tmp_path):
    bad = tmp_path / "catalog.yaml"
    bad.write_text("version: 1\ntemplates: []\n")
    proc = cli("lab", "up", "--state", str(lab_state), "--catalog", str(bad), check=False)
    assert proc.returncode == 2 and "catalog" in proc.stderr
    assert not (lab_state / "state.json").exists()


@pytest.mark.parametrize(("keys", "message"), [
    ("ubuntu-2204", "--real-guest ubuntu-2204: the lab's real guest is Debian 12 (bookworm) or 13 (trixie), "
                    "debootstrapped; ubuntu-2204 expects ubuntu 22.04"),
    ("debian-11", "--real-guest debian-11: no such key in"),
])
def test_a_real_guest_only_for_a_debian_12_or_13_key_refused_before_any_process(lab_state, keys, message):
    proc = cli("lab", "up", "--state", str(lab_state), "--real-guest", keys, check=False)
    assert proc.returncode == 2 and message in proc.stderr + proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (lab_state / "state.json").exists()  # no lab process was started


def test_a_dead_labs_guests_are_killed_by_the_next_lab_up(lab_state):
    """kill -9 of a lab leaves its real guests' QEMUs running (their own sessions): the next `lab up` on the
    same state folder kills them. A stand-in QEMU: a process named qemu-system-* whose argv names a disk there."""
    disk = lab_state / "pve-data/realguest/vm-9300/disk.qcow2"
    disk.parent.mkdir(parents=True)
    disk.touch()
    orphan = subprocess.Popen(["bash", "-c", f'exec -a qemu-system-x86_64 tail -f /dev/null "{disk}"'],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cli("lab", "up", "--state", str(lab_state))
        assert orphan.wait(timeout=30) == -9  # SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_a_running_lab_without_real_guests_is_not_changed_by_up_with_them(lab_state):
    """README: a lab already running without real guests is not changed: `make lab-down` first."""
    cli("lab", "up", "--state", str(lab_state))
    before = json.loads((lab_state / "state.json").read_text())
    proc = cli("lab", "up", "--state", str(lab_state), "--real-guest", check=False)
    assert proc.returncode == 2 and "stop it first (`packer-assets lab down`)" in proc.stderr, proc.stderr
    assert "real guests for no key" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((lab_state / "state.json").read_text()) == before  # the same lab, untouched


def test_real_guests_on_a_machine_that_cannot_run_them_say_why_in_one_line(lab_state, tmp_path):
    """Without QEMU (here: a PATH without qemu-system-x86_64), `lab up --real-guest` stops before any process
    with the reason the realguest tests are skipped for (and .ci/run prints)."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-img", "debootstrap", "mkfs.ext4", "unshare"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run([sys.executable, "-m", "packer_assets.cli", "lab", "up", "--state", str(lab_state),
                           "--real-guest"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PATH": str(bin_dir)})
    assert proc.returncode == 2, proc.stderr
    assert "--real-guest: this machine cannot run real guests: needs qemu-system-x86_64" in proc.stderr
    assert "Traceback" not in proc.stderr and not (lab_state / "state.json").exists()


def make_plan(target, tmp_path, *assignments, catalog=None):
    """What `make -n <target>` would run (make's recursive `$(MAKE) init` is only planned too), with the venv
    this test runs in and, when given, the catalog PACKER_ASSETS_CATALOG names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKER_ASSETS_")}
    env |= {"PACKER_ASSETS_CATALOG": str(catalog)} if catalog else {}
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}", f"LAB_STATE={tmp_path}/lab",
                           f"DAGSTER_HOME={tmp_path}/dh", *assignments], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(("with_debian_13", "assignments", "keys"), [
    (False, (), ["debian-12"]),  # a site catalog without debian-13
    (True, (), ["debian-12", "debian-13"]),  # a catalog with both (the shipped one): the default builds both
    (True, ("REAL_KEYS=debian-13",), ["debian-13"]),  # one of them, by the variable
])
def test_make_demo_real_builds_the_real_keys_the_catalog_has_or_those_named(tmp_path, with_debian_13, assignments,
                                                                            keys):
    """Issue 27: REAL_KEYS defaults to debian-12 and debian-13 as far as the catalog has them; each is marked for a
    real guest at `lab up` and built, verified and its rows printed in turn."""
    from support.realguest import project_with_debian_13

    catalog = project_with_debian_13(tmp_path / "p") / "templates/catalog.yaml"
    if not with_debian_13:
        data = yaml.safe_load(catalog.read_text())
        data["templates"] = [t for t in data["templates"] if t["key"] != "debian-13"]
        catalog.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = make_plan("demo-real", tmp_path, *assignments, catalog=catalog)
    assert f"lab up --state {tmp_path}/lab --real-guest {','.join(keys)}" in plan
    assert f"for key in {' '.join(keys)}; do" in plan
    assert "--partition $key" in plan and "proof verify docs/proof/platform/packer-builds/builds/$key/latest" in plan
    assert "timeout 1800 " in plan and "smoke_test" in plan
