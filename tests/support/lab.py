"""The whole lab in-process (fake PVE, mirror, guest) with a project that ran proxmox_env (loaded by conftest.py)."""

import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from packer_assets.evidence.chain import new_chain_id
from packer_assets.evidence.layout import Layout
from packer_assets_lab.stack import LabStack
from packer_assets.pve.bootstrap import BootstrapConfig
from packer_assets.pve.client import Endpoint
from packer_assets.pve.init_env import AdminLogin, run_init
from support import REPO


@dataclass
class LabProject:
    stack: LabStack
    root: Path

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

    @property
    def pve(self):
        return self.stack.pve

    @property
    def mirror(self):
        return self.stack.mirror


@contextmanager
def started_lab_project(folder: Path, monkeypatch, real_guests: tuple[str, ...] = (), source: Path = REPO):
    """LabStack on the catalog of `source` (default: the shipped one; real_guests: keys whose VMs run for real),
    its env in os.environ, and proxmox_env run into folder/project."""
    stack = LabStack.start(folder / "lab", source / "templates/catalog.yaml", secrets.token_urlsafe(16),
                           secrets.token_urlsafe(16), project_dir=source, real_guests=real_guests)
    try:
        for name, value in stack.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(source)  # packer_dir paths in the catalog are relative to the project
        root = folder / "project"
        monkeypatch.setenv("PACKER_ASSETS_ROOT", str(root))
        run_init(Layout(root), Endpoint(stack.served.url, ca_file=str(stack.pki.ca_file)),
                 AdminLogin("root@pam", stack.root_password), BootstrapConfig(build_password=True), new_chain_id("init"))
        yield LabProject(stack, root)
    finally:
        stack.stop()


@pytest.fixture
def lab_project(tmp_path, monkeypatch):
    """The lab with answering guests and a project that ran proxmox_env (started_lab_project)."""
    with started_lab_project(tmp_path, monkeypatch) as project:
        yield project


@pytest.fixture
def lab_user_project(tmp_path, monkeypatch):
    """The lab started, as `make demo` starts it, on a user's project: a copy of templates/ (catalog and
    Packer folders) the test may edit as a user does; the lab points the project at that catalog itself."""
    user = tmp_path / "user-project"
    shutil.copytree(REPO / "templates", user / "templates")
    with started_lab_project(tmp_path, monkeypatch, source=user) as project:
        yield project
