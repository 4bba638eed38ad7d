"""Upstream ISOs: checksum files and their parsing, source digests, the ISO watch behind the sensor."""
