"""The layer rules of docs/architecture.md, enforced: the core never imports dagster, defs/ or lab/;
defs/ never imports lab/. Read from the source (imports inside functions count too)."""

import ast
from pathlib import Path

from support import REPO

PACKAGE = REPO / "packer_assets"
SHELL = {"defs", "definitions.py"}  # the Dagster shell
LAB = {"lab"}
ENTRY = {"cli.py"}  # the command line may start the lab


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Absolute module names imported by the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(("packer_assets", *path.relative_to(root).parent.parts))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def part(path: Path, root: Path) -> str:
    top = path.relative_to(root).parts[0]
    return "shell" if top in SHELL else "lab" if top in LAB else "entry" if top in ENTRY else "core"


def violations(root: Path) -> list[str]:
    broken = []
    for path in sorted(root.rglob("*.py")):
        where = part(path, root)
        for module in imports_of(path, root):
            to_dagster = module == "dagster" or module.startswith(("dagster.", "dagster_"))
            to_shell = module.startswith(("packer_assets.defs", "packer_assets.definitions"))
            to_lab = module.startswith("packer_assets_lab")
            if where == "core" and (to_dagster or to_shell or to_lab):
                broken.append(f"{path.relative_to(root)} (core) imports {module}")
            if where == "shell" and to_lab:
                broken.append(f"{path.relative_to(root)} (Dagster shell) imports {module}")
            if where == "lab" and to_shell:
                broken.append(f"{path.relative_to(root)} (lab) imports {module}")
    return broken


def test_the_core_never_imports_dagster_the_shell_or_the_lab():
    assert violations(PACKAGE) == []


def test_a_breach_written_either_way_is_caught(tmp_path):
    root = tmp_path / "packer_assets"
    (root / "pve").mkdir(parents=True)
    (root / "pve" / "bad.py").write_text("import dagster as dg\n\ndef f():\n    from ..defs import assets\n")
    (root / "defs").mkdir()
    (root / "defs" / "bad.py").write_text("from packer_assets_lab.stack import LabStack\n")
    found = violations(root)
    assert "pve/bad.py (core) imports dagster" in found
    assert "pve/bad.py (core) imports packer_assets.defs" in found
    assert "defs/bad.py (Dagster shell) imports packer_assets_lab.stack" in found
