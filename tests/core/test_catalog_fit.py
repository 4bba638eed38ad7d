"""hardware.cpu_type and the fit check (packer_assets/catalog/fit.py): an entry whose VM cannot run its OS
release fails when the catalog loads, one line naming file, key and field, before any packer runs."""

import copy
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO
from support.packer import fake_packer

from packer_assets.catalog import CatalogError, load_catalog
from packer_assets.catalog.cpu import CPU_TYPES, X86_LEVELS, x86_level
from packer_assets.catalog.fit import RELEASE_NEEDS, fit_problems

SHIPPED = yaml.safe_load((REPO / "templates/catalog.yaml").read_text())
KVM64_LINE = ("{catalog}: rocky-10: hardware.cpu_type: kvm64 is x86-64-v1; Rocky Linux 10 needs x86-64-v3 "
              "(use x86-64-v3 or host)")


def _shipped(key: str) -> dict:
    return copy.deepcopy(next(t for t in SHIPPED["templates"] if t["key"] == key))


def rocky_10(**hardware) -> dict:
    """The shipped rocky-10 entry with `hardware` over it."""
    entry = _shipped("rocky-10")
    entry["hardware"] = {**entry.get("hardware", {}), **hardware}
    return entry


def windows_2025(**hardware) -> dict:
    entry = _shipped("windows-2025")
    entry["hardware"] = {**entry["hardware"], **hardware}
    return entry


def catalog_with(tmp_path: Path, *entries: dict) -> Path:
    """The shipped catalog with `entries` in place of the shipped ones of their keys, written to tmp_path/catalog.yaml."""
    doc = copy.deepcopy(SHIPPED)
    replaced = {e["key"] for e in entries}
    doc["templates"] = [t for t in doc["templates"] if t["key"] not in replaced] + list(entries)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def problem_lines(path: Path) -> list[str]:
    with pytest.raises(CatalogError) as caught:
        load_catalog(path, env={}, project_dir=REPO)
    return str(caught.value).splitlines()


# ---------------------------------------------------------------- the catalog field


def test_cpu_type_defaults_to_host_and_the_shipped_catalog_still_loads():
    catalog = load_catalog(env={}, project_dir=REPO)
    # what every build ran on before the field; rocky-10 names the level its release needs
    assert {e.key: e.hardware.cpu_type for e in catalog if e.hardware.cpu_type != "host"} == {"rocky-10": "x86-64-v3"}
    assert all(fit_problems(e) == [] for e in catalog)


def test_cpu_type_from_defaults_and_entry(tmp_path):
    doc = copy.deepcopy(SHIPPED)
    doc["defaults"]["hardware"]["cpu_type"] = "x86-64-v2-AES"
    doc["templates"] = [t for t in doc["templates"] if t["key"] != "rocky-10"] + [rocky_10(cpu_type="x86-64-v3")]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    catalog = load_catalog(path, env={}, project_dir=REPO)
    assert catalog.get("rocky-9").hardware.cpu_type == "x86-64-v2-AES"
    assert catalog.get("rocky-10").hardware.cpu_type == "x86-64-v3"


@pytest.mark.parametrize("value, hint", [
    ("haswell", "did you mean Haswell"),  # PVE's names are case-sensitive
    ("x86-64-v5", "did you mean x86-64-v"),
    ("pentium4", "did you mean pentium"),
    ("custom-", "a site model is custom-<name>"),
])
def test_unknown_cpu_type_is_one_line_naming_key_and_field(tmp_path, value, hint):
    lines = problem_lines(catalog_with(tmp_path, rocky_10(cpu_type=value)))
    assert len(lines) == 1
    assert lines[0].startswith(f"{tmp_path / 'catalog.yaml'}: rocky-10: hardware.cpu_type: {value} is not a Proxmox "
                               "CPU type (")
    assert hint in lines[0]


@pytest.mark.lab
def test_every_type_of_the_pve_schema_is_known():
    """The `reported-model` enum of PVE's API schema (fakepve's copy) are the models qemu-server knows."""
    fakepve = pytest.importorskip("fakepve", reason="the lab distribution (fakepve) is not installed")
    schema = json.loads(gzip.decompress((Path(fakepve.__file__).parent / "data/pve-api.json.gz").read_bytes()))
    props = schema["paths"]["/cluster/qemu/custom-cpu-models"]["POST"]["parameters"]["properties"]
    assert set(props["reported-model"]["enum"]) <= CPU_TYPES
    assert {"x86-64-v2", "x86-64-v2-AES", "x86-64-v3", "x86-64-v4"} <= CPU_TYPES  # qemu-server's built-ins
    assert props["reported-model"]["default"] == "kvm64"  # PVE's own default: x86-64-v1


@pytest.mark.parametrize("cpu_type, level", [
    ("kvm64", 1), ("qemu64", 1), ("Penryn", 1), ("x86-64-v2-AES", 2), ("Nehalem", 2), ("Opteron_G5", 2),
    ("x86-64-v3", 3), ("Haswell-noTSX", 3), ("EPYC-Rome", 3), ("Skylake-Server", 4), ("EPYC-Genoa", 4),
    ("kvm32", 0), ("host", None), ("max", None), ("custom-site", None), ("cortex-a72", None),
])
def test_x86_levels_of_cpu_types(cpu_type, level):
    assert x86_level(cpu_type) == level
    assert set(X86_LEVELS.values()) == {0, 1, 2, 3, 4}


# ---------------------------------------------------------------- the fit check


def test_rocky_10_on_kvm64_is_one_line(tmp_path):
    path = catalog_with(tmp_path, rocky_10(cpu_type="kvm64"))
    assert problem_lines(path) == [KVM64_LINE.format(catalog=path)]


@pytest.mark.parametrize("cpu_type", ["x86-64-v2-AES", "IvyBridge", "Opteron_G5", "qemu64"])
def test_rocky_10_below_v3_fails(tmp_path, cpu_type):
    (line,) = problem_lines(catalog_with(tmp_path, rocky_10(cpu_type=cpu_type)))
    assert f": rocky-10: hardware.cpu_type: {cpu_type} is x86-64-v" in line
    assert "Rocky Linux 10 needs x86-64-v3" in line


@pytest.mark.parametrize("cpu_type", ["host", "max", "x86-64-v3", "Haswell", "EPYC-Milan", "x86-64-v4",
                                      "custom-avx2-site"])
def test_rocky_10_on_v3_or_a_host_dependent_type_passes(tmp_path, cpu_type):
    catalog = load_catalog(catalog_with(tmp_path, rocky_10(cpu_type=cpu_type)), env={}, project_dir=REPO)
    assert catalog.get("rocky-10").hardware.cpu_type == cpu_type


def test_rocky_9_needs_v2_and_the_linux_os_type(tmp_path):
    doc = copy.deepcopy(SHIPPED)
    rocky = next(t for t in doc["templates"] if t["key"] == "rocky-9")
    rocky["hardware"] = {"cpu_type": "kvm64", "os_type": "l24"}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert problem_lines(path) == [
        f"{path}: rocky-9: hardware.cpu_type: kvm64 is x86-64-v1; Rocky Linux 9 needs x86-64-v2 "
        "(use x86-64-v2-AES or host)",
        f"{path}: rocky-9: hardware.os_type: l24; Rocky Linux 9 is Proxmox OS type l26 (Linux 2.6 - 7.X Kernel)",
    ]


def test_windows_2025_on_seabios_names_hardware_bios(tmp_path):
    path = catalog_with(tmp_path, windows_2025(bios="seabios", efi=False, tpm=False))
    (line,) = problem_lines(path)
    assert line.startswith(f"{path}: windows-2025: hardware.bios: seabios; Windows Server 2025 needs UEFI: "
                           "bios: ovmf with efi: true (")


def test_windows_2025_needs_v2_and_win11(tmp_path):
    lines = problem_lines(catalog_with(tmp_path, windows_2025(cpu_type="kvm64", os_type="win10")))
    assert [line.split(": ", 3)[2] for line in lines] == ["hardware.cpu_type", "hardware.os_type"]
    assert "kvm64 is x86-64-v1; Windows Server 2025 needs x86-64-v2 (use x86-64-v2-AES or host)" in lines[0]
    assert "win10; Windows Server 2025 is Proxmox OS type win11 (Microsoft Windows 11/2022/2025)" in lines[1]


def test_windows_2025_fits_on_uefi_without_tpm(tmp_path):
    """TPM 2.0 is what BitLocker needs, not the installer (Microsoft: required only for certain features)."""
    path = catalog_with(tmp_path, windows_2025(cpu_type="x86-64-v2-AES", tpm=False))
    assert load_catalog(path, env={}, project_dir=REPO).get("windows-2025").hardware.tpm is False


@pytest.mark.parametrize("cpu_type, said", [
    ("kvm32", "kvm32 is 32-bit only (no x86-64); "),
    ("cortex-a57", "cortex-a57 is an ARM (aarch64) CPU; "),
])
def test_no_amd64_installer_runs_on_a_32_bit_or_arm_cpu(tmp_path, cpu_type, said):
    """Also for a key whose release is not in the table (expect_os names no release)."""
    entry = rocky_10(cpu_type=cpu_type) | {"key": "rocky-site", "expect_os": {"id": "rocky"}, "vmid_range": {"first": 5000, "last": 5099}}
    (line,) = problem_lines(catalog_with(tmp_path, entry))
    assert f": rocky-site: hardware.cpu_type: {said}" in line


def test_the_release_comes_from_expect_os_down_to_its_major(tmp_path):
    entry = rocky_10(cpu_type="kvm64") | {"key": "el-site", "expect_os": {"id": "rocky", "version_id": "10.1"},
                                           "vmid_range": {"first": 5000, "last": 5099}}
    (line,) = problem_lines(catalog_with(tmp_path, entry))
    assert ": el-site: hardware.cpu_type: kvm64 is x86-64-v1; Rocky Linux 10 needs x86-64-v3" in line


def test_every_release_in_the_table_is_one_the_catalog_can_name():
    assert {os_id for os_id, _ in RELEASE_NEEDS} <= {"ubuntu", "debian", "rocky", "mswindows"}
    assert {(os_id, v) for os_id, v in RELEASE_NEEDS} >= {("rocky", "10"), ("mswindows", "2025"), ("debian", "13"),
                                                          ("ubuntu", "26.04")}


# ---------------------------------------------------------------- before packer runs, from the commands


def _env(tmp_path: Path, catalog: Path) -> dict[str, str]:
    """The environment of a user's run: the catalog, and a stand-in packer that records any call."""
    calls = tmp_path / "packer-calls"
    fake = fake_packer(tmp_path / "bin", f'echo "$@" >> {calls}\nexit 1\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PROXMOX_", "PACKER_"))}
    env.update(PACKER_ASSETS_CATALOG=str(catalog), PACKER_ASSETS_ROOT=str(tmp_path), PACKER_BINARY=str(fake),
               PATH=f"{fake.parent}{os.pathsep}{env.get('PATH', '')}", DAGSTER_HOME=str(tmp_path / "home"),
               PACKER_INSTALL_PASSWORD="pw-for-fit")
    return env


@pytest.mark.parametrize("args", [["catalog", "check"], ["validate", "rocky-10"], ["build", "--", "rocky-10"]])
def test_the_cli_fails_with_the_one_line_and_runs_no_packer(tmp_path, args):
    path = catalog_with(tmp_path, rocky_10(cpu_type="kvm64"))
    env = _env(tmp_path, path)
    proc = subprocess.run([sys.executable, "-m", "packer_assets.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    said = [line for line in (proc.stderr + proc.stdout).splitlines() if "rocky-10" in line]
    assert said == ["packer-assets: " + KVM64_LINE.format(catalog=path)]
    assert not (tmp_path / "packer-calls").exists()


def test_make_build_fails_with_the_one_line_and_runs_no_packer(tmp_path):
    path = catalog_with(tmp_path, rocky_10(cpu_type="kvm64"))
    made = subprocess.run(["make", "--no-print-directory", "build", "KEY=rocky-10", "PACKER_ASSETS_ENV_FILE="],
                          cwd=REPO, env=_env(tmp_path, path), capture_output=True, text=True, timeout=300)
    assert made.returncode != 0 and "Traceback" not in made.stderr
    errors = [line for line in made.stderr.splitlines() if not line.startswith("make")]
    assert errors == ["packer-assets: " + KVM64_LINE.format(catalog=path)]
    assert not (tmp_path / "packer-calls").exists()
    assert not (tmp_path / "home" / "storage").exists()  # no run was recorded
