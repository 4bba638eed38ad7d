"""The `packer-assets` command: catalog checks and the lab.

Every failure prints one line naming what is wrong and exits 2; no traceback for expected errors.
"""

import argparse
import json
import sys
from pathlib import Path

DEFAULT_LAB_STATE = Path(".lab")


def _catalog_check(args) -> int:
    from .catalog import check_catalog

    for line in check_catalog(args.catalog):
        print(line)
    return 0


def _validate(args) -> int:
    """validate-all.sh: render and validate every key (or those named), then `packer validate` each."""
    import os

    from .build import BuildSettings, render_and_validate
    from .catalog import load_catalog
    from .packer.workdir import PackerCapabilityError
    from .render import RenderError
    from .settings import export_env_files, load_settings

    found = load_settings()  # the one validated model, as definitions.py reads it
    export_env_files()
    catalog = load_catalog(args.catalog)
    layout = found.layout
    degraded = args.allow_degraded or found.allow_degraded  # the lab sets PACKER_ASSETS_ALLOW_DEGRADED
    settings = BuildSettings(packer=found.packer_binary, allow_degraded=degraded)
    failed = 0
    for key in args.keys or catalog.keys():
        entry = catalog.get(key)
        try:
            result, check = render_and_validate(layout, entry, os.environ, settings, project_dir=catalog.project_dir)
        except RenderError as exc:
            print(f"FAIL {key}: render: {exc}")
            failed += 1
            continue
        except PackerCapabilityError as exc:
            print(f"FAIL {key}: {exc} (--allow-degraded accepts this)")
            failed += 1
            continue
        verdicts = ", ".join(sorted({v.validator for f in result.files for v in f.verdicts}))
        if check.ok:
            print(f"ok   {key}: {len(result.files)} file(s) [{verdicts}], packer validate")
        else:
            said = check.output.strip().splitlines()[-1] if check.output.strip() else f"exit {check.exit_code}, no output"
            print(f"FAIL {key}: packer validate: {said}")
            failed += 1
    return 1 if failed else 0


def _settings(args) -> int:
    """Every setting the live path reads, and the catalog, checked as definitions.py checks them. No secret
    is read into the model, so none is printed."""
    from dataclasses import fields, is_dataclass

    from .catalog import load_catalog
    from .settings import export_env_files, load_settings

    found = load_settings()
    export_env_files()  # as definitions.py does: the catalog an env file names is the one checked
    catalog = load_catalog()  # the definitions' partitions come from it: a broken one is one line here
    print(f"catalog: {catalog.display} ({len(catalog)} keys)")
    for item in fields(found):
        value = getattr(found, item.name)
        for name, shown in ([(f"{item.name}.{f.name}", getattr(value, f.name)) for f in fields(value)]
                            if is_dataclass(value) else [(item.name, value)]):
            print(f"{name}: {shown}")
    if found.insecure:
        print(f"warning: TLS verification of the API is OFF (PROXMOX_INSECURE=1 from {found.insecure_origin})")
    return 0


def _lab(args) -> int:
    from .lab import service

    state = args.state
    if args.lab_command == "up":
        info = service.up(state, args.catalog)
        print(f"lab running (pid {info['pid']}); env file: {service.LabPaths(state.resolve()).env_file}")
        _print_endpoints(info)
    elif args.lab_command == "down":
        print("lab stopped" if service.down(state) else f"no lab was running for {state}")
    elif args.lab_command == "status":
        info = service.running_state(state)
        if not info:
            print(f"lab: not running ({state})")
            return 3
        print(f"lab: running (pid {info['pid']})")
        _print_endpoints(info)
    else:  # publish, corrupt, repair
        result = service.control(state, args.lab_command, args.key)
        print(json.dumps({"key": args.key, args.lab_command: result}))
    return 0


def _print_endpoints(info: dict) -> None:
    for name in ("pve_url", "ca_file", "mirror_url", "guest"):
        if name in info:
            print(f"  {name}: {info[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packer-assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    catalog = sub.add_parser("catalog", help="the template catalog")
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True)
    check = catalog_sub.add_parser("check", help="validate templates/catalog.yaml and list its templates")
    check.add_argument("--catalog", type=Path, default=None, help="catalog file (default: PACKER_ASSETS_CATALOG "
                       "or templates/catalog.yaml)")
    check.set_defaults(func=_catalog_check)

    settings = sub.add_parser("settings", help="check every setting as the definitions read them and print "
                              "them (no secrets); exit 2 naming the variable and where it came from")
    settings.set_defaults(func=_settings)
    validate = sub.add_parser("validate", help="render and validate every key, then packer validate (validate-all.sh)")
    validate.add_argument("keys", nargs="*", help="keys to validate (default: all)")
    validate.add_argument("--catalog", type=Path, default=None)
    validate.add_argument("--allow-degraded", action="store_true",
                          help="accept what the installed packer cannot do (EFI/TPM on 1.6.6) as warnings")
    validate.set_defaults(func=_validate)

    lab = sub.add_parser("lab", help="the embedded lab: fake PVE API, ISO mirror, guest SSH")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    for name, text in (("up", "start the lab in the background"), ("down", "stop the lab `up` started"),
                       ("status", "is the lab running, and where"), ("publish", "publish a new ISO release of KEY"),
                       ("corrupt", "serve a corrupted ISO for KEY"), ("repair", "undo corrupt for KEY")):
        cmd = lab_sub.add_parser(name, help=text)
        cmd.add_argument("--state", type=Path, default=DEFAULT_LAB_STATE, help="state folder (default .lab)")
        if name == "up":
            cmd.add_argument("--catalog", type=Path, default=None)
        if name in ("publish", "corrupt", "repair"):
            cmd.add_argument("key")
        cmd.set_defaults(func=_lab)
    return parser


def main(argv: list[str] | None = None) -> None:
    from .errors import PackerAssetsError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except PackerAssetsError as exc:  # any of the project's errors is one line; anything else is a bug
        print(f"packer-assets: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
