"""What Debian's packer 1.6.6 proxmox-iso builder needs from the lab's fake PVE."""


class PackerCompat:
    """Mixin of LabPve (filled in by the packer integration work)."""
