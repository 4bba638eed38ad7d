"""pytest fixtures for the lab's pve (loaded by conftest.py).

Everything goes over HTTPS with certificate verification on: clients trust the lab CA (lab_pki.ca_file).
"""

import secrets

import pytest
from proxmoxer import ProxmoxAPI

from packer_assets_lab.certs import make_lab_pki
from packer_assets_lab.pve import LabPve
from packer_assets_lab.serving import ServedPve


@pytest.fixture(scope="session")
def lab_pki(tmp_path_factory):
    """The lab CA and the server certificate for 127.0.0.1/localhost (one per session)."""
    return make_lab_pki(tmp_path_factory.mktemp("lab-pki"))


@pytest.fixture
def lab_pve_serving(lab_pki, tmp_path):
    """A started LabPve on 127.0.0.1 and a free port, as its ServedPve (.pve, .url, .call(coro))."""
    pve = LabPve(password=secrets.token_urlsafe(18), data_dir=tmp_path / "pve-data")
    with ServedPve(pve, lab_pki) as served:
        yield served


@pytest.fixture
def lab_pve(lab_pve_serving):
    """The started LabPve; root@pam's password is lab_pve.root_password."""
    return lab_pve_serving.pve


def pve_client(pve, ca_file, **auth):
    """A proxmoxer client for the served pve, verifying its certificate against the lab CA."""
    return ProxmoxAPI(pve.host, port=pve.port, backend="https", service="PVE", verify_ssl=ca_file, timeout=30,
                      **auth)


@pytest.fixture
def pve_root(lab_pve, lab_pki):
    """proxmoxer logged in as root@pam (ticket) over HTTPS."""
    return pve_client(lab_pve, lab_pki.ca_file, user="root@pam", password=lab_pve.root_password)


@pytest.fixture
def pve_login(lab_pve, lab_pki):
    """Log in as someone else: pve_login("u@pve", password=...) or pve_login("u@pve!tok", secret=...)."""

    def login(authid, password=None, secret=None):
        if secret is not None:
            user, _, token = authid.partition("!")
            return pve_client(lab_pve, lab_pki.ca_file, user=user, token_name=token, token_value=secret)
        return pve_client(lab_pve, lab_pki.ca_file, user=authid, password=password)
    return login
