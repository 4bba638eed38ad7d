"""The `packer-assets` command as a user runs it: catalog check and validate (validate-all.sh)."""

import os
import shutil
import subprocess
import sys

import pytest
from support import REPO

needs_packer = pytest.mark.packer


def cli(*args, cwd=REPO, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PACKER_INSTALL"))}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "packer_assets.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full, timeout=300)


def test_catalog_check_lists_every_key():
    proc = cli("catalog", "check")
    assert proc.returncode == 0, proc.stderr
    for key in ("ubuntu-2204", "ubuntu-2404", "debian-12", "rocky-9", "windows-2022", "debian-13", "ubuntu-2604",
                "rocky-10", "windows-2025"):
        assert f"{key}:" in proc.stdout


def test_broken_catalog_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "catalog.yaml"
    bad.write_text((REPO / "templates/catalog.yaml").read_text().replace("family: rocky", "family: rocky-linux"))
    proc = cli("catalog", "check", "--catalog", str(bad))
    assert proc.returncode == 2
    assert "rocky-9: family:" in proc.stderr and "Traceback" not in proc.stderr


@needs_packer
def test_validate_renders_and_packer_validates(tmp_path):
    proc = cli("validate", "debian-12", "rocky-9", PACKER_INSTALL_PASSWORD="pw-for-validate",
               PACKER_ASSETS_ROOT=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   debian-12: 1 file(s) [preseed (debconf-set-selections Debian 12)], packer validate" in proc.stdout
    assert "ok   rocky-9: 1 file(s) [kickstart (pykickstart RHEL9)], packer validate" in proc.stdout
    assert (tmp_path / "output/rendered/rocky-9/ks.cfg").exists()
    assert "pw-for-validate" not in proc.stdout + proc.stderr


@needs_packer
def test_validate_reports_a_broken_packer_template(tmp_path):
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    hcl = tmp_path / "templates/rocky/rocky.pkr.hcl"
    hcl.write_text(hcl.read_text().replace("cloud_init_storage_pool", "cloud_init_storage_pol"))
    proc = cli("validate", "rocky-9", cwd=tmp_path, PACKER_INSTALL_PASSWORD="pw", PACKER_ASSETS_ROOT=str(tmp_path),
               PYTHONPATH=str(REPO))
    assert proc.returncode == 1
    assert "FAIL rocky-9: packer validate" in proc.stdout


def test_validate_fails_a_key_whose_release_has_no_validator(tmp_path):
    """rocky-12: the installed pykickstart has no RHEL12 handler, so nothing could check its kickstart: the key
    FAILs with one line naming it, its release and what is missing, and the command exits non-zero (make validate)."""
    from importlib.metadata import version

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text((REPO / "templates/catalog.yaml").read_text().replace("key: rocky-9\n", "key: rocky-12\n"))
    proc = cli("validate", "rocky-12", "--catalog", str(catalog), PACKER_INSTALL_PASSWORD="pw-1234",
               PACKER_ASSETS_ROOT=str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = (f"FAIL rocky-12: render: rocky-12: no kickstart validator for Rocky 12: pykickstart {version('pykickstart')} "
            "has no RHEL12 handler")
    assert line in proc.stdout.splitlines(), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr and "pw-1234" not in proc.stdout + proc.stderr
    assert not (tmp_path / "output/rendered/rocky-12/ks.cfg").exists()


def test_validate_names_a_missing_password(tmp_path):
    proc = cli("validate", "debian-12", PACKER_ASSETS_ROOT=str(tmp_path))
    assert proc.returncode == 1 and "PACKER_INSTALL_PASSWORD is unset" in proc.stdout


@pytest.mark.timeout(960)  # its own waits add up to 3 × 300 s
def test_settings_contradiction_is_one_line_from_the_cli_and_make(tmp_path):
    import certifi

    bad = {"PROXMOX_INSECURE": "1", "PROXMOX_CA_FILE": certifi.where(), "PACKER_ASSETS_ROOT": str(tmp_path)}
    proc = cli("settings", **bad)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("packer-assets: environment: PROXMOX_INSECURE=1 contradicts PROXMOX_CA_FILE "
                           "(from environment); choose one way to trust the API\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PROXMOX_"))}
    made = subprocess.run(["make", "--no-print-directory", "init", "PACKER_ASSETS_ENV_FILE="], cwd=REPO,
                          env={**env, **bad, "DAGSTER_HOME": str(tmp_path / "home")}, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode != 0 and "contradicts PROXMOX_CA_FILE" in made.stderr
    assert "Traceback" not in made.stderr and not (tmp_path / "infra").exists()
    ok = cli("settings", PACKER_ASSETS_ROOT=str(tmp_path), PROXMOX_HTTP_PORT="8802")
    assert ok.returncode == 0 and "bootstrap.http_port: 8802" in ok.stdout


@needs_packer
def test_three_validates_of_one_key_at_once_all_pass(tmp_path):
    """Each validation prepares its own work directory: none removes another's under it."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PACKER_INSTALL"))}
    full.update(PACKER_INSTALL_PASSWORD="pw", PACKER_ASSETS_ROOT=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-m", "packer_assets.cli", "validate", "debian-12"], cwd=REPO,
                              env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert all("ok   debian-12:" in out for out in outputs)
    assert list((tmp_path / "output/work/debian-12").iterdir()) == []  # each removed its own


def test_make_build_with_a_broken_catalog_is_one_line_not_a_traceback(tmp_path):
    """A key with a trailing newline used to pass and then kill every `make build` in the definitions' load."""
    broken = tmp_path / "catalog.yaml"
    broken.write_text((REPO / "templates/catalog.yaml").read_text().replace("key: debian-12", 'key: "debian-12\\n"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PROXMOX_"))}
    env.update(PACKER_ASSETS_CATALOG=str(broken), PACKER_ASSETS_ROOT=str(tmp_path), DAGSTER_HOME=str(tmp_path / "home"))
    made = subprocess.run(["make", "--no-print-directory", "build", "KEY=debian-12", "PACKER_ASSETS_ENV_FILE="],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode != 0 and "Traceback" not in made.stderr
    line = next(ln for ln in made.stderr.splitlines() if ln.startswith("packer-assets: "))
    assert f"{broken}: templates[" in line and "key: 'debian-12\\n' must start with a lower-case letter" in line


def test_make_build_of_an_unknown_key_is_one_line_and_runs_nothing(tmp_path):
    """`dagster job execute` takes any partition tag: an unknown key is refused before it, naming the known ones,
    and no run of it is recorded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PROXMOX_"))}
    home = tmp_path / "home"
    env.update(PACKER_ASSETS_ROOT=str(tmp_path), DAGSTER_HOME=str(home))
    made = subprocess.run(["make", "--no-print-directory", "build", "KEY=debian-14", "PACKER_ASSETS_ENV_FILE="],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode != 0 and "Traceback" not in made.stderr
    assert "packer-assets: templates/catalog.yaml: debian-14: unknown template key; known keys: " in made.stderr
    assert not (home / "storage").exists()  # no run was recorded


@pytest.mark.parametrize("args, said", [
    (["../../etc"], "not a chain ID (want CHAIN-<yyyymmddThhmmssZ>-<key>): '../../etc'"),
    (["CHAIN-20261125T190405Z-debian-12\n"], "not a chain ID (want CHAIN-<yyyymmddThhmmssZ>-<key>): "
                                             "'CHAIN-20261125T190405Z-debian-12\\n'"),
    (["--key", "../../etc"], "not a template key (lower-case letters, digits and -, a letter first): '../../etc'"),
])
def test_chain_with_a_bad_argument_is_one_line_not_a_traceback(tmp_path, args, said):
    proc = cli("chain", *args, PACKER_ASSETS_ROOT=str(tmp_path))
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"packer-assets: {said}\n")


@pytest.mark.parametrize("key", ["deb'ian", 'deb"ian', "deb`touch pwned`ian; touch pwned"])
def test_make_build_takes_any_key_text_as_one_argument(tmp_path, key):
    """KEY="deb'ian" was a shell syntax error from the recipe's quoting: any text is the one-line unknown-key
    error, and nothing in it runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PROXMOX_"))}
    env.update(PACKER_ASSETS_ROOT=str(tmp_path), DAGSTER_HOME=str(tmp_path / "home"))
    made = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "build", f"KEY={key}",
                           "PACKER_ASSETS_ENV_FILE="], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode != 0 and "Traceback" not in made.stderr
    errors = [line for line in made.stderr.splitlines() if not line.startswith("make")]
    assert errors == [f"packer-assets: templates/catalog.yaml: {key}: unknown template key; known keys: "
                      "ubuntu-2204, ubuntu-2404, debian-12, rocky-9, windows-2022, debian-13, ubuntu-2604, rocky-10, "
                      "windows-2025"]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "home" / "storage").exists()
