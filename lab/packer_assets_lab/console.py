"""Where the lab keeps each VM's console: `<data_dir>/console/<vmid>.log`, one file per VMID.

A real node keeps a VM's serial console only where the admin sets one up; the lab keeps one for every VM
(what a simulated installer printed, a real guest's serial output, the reason an install stopped), and
points the project at it (`PACKER_ASSETS_CONSOLE_LOG`), so a build that fails before SSH can quote it.
"""

from __future__ import annotations

from pathlib import Path

CONSOLE_DIR = "console"


def console_path(data_dir: Path, vmid: int) -> Path:
    return Path(data_dir) / CONSOLE_DIR / f"{int(vmid)}.log"


def console_template(data_dir: Path) -> str:
    """The path with `{vmid}` for the setting: the product fills in the VM it watches."""
    return str(Path(data_dir) / CONSOLE_DIR / "{vmid}.log")


def append_console(data_dir: Path, vmid: int, text: str) -> Path:
    """Adds text (a line end is added when missing) to the VM's console log; never holds a secret."""
    path = console_path(data_dir, vmid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(text if text.endswith("\n") else text + "\n")
    return path
