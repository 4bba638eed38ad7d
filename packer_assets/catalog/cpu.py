"""Proxmox VM CPU types (`hardware.cpu_type`) and the x86-64 microarchitecture level each one gives a guest.

The names are PVE's: the built-in models of qemu-server's PVE/QemuServer/CPUConfig.pm (`x86-64-v2`,
`x86-64-v2-AES`, `x86-64-v3`, `x86-64-v4`: qemu64 plus the level's flags) and QEMU's named models as
the PVE API schema lists them (`reported-model` of /cluster/qemu/custom-cpu-models, PVE 9;
fakepve/data/pve-api.json.gz). `custom-<name>` is a site's own model (/etc/pve/virtual-guest/cpu-models.conf).

The level of a named model is QEMU's own table, docs/system/cpu-models-x86-abi.csv (every version of a
model family has the same level there); models newer than that table take the level of their family's
instruction set (SierraForest/ClearwaterForest: AVX2, no AVX-512 -> v3; EPYC-Turin, DiamondRapids:
AVX-512 -> v4). `host`, `max` and `custom-*` depend on the node's CPU and cannot be judged from the
catalog. No Dagster import here: this is the ground floor.
"""

from __future__ import annotations

import difflib
import re

DEFAULT_CPU_TYPE = "host"  # what every build used before the catalog named a CPU type
PVE_DEFAULT_CPU_TYPE = "kvm64"  # what PVE gives a VM created without `cpu` (its API schema's default)
CUSTOM_PREFIX = "custom-"
# pve-configid after the prefix (CPUConfig.pm: custom model names are config ids)
CUSTOM_RE = re.compile(r"custom-[a-zA-Z][a-zA-Z0-9_-]{0,39}")


def _names(text: str) -> list[str]:
    return text.split()


def _levels(level: int, names: str) -> dict[str, int]:
    return dict.fromkeys(_names(names), level)


# 0: a 32-bit CPU (no long mode: no amd64 installer boots); 1..4: x86-64-v1 .. x86-64-v4.
X86_LEVELS: dict[str, int] = {
    **_levels(0, "486 athlon coreduo kvm32 pentium pentium2 pentium3 qemu32"),
    **_levels(1, "kvm64 qemu64 core2duo Conroe Penryn Opteron_G1 Opteron_G2 Opteron_G3 phenom"),
    **_levels(
        2,
        "x86-64-v2 x86-64-v2-AES Nehalem Nehalem-IBRS Westmere Westmere-IBRS SandyBridge SandyBridge-IBRS "
        "IvyBridge IvyBridge-IBRS Opteron_G4 Opteron_G5",
    ),
    **_levels(
        3,
        "x86-64-v3 Haswell Haswell-IBRS Haswell-noTSX Haswell-noTSX-IBRS Broadwell Broadwell-IBRS Broadwell-noTSX "
        "Broadwell-noTSX-IBRS Skylake-Client Skylake-Client-IBRS Skylake-Client-noTSX-IBRS Skylake-Client-v4 "
        "KnightsMill EPYC EPYC-IBPB EPYC-v3 EPYC-v4 EPYC-v5 EPYC-Rome EPYC-Rome-v2 EPYC-Rome-v3 EPYC-Rome-v4 "
        "EPYC-Rome-v5 EPYC-Milan EPYC-Milan-v2 EPYC-Milan-v3 SierraForest SierraForest-v2 SierraForest-v3 "
        "SierraForest-v4 SierraForest-v5 ClearwaterForest ClearwaterForest-v2 ClearwaterForest-v3",
    ),
    **_levels(
        4,
        # Icelake-Client*: PVE runs them as Icelake-Server* (CPUConfig.pm's deprecated map)
        "x86-64-v4 Skylake-Server Skylake-Server-IBRS Skylake-Server-noTSX-IBRS Skylake-Server-v4 Skylake-Server-v5 "
        "Cascadelake-Server Cascadelake-Server-noTSX Cascadelake-Server-v2 Cascadelake-Server-v4 "
        "Cascadelake-Server-v5 Cooperlake Cooperlake-v2 Icelake-Client Icelake-Client-noTSX Icelake-Server "
        "Icelake-Server-noTSX Icelake-Server-v3 Icelake-Server-v4 Icelake-Server-v5 Icelake-Server-v6 "
        "Icelake-Server-v7 SapphireRapids SapphireRapids-v2 SapphireRapids-v3 SapphireRapids-v4 SapphireRapids-v5 "
        "SapphireRapids-v6 GraniteRapids GraniteRapids-v2 GraniteRapids-v3 GraniteRapids-v4 GraniteRapids-v5 "
        "DiamondRapids EPYC-Genoa EPYC-Genoa-v2 EPYC-Turin",
    ),
}
# The node's own CPU (host) or everything the accelerator can give (max): unknown until a node runs it.
HOST_DEPENDENT = frozenset({"host", "max"})
# PVE knows them (for aarch64 hosts); no amd64 installer runs on them
AARCH64_MODELS = frozenset(
    _names(
        "a64fx cortex-a35 cortex-a53 cortex-a55 cortex-a57 cortex-a710 cortex-a72 cortex-a76 cortex-a78ae "
        "neoverse-n1 neoverse-n2 neoverse-v1"
    )
)
CPU_TYPES: frozenset[str] = frozenset(X86_LEVELS) | HOST_DEPENDENT | AARCH64_MODELS


def check_cpu_type(value: str) -> str:
    """`value` if it is a CPU type PVE knows (or a `custom-<name>` model), else ValueError naming the
    closest ones. Case matters: PVE's names do (Haswell, not haswell)."""
    if value in CPU_TYPES or CUSTOM_RE.fullmatch(value):
        return value
    by_lower = {name.lower(): name for name in CPU_TYPES}
    close = [by_lower[m] for m in difflib.get_close_matches(value.lower(), by_lower, n=3, cutoff=0.6)]
    shown = value if value.isprintable() else repr(value)
    hint = f"did you mean {', '.join(close)}?" if close else "like x86-64-v2-AES, x86-64-v3, host or Haswell"
    raise ValueError(f"{shown[:60]} is not a Proxmox CPU type ({hint}; a site model is custom-<name>)")


def x86_level(cpu_type: str) -> int | None:
    """The x86-64 level (1..4; 0 for a 32-bit CPU) a guest of `cpu_type` gets, or None where the catalog
    cannot tell (host, max, custom-*, and aarch64 models, which are no x86 CPU at all)."""
    return X86_LEVELS.get(cpu_type)


def level_name(level: int) -> str:
    return "32-bit only (no x86-64)" if level == 0 else f"x86-64-v{level}"


def suggest_cpu_type(level: int) -> str:
    """The generic built-in PVE type of `level`, for a message: what to write instead."""
    generic = {1: "x86-64-v2-AES", 2: "x86-64-v2-AES", 3: "x86-64-v3", 4: "x86-64-v4"}[max(level, 1)]
    return f"{generic} or host"
