"""Every file of the repository that its text names by path exists: a moved test or module leaves no stale
pointer behind (`tests/test_deploy_config.py` in deploy/'s comments after the tests moved into tests/e2e/).

Read: every file git tracks (or would track: new files count), text only. Checked: each path of a file under one
of the repository's folders (`tests/e2e/test_readme.py`, `packer_assets/render/answer_iso.py`), and, in the
README, docs/, deploy/ and templates/, each bare test module name (`test_catalog.py`) must be a file under tests/.
Not checked: what the project writes when it runs (docs/proof/, gitignored), paths relative to a package
(`pve/smoke.py`), and bench/README.md, a log that names files as they were at each measurement."""

import re
import subprocess
from pathlib import PurePosixPath

import pytest
from support import REPO

FOLDERS = ("packer_assets", "lab", "tests", "bench", "tools", "deploy", "templates", "docs")
PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(FOLDERS)})/[\w./-]*?\.(?:py|sh|hcl|yaml|json|md))(?![\w/-])")
TEST_MODULE = re.compile(r"(?<![\w./-])(test_\w+\.py)(?![\w/-])")
GENERATED = ("docs/proof/",)
LOGS = ("bench/README.md",)
THIS = "tests/core/test_docs_paths.py"  # its examples name no files on purpose
PROSE = ("README.md", "docs/", "deploy/", "templates/")
TEXT = (".py", ".md", ".yaml", ".yml", ".hcl", ".sh", ".j2", ".cfg", ".toml", ".txt", "")


def named_files() -> list[str]:
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs git and a checkout (the files are those git tracks)")
    return [name for name in listed
            if name not in LOGS and name != THIS and PurePosixPath(name).suffix in TEXT and (REPO / name).is_file()]


def stale_paths(name: str, text: str, test_modules: set[str]) -> list[str]:
    """`file:line path` for each path in text naming no file of the repository."""
    found = [(m.start(), m.group(1)) for m in PATH.finditer(text)
             if not m.group(1).startswith(GENERATED) and not (REPO / m.group(1)).exists()]
    if name.startswith(PROSE):
        found += [(m.start(), m.group(1)) for m in TEST_MODULE.finditer(text) if m.group(1) not in test_modules]
    return [f"{name}:{text.count(chr(10), 0, at) + 1} {path}" for at, path in sorted(found)]


def test_every_path_the_repository_names_exists():
    test_modules = {p.name for p in (REPO / "tests").rglob("test_*.py")}
    stale = []
    for name in named_files():
        try:
            text = (REPO / name).read_text()
        except UnicodeDecodeError:
            continue
        stale += stale_paths(name, text, test_modules)
    assert stale == [], "paths naming no file (moved or renamed? name where it is now):\n" + "\n".join(stale)


def test_the_reading_finds_full_paths_and_bare_test_names():
    text = ("see tests/conftest.py and tests/test_gone.py;\n"
            "(`tests/support/__init__.py`) docs/proof/x/registry.json, test_catalog.py test_nowhere.py\n")
    modules = {"test_catalog.py"}
    assert stale_paths("docs/x.md", text, modules) == ["docs/x.md:1 tests/test_gone.py", "docs/x.md:2 test_nowhere.py"]
    # outside the prose a bare test module name may be a file a test writes
    assert stale_paths("tests/core/test_x.py", text, modules) == ["tests/core/test_x.py:1 tests/test_gone.py"]
