"""The project stands alone: an export of the repository, with nothing beside it, renders and validates
every key, and no tracked file reads the folder that sits next to our own checkout only."""

import os
import shutil
import subprocess
import sys

import pytest
from support import REPO
from support.checkout import export_repository

pytestmark = [pytest.mark.packer]
BESIDE = "/".join(["..", "shared"])  # spelled so that this file does not match itself


@pytest.mark.skipif(shutil.which("packer") is None, reason="needs the packer binary (make test installs it)")
@pytest.mark.timeout(660)  # its own waits add up to 600 s
def test_an_export_with_nothing_beside_it_renders_and_validates_every_key(tmp_path):
    clone = export_repository(tmp_path / "alone" / "packer-assets")
    assert sorted(p.name for p in clone.parent.iterdir()) == ["packer-assets"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PACKER_INSTALL", "PROXMOX_"))}
    env.update(PYTHONPATH=str(clone), PACKER_INSTALL_PASSWORD="pw-standalone", PACKER_ASSETS_ROOT=str(clone))
    # the code under test is the export's, not this checkout's
    where = subprocess.run([sys.executable, "-c", "import packer_assets; print(packer_assets.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(clone)), where.stdout
    proc = subprocess.run([sys.executable, "-m", "packer_assets.cli", "validate", "--allow-degraded"], cwd=clone,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key in ("ubuntu-2204", "ubuntu-2404", "debian-12", "rocky-9", "windows-2022"):
        assert f"ok   {key}:" in proc.stdout, proc.stdout
    assert "[autoinstall" in proc.stdout  # the Ubuntu keys were checked against the shipped schemas


def test_no_tracked_file_reads_a_folder_beside_the_checkout():
    try:
        found = subprocess.run(["git", "-C", str(REPO), "grep", "-l", "-e", BESIDE, "--", "."],
                               capture_output=True, text=True)
    except OSError:
        pytest.skip("git is not installed")
    if found.returncode not in (0, 1):
        pytest.skip("not a git checkout")
    assert found.stdout == "", f"these tracked files name {BESIDE}, which no clone has:\n{found.stdout}"
