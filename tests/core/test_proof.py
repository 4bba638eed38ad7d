"""The build proof: model, generated JSON Schema (and the committed copy), README, bundle on disk."""

import json
from datetime import UTC, datetime

import jsonschema
import pytest
from pydantic import ValidationError
from support import REPO
from support.proofs import sample

from packer_assets.evidence.layout import Layout, latest, sha256_file
from packer_assets.evidence.proof import (
    INIT_SCHEMA_FILE,
    SCHEMA_FILE,
    BuildProof,
    InitProof,
    build_proof_schema,
    init_proof_schema,
    render_build_readme,
    schema_text,
    write_build_proof,
)


def validator():
    schema = build_proof_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_the_proof_json_validates_against_the_generated_schema():
    check = validator()
    document = json.loads(json.dumps(sample().model_dump(mode="json")))
    check.validate(document)
    # and the schema has teeth
    for broken in ({**document, "log_sha256": "not-a-hash"}, {**document, "surprise": 1},
                   {**document, "chain_id": "CHAIN-x"}, {k: v for k, v in document.items() if k != "template"}):
        assert list(check.iter_errors(broken))


def test_the_schema_documents_every_field():
    schema = build_proof_schema()
    assert schema["$schema"].endswith("2020-12/schema") and schema["title"] == "packer-assets build proof"
    for name, prop in schema["properties"].items():
        assert prop.get("description") or "$ref" in prop or "allOf" in prop, name
    for name, definition in schema["$defs"].items():
        assert definition.get("description"), name


@pytest.mark.parametrize("file", [SCHEMA_FILE, INIT_SCHEMA_FILE], ids=["build", "init"])
def test_the_committed_schema_is_the_generated_one(file):
    committed = REPO / file
    assert committed.exists(), f"{file} is missing: run `python -m packer_assets.evidence.proof`"
    assert committed.read_text(encoding="utf-8") == schema_text(file), \
        f"{file} is stale: run `python -m packer_assets.evidence.proof`"


def test_the_init_schema_documents_every_field_and_refuses_a_build_chain():
    schema = init_proof_schema()
    assert schema["title"] == "packer-assets init proof"
    for name, prop in schema["properties"].items():
        assert prop.get("description") or "$ref" in prop or "allOf" in prop, name
    with pytest.raises(ValidationError, match="not an init chain ID"):
        InitProof(bootstrap="api", chain_id="CHAIN-20261125T100000Z-ubuntu-2204", tool_version="0.1.0",
                  started_at=datetime(2026, 11, 25, tzinfo=UTC), finished_at=datetime(2026, 11, 25, tzinfo=UTC),
                  api_url="https://pve:8006/api2/json", tls="system", pve_version="9.0.3", token_id="a@pve!p",
                  token_action="created", build_login="token", role="R", privileges=[], changes=[],
                  discovery={"node": "n", "node_ip": "1.2.3.4", "vm_storage": "v", "iso_storage": "i",
                             "bridge": "vmbr0", "http_bind_address": "1.2.3.5", "http_port": 8802},
                  env_file="infra/env/.env.proxmox", log_sha256="0" * 64)


def test_a_proof_needs_passed_checks_and_a_matching_key():
    with pytest.raises(ValidationError, match="checks passed; failed: smoke_test"):
        sample(checks=[{"name": "smoke_test", "passed": False, "description": "agent never answered"}])
    with pytest.raises(ValidationError, match="at least 1 item"):
        sample(checks=[])
    with pytest.raises(ValidationError, match="is not of key debian-12"):
        sample(key="debian-12")
    with pytest.raises(ValidationError, match="finished_at is before started_at"):
        sample(timings={"started_at": datetime(2026, 11, 25, 11, tzinfo=UTC),
                        "finished_at": datetime(2026, 11, 25, 10, tzinfo=UTC)})


def test_readme_is_a_readable_summary():
    text = render_build_readme(sample())
    assert text.startswith("# Template build CHAIN-20261125T100000Z-ubuntu-2204\n")
    for needle in ("| Template | `9101 ubuntu-2204-20261125100512 on pve1` |", "| Dagster run | `run-123` |",
                   "| ISO checksum | `sha256:" + "ab" * 32 + "` |", "| Duration | `450.0 s` |",
                   "| ISO checksum from | `http://127.0.0.1:8000/releases.ubuntu.com/22.04.5/SHA256SUMS` |",
                   "| packer_build | 400.0 |", "| smoke_test | passed | clone 9102 booted; agent answered |",
                   "| user-data | `" + "1" * 64 + "` |", "| Packer | `1.6.6` |", "| Pruned | `9099` |"):
        assert needle in text, needle


def test_a_degraded_build_s_warnings_are_in_proof_json_and_a_readme_section():
    gaps = ["degraded build: windows-2022: hardware.tpm: needs packer-plugin-proxmox >= 1.1.0",
            "windows-2022: tags: packer 1.6.6 cannot set tags; set them through the API"]
    proof = sample(warnings=gaps)
    assert proof.model_dump(mode="json")["warnings"] == gaps
    text = render_build_readme(proof)
    assert "| Warnings | `2 (see Warnings)` |" in text
    assert "\n## Warnings\n\n- " + "\n- ".join(gaps) + "\n" in text
    plain = render_build_readme(sample())  # none: the section says so
    assert "| Warnings | `none` |" in plain and "## Warnings\n\nNone: the build had everything" in plain
    assert sample().warnings == []  # proofs written before the field: none


def test_the_end_of_life_is_a_line_of_the_readme_and_past_it_says_since_when():
    past = sample(eol={"date": "2026-06-10", "past": True, "days_past": 180})
    assert past.model_dump(mode="json")["eol"] == {"date": "2026-06-10", "past": True, "days_past": 180}
    validator().validate(json.loads(json.dumps(past.model_dump(mode="json"))))
    assert "| End of life | `past end of life since 2026-06-10 (180 days at build time)` |" in render_build_readme(past)
    ahead = render_build_readme(sample(eol={"date": "2027-04-30", "past": False, "days_past": 0}))
    assert "| End of life | `2027-04-30 (not past at build time)` |" in ahead
    none = render_build_readme(sample(eol={"date": None, "past": False, "days_past": 0}))
    assert "| End of life | `none in the catalog` |" in none
    assert "| End of life | `-` |" in render_build_readme(sample())  # a proof from before end-of-life dates
    assert sample().eol is None
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        sample(eol={"date": "2026-06-10", "past": True, "days_past": -1})


def test_write_build_proof_writes_the_bundle_and_latest(tmp_path):
    layout = Layout(tmp_path)
    log = tmp_path / "output/logs/packer/builds/ubuntu-2204/20261125T100000Z/packer.log"
    log.parent.mkdir(parents=True)
    log.write_text("[CHAIN-20261125T100000Z-ubuntu-2204] [packer] Build 'proxmox' finished.\n")
    proof = sample(log_sha256=sha256_file(log))
    folder = write_build_proof(layout, proof, log)
    assert folder == tmp_path / "docs/proof/platform/packer-builds/builds/ubuntu-2204/20261125T100000Z"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "manifest.json", "packer.log", "proof.json"]
    assert latest(folder.parent) == folder.resolve()
    written = json.loads((folder / "proof.json").read_text())
    validator().validate(written)
    assert BuildProof.model_validate(written) == proof  # it reads back
    assert (folder / "packer.log").read_bytes() == log.read_bytes()
    assert (folder / "README.md").read_text() == render_build_readme(proof)


def test_write_build_proof_refuses_a_log_that_is_not_the_one_recorded(tmp_path):
    log = tmp_path / "packer.log"
    log.write_text("something else\n")
    with pytest.raises(ValueError, match="differs from the proof's log_sha256"):
        write_build_proof(Layout(tmp_path), sample(), log)
    assert not (tmp_path / "docs").exists()


def test_a_proof_with_no_guest_note_says_the_guest_is_unknown_and_the_count_says_what_it_was_read_from():
    unknown = render_build_readme(sample(guest=None))
    assert "| Guest | `unknown: nothing stated what this guest was" in unknown and "node's VM" not in unknown
    noted = sample(guest="lab: simulated guest (invented)",
                   sbom={"file": "sbom.cdx.json", "sha256": "cd" * 32, "packages": 12})
    assert "| Packages (SBOM) | `12 in sbom.cdx.json, read from: lab: simulated guest (invented)` |" in (
        render_build_readme(noted))
