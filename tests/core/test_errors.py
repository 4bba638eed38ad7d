"""One error root: every exception class the package defines derives from PackerAssetsError, and the CLI
prints any of them as one line."""

import importlib
import inspect
import pkgutil

import pytest

import packer_assets
from packer_assets.errors import ConfigError, OperationError, PackerAssetsError

# not errors of the project's domain: a lab stand-in's own (pvecli mimics pveum's exit codes)
OUTSIDE = {"packer_assets_lab.pvecli.CliError"}


def project_modules():
    """The product's modules, and the lab's (lab/, its own distribution) where it is installed."""
    packages = [packer_assets]
    if importlib.util.find_spec("packer_assets_lab") is not None and importlib.util.find_spec("fakepve") is not None:
        packages.append(importlib.import_module("packer_assets_lab"))
    for package in packages:
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            yield importlib.import_module(info.name)


def test_every_exception_class_has_the_one_root():
    found = {}
    for module in project_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    assert len(found) > 20
    strays = sorted(n for n, cls in found.items() if not issubclass(cls, PackerAssetsError) and n not in OUTSIDE
                    and not n.endswith("._FieldError"))
    assert strays == []
    # and the old bases still hold, for callers that catch ValueError / RuntimeError
    assert issubclass(ConfigError, ValueError) and issubclass(OperationError, RuntimeError)


@pytest.mark.parametrize("error", [OperationError("node pve1: storage 'x' is not online")])
def test_the_cli_prints_a_project_error_as_one_line(error, capsys, monkeypatch):
    from packer_assets import cli

    def boom(_args):
        raise error

    monkeypatch.setattr(cli, "_settings", boom)
    with pytest.raises(SystemExit) as code:
        cli.main(["settings"])
    assert code.value.code == 2
    assert capsys.readouterr().err == f"packer-assets: {error}\n"
