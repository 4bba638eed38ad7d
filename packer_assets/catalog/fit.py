"""Does an entry's VM fit its OS release? The classic mistakes, caught when the catalog loads, before any
ISO is fetched or packer runs: a CPU type below the release's x86-64 level (Rocky Linux 10 on kvm64), a
32-bit or ARM CPU type for an amd64 installer, firmware the release's template needs (Windows Server
2025 on SeaBIOS), a Proxmox OS type of another generation.

`RELEASE_NEEDS` is the table (docs/vm-requirements.md has it with its sources); a release not in it is
checked only for what every amd64 installer needs. `host`, `max` and `custom-*` CPU types pass: what
they give depends on the node (packer_assets/catalog/cpu.py). No Dagster import here.
"""

from __future__ import annotations

from dataclasses import dataclass

from packer_assets.catalog.cpu import AARCH64_MODELS, level_name, suggest_cpu_type, x86_level
from packer_assets.catalog.models import ExpectedOs, TemplateEntry


@dataclass(frozen=True)
class ReleaseNeeds:
    """What one OS release needs from its build VM: `x86_level` (1..4), the Proxmox `os_type`, and
    `uefi` (bios: ovmf with efi: true), with `uefi_why` saying whose requirement that is."""

    name: str  # how messages name the release
    x86_level: int
    os_type: str
    uefi: bool = False
    uefi_why: str = ""


# Microsoft lists UEFI with Secure Boot as required "only for certain features" (Secure Boot, VBS,
# Credential Guard, hotpatching); the installer runs on SeaBIOS. Windows Server 2025 templates here are
# built for those features, so UEFI is this project's requirement, and the message says so.
_WS2025_UEFI = "the project builds it for Secure Boot and VBS, which Microsoft says need UEFI"


def _linux(name: str, x86_level: int = 1) -> ReleaseNeeds:
    return ReleaseNeeds(name, x86_level=x86_level, os_type="l26")


# (os-release ID, VERSION_ID) -> needs. Sources: docs/vm-requirements.md.
RELEASE_NEEDS: dict[tuple[str, str], ReleaseNeeds] = {
    ("ubuntu", "22.04"): _linux("Ubuntu 22.04"),
    ("ubuntu", "24.04"): _linux("Ubuntu 24.04"),
    ("ubuntu", "26.04"): _linux("Ubuntu 26.04"),  # amd64v3 is an opt-in variant; the amd64 ISO stays v1
    ("debian", "12"): _linux("Debian 12"),
    ("debian", "13"): _linux("Debian 13"),
    ("rocky", "9"): _linux("Rocky Linux 9", x86_level=2),
    ("rocky", "10"): _linux("Rocky Linux 10", x86_level=3),
    ("mswindows", "2022"): ReleaseNeeds("Windows Server 2022", x86_level=1, os_type="win11"),
    ("mswindows", "2025"): ReleaseNeeds(
        "Windows Server 2025", x86_level=2, os_type="win11", uefi=True, uefi_why=_WS2025_UEFI
    ),
}
# Proxmox's own words for the OS types the table names (qemu-server's ostype description).
_OS_TYPE_NAMES = {"l26": "Linux 2.6 - 7.X Kernel", "win11": "Microsoft Windows 11/2022/2025"}


def release_needs(expected: ExpectedOs) -> ReleaseNeeds | None:
    """The table's row for `expected`: its version_id, else its major release (rocky 10.1 -> rocky 10)."""
    if expected.version_id is None:
        return None
    os_id = expected.id.lower()
    found = RELEASE_NEEDS.get((os_id, expected.version_id))
    return found or RELEASE_NEEDS.get((os_id, expected.version_id.split(".", 1)[0]))


def _cpu_problem(cpu_type: str, needs: ReleaseNeeds | None, what: str) -> str | None:
    if cpu_type in AARCH64_MODELS:
        return f"{cpu_type} is an ARM (aarch64) CPU; {what} installs amd64 media, which need x86-64"
    level = x86_level(cpu_type)
    wanted = needs.x86_level if needs else 1
    if level is None or level >= wanted:
        return None
    return f"{cpu_type} is {level_name(level)}; {what} needs {level_name(wanted)} (use {suggest_cpu_type(wanted)})"


def fit_problems(entry: TemplateEntry) -> list[tuple[str, str]]:
    """(field, problem) for every way `entry`'s hardware cannot run its release; [] when it fits."""
    hw = entry.hardware
    needs = release_needs(entry.expected_os)
    what = needs.name if needs else f"{entry.family} ({entry.expected_os})"
    problems = []
    cpu = _cpu_problem(hw.cpu_type, needs, what)
    if cpu:
        problems.append(("hardware.cpu_type", cpu))
    if needs is None:
        return problems
    if needs.uefi and hw.bios != "ovmf":
        problems.append(
            ("hardware.bios", f"{hw.bios}; {what} needs UEFI: bios: ovmf with efi: true ({needs.uefi_why})")
        )
    if hw.os_type != needs.os_type:
        problems.append(
            (
                "hardware.os_type",
                f"{hw.os_type}; {what} is Proxmox OS type {needs.os_type} ({_OS_TYPE_NAMES[needs.os_type]})",
            )
        )
    return problems


def fit_lines(display: str, entry: TemplateEntry) -> list[str]:
    """The catalog error lines of `entry`'s fit problems: `<file>: <key>: <field>: <problem>`."""
    return [f"{display}: {entry.key}: {field}: {problem}" for field, problem in fit_problems(entry)]
