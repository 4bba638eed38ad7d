"""Which x86-64 microarchitecture level a VM's CPU type gives its guest, and which level each OS release needs
to boot its installer (the lab's own tables: the product's fit check is not imported, so the two can disagree).

PVE's `cpu` option (`[cputype=]<type>[,flags=...]`, unset: `kvm64`) names a QEMU CPU model. Its level follows the
psABI levels (v2: SSE4.2, POPCNT; v3: AVX2, BMI2, FMA, MOVBE; v4: AVX-512): PVE's own x86-64-v* models say it
in their names; kvm64 and qemu64 are the baseline (v1); host and max pass the build machine's CPU through, taken
here as able to run anything. A model the lab does not list is not judged (no failure is invented for it).

What a release needs: RHEL 9 and its rebuilds x86-64-v2, RHEL 10 x86-64-v3 (the Rocky and Red Hat release
notes), Windows Server 2025 SSE4.2 and POPCNT, i.e. x86-64-v2 (Microsoft's hardware requirements). The console
lines below are the lab's wording of what the real installer prints (invented, marked as the lab's).
"""

from __future__ import annotations

PASS_THROUGH = 99  # host, max: whatever the build machine has
CPU_LEVELS: dict[str, int] = {
    "kvm32": 1,
    "kvm64": 1,
    "qemu32": 1,
    "qemu64": 1,
    "x86-64-v2": 2,
    "x86-64-v2-AES": 2,
    "x86-64-v3": 3,
    "x86-64-v4": 4,
    "Conroe": 1,
    "Penryn": 1,
    "Opteron_G1": 1,
    "Opteron_G2": 1,
    "Opteron_G3": 1,
    "Nehalem": 2,
    "Westmere": 2,
    "SandyBridge": 2,
    "IvyBridge": 2,
    "Opteron_G4": 2,
    "Opteron_G5": 2,
    "Haswell": 3,
    "Broadwell": 3,
    "Skylake-Client": 3,
    "EPYC": 3,
    "EPYC-Rome": 3,
    "EPYC-Milan": 3,
    "Skylake-Server": 4,
    "Cascadelake-Server": 4,
    "Icelake-Server": 4,
    "SapphireRapids": 4,
    "EPYC-Genoa": 4,
    "host": PASS_THROUGH,
    "max": PASS_THROUGH,
}
PVE_DEFAULT_CPU = "kvm64"
# (agent OS id, major version) -> the level its installer needs
NEEDED_LEVELS: dict[tuple[str, str], int] = {
    ("rocky", "9"): 2,
    ("rocky", "10"): 3,
    ("mswindows", "2025"): 2,
}


def cpu_type(config_value: object) -> str:
    """The QEMU model of a PVE `cpu` value (`kvm64`, `cputype=x86-64-v2-AES,flags=+aes`); unset: kvm64."""
    first = str(config_value or "").split(",", 1)[0].strip()
    return first.removeprefix("cputype=") or PVE_DEFAULT_CPU


def cpu_level(model: str) -> int | None:
    """The x86-64 level the model gives the guest, None for a model the lab does not list."""
    return CPU_LEVELS.get(model)


def boot_failure(os_id: str, version_id: str, config_value: object) -> str | None:
    """The installer's console line when the VM's CPU is below what the OS release needs, else None."""
    needed = NEEDED_LEVELS.get((os_id.lower(), version_id.split(".")[0]))
    model = cpu_type(config_value)
    level = cpu_level(model)
    if needed is None or level is None or level >= needed:
        return None
    if os_id.lower() == "mswindows":
        return (
            f"Windows Setup (lab): the processor (CPU type {model}, x86-64-v{level}) lacks SSE4.2/POPCNT, which "
            f"Windows Server {version_id} requires (x86-64-v{needed}): the boot stops"
        )
    return (
        f"Fatal glibc error: CPU does not support x86-64-v{needed} (lab: CPU type {model} is x86-64-v{level}); "
        "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00007f00"
    )
