"""The template registry's model, its generated JSON Schema (and the committed copy), the proof path update,
the Markdown table, and the channel name rules. What the node says is tested against the lab
(tests/pve/test_pve_channels.py) and through real builds (tests/defs/test_defs_registry.py)."""

import json
from datetime import UTC, date, datetime

import jsonschema
import pytest
from support import REPO

from packer_assets.evidence.channels import ChannelError, channel_name, channel_rows
from packer_assets.evidence.layout import Layout
from packer_assets.evidence.proof import schema_text
from packer_assets.evidence.registry import (
    REGISTRY_SCHEMA_FILE,
    Registry,
    read_registry,
    record_proof,
    registry_json,
    registry_schema,
    registry_table,
)

CHAIN = "CHAIN-20261125T100000Z-debian-12"


def version(vmid, chain=CHAIN, **changes):
    data = {"vmid": vmid, "name": f"debian-12-{chain[6:14]}100512", "node": "pve1", "chain_id": chain,
            "built_at": datetime(2026, 11, 25, 10, 0, tzinfo=UTC),
            "iso": {"url": "https://cdimage.debian.org/debian-12.11.0-amd64-netinst.iso",
                    "checksum": "sha256:" + "ab" * 32},
            "packer_version": "1.6.6", "degraded": False, "smoke": {"passed": True, "found_os": "debian 12",
                                                                    "expected_os": "debian 12", "packages": 312},
            "promoted": False}
    data.update(changes)
    return data


def sample(**templates):
    current = version(9301, promoted=True, channels=["production"])
    old = version(9300, chain="CHAIN-20261118T100000Z-debian-12", revoked=True,
                  revoked_at=datetime(2026, 11, 26, tzinfo=UTC), revoked_reason="CVE-2026-0001")
    data = {"updated_at": datetime(2026, 11, 26, 9, tzinfo=UTC), "templates": {
        "debian-12": {"family": "debian", "current": current, "channels": {"latest": 9301, "production": 9301},
                      "retained": [old]},
        "rocky-9": {"family": "rocky", "current": None}, **templates}}
    return Registry.model_validate(data)


def validator():
    schema = registry_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_registry_json_validates_against_the_generated_schema_which_has_teeth():
    check = validator()
    document = json.loads(registry_json(sample()))
    check.validate(document)
    debian = document["templates"]["debian-12"]
    broken = [
        {**document, "surprise": 1},
        {**document, "templates": {"debian-12": {**debian, "channels": {"Bad Name": 9301}}}},
        {**document, "templates": {"debian-12": {**debian, "current": {**debian["current"], "chain_id": "CHAIN-x"}}}},
        {**document, "templates": {"debian-12": {**debian, "current": {**debian["current"], "vmid": 5}}}},
        {k: v for k, v in document.items() if k != "templates"},
    ]
    for bad in broken:
        assert list(check.iter_errors(bad)), bad


def test_the_schema_documents_every_field():
    schema = registry_schema()
    assert schema["title"] == "packer-assets template registry" and schema["$schema"].endswith("2020-12/schema")
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
    for name, definition in schema["$defs"].items():
        assert definition.get("description"), name
        for field, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{field}"


def test_the_committed_schema_is_the_generated_one():
    committed = REPO / REGISTRY_SCHEMA_FILE
    assert committed.exists(), f"{REGISTRY_SCHEMA_FILE} is missing: run `python -m packer_assets.evidence.proof`"
    assert committed.read_text(encoding="utf-8") == schema_text(REGISTRY_SCHEMA_FILE), \
        f"{REGISTRY_SCHEMA_FILE} is stale: run `python -m packer_assets.evidence.proof`"


def test_a_written_proof_is_recorded_in_the_registry(tmp_path):
    layout = Layout(tmp_path)
    assert record_proof(layout, "debian-12", CHAIN) is False  # no registry yet: nothing to update
    layout.registry_file.parent.mkdir(parents=True)
    layout.registry_file.write_text(registry_json(sample()))
    assert record_proof(layout, "debian-12", CHAIN) is False  # no proof folder yet
    layout.build_proof_dir("debian-12", "20261125T100000Z").mkdir(parents=True)
    assert record_proof(layout, "debian-12", CHAIN) is True
    after = read_registry(layout)
    assert after.templates["debian-12"].current.proof == "docs/proof/platform/packer-builds/builds/debian-12/20261125T100000Z"
    assert after.templates["debian-12"].retained[0].proof is None  # another build's
    validator().validate(json.loads(layout.registry_file.read_text()))
    before = layout.registry_file.read_bytes()
    assert record_proof(layout, "debian-12", CHAIN) is True
    assert layout.registry_file.read_bytes() == before  # nothing new: the file is kept, updated_at too


def test_a_broken_registry_file_is_read_as_none(tmp_path):
    layout = Layout(tmp_path)
    layout.registry_file.parent.mkdir(parents=True)
    layout.registry_file.write_text('{"kind": "registry"')
    assert read_registry(layout) is None


def test_the_table_and_the_channel_rows():
    registry = sample()
    table = registry_table(registry).splitlines()
    assert table[0] == "| key | VMID | name | built | ISO | degraded | channels | end of life | proof |"
    assert table[2].startswith("| debian-12 | 9301 | debian-12-20261125100512 | 2026-11-25 10:00 | "
                               "debian-12.11.0-amd64-netinst.iso | no | latest=9301, production=9301 | - |")
    assert table[3] == "| rocky-9 | - | none | - | - | - | - | - | - |"
    assert channel_rows(registry) == [("debian-12", "latest", 9301, "debian-12-20261125100512"),
                                      ("debian-12", "production", 9301, "debian-12-20261125100512")]
    assert channel_rows(registry, "rocky-9") == []


def test_the_table_shows_each_key_s_end_of_life_and_marks_one_past_it():
    registry = sample(**{"ubuntu-2204": {"family": "ubuntu", "current": None, "eol": date(2027, 4, 30),
                                         "past_eol": True},
                         "rocky-10": {"family": "rocky", "current": None, "eol": "2035-05-31"}})
    rows = {line.split(" | ")[0][2:]: line for line in registry_table(registry).splitlines()[2:]}
    assert rows["ubuntu-2204"] == "| ubuntu-2204 | - | none | - | - | - | - | 2027-04-30 (PAST) | - |"
    assert rows["rocky-10"] == "| rocky-10 | - | none | - | - | - | - | 2035-05-31 | - |"
    document = json.loads(registry_json(registry))
    validator().validate(document)
    assert document["templates"]["ubuntu-2204"]["eol"] == "2027-04-30" and document["templates"]["debian-12"]["eol"] is None
    assert list(validator().iter_errors({**document, "templates": {"x": {**document["templates"]["rocky-10"],
                                                                         "eol": "2035-02-30"}}}))


@pytest.mark.parametrize("name, said", [
    ("latest", "channel latest is the promoted template"),
    ("Prod", "bad channel name 'Prod'"),
    ("prod;x", "bad channel name 'prod;x'"),
    ("9prod", "bad channel name '9prod'"),
    ("p" * 33, "bad channel name"),
    ("prod\n", "bad channel name"),
])
def test_channel_names_that_cannot_be_a_tag_are_refused(name, said):
    with pytest.raises(ChannelError, match=said.replace("(", r"\(")):
        channel_name(name)
    assert channel_name("production") == "production" and channel_name("canary_2") == "canary_2"


def test_a_registry_that_cannot_be_written_after_a_build_is_a_warning(tmp_path):
    """build_template's last step: a node that does not answer leaves the build standing, with a warning."""
    from packer_assets.build.pipeline import update_registry
    from packer_assets.evidence.chain import new_chain_id
    from packer_assets.pve.client import PveAccessError

    class Unreachable:
        def __getattr__(self, name):
            raise PveAccessError("https://pve.example:8006: API unreachable")

    chain, said = new_chain_id("debian-12"), []
    warning = update_registry(Layout(tmp_path), Unreachable(), REPO, chain, echo=said.append)
    assert warning == (f"registry {Layout(tmp_path).registry_file} not rewritten: PveAccessError: "
                       "https://pve.example:8006: API unreachable")
    assert said == [f"[{chain}] [warning] {warning}"] and not Layout(tmp_path).registry_file.exists()


def test_a_listed_template_names_the_guest_its_build_record_noted(tmp_path):
    from packer_assets.evidence.layout import BUILD_RECORD_NAME
    from packer_assets.evidence.registry import template_version
    from packer_assets.pve.templates import Guest, TemplateDescription

    layout = Layout(tmp_path)
    described = TemplateDescription(chain_id=CHAIN, key="debian-12", iso_url="https://x/debian.iso",
                                    iso_checksum="sha256:" + "ab" * 32, input_fingerprint="4" * 64,
                                    built_at=datetime(2026, 11, 25, 10, tzinfo=UTC), tool_version="0.1.0")
    guest = Guest(vmid=9301, node="pve1", kind="qemu", name="debian-12-20261125100512",
                  tags=("packer-assets-latest",), template=True, status="stopped")
    record = layout.build_log_dir("debian-12", "20261125T100000Z") / BUILD_RECORD_NAME
    record.parent.mkdir(parents=True)
    note = "lab: real guest (image recipe sha256 " + "e" * 64 + ")"
    record.write_text(json.dumps({"template": {"vmid": 9301}, "guest": note}))
    assert template_version(layout, "debian-12", guest, described, None).guest == note
    record.write_text(json.dumps({"template": {"vmid": 9301}}))  # nothing was noted: null, never a guess
    assert template_version(layout, "debian-12", guest, described, None).guest is None
