"""The template tests' fixtures (`access`: the build token make init leaves, `api`, `entry`) and helpers that
shape VMs as Packer and finish_template leave them; used by tests/pve (templates, smoke)."""

from datetime import UTC, datetime

import pytest
from proxmoxer.core import ProxmoxResource

from packer_assets.catalog import TemplateEntry
from packer_assets.evidence.chain import new_chain_id
from packer_assets.config.envfile import read_env_file
from packer_assets.evidence.layout import Layout
from packer_assets.pve.bootstrap import BootstrapConfig, build_access
from packer_assets.pve.client import Endpoint
from packer_assets.pve.init_env import AdminLogin, run_init
from packer_assets.pve.templates import (
    LATEST_TAG,
    TemplateDescription,
    template_name,
    template_tags,
)

NODE = "pve1"
ISO = "ubuntu-22.04.5-live-server-amd64.0123456789ab.iso"


def make_entry(key="ubuntu-2204", family="ubuntu", first=9100, last=9109, retention=2):
    windows = family == "windows"
    return TemplateEntry.model_validate({
        "key": key, "family": family, "tags": ["packer", family],
        "iso": {"url": f"https://example.org/{ISO}", "checksum": "sha256:" + "ab" * 32},
        "hardware": {"cores": 2, "memory": 2048, "disk": "32G", "bios": "seabios",
                     "os_type": "win11" if windows else "l26"},
        "vmid_range": {"first": first, "last": last}, "packer_dir": f"templates/{family}",
        "install_user": {"name": "packer", "password_env": "PACKER_INSTALL_PASSWORD"}, "retention": retention})


@pytest.fixture
def access(lab_pve, lab_pki, tmp_path):
    """The build access `make init` leaves behind: the PackerBuilder token, from the env file."""
    layout = Layout(tmp_path / "project")
    run_init(layout, Endpoint(lab_pve.url, ca_file=str(lab_pki.ca_file)),
             AdminLogin("root@pam", lab_pve.root_password), BootstrapConfig(), new_chain_id("init"))
    return build_access(read_env_file(layout.env_file), str(layout.env_file))


@pytest.fixture
def api(access):
    return access.connect()


@pytest.fixture
def entry():
    return make_entry()


def wait(api, upid):
    status = api.nodes(NODE).tasks(upid).status.get()
    assert status["exitstatus"] == "OK", status
    return status


def create_vm(api, vmid, **config):
    """A VM shaped like one Packer leaves: a disk, a NIC, the install ISO in ide2."""
    config.setdefault("name", f"vm{vmid}")
    config.setdefault("scsi0", "local-lvm:1")
    config.setdefault("net0", "virtio,bridge=vmbr0")
    wait(api, api.nodes(NODE).qemu.post(vmid=vmid, **config))
    return api.nodes(NODE).qemu(vmid)


def make_template(api, key, vmid, when, *, tags=None, promoted=False):
    """A template of key as finish_template leaves it (optionally promoted), named for `when`."""
    tags = list(tags if tags is not None else template_tags(key)) + ([LATEST_TAG] if promoted else [])
    vm = create_vm(api, vmid, name=template_name(key, when), tags=";".join(tags))
    wait(api, vm.template.post())
    return vm


def description(key="ubuntu-2204", fingerprint="f" * 64):
    return TemplateDescription(chain_id=f"CHAIN-20261125T100000Z-{key}", key=key,
                               iso_url=f"https://example.org/{ISO}", iso_checksum="sha256:" + "ab" * 32,
                               iso_volid=f"local:iso/{ISO}", input_fingerprint=fingerprint,
                               built_at=datetime(2026, 11, 25, 10, 5, tzinfo=UTC), tool_version="0.1.0",
                               packer_version="1.6.6")


def exists(lab_pve, vmid):
    return lab_pve.vm(vmid) is not None


def volumes_of(lab_pve, vmid):
    return [name for name, vol in lab_pve.storages["local-lvm"].get("volumes", {}).items() if vol.get("vmid") == vmid]


def day(n):
    return datetime(2026, 11, n, 12, 0, 0, tzinfo=UTC)


def race_after(monkeypatch, vmid, racer, method="get", times=1):
    """Another writer between a read and the write built on it, at a named point: right after a `method`
    (get/put) of VM vmid's config has been answered and before the caller sees the answer, racer() runs
    (the first `times` times). Returns the list of answers the racer followed (its length: how often it ran)."""
    real, ran = getattr(ProxmoxResource, method), []

    def raced(resource, *args, **params):
        answer = real(resource, *args, **params)
        if len(ran) < times and repr(resource).endswith(f"/qemu/{vmid}/config)"):
            ran.append(answer)  # before racer(): its own calls pass through here too
            racer()
        return answer

    monkeypatch.setattr(ProxmoxResource, method, raced)
    return ran
