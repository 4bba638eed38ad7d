"""Proxmox operations on a proxmoxer API object handed in, typed as `client.PveApi` (no Dagster, no lab)."""
