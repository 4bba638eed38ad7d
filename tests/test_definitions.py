import dagster as dg

from packer_assets import definitions

# Renaming an asset breaks its history, schedules and every consumer's selection: pin them.
ASSET_KEYS = {"proxmox_env"}
LINEAGE: dict[str, set[str]] = {"proxmox_env": set()}
CHECKS = {("proxmox_env", "token_authenticates"), ("proxmox_env", "token_privileges")}


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
