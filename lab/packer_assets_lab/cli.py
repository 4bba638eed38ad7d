"""`packer-assets lab ...`: the lab's subcommand, registered through the entry point group `packer_assets.cli`
(lab/pyproject.toml). Without this distribution installed, `packer-assets` has no `lab` command."""

import argparse
import json
from pathlib import Path

DEFAULT_LAB_STATE = Path(".lab")
# The keys `lab up --real-guest` runs for real when it names none (stack.py checks them: Debian 12 or 13 keys;
# `make demo-real` names its REAL_KEYS, debian-13 among them once the catalog has it).
REAL_GUEST_DEFAULT = ("debian-12",)


def _lab(args) -> int:
    from . import service

    state = args.state
    if args.lab_command == "up":
        keys = tuple(k.strip() for k in (args.real_guest or "").split(",") if k.strip())
        info = service.up(state, args.catalog, real_guests=keys)
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
    for name in ("pve_url", "ca_file", "mirror_url", "guest", "allowed_signers"):
        if name in info:
            print(f"  {name}: {info[name]}")
    for key, address in (info.get("real_guests") or {}).items():
        print(f"  real guest: {key} (SSH {address})")


def add_lab_command(sub: "argparse._SubParsersAction") -> None:
    """The entry point: add `lab` and its commands to the subparsers of `packer-assets`."""
    lab = sub.add_parser("lab", help="the embedded lab: fake PVE API, ISO mirror, guest SSH")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    for name, text in (
        ("up", "start the lab in the background"),
        ("down", "stop the lab `up` started"),
        ("status", "is the lab running, and where"),
        ("publish", "publish a new ISO release of KEY"),
        ("corrupt", "serve a corrupted ISO for KEY"),
        ("repair", "undo corrupt for KEY"),
    ):
        cmd = lab_sub.add_parser(name, help=text)
        cmd.add_argument("--state", type=Path, default=DEFAULT_LAB_STATE, help="state folder (default .lab)")
        if name == "up":
            cmd.add_argument("--catalog", type=Path, default=None)
            cmd.add_argument(
                "--real-guest",
                nargs="?",
                const=",".join(REAL_GUEST_DEFAULT),
                default=None,
                metavar="KEYS",
                help="run these keys' VMs for real: QEMU on the key's Debian image (12: bookworm, 13: trixie) "
                f"(comma-separated; default {','.join(REAL_GUEST_DEFAULT)})",
            )
        if name in ("publish", "corrupt", "repair"):
            cmd.add_argument("key")
        cmd.set_defaults(func=_lab)
