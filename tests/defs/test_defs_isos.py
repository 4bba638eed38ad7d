"""unattended_files, staged_iso and iso_checksum_sensor through Dagster, against the in-process lab."""

import os

import dagster as dg
import pytest

from packer_assets.catalog import load_catalog
from packer_assets.defs import assets, sensors
from packer_assets.defs.resources import PackerSettings, ProjectSettings

ISO_ASSETS = [assets.iso_release, assets.unattended_files, assets.staged_iso]


def materialize(lab_project, instance, selection, key):
    return dg.materialize(ISO_ASSETS, selection=selection, partition_key=key, instance=instance,
                          resources={"project": ProjectSettings(output_root=str(lab_project.root)),
                                     "packer": PackerSettings(allow_degraded=True)}, raise_on_error=False)


def iso_volumes(pve):
    return sorted(v for v in pve.storages["local"].get("volumes", {}) if v.startswith("iso/"))


def test_unattended_files_data_version_is_the_content_hash(lab_project):
    with dg.instance_for_test() as instance:
        first = materialize(lab_project, instance, [assets.unattended_files], "ubuntu-2204")
        second = materialize(lab_project, instance, [assets.unattended_files], "ubuntu-2204")
        assert first.success and second.success
        versions = [r.asset_materializations_for_node("unattended_files")[0].tags[sensors.DATA_VERSION_TAG]
                    for r in (first, second)]
        assert versions[0] == versions[1]
        assert (lab_project.layout.rendered_dir("ubuntu-2204") / "user-data").exists()
        checks = [e.asset_check_evaluation_data for e in first.all_events
                  if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert [(c.check_name, c.passed) for c in checks] == [("packer_validate", True)]


def test_packer_validate_check_fails_on_a_broken_template(lab_project, tmp_path, monkeypatch):
    import shutil

    repo = lab_project.stack.catalog.project_dir
    copy = tmp_path / "repo"
    shutil.copytree(repo / "templates", copy / "templates")
    hcl = copy / "templates/rocky/rocky.pkr.hcl"
    hcl.write_text(hcl.read_text().replace("cloud_init_storage_pool", "cloud_init_storage_pol"))
    monkeypatch.chdir(copy)  # the catalog's packer_dir resolves here now
    monkeypatch.setenv("PACKER_ASSETS_CATALOG", str(lab_project.stack.catalog_path))
    with dg.instance_for_test() as instance:
        result = materialize(lab_project, instance, [assets.unattended_files], "rocky-9")
    checks = [e.asset_check_evaluation_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert [(c.check_name, c.passed) for c in checks] == [("packer_validate", False)]
    assert "cloud_init_storage_pol" in checks[0].description


def test_staged_iso_downloads_once_and_reports_metadata(lab_project):
    pve, mirror = lab_project.pve, lab_project.mirror
    with dg.instance_for_test() as instance:
        first = materialize(lab_project, instance, [assets.staged_iso], "debian-12")
        assert first.success
        meta = first.asset_materializations_for_node("staged_iso")[0].metadata
        assert meta["checksum"].value == mirror.sha256("debian-12")
        assert meta["bytes_through_control_host"].value == 0
        assert meta["volid"].value in [f"local:{v}" for v in iso_volumes(pve)]
        downloads = len(pve.downloads)
        second = materialize(lab_project, instance, [assets.staged_iso], "debian-12")
        assert second.success and len(pve.downloads) == downloads
        assert second.asset_materializations_for_node("staged_iso")[0].metadata["downloaded"].value is False


def test_corrupted_mirror_image_fails_and_leaves_no_volume(lab_project):
    lab_project.mirror.corrupt("rocky-9")
    before = iso_volumes(lab_project.pve)
    with dg.instance_for_test() as instance:
        result = materialize(lab_project, instance, [assets.staged_iso], "rocky-9")
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "checksum mismatch" in str(failure.event_specific_data.error)
    assert iso_volumes(lab_project.pve) == before


def tick(instance, cursor=None):
    project = ProjectSettings(output_root=os.environ["PACKER_ASSETS_ROOT"])  # lab_project's output root
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"project": project})
    return sensors.build_iso_checksum_sensor(3600)(context)


def test_sensor_first_tick_publish_and_unchanged(lab_project):
    mirror = lab_project.mirror
    keys = lab_project.stack.catalog.keys()
    with dg.instance_for_test() as instance:
        # ubuntu-2204 counts as built (a template materialization exists for it)
        instance.report_runless_asset_event(dg.AssetMaterialization("template", partition="ubuntu-2204"))
        first = tick(instance)
        # first sight: every key observed; only keys never built are requested
        assert sorted(o.partition for o in first.asset_events) == sorted(keys)
        assert sorted(r.partition_key for r in first.run_requests) == sorted(k for k in keys if k != "ubuntu-2204")
        mirror.hits.clear()
        unchanged = tick(instance, first.cursor)
        assert unchanged.run_requests == [] and unchanged.asset_events == []
        assert {status for (path, status) in mirror.hits} == {304}
        new = mirror.publish("ubuntu-2204")
        changed = tick(instance, unchanged.cursor)
        assert [(r.partition_key, r.run_key) for r in changed.run_requests] == [("ubuntu-2204",
                                                                                 f"ubuntu-2204:sha256:{new}")]
        assert [(o.partition, o.tags[sensors.DATA_VERSION_TAG]) for o in changed.asset_events] == [
            ("ubuntu-2204", f"sha256:{new}")]


def test_sensor_keeps_going_when_one_source_fails(lab_project, monkeypatch):
    with dg.instance_for_test() as instance:
        first = tick(instance)
        monkeypatch.setenv("PACKER_ASSETS_ISO_MIRROR", lab_project.mirror.base_url + "/nowhere")
        broken = tick(instance, first.cursor)
        assert broken.run_requests == []
        assert broken.cursor == first.cursor  # failed keys keep their state


@pytest.mark.parametrize("key", ["windows-2022"])
def test_extra_iso_change_rebuilds_its_key(lab_project, key):
    """A new virtio-win: every key that names that ISO (windows-2022 and windows-2025 name the same URL; the lab
    mirror serves it once, as the first key's item) is rebuilt, each under its own run key."""
    with dg.instance_for_test() as instance:
        first = tick(instance)
        lab_project.mirror.publish(f"{key}--virtio-win")
        changed = tick(instance, first.cursor)
        assert sorted(r.partition_key for r in changed.run_requests) == ["windows-2022", "windows-2025"]
        assert all(";virtio-win=sha256:" in r.run_key for r in changed.run_requests)


def test_sensor_ticks_without_requests_say_what_they_found(lab_project, monkeypatch):
    """A tick that requests nothing says why (the UI shows the skip reason, not "returned an empty result")."""
    keys = lab_project.stack.catalog.keys()
    sources = len(sensors.iso_sources(lab_project.stack.catalog))
    with dg.instance_for_test() as instance:
        for key in keys:  # every key was built: the baseline requests nothing
            instance.report_runless_asset_event(dg.AssetMaterialization("template", partition=key))
        first = tick(instance)
        assert first.run_requests == [] and len(first.asset_events) == len(keys)
        assert first.skip_reason.skip_message == (
            f"{sources} ISO source(s) polled: baseline of {sources} source(s); every key seen for the first time "
            "was built before: nothing to rebuild")
        unchanged = tick(instance, first.cursor)
        as_loaded = load_catalog()  # with the lab's settings: a pinned ISO reads the mirror's SHA256SUMS too
        fetched = len({iso.effective_checksum_url for _k, iso in sensors.iso_sources(as_loaded).values()
                       if iso.effective_checksum_url})
        assert unchanged.skip_reason.skip_message == (
            f"{sources} ISO source(s) polled: {sources} unchanged ({fetched} checksum file(s) answered 304); "
            "nothing to rebuild")
        monkeypatch.setenv("PACKER_ASSETS_ISO_MIRROR", lab_project.mirror.base_url + "/nowhere")
        broken = tick(instance, unchanged.cursor).skip_reason.skip_message
        assert " failed (debian-12: " in broken and broken.endswith("; nothing to rebuild"), broken


def test_iso_release_names_each_key_s_sources_before_any_tick():
    """Static metadata, from the catalog: the UI shows it before the sensor ever ran."""
    from packer_assets.catalog import load_catalog

    table = assets.iso_release.metadata["sources"].value
    for entry in load_catalog():
        assert f"| `{entry.key}` | [{entry.iso.filename}]({entry.iso.url}) |" in table
        source = entry.iso.checksum or f"]({entry.iso.checksum_url})"
        assert source in table.split(f"| `{entry.key}` |", 1)[1].splitlines()[0]
    assert "| `windows-2022` (virtio-win) |" in table
