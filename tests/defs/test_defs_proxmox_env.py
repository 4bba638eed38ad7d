"""proxmox_env through Dagster: materialize against the lab, checks pass and fail, no secret in events."""

import dagster as dg
import pytest

from packer_assets.defs import assets, checks
from packer_assets.defs.resources import ProjectSettings, ProxmoxBootstrap
from packer_assets.config.envfile import read_env_file


@pytest.fixture
def resources(lab_pve, lab_pki, tmp_path):
    return {
        "project": ProjectSettings(output_root=str(tmp_path / "project")),
        "pve_admin": ProxmoxBootstrap(api_url=lab_pve.url + "/api2/json", ca_file=str(lab_pki.ca_file),
                                      admin_password=lab_pve.root_password),
    }


def materialize(resources, instance, rotate=False):
    return dg.materialize(
        [assets.proxmox_env, checks.token_authenticates, checks.token_privileges],
        resources=resources, instance=instance,
        run_config={"ops": {"proxmox_env": {"config": {"rotate": rotate}}}},
        raise_on_error=False,
    )


def check_results(result):
    return {e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def test_materialize_passes_both_checks_and_reports_metadata(resources, tmp_path):
    with dg.instance_for_test() as instance:
        result = materialize(resources, instance)
        assert result.success
        mat = result.asset_materializations_for_node("proxmox_env")[0]
        assert mat.metadata["token_action"].value == "created"
        assert mat.metadata["node"].value == "pve1"
        assert mat.metadata["chain_id"].value.startswith("CHAIN-")
        assert instance.get_run_by_id(result.run_id).tags[assets.CHAIN_TAG] == mat.metadata["chain_id"].value
        evaluations = check_results(result)
        assert {name: e.passed for name, e in evaluations.items()} == {"token_authenticates": True,
                                                                      "token_privileges": True}


def test_permission_check_names_the_missing_privilege_and_path(resources, pve_root):
    with dg.instance_for_test() as instance:
        assert materialize(resources, instance).success
        role = pve_root.access.roles("PackerBuilder").get()
        privs = role.get("privs", role)
        kept = [p for p, on in privs.items() if on and p != "Datastore.AllocateTemplate"] if isinstance(
            privs, dict) else [p for p in str(privs).split(",") if p != "Datastore.AllocateTemplate"]
        pve_root.access.roles("PackerBuilder").put(privs=",".join(kept))
        # the check alone, on the env file the materialization wrote
        result = dg.materialize([assets.proxmox_env, checks.token_privileges], resources=resources,
                                instance=instance, selection=dg.AssetSelection.checks(checks.token_privileges),
                                raise_on_error=False)
        evaluation = check_results(result)["token_privileges"]
        assert not evaluation.passed
        assert "Datastore.AllocateTemplate on /storage/local" in evaluation.description


def test_no_secret_in_the_event_log_or_output(resources, lab_pve, capfd, tmp_path):
    with dg.instance_for_test() as instance:
        assert materialize(resources, instance).success
        assert materialize(resources, instance, rotate=True).success
        secrets = {read_env_file(tmp_path / "project/control/secrets.env")["PROXMOX_TOKEN_SECRET"],
                   lab_pve.root_password}
        secrets |= set(lab_pve.apitokens.values())
        text = ""
        for run in instance.get_runs():
            for entry in instance.all_logs(run.run_id):
                text += repr(entry)
        out = capfd.readouterr()
        text += out.out + out.err
        for secret in secrets:
            assert secret not in text
        assert "token_action" in text  # the scan saw the metadata


def test_ssh_path_through_dagster(lab_sshd, lab_pve, tmp_path):
    resources = {
        "project": ProjectSettings(output_root=str(tmp_path / "project")),
        "pve_admin": ProxmoxBootstrap(api_url=lab_pve.url + "/api2/json", method="ssh", ssh_host=lab_sshd.host,
                                      ssh_port=lab_sshd.port, ssh_key_file=str(lab_sshd.client_key),
                                      known_hosts=str(lab_sshd.known_hosts)),
    }
    with dg.instance_for_test() as instance:
        result = materialize(resources, instance)
        assert result.success
        assert {n: e.passed for n, e in check_results(result).items()} == {"token_authenticates": True,
                                                                         "token_privileges": True}
        values = read_env_file(tmp_path / "project/infra/env/.env.proxmox")
        assert values["PROXMOX_CA_FILE"].endswith("infra/env/pve-root-ca.pem")
