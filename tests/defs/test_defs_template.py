"""template and template_proof through Dagster: a real Debian packer 1.6.6 build against the lab."""

import json
import os

import dagster as dg
import jsonschema
import pytest
from support.builds import KEY, crashing_packer, rebuild, templates_of

from packer_assets.evidence import sha256_file
from packer_assets.proof import build_proof_schema
from packer_assets.sbom import package_count, validate_sbom

pytestmark = pytest.mark.packer


def test_build_promote_prove_then_up_to_date(lab_project):
    pve, layout = lab_project.pve, lab_project.layout
    pve.requests.clear()
    with dg.instance_for_test() as instance:
        first = rebuild(lab_project, instance)
        assert first.success, [e.message for e in first.all_events if e.is_failure]
        # packer 1.6.6 logged in as the automation user (the password proxmox_env gave it), never as root
        logins = [str(body) for _m, path, body in pve.requests if path.endswith("/access/ticket")]
        assert logins and all("automation" in login and "root" not in login for login in logins), logins
        meta = first.asset_materializations_for_node("template")[0].metadata
        vmid = meta["vmid"].value
        assert meta["promoted"].value is True and meta["up_to_date"].value is False
        assert "packer-assets-latest" in templates_of(pve)[vmid]
        assert [vm for vm in pve.vms if not vm.template] == []  # the smoke clone is gone
        proof_dir = layout.output_root / "docs/proof/platform/packer-builds/builds" / KEY / "latest"
        assert sorted(p.name for p in proof_dir.iterdir()) == ["README.md", "packer.log", "proof.json", "sbom.cdx.json"]
        proof = json.loads((proof_dir / "proof.json").read_text())
        jsonschema.validate(proof, build_proof_schema())
        # the SBOM: valid CycloneDX, the sha256 and package count proof.json names, the count in the README
        bom = json.loads((proof_dir / "sbom.cdx.json").read_text())
        validate_sbom(bom)
        assert proof["sbom"]["sha256"] == sha256_file(proof_dir / "sbom.cdx.json")
        assert proof["sbom"]["packages"] == package_count(bom) > 10 and proof["sbom"]["changes"] is None
        assert any(c["purl"].startswith("pkg:deb/debian/openssh-server@") for c in bom["components"])
        readme = (proof_dir / "README.md").read_text()
        assert f"| Packages (SBOM) | `{package_count(bom)} in sbom.cdx.json` |" in readme
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
        assert instance.get_run_by_id(first.run_id).tags["packer-assets/chain-id"] == meta["chain_id"].value
        # the clone booted the OS the key names, read from the system the ISO installed
        assert proof["checks"][0]["details"]["found_os"] == "debian 12" == proof["checks"][0]["details"]["expected_os"]

        second = rebuild(lab_project, instance)
        assert second.success
        again = second.asset_materializations_for_node("template")[0].metadata
        assert again["up_to_date"].value is True and again["vmid"].value == vmid
        assert list(templates_of(pve)) == [vmid]  # nothing new was built
        proofs = [p for p in proof_dir.parent.iterdir() if p.name != "latest"]
        assert len(proofs) == 1


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
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "smoke_test")
    assert not check.passed and f"failed at step '{fault}'" in check.description
    assert f"| {fault} | FAILED |" in check.metadata["steps"].value
    assert templates_of(lab_project.pve) == {}
    assert not proofs_of(lab_project).exists()


def proofs_of(lab_project, key=KEY):
    return lab_project.root / "docs/proof/platform/packer-builds/builds" / key


def test_packer_crash_leaves_no_vm_no_proof_and_names_the_log(lab_project, tmp_path):
    with dg.instance_for_test() as instance:
        result = rebuild(lab_project, instance, binary=crashing_packer(tmp_path))
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    text = str(failure.event_specific_data.error)
    assert "packer.log" in text and "boom" in text
    assert [vm for vm in lab_project.pve.vms if KEY in vm.config.get("tags", "")] == []
    assert not (lab_project.root / "docs/proof/platform/packer-builds/builds" / KEY).exists()
    logs = lab_project.root / "output/logs/packer/builds" / KEY
    assert (logs / "latest" / "packer.log").exists()


def test_a_rerun_after_a_failed_build_proves_the_promoted_template(lab_project, tmp_path):
    """The failed build's log is the newest (`latest`), yet the rerun finds the template up to date and
    template_proof proves the build of the promoted template."""
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

        rerun = rebuild(lab_project, instance)
        assert rerun.success, [e.message for e in rerun.all_events if e.is_failure]
        assert rerun.asset_materializations_for_node("template")[0].metadata["up_to_date"].value is True
        proved = rerun.asset_materializations_for_node("template_proof")[0].metadata
        assert proved["template_vmid"].value == vmid and proved["chain_id"].value == chain
    assert list(templates_of(lab_project.pve)) == [vmid]


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

    from packer_assets.build import VM_RECORD
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
    meta = again.asset_materializations_for_node("template")[0].metadata
    assert meta["up_to_date"].value is True
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
