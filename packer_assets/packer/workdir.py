"""A work directory per build: the family's Packer template, the common file, the HTTP files, the variables.

    <workdir>/<family>.pkr.hcl          the entry's template (`find_template`: the one *.pkr.hcl of its
                                        packer_dir), as it is: the family's boot, provisioners, build
    <workdir>/common.pkr.hcl            templates/common/common.pkr.hcl, shared by every family: all
                                        variables, shared locals and the one proxmox-iso source (the
                                        family's build block names it), its version-specific region
                                        rewritten
    <workdir>/plugins.pkr.hcl           `required_plugins` (only where Packer needs `packer init`)
    <workdir>/build.auto.pkrvars.json   every variable but the secrets; Packer loads *.auto.pkrvars.*
                                        by itself, so nothing about the build is on its command line
    <workdir>/http/                     the rendered unattended files, served by Packer's HTTP server:
                                        exactly those the render's record lists (render/record.py),
                                        each checked after its copy; any other file is named, not copied
    <workdir>/packer-assets.json        what was prepared and why: capabilities, gaps, file hashes, the
                                        sha256 of both source files and their combined `template_sha256`

The two source files are one input: `template_sha256` hashes both (the input fingerprint and the build
record use it), so an edit of the shared file counts as a changed input for every key.

Version differences: the common file carries ONE marked region (`# >>> packer-assets:
version-specific` .. `# <<< ...`) holding the 1.6.6 form (`iso_file = var.iso_file`); it is replaced
by `version_region(caps)`, which only ever refers to variables, so the values still come from the
var file. Attributes that exist in every version but are needed by some only (storage_pool_type) are
variables set to null where not needed: HCL treats null as unset.

Capability gaps (an entry asks for what the installed Packer cannot do: OVMF/EFI/TPM/machine on
1.6.6, extra CD-ROMs on 1.6.6, EFI/TPM blocks on plugins < 1.2.0) are REFUSED by default with one
`PackerCapabilityError` naming the key, each field, the version that has it and the installed one.
`allow_degraded=True` (the lab's choice, an explicit one) builds without them instead: the values fall
back (SeaBIOS, no EFI/TPM disk, no extra ISOs) and every gap is recorded as a warning in
`Workdir.warnings` and packer-assets.json.

Secrets never reach these files: PKR_VAR_ssh_password and the login variables go to packer's
environment (packer/env.py); `prepare_workdir(secrets=...)` re-reads every written file to prove it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packer_assets.catalog import TemplateEntry
from packer_assets.catalog.cpu import DEFAULT_CPU_TYPE
from packer_assets.errors import ConfigError
from packer_assets.evidence.layout import sha256_file
from packer_assets.packer.version import (
    EFI_TPM_PLUGIN,
    PLUGIN_CONSTRAINT,
    PLUGIN_SOURCE,
    PLUGIN_SPLIT_CORE,
    PackerCapabilities,
    vtext,
)
from packer_assets.render.record import changed_file, ignored_warning, refusal, stray_files

VAR_FILE = "build.auto.pkrvars.json"
PLUGINS_FILE = "plugins.pkr.hcl"
MANIFEST = "packer-assets.json"
HTTP_DIR = "http"
COMMON_TEMPLATE = "templates/common/common.pkr.hcl"  # under the project folder
REGION_START = "# >>> packer-assets: version-specific"
REGION_END = "# <<< packer-assets: version-specific"

# PVE storage type -> the builder's `storage_pool_type` word (packer 1.6.6 / plugin < 1.1.0).
_POOL_TYPES = {"lvmthin": "lvm-thin", "dir": "directory"}
# File storages keep disks as files: qcow2 there (snapshots, thin); block storages take raw.
_FILE_STORAGES = {"dir", "nfs", "cifs", "glusterfs"}


DEGRADED = "degraded build: "  # the prefix of a warning that names a capability gap (not a mere note)


class WorkdirError(ConfigError):
    """The work directory cannot be prepared (template, HTTP files, a secret in a file)."""


class PackerCapabilityError(WorkdirError):
    """The catalog entry asks for what the installed Packer cannot build (and degrading was not allowed)."""


@dataclass(frozen=True)
class BuildPlan:
    """The non-secret settings of one build, beyond the catalog entry's hardware."""

    vm_id: int
    vm_name: str
    node: str
    iso_file: str  # boot ISO volume, e.g. local:iso/ubuntu-24.04.iso
    vm_storage: str
    vm_storage_type: str  # the storage's PVE type: lvmthin, dir, zfspool, ...
    bridge: str
    http_bind_address: str | None
    http_port_min: int
    http_port_max: int
    ssh_username: str
    ssh_host: str | None = None  # None: the address the guest agent reports
    ssh_port: int = 22
    ssh_timeout: str | None = None  # None: the family's default in the template
    extra_iso_files: tuple[str, ...] = ()  # volumes: the Windows answer ISO, virtio-win, ...
    description: str = ""
    tags: tuple[str, ...] = ()
    boot_wait: str | None = None  # None: the family's default
    boot_command: tuple[str, ...] | None = None
    cpu_type: str = DEFAULT_CPU_TYPE  # the catalog's hardware.cpu_type (plan_build)
    insecure_skip_tls_verify: bool = False


@dataclass(frozen=True)
class Gap:
    field: str
    wanted: str
    needs: str
    fallback: str

    def line(self, key: str, caps: PackerCapabilities) -> str:
        return (
            f"{key}: {self.field}: {self.wanted} needs {self.needs}; installed: {caps.describe()} "
            f"(degraded: {self.fallback})"
        )


@dataclass
class Workdir:
    path: Path
    template: Path  # the family's template
    common: Path  # the common file, its version region rewritten
    var_file: Path
    http_dir: Path
    variables: dict[str, Any]
    capabilities: PackerCapabilities
    gaps: list[Gap] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    template_sha256: str = ""  # both source files as prepared (see template_sha256())


# ------------------------------------------------------------------ version differences


def capability_gaps(entry: TemplateEntry, plan: BuildPlan, caps: PackerCapabilities) -> list[Gap]:
    hw = entry.hardware
    plugin = f"packer >= {vtext(PLUGIN_SPLIT_CORE)} (packer-plugin-proxmox)"
    blocks = f"packer-plugin-proxmox >= {vtext(EFI_TPM_PLUGIN)} (efi_config / tpm_config)"
    gaps = []
    if hw.bios == "ovmf" and not (caps.firmware and caps.efi_tpm_blocks):
        # OVMF without an EFI vars disk forgets its boot entries: no EFI disk means no OVMF either.
        gaps.append(Gap("hardware.bios", "ovmf", plugin if not caps.firmware else blocks, "seabios"))
    if hw.efi and not caps.efi_tpm_blocks:
        gaps.append(Gap("hardware.efi", "an EFI vars disk", blocks, "none"))
    if hw.tpm and not caps.efi_tpm_blocks:
        gaps.append(Gap("hardware.tpm", "a TPM 2.0 state disk", blocks, "none"))
    if hw.machine and not caps.firmware:
        gaps.append(Gap("hardware.machine", hw.machine, plugin, "the default machine (i440fx)"))
    if plan.extra_iso_files and not caps.additional_isos:
        gaps.append(
            Gap(
                "extra_isos",
                ", ".join(plan.extra_iso_files),
                f"packer >= {vtext(PLUGIN_SPLIT_CORE)} (packer 1.6.6's HCL2 decoder rejects additional_iso_files)",
                "not attached: an installer that needs them will not finish",
            )
        )
    return gaps


def version_region(caps: PackerCapabilities) -> str:
    """The HCL that replaces the template's version-specific region (variables only, no values)."""
    lines = []
    if caps.boot_iso_block:
        lines += [
            "boot_iso {",
            '  type     = "ide"',
            '  index    = "2"',
            "  iso_file = var.iso_file",
            "  unmount  = true",
            "}",
        ]
    else:
        # No unmount_iso on 1.6.6: it fails after the template exists (PVE appends size= to the cdrom
        # entry). The template lifecycle ejects the ISO through the API afterwards, on every version.
        lines += ["iso_file = var.iso_file"]
    if caps.additional_isos:
        bus = (
            ('  type     = "sata"', "  index    = additional_iso_files.key")
            if caps.boot_iso_block
            else ('  device   = "sata${additional_iso_files.key}"',)
        )
        lines += [
            'dynamic "additional_iso_files" {',
            "  for_each = var.extra_iso_files",
            "  content {",
            *("  " + b for b in bus),
            "    iso_file = additional_iso_files.value",
            "    unmount  = true",
            "  }",
            "}",
        ]
    if caps.firmware:
        lines += ["bios    = var.bios", "machine = var.machine"]
    if caps.efi_tpm_blocks:
        lines += [
            'dynamic "efi_config" {',
            "  for_each = var.efi ? [1] : []",
            "  content {",
            "    efi_storage_pool  = var.vm_storage",
            '    efi_type          = "4m"',
            "    pre_enrolled_keys = true",
            "  }",
            "}",
            'dynamic "tpm_config" {',
            "  for_each = var.tpm ? [1] : []",
            "  content {",
            "    tpm_storage_pool = var.vm_storage",
            '    tpm_version      = "v2.0"',
            "  }",
            "}",
        ]
    if caps.tags:
        lines += ['tags = join(";", var.tags)']
    else:
        lines += ["# tags: not in this builder; the template lifecycle sets them through the API"]
    header = f"# generated for {caps.describe()} by packer_assets/packer/workdir.py"
    return "\n".join(["  " + header] + ["  " + line for line in lines])


def plugins_hcl(caps: PackerCapabilities) -> str | None:
    if not caps.needs_init:
        return None
    return (
        "# generated by packer_assets/packer/workdir.py: packer >= 1.10 ships no builders\n"
        "packer {\n  required_plugins {\n    proxmox = {\n"
        f'      version = "{PLUGIN_CONSTRAINT}"\n      source  = "{PLUGIN_SOURCE}"\n'
        "    }\n  }\n}\n"
    )


def splice_region(text: str, region: str, name: str) -> str:
    starts = [i for i, line in enumerate(text.splitlines()) if line.strip().startswith(REGION_START)]
    ends = [i for i, line in enumerate(text.splitlines()) if line.strip().startswith(REGION_END)]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise WorkdirError(
            f"{name}: needs exactly one '{REGION_START}' ... '{REGION_END}' region "
            f"(found {len(starts)} start and {len(ends)} end markers)"
        )
    lines = text.splitlines()
    return "\n".join([*lines[: starts[0] + 1], region, *lines[ends[0] :]]) + "\n"


# ------------------------------------------------------------------ variables


def variables_for(entry: TemplateEntry, plan: BuildPlan, caps: PackerCapabilities, degraded: bool) -> dict[str, Any]:
    hw = entry.hardware
    bios, efi, tpm, machine = hw.bios, hw.efi, hw.tpm, hw.machine
    extra = list(plan.extra_iso_files)
    if degraded:
        gaps = {g.field for g in capability_gaps(entry, plan, caps)}
        bios = "seabios" if "hardware.bios" in gaps else bios
        efi = False if "hardware.efi" in gaps else efi
        tpm = False if "hardware.tpm" in gaps else tpm
        machine = None if "hardware.machine" in gaps else machine
        extra = [] if "extra_isos" in gaps else extra
    pool_type = None
    if caps.needs_storage_pool_type:
        pool_type = _POOL_TYPES.get(plan.vm_storage_type, plan.vm_storage_type)
    return {
        "node": plan.node,
        "vm_id": plan.vm_id,
        "vm_name": plan.vm_name,
        "template_description": plan.description,
        "os_version": entry.expected_os.version_id or "",  # the family template's release branches (boot command)
        "tags": list(plan.tags),
        "iso_file": plan.iso_file,
        "extra_iso_files": extra,
        "vm_storage": plan.vm_storage,
        "disk_storage_pool_type": pool_type,
        "disk_format": "qcow2" if plan.vm_storage_type in _FILE_STORAGES else "raw",
        "bridge": plan.bridge,
        "http_bind_address": plan.http_bind_address,
        "http_port_min": plan.http_port_min,
        "http_port_max": plan.http_port_max,
        "ssh_host": plan.ssh_host,
        "ssh_port": plan.ssh_port,
        "ssh_username": plan.ssh_username,
        "ssh_timeout": plan.ssh_timeout,
        "cores": hw.cores,
        "sockets": hw.sockets,
        "memory": hw.memory,
        "disk_size": hw.disk,
        "os_type": hw.os_type,
        "cpu_type": plan.cpu_type,
        "bios": bios,
        "machine": machine,
        "efi": efi,
        "tpm": tpm,
        "boot_wait": plan.boot_wait,
        "boot_command": list(plan.boot_command) if plan.boot_command is not None else None,
        "insecure_skip_tls_verify": plan.insecure_skip_tls_verify,
    }


# ------------------------------------------------------------------ the directory


def find_template(project_dir: Path, entry: TemplateEntry) -> Path:
    """The family's own template: the one *.pkr.hcl of the entry's packer_dir."""
    folder = Path(project_dir) / entry.packer_dir
    found = sorted(folder.glob("*.pkr.hcl"))
    if len(found) != 1:
        raise WorkdirError(
            f"{entry.key}: packer_dir: {entry.packer_dir} must hold exactly one *.pkr.hcl "
            f"(found {len(found)}: {', '.join(p.name for p in found) or 'none'})"
        )
    if found[0].name in (Path(COMMON_TEMPLATE).name, PLUGINS_FILE):
        raise WorkdirError(
            f"{entry.key}: {found[0]}: the name {found[0].name} is taken in the work directory; rename the template"
        )
    return found[0]


def common_template(project_dir: Path) -> Path:
    """The file every family's work directory gets next to its template (variables, the shared source)."""
    path = Path(project_dir) / COMMON_TEMPLATE
    if not path.is_file():
        raise WorkdirError(f"{COMMON_TEMPLATE}: the common Packer file is missing under {project_dir}")
    return path


def template_files(project_dir: Path, entry: TemplateEntry) -> tuple[Path, Path]:
    """(the family's template, the common file): together, the Packer configuration of `entry`."""
    return find_template(project_dir, entry), common_template(project_dir)


def template_sha256(project_dir: Path, entry: TemplateEntry) -> str:
    """ONE sha256 over both source files, each in its role: the Packer input of a build."""
    family, common = template_files(project_dir, entry)
    return _combined_sha256(sha256_file(family), sha256_file(common))


def _combined_sha256(template_sha: str, common_sha: str) -> str:
    blob = json.dumps({"common": common_sha, "template": template_sha}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def prepare_workdir(
    workdir: Path,
    entry: TemplateEntry,
    plan: BuildPlan,
    caps: PackerCapabilities,
    *,
    project_dir: Path,
    http_dir: Path | None = None,
    http_files: Mapping[str, str] | None = None,
    allow_degraded: bool = False,
    secrets: Iterable[str] = (),
) -> Workdir:
    """Fill an empty (or missing) `workdir` for one build of `entry`; see the module doc.

    http_files (name -> sha256, the render's record): only these files of `http_dir` are served, each
    checked after its copy; any other file there is left out and named in a warning. None: the folder as
    it is (dot files aside): tests and benchmarks."""
    gaps = capability_gaps(entry, plan, caps)
    if gaps and not allow_degraded:
        raise PackerCapabilityError(
            "\n".join(g.line(entry.key, caps) for g in gaps)
            + "\nupgrade Packer, change the catalog entry, or allow a degraded build explicitly (allow_degraded)"
        )
    source, common_source = template_files(project_dir, entry)
    source_bytes, common_bytes = source.read_bytes(), common_source.read_bytes()
    source_text, common_text = source_bytes.decode("utf-8"), common_bytes.decode("utf-8")
    if REGION_START in source_text or REGION_END in source_text:
        raise WorkdirError(f"{source}: holds a version-specific marker; the region lives in {COMMON_TEMPLATE} only")
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        raise WorkdirError(f"{workdir}: work directory is not empty; every build gets a fresh one")
    workdir.mkdir(parents=True, exist_ok=True)

    template = workdir / source.name
    template.write_text(source_text, encoding="utf-8")
    common = workdir / common_source.name
    common.write_text(splice_region(common_text, version_region(caps), str(common_source)), encoding="utf-8")
    plugins = plugins_hcl(caps)
    if plugins:
        (workdir / PLUGINS_FILE).write_text(plugins, encoding="utf-8")
    http = workdir / HTTP_DIR
    ignored: tuple[str, ...] = ()
    if http_dir is not None:
        if not Path(http_dir).is_dir():
            raise WorkdirError(f"{entry.key}: rendered HTTP files: {http_dir} is not a directory")
        if http_files is not None:
            ignored = _copy_rendered(entry.key, Path(http_dir), http, http_files)
        else:  # Dot files are a concurrent render's temp files (atomic_write): one may vanish mid-copy
            shutil.copytree(http_dir, http, symlinks=False, ignore=shutil.ignore_patterns(".*"))
    else:
        http.mkdir()

    variables = variables_for(entry, plan, caps, degraded=bool(gaps))
    var_file = workdir / VAR_FILE
    var_file.write_text(json.dumps(variables, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # The sources as read (the work directory's common file differs from its source by the region).
    source_sha, common_sha = hashlib.sha256(source_bytes).hexdigest(), hashlib.sha256(common_bytes).hexdigest()
    files = {p.relative_to(workdir).as_posix(): sha256_file(p) for p in sorted(workdir.rglob("*")) if p.is_file()}
    warnings = [f"{DEGRADED}{g.line(entry.key, caps)}" for g in gaps]
    if ignored and http_dir is not None:  # only files of an http_dir are ever ignored
        warnings.append(ignored_warning(entry.key, Path(http_dir), ignored))
    if not caps.tags and plan.tags:
        warnings.append(f"{entry.key}: tags: {caps.describe()} cannot set tags; set them through the API")
    template_sha256 = _combined_sha256(source_sha, common_sha)
    manifest = {
        "key": entry.key,
        "family": entry.family,
        "template": source.as_posix(),
        "common": common_source.as_posix(),
        "sources": {source.as_posix(): source_sha, common_source.as_posix(): common_sha},
        "template_sha256": template_sha256,
        "capabilities": caps.as_dict(),
        "gaps": [g.__dict__ for g in gaps],
        "warnings": warnings,
        "files": files,
    }
    (workdir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    _assert_no_secret(workdir, secrets)
    return Workdir(workdir, template, common, var_file, http, variables, caps, gaps, warnings, files, template_sha256)


def _copy_rendered(key: str, source: Path, http: Path, files: Mapping[str, str]) -> tuple[str, ...]:
    """Copy exactly the recorded files; a copy whose sha256 is not the recorded one is refused (it changed
    since the render validated it). Returns the names in `source` that were left out."""
    http.mkdir()
    for name, digest in sorted(files.items()):
        why = changed_file(source / name, digest)
        if why is None:
            try:
                shutil.copyfile(source / name, http / name, follow_symlinks=False)
                why = changed_file(http / name, digest)  # what is served is what was recorded
            except OSError as exc:
                why = f"cannot be read: {exc.strerror or exc}"
        if why:
            raise WorkdirError(refusal(key, source / name, why))
    return stray_files(source, files)


def _assert_no_secret(workdir: Path, secrets: Iterable[str]) -> None:
    wanted = [s.encode() for s in secrets if s]
    for path in workdir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(s in data for s in wanted):
                # Name the file, never the secret.
                raise WorkdirError(f"{path}: a secret ended up in the work directory; refusing to build")
