"""`packer-assets chain` on real builds in the lab: it finds every part of a proved build and of a failed one."""

import json

import dagster as dg
import pytest
from support.builds import crashing_packer, rebuild

from packer_assets.cli import main
from packer_assets.defs.assets import CHAIN_TAG

pytestmark = pytest.mark.packer


def chain_json(capsys, *args):
    capsys.readouterr()  # what the builds printed
    with pytest.raises(SystemExit) as done:
        main(["chain", *args, "--json"])
    return done.value.code, json.loads(capsys.readouterr().out)


def test_chain_finds_the_parts_of_a_build_and_of_a_failed_one(lab_project, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PACKER_ASSETS_UI_URL", "http://127.0.0.1:3000")
    with dg.instance_for_test() as instance:  # DAGSTER_HOME is this instance's folder while it is open
        built = rebuild(lab_project, instance)
        assert built.success
        failed = rebuild(lab_project, instance, force=True, binary=crashing_packer(tmp_path))
        assert not failed.success
        good = instance.get_run_by_id(built.run_id).tags[CHAIN_TAG]
        bad = instance.get_run_by_id(failed.run_id).tags[CHAIN_TAG]

        code, report = chain_json(capsys, good)
        assert code == 0 and report["record"] and report["proof"]
        assert {p.rsplit("/", 1)[1] for p in report["logs"]} >= {"packer.log", "build.json", "sbom.cdx.json"}
        assert report["rendered_files"] and all(len(h) == 64 for h in report["rendered_files"].values())
        assert [(r["run_id"], r["status"]) for r in report["runs"]] == [(built.run_id, "SUCCESS")]
        assert report["runs"][0]["url"] == f"http://127.0.0.1:3000/runs/{built.run_id}"
        assert [t["vmid"] for t in report["templates"]] == [
            vm.vmid for vm in lab_project.pve.vms if vm.template and good in vm.config.get("description", "")]
        assert report["templates"] and report["unknown"] == []

        code, report = chain_json(capsys, bad)
        assert code == 0 and report["logs"] and report["record"] is None and report["proof"] is None
        assert [(r["run_id"], r["status"]) for r in report["runs"]] == [(failed.run_id, "FAILURE")]
        assert report["templates"] == []  # the build VM was destroyed: nothing names the chain

        code, chains = chain_json(capsys, "--key", "debian-12")
        assert [c["chain_id"] for c in chains] == [bad, good]
        assert [c["outcome"] for c in chains] == ["failed", "proved"]
