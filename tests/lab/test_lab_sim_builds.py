"""Real packer builds through the lab of simulated guests whose state follows from what ran (issue 26, item 1).

For each family's shipped keys (ubuntu-2204 and -2604, rocky-9 and -10, windows-2022 and -2025, debian-12 and -13):
the shipped template (in a copy of
templates/) builds, passes the smoke test and is promoted, its SBOM listing what the answer file added; the
same template with its generalize provisioner deleted then fails the smoke test at fresh_identity, and the
promoted template stays. The state-level checks of every other duty are in test_lab_guest_state.py.
"""

import json
import re

import dagster as dg
import pytest
from support.builds import rebuild, templates_of

pytestmark = [pytest.mark.lab, pytest.mark.packer]
FAMILIES = {"ubuntu-2204": "ubuntu", "rocky-9": "rocky", "windows-2022": "windows", "debian-12": "debian",
            "ubuntu-2604": "ubuntu", "rocky-10": "rocky", "windows-2025": "windows", "debian-13": "debian"}
ADDED = {"ubuntu": "qemu-guest-agent", "rocky": "qemu-guest-agent", "debian": "qemu-guest-agent",
         "windows": "QEMU guest agent"}


def without_generalize(text: str) -> str:
    """The family's template with its last provisioner (the generalize step) deleted."""
    start = text.rindex('\n  provisioner "')
    end = text.index("\n  }\n", start) + len("\n  }\n")
    return text[:start] + "\n" + text[end:]


def user_templates(tmp_path):
    """The templates/ folder of lab_user_project (a copy of the shipped one the test edits as a user does)."""
    return tmp_path / "user-project" / "templates"


@pytest.mark.parametrize("key", list(FAMILIES))
def test_a_template_without_its_generalize_step_fails_fresh_identity_and_the_promoted_one_stays(
    tmp_path, lab_user_project, key
):
    family, lab_project = FAMILIES[key], lab_user_project
    with dg.instance_for_test() as instance:
        first = rebuild(lab_project, instance, key=key)
        assert first.success, [e.message for e in first.all_events if e.is_failure]
        promoted = templates_of(lab_project.pve, key)
        assert len(promoted) == 1
        sbom = lab_project.root / "docs/proof/platform/packer-builds/builds" / key / "latest" / "sbom.cdx.json"
        names = {c["name"] for c in json.loads(sbom.read_text())["components"]}
        assert ADDED[family] in names  # added by the answer file, not in the family's base system

        template = user_templates(tmp_path) / family / f"{family}.pkr.hcl"
        template.write_text(without_generalize(template.read_text()))
        second = rebuild(lab_project, instance, key=key)
        smoke = next(c for c in second.get_asset_check_evaluations() if c.check_name == "smoke_test")
        assert not smoke.passed
        assert "failed at step 'fresh_identity'" in smoke.description, smoke.description
        said = "sysprep /generalize never ran" if family == "windows" else "dates from before this boot"
        assert re.search(re.escape(said), smoke.description), smoke.description
        assert templates_of(lab_project.pve, key) == promoted  # the new one destroyed, the promoted one kept


@pytest.mark.parametrize(("key", "answer_file", "line"), [
    ("ubuntu-2204", "user-data.j2", "    - qemu-guest-agent\n"),
    ("rocky-9", "ks.cfg.j2", "qemu-guest-agent\ncloud-init\n%end"),
    ("debian-12", "preseed.cfg.j2", " qemu-guest-agent cloud-init"),
])
def test_an_answer_file_without_qemu_guest_agent_fails_the_build_and_the_console_says_why(
    tmp_path, lab_user_project, key, answer_file, line
):
    family, lab_project = FAMILIES[key], lab_user_project
    path = user_templates(tmp_path) / family / answer_file
    text = path.read_text()
    assert line in text
    path.write_text(text.replace(line, {"rocky": "cloud-init\n%end", "debian": " cloud-init"}.get(family, "")))
    with dg.instance_for_test() as instance:
        # the install fails and the VM powers off: packer would wait for SSH for 30 minutes; the build's watch of
        # the VM ends it at once, quoting the console
        result = rebuild(lab_project, instance, key=key, ssh_timeout="30m", vm_watch_seconds=0.2)
        assert not result.success
        assert templates_of(lab_project.pve, key) == {}
        (log,) = (lab_project.stack.pve.data_dir / "console").glob("*.log")
        said = log.read_text()
        error = str([e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0].event_specific_data.error)
    assert "Unit file qemu-guest-agent.service does not exist" in said, said
    assert re.search(r"VM \d+ on node pve1 stopped before SSH came up; its console .* ends: .*"
                     r"Unit file qemu-guest-agent.service does not exist", error), error
    assert lab_project.stack.guest_password not in said and "$6$" not in said



def test_rocky_10_on_kvm64_stops_in_the_installer_and_the_build_quotes_the_console(tmp_path, lab_user_project):
    """A user's template that sets PVE's old default CPU type: Rocky 10's installer needs x86-64-v3, so the VM
    powers off before the kickstart is read and the build's watch of the VM ends the build, quoting why."""
    common = user_templates(tmp_path) / "common" / "common.pkr.hcl"
    text = common.read_text()
    assert "  cpu_type = var.cpu_type\n" in text
    common.write_text(text.replace("  cpu_type = var.cpu_type\n", '  cpu_type = "kvm64"\n'))
    with dg.instance_for_test() as instance:
        result = rebuild(lab_user_project, instance, key="rocky-10", ssh_timeout="30m", vm_watch_seconds=0.2)
        assert not result.success
        error = str([e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0].event_specific_data.error)
    assert templates_of(lab_user_project.pve, "rocky-10") == {}
    (log,) = (lab_user_project.stack.pve.data_dir / "console").glob("*.log")
    assert "Fatal glibc error: CPU does not support x86-64-v3 (lab: CPU type kvm64 is x86-64-v1)" in log.read_text()
    assert re.search(r"VM \d+ on node pve1 stopped before SSH came up; its console .* ends: .*"
                     r"CPU does not support x86-64-v3", error), error
