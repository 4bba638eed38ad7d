"""Proxmox operations on a proxmoxer `ProxmoxAPI` handed in (no Dagster, no lab)."""
