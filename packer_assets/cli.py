"""The `packer-assets` command: catalog checks, settings, validation, proofs, chain IDs, registry channels.

Other installed distributions add subcommands through the entry point group `packer_assets.cli` (the lab,
lab/pyproject.toml, registers `lab`); without them installed, their commands do not exist.

Every failure prints one line naming what is wrong and exits 2; no traceback for expected errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # imported where used: the command line starts without Dagster, the catalog or the API
    from packer_assets.catalog import Catalog
    from packer_assets.evidence.layout import Layout
    from packer_assets.pve.client import PveApi
    from packer_assets.render import RenderResult

PLUGINS = "packer_assets.cli"  # each entry point: a function that adds its subparser to `sub`


def _catalog_check(args: argparse.Namespace) -> int:
    from packer_assets.catalog import check_catalog

    for line in check_catalog(args.catalog):
        print(line)
    return 0


def _validate(args: argparse.Namespace) -> int:
    """validate-all.sh: render and validate every key (or those named), then `packer validate` each."""
    from packer_assets.build.pipeline import BuildSettings, render_and_validate
    from packer_assets.catalog import load_catalog
    from packer_assets.config.settings import load_settings
    from packer_assets.packer.workdir import PackerCapabilityError
    from packer_assets.render import RenderError
    from packer_assets.render.record import ignored_warning

    found = load_settings()  # the one validated model, as definitions.py reads it
    catalog = load_catalog(args.catalog, env=found.environment)
    layout = found.layout
    degraded = args.allow_degraded or found.allow_degraded  # the lab sets PACKER_ASSETS_ALLOW_DEGRADED
    settings = BuildSettings(packer=found.packer_binary, allow_degraded=degraded)
    failed = 0
    for key in args.keys or catalog.keys():
        entry = catalog.get(key)
        try:
            rendered, check = render_and_validate(
                layout, entry, found.environment, settings, project_dir=catalog.project_dir
            )
        except RenderError as exc:
            print(f"FAIL {key}: render: {exc}")
            failed += 1
            continue
        except PackerCapabilityError as exc:
            print(f"FAIL {key}: {exc} (--allow-degraded accepts this)")
            failed += 1
            continue
        # never a CachedRender: render_and_validate reuses a render only when asked (reuse=True)
        result = cast("RenderResult", rendered)
        if result.ignored:  # never served: builds serve exactly the render's record
            print(f"warn {ignored_warning(key, result.out_dir, result.ignored)}")
        # each validator with the upstream release that checked the file: "kickstart (pykickstart RHEL10)"
        verdicts = ", ".join(sorted({v.label() for f in result.files for v in f.verdicts}))
        if check.ok:
            print(f"ok   {key}: {len(result.files)} file(s) [{verdicts}], packer validate")
        else:
            said = (
                check.output.strip().splitlines()[-1] if check.output.strip() else f"exit {check.exit_code}, no output"
            )
            print(f"FAIL {key}: packer validate: {said}")
            failed += 1
    return 1 if failed else 0


def _settings(args: argparse.Namespace) -> int:
    """Every setting the live path reads, and the catalog, checked as definitions.py checks them. No secret
    is read into the model, so none is printed."""
    from dataclasses import fields, is_dataclass

    from packer_assets.catalog import load_catalog
    from packer_assets.config.settings import load_settings

    found = load_settings()
    # the catalog an env file names is the one checked: the definitions' partitions come from it
    catalog = load_catalog(env=found.environment)  # a broken one is one line here
    if args.key is not None:
        catalog.get(args.key)  # an unknown key is one line naming the known ones (a run of it would be recorded)
    print(f"catalog: {catalog.display} ({len(catalog)} keys)")
    for item in fields(found):
        if not item.repr:  # the environment as read: secrets
            continue
        value = getattr(found, item.name)
        for name, shown in (
            [(f"{item.name}.{f.name}", getattr(value, f.name)) for f in fields(value)]
            if is_dataclass(value)
            else [(item.name, value)]
        ):
            print(f"{name}: {shown}")
    if found.insecure:
        print(f"warning: TLS verification of the API is OFF (PROXMOX_INSECURE=1 from {found.insecure_origin})")
    return 0


def _build(args: argparse.Namespace) -> int:
    """`make build KEY=...`: the settings and the key checked as `settings --key` checks them (one line, exit 2;
    `dagster job execute` would run and record an unknown partition), then, in this same process, Dagster's own
    `dagster job execute` of rebuild_template for the key's partition: a run of that job in its history in the UI,
    in the pool, executed in process. One Python process per build instead of two (issue 25, item 8)."""
    from packer_assets.catalog import load_catalog
    from packer_assets.config.settings import load_settings

    load_catalog(env=load_settings().environment).get(args.key)
    from dagster._cli import ENV_PREFIX
    from dagster._cli import cli as dagster_cli

    argv = [
        "job",
        "execute",
        "-j",
        "rebuild_template",
        "-m",
        "packer_assets.definitions",
        "--tags",
        json.dumps({"dagster/partition": args.key}),
    ]
    try:
        dagster_cli.main(args=argv, prog_name="dagster", auto_envvar_prefix=ENV_PREFIX)
    except SystemExit as done:  # click ends its commands so; the exit code is the run's
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def _registry_session() -> tuple[Layout, Catalog, PveApi]:
    """(layout, catalog, the node's API as the build token) as builds have them: settings, env files, catalog."""
    from packer_assets.catalog import load_catalog
    from packer_assets.config.settings import load_settings
    from packer_assets.evidence.channels import node_api

    found = load_settings()
    catalog = load_catalog(env=found.environment)  # the catalog an env file names is the one used
    return found.layout, catalog, node_api(found.layout)


def _channel(args: argparse.Namespace) -> int:
    """Point a channel of a key at one of its templates, take it away, or list the channels."""
    from packer_assets.evidence.channels import channel_name, channel_rows, set_channel, unset_channel
    from packer_assets.evidence.registry import build_registry

    if args.channel_command != "list":
        channel_name(args.channel)  # a bad name is refused before the node is asked
    layout, catalog, api = _registry_session()
    if args.channel_command == "set":
        change = set_channel(layout, api, catalog, args.channel, args.key, args.template)
        taken = f" (taken from {', '.join(map(str, change.taken_from))})" if change.taken_from else ""
        print(f"{change.key}: channel {change.channel} -> {change.vmid}{taken}; registry {layout.registry_file}")
    elif args.channel_command == "unset":
        change = unset_channel(layout, api, catalog, args.channel, args.key)
        said = f"unset (was on {', '.join(map(str, change.taken_from))})" if change.taken_from else "was not set"
        print(f"{change.key}: channel {change.channel} {said}; registry {layout.registry_file}")
    else:
        if args.key:
            catalog.get(args.key)  # an unknown key is one line, not an empty list
        rows = channel_rows(build_registry(layout, api, catalog), args.key)
        for key, channel, vmid, name in rows:
            print(f"{key:<24} {channel:<16} {vmid:<8} {name}")
        if not rows:
            print(f"no channels: no key {'of ' + args.key + ' ' if args.key else ''}has a current template")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    """Mark a template revoked: consumers stop using it, its key's next build replaces it."""
    from packer_assets.evidence.channels import revoke

    layout, catalog, api = _registry_session()
    done = revoke(layout, api, catalog, args.template, args.reason)
    notes = []
    if done.was_promoted:
        notes.append(f"it was the current template of {done.key}: the key's next build builds a new one")
    if done.channels:
        notes.append(f"channels taken: {', '.join(done.channels)}")
    print(
        f"{done.key}: template {done.vmid} ({done.name}) revoked"
        + "".join(f"; {n}" for n in notes)
        + f"; registry {layout.registry_file}"
    )
    return 0


def _proof_verify(args: argparse.Namespace) -> int:
    """Verify one bundle (a folder or a chain ID), or every bundle under the output root."""
    from packer_assets.config.settings import load_settings
    from packer_assets.evidence.verify import FAILED, OK, all_bundles, bundle_chain, find_bundle, verify_bundle

    layout = load_settings().layout
    folders = [find_bundle(layout, args.bundle)] if args.bundle else all_bundles(layout)
    if not folders:
        print(f"no proof bundles under {layout.output_root}")
        return FAILED
    reports = [verify_bundle(f, args.allowed_signers, args.require_signature, bundle_chain(layout, f)) for f in folders]
    for report in reports:
        print("\n".join(report.lines()))
    return OK if all(r.ok for r in reports) else FAILED


def _chain(args: argparse.Namespace) -> int:
    """Everything that carries a chain ID; or the chain IDs of a key, newest first."""
    from packer_assets.config.settings import load_settings
    from packer_assets.evidence.audit import chain_report, chains_of_key
    from packer_assets.evidence.chain import check_key, parse_chain_id

    if args.key:
        check_key(args.key)  # a folder name under the output root: `../x` would list folders elsewhere
    elif args.chain_id:
        parse_chain_id(args.chain_id)  # one line (ChainIdError) before settings or the API are touched
    found = load_settings()
    layout = found.layout
    if args.key:
        chains = chains_of_key(layout, args.key)
        if args.json:
            print(json.dumps([{"chain_id": c, "outcome": o} for c, o in chains], indent=2))
        else:
            print("\n".join(f"{c}  {o}" for c, o in chains) or f"no builds of {args.key} in {layout.output_root}")
        return 0 if chains else 1
    if not args.chain_id:
        raise SystemExit("packer-assets chain: give a chain ID, or --key KEY")
    report = chain_report(
        layout,
        args.chain_id,
        runs=lambda c: _runs_of_chain(c, found.ui_url),
        templates=lambda c: _templates_of_chain(layout, c),
    )
    print(report.as_json() if args.json else "\n".join(report.lines()))
    return 0 if report.found else 1


def _runs_of_chain(chain_id: str, ui_url: str | None) -> list[dict[str, Any]]:
    """The Dagster runs tagged with the chain ID, in the instance DAGSTER_HOME names."""
    import dagster as dg

    from packer_assets.defs.assets import CHAIN_TAG, LEGACY_CHAIN_TAG

    with dg.DagsterInstance.get() as instance:  # runs from before the tag's rename carry the old name
        runs = [
            r
            for tag in (CHAIN_TAG, LEGACY_CHAIN_TAG)
            for r in instance.get_runs(filters=dg.RunsFilter(tags={tag: chain_id}))
        ]
    return [
        {
            "run_id": r.run_id,
            "status": r.status.value,
            "job": r.job_name,
            "url": f"{ui_url}/runs/{r.run_id}" if ui_url else None,
        }
        for r in runs
    ]


def _templates_of_chain(layout: Layout, chain_id: str) -> list[dict[str, Any]]:
    """Templates of the chain's key whose description names the chain ID (asked as the build token)."""
    from packer_assets.evidence.chain import parse_chain_id
    from packer_assets.evidence.channels import node_api
    from packer_assets.pve.templates import list_templates, template_description

    key = parse_chain_id(chain_id).key
    if key == "init":
        return []
    api = node_api(layout)
    found: list[dict[str, Any]] = []
    for guest in list_templates(api, key):
        described = template_description(api, guest)
        if described is not None and described.chain_id == chain_id:
            found.append({"vmid": guest.vmid, "name": guest.name, "node": guest.node, "tags": guest.tags})
    return found


def _plan(args: argparse.Namespace) -> int:
    """Which keys need a run (the weekly schedule's pre-check; `make build-all` builds those)."""
    from packer_assets.build.plan import plan_runs
    from packer_assets.catalog import load_catalog
    from packer_assets.config.settings import load_settings
    from packer_assets.evidence.channels import node_api
    from packer_assets.pve.templates import promoted_vmids

    found = load_settings()
    catalog = load_catalog(env=found.environment)
    try:
        promoted = promoted_vmids(node_api(found.layout), catalog.keys())
    except Exception as exc:  # noqa: BLE001 - the recorded state still decides; said on stderr
        print(
            f"packer-assets plan: the node could not be asked ({type(exc).__name__}); the recorded state decides",
            file=sys.stderr,
        )
        promoted = None
    plan = plan_runs(found.layout, catalog, found.environment, catalog.project_dir, promoted)
    if args.keys_only:
        print(" ".join(plan.to_run))
    elif args.json:
        print(
            json.dumps([{"key": k.key, "run": k.run, "reason": k.reason, "note": k.note} for k in plan.keys], indent=2)
        )
    else:  # a key past its end of life says so beside its decision (a note: it decides nothing)
        print(
            "\n".join(
                f"{'run ' if k.run else 'skip'} {k.key}: {k.reason}{f'; {k.note}' if k.note else ''}" for k in plan.keys
            )
        )
        print(plan.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packer-assets", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    catalog = sub.add_parser("catalog", help="the template catalog")
    catalog_sub = catalog.add_subparsers(dest="catalog_command", required=True)
    check = catalog_sub.add_parser("check", help="validate templates/catalog.yaml and list its templates")
    check.add_argument(
        "--catalog",
        type=Path,
        default=None,
        help="catalog file (default: PACKER_ASSETS_CATALOG or templates/catalog.yaml)",
    )
    check.set_defaults(func=_catalog_check)

    settings = sub.add_parser(
        "settings",
        help="check every setting as the definitions read them and print "
        "them (no secrets); exit 2 naming the variable and where it came from",
    )
    settings.add_argument("--key", help="also require this template key in the catalog (make build checks KEY)")
    settings.set_defaults(func=_settings)

    build = sub.add_parser(
        "build",
        help="what `make build KEY=...` runs: the settings and KEY checked (one line, "
        "exit 2), then a run of the job rebuild_template for KEY's partition in this process",
    )
    build.add_argument("key", help="a template key of the catalog")
    build.set_defaults(func=_build)

    channel = sub.add_parser(
        "channel",
        help="channels of a key (registry.json, PVE tags packer-assets-channel-<name>): which template consumers clone",
    )
    channel_sub = channel.add_subparsers(dest="channel_command", required=True)
    channel_set = channel_sub.add_parser("set", help="point CHANNEL of KEY at one of its templates (not a revoked one)")
    channel_set.add_argument("channel")
    channel_set.add_argument("key")
    channel_set.add_argument("template", help="the template's VMID or its chain ID")
    channel_unset = channel_sub.add_parser("unset", help="take CHANNEL from every template of KEY")
    channel_unset.add_argument("channel")
    channel_unset.add_argument("key")
    channel_list = channel_sub.add_parser("list", help="every key's channels (latest included), or KEY's")
    channel_list.add_argument("key", nargs="?")
    for cmd in (channel_set, channel_unset, channel_list):
        cmd.set_defaults(func=_channel)
    revoke = sub.add_parser(
        "revoke",
        help="mark a template revoked (PVE tag packer-assets-revoked, a line in its "
        "description): its promotion and channels are taken, its key's next build replaces it",
    )
    revoke.add_argument("template", help="the template's VMID or its chain ID")
    revoke.add_argument("--reason", help="one line, kept in the description and registry.json")
    revoke.set_defaults(func=_revoke)
    validate = sub.add_parser("validate", help="render and validate every key, then packer validate (validate-all.sh)")
    validate.add_argument("keys", nargs="*", help="keys to validate (default: all)")
    validate.add_argument("--catalog", type=Path, default=None)
    validate.add_argument(
        "--allow-degraded",
        action="store_true",
        help="accept what the installed packer cannot do (EFI/TPM on 1.6.6) as warnings",
    )
    validate.set_defaults(func=_validate)

    plan = sub.add_parser(
        "plan",
        help="which keys need a run: inputs changed since the promoted template, or none "
        "recorded (what the weekly schedule and make build-all ask first)",
    )
    plan.add_argument("--keys-only", action="store_true", help="just the keys to run, space-separated")
    plan.add_argument("--json", action="store_true", help="JSON for scripts")
    plan.set_defaults(func=_plan)

    proof = sub.add_parser("proof", help="proof bundles")
    proof_sub = proof.add_subparsers(dest="proof_command", required=True)
    verify = proof_sub.add_parser(
        "verify",
        help="check a bundle's files against its manifest, its signature and "
        "proof.json against its schema; exit 0 ok, 1 a problem (each named), 2 not found",
    )
    verify.add_argument("bundle", nargs="?", help="a bundle folder or a chain ID (default: every bundle)")
    verify.add_argument(
        "--allowed-signers",
        type=Path,
        default=None,
        help="ssh-keygen's allowed_signers file: a signature is required, and its signer must be "
        "allowed for the manifest's key_id as `ssh-keygen -Y verify -I <key_id>` decides",
    )
    verify.add_argument(
        "--require-signature", action="store_true", help="an unsigned bundle fails (implied by --allowed-signers)"
    )
    verify.set_defaults(func=_proof_verify)

    chain = sub.add_parser(
        "chain",
        help="everything that carries a chain ID: logs, record, proof, Dagster runs, "
        "Proxmox templates; or --key KEY: its chain IDs, newest first",
    )
    chain.add_argument("chain_id", nargs="?")
    chain.add_argument("--key", help="list the chain IDs of this key instead")
    chain.add_argument("--json", action="store_true", help="JSON for scripts")
    chain.set_defaults(func=_chain)

    for plugin in entry_points(group=PLUGINS):  # e.g. the lab (lab/pyproject.toml) registers `lab`
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from packer_assets.errors import PackerAssetsError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except PackerAssetsError as exc:  # any of the project's errors is one line; anything else is a bug
        print(f"packer-assets: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
