"""`packer-assets settings` run in-process with a clean environment: (exit code, stdout, stderr)."""

import os

import pytest

from packer_assets.cli import main


def settings_command(monkeypatch, capsys, root, **env) -> tuple[int, str, str]:
    for name in [n for n in os.environ if n.startswith(("PACKER_ASSETS_", "PROXMOX_"))]:
        monkeypatch.delenv(name)
    for name, value in {"PACKER_ASSETS_ROOT": str(root), **env}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["settings"])
    shown = capsys.readouterr()
    return exited.value.code, shown.out, shown.err
