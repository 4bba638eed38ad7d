"""`packer-assets proof verify`: a bundle passes as written, and each kind of tampering is named."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from support.proofs import sample, written_bundle

from packer_assets.cli import main
from packer_assets.evidence.layout import Layout, sha256_file
from packer_assets.evidence.proof import write_build_proof
from packer_assets.evidence.signing import NAMESPACE, Signer
from packer_assets.evidence.verify import verify_bundle

pytestmark = pytest.mark.sshd  # ssh-keygen makes the keys
needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) missing")


def keygen(folder, name="signing"):
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture
def signed(tmp_path):
    key = keygen(tmp_path)
    (tmp_path / "allowed_signers").write_text(f"builds@example.org {key.with_suffix('.pub').read_text()}")
    return written_bundle(tmp_path / "root", Signer(key, "builds@example.org")), tmp_path / "allowed_signers"


def run_cli(capsys, monkeypatch, root, *args):
    monkeypatch.setenv("PACKER_ASSETS_ROOT", str(root))
    with pytest.raises(SystemExit) as done:
        main(["proof", "verify", *map(str, args)])
    return done.value.code, capsys.readouterr().out


def test_a_signed_bundle_verifies_and_names_its_signer(signed, capsys, monkeypatch):
    folder, allowed = signed
    report = verify_bundle(folder, allowed)
    assert report.ok and report.signature == "signed by builds@example.org", report.lines()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["README.md", "packer.log", "proof.json"]
    assert manifest["signed_by"]["key_id"] == "builds@example.org"
    # by chain ID, as a script would
    code, out = run_cli(capsys, monkeypatch, folder.parents[6], "CHAIN-20261125T100000Z-ubuntu-2204",
                        "--allowed-signers", allowed)
    assert code == 0 and out.startswith("ok  ") and "signed by builds@example.org" in out


def _evil_dir(f):
    (f / "evil").mkdir()
    (f / "evil/x.sh").write_text("echo pwned\n")


def _symlink_over_listed(f):
    copy = f.parent / "proof-copy.json"
    copy.write_bytes((f / "proof.json").read_bytes())
    (f / "proof.json").unlink()
    (f / "proof.json").symlink_to(copy)  # same bytes, but not the file that was signed


def _fifo_over_listed(f):
    (f / "packer.log").unlink()
    os.mkfifo(f / "packer.log")  # opening it to hash it would block forever


def _socket(f):
    here = os.getcwd()
    os.chdir(f)  # a socket path must be short: bind it by its relative name
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind("sock")
    finally:
        os.chdir(here)


@pytest.mark.parametrize(("tamper", "named"), [
    (lambda f: f.joinpath("packer.log").write_bytes(f.joinpath("packer.log").read_bytes()[:-2] + b"X\n"),
     "packer.log: changed"),
    (lambda f: f.joinpath("proof.json").write_text(f.joinpath("proof.json").read_text().replace("9101", "9109")),
     "proof.json: changed"),
    (lambda f: f.joinpath("extra.txt").write_text("slipped in\n"), "extra.txt: added"),
    (lambda f: f.joinpath("README.md").unlink(), "README.md: missing"),
    (lambda f: f.joinpath("manifest.json").write_text(f.joinpath("manifest.json").read_text() + " "),
     "manifest.json.sig: signature does not verify"),
    (lambda f: f.joinpath("manifest.json.sig").unlink(), "manifest.json.sig: missing, but the manifest says it was signed"),
    # exactly what was signed: anything but a listed regular file fails (issue 24, item 2)
    (_evil_dir, "evil: a directory, not a regular file"),
    (_evil_dir, "evil/x.sh: added"),
    (lambda f: (f / "empty").mkdir(), "empty: a directory"),
    (lambda f: (f / "etc").symlink_to("/etc"), "etc: a symlink, not a regular file"),
    (lambda f: (f / "notes.txt").symlink_to(f / "README.md"), "notes.txt: a symlink"),
    (_symlink_over_listed, "proof.json: a symlink, not a regular file"),
    (lambda f: os.mkfifo(f / "pipe"), "pipe: a FIFO, not a regular file"),
    (_fifo_over_listed, "packer.log: a FIFO, not a regular file"),
    (_socket, "sock: a socket, not a regular file"),
    (lambda f: (f / ".hidden").write_text("x"), ".hidden: added"),
])
def test_each_tampering_is_named_and_fails(signed, capsys, monkeypatch, tamper, named):
    folder, allowed = signed
    tamper(folder)
    report = verify_bundle(folder, allowed)
    assert not report.ok and any(p.startswith(named) for p in report.problems), report.problems
    code, out = run_cli(capsys, monkeypatch, folder.parents[6], folder, "--allowed-signers", allowed)
    assert code == 1 and out.startswith("FAILED") and named in out


def test_a_proof_json_edited_with_its_manifest_still_fails_its_signature_and_schema(signed):
    folder, allowed = signed
    proof = json.loads((folder / "proof.json").read_text())
    proof["template"]["vmid"] = "not a number"
    (folder / "proof.json").write_text(json.dumps(proof))
    from packer_assets.evidence.layout import write_manifest
    write_manifest(folder)  # the forger rewrites the manifest too, but cannot sign it
    report = verify_bundle(folder, allowed)
    assert any("proof.json: does not match its schema at template/vmid" in p for p in report.problems)
    assert any(p.startswith("manifest.json.sig: signature does not verify") for p in report.problems)


@needs_ssh_keygen
def test_a_proof_of_a_build_past_end_of_life_verifies_and_its_signature_covers_the_date(tmp_path):
    """A build past its OS's end of life is proved all the same (the check only warns): the signed bundle
    verifies, and moving the date in proof.json (manifest rewritten too) breaks the signature."""
    key = keygen(tmp_path)
    (tmp_path / "allowed_signers").write_text(f"builds@example.org {key.with_suffix('.pub').read_text()}")
    eol = {"date": "2026-06-10", "past": True, "days_past": 168}
    folder = written_bundle(tmp_path / "root", Signer(key, "builds@example.org"), eol=eol)
    assert json.loads((folder / "proof.json").read_text())["eol"] == eol
    assert "| End of life | `past end of life since 2026-06-10 (168 days at build time)` |" in (
        folder / "README.md").read_text()
    report = verify_bundle(folder, tmp_path / "allowed_signers")
    assert report.ok, report.lines()
    proof = json.loads((folder / "proof.json").read_text())
    proof["eol"] = {"date": "2030-06-30", "past": False, "days_past": 0}  # hiding it
    (folder / "proof.json").write_text(json.dumps(proof))
    from packer_assets.evidence.layout import write_manifest
    write_manifest(folder)
    report = verify_bundle(folder, tmp_path / "allowed_signers")
    assert any(p.startswith("manifest.json.sig: signature does not verify") for p in report.problems)


def test_another_signer_is_refused_by_allowed_signers(signed, tmp_path):
    folder, _ = signed
    other = keygen(tmp_path, "other")
    (tmp_path / "other_allowed").write_text(f"someone@else {other.with_suffix('.pub').read_text()}")
    report = verify_bundle(folder, tmp_path / "other_allowed")
    assert not report.ok and report.signature == "signer not allowed"


def test_unsigned_bundles_pass_on_digests_and_say_so(tmp_path, capsys, monkeypatch):
    folder = written_bundle(tmp_path)
    report = verify_bundle(folder)
    assert report.ok and report.signature == "unsigned"
    assert not verify_bundle(folder, require_signature=True).ok
    code, out = run_cli(capsys, monkeypatch, tmp_path)  # every bundle under the output root
    assert code == 0 and "(unsigned)" in out
    code, _ = run_cli(capsys, monkeypatch, tmp_path, "CHAIN-20261125T100000Z-debian-12")
    assert code == 2  # no such bundle: a usage error, not a verification failure


# ------------------------------------------------------------------ exactly what was signed (issue 24, item 2)


def _other_build(root, signer):
    """A second signed bundle of the same key (CHAIN-20261126T...), as another build leaves it."""
    layout = Layout(root)
    log = layout.build_log_dir("ubuntu-2204", "20261126T100000Z") / "packer.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("[CHAIN-20261126T100000Z-ubuntu-2204] [packer] Build 'proxmox' finished.\n")
    proof = sample(chain_id="CHAIN-20261126T100000Z-ubuntu-2204", log_sha256=sha256_file(log))
    return write_build_proof(layout, proof, log, signer=signer)


def test_the_chain_asked_for_must_be_the_bundles(signed, tmp_path, capsys, monkeypatch):
    folder, allowed = signed
    other = _other_build(tmp_path / "root", Signer(tmp_path / "signing", "builds@example.org"))
    shutil.rmtree(folder)
    shutil.copytree(other, folder)  # A's folder holds B's intact, signed bundle
    root, chain_a = folder.parents[6], "CHAIN-20261125T100000Z-ubuntu-2204"
    code, out = run_cli(capsys, monkeypatch, root, chain_a, "--require-signature", "--allowed-signers", allowed)
    assert code == 1 and out.startswith("FAILED"), out
    assert f"proof.json: chain_id 'CHAIN-20261126T100000Z-ubuntu-2204' is not {chain_a}" in out
    assert run_cli(capsys, monkeypatch, root, "--allowed-signers", allowed)[0] == 1  # every bundle: the same
    code, out = run_cli(capsys, monkeypatch, root, "CHAIN-20261126T100000Z-ubuntu-2204", "--allowed-signers", allowed)
    assert code == 0, out  # B itself is fine
    # a stamp folder that is a link to another bundle is not that bundle either
    shutil.rmtree(folder)
    folder.symlink_to(other)
    code, out = run_cli(capsys, monkeypatch, root, chain_a, "--allowed-signers", allowed)
    assert code == 1 and "is not CHAIN-20261125T100000Z-ubuntu-2204" in out


def test_allowed_signers_given_means_a_signature_is_required(tmp_path, capsys, monkeypatch):
    folder = written_bundle(tmp_path)
    key = keygen(tmp_path)
    (tmp_path / "allowed_signers").write_text(f"builds@example.org {key.with_suffix('.pub').read_text()}")
    report = verify_bundle(folder, tmp_path / "allowed_signers")
    assert not report.ok and report.signature == "unsigned"
    assert any(p.startswith("manifest.json.sig: missing: the bundle is unsigned") for p in report.problems)
    code, out = run_cli(capsys, monkeypatch, tmp_path, folder, "--allowed-signers", tmp_path / "allowed_signers")
    assert code == 1 and out.startswith("FAILED")


@pytest.mark.parametrize("name", ["proof.json", "README.md", "packer.log"])
def test_a_file_every_bundle_has_is_named_missing_even_when_unlisted(tmp_path, name):
    from packer_assets.evidence.layout import write_manifest

    folder = written_bundle(tmp_path)
    (folder / name).unlink()
    write_manifest(folder)  # a manifest that no longer lists it
    report = verify_bundle(folder)
    assert not report.ok and any(p.startswith(f"{name}: missing") for p in report.problems), report.problems


@pytest.mark.parametrize("make", [lambda d: d / "nonexistent", lambda d: d, lambda d: d / "empty_dir"])
def test_an_unreadable_allowed_signers_file_is_one_line_naming_it(signed, tmp_path, make):
    folder, _ = signed
    (tmp_path / "empty_dir").mkdir()
    path = make(tmp_path)
    done = subprocess.run([sys.executable, "-m", "packer_assets.cli", "proof", "verify", str(folder),
                           "--allowed-signers", str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PACKER_ASSETS_ROOT": str(folder.parents[6])})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and f"allowed signers file {path}:" in done.stderr, done.stderr


def test_a_signature_by_another_key_than_the_manifest_names_fails(signed, tmp_path):
    folder, allowed = signed
    other = keygen(tmp_path, "other")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["signed_by"]["public_key"] = other.with_suffix(".pub").read_text().strip()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "manifest.json.sig").write_text(Signer(tmp_path / "signing").sign((folder / "manifest.json").read_bytes()))
    report = verify_bundle(folder, allowed)
    assert not report.ok and report.signature == "bad signature", report.problems


def test_without_a_key_id_any_principal_of_the_keys_line_may_sign(tmp_path):
    key = keygen(tmp_path)
    folder = written_bundle(tmp_path / "root", Signer(key))  # no PACKER_ASSETS_SIGNING_KEY_ID
    public = key.with_suffix(".pub").read_text().strip()
    (tmp_path / "allowed").write_text(f"a@example.org,b@example.org {public}\n")
    report = verify_bundle(folder, tmp_path / "allowed")
    assert report.ok and report.signature == "signed by a@example.org,b@example.org", report.lines()
    (tmp_path / "allowed").write_text(f'a@example.org namespaces="git" {public}\n')  # the namespace still counts
    report = verify_bundle(folder, tmp_path / "allowed")
    assert not report.ok and 'not permitted for use in signature namespace "packer-assets-proof"' in report.lines()[1]


# ------------------------------------------------------------------ our verdict is ssh-keygen's


FUTURE, PAST = "20991231", "20200101"
# (allowed_signers text, with {key} the signer's public key and {other} another key; the verdict)
ALLOWED_SIGNERS_TABLE = [
    ("builds@example.org {key}", True),
    ('builds@example.org namespaces="packer-assets-proof" {key}', True),
    ('builds@example.org namespaces="packer-assets-proof-other" {key}', False),
    ('builds@example.org namespaces="packer-assets" {key}', False),
    ('builds@example.org namespaces="git,packer-assets-proof" {key}', True),
    ('builds@example.org namespaces="git,file" {key}', False),
    ('builds@example.org namespaces="packer-assets-*" {key}', True),
    ('builds@example.org namespaces="packer-assets-proo?" {key}', True),
    ('builds@example.org namespaces="*,!packer-assets-proof" {key}', False),
    ('builds@example.org namespaces="" {key}', False),
    ('builds@example.org NAMESPACES="packer-assets-proof" {key}', True),
    ("builds@example.org namespaces=packer-assets-proof {key}", False),
    ('builds@example.org namespaces="packer-assets-proof {key}', False),
    ('builds@example.org namespaces="a\\"b,packer-assets-proof" {key}', True),
    ('builds@example.org namespaces="git",namespaces="packer-assets-proof" {key}', False),
    ('builds@example.org namespaces="packer-assets-proof", {key}', False),
    ('builds@example.org ,namespaces="packer-assets-proof" {key}', True),
    ("*@example.org {key}", True),
    ("builds@example.or? {key}", True),
    ("Builds@example.org {key}", False),
    ("builds@*,!builds@example.org {key}", False),
    ("other@example.org,builds@example.org {key}", True),
    ("other@example.org {key}", False),
    ('"builds@example.org" {key}', True),
    ("builds@example.org cert-authority {key}", False),
    ('builds@example.org cert-authority,namespaces="packer-assets-proof" {key}', False),
    ("builds@example.org cert-authority {key}\nbuilds@example.org {key}", True),
    ('builds@example.org namespaces="packer-assets-proof" cert-authority {key}', False),
    (f'builds@example.org valid-after="{PAST}" {{key}}', True),
    (f'builds@example.org valid-after="{FUTURE}Z" {{key}}', False),
    (f'builds@example.org valid-before="{PAST}Z" {{key}}', False),
    (f'builds@example.org valid-before="{FUTURE}2359" {{key}}', True),
    (f'builds@example.org valid-after="{PAST}120000z",valid-before="{FUTURE}235959UTC" {{key}}', True),
    (f'builds@example.org valid-before="{PAST}",valid-after="{FUTURE}" {{key}}', False),
    ('builds@example.org valid-after="2020" {key}', False),
    ('builds@example.org valid-after="20201301" {key}', False),
    ('builds@example.org valid-before="19700101Z" {key}', False),
    ("builds@example.org no-touch-required {key}", False),
    ("builds@example.org {other}\nbuilds@example.org {key}", True),
    ("builds@example.org bogus {key}\nbuilds@example.org {key}", True),  # a bad line is skipped
    ("builds@example.org bogus {key}", False),
    ('builds@example.org namespaces="git" {key}\nbuilds@example.org {key}', True),
    (f'builds@example.org valid-before="{PAST}" {{key}}\nbuilds@example.org {{key}}', True),
    ("# who may sign\n\n   \n\tbuilds@example.org {key} a comment\n", True),
    ("  # builds@example.org {key}", False),
    ("builds@example.org {key}\r\n", True),
    ("builds@example.org", False),
    ("builds@example.org {type} {other_blob}", False),
    ("builds@example.org ssh-rsa {blob}", False),
    ("builds@example.org {type} AAAA{blob}", False),
    ("builds@example.org {type} {blob}AAAA", False),
    ("builds@example.org rsa-sha2-256 {blob}", False),
    ('"builds@example.org other" {key}', False),
    ('builds@example.org,"x" {key}', True),
    ("!other@example.org {key}", False),
    ("*,!builds@example.org {key}", False),
    ('builds@example.org namespaces="!git,packer-assets-proof" {key}', True),
    ("builds@example.org\t{key}", True),
    ('   builds@example.org   namespaces="packer-assets-proof"   {key}', True),
    ("builds@example.org cert-authorityX {key}", False),
    ("builds@example.org Cert-Authority {key}", False),
    ('builds@example.org valid-after="" {key}', False),
    (f'builds@example.org valid-after="{PAST}",valid-after="{PAST}" {{key}}', False),
    (f'builds@example.org valid-after="{PAST}0000" {{key}}', True),
    ("builds@example.org {key}\0 after a NUL", True),
]


@needs_ssh_keygen
@pytest.mark.parametrize(("text", "expected"), ALLOWED_SIGNERS_TABLE)
def test_allowed_signers_verdict_is_ssh_keygens(signed, tmp_path, text, expected):
    folder, allowed = signed
    key_type, blob = (tmp_path / "signing.pub").read_text().split()[:2]
    other = keygen(tmp_path, "other").with_suffix(".pub").read_text().split()[:2]
    allowed.write_text(text.format(key=f"{key_type} {blob}", other=" ".join(other), type=key_type, blob=blob,
                                   other_blob=other[1]))
    keygen_says = ssh_keygen_verify(folder, allowed, "builds@example.org")
    ours = verify_bundle(folder, allowed)
    assert (ours.ok, keygen_says.returncode == 0) == (expected, expected), (ours.lines(), keygen_says.stderr)


@needs_ssh_keygen
@pytest.mark.parametrize(("option", "at", "expected"), [
    ('valid-after="20300101"', "20300101", True),  # the very second is allowed, both ends
    ('valid-after="20300101000001"', "20300101", False),
    ('valid-before="20300101"', "20300101", True),
    ('valid-before="20300101"', "20300101000001", False),
    ('valid-after="20300101Z"', "20300101Z", True),
    ('valid-before="20291231235959Z"', "20300101Z", False),
    ('valid-after="20300230"', "20300302", True),  # Feb 30th rolls over to March 2nd, as mktime does
    ('valid-after="20300230"', "20300301235959", False),
])
def test_validity_times_match_ssh_keygen_at_a_given_verify_time(signed, tmp_path, option, at, expected):
    from packer_assets.evidence.allowed_signers import _absolute_time
    from packer_assets.evidence.signing import allowed_signer

    folder, allowed = signed
    allowed.write_text(f"builds@example.org {option} {(tmp_path / 'signing.pub').read_text()}")
    keygen_says = ssh_keygen_verify(folder, allowed, "builds@example.org", f"verify-time={at}")
    public = json.loads((folder / "manifest.json").read_text())["signed_by"]["public_key"]
    ours = allowed_signer(allowed, public, principal="builds@example.org", verify_time=_absolute_time(at, "at"))
    assert (ours is not None, keygen_says.returncode == 0) == (expected, expected), keygen_says.stderr


def ssh_keygen_verify(folder, allowed, principal, *options):
    return subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", principal, "-n", NAMESPACE,
                           *(f"-O{o}" for o in options), "-s", str(folder / "manifest.json.sig")],
                          stdin=(folder / "manifest.json").open("rb"), capture_output=True, timeout=60)
