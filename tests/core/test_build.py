"""build.py's own bookkeeping, without a node: work-directory retention."""

from support import REPO

from packer_assets.build import RECORD, prune_work_dirs
from packer_assets.catalog import load_catalog
from packer_assets.evidence import Layout


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
