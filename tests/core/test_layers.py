"""The layer rules of docs/architecture.md, enforced: the core never imports dagster or defs/; the product
(packer_assets, cli.py included) never imports the lab distribution (lab/: packer_assets_lab, fakepve); the lab
never imports the Dagster shell. Read from the source (imports inside functions count too), then checked where
it matters: the product's wheel holds no lab and no fakepve, and its definitions load where neither imports."""

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import REPO
from support.checkout import export_repository

PACKAGE = REPO / "packer_assets"
LAB_PACKAGE = REPO / "lab" / "packer_assets_lab"
SHELL = {"defs", "definitions.py"}  # the Dagster shell
ENTRY = Path("cli.py")  # the command line may run Dagster (`chain`, `build`)
LAB_MODULES = ("packer_assets_lab", "fakepve", "packer_assets.lab")  # the lab distribution, its AGPL dependency, its old home


def imports_of(path: Path, root: Path) -> set[str]:
    """Absolute module names imported by the file (relative imports resolved; root is the package's folder)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join((root.name, *path.relative_to(root).parent.parts))
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


def _is(module: str, *names: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in names)


def violations(root: Path) -> list[str]:
    """The product's breaches: the core importing dagster or the shell; any part importing the lab."""
    broken = []
    for path in sorted(root.rglob("*.py")):
        where = "shell" if path.relative_to(root).parts[0] in SHELL else "core"
        for module in imports_of(path, root):
            to_dagster = module == "dagster" or module.startswith(("dagster.", "dagster_"))
            to_shell = _is(module, "packer_assets.defs", "packer_assets.definitions")
            if where == "core" and (to_dagster or to_shell) and path.relative_to(root) != ENTRY:
                broken.append(f"{path.relative_to(root)} (core) imports {module}")
            if _is(module, *LAB_MODULES):
                broken.append(f"{path.relative_to(root)} ({where}) imports {module}")
    return broken


def lab_violations(root: Path) -> list[str]:
    return [f"{path.relative_to(root)} (lab) imports {module}" for path in sorted(root.rglob("*.py"))
            for module in sorted(imports_of(path, root))
            if _is(module, "packer_assets.defs", "packer_assets.definitions", "packer_assets.lab")]


def test_the_core_never_imports_dagster_or_the_shell_and_the_product_never_the_lab():
    assert violations(PACKAGE) == []


def test_the_lab_never_imports_the_dagster_shell():
    assert LAB_PACKAGE.is_dir()
    assert lab_violations(LAB_PACKAGE) == []


def test_a_breach_written_either_way_is_caught(tmp_path):
    root = tmp_path / "packer_assets"
    (root / "pve").mkdir(parents=True)
    (root / "pve" / "bad.py").write_text("import dagster as dg\n\ndef f():\n    from ..defs import assets\n")
    (root / "defs").mkdir()
    (root / "defs" / "bad.py").write_text("from packer_assets_lab.stack import LabStack\n")
    (root / "cli.py").write_text("def f():\n    import fakepve\n")
    found = violations(root)
    assert "pve/bad.py (core) imports dagster" in found
    assert "pve/bad.py (core) imports packer_assets.defs" in found
    assert "defs/bad.py (shell) imports packer_assets_lab.stack" in found
    assert "cli.py (core) imports fakepve" in found
    lab = tmp_path / "packer_assets_lab"
    lab.mkdir()
    (lab / "stack.py").write_text("from packer_assets.defs.assets import template\n")
    assert lab_violations(lab) == ["stack.py (lab) imports packer_assets.defs.assets",
                                   "stack.py (lab) imports packer_assets.defs.assets.template"]


@pytest.mark.timeout(660)  # its own wait: 600 s
def test_the_product_wheel_holds_no_lab_module_and_no_fakepve_dependency(tmp_path):
    """`pip install .` installs what `pip wheel .` builds: from a copy of the checkout (no stale build/ of an
    earlier layout can leak in), without network (the build backend comes from pip's configured indexes)."""
    source = export_repository(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w",
                            str(tmp_path / "wheels")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("packer_assets-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(metadata).decode()
        (points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = whl.read(points).decode()
    assert "packer_assets/definitions.py" in names and "packer_assets/cli.py" in names
    assert [n for n in names if n.startswith(("packer_assets_lab", "packer_assets/lab/", "lab/"))] == []
    requires = [line for line in meta.splitlines() if line.startswith(("Requires-Dist:", "Provides-Extra:"))]
    assert requires and [line for line in requires if "fakepve" in line or line.endswith(" lab")] == []
    assert "packer_assets_lab" not in entry_points  # the lab registers `lab` from its own distribution


def test_the_definitions_load_where_the_lab_cannot_be_imported(tmp_path):
    """A venv without the lab, as far as imports go: fakepve and packer_assets_lab (and the lab's old home)
    refuse to import, and the definitions load all the same without touching them."""
    blocked = ("fakepve", "packer_assets_lab", "packer_assets.lab")
    code = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            "import packer_assets.definitions as d\n"
            "d.defs.resolve_all_job_defs()\n"
            f"print(sorted(n for n in sys.modules if n.startswith({blocked!r}) and sys.modules[n] is not None))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PYTEST_"))}
    env.update(PACKER_ASSETS_ROOT=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_without_the_lab_installed_lab_is_no_subcommand(monkeypatch):
    from packer_assets import cli

    monkeypatch.setattr(cli, "entry_points", lambda group: ())
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    assert "lab" not in commands and "settings" in commands
