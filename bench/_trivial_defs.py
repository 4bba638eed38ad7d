"""The floor of a Dagster run (issue 18): two trivial partitioned assets, materialized through the CLI
the way `make build` materializes a key. Nothing of packer-assets is imported."""

import dagster as dg

keys = dg.StaticPartitionsDefinition(["debian-12"])


@dg.asset(partitions_def=keys)
def first() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"n": 1})


@dg.asset(partitions_def=keys, deps=[first])
def second() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"n": 2})


defs = dg.Definitions(assets=[first, second], executor=dg.in_process_executor)
