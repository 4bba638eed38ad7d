"""pve/guest_exec.py's host key handling without a guest: a real Debian 12 clone reports an ssh-dss host key
(cloud-init makes one), which paramiko no longer loads; fingerprints and pinning must not trip on it."""

import base64
import hashlib
import struct
import time

import pytest

from packer_assets.pve.guest_exec import EphemeralKey, SshLoginError, host_key_fingerprints, ssh_run


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


DSS_BLOB = _string(b"ssh-dss") + b"".join(_string(bytes([1, n])) for n in range(4))
DSS_LINE = "ssh-dss " + base64.b64encode(DSS_BLOB).decode()


def test_fingerprints_of_every_key_type_ssh_dss_included():
    ed25519 = EphemeralKey.generate().public.split()
    lines = [DSS_LINE, f"{ed25519[0]} {ed25519[1]}"]
    found = host_key_fingerprints(lines)
    digest = base64.b64encode(hashlib.sha256(DSS_BLOB).digest()).decode().rstrip("=")
    assert found[0] == f"ssh-dss SHA256:{digest}"
    assert found[1].startswith("ssh-ed25519 SHA256:")


def test_only_ssh_dss_host_keys_leave_nothing_to_pin_and_say_so():
    with pytest.raises(SshLoginError, match=r"only types SSH clients no longer use \(ssh-dss\)"):
        ssh_run("127.0.0.1", 9, "debian", EphemeralKey.generate(), [DSS_LINE], "true", deadline=time.monotonic())
