import dagster as dg

from packer_assets import definitions


def test_definitions_load():
    assert isinstance(definitions.defs, dg.Definitions)
    definitions.defs.resolve_all_job_defs()
