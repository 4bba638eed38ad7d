"""pytest fixtures for the lab's guest (loaded by conftest.py)."""

import paramiko
import pytest

from packer_assets_lab.guest import LabGuest

GUEST_USER = "packer"
GUEST_PASSWORD = "lab-guest-pw-5a1c"


@pytest.fixture(scope="session")
def guest_client_key() -> paramiko.PKey:
    """A client key the lab guest authorizes (ECDSA: generated fast, unlike RSA)."""
    return paramiko.ECDSAKey.generate()


@pytest.fixture
def guest_client_key_file(tmp_path, guest_client_key):
    """guest_client_key as an OpenSSH private key file (mode 0600), for ssh/scp binaries."""
    path = tmp_path / "id_ecdsa"
    guest_client_key.write_private_key_file(str(path))
    return path


@pytest.fixture
def guest_password() -> str:
    return GUEST_PASSWORD


@pytest.fixture
def guest_state_dir(tmp_path):
    """The guest's state (host key, commands.log, files/); reuse it to restart the same guest."""
    return tmp_path / "guest"


@pytest.fixture
def lab_guest(guest_state_dir, guest_client_key, guest_password):
    """A started LabGuest for user `packer` (password and key auth), stopped after the test."""
    guest = LabGuest(guest_state_dir, GUEST_USER, password=guest_password, authorized_keys=[guest_client_key])
    with guest:
        yield guest


@pytest.fixture
def guest_ssh(lab_guest, guest_password):
    """A paramiko SSHClient logged in to lab_guest by password, verifying its host key."""
    client = guest_ssh_client(lab_guest, password=guest_password)
    yield client
    client.close()


def guest_ssh_client(guest: LabGuest, **auth) -> paramiko.SSHClient:
    """An SSHClient connected to `guest` (on `port=`, default its own), trusting only its host key (auth: password=
    or pkey=)."""
    port = auth.pop("port", guest.port)
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[{guest.host}]:{port}", guest.host_key.get_name(), guest.host_key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        guest.host, port, username=auth.pop("username", guest.username),
        allow_agent=False, look_for_keys=False, timeout=10, **auth,
    )
    return client
