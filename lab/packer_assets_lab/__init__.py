"""The lab: an embedded stand-in for a Proxmox node (fake PVE API, ISO mirror, guest SSH, real QEMU guests).

Its own distribution (lab/pyproject.toml: packer-assets-lab), used by `make demo` and the tests. It depends on
the product, packer_assets, and on fakepve (AGPL-3.0); nothing in the product imports it. `packer-assets lab`
comes from cli.py here, registered in the entry point group `packer_assets.cli`.
"""
