"""The one place that builds the Dagster definitions (`dagster dev`, `dagster asset materialize -m`)."""

import dagster as dg

defs = dg.Definitions(assets=[])
