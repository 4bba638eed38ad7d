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
          ("template", "degraded"), ("template", "end_of_life"), ("unattended_files", "packer_validate")}
# Checks of per-key assets are recorded per key (their evaluations carry the partition).
PER_KEY_CHECKS = {c for c in CHECKS if c[0] != "proxmox_env"}


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


def test_checks_of_per_key_assets_are_partitioned_like_their_asset():
    from packer_assets.defs.partitions import template_partitions

    graph = definitions.defs.resolve_asset_graph()
    for key in graph.asset_check_keys:
        spec = graph.get_check_spec(key)
        expected = template_partitions if (key.asset_key.to_user_string(), key.name) in PER_KEY_CHECKS else None
        assert spec.partitions_def == expected, key


def test_loading_the_definitions_warns_of_no_beta_or_preview_api(tmp_path):
    """Every Beta/Preview warning shown, in a fresh process: the one deliberately silenced (a check's
    partitions_def, defs/partitions.py) stays silent, and nothing else (code references were 11) warns."""
    import os
    import subprocess
    import sys

    from support import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PYTEST_"))}
    env.update(PACKER_ASSETS_ROOT=str(tmp_path), PYTHONWARNINGS="always")
    code = ("from packer_assets import definitions as d; d.defs.resolve_all_job_defs(); "
            "d.defs.resolve_asset_graph(); d.defs.get_repository_def()")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BetaWarning" not in out.stderr and "PreviewWarning" not in out.stderr, out.stderr[-3000:]


def test_jobs_are_pinned_and_the_forced_rebuild_presets_force():
    jobs = {job.name for job in definitions.defs.resolve_all_job_defs() if not job.name.startswith("__")}
    assert {"bootstrap", "rebuild_template", "rebuild_template_forced", "check_proxmox_env"} <= jobs
    forced = definitions.defs.resolve_job_def("rebuild_template_forced")
    assert forced.get_run_config_for_partition_key("debian-12") == {"ops": {"template": {"config": {"force": True}}}}
    assert forced.run_tags == {"packer-assets/force": "true"}  # what forces its runs from the CLI as well
    plain = definitions.defs.resolve_job_def("rebuild_template")
    assert "template" not in str(plain.get_run_config_for_partition_key("debian-12")) and not plain.run_tags
    assert "no-op" in plain.description and "up-to-date" in plain.description
    # the launchpad's editor describes the field it offers
    from packer_assets.defs.assets import TemplateConfig
    field = TemplateConfig.to_config_schema().as_field().config_type.fields["force"]
    assert "Build even when" in field.description


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

    from packer_assets.config.envfile import write_env_file
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


def test_notification_sensors_are_off_unless_webhooks_are_configured():
    from packer_assets.defs.notifications import build_notification_sensors

    names = {s.name for s in definitions.defs.sensors}
    assert {"notify_on_failure", "notify_on_promotion"} <= names
    assert {s.default_status for s in build_notification_sensors(enabled=False)} == {dg.DefaultSensorStatus.STOPPED}
    assert {s.default_status for s in build_notification_sensors(enabled=True)} == {dg.DefaultSensorStatus.RUNNING}
    assert "notifier" in definitions.defs.resources
