"""Real guests for the lab: a cached Debian base image per suite, 12 bookworm or 13 trixie (image), PVE's
NoCloud drive (cidata), a QEMU runner (qemu) and a guest-agent client (agent).

The foundation of issue 16; nothing here talks to the lab's fake PVE API, which wires these in. Needs
qemu-system-x86, qemu-utils and debootstrap (and root to build the image once).
"""
