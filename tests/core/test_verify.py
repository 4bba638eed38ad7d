"""`packer-assets proof verify`: a bundle passes as written, and each kind of tampering is named."""

import json
import subprocess

import pytest
from support.proofs import written_bundle

from packer_assets.cli import main
from packer_assets.signing import Signer
from packer_assets.verify import verify_bundle

pytestmark = pytest.mark.sshd  # ssh-keygen makes the keys


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
    from packer_assets.evidence import write_manifest
    write_manifest(folder)  # the forger rewrites the manifest too, but cannot sign it
    report = verify_bundle(folder, allowed)
    assert any("proof.json: does not match its schema at template/vmid" in p for p in report.problems)
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
