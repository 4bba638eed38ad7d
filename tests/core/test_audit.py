"""`packer-assets chain`: what the output root holds for a chain ID, and what the finders add or could not."""

import json

import pytest
from support.proofs import written_bundle

from packer_assets.evidence.audit import chain_report, chains_of_key
from packer_assets.cli import main
from packer_assets.evidence.layout import Layout

PROVED = "CHAIN-20261125T100000Z-ubuntu-2204"
FAILED = "CHAIN-20261126T080000Z-ubuntu-2204"


@pytest.fixture
def root(tmp_path):
    written_bundle(tmp_path)
    record = Layout(tmp_path).build_log_dir("ubuntu-2204", "20261125T100000Z") / "build.json"
    record.write_text(json.dumps({"rendered_files": {"user-data": "1" * 64}}))
    failed = Layout(tmp_path).build_log_dir("ubuntu-2204", "20261126T080000Z") / "packer.log"
    failed.parent.mkdir(parents=True)
    failed.write_text(f"[{FAILED}] [packer] Build errored\n")
    return tmp_path


def test_a_proved_chain_shows_its_log_record_rendered_files_proof_runs_and_templates(root):
    report = chain_report(Layout(root), PROVED, runs=lambda c: [{"run_id": "r1", "status": "SUCCESS", "job": "j"}],
                          templates=lambda c: [{"vmid": 9101, "name": "n", "node": "pve1", "tags": ["t"]}])
    assert [p.rsplit("/", 1)[1] for p in report.logs] == ["build.json", "packer.log"]
    assert report.record and report.rendered_files == {"user-data": "1" * 64}
    assert report.proof.endswith("builds/ubuntu-2204/20261125T100000Z")
    assert report.runs[0]["run_id"] == "r1" and report.templates[0]["vmid"] == 9101 and report.found
    text = "\n".join(report.lines())
    assert "proof     " in text and "template  9101 n on pve1" in text


def test_a_failed_chain_has_its_log_and_says_what_it_lacks(root):
    def unreachable(chain):
        raise ConnectionError("no route to 192.0.2.1\nsecond line")

    report = chain_report(Layout(root), FAILED, runs=lambda c: [{"run_id": "r2", "status": "FAILURE", "job": "j"}],
                          templates=unreachable)
    assert list(report.logs)[0].endswith("20261126T080000Z/packer.log")
    assert report.record is None and report.proof is None and report.found
    assert report.unknown == ["Proxmox templates: ConnectionError: no route to 192.0.2.1"]
    assert "none (written only for a build that passed)" in "\n".join(report.lines())


def test_the_chains_of_a_key_newest_first_with_their_outcome(root):
    assert chains_of_key(Layout(root), "ubuntu-2204") == [(FAILED, "failed"), (PROVED, "proved")]
    assert chains_of_key(Layout(root), "debian-12") == []


def test_the_cli_prints_json_and_exits_1_for_an_unknown_chain(root, capsys, monkeypatch):
    monkeypatch.setenv("PACKER_ASSETS_ROOT", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(root / "no-dagster-home"))
    with pytest.raises(SystemExit) as done:
        main(["chain", PROVED, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert done.value.code == 0 and data["chain_id"] == PROVED and data["proof"]
    assert any(u.startswith("Proxmox templates: ConfigError") for u in data["unknown"])  # no make init here
    with pytest.raises(SystemExit) as done:
        main(["chain", "CHAIN-20261127T000000Z-ubuntu-2204"])
    assert done.value.code == 1
    with pytest.raises(SystemExit) as done:
        main(["chain", "--key", "ubuntu-2204"])
    assert done.value.code == 0 and capsys.readouterr().out.splitlines()[-2:] == [f"{FAILED}  failed", f"{PROVED}  proved"]
