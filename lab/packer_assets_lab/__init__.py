"""The lab: an embedded stand-in for a Proxmox node (fake PVE API, ISO mirror, guest SSH).

Used by `make demo` and the tests. Nothing in the core imports this package.
"""
