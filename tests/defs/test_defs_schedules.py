import json
import os
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml
from support.builds import rebuild, templates_of

from packer_assets.catalog import load_catalog
from packer_assets.cli import main
from packer_assets.config.settings import Settings
from packer_assets.defs import sensors
from packer_assets.defs.resources import ProjectSettings
from packer_assets.defs.schedules import build_weekly_rebuild

weekly_rebuild = build_weekly_rebuild(Settings.rebuild_cron)
PROOFS = "docs/proof/platform/packer-builds/builds"


def test_weekly_rebuild_requests_one_run_per_key_never_built_with_a_run_key(tmp_path):
    """An output root with no build recorded and no node to ask (no make init): every key runs."""
    when = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        requests = weekly_rebuild(dg.build_schedule_context(
            instance=instance, scheduled_execution_time=when,
            resources={"project": ProjectSettings(output_root=str(tmp_path))}))
    assert [r.partition_key for r in requests] == list(load_catalog().keys())
    # the key leads the run key and has a tag of its own (the UI's preview of a tick shows tags, not partitions)
    assert {r.run_key for r in requests} == {f"{k}:weekly:20261129" for k in load_catalog().keys()}
    assert [r.tags["packer-assets/key"] for r in requests] == list(load_catalog().keys())
    assert weekly_rebuild.cron_schedule == "0 3 * * 0"
    assert weekly_rebuild.execution_timezone == "UTC"


def tick(instance, root, when=datetime(2026, 11, 29, 3, 0, tzinfo=UTC)):
    result = weekly_rebuild(dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                                      resources={"project": ProjectSettings(output_root=str(root))}))
    return [] if isinstance(result, dg.SkipReason) else sorted(r.partition_key for r in result)


@pytest.mark.packer
def test_the_schedule_requests_only_keys_whose_inputs_changed(lab_user_project):
    """Real builds of two keys in the lab (started on a copy of the project, so a template can be edited), then
    ticks: the built keys launch nothing, each change launches exactly its key: a catalog edit, a template
    edit, a new ISO release observed by the checksum sensor, a template that is no longer promoted."""
    lab_project, project = lab_user_project, Path.cwd()  # the lab's fixture works in the copy
    built = ["debian-12", "rocky-9"]
    never = sorted(k for k in lab_project.stack.catalog.keys() if k not in built)
    root = lab_project.root
    with dg.instance_for_test() as instance:
        for key in built:
            assert rebuild(lab_project, instance, key=key).success, key
        assert tick(instance, root) == never  # up to date: no run; never built: a run each

        # a template edit (debian's preseed) launches debian-12 only
        preseed = project / "templates/debian/preseed.cfg.j2"
        preseed.write_text(preseed.read_text() + "# site tweak\n")
        assert tick(instance, root) == sorted(["debian-12", *never])
        preseed.write_text(preseed.read_text().removesuffix("# site tweak\n"))
        assert tick(instance, root) == never

        # a catalog edit (rocky-9's memory) launches rocky-9 only
        catalog = project / "templates/catalog.yaml"
        original = catalog.read_text()
        doc = yaml.safe_load(original)
        next(e for e in doc["templates"] if e["key"] == "rocky-9").setdefault("hardware", {})["memory"] = 3072
        catalog.write_text(yaml.safe_dump(doc, sort_keys=False))
        assert tick(instance, root) == sorted(["rocky-9", *never])
        catalog.write_text(original)

        # a new release of debian-12's ISO, once the checksum sensor observed it
        lab_project.mirror.publish("debian-12")
        assert tick(instance, root) == never  # not observed yet: nothing known has changed
        sensor = sensors.build_iso_checksum_sensor(3600)
        sensor(dg.build_sensor_context(instance=instance, resources={"project": ProjectSettings(output_root=str(root))}))
        assert tick(instance, root) == sorted(["debian-12", *never])
        assert rebuild(lab_project, instance, key="debian-12").success  # builds the release
        assert tick(instance, root) == never

        # a template that is no longer the promoted one (revoked) is rebuilt
        from packer_assets.evidence.channels import node_api, revoke
        from packer_assets.pve.templates import promoted_template

        api = node_api(lab_project.layout)
        revoke(lab_project.layout, api, lab_project.stack.catalog, str(promoted_template(api, "rocky-9").vmid),
               reason="openssl CVE")
        assert tick(instance, root) == sorted(["rocky-9", *never])


def planned(capsys) -> dict[str, str]:
    """`packer-assets plan --json`: key -> its reason when it runs (the pre-check `make build-all` asks)."""
    capsys.readouterr()  # the builds' echoed logs
    with pytest.raises(SystemExit) as done:
        main(["plan", "--json"])
    assert done.value.code == 0
    return {k["key"]: k["reason"] for k in json.loads(capsys.readouterr().out) if k["run"]}


@pytest.mark.packer
def test_an_edit_of_the_users_catalog_after_a_demo_plans_and_rebuilds_exactly_that_key(lab_user_project, capsys):
    """The lab reads the catalog it was started with, never a copy: after builds, an edit of that file (one
    key's memory) is what `packer-assets plan` and the schedule name, and building each built key again
    rebuilds exactly that key. windows-2022 pins its ISO checksum: the lab's mirror file stands in for it
    (PACKER_ASSETS_ISO_MIRROR_CHECKSUMS), and its proof names that file; debian-12's signed checksum file was
    verified with the lab mirror's own key, and its proof says so."""
    lab_project, catalog = lab_user_project, Path.cwd() / "templates/catalog.yaml"
    assert os.environ["PACKER_ASSETS_CATALOG"] == str(catalog)
    assert not [p for p in lab_project.stack.state.rglob("*.yaml")]  # no lab copy of the catalog
    built, edited = ["debian-12", "windows-2022"], "debian-12"
    never = {k for k in lab_project.stack.catalog.keys() if k not in built}
    with dg.instance_for_test() as instance:
        for key in built:
            assert rebuild(lab_project, instance, key=key).success, key
        proof = json.loads((lab_project.root / PROOFS / "windows-2022/latest/proof.json").read_text())
        assert proof["iso"]["checksum_source"] == lab_project.mirror.checksum_url("windows-2022")
        assert proof["iso"]["checksum_source"].endswith("/SHA256SUMS")
        assert proof["iso"]["signed_by"] is None  # a pinned checksum: no keyring
        # debian-12 names Debian's key and SHA256SUMS.sign: the lab mirror re-signed its file, so its keyring verified it
        signed = json.loads((lab_project.root / PROOFS / "debian-12/latest/proof.json").read_text())["iso"]["signed_by"]
        assert signed == f"mirror: {lab_project.mirror.signing_key.keyring.resolve()} (PACKER_ASSETS_ISO_MIRROR_KEYRING)"
        assert set(planned(capsys)) == never

        doc = yaml.safe_load(catalog.read_text())
        next(e for e in doc["templates"] if e["key"] == edited).setdefault("hardware", {})["memory"] = 3072
        catalog.write_text(yaml.safe_dump(doc, sort_keys=False))
        plan = planned(capsys)
        assert set(plan) == {edited, *never} and plan[edited] == "inputs changed (catalog, templates, ISO or secrets)"
        assert tick(instance, lab_project.root) == sorted([edited, *never])

        before = {key: templates_of(lab_project.pve, key) for key in built}
        for key in built:
            assert rebuild(lab_project, instance, key=key).success, key
        new = {key: set(templates_of(lab_project.pve, key)) - set(before[key]) for key in built}
        assert new["windows-2022"] == set() and len(new[edited]) == 1
        (vmid,) = new[edited]
        assert lab_project.pve.find("pve1", vmid).config["memory"] in (3072, "3072")
        assert set(planned(capsys)) == never
