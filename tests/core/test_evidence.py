import os
import stat

import pytest

from packer_assets.evidence.layout import Layout, atomic_write, latest, swap_latest


def test_layout_paths_match_the_toolkit(tmp_path):
    layout = Layout(tmp_path)
    assert layout.env_file == tmp_path / "infra/env/.env.proxmox"
    assert layout.secrets_file == tmp_path / "control/secrets.env"
    assert layout.init_log_dir("T") == tmp_path / "output/logs/packer/init/T"
    assert layout.build_log_dir("debian-12", "T") == tmp_path / "output/logs/packer/builds/debian-12/T"
    assert layout.init_proof_dir("T") == tmp_path / "docs/proof/platform/packer-builds/init/T"
    assert layout.build_proof_dir("rocky-9", "T") == tmp_path / "docs/proof/platform/packer-builds/builds/rocky-9/T"


def test_atomic_write_sets_mode_and_leaves_no_temp(tmp_path):
    target = atomic_write(tmp_path / "a/b/secret.env", "x=1\n", mode=0o600)
    assert target.read_text() == "x=1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["secret.env"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = atomic_write(tmp_path / "f", "old")

    def boom(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_latest_link_swaps_to_the_newest_folder(tmp_path):
    first, second = tmp_path / "20260101T000000Z", tmp_path / "20260102T000000Z"
    first.mkdir()
    second.mkdir()
    link = swap_latest(first)
    assert os.readlink(link) == first.name  # relative, so the tree can move
    swap_latest(second)
    assert latest(tmp_path) == second.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, second.name, "latest"]


def test_latest_refuses_a_missing_target(tmp_path):
    with pytest.raises(FileNotFoundError):
        swap_latest(tmp_path / "nope")
    assert latest(tmp_path) is None
