"""The Windows answer ISO: readable by pycdlib, long names kept (Joliet), identical bytes for identical files."""

import hashlib
import time

import pycdlib
import pytest

from packer_assets.render.answer_iso import (
    AnswerIsoError,
    build_answer_iso,
    iso_bytes,
    read_iso,
)

FILES = {"Autounattend.xml": b"<unattend/>\n", "firstlogon.ps1": b"Write-Output hi\r\n", "empty.txt": b""}


def test_the_iso_opens_with_pycdlib_and_holds_the_files(tmp_path):
    path, sha = build_answer_iso(FILES, tmp_path / "a" / "answer.iso")
    assert path.stat().st_mode & 0o777 == 0o600
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    volume, files = read_iso(path)
    assert volume == "AUTOUNATTEND" and files == FILES
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.has_joliet()
        names = sorted(c.file_identifier().decode("utf-16-be") for c in iso.list_children(joliet_path="/")
                       if not (c.is_dot() or c.is_dotdot()))
        assert names == sorted(FILES)  # mixed case and long names kept
    finally:
        iso.close()


def test_identical_files_give_identical_bytes_across_time_and_time_zones(monkeypatch):
    first = iso_bytes(FILES)
    time.sleep(1.1)  # pycdlib would stamp a new second into every date
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert iso_bytes(dict(reversed(FILES.items()))) == first
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert iso_bytes({**FILES, "firstlogon.ps1": b"changed"}) != first
    assert time.time() > 1_000_000_000  # the pinned clock is put back


@pytest.mark.parametrize("files", [{}, {"dir/file.xml": b"x"}, {"a.xml": b"1", "A.XML": b"2"}, {"x" * 65: b""}])
def test_unusable_names_are_refused(files):
    with pytest.raises(AnswerIsoError):
        iso_bytes(files)
