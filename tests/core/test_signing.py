"""SSH signatures over proof manifests: our SSHSIG against the real ssh-keygen, both ways."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from packer_assets.evidence.signing import NAMESPACE, SignatureError, Signer, SigningKeyError, allowed_signer, verify

needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) missing")
pytestmark = [pytest.mark.sshd, needs_ssh_keygen]


def keygen(folder: Path, name="signing", kind="ed25519", passphrase="") -> Path:
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "builds@example.org", "-f", str(key)],
                   check=True)
    return key


def allowed(folder: Path, key: Path, principal="builds@example.org", options="") -> Path:
    line = " ".join(x for x in (principal, options, " ".join(key.with_suffix(".pub").read_text().split()[:2])) if x)
    path = folder / "allowed_signers"
    path.write_text(f"# who may sign proofs\n{line}\n")
    return path


def test_our_signature_verifies_with_stock_ssh_keygen(tmp_path):
    key = keygen(tmp_path)
    message = tmp_path / "manifest.json"
    message.write_bytes(b'{"files": {"packer.log": "ab"}}\n')
    (tmp_path / "manifest.json.sig").write_text(Signer(key, "builds@example.org").sign(message.read_bytes()))
    done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed(tmp_path, key)), "-I", "builds@example.org",
                           "-n", NAMESPACE, "-s", str(tmp_path / "manifest.json.sig")],
                          input=message.read_bytes(), capture_output=True)
    assert done.returncode == 0, done.stderr
    assert b'Good "packer-assets-proof" signature for builds@example.org' in done.stdout
    # one byte changed: ssh-keygen refuses it too
    done = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed_signers"), "-I",
                           "builds@example.org", "-n", NAMESPACE, "-s", str(tmp_path / "manifest.json.sig")],
                          input=message.read_bytes().replace(b"ab", b"ac"), capture_output=True)
    assert done.returncode != 0


def test_we_verify_what_ssh_keygen_signs_and_name_the_signer(tmp_path):
    key = keygen(tmp_path)
    message = tmp_path / "manifest.json"
    message.write_text("manifest\n")
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", NAMESPACE, str(message)], check=True)
    signed_by = verify(message.read_bytes(), (tmp_path / "manifest.json.sig").read_text())
    assert signed_by.split()[:2] == key.with_suffix(".pub").read_text().split()[:2]
    assert allowed_signer(allowed(tmp_path, key), signed_by) == "builds@example.org"
    assert allowed_signer(allowed(tmp_path, key, options='namespaces="git"'), signed_by) is None
    other = keygen(tmp_path, "other")
    assert allowed_signer(allowed(tmp_path, other), signed_by) is None


def test_a_changed_message_another_namespace_or_garbage_is_refused(tmp_path):
    signature = Signer(keygen(tmp_path)).sign(b"the manifest")
    with pytest.raises(SignatureError, match="does not verify"):
        verify(b"the manifesT", signature)
    with pytest.raises(SignatureError, match="namespace 'packer-assets-proof', not 'git'"):
        verify(b"the manifest", signature, namespace="git")
    with pytest.raises(SignatureError, match="armoured"):
        verify(b"the manifest", "not a signature")
    body = signature.splitlines()
    with pytest.raises(SignatureError):
        verify(b"the manifest", "\n".join([body[0], body[1][:20], body[-1]]))


@pytest.mark.parametrize(("make", "said"), [
    (lambda d: keygen(d, kind="rsa"), "an Ed25519 key is needed"),
    (lambda d: keygen(d, passphrase="secret-passphrase"), "not an unencrypted OpenSSH private key"),
    (lambda d: d / "absent", "cannot read it"),
])
def test_an_unusable_key_is_one_line_naming_the_file_never_its_content(tmp_path, make, said):
    path = make(tmp_path)
    with pytest.raises(SigningKeyError) as caught:
        Signer(path).sign(b"x")
    assert str(path) in str(caught.value) and said in str(caught.value)
    if path.exists():
        assert path.read_text().splitlines()[1][:20] not in str(caught.value)


# ------------------------------------------------------------------ keys as OpenSSH treats them (issue 24, item 11)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_a_key_group_or_others_may_read_is_refused_as_ssh_keygen_refuses_it(tmp_path, mode):
    key = keygen(tmp_path)
    key.chmod(mode)
    with pytest.raises(SigningKeyError) as caught:
        Signer(key).sign(b"x")
    said = str(caught.value)
    assert said == (f"signing key {key}: UNPROTECTED PRIVATE KEY FILE: permissions 0{mode:o} are too open, "
                     f"ssh-keygen ignores such a key too (chmod 600 {key})")
    assert key.read_text().splitlines()[1][:20] not in said
    # stock ssh-keygen refuses the same file (the file is ours: it checks only its owner's keys)
    done = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "UNPROTECTED PRIVATE KEY FILE" in done.stderr


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_key_only_its_owner_may_read_signs(tmp_path, mode):
    key = keygen(tmp_path)
    key.chmod(mode)
    assert verify(b"x", Signer(key).sign(b"x")).split()[:2] == key.with_suffix(".pub").read_text().split()[:2]


def test_a_directory_or_a_fifo_given_as_the_key_is_named_for_what_it_is(tmp_path):
    with pytest.raises(SigningKeyError, match=f"^signing key {tmp_path}: is a directory, not a key file$"):
        Signer(tmp_path).public_key()
    os.mkfifo(tmp_path / "fifo", 0o600)  # opened without blocking: no writer needed
    with pytest.raises(SigningKeyError, match="fifo: not a regular file$"):
        Signer(tmp_path / "fifo").public_key()
