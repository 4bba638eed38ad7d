"""packer-assets: Proxmox VM templates built by Packer, orchestrated as Dagster assets."""

from importlib import metadata

try:
    __version__ = metadata.version("packer-assets")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
