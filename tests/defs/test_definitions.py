import dagster as dg

from packer_assets import definitions

# Renaming an asset breaks its history, schedules and every consumer's selection: pin them.
LINEAGE: dict[str, set[str]] = {
    "proxmox_env": set(),
    "iso_release": set(),
    "unattended_files": set(),
    "staged_iso": {"iso_release", "proxmox_env"},
    "template": {"unattended_files", "staged_iso", "proxmox_env"},
    "template_proof": {"template"},
    "template_registry": {"template_proof"},
}
ASSET_KEYS = set(LINEAGE)
CHECKS = {("proxmox_env", "token_authenticates"), ("proxmox_env", "token_privileges"), ("template", "smoke_test"),
          ("unattended_files", "packer_validate")}


def test_definitions_load():
    assert isinstance(definitions.defs, dg.Definitions)
    definitions.defs.resolve_all_job_defs()


def test_every_job_runs_its_steps_in_the_run_process():
    """defs/recovery.py judges a run by the PID its first step records: that is the run's own process only
    with the in-process executor (a multiprocess step's PID ends with the step, and a live run would be
    closed as dead). Also the reason the key lock of the first step covers the whole run."""
    for job in definitions.defs.resolve_all_job_defs():
        assert job.executor_def.name == dg.in_process_executor.name, job.name


def test_asset_keys_and_lineage_are_pinned():
    graph = definitions.defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == ASSET_KEYS
    for key in keys:
        parents = {p.to_user_string() for p in graph.get(dg.AssetKey.from_user_string(key)).parent_keys}
        assert parents == LINEAGE[key], key
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert checks == CHECKS


def test_partitions_are_the_catalog_keys():
    from packer_assets.catalog import load_catalog

    graph = definitions.defs.resolve_asset_graph()
    partitions = graph.get(dg.AssetKey("staged_iso")).partitions_def
    assert partitions.get_partition_keys() == list(load_catalog().keys())


def test_the_registry_job_rewrites_the_unpartitioned_registry_alone():
    job = definitions.defs.resolve_job_def("registry")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {"template_registry"}
    assert definitions.defs.resolve_asset_graph().get(dg.AssetKey("template_registry")).partitions_def is None


def test_rebuild_job_leaves_the_unpartitioned_bootstrap_out():
    job = definitions.defs.resolve_job_def("rebuild_template")
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert "proxmox_env" not in keys and "staged_iso" in keys


def test_partitions_come_from_the_catalog_an_env_file_names(tmp_path):
    """PACKER_ASSETS_ENV_FILE (the lab's lab.env, a site's file) is read before the partitions are: a catalog
    it names is the one the code location partitions by (found by bench/parallel_scaling.py)."""
    import os
    import subprocess
    import sys

    import yaml
    from support import REPO as repo

    from packer_assets.envfile import write_env_file
    doc = yaml.safe_load(open(os.path.join(repo, "templates/catalog.yaml")).read())
    doc["templates"] = [t for t in doc["templates"] if t["key"] == "debian-12"]
    doc["templates"][0]["key"] = "only-this-key"
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(doc))
    env_file = write_env_file(tmp_path / "site.env", {"PACKER_ASSETS_CATALOG": str(catalog)})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PYTEST_"))}
    env["PACKER_ASSETS_ENV_FILE"] = str(env_file)
    code = ("from packer_assets import definitions as d; import dagster as dg; "
            "print(d.defs.resolve_asset_graph().get(dg.AssetKey('template')).partitions_def.get_partition_keys())")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['only-this-key']"
