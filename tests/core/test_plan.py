"""The pre-check of which keys need a run: from files and settings only, one reason per key."""

import copy
import json
import os
import shutil

import pytest
import yaml
from support import REPO

from packer_assets.catalog import load_catalog
from packer_assets.evidence.layout import Layout
from packer_assets.build.plan import (
    SourceDigests,
    iso_checksums,
    plan_fingerprint,
    plan_key,
    plan_runs,
    read_observed,
    record_observed,
    record_plan,
    state_file,
)

ENV = {"PACKER_INSTALL_PASSWORD": "install-pw-1", "PACKER_SSH_AUTHORIZED_KEYS": "ssh-ed25519 AAAA test@x"}
SHA = "sha256:" + "ab" * 32


@pytest.fixture
def project(tmp_path):
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    return tmp_path


def catalog_of(project):
    return load_catalog(project / "templates/catalog.yaml", env={}, project_dir=project)


def record_all(layout, catalog, env=ENV, staged=SHA):
    """What builds of every key would have recorded, their ISOs staged with `staged`."""
    sources, key = SourceDigests(catalog.project_dir), plan_key(layout)
    for vmid, entry in enumerate(catalog, start=9000):
        isos = iso_checksums(entry, {}, {name: staged for name in ["iso", *(x.name for x in entry.extra_isos)]})
        record_plan(layout, entry.key, plan_fingerprint(entry, env, sources, key, isos), isos, vmid, None)
    return {entry.key: vmid for vmid, entry in enumerate(catalog, start=9000)}


def runs(layout, catalog, env=ENV, promoted=None):
    return plan_runs(layout, catalog, env, catalog.project_dir, promoted).to_run


def test_unchanged_keys_are_skipped_and_each_change_runs_its_key_only(project, tmp_path):
    layout, catalog = Layout(tmp_path / "out"), catalog_of(project)
    assert runs(layout, catalog) == list(catalog.keys())  # nothing recorded: everything runs
    promoted = record_all(layout, catalog)
    plan = plan_runs(layout, catalog, ENV, project, promoted)
    assert plan.to_run == [] and all(k.reason.startswith("up to date: template 9") for k in plan.keys)
    assert plan.summary() == "0 of 9 key(s) to run, 9 unchanged"

    preseed = project / "templates/debian/preseed.cfg.j2"  # a template edit
    preseed.write_text(preseed.read_text() + "\n# local change\n")
    assert runs(layout, catalog, promoted=promoted) == ["debian-12", "debian-13"]  # the family's keys
    common = project / "templates/common/common.pkr.hcl"  # shared by every key
    common.write_text(common.read_text() + "\n# local change\n")
    assert runs(layout, catalog, promoted=promoted) == list(catalog.keys())


def test_catalog_secrets_iso_and_the_node_each_count(project, tmp_path):
    layout, catalog = Layout(tmp_path / "out"), catalog_of(project)
    promoted = record_all(layout, catalog)
    doc = yaml.safe_load((project / "templates/catalog.yaml").read_text())
    edited = copy.deepcopy(doc)
    next(e for e in edited["templates"] if e["key"] == "rocky-9").setdefault("hardware", {})["cores"] = 4
    (project / "templates/catalog.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    assert runs(layout, catalog_of(project), promoted=promoted) == ["rocky-9"]
    retention = copy.deepcopy(doc)  # not a build input: nothing runs
    next(e for e in retention["templates"] if e["key"] == "rocky-9")["retention"] = 5
    (project / "templates/catalog.yaml").write_text(yaml.safe_dump(retention, sort_keys=False))
    assert runs(layout, catalog_of(project), promoted=promoted) == []
    # a new password or authorized key changes every key that uses them
    assert runs(layout, catalog, {**ENV, "PACKER_INSTALL_PASSWORD": "install-pw-2"}, promoted) == list(catalog.keys())
    assert runs(layout, catalog, {**ENV, "PACKER_SSH_AUTHORIZED_KEYS": "ssh-ed25519 BBBB"}, promoted) != []
    # a new checksum observed upstream runs its key; the same one as built does not
    record_observed(layout, {"ubuntu-2204": SHA})
    assert runs(layout, catalog, promoted=promoted) == []
    record_observed(layout, {"ubuntu-2204": "sha256:" + "cd" * 32})
    assert read_observed(layout)["ubuntu-2204"].endswith("cd" * 32)
    assert runs(layout, catalog, promoted=promoted) == ["ubuntu-2204"]
    # the node: a template no longer promoted runs; an unreachable node (None) trusts the state
    record_observed(layout, {"ubuntu-2204": SHA})
    del promoted["debian-12"]
    plan = plan_runs(layout, catalog, ENV, project, promoted)
    assert plan.to_run == ["debian-12"] and "no longer the promoted one (none is)" in plan.keys[2].reason
    assert runs(layout, catalog, promoted=None) == []


def test_a_key_past_its_end_of_life_is_noted_and_a_new_date_runs_nothing(project, tmp_path, monkeypatch):
    """The plan notes a key past the catalog's eol (the eol clock, fixed here); the note decides nothing, and
    moving the date is no build input."""
    from datetime import date

    layout, catalog = Layout(tmp_path / "out"), catalog_of(project)
    promoted = record_all(layout, catalog)
    monkeypatch.setattr("packer_assets.catalog.eol.today", lambda: date(2028, 7, 1))
    plan = plan_runs(layout, catalog, ENV, project, promoted)
    notes = {k.key: k.note for k in plan.keys}
    assert plan.to_run == [] and notes["debian-12"] == "past end of life since 2028-06-30 (1 day on 2028-07-01)"
    assert notes["ubuntu-2204"].startswith("past end of life since 2027-04-30") and notes["rocky-9"] == ""
    doc = yaml.safe_load((project / "templates/catalog.yaml").read_text())
    next(e for e in doc["templates"] if e["key"] == "debian-12")["eol"] = date(2030, 6, 30)
    (project / "templates/catalog.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    moved = plan_runs(layout, catalog_of(project), ENV, project, promoted)
    assert moved.to_run == [] and next(k for k in moved.keys if k.key == "debian-12").note == ""


def test_the_state_holds_no_password_digest_and_the_hmac_key_is_private(project, tmp_path):
    import hashlib

    layout, catalog = Layout(tmp_path / "out"), catalog_of(project)
    record_all(layout, catalog)
    key_file = layout.output_root / "output/state/.plan-key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and len(key_file.read_bytes()) == 32
    text = state_file(layout, "debian-12").read_text()
    assert ENV["PACKER_INSTALL_PASSWORD"] not in text
    assert hashlib.sha256(ENV["PACKER_INSTALL_PASSWORD"].encode()).hexdigest() not in text
    assert set(json.loads(text)) == {"plan_fingerprint", "isos", "vmid", "chain_id"}
    # another output root has another key: the same inputs give another fingerprint
    other = Layout(tmp_path / "other")
    record_all(other, catalog)
    assert json.loads(state_file(other, "debian-12").read_text())["plan_fingerprint"] != json.loads(text)["plan_fingerprint"]
    assert os.path.exists(key_file)
