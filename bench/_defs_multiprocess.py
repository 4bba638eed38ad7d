"""packer_assets.definitions with Dagster's default multiprocess executor (one process per step) instead of
the project's in-process one: the "before" of that choice, for the benchmarks' multiprocess variants.

    dagster asset materialize -f bench/_defs_multiprocess.py ...
"""

import dagster as dg

from packer_assets import definitions as _project


def _with_multiprocess(project: dg.Definitions) -> dg.Definitions:
    return dg.Definitions(assets=project.assets, jobs=project.jobs, sensors=project.sensors,
                          schedules=project.schedules, asset_checks=project.asset_checks,
                          resources=project.resources, executor=dg.multiprocess_executor)


defs = _with_multiprocess(_project.defs)  # the only Definitions at module scope, as Dagster requires
