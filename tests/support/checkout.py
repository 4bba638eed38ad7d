"""A copy of the checkout as a clone of the next commit would hold it (the standalone and README tests)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support import REPO


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=True)


def export_repository(dest: Path) -> Path:
    """What a clone of this commit would hold: the tracked files plus new ones not yet committed (so a
    developer's run tests the change at hand, as `git archive` of the commit will in CI)."""
    try:
        names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to export")
    for raw in filter(None, names):
        src = REPO / os.fsdecode(raw)
        if src.is_file():  # a deleted-but-still-tracked file is not in the next commit
            target = dest / os.fsdecode(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest
