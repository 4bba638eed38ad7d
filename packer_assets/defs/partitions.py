"""Partitions, declared once: one per template key of the catalog; and the checks recorded per key."""

import warnings

import dagster as dg

from packer_assets.catalog import load_catalog
from packer_assets.config.settings import environment

# Read at definitions load (a broken catalog stops the code location with its one clear error), as the
# environment over the env files names it (PACKER_ASSETS_CATALOG of the lab's lab.env, a site's file).
catalog = load_catalog(env=environment())
template_partitions = dg.StaticPartitionsDefinition(catalog.keys())


def key_check(name: str, asset: str, description: str, *, blocking: bool = False) -> dg.AssetCheckSpec:
    """A check of a per-key asset whose evaluations are recorded against the key's partition, so the UI shows
    each key's own result (an unpartitioned check's evaluation has no partition: one key's pass would hide
    another's failure). dagster 1.13 marks a check's partitions_def as a preview and warns at every load; that
    one warning is silenced deliberately, here only (tests/defs/test_definitions.py fails on any other)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning
        )
        return dg.AssetCheckSpec(
            name, asset=asset, description=description, blocking=blocking, partitions_def=template_partitions
        )
