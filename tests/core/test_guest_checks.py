"""The smoke test's guest checks: the spec per family, the catalog's own, the judging, and the shell
scripts themselves, run here for real (sh, stat, awk, getent) on files and users the test controls."""

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from support import REPO

from packer_assets.catalog import RESERVED_STEPS, load_catalog
from packer_assets.inspection.guest_checks import (
    CLOUD_INIT,
    FAMILY_CHECKS,
    FRESH_IDENTITY_CHECK,
    PASSWORD_LOCKED_CHECK,
    SSH_LOGIN,
    checks_for,
    listed_errors,
    parse_identity,
)
from packer_assets.pve.smoke import BASE_STEPS


def shipped():
    return load_catalog(REPO / "templates/catalog.yaml", env={}, project_dir=REPO)


def test_each_family_has_its_checks_and_their_names_are_reserved():
    names = {family: [c.name for c in checks] for family, checks in FAMILY_CHECKS.items()}
    assert names["debian"] == ["cloud_init", "fresh_identity", "ssh_login", "password_locked", "guest_agent_enabled"]
    assert names["rocky"] == names["ubuntu"] == names["debian"]
    assert names["windows"] == ["fresh_identity", "guest_agent_enabled"]  # no cloud-init, no SSH user
    every = {n for family in names.values() for n in family} | set(BASE_STEPS)
    assert every == set(RESERVED_STEPS)


def test_the_catalog_adds_its_own_checks_after_the_family_s(tmp_path):
    doc = yaml.safe_load((REPO / "templates/catalog.yaml").read_text())
    doc["defaults"]["smoke"] = {"commands": [{"run": "test -x /usr/bin/curl", "name": "curl_installed"}]}
    debian = next(e for e in doc["templates"] if e["key"] == "debian-12")
    debian["smoke"] = {"commands": [{"run": "timedatectl show -p Timezone\n", "expect_output": "^Timezone=Etc/UTC$"},
                                    {"run": "sudo -n true", "via": "ssh", "expect_exit": 0}]}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(doc))
    catalog = load_catalog(path, env={}, project_dir=REPO)
    debian_checks = checks_for(catalog.get("debian-12"))
    assert [c.name for c in debian_checks][-2:] == ["command_1", "command_2"]  # the entry's list replaces defaults'
    site = debian_checks[-2]
    assert site.command({}) == ["sh", "-c", "timedatectl show -p Timezone", "sh"]  # trailing newline stripped
    assert site.judge(0, "Timezone=Etc/UTC\n", {})[0]
    assert not site.judge(0, "Timezone=Europe/Berlin\n", {})[0]
    assert debian_checks[-1].via == "ssh" and debian_checks[-1].ssh_command({}) == "sudo -n true"
    windows = checks_for(catalog.get("windows-2022"))
    assert windows[-1].name == "curl_installed" and windows[-1].argv[0] == "powershell.exe"
    assert [c.name for c in checks_for(shipped().get("debian-12"))] == [c.name for c in FAMILY_CHECKS["debian"]]


def test_judge_names_what_was_wrong_and_escapes_values():
    values = {"ci_user": "smoke.user", "install_user": "packer"}
    assert SSH_LOGIN.judge(0, "smoke.user\n", values) == (True, "smoke.user")
    passed, why = SSH_LOGIN.judge(0, "smokeXuser\n", values)  # the dot is not a wildcard
    assert not passed and "does not match" in why and "smokeXuser" in why
    passed, why = SSH_LOGIN.judge(255, "", values)
    assert not passed and why == "exit 255, expected 0: no output"
    passed, why = PASSWORD_LOCKED_CHECK.judge(1, "x" * 1000, values)
    assert not passed and len(why) < 400  # output is cut for metadata and proofs
    assert SSH_LOGIN.ssh_command(values) == "id -un"
    assert PASSWORD_LOCKED_CHECK.command(values)[-1] == "packer"  # an argument, not part of the script


# ------------------------------------------------------------------ the scripts, for real


def boot_time() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))


def guest_etc(tmp_path, machine_id="0123456789abcdef0123456789abcdef\n", keys=("ed25519", "rsa")) -> Path:
    etc = tmp_path / "etc"
    (etc / "ssh").mkdir(parents=True)
    (etc / "machine-id").write_text(machine_id)
    for kind in keys:
        (etc / "ssh" / f"ssh_host_{kind}_key").write_text("private")
        (etc / "ssh" / f"ssh_host_{kind}_key.pub").write_text(f"ssh-{kind} AAAA{kind.upper()} root@install\n")
    return etc


GUEST_ETC = "etc=/etc\n"  # the one line of FRESH_IDENTITY that names the guest's /etc


def run_check(check, tmp_path, values=None, path_dir=None):
    """The check's script as a guest runs it, with its /etc in tmp_path (the script's text rewritten here: the
    script that runs in guests has no test hook), and tmp_path taken out of what it prints, as a guest prints it."""
    argv = list(check.command(values or {}))
    if GUEST_ETC in argv[2]:
        argv[2] = argv[2].replace(GUEST_ETC, f"etc={shlex.quote(str(tmp_path))}/etc\n")
    env = dict(os.environ)
    if path_dir:
        env["PATH"] = f"{path_dir}:{env['PATH']}"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout.replace(str(tmp_path), "")


def test_fresh_identity_reads_its_files_from_one_etc_the_tests_can_move():
    assert FRESH_IDENTITY_CHECK.command({})[2].count(GUEST_ETC) == 1


def test_fresh_identity_passes_for_files_made_after_boot_and_reports_them(tmp_path):
    guest_etc(tmp_path)
    code, out = run_check(FRESH_IDENTITY_CHECK, tmp_path)
    assert code == 0, out
    assert FRESH_IDENTITY_CHECK.judge(code, out, {})[0]
    assert parse_identity(out) == ("0123456789abcdef0123456789abcdef", ["ssh-ed25519 AAAAED25519", "ssh-rsa AAAARSA"])


@pytest.mark.parametrize(("old", "named"), [("machine-id", "/etc/machine-id"),
                                            ("ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_rsa_key")])
def test_fresh_identity_fails_for_a_file_from_before_this_boot(tmp_path, old, named):
    etc = guest_etc(tmp_path)
    before = boot_time() - 3600
    os.utime(etc / old, (before, before))
    code, out = run_check(FRESH_IDENTITY_CHECK, tmp_path)
    passed, why = FRESH_IDENTITY_CHECK.judge(code, out, {})
    assert code == 1 and not passed
    assert f"{named} dates from before this boot" in why


@pytest.mark.parametrize(("machine_id", "keys", "message"), [
    ("", ("rsa",), "/etc/machine-id is empty"), ("uninitialized\n", ("rsa",), "/etc/machine-id is empty"),
    ("0123456789abcdef0123456789abcdef\n", (), "no SSH host keys")])
def test_fresh_identity_fails_without_an_identity(tmp_path, machine_id, keys, message):
    guest_etc(tmp_path, machine_id, keys)
    code, out = run_check(FRESH_IDENTITY_CHECK, tmp_path)
    assert code == 1 and message in out


@pytest.mark.parametrize(("shadow", "passed"), [("!$6$salt$hash", True), ("*", True), ("!*", True),
                                                ("$6$salt$hash", False), ("", False)])
def test_password_locked_reads_the_shadow_entry(tmp_path, shadow, passed):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    getent = bin_dir / "getent"  # the guest's getent, answering for one user
    getent.write_text("#!/bin/sh\n[ \"$2\" = packer ] || exit 2\n"
                      f"case \"$1\" in passwd) echo 'packer:x:1000:1000::/home/packer:/bin/bash';; "
                      f"shadow) echo 'packer:{shadow}:20000:0:99999:7:::';; esac\n")
    getent.chmod(0o755)
    code, out = run_check(PASSWORD_LOCKED_CHECK, tmp_path, {"install_user": "packer"}, bin_dir)
    assert PASSWORD_LOCKED_CHECK.judge(code, out, {})[0] is passed, out
    if not passed:
        assert "can still log in with the install password" in out
    code, out = run_check(PASSWORD_LOCKED_CHECK, tmp_path, {"install_user": "nobody-here"}, bin_dir)
    assert code == 1 and "user nobody-here does not exist" in out  # proves nothing: fails
    assert not PASSWORD_LOCKED_CHECK.judge(code, out, {})[0]


def test_password_locked_fails_for_a_user_without_a_shadow_entry(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    getent = bin_dir / "getent"  # the user exists, /etc/shadow has no line for it (getent exits 2)
    getent.write_text("#!/bin/sh\ncase \"$1\" in passwd) echo 'packer:x:1000:1000::/home/packer:/bin/bash';; "
                      "*) exit 2;; esac\n")
    getent.chmod(0o755)
    code, out = run_check(PASSWORD_LOCKED_CHECK, tmp_path, {"install_user": "packer"}, bin_dir)
    assert code == 1 and "packer has no shadow entry" in out, out
    assert not PASSWORD_LOCKED_CHECK.judge(code, out, {})[0]


def test_every_linux_template_locks_the_install_password_when_it_generalizes():
    common = (REPO / "templates/common/common.pkr.hcl").read_text()
    generalize = common[common.index("generalize_linux = ["):]
    assert '"passwd -l ${var.ssh_username}"' in generalize[:generalize.index("]")]
    for family in ("debian", "ubuntu", "rocky"):
        assert "local.generalize_linux" in (REPO / f"templates/{family}/{family}.pkr.hcl").read_text()


# ------------------------------------------------------------------ cloud-init's exit 2, in both places

# `cloud-init status --wait --long` as cloud-init 24.1 prints it (tabular, --wait: its dots first)
DEGRADED = ("....\nstatus: done\nextended_status: degraded done\nboot_status_code: enabled-by-generator\n"
            "detail: DataSourceNoCloud [seed=/dev/sr0][dsmode=net]\nerrors: []\nrecoverable_errors:\nWARNING:\n"
            "\t- Failed to set locale en_US.UTF-8\nDEPRECATED:\n\t- Deprecated cloud-config provided: chpasswd.list\n")
DONE = "\nstatus: done\nextended_status: done\nerrors: []\nrecoverable_errors: {}\n"
FAILED = ("\nstatus: error\nextended_status: error - done\nerrors:\n\t- ('scripts_user', RuntimeError('Runparts'))\n"
          "recoverable_errors: {}\n")
CASES = [(0, DONE, True, False), (2, DEGRADED, True, True), (1, FAILED, False, False)]


def wait_cloud_init_script() -> str:
    """local.wait_cloud_init of the common Packer file, as the shell provisioner's script (one line each)."""
    common = (REPO / "templates/common/common.pkr.hcl").read_text()
    block = common[common.index("wait_cloud_init = ["):]
    block = block[:block.index("\n  ]\n")]
    return "".join(json.loads(m) + "\n" for m in re.findall(r'^\s*("(?:[^"\\]|\\.)*"),?$', block, re.M))


def provision(tmp_path, exit_code: int, output: str) -> subprocess.CompletedProcess:
    """The script run as the provisioner runs it (sh -eu), a fake cloud-init on PATH answering as given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "answer").write_text(output)
    fake = bin_dir / "cloud-init"
    fake.write_text(f"#!/bin/sh\n[ \"$*\" = 'status --wait --long' ] || exit 99\ncat '{bin_dir}/answer'\n"
                    f"exit {exit_code}\n")
    fake.chmod(0o755)
    script = tmp_path / "script.sh"
    script.write_text(wait_cloud_init_script())
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["sh", "-eu", str(script)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("exit_code", "output", "accepted", "warned"), CASES, ids=["done", "degraded", "error"])
def test_cloud_init_exit_2_is_accepted_with_a_warning_by_the_provisioner_and_the_smoke_check_alike(
        tmp_path, exit_code, output, accepted, warned):
    done = provision(tmp_path, exit_code, output)
    assert (done.returncode == 0) is accepted, (done.stdout, done.stderr)
    passed, detail = CLOUD_INIT.judge(exit_code, output, {})
    assert passed is accepted and CLOUD_INIT.warned(exit_code) is warned
    errors = ["Failed to set locale en_US.UTF-8", "Deprecated cloud-config provided: chpasswd.list"]
    if warned:  # both name the errors cloud-init recovered from
        assert "WARNING: cloud-init finished with recoverable errors (exit 2)" in done.stdout
        assert all(e in done.stdout for e in errors) and all(e in detail for e in errors)
        assert detail.startswith("passed with a warning: exit 2") and "DEPRECATED: Deprecated" in detail
    else:
        assert "WARNING" not in done.stdout and "warning" not in detail
    if not accepted:
        assert "cloud-init failed (exit 1)" in done.stderr and done.returncode == 1


def test_listed_errors_reads_both_lists_with_their_levels():
    assert listed_errors(DEGRADED) == ["WARNING: Failed to set locale en_US.UTF-8",
                                       "DEPRECATED: Deprecated cloud-config provided: chpasswd.list"]
    assert listed_errors(FAILED) == ["ERROR: ('scripts_user', RuntimeError('Runparts'))"]
    assert listed_errors(DONE) == []


def test_every_linux_template_waits_for_cloud_init_through_the_one_shared_script():
    found = [p for p in (REPO / "templates").rglob("*.pkr.hcl") if "cloud-init status" in p.read_text()]
    assert found == [REPO / "templates/common/common.pkr.hcl"]  # nowhere else: one way to judge exit 2
    for family in ("debian", "ubuntu", "rocky"):
        assert "inline = concat(local.wait_cloud_init, [" in (REPO / f"templates/{family}/{family}.pkr.hcl").read_text()
