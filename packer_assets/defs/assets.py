"""Assets: each body calls the core and reports the result as metadata."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from packer_assets.build.pipeline import (
    BuildJob,
    CachedRender,
    NoPromotedBuild,
    build_template,
    promoted_record,
    render_and_validate,
)
from packer_assets.build.repair import ensure_proof, repair_proofs, sweep_idle_keys
from packer_assets.catalog.eol import end_of_life
from packer_assets.catalog.models import TemplateEntry
from packer_assets.defs.partitions import catalog, key_check, template_partitions
from packer_assets.defs.recovery import recover
from packer_assets.defs.resources import PackerSettings, ProjectSettings, ProxmoxBootstrap
from packer_assets.evidence.chain import fresh_chain_id
from packer_assets.evidence.layout import Layout
from packer_assets.packer.workdir import DEGRADED
from packer_assets.pve.init_env import run_init
from packer_assets.pve.staging import StagedIso, stage_entry
from packer_assets.render.record import ignored_warning
from packer_assets.runs.locks import hold_key

# Short, so the UI's tag chip (400 px) shows `chain: CHAIN-<ts>-<key>` whole: the value is what matters.
CHAIN_TAG = "chain"
LEGACY_CHAIN_TAG = "packer-assets/chain-id"  # its name until the UI cut it off; older runs carry it
# What a per-key run did to its key's template: built, up-to-date (nothing built) or failed.
OUTCOME_TAG = "packer-assets/outcome"
BUILT, UP_TO_DATE, FAILED = "built", "up-to-date", "failed"
# `true` forces a build like config force: true. The job rebuild_template_forced sets it on its runs: a partitioned
# job's preset config reaches runs launched from the UI, not those of `dagster job execute`.
FORCE_TAG = "packer-assets/force"
FORCED_JOB = "rebuild_template_forced"  # every run of this job forces, however launched
OWNERS = ["team:platform"]
LOG_TAIL_LINES = 30  # of the build log, as metadata on template


class ProxmoxEnvConfig(dg.Config):
    rotate: bool = False  # create a new token secret even though the known one still works


def hold_partition(context: dg.AssetExecutionContext, project: ProjectSettings) -> tuple[str, Layout]:
    """The partition's key, with the key's lock taken for the rest of the run (locks.py): a second run of
    the key, started by anything, waits here and says for whom."""
    key, layout = context.partition_key, project.layout()
    recover(context)  # dead runs closed and their pool slots freed, before this run may need one
    hold_key(layout.lock_file(key), key, context.run.run_id, on_wait=context.log.warning)
    repair_once(context, project, key)
    return key, layout


_repaired: set[str] = set()  # runs that repaired already (their first per-key step did)


def repair_once(context: dg.AssetExecutionContext, project: ProjectSettings, key: str) -> None:
    """What dead runs left, at a run's first per-key step: the missing proofs of every key's promoted
    template, and the build VMs of every other key no live run works on (the run's own key is swept by
    its build). Without proxmox_env's env file there is nothing on a node to repair."""
    if context.run.run_id in _repaired:
        return
    _repaired.add(context.run.run_id)
    if not project.layout().env_file.exists():
        return
    try:
        access, catalog = project.build_access(), project.catalog()
        api = access.connect()
        others = [entry for entry in catalog if entry.key != key]
        lines = [
            f"dead run's leftover: {line}"
            for line in sweep_idle_keys(project.layout(), api, access.discovery.node, others)
        ]
        lines += [f"proof repaired: {line}" for line in repair_proofs(project.layout(), api, catalog, project.signer())]
    except Exception as exc:  # noqa: BLE001 - a render needs no node; a build finds the same error itself
        lines = [f"dead runs' leftovers not checked: {type(exc).__name__}: {exc}"]
    for line in lines:
        context.log.warning(line)


def tag_run(context: dg.AssetExecutionContext, chain: str) -> None:
    """Put the chain ID on the run, so the UI's run list leads to the logs and proofs."""
    context.instance.add_run_tags(context.run.run_id, {CHAIN_TAG: chain})


def tag_outcome(context: dg.AssetExecutionContext, outcome: str) -> None:
    context.instance.add_run_tags(context.run.run_id, {OUTCOME_TAG: outcome})


@dg.failure_hook
def failed_outcome(context: dg.HookContext) -> None:
    """A failed step of a per-key run (a render, a download, a build, a blocking check, a proof): the run's
    outcome is `failed`, whatever an earlier step said."""
    context.instance.add_run_tags(context.run_id, {OUTCOME_TAG: FAILED})


@dg.asset(
    kinds={"proxmox"},
    group_name="bootstrap",
    owners=OWNERS,
    description="API user, role, ACLs and token for builds, plus the discovered node, storages and bridge; "
    "writes infra/env/.env.proxmox (0600) and the init proof bundle.",
)
def proxmox_env(
    context: dg.AssetExecutionContext, config: ProxmoxEnvConfig, project: ProjectSettings, pve_admin: ProxmoxBootstrap
) -> dg.MaterializeResult:
    layout = project.layout()
    recover(context)
    chain = fresh_chain_id("init", lambda stamp: layout.init_log_dir(stamp).exists())
    tag_run(context, str(chain))
    if pve_admin.insecure:  # an explicit choice, said on every run that makes it
        context.log.warning(
            f"[{chain}] TLS verification of {pve_admin.api_url} is OFF: PROXMOX_INSECURE=1 "
            f"from {pve_admin.insecure_origin or 'the run config'}"
        )
    outcome = run_init(
        layout,
        pve_admin.endpoint(),
        pve_admin.bootstrapper(),
        pve_admin.config(config.rotate),
        chain,
        run_id=context.run.run_id,
        echo=print,
        signer=project.signer(),
    )
    result, found = outcome.result, outcome.result.discovery
    context.log.info(f"[{chain}] token {result.token_id} {result.token_action}; {len(result.changes)} change(s)")
    return dg.MaterializeResult(
        metadata={
            "chain_id": str(chain),
            "pve_version": result.pve_version,
            "node": found.node,
            "vm_storage": found.vm_storage,
            "iso_storage": found.iso_storage,
            "bridge": found.bridge,
            "http_bind": f"{found.http_bind_address}:{found.http_port}",
            "token_id": result.token_id,
            "token_action": result.token_action,
            "privileges": dg.MetadataValue.json(list(result.privileges)),
            "changes": dg.MetadataValue.json(result.changes),
            "env_file": dg.MetadataValue.path(str(outcome.env_file)),
            "init_log": dg.MetadataValue.path(str(outcome.log_file)),
            "proof": dg.MetadataValue.path(str(outcome.proof_dir)),
            "proof_readme": dg.MetadataValue.md((outcome.proof_dir / "README.md").read_text()),
        },
        # The env file changes only when access or discovery changes: downstream stays fresh otherwise.
        data_version=dg.DataVersion(access_fingerprint(outcome.proof)),
    )


def access_fingerprint(proof: dict) -> str:
    """What builds depend on (API, token ID, node, storages, bridge), never the secret."""
    import hashlib
    import json

    basis = {k: proof[k] for k in ("api_url", "token_id", "discovery")}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ per template key


def iso_sources_table(entries) -> str:
    """Each key's ISO URLs and where their checksums come from, as a Markdown table (iso_release's metadata)."""
    rows = []
    for entry in entries:
        for iso in entry.all_isos():
            name = getattr(iso, "name", None)
            if iso.checksum:
                source = f"pinned in the catalog: `{iso.checksum}`"
            else:  # the catalog's checksum file, else the mirror's own (PACKER_ASSETS_ISO_MIRROR_CHECKSUMS)
                url = iso.checksum_url or iso.checksum_source
                source = f"[{Path(url).name}]({url})" + (
                    f" (signed; verified with {iso.signed_by})" if iso.keyring else ""
                )
            rows.append(f"| `{entry.key}`{f' ({name})' if name else ''} | [{iso.filename}]({iso.url}) | {source} |")
    return "\n".join(["| key | ISO | checksum source |", "|---|---|---|", *rows])


iso_release = dg.AssetSpec(
    "iso_release",
    partitions_def=template_partitions,
    group_name="isos",
    kinds={"http"},
    owners=OWNERS,
    description="The upstream ISO (and extra ISOs) of a template key: external state, observed by "
    "iso_checksum_sensor with the published checksum as its data version.",
    # known from the catalog before the sensor ever ran
    metadata={
        "sources": dg.MetadataValue.md(iso_sources_table(catalog)),
        "mirror": catalog.mirror or "none: the upstream URLs are fetched (PACKER_ASSETS_ISO_MIRROR)",
    },
)


@dg.asset(
    partitions_def=template_partitions,
    group_name="templates",
    kinds={"jinja", "packer"},
    owners=OWNERS,
    check_specs=[
        key_check(
            "packer_validate",
            "unattended_files",
            blocking=True,
            description="`packer validate` with the real binary on a work directory prepared as "
            "the build's, with the key's rendered files (each evaluation names the key).",
        )
    ],
    hooks={failed_outcome},
    description="user-data/meta-data, preseed.cfg, ks.cfg or Autounattend.xml (+ answer ISO) rendered from "
    "`templates/<family>/` into `output/rendered/<key>/`, each checked by its ecosystem's validator. "
    "The data version is the hash of the rendered content, so an unchanged render leaves builds fresh.",
)
def unattended_files(
    context: dg.AssetExecutionContext, project: ProjectSettings, packer: PackerSettings
) -> dg.MaterializeResult:
    key, layout = hold_partition(context, project)
    catalog = project.catalog()
    entry = catalog.get(key)
    result, check = render_and_validate(
        layout, entry, project.environment(), packer.settings(), project_dir=catalog.project_dir, reuse=True
    )
    reused = isinstance(result, CachedRender)
    validated = dg.AssetCheckResult(
        check_name="packer_validate",
        passed=check.ok,
        description=(
            f"{key}: packer validate passed"
            + (" (inputs unchanged since that validation: it stands)" if reused else "")
        )
        if check.ok
        else f"{key}: packer validate failed:\n{check.output[-2000:]}",
        metadata={"argv": " ".join(check.argv), "reused": reused},
    )
    meta = result.metadata()
    rows = "\n".join(
        f"| `{name}` | `{f['sha256'][:16]}` | {f['size']} | "
        + ", ".join(f"{v}: {verdict}" for v, verdict in f["verdicts"].items())
        + "".join(f" ({by})" for by in f.get("validated_by", ()))  # "pykickstart RHEL10"; older records lack it
        + " |"
        for name, f in meta["files"].items()
    )
    context.log.info(
        f"{key}: {'unchanged' if reused else 'rendered'} {len(meta['files'])} file(s), content hash "
        f"{result.content_hash[:16]}"
    )
    if result.ignored:  # never served: builds serve exactly the render's record (render/record.py)
        context.log.warning(ignored_warning(key, result.out_dir, result.ignored))
    return dg.MaterializeResult(
        metadata={
            "rendered_dir": dg.MetadataValue.path(str(result.out_dir)),
            "files": dg.MetadataValue.md("| file | sha256 | bytes | validators |\n|---|---|---|---|\n" + rows),
            "content_hash": result.content_hash,
            "answer_iso": dg.MetadataValue.json(meta.get("answer_iso")),
            "ignored": dg.MetadataValue.json(list(result.ignored)),
        },
        check_results=[validated],
        data_version=dg.DataVersion(result.content_hash),
    )


@dg.asset(
    partitions_def=template_partitions,
    deps=[iso_release, proxmox_env],
    group_name="isos",
    kinds={"proxmox"},
    owners=OWNERS,
    hooks={failed_outcome},
    description="The ISO(s) of a key on the node's ISO storage, downloaded by Proxmox itself (download-url with "
    "the checksum, so no ISO byte passes through this host) under a volume name carrying the release.",
)
def staged_iso(context: dg.AssetExecutionContext, project: ProjectSettings) -> dg.MaterializeResult:
    key, _layout = hold_partition(context, project)
    access = project.build_access()
    node, storage = access.discovery.node, access.discovery.iso_storage
    staged = stage_entry(
        access.connect(),
        node,
        storage,
        project.catalog().get(key),
        on_progress=lambda line: context.log.debug(f"{key}: {line}"),
    )
    for name, iso in staged.items():
        verb = "downloaded by the node" if iso.downloaded else "already staged"
        context.log.info(f"{key}: {name} {iso.volid} {verb} ({iso.size} bytes, {iso.seconds:.1f}s)")
    boot = staged["iso"]
    return dg.MaterializeResult(
        metadata={
            "volid": boot.volid,
            "size": boot.size,
            "checksum": boot.checksum,
            "algorithm": boot.algorithm,
            "source_url": dg.MetadataValue.url(boot.source),
            "seconds": boot.seconds,
            "bytes_through_control_host": sum(i.bytes_through_control_host for i in staged.values()),
            "downloaded": boot.downloaded,
            "isos": dg.MetadataValue.json({name: iso.metadata() for name, iso in staged.items()}),
        },
        data_version=dg.DataVersion(staged_version(staged)),
    )


def staged_in_this_run(context: dg.AssetExecutionContext, key: str) -> dict[str, StagedIso] | None:
    """What staged_iso staged for the key earlier in this run (its metadata), so the ISOs are looked up
    once per run; None when staged_iso did not run in this run (then template stages them itself)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("staged_iso"), asset_partitions=[key]), limit=1
    ).records
    if not records or records[0].run_id != context.run.run_id:
        return None
    isos = records[0].asset_materialization.metadata.get("isos")
    try:
        return {name: StagedIso(**fields) for name, fields in isos.value.items()} if isos else None
    except TypeError:
        return None  # written by another version of StagedIso: ask the node


def staged_version(staged: dict) -> str:
    """The data version of a key's ISOs: every checksum, so a new virtio-win release counts too."""
    return ";".join(f"{name}={staged[name].checksum}" for name in sorted(staged))


class TemplateConfig(dg.Config):
    force: bool = Field(
        default=False,
        description=(
            "Build even when the key's promoted template was built from exactly these inputs (the same input "
            "fingerprint: ISO checksums, rendered files, Packer template, catalog entry). Without it such a run builds "
            "nothing: its tag packer-assets/outcome says up-to-date and template_proof is skipped. The job "
            "rebuild_template_forced sets it (and the run tag packer-assets/force: true, which forces too)."
        ),
    )


def forced(config: TemplateConfig, run: dg.DagsterRun) -> bool:
    """A forced build: the config, the run tag, or the job itself. The job's name decides for
    `dagster job launch` and `job execute`, which apply neither its preset config nor its run tags."""
    return config.force or run.tags.get(FORCE_TAG) == "true" or run.job_name == FORCED_JOB


TEMPLATE_CHECKS = [
    key_check(
        "smoke_test",
        "template",
        blocking=True,
        description="Full clone, cloud-init user and key, boot, guest agent answers with the key's expected OS "
        "and network; in the clone: cloud-init done, fresh machine-id and host keys, SSH login with the given "
        "key, install password locked, guest agent enabled, the catalog's smoke.commands; package inventory "
        "(SBOM). The clone is destroyed in every case. Evaluated by builds only (an up-to-date run tests "
        "nothing); each evaluation names the key.",
    ),
    key_check(
        "degraded",
        "template",
        description="Warns (severity WARN, never blocks) when a build ran without something the template asks "
        "for because the installed Packer cannot do it (EFI disk, TPM, q35, extra ISOs; allowed by "
        "PACKER_ASSETS_ALLOW_DEGRADED=1). Each reason is in the evaluation, in proof.json `warnings` and in "
        "the proof README's Warnings section.",
    ),
    key_check(
        "end_of_life",
        "template",
        description="Warns (severity WARN, never blocks) when the key's OS release is past the end-of-life date "
        "the catalog names (`eol`, the last day upstream supports it): evaluated by every build and by an "
        "up-to-date run that keeps the promoted template. Passes before that date (the date in its metadata) and "
        "when the catalog names none (optional: a site's own entry may have none to give).",
    ),
]


@dg.multi_asset(
    name="template",
    specs=[
        dg.AssetSpec(
            "template",
            deps=[unattended_files, staged_iso, proxmox_env],
            group_name="templates",
            kinds={"packer", "proxmox"},
            owners=OWNERS,
            skippable=True,  # an up-to-date run materializes nothing
            description="`packer build` of the key under a new VMID, finished through the API (ISO ejected, cloud-init "
            "drive, description with chain ID and input fingerprint), smoke-tested, then promoted (tag "
            "`packer-assets-latest`) and older ones pruned to the retention count. Each materialization is one new "
            "template, with the last lines of its build log.\n\n"
            "**A run is a no-op when the key is up to date**: when the promoted template was built from the same "
            "inputs, nothing is built or materialized (an observation says so; end_of_life is evaluated again, the "
            "template being kept), template_proof is skipped and the run's "
            "tag `packer-assets/outcome` says `up-to-date` (`built` or `failed` otherwise). To build anyway: the job "
            "`rebuild_template_forced` (config `force: true`).",
        )
    ],
    partitions_def=template_partitions,
    pool="packer_builds",
    check_specs=TEMPLATE_CHECKS,
    # The only way dagster 1.13 makes the check outputs optional (an up-to-date run evaluates no check); a
    # selection of template takes the asset with its checks all the same.
    can_subset=True,
    hooks={failed_outcome},
)
def template(
    context: dg.AssetExecutionContext, config: TemplateConfig, project: ProjectSettings, packer: PackerSettings
):
    if dg.AssetKey("template") not in context.selected_asset_keys:  # can_subset lets the UI offer a check alone
        raise dg.Failure(
            "smoke_test, degraded and end_of_life are evaluated by a build: materialize template (job "
            "rebuild_template, or rebuild_template_forced for a key that is up to date)"
        )
    key, layout = hold_partition(context, project)
    catalog = project.catalog()
    entry, access = catalog.get(key), project.build_access()
    rendered = layout.rendered_dir(key)
    if not rendered.is_dir():
        raise FileNotFoundError(f"{rendered} does not exist: materialize unattended_files[{key}] first")
    staged = staged_in_this_run(context, key) or stage_entry(
        access.connect(), access.discovery.node, access.discovery.iso_storage, entry
    )
    chain = fresh_chain_id(key, lambda stamp: layout.build_log_dir(key, stamp).exists())
    tag_run(context, str(chain))
    if access.endpoint.insecure:
        context.log.warning(
            f"[{chain}] TLS verification of {access.endpoint.base} is OFF: PROXMOX_INSECURE=1 "
            f"in {layout.env_file} (written by an init that asked for it)"
        )
    force = forced(config, context.run)
    if force:
        context.log.info(f"[{chain}] {key}: forced (config force: true or tag {FORCE_TAG}): builds even if up to date")
    env = project.environment()  # the install password (the catalog names its variable), packer's PATH
    try:
        outcome = build_template(
            BuildJob(
                layout,
                entry,
                access,
                packer.credentials(access),
                env.get(entry.install_user.password_env, ""),
                staged,
                rendered,
                chain,
                packer.settings(force),
                project_dir=catalog.project_dir,
                run_id=context.run.run_id,
                on_stage=lambda line: context.log.info(f"[{chain}] {line}"),
                env=env,
            )
        )
    except Exception as exc:  # the error and the log's last lines where people look, then the step fails
        tag_outcome(context, FAILED)
        log_file = layout.build_log_dir(key, chain.stamp) / "packer.log"
        yield dg.AssetObservation(
            asset_key="template",
            partition=key,
            metadata={
                "outcome": FAILED,
                "chain_id": str(chain),
                "error": dg.MetadataValue.md(code_block(str(exc)[-2000:])),
                "build_log": dg.MetadataValue.path(str(log_file)),
                "log_tail": log_tail(log_file),
            },
        )
        raise
    for line in outcome.swept:
        context.log.warning(f"[{chain}] {key}: {line}")
    meta = {
        "chain_id": str(chain),
        "input_fingerprint": outcome.input_fingerprint,
        "vmid": outcome.vmid,
        "swept": dg.MetadataValue.json(outcome.swept),
    }
    if outcome.skipped:
        tag_outcome(context, UP_TO_DATE)
        yield up_to_date_observation(context, layout, access.connect(), key, meta)
        yield end_of_life_check(entry)  # keeping a template is a choice too: past its date, it warns
        return
    meta.update(
        name=outcome.name,
        node=access.discovery.node,
        build_log=dg.MetadataValue.path(str(outcome.log_file)),
        log_tail=log_tail(outcome.log_file),
        warnings=dg.MetadataValue.json(outcome.warnings),
    )
    degraded, eol = degraded_check(key, outcome.warnings), end_of_life_check(entry)
    if outcome.smoke_error:
        tag_outcome(context, FAILED)
        context.log.error(f"[{chain}] smoke test failed, new template destroyed: {outcome.smoke_error}")
        smoke = dg.AssetCheckResult(
            check_name="smoke_test",
            passed=False,
            description=outcome.smoke_error,
            metadata={"steps": dg.MetadataValue.md(steps_table(outcome.smoke_steps))},
        )
        yield dg.MaterializeResult(
            metadata={**meta, "outcome": FAILED, "promoted": False},
            check_results=[smoke, degraded, eol],
            data_version=dg.DataVersion(outcome.input_fingerprint),
        )
        return
    tag_outcome(context, BUILT)
    # in this step, so no selection (template alone, from the UI) promotes a template without its proof
    proved = ensure_proof(layout, access.connect(), catalog, key, project.signer())
    context.log.info(f"[{chain}] proof {proved.proof_dir}")
    meta.update(
        outcome=BUILT,
        promoted=True,
        previous_vmid=outcome.previous_vmid,
        pruned=dg.MetadataValue.json(outcome.pruned),
        proof=dg.MetadataValue.path(str(proved.proof_dir)),
    )
    smoke = dg.AssetCheckResult(
        check_name="smoke_test",
        passed=True,
        description=f"{key}: clone {outcome.smoke['clone_vmid']} of template {outcome.vmid} passed every step",
        metadata={
            "clone_vmid": outcome.smoke["clone_vmid"],
            "os": outcome.smoke["os"],
            "found_os": outcome.smoke["found_os"],
            "expected_os": outcome.smoke["expected_os"],
            "ips": dg.MetadataValue.json(outcome.smoke["ips"]),
            "seconds": outcome.smoke["seconds"],
            "packages": outcome.smoke["packages"],
            "machine_id": outcome.smoke["machine_id"] or "",
            "steps": dg.MetadataValue.md(steps_table(outcome.smoke["steps"])),
        },
    )
    yield dg.MaterializeResult(
        metadata=meta, check_results=[smoke, degraded, eol], data_version=dg.DataVersion(outcome.input_fingerprint)
    )


def up_to_date_observation(
    context: dg.AssetExecutionContext, layout: Layout, api, key: str, meta: dict
) -> dg.AssetObservation:
    """What an up-to-date run says, as an observation: the partition's latest materialization stays the
    promoted template's build (its date, log, name, warnings and chain ID, which its proof carries)."""
    chain, vmid = meta["chain_id"], meta["vmid"]
    try:
        folder, record = promoted_record(layout, api, key)
        built_by, proof = record["chain_id"], layout.build_proof_dir(key, folder.name)
    except NoPromotedBuild as exc:  # built from another output root: nothing here to point at
        built_by, proof = None, None
        context.log.warning(f"[{chain}] {exc}")
    context.log.info(
        f"[{chain}] {key}: up to date, nothing built: promoted template {vmid} ({built_by or 'no record'})"
        " was built from these inputs; template_proof is skipped (force: true, or the job "
        "rebuild_template_forced, builds anyway)"
    )
    if proof is not None and not proof.exists():  # repair_once writes it; still missing is an error
        context.log.error(
            f"[{chain}] {key}: the proof of {built_by} is missing ({proof}) and could not be written: "
            "see this run's warnings"
        )
    return dg.AssetObservation(
        asset_key="template",
        partition=key,
        metadata={
            **meta,
            "outcome": UP_TO_DATE,
            "promoted_vmid": vmid,
            "promoted_chain_id": built_by or "",
            "proof": dg.MetadataValue.path(str(proof)) if proof else "",
        },
    )


def degraded_check(key: str, warnings: list[str]) -> dg.AssetCheckResult:
    """Fails (WARN) on each capability gap among the build's warnings; notes (tags set through the API) pass."""
    gaps = [w.removeprefix(DEGRADED) for w in warnings if w.startswith(DEGRADED)]
    if not gaps:
        return dg.AssetCheckResult(
            check_name="degraded",
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"{key}: built with everything the template asks for",
        )
    return dg.AssetCheckResult(
        check_name="degraded",
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{key}: degraded build, {len(gaps)} gap(s): " + "; ".join(gaps),
        metadata={"gaps": dg.MetadataValue.md("\n".join(f"- {g}" for g in gaps))},
    )


def end_of_life_check(entry: TemplateEntry) -> dg.AssetCheckResult:
    """Fails (WARN) when the key is past the catalog's eol as of today (catalog.eol.today, the one clock);
    passes with the date, or saying the catalog names none."""
    found = end_of_life(entry.key, entry.eol)
    advice = ": the template still builds and stays promoted; move to a supported release" if found.past else ""
    return dg.AssetCheckResult(
        check_name="end_of_life",
        passed=not found.past,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{entry.key}: {found.summary()}{advice}",
        metadata={
            "eol": found.eol.isoformat() if found.eol else "none",
            "today": found.on.isoformat(),
            "days_past": found.days_past,
        },
    )


def code_block(text: str) -> str:
    return "```\n" + text.replace("```", "'''") + "\n```"


def log_tail(path: Path | None) -> dg.MetadataValue:
    """The last lines of a build log (redacted as it was written) as Markdown."""
    if path is None or not Path(path).is_file():
        return dg.MetadataValue.md("no build log was written")
    lines = Path(path).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return dg.MetadataValue.md(code_block("\n".join(lines)))


def steps_table(steps: list[dict]) -> str:
    """The smoke test's steps as a Markdown table (a check's metadata)."""
    rows = [
        f"| {s['name']} | {'passed' if s['passed'] else 'FAILED'} | {s['seconds']:.1f} | "
        f"{(s['detail'] or '').replace('|', '/')} |"
        for s in steps
    ]
    return "\n".join(["| Step | Result | Seconds | Detail |", "|---|---|---:|---|", *rows]) if rows else "no steps ran"


@dg.asset(
    partitions_def=template_partitions,
    deps=[template],
    group_name="templates",
    kinds={"json"},
    owners=OWNERS,
    hooks={failed_outcome},
    description="The evidence bundle `docs/proof/platform/packer-builds/builds/<key>/<ts>/` (README.md, proof.json "
    "per `docs/schema/build-proof.schema.json`, packer.log, sbom.cdx.json) of the promoted template's build, written "
    "only for a build whose smoke test passed; `latest` points at it. Skipped by a run whose template was up to "
    "date (that build's proof stands).",
)
def template_proof(context: dg.AssetExecutionContext, project: ProjectSettings) -> dg.MaterializeResult:
    key, layout = hold_partition(context, project)
    # the promoted template's build, not the newest log: a failed build writes a log but never a record;
    # its proof is written by the template step, or here by any run after a crash
    proved = ensure_proof(layout, project.build_access().connect(), project.catalog(), key, project.signer())
    record, proof_dir = proved.record, proved.proof_dir
    context.log.info(f"[{record['chain_id']}] proof {proof_dir}")
    return dg.MaterializeResult(
        metadata={
            "chain_id": record["chain_id"],
            "proof": dg.MetadataValue.path(str(proof_dir)),
            "readme": dg.MetadataValue.md((proof_dir / "README.md").read_text()),
            "template_vmid": record["template"]["vmid"],
            "packages": (record.get("sbom") or {}).get("packages", 0),
        },
        data_version=dg.DataVersion(record["input_fingerprint"]),
    )
