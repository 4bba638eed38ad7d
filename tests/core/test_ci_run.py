"""`.ci/run` runs the real guest or fails: a machine that cannot run it fails CI before the suite, unless it opts
out explicitly, and then the last line says what was not run. Run against a copy of the script with a stand-in
`make` (records its arguments) and a stand-in `.venv/bin/python` (says why real guests cannot run, or nothing)."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from support import REPO

pytestmark = pytest.mark.timeout(60)


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_ci(tmp_path: Path, why: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    tree = tmp_path / "clone"
    (tree / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci/run", tree / ".ci/run")
    calls = tmp_path / "make-calls"
    _executable(tmp_path / "bin/make", f'#!/bin/sh\necho "$*" >> {calls}\n')
    _executable(tree / ".venv/bin/python", f"#!/bin/sh\necho '{why}'\n")
    variables = {k: v for k, v in os.environ.items() if not k.startswith("PACKER_ASSETS_")}
    variables |= {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", **env}
    done = subprocess.run(["bash", str(tree / ".ci/run")], env=variables, capture_output=True, text=True, timeout=30)
    return done, calls.read_text().splitlines() if calls.exists() else []


def test_a_machine_without_real_guests_fails_ci_before_the_suite(tmp_path):
    done, calls = run_ci(tmp_path, "needs qemu-system-x86_64")
    assert done.returncode == 1
    assert "cannot run the real guest (needs qemu-system-x86_64)" in done.stderr
    assert "PACKER_ASSETS_CI_WITHOUT_REAL_GUEST" in done.stderr
    assert calls == ["test-deps venv"]  # the check needs the venv; the suite never started


def test_an_explicit_opt_out_passes_and_its_last_line_says_what_was_not_run(tmp_path):
    done, calls = run_ci(tmp_path, "needs root", PACKER_ASSETS_CI_WITHOUT_REAL_GUEST="a container without KVM")
    assert done.returncode == 0 and calls == ["test-deps venv", "test"]
    last = done.stdout.strip().splitlines()[-1]
    assert "WITHOUT THE REAL GUEST" in last and "a container without KVM" in last and "NOT RUN" in last
    assert "needs root" in last


def test_a_machine_with_real_guests_runs_the_suite_then_the_real_guest_build(tmp_path):
    done, calls = run_ci(tmp_path, "")
    assert done.returncode == 0, done.stderr
    assert calls == ["test-deps venv", "test", "demo-real", "lab-down"]
    assert done.stdout.strip().splitlines()[-1].startswith("CI passed: make test and make demo-real")
