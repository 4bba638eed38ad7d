"""Partitions, declared once: one per template key of the catalog."""

import dagster as dg

from ..catalog import load_catalog

# Read at definitions load (a broken catalog stops the code location with its one clear error).
template_partitions = dg.StaticPartitionsDefinition(load_catalog().keys())
