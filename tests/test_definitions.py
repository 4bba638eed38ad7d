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
}
ASSET_KEYS = set(LINEAGE)
CHECKS = {("proxmox_env", "token_authenticates"), ("proxmox_env", "token_privileges"), ("template", "smoke_test"),
          ("unattended_files", "packer_validate")}


def test_definitions_load():
    assert isinstance(definitions.defs, dg.Definitions)
    definitions.defs.resolve_all_job_defs()


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


def test_rebuild_job_leaves_the_unpartitioned_bootstrap_out():
    job = definitions.defs.resolve_job_def("rebuild_template")
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert "proxmox_env" not in keys and "staged_iso" in keys
