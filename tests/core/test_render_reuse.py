"""A no-op run re-renders nothing: unattended_files reuses the last render that passed packer validate
while its inputs and files are unchanged, and renders (and validates) anew when anything changed."""

import shutil

import pytest
from support import REPO

from packer_assets.build import BuildSettings, CachedRender, render_and_validate
from packer_assets.catalog import load_catalog
from packer_assets.evidence import Layout
from packer_assets.render import engine

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

    monkeypatch.setattr("packer_assets.build.render_unattended", counting)
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
