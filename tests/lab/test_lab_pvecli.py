"""The lab's pveum/pvesh: PVE's argument style, JSON output, errors on stderr with exit 255."""

import json
import subprocess

import pytest

pytestmark = pytest.mark.lab
pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")

from packer_assets_lab.pvecli import install_shims, split_args


@pytest.fixture
def shims(tmp_path, lab_pve, lab_pki):
    password = tmp_path / "pw"
    password.write_text(lab_pve.root_password)
    return install_shims(tmp_path / "bin", lab_pve.url, lab_pki.ca_file, password)


def run(shims, prog, *args):
    return subprocess.run([str(shims[prog]), *args], capture_output=True, text=True, timeout=60)


def test_json_output_and_state_lands_in_the_lab(shims, pve_root):
    assert json.loads(run(shims, "pvesh", "get", "/version", "--output-format", "json").stdout)["version"]
    added = run(shims, "pveum", "role", "add", "Probe", "--privs", "VM.Audit,Sys.Audit")
    assert (added.returncode, added.stdout, added.stderr) == (0, "", "")
    assert run(shims, "pveum", "user", "add", "probe@pve").returncode == 0
    token = json.loads(run(shims, "pveum", "user", "token", "add", "probe@pve", "t1", "--privsep=0",
                           "--output-format", "json").stdout)
    assert set(token) == {"full-tokenid", "info", "value"} and token["full-tokenid"] == "probe@pve!t1"
    assert [t["tokenid"] for t in pve_root.access.users("probe@pve").token.get()] == ["t1"]
    assert run(shims, "pveum", "user", "token", "remove", "probe@pve", "t1").returncode == 0
    assert json.loads(run(shims, "pveum", "user", "token", "list", "probe@pve", "--output-format",
                          "json").stdout) == []


def test_errors_go_to_stderr_with_exit_255(shims):
    bad = run(shims, "pveum", "role", "add", "Probe", "--privs", "Bogus.Priv")
    assert bad.returncode == 255 and bad.stdout == ""
    assert bad.stderr.startswith("400 Parameter verification failed.\nprivs: invalid privilege 'Bogus.Priv'")
    assert run(shims, "pveum", "role", "add", "Probe2", "--privs", "VM.Audit").returncode == 0
    again = run(shims, "pveum", "role", "add", "Probe2", "--privs", "VM.Audit")
    assert (again.returncode, again.stderr.strip()) == (255, "create role failed: role 'Probe2' already exists")
    unknown = run(shims, "pveum", "pool", "add", "p1")
    assert unknown.returncode == 255 and "unimplemented" in unknown.stderr


def test_argument_styles():
    assert split_args(["/", "--roles", "R", "--users=u@pve", "-propagate", "1", "--append"]) == \
        (["/"], {"roles": "R", "users": "u@pve", "propagate": "1", "append": "1"})
