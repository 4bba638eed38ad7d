"""The template lifecycle against the lab over HTTPS, as the build token (PackerBuilder role), not root."""

import json
import threading
from datetime import UTC, datetime

import pytest
from proxmoxer.core import ResourceException
from support.templates import (
    ISO,
    NODE,
    create_vm,
    day,
    description,
    exists,
    make_entry,
    make_template,
    race_after,
    volumes_of,
    wait,
)

from packer_assets.pve import templates
from packer_assets.pve.templates import (
    CONFIG_WRITE_TRIES,
    LATEST_TAG,
    REVOKED_TAG,
    TemplateError,
    VmidRangeFull,
    allocate_vmid,
    catalog_entry_json,
    destroy_build_vm,
    finish_template,
    input_fingerprint,
    is_up_to_date,
    list_templates,
    promote,
    promoted_template,
    prune,
    read_description,
    split_tags,
    template_name,
    template_tags,
    withdraw,
)

# ----------------------------------------------------------------------------- names, tags, VMIDs


def test_name_and_tags():
    assert template_name("ubuntu-2204", datetime(2026, 11, 25, 9, 8, 7, tzinfo=UTC)) == "ubuntu-2204-20261125090807"
    with pytest.raises(ValueError, match="naive"):
        template_name("ubuntu-2204", datetime(2026, 11, 25))
    assert template_tags("debian-12", ["packer", "debian"]) == ["debian", "debian-12", "packer", "packer-assets"]
    assert split_tags("packer-assets;Ubuntu-2204, x") == ["packer-assets", "ubuntu-2204", "x"]


def test_allocate_skips_every_used_vmid(api, lab_pve, pve_root, entry):
    from fakepve.lxc import FakeCt

    create_vm(api, 9100)
    lab_pve.cts.append(FakeCt(9101, name="ct9101"))  # a container
    create_vm(pve_root, 9102)
    # 9102 exists but the token may not see it: only /cluster/nextid tells
    pve_root.access.acl.put(path="/vms/9102", roles="NoAccess", tokens="automation@pve!packer")
    assert 9102 not in {g["vmid"] for g in api.cluster.resources.get(type="vm")}
    assert allocate_vmid(api, entry) == 9103
    assert allocate_vmid(api, entry, exclude=[9103]) == 9104


def test_allocate_names_key_and_range_when_full(api, lab_pve):
    small = make_entry(first=9100, last=9102)
    for vmid in (9100, 9101, 9102):
        create_vm(api, vmid)
    with pytest.raises(VmidRangeFull, match=r"ubuntu-2204: no free VMID in its range 9100-9102"):
        allocate_vmid(api, small)


# ----------------------------------------------------------------------------- finishing


def test_finish_ejects_isos_adds_cloudinit_describes_and_converts(api, lab_pve, entry):
    lab_pve.store_file("local", ISO, 4096)
    lab_pve.store_file("local", "drivers.iso", 4096)
    create_vm(api, 9100, name=template_name(entry.key, day(1)), ide2=f"local:iso/{ISO},media=cdrom",
              ide0="local:iso/drivers.iso,media=cdrom", agent=1)
    done = finish_template(api, NODE, 9100, family="ubuntu", vm_storage="local-lvm", description=description(),
                           tags=template_tags(entry.key, entry.tags))
    config = api.nodes(NODE).qemu(9100).config.get()
    assert config["ide2"] == "none,media=cdrom" and config["ide0"] == "none,media=cdrom"
    assert done.ejected == ("ide0", "ide2")
    assert (done.cloudinit, done.cloudinit_added, done.converted) == ("ide3", True, True)
    assert config["ide3"].startswith("local-lvm:vm-9100-cloudinit") and "media=cdrom" in config["ide3"]
    assert int(config["template"]) == 1
    assert split_tags(config["tags"]) == ["packer", "packer-assets", "ubuntu", "ubuntu-2204"]
    assert read_description(config["description"]) == description()
    assert "| Chain ID | `CHAIN-20261125T100000Z-ubuntu-2204` |" in config["description"]
    assert f"iso/{ISO}" in lab_pve.storages["local"]["volumes"]  # ejecting keeps the ISO on the storage


def test_finish_keeps_packers_cloudinit_and_template(api, lab_pve):
    lab_pve.store_file("local", ISO, 4096)
    vm = create_vm(api, 9100, ide2=f"local:iso/{ISO},media=cdrom", ide3="local-lvm:cloudinit")
    wait(api, vm.template.post())
    before = vm.config.get()["ide3"]
    done = finish_template(api, NODE, 9100, family="debian", vm_storage="local-lvm", description=description())
    assert (done.cloudinit, done.cloudinit_added, done.converted) == ("ide3", False, False)
    config = vm.config.get()
    assert config["ide3"] == before and config["ide2"] == "none,media=cdrom"


def test_finish_gives_windows_no_cloudinit(api, lab_pve):
    lab_pve.store_file("local", "win.iso", 4096)
    create_vm(api, 9100, ide2="local:iso/win.iso,media=cdrom", sata0="local:iso/win.iso,media=cdrom")
    done = finish_template(api, NODE, 9100, family="windows", vm_storage="local-lvm",
                           description=description("windows-2022"))
    config = api.nodes(NODE).qemu(9100).config.get()
    assert done.cloudinit is None and not any("cloudinit" in str(v) for v in config.values())
    assert config["sata0"] == "none,media=cdrom" and int(config["template"]) == 1


def test_finish_refuses_a_running_vm(api):
    vm = create_vm(api, 9100)
    wait(api, vm.status.start.post())
    with pytest.raises(TemplateError, match="still running"):
        finish_template(api, NODE, 9100, family="ubuntu", vm_storage="local-lvm", description=description())


def test_read_description_ignores_foreign_text():
    assert read_description(None) is None
    assert read_description("my own notes") is None
    assert read_description("packer-assets: {not json") is None
    text = "a note above\n\n" + description().render() + "\nedited below\n"
    assert read_description(text).input_fingerprint == "f" * 64


# ----------------------------------------------------------------------------- up-to-date rule


def test_fingerprint_is_canonical(entry):
    base = input_fingerprint("sha256:" + "ab" * 32, {"user-data": "1" * 64, "meta-data": "2" * 64}, "3" * 64,
                             catalog_entry_json(entry))
    assert len(base) == 64
    reordered = input_fingerprint("sha256:" + "ab" * 32, {"meta-data": "2" * 64, "user-data": "1" * 64}, "3" * 64,
                                  json.loads(catalog_entry_json(entry)))  # a mapping works too
    assert reordered == base
    assert input_fingerprint("sha256:" + "cd" * 32, {"user-data": "1" * 64, "meta-data": "2" * 64}, "3" * 64,
                             catalog_entry_json(entry)) != base
    assert catalog_entry_json(entry) == catalog_entry_json(entry.model_copy())
    # the hardware changes what is built; the retention count and an ISO mirror do not
    bigger = entry.model_copy(update={"hardware": entry.hardware.model_copy(update={"memory": 4096})})
    assert catalog_entry_json(bigger) != catalog_entry_json(entry)
    assert catalog_entry_json(make_entry(retention=3)) == catalog_entry_json(entry)
    mirrored = entry.model_copy(update={"iso": entry.iso.with_mirror("http://127.0.0.1:8000")})
    assert catalog_entry_json(mirrored) == catalog_entry_json(entry)


def test_a_host_cpu_type_keeps_the_fingerprint_of_builds_before_the_field(entry):
    """Every build before hardware.cpu_type ran on host: its entry JSON had no cpu_type, and a host entry's has
    none either (no rebuild of every template for the new field); another CPU type is another build."""
    assert entry.hardware.cpu_type == "host"
    assert "cpu_type" not in json.loads(catalog_entry_json(entry))["hardware"]
    kvm = entry.model_copy(update={"hardware": entry.hardware.model_copy(update={"cpu_type": "x86-64-v3"})})
    assert json.loads(catalog_entry_json(kvm))["hardware"]["cpu_type"] == "x86-64-v3"
    assert catalog_entry_json(kvm) != catalog_entry_json(entry)


def test_up_to_date_compares_with_the_promoted_template(api, entry):
    assert is_up_to_date(api, entry.key, "a" * 64) == (False, None)
    vm = create_vm(api, 9100, name=template_name(entry.key, day(1)))
    finish_template(api, NODE, 9100, family="ubuntu", vm_storage="local-lvm", description=description(
        fingerprint="a" * 64), tags=template_tags(entry.key))
    assert is_up_to_date(api, entry.key, "a" * 64) == (False, None)  # built, not promoted yet
    promote(api, NODE, entry.key, 9100)
    assert is_up_to_date(api, entry.key, "a" * 64) == (True, 9100)
    assert is_up_to_date(api, entry.key, "b" * 64) == (False, 9100)
    assert promoted_template(api, entry.key).vmid == 9100
    # another key's promoted template says nothing about this one
    assert is_up_to_date(api, "debian-12", "a" * 64) == (False, None)
    vm.config.put(description="edited by hand")
    assert is_up_to_date(api, entry.key, "a" * 64) == (False, 9100)


# ----------------------------------------------------------------------------- failure cleanup


def test_destroy_build_vm_removes_a_running_vm_with_its_disks_and_is_idempotent(api, lab_pve, entry):
    vm = create_vm(api, 9105, efidisk0="local-lvm:1", ide3="local-lvm:cloudinit")
    wait(api, vm.status.start.post())
    assert volumes_of(lab_pve, 9105)
    assert destroy_build_vm(api, NODE, 9105, entry) is True
    assert not exists(lab_pve, 9105) and volumes_of(lab_pve, 9105) == []
    assert destroy_build_vm(api, NODE, 9105, entry) is False


def test_destroy_build_vm_removes_disks_a_failed_create_left_without_a_vm(api, lab_pve, entry):
    # Packer allocates its disks before it creates the VM; here the create never happened
    api.nodes(NODE).storage("local-lvm").content.post(vmid=9106, filename="vm-9106-disk-0", size="1G")
    create_vm(api, 9107)  # a neighbour, untouched
    assert volumes_of(lab_pve, 9106) == ["vm-9106-disk-0"]
    assert destroy_build_vm(api, NODE, 9106, entry) is True
    assert volumes_of(lab_pve, 9106) == [] and not exists(lab_pve, 9106)
    assert exists(lab_pve, 9107) and volumes_of(lab_pve, 9107)
    assert destroy_build_vm(api, NODE, 9106, entry) is False


def test_destroy_build_vm_guards(api, lab_pve, pve_root, entry):
    create_vm(pve_root, 9200)  # outside the range
    with pytest.raises(TemplateError, match=r"refusing to destroy VM 9200: outside the key's range 9100-9109"):
        destroy_build_vm(api, NODE, 9200, entry)
    make_template(api, entry.key, 9100, day(1), promoted=True)
    with pytest.raises(TemplateError, match="it is the promoted template"):
        destroy_build_vm(api, NODE, 9100, entry)
    make_template(api, "debian-12", 9101, day(1))  # another key's VM in this range
    with pytest.raises(TemplateError, match="belongs to another key"):
        destroy_build_vm(api, NODE, 9101, entry)
    assert all(exists(lab_pve, v) for v in (9200, 9100, 9101))
    # an unpromoted template of the key (Packer converted it, then the build failed) goes
    make_template(api, entry.key, 9102, day(2))
    assert destroy_build_vm(api, NODE, 9102, entry) is True


def test_destroy_build_vm_waits_for_a_lock_and_names_it_when_it_stays(api, lab_pve, entry):
    create_vm(api, 9100)
    lab_pve.snapshot_lock(9100, "clone")
    with pytest.raises(TemplateError, match=r"locked \(clone\).*qm unlock 9100"):
        destroy_build_vm(api, NODE, 9100, entry, timeout=0.5)
    assert exists(lab_pve, 9100)
    timer = threading.Timer(0.3, lab_pve.unlock, args=(9100,))
    timer.start()
    assert destroy_build_vm(api, NODE, 9100, entry, timeout=120) is True  # bounds a failure only
    timer.join()


# ----------------------------------------------------------------------------- promotion and retention


def test_promote_moves_the_tag(api, lab_pve, entry):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2))
    result = promote(api, NODE, entry.key, 9101)
    assert result.previous == (9100,)
    assert LATEST_TAG in split_tags(api.nodes(NODE).qemu(9101).config.get()["tags"])
    assert LATEST_TAG not in split_tags(api.nodes(NODE).qemu(9100).config.get()["tags"])
    assert promoted_template(api, entry.key).vmid == 9101
    assert promote(api, NODE, entry.key, 9101).previous == ()  # again: nothing moves


def test_promote_refuses_what_is_not_a_template_of_the_key(api, entry):
    create_vm(api, 9100, name=template_name(entry.key, day(1)), tags="packer-assets;ubuntu-2204")  # not a template
    make_template(api, "debian-12", 9101, day(1))
    make_template(api, entry.key, 9102, day(1), tags=["ubuntu-2204"])  # without the tool's tag
    for vmid in (9100, 9101, 9102, 9999):
        with pytest.raises(TemplateError, match=f"refusing to promote VM {vmid}"):
            promote(api, NODE, entry.key, vmid)


def test_a_promotion_cut_short_still_has_one_latest(api, entry):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2), promoted=True)  # tagged, the old one not yet untagged
    assert promoted_template(api, entry.key).vmid == 9101


# A tag change is a compare-and-set on the config it read: a writer in between makes it read again.
CHANNEL = "packer-assets-channel-production"


def tags_of(api, vmid):
    return set(split_tags(api.nodes(NODE).qemu(vmid).config.get().get("tags")))


def add_tags(api, vmid, *more):
    """A plain write as a person or an older tool makes it: no digest, whatever changed meanwhile."""
    api.nodes(NODE).qemu(vmid).config.put(tags=";".join(sorted(tags_of(api, vmid) | set(more))))


def latest_of(api, *vmids):
    return [vmid for vmid in vmids if LATEST_TAG in tags_of(api, vmid)]


def test_a_channel_set_between_promotes_read_and_write_is_kept_and_latest_moves(api, entry, monkeypatch):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2))
    raced = race_after(monkeypatch, 9100, lambda: add_tags(api, 9100, CHANNEL))
    assert promote(api, NODE, entry.key, 9101).previous == (9100,)
    assert raced and latest_of(api, 9100, 9101) == [9101]
    assert CHANNEL in tags_of(api, 9100)  # the racer's channel tag is not lost


def test_a_latest_put_back_by_a_racer_after_promotes_write_is_taken_again(api, entry, monkeypatch):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2))
    raced = race_after(monkeypatch, 9100, lambda: add_tags(api, 9100, LATEST_TAG), method="put")
    promote(api, NODE, entry.key, 9101)
    assert raced and latest_of(api, 9100, 9101) == [9101]  # exactly one promoted template


def test_promote_refuses_a_template_revoked_after_it_was_listed(api, entry, monkeypatch):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2))
    race_after(monkeypatch, 9101, lambda: add_tags(api, 9101, REVOKED_TAG))
    with pytest.raises(TemplateError, match="refusing to promote VM 9101: it is revoked"):
        promote(api, NODE, entry.key, 9101)
    assert latest_of(api, 9100, 9101) == [9100]


def test_a_tag_change_that_loses_every_race_fails_in_one_line(api, entry, monkeypatch):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2))
    vm = api.nodes(NODE).qemu(9101)
    raced = race_after(monkeypatch, 9101, lambda: vm.config.put(description=f"edit {len(raced)}"), times=99)
    with pytest.raises(TemplateError, match="changed by someone else") as caught:
        promote(api, NODE, entry.key, 9101)
    assert "\n" not in str(caught.value) and len(raced) == CONFIG_WRITE_TRIES
    assert latest_of(api, 9100, 9101) == [9100]  # nothing written


def test_finish_ejects_an_iso_attached_between_its_read_and_write(api, lab_pve, entry, monkeypatch):
    lab_pve.store_file("local", ISO, 4096)
    lab_pve.store_file("local", "drivers.iso", 4096)
    vm = create_vm(api, 9100, name=template_name(entry.key, day(1)), ide2=f"local:iso/{ISO},media=cdrom")
    race_after(monkeypatch, 9100, lambda: vm.config.put(ide0="local:iso/drivers.iso,media=cdrom"))
    done = finish_template(api, NODE, 9100, family="ubuntu", vm_storage="local-lvm", description=description())
    config = vm.config.get()
    assert done.ejected == ("ide0", "ide2") and config["ide0"] == config["ide2"] == "none,media=cdrom"
    assert int(config["template"]) == 1


# A template that fails after its smoke test is withdrawn: the promotion taken back, the template destroyed.


def test_a_promotion_cut_short_by_an_api_error_is_withdrawn(api, entry, monkeypatch):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2))
    before = promoted_template(api, entry.key)
    broken = ResourceException(500, "Internal Server Error", "injected")

    def untag_fails(*args, **kwargs):  # the API error, after the new template was tagged
        raise broken

    monkeypatch.setattr(templates, "take_tag", untag_fails)
    with pytest.raises(TemplateError, match="promoting VM 9101: HTTP 500 Internal Server Error: injected"):
        promote(api, NODE, entry.key, 9101)
    assert latest_of(api, 9100, 9101) == [9100, 9101]  # the new one was tagged, the old one not yet untagged
    assert withdraw(api, NODE, entry, 9101, before) == (True, "VM 9101 destroyed; 9100 is the promoted template again")
    assert [g.vmid for g in list_templates(api, entry.key)] == [9100] and latest_of(api, 9100) == [9100]


def test_a_completed_promotion_is_given_back_before_the_new_template_goes(api, entry):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2))
    before = promoted_template(api, entry.key)
    promote(api, NODE, entry.key, 9101)  # then, say, prune failed
    assert withdraw(api, NODE, entry, 9101, before)[0] is True
    assert [g.vmid for g in list_templates(api, entry.key)] == [9100] and latest_of(api, 9100) == [9100]


def test_a_first_template_that_fails_after_its_smoke_test_leaves_nothing(api, entry):
    make_template(api, entry.key, 9101, day(2))
    promote(api, NODE, entry.key, 9101)
    assert withdraw(api, NODE, entry, 9101, None) == (True, "VM 9101 destroyed")
    assert list_templates(api, entry.key) == []


def test_withdraw_keeps_the_new_template_when_the_previous_cannot_be_promoted_again(api, entry):
    make_template(api, entry.key, 9100, day(1), promoted=True)
    make_template(api, entry.key, 9101, day(2))
    before = promoted_template(api, entry.key)
    promote(api, NODE, entry.key, 9101)
    add_tags(api, 9100, REVOKED_TAG)  # revoked meanwhile: the key must not be left without a promoted template
    destroyed, said = withdraw(api, NODE, entry, 9101, before)
    assert not destroyed and said.startswith("VM 9101 stays the promoted template: 9100 could not be promoted again")
    assert latest_of(api, 9100, 9101) == [9101]


def test_prune_keeps_retention_newest_and_the_promoted_and_never_touches_foreign_vms(api, lab_pve, pve_root, entry):
    # VMIDs are reused lowest-first: age comes from the name, not the VMID
    make_template(api, entry.key, 9104, day(1))
    make_template(api, entry.key, 9103, day(2))
    make_template(api, entry.key, 9102, day(3))
    make_template(api, entry.key, 9100, day(4), promoted=True)
    make_template(api, entry.key, 9101, day(5))  # newer than the promoted one: not yet proven, left alone
    make_template(api, "debian-12", 9105, day(1))  # another key's template in this range
    create_vm(pve_root, 9106, name=template_name(entry.key, day(1)))  # untagged, our name
    wait(pve_root, pve_root.nodes(NODE).qemu(9106).template.post())
    make_template(api, entry.key, 9107, day(1), tags=["ubuntu-2204", "packer"])  # without the tool's tag

    assert prune(api, NODE, entry.key, 2, keep={9103}).destroyed == (9104,)  # 9103 asked to be kept
    assert prune(api, NODE, entry.key, 2).destroyed == (9103,)
    assert prune(api, NODE, entry.key, 2).destroyed == ()
    survivors = {v for v in range(9100, 9110) if exists(lab_pve, v)}
    assert survivors == {9100, 9101, 9102, 9105, 9106, 9107}
    assert [g.vmid for g in list_templates(api, entry.key)] == [9101, 9100, 9102]


def test_prune_without_a_promoted_template_destroys_nothing(api, lab_pve, entry):
    for n, vmid in enumerate((9100, 9101, 9102), 1):
        make_template(api, entry.key, vmid, day(n))
    assert prune(api, NODE, entry.key, 1).destroyed == ()
    assert all(exists(lab_pve, v) for v in (9100, 9101, 9102))
    with pytest.raises(ValueError, match="retention must be at least 1"):
        prune(api, NODE, entry.key, 0)


def test_three_builds_with_retention_two_leave_the_two_newest(api, lab_pve, entry):
    """The issue's rule, through the whole lifecycle: allocate, finish, promote, prune."""
    for n in (1, 2, 3):
        vmid = allocate_vmid(api, entry)
        create_vm(api, vmid, name=template_name(entry.key, day(n)), agent=1)
        finish_template(api, NODE, vmid, family="ubuntu", vm_storage="local-lvm",
                        description=description(fingerprint=str(n) * 64), tags=template_tags(entry.key, entry.tags))
        promote(api, NODE, entry.key, vmid)
        prune(api, NODE, entry.key, entry.retention)
    names = [g.name for g in list_templates(api, entry.key)]
    assert names == [template_name(entry.key, day(3)), template_name(entry.key, day(2))]
    assert promoted_template(api, entry.key).name == template_name(entry.key, day(3))
    assert is_up_to_date(api, entry.key, "3" * 64)[0]


def test_destroy_waits_for_a_slow_stop_task(api, lab_pve, entry):
    vm = create_vm(api, 9105)
    wait(api, vm.status.start.post())
    lab_pve.time_scale = 0.01  # tasks end after the request returned, as on a real node
    lab_pve.vm(9105).stop_secs = 50  # half a second: the destroy must wait for the stop task
    assert destroy_build_vm(api, NODE, 9105, entry) is True
    assert not exists(lab_pve, 9105)


def test_prune_reports_a_template_pve_will_not_destroy_and_prunes_the_rest(api, lab_pve, entry):
    for n, vmid in enumerate((9100, 9101, 9102, 9103), 1):
        make_template(api, entry.key, vmid, day(n), promoted=vmid == 9103)
    lab_pve.fail("DELETE", "/qemu/9101", 500, "base volume 'local-lvm:base-9101-disk-0' is still in use by linked "
                                              "clone")
    result = prune(api, NODE, entry.key, 1)
    assert result.destroyed == (9100, 9102)
    assert list(result.failed) == [9101] and "linked clone" in result.failed[9101]
    assert exists(lab_pve, 9101) and exists(lab_pve, 9103)
