"""One template build, start to finish, in the core (no Dagster): what build-wrapper.sh,
test-template.sh and chain-lib.sh did, without their gaps.

Order, and why: the up-to-date rule first (an unchanged input builds nothing); a free VMID of the key;
Packer in a prepared work directory; then the template is finished through the API (ISO ejected,
cloud-init drive, description with the chain ID and input fingerprint); the smoke test clones it; only
a template that passed is promoted (`packer-assets-latest`) and only then are old ones pruned. Any
failure destroys the build VM (never a promoted template), keeps the log and writes no record, so no
proof can follow; one after the smoke test (promotion refused, an API error, the prune) gives the
promotion back to the template that had it and then destroys the new one (pve/templates.withdraw).

build_template reads as its phases: survey and prepare (the up-to-date rule, a VMID, the work directory),
packer_and_finish, smoke_and_sbom, build_record (written before the promotion), promote_and_prune,
final_record. Each takes the frozen BuildJob and what the phase before it returned (a frozen dataclass).
"""

import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packer_assets import __version__
from packer_assets.build.plan import SourceDigests, iso_checksums, plan_fingerprint, plan_key, record_plan, render_key
from packer_assets.build.vmwatch import POLL_INTERVAL, VmWatch, WatchedVm
from packer_assets.catalog import TemplateEntry, load_catalog
from packer_assets.catalog.eol import end_of_life
from packer_assets.config.settings import guest_note, parse_ssh_ports
from packer_assets.errors import OperationError, PackerAssetsError
from packer_assets.evidence.chain import ChainId, log_header, parse_chain_id
from packer_assets.evidence.layout import BUILD_RECORD_NAME, Layout, Redactor, RunLog, atomic_write, sha256_file
from packer_assets.evidence.proof import (
    BuildProof,
    CheckResult,
    EndOfLifeRef,
    IsoRef,
    PackageChanges,
    SbomRef,
    TemplateRef,
    Timings,
    previous_sbom,
    write_build_proof,
)
from packer_assets.evidence.registry import record_proof, write_registry
from packer_assets.evidence.signing import Signer
from packer_assets.inspection.sbom import (
    SBOM_FILE,
    SbomError,
    build_sbom,
    diff_sboms,
    package_count,
    sbom_json,
    validate_sbom,
)
from packer_assets.packer.env import PackerEnv, packer_env, validate_env
from packer_assets.packer.runner import (
    PackerCheck,
    PackerError,
    open_build_log,
    packer_init,
    packer_validate,
    run_packer,
)
from packer_assets.packer.version import BuildCredentials, PackerCapabilities, detect_packer
from packer_assets.packer.workdir import BuildPlan, Workdir, prepare_workdir, template_sha256
from packer_assets.pve.bootstrap import BootstrapConfig, BuildAccess, token_privilege_gaps
from packer_assets.pve.client import PveApi
from packer_assets.pve.guest_exec import host_key_fingerprints
from packer_assets.pve.smoke import BASE_STEPS, SmokeOptions, SmokeResult, SmokeStep, SmokeTestError, smoke_test
from packer_assets.pve.staging import StagedIso, upload_iso
from packer_assets.pve.templates import (
    Guest,
    Promotion,
    PruneResult,
    TemplateDescription,
    TemplateError,
    allocate_vmid,
    catalog_entry_json,
    destroy_build_vm,
    finish_template,
    input_fingerprint,
    is_up_to_date,
    leftover_vms,
    promote,
    promoted_template,
    prune,
    template_description,
    template_name,
    template_tags,
    withdraw,
)
from packer_assets.render import ANSWER_ISO_NAME, RenderResult, render_unattended
from packer_assets.render.record import RenderRecordError, ServedFiles, read_record, served_files, write_render_record
from packer_assets.upstream.digests import Checksum

RECORD = BUILD_RECORD_NAME
VM_RECORD = "build-vm.json"  # in the work directory from before packer starts until the build VM is settled


@dataclass(frozen=True)
class BuildSettings:
    """How builds run here (not what is built: that is the catalog)."""

    packer: str = "packer"
    allow_degraded: bool = False  # build without what the installed Packer cannot do (EFI/TPM on 1.6.6)
    ssh_host: str | None = None  # the lab: Debian's packer ignores loopback addresses from the agent
    ssh_port: int | None = None
    ssh_timeout: str | None = None
    ssh_ports: str | None = None  # PACKER_ASSETS_SSH_PORTS: a key's own port (the lab's real guests)
    guest_notes: str | None = None  # PACKER_ASSETS_GUEST_NOTES: what each key's guests are (proofs say it)
    boot_wait: str | None = None
    console_log: str | None = None  # PACKER_ASSETS_CONSOLE_LOG: a VM's serial console log, `{vmid}` filled in
    vm_watch_interval: float = POLL_INTERVAL  # seconds between status reads while packer waits for SSH (vmwatch)
    timeout: float = 4 * 3600
    grace: float = 60.0
    smoke_timeout: float = 600.0
    force: bool = False

    def ssh_port_for(self, key: str) -> int | None:
        return parse_ssh_ports(self.ssh_ports).get(key, self.ssh_port)


@dataclass
class BuildOutcome:
    key: str
    chain_id: str
    input_fingerprint: str
    skipped: bool  # up to date: nothing was built
    vmid: int | None
    name: str | None = None
    log_file: Path | None = None
    record_file: Path | None = None
    smoke: dict[str, Any] | None = None  # the smoke test's facts (passed builds only)
    smoke_error: str | None = None  # a failed smoke test (the new template was destroyed)
    smoke_steps: list[dict[str, Any]] = field(default_factory=list)  # its steps, up to the failed one
    previous_vmid: int | None = None
    pruned: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)  # leftovers of dead runs removed before this build
    registry_warning: str | None = None  # registry.json could not be rewritten (the build stands)


def rendered_hashes(served: ServedFiles) -> dict[str, str]:
    """name -> sha256 of what the installer is served: the files the render recorded (checked on disk by
    served_files), never another file of the folder; the answer ISO is built from these files."""
    return {name: digest for name, digest in sorted(served.files.items()) if name != ANSWER_ISO_NAME}


def served_render(layout: Layout, key: str, rendered_dir: Path) -> ServedFiles:
    """The files of the key's last render that passed its validators, unchanged (RenderRecordError else)."""
    return served_files(key, rendered_dir, _render_record(layout, key))


def plan_of(
    layout: Layout, entry: TemplateEntry, staged: dict[str, StagedIso], project_dir: Path, env: Mapping[str, str] | None
) -> tuple[str, str]:
    """(plan fingerprint, ISO checksums) of this build (plan.py), with the ISOs as staged."""
    isos = iso_checksums(entry, {}, {name: str(Checksum(iso.algorithm, iso.checksum)) for name, iso in staged.items()})
    return plan_fingerprint(
        entry, os.environ if env is None else env, SourceDigests(project_dir), plan_key(layout), isos
    ), isos


def input_fingerprint_of(
    entry: TemplateEntry, staged: dict[str, StagedIso], served: ServedFiles, project_dir: Path
) -> str:
    isos = ";".join(f"{name}={staged[name].algorithm}:{staged[name].checksum}" for name in sorted(staged))
    # template_sha256: the family's template AND templates/common/common.pkr.hcl, one input
    return input_fingerprint(
        isos, rendered_hashes(served), template_sha256(project_dir, entry), catalog_entry_json(entry)
    )


def plan_build(
    entry: TemplateEntry,
    settings: BuildSettings,
    *,
    vmid: int,
    name: str,
    node: str,
    iso_volid: str,
    extra_volids: Iterable[str] = (),
    vm_storage: str,
    vm_storage_type: str,
    bridge: str,
    http_bind_address: str | None,
    http_port: int,
    description: str = "",
) -> BuildPlan:
    """The one BuildPlan constructor (builds, validation and the benchmarks): the catalog entry and the
    build settings, placed on a node."""
    return BuildPlan(
        vm_id=vmid,
        vm_name=name,
        node=node,
        iso_file=iso_volid,
        vm_storage=vm_storage,
        vm_storage_type=vm_storage_type,
        bridge=bridge,
        http_bind_address=http_bind_address,
        http_port_min=http_port,
        http_port_max=http_port + 10,
        ssh_username=entry.install_user.name,
        ssh_host=settings.ssh_host,
        ssh_port=settings.ssh_port_for(entry.key) or 22,
        ssh_timeout=settings.ssh_timeout,
        extra_iso_files=tuple(extra_volids),
        description=description,
        tags=tuple(template_tags(entry.key)),
        boot_wait=settings.boot_wait,
        cpu_type=entry.hardware.cpu_type,
    )


def storage_type(api: PveApi, node: str, storage: str) -> str:
    # the node's storage list needs only Datastore.Audit (GET /storage/{id} wants Datastore.Allocate)
    for item in api.nodes(node).storage.get():
        if item["storage"] == storage:
            kind: str = item["type"]  # PVE's storage type: dir, lvmthin, zfspool, ...
            return kind
    raise RuntimeError(f"storage {storage!r} is not listed on node {node} (re-run proxmox_env)")


def _answer_iso(api: PveApi, access: BuildAccess, entry: TemplateEntry, served: ServedFiles) -> str | None:
    """Windows: the answer ISO the render built, uploaded (its recorded checksum verified while streaming)."""
    path, recorded = served.folder / ANSWER_ISO_NAME, served.files.get(ANSWER_ISO_NAME)
    if entry.family != "windows" or recorded is None:
        return None
    checksum = Checksum("sha256", recorded)
    staged = upload_iso(
        api, access.discovery.node, access.discovery.iso_storage, path, checksum, filename=f"{entry.key}-answers.iso"
    )
    return staged.volid


@dataclass(frozen=True)
class BuildJob:
    """What one build is given (build_template's argument), passed to each phase as one value."""

    layout: Layout
    entry: TemplateEntry
    access: BuildAccess
    credentials: BuildCredentials
    ssh_password: str
    staged: dict[str, StagedIso]
    rendered_dir: Path
    chain: ChainId
    settings: BuildSettings
    project_dir: Path
    run_id: str | None = None
    env: Mapping[str, str] | None = None
    on_stage: Callable[[str], None] | None = None
    cancel_event: Any = None
    echo: Callable[[str], None] = print

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def node(self) -> str:
        return self.access.discovery.node


@dataclass(frozen=True)
class Inputs:
    """prepare, first part: what the build is of, and whether the key's promoted template already is that."""

    started: datetime
    served: ServedFiles  # what the render wrote and validated, unchanged
    fingerprint: str
    planned: tuple[str, str]  # for the schedule's pre-check (plan.py)
    api: PveApi
    swept: list[str]
    up_to_date: bool
    current: int | None  # the key's promoted template (its VMID)


@dataclass(frozen=True)
class Prepared:
    """prepare, second part: the build VM's VMID and name, the work directory, the record of the VM."""

    caps: PackerCapabilities
    vmid: int
    name: str
    workdir: Path
    penv: PackerEnv
    prepared: Workdir
    redact: Redactor
    description: TemplateDescription
    vm_record: Path  # VM_RECORD: written before packer starts, unlinked once the VM is settled


@dataclass(frozen=True)
class Smoked:
    """smoke + SBOM: a template that passed; its facts as the record keeps them."""

    smoke: SmokeResult
    sbom: dict[str, Any]
    facts: dict[str, Any]
    warnings: list[str]


@dataclass(frozen=True)
class Promoted:
    promotion: Promotion
    pruned: PruneResult


def build_template(job: BuildJob) -> BuildOutcome:
    """prepare -> packer -> finish -> smoke + SBOM -> promote -> record (the module's docstring says why)."""
    layout, entry, chain = job.layout, job.entry, job.chain
    inputs = survey(job)
    if inputs.up_to_date and not job.settings.force:
        record_plan(layout, entry.key, *inputs.planned, inputs.current, None)
        return BuildOutcome(entry.key, str(chain), inputs.fingerprint, True, inputs.current, swept=inputs.swept)
    prep = prepare(job, inputs)
    with open_build_log(layout, entry.key, chain, prep.redact, echo=job.echo) as log:
        for line in inputs.swept:
            log.line("cleanup", line)
        for warning in prep.prepared.warnings:
            log.line("warning", warning)
        stages = packer_and_finish(job, inputs, prep, log)
        smoked = smoke_and_sbom(job, inputs, prep, log)
        if isinstance(smoked, BuildOutcome):  # the smoke test failed: the new template is gone
            return smoked
        stages["smoke"] = smoked.smoke.seconds
        record = build_record(job, inputs, prep, smoked, stages)
        # Recorded before the promotion: a run killed from here on leaves a promoted template whose build
        # the next run can still prove (repair.py), with the log up to this line.
        record_file = write_record(log.path, record)
        promoted = promote_and_prune(job, inputs, prep.vmid, log, record_file)
    return final_record(job, inputs, prep, smoked, promoted, record, log.path, record_file)


def survey(job: BuildJob) -> Inputs:
    """The build's input fingerprint and plan, the node swept of dead runs' leftovers, the up-to-date rule."""
    started = datetime.now(UTC)
    served = served_render(job.layout, job.key, job.rendered_dir)
    fingerprint = input_fingerprint_of(job.entry, job.staged, served, job.project_dir)
    planned = plan_of(job.layout, job.entry, job.staged, job.project_dir, job.env)
    api = job.access.connect()
    swept = sweep_leftovers(api, job.node, job.entry, job.layout)
    up_to_date, current = is_up_to_date(api, job.key, fingerprint)
    return Inputs(started, served, fingerprint, planned, api, swept, up_to_date, current)


def prepare(job: BuildJob, inputs: Inputs) -> Prepared:
    """Before packer: the token's privileges, a VMID, the placed plan, the work directory, the VM record."""
    api, found, key, staged = inputs.api, job.access.discovery, job.key, job.staged
    _grants, missing = token_privilege_gaps(api, found)
    if missing:  # before packer: a missing privilege would otherwise show up after a whole build
        lacks = "; ".join(f"{priv} on {path}" for path, priv in missing)
        raise BuildPrivilegeError(
            f"{key}: token {job.access.token_id} lacks {lacks}: nothing was built "
            "(run `make init` to set the role back, or grant it)"
        )
    caps = detect_packer(job.settings.packer)
    vmid, name = allocate_vmid(api, job.entry), template_name(key, inputs.started)
    plan = _placed_plan(job, inputs, vmid, name)
    workdir = job.layout.work_dir(key) / job.chain.stamp
    shutil.rmtree(workdir, ignore_errors=True)
    penv = packer_env(
        job.access.endpoint,
        caps,
        job.credentials,
        ssh_password=job.ssh_password,
        workdir=workdir.parent,
        base_env=job.env,
    )
    prepared = prepare_workdir(
        workdir,
        job.entry,
        plan,
        caps,
        project_dir=job.project_dir,
        http_dir=job.rendered_dir,
        http_files=inputs.served.files,
        allow_degraded=job.settings.allow_degraded,
        secrets=penv.secrets,
    )
    redact = Redactor([*penv.secrets, job.ssh_password])
    description = TemplateDescription(
        chain_id=str(job.chain),
        key=key,
        iso_url=job.entry.iso.url,
        iso_checksum=f"{staged['iso'].algorithm}:{staged['iso'].checksum}",
        iso_volid=staged["iso"].volid,
        input_fingerprint=inputs.fingerprint,
        built_at=inputs.started,
        tool_version=__version__,
        packer_version=caps.packer_version,
    )
    vm_record = atomic_write(workdir / VM_RECORD, json.dumps({"vmid": vmid, "name": name, "run_id": job.run_id}) + "\n")
    return Prepared(caps, vmid, name, workdir, penv, prepared, redact, description, vm_record)


def _placed_plan(job: BuildJob, inputs: Inputs, vmid: int, name: str) -> BuildPlan:
    """The BuildPlan on the discovered node: the ISOs as staged (and Windows' answer ISO, uploaded)."""
    api, found, staged = inputs.api, job.access.discovery, job.staged
    extra = [staged[n].volid for n in sorted(staged) if n != "iso"]
    answer = _answer_iso(api, job.access, job.entry, inputs.served)
    return plan_build(
        job.entry,
        job.settings,
        vmid=vmid,
        name=name,
        node=found.node,
        iso_volid=staged["iso"].volid,
        extra_volids=extra + ([answer] if answer else []),
        vm_storage=found.vm_storage,
        vm_storage_type=storage_type(api, found.node, found.vm_storage),
        bridge=found.bridge,
        http_bind_address=found.http_bind_address,
        http_port=found.http_port,
        description=f"packer-assets {job.key} {job.chain} (building)",
    )


def packer_and_finish(job: BuildJob, inputs: Inputs, prep: Prepared, log: RunLog) -> dict[str, float]:
    """packer (init, then build), then the template finished through the API; the stage timings. Any
    failure destroys the build VM (its record goes once nothing of it is left) and is raised."""
    stages: dict[str, float] = {}
    try:
        stages["packer"] = run_packer_phase(job, prep, log, build_vm_watch(job, inputs, prep, log))
        finish_template(
            inputs.api,
            job.node,
            prep.vmid,
            family=job.entry.family,
            vm_storage=job.access.discovery.vm_storage,
            description=prep.description,
            name=prep.name,
            tags=job.entry.tags,
        )
        log.line("finish", f"template {prep.vmid} ({prep.name}) finished: ISO ejected, description and tags written")
    except BaseException as exc:
        log.line("error", f"{type(exc).__name__}: {prep.redact(str(exc))}")
        if _destroy(inputs.api, job.node, prep.vmid, job.entry, log):
            prep.vm_record.unlink(missing_ok=True)
        raise
    return stages


def build_vm_watch(job: BuildJob, inputs: Inputs, prep: Prepared, log: RunLog) -> VmWatch:
    """The watch that ends the build when its VM stops while packer waits for SSH (vmwatch.py)."""
    vm = WatchedVm(inputs.api, job.node, prep.vmid, job.settings.console_log)
    return VmWatch(
        vm, interval=job.settings.vm_watch_interval, redact=prep.redact, note=lambda text: log.line("vm-watch", text)
    )


def run_packer_phase(job: BuildJob, prep: Prepared, log: RunLog, watch: VmWatch | None = None) -> float:
    """`packer init` when the plugins need it, then `packer build`: its duration (seconds, rounded)."""
    settings, penv = job.settings, prep.penv
    if prep.caps.needs_init:  # installs the plugins required_plugins names
        init = packer_init(prep.workdir, penv.env, packer=settings.packer, redact=prep.redact)
        for line in init.output.splitlines():
            log.line("packer-init", line)
        if not init.ok:
            raise PackerError(f"packer init failed (exit {init.exit_code}); log: {log.path}", log_path=log.path)
    result = run_packer(
        prep.workdir,
        penv.env,
        log,
        timeout=settings.timeout,
        on_stage=job.on_stage,
        cancel_event=job.cancel_event,
        grace=settings.grace,
        packer=settings.packer,
        watch=watch,
    )
    return round(result.duration, 3)


def smoke_and_sbom(job: BuildJob, inputs: Inputs, prep: Prepared, log: RunLog) -> Smoked | BuildOutcome:
    """The smoke test on a clone and the SBOM of its packages. A failed test (or SBOM) destroys the new
    template and is the outcome; an internal error logs its traceback, destroys the template and is raised."""
    settings, redact, vmid = job.settings, prep.redact, prep.vmid
    ssh_address = (settings.ssh_host, settings.ssh_port_for(job.key) or 22) if settings.ssh_host else None
    try:
        smoke = smoke_test(
            inputs.api,
            job.node,
            vmid,
            job.entry,
            options=SmokeOptions(timeout=settings.smoke_timeout, ssh_address=ssh_address),
        )
        for step in smoke.steps:
            log.line(
                "smoke",
                redact(f"{step.name}: passed in {step.seconds:.1f} s" + (f" ({step.detail})" if step.detail else "")),
            )
        sbom = write_template_sbom(log.path.parent, smoke, job, prep.name, inputs.started)
    except (SmokeTestError, SbomError) as exc:
        return _smoke_failed(job, inputs, prep, log, exc)
    except Exception as exc:  # no verdict on the template (SmokeInternalError: our bug): it goes, the build fails
        log.line("error", redact(f"{type(exc).__name__}: {exc}"))
        for line in "".join(traceback.format_exception(exc)).splitlines():
            log.line("traceback", redact(line))
        log.line("smoke", f"the smoke test did not finish: destroying the new template {vmid}, the promoted one stays")
        if _destroy(inputs.api, job.node, vmid, job.entry, log):
            prep.vm_record.unlink(missing_ok=True)
        raise
    return _passed(job, prep, log, smoke, sbom)


def _smoke_failed(
    job: BuildJob, inputs: Inputs, prep: Prepared, log: RunLog, exc: SmokeTestError | SbomError
) -> BuildOutcome:
    redact, vmid = prep.redact, prep.vmid
    for step in getattr(exc, "steps", ()):
        log.line(
            "smoke",
            redact(
                f"{step.name}: {'passed' if step.passed else 'FAILED'}" + (f" ({step.detail})" if step.detail else "")
            ),
        )
    log.line("smoke", redact(f"FAILED: {exc}; destroying the new template {vmid}, the promoted one stays"))
    if _destroy(inputs.api, job.node, vmid, job.entry, log):
        prep.vm_record.unlink(missing_ok=True)
    return BuildOutcome(
        job.key,
        str(job.chain),
        inputs.fingerprint,
        False,
        vmid,
        prep.name,
        log.path,
        smoke_error=_named(job.key, redact(str(exc))),
        smoke_steps=[_step_facts(s, redact) for s in getattr(exc, "steps", ())],
        swept=inputs.swept,
    )


def _passed(job: BuildJob, prep: Prepared, log: RunLog, smoke: SmokeResult, sbom: dict[str, Any]) -> Smoked:
    """A template that passed: its warnings logged, its VM record gone (no longer a build VM), its facts."""
    redact = prep.redact
    warnings = [*prep.prepared.warnings, *map(redact, smoke.warnings)]  # checks passed with a warning (cloud-init 2)
    for warning in smoke.warnings:
        log.line("warning", redact(warning))
    log.line(
        "smoke",
        f"passed: clone {smoke.clone_vmid} booted {smoke.found_os} (expected {smoke.expected_os}), "
        f"agent answered, ips {smoke.ips}, {sbom['packages']} packages in {SBOM_FILE}",
    )
    prep.vm_record.unlink(missing_ok=True)  # a template that passed: no longer a build VM
    facts = {
        "clone_vmid": smoke.clone_vmid,
        "os": smoke.os_name,
        "found_os": smoke.found_os,
        "expected_os": smoke.expected_os,
        "ips": smoke.ips,
        "seconds": smoke.seconds,
        "machine_id": smoke.machine_id,
        "host_keys": host_key_fingerprints(smoke.host_keys),
        "steps": [_step_facts(s, redact) for s in smoke.steps],
        "packages": sbom["packages"],
    }
    return Smoked(smoke, sbom, facts, warnings)


def build_record(
    job: BuildJob, inputs: Inputs, prep: Prepared, smoked: Smoked, stages: dict[str, float]
) -> dict[str, Any]:
    """The build record as written before the promotion (previous template and prune filled in after)."""
    key, iso = job.key, job.staged["iso"]
    return {
        "chain_id": str(job.chain),
        "key": key,
        "dagster_run_id": job.run_id,
        "tool_version": __version__,
        "template": {
            "vmid": prep.vmid,
            "name": prep.name,
            "node": job.node,
            "tags": template_tags(key, job.entry.tags),
        },
        "iso": {
            "url": job.entry.iso.url,
            "effective_url": iso.source,
            "checksum": f"{iso.algorithm}:{iso.checksum}",
            "checksum_source": job.entry.iso.checksum_source,
            "signed_by": job.entry.iso.signed_by,
            "volid": iso.volid,
        },
        "rendered_files": rendered_hashes(inputs.served),
        "validated_by": inputs.served.validated_by or {},
        "packer_version": prep.caps.packer_version,
        "packer_template_sha256": prep.prepared.template_sha256,
        "timings": {"started_at": inputs.started.isoformat(), "stages": stages},
        "smoke": smoked.facts,
        "input_fingerprint": inputs.fingerprint,
        "previous_template_vmid": inputs.current,
        "pruned_vmids": [],
        "warnings": smoked.warnings,
        "sbom": smoked.sbom,
        "guest": guest_note(job.settings.guest_notes, key),
        "eol": end_of_life(key, job.entry.eol).facts(),  # as the end_of_life check saw it at this build
    }


def promote_and_prune(job: BuildJob, inputs: Inputs, vmid: int, log: RunLog, record_file: Path) -> Promoted:
    """The tag moved to the new template, the plan recorded, old templates pruned; any failure withdraws
    the new template (its promotion given back) and raises (_withdrawn)."""
    api, node, key = inputs.api, job.node, job.key
    before = None  # the promoted template, which gets the tag back should anything below fail
    try:
        before = promoted_template(api, key)
        promotion = promote(api, node, key, vmid)
        record_plan(job.layout, key, *inputs.planned, vmid, str(job.chain))
        pruned = prune(api, node, key, job.entry.retention, keep={vmid})
    except Exception as exc:  # noqa: BLE001 - past the smoke test: the template is withdrawn, never left behind
        raise _withdrawn(api, node, job.entry, vmid, before, exc, log, record_file) from None
    log.line(
        "promote",
        f"{vmid} is now packer-assets-latest (before: {promotion.previous}); pruned {pruned.destroyed or 'nothing'}",
    )
    for vm, why in pruned.failed.items():
        log.line("warning", f"prune of {vm} failed: {why}")
    return Promoted(promotion, pruned)


def final_record(
    job: BuildJob,
    inputs: Inputs,
    prep: Prepared,
    smoked: Smoked,
    promoted: Promoted,
    record: dict[str, Any],
    log_file: Path,
    record_file: Path,
) -> BuildOutcome:
    """The record rewritten with the whole log (promotion and prune in it), old work directories pruned,
    registry.json rewritten (a failure there is the outcome's warning)."""
    previous = promoted.promotion.previous[0] if promoted.promotion.previous else None
    pruned = list(promoted.pruned.destroyed)
    outcome = BuildOutcome(
        job.key,
        str(job.chain),
        inputs.fingerprint,
        False,
        prep.vmid,
        prep.name,
        log_file,
        smoke=smoked.facts,
        previous_vmid=previous,
        pruned=pruned,
        warnings=list(smoked.warnings),
        swept=inputs.swept,
        record_file=record_file,
    )
    record.update(previous_template_vmid=previous, pruned_vmids=list(pruned))
    record["timings"]["finished_at"] = datetime.now(UTC).isoformat()
    write_record(log_file, record)  # the whole log now: the promotion and the prune are in it
    prune_work_dirs(job.layout, job.entry)
    outcome.registry_warning = update_registry(job.layout, inputs.api, job.project_dir, job.chain, job.echo, job.env)
    return outcome


def write_record(log_file: Path, record: dict[str, Any]) -> Path:
    """The build record beside its log, naming the log as it is now (sha256 and size): its proof carries
    exactly those bytes, even when the log grew after the record (a run killed after this write)."""
    record.update(log_sha256=sha256_file(log_file), log_bytes=Path(log_file).stat().st_size)
    record["timings"].setdefault("finished_at", datetime.now(UTC).isoformat())
    return atomic_write(Path(log_file).parent / RECORD, json.dumps(record, indent=2, default=str) + "\n")


def update_registry(
    layout: Layout,
    api: PveApi,
    project_dir: Path,
    chain: ChainId,
    echo: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """registry.json rewritten after a promotion and prune (every catalog key, read from the node). A
    failure is a warning, never a failed build: the template is built, promoted and recorded, and the
    next write (a build, a proof, `packer-assets channel`, the template_registry asset) catches up."""
    try:
        write_registry(layout, api, load_catalog(env=env, project_dir=project_dir))
    except Exception as exc:  # noqa: BLE001 - reported; the build it follows succeeded
        warning = f"registry {layout.registry_file} not rewritten: {type(exc).__name__}: {exc}"
        echo(f"{log_header(chain, 'warning')} {warning}")
        return warning
    return None


def _named(key: str, text: str) -> str:
    """An error as the UI lists it per key: starting with the key (a SmokeTestError's message already does)."""
    return text if text.startswith(f"{key}: ") else f"{key}: {text}"


def _step_facts(step: SmokeStep, redact: Redactor) -> dict[str, Any]:
    return {"name": step.name, "passed": step.passed, "seconds": round(step.seconds, 3), "detail": redact(step.detail)}


def write_template_sbom(
    folder: Path, smoke: SmokeResult, job: BuildJob, name: str, started: datetime
) -> dict[str, Any]:
    """The clone's packages as a validated CycloneDX SBOM in the build's log folder (the proof copies it), saying
    what the guest was (the key's guest note); returns what the record keeps of it: file name, sha256, count."""
    entry, chain = job.entry, job.chain
    bom = build_sbom(
        smoke.packages,
        family=entry.family,
        os_id=str(smoke.os_info.get("id") or entry.expected_os.id),
        os_version=str(smoke.os_info.get("version-id") or ""),
        template_name=name,
        key=entry.key,
        chain_id=str(chain),
        timestamp=started,
        guest=guest_note(job.settings.guest_notes, entry.key),
    )
    validate_sbom(bom)
    path = atomic_write(Path(folder) / SBOM_FILE, sbom_json(bom))
    return {"file": SBOM_FILE, "sha256": sha256_file(path), "packages": package_count(bom)}


def _withdrawn(
    api: PveApi,
    node: str,
    entry: TemplateEntry,
    vmid: int,
    before: Guest | None,
    exc: Exception,
    log: RunLog,
    record_file: Path,
) -> TemplateError:
    """The error (one line) of a template that failed after its smoke test, once withdraw() took its
    promotion back and destroyed it (its record goes too: no proof follows a destroyed template)."""
    said = (str(exc).splitlines() or [""])[0].removeprefix(f"{entry.key}: ")
    said = said if isinstance(exc, PackerAssetsError) else f"{type(exc).__name__}: {said}"
    failed = f"{entry.key}: VM {vmid} failed after its smoke test: {said}"
    log.line("error", failed)
    try:
        destroyed, done = withdraw(api, node, entry, vmid, before)
    except Exception as undo:  # noqa: BLE001 - reported with the original failure, never hiding it
        destroyed, done = False, f"could not withdraw VM {vmid}: {undo}"
    if destroyed:
        record_file.unlink(missing_ok=True)
    log.line("cleanup", done)
    return TemplateError(f"{failed}; {done}")


def _destroy(api: PveApi, node: str, vmid: int, entry: TemplateEntry, log: RunLog) -> bool:
    """True when nothing of the build VM is left."""
    try:
        if destroy_build_vm(api, node, vmid, entry):
            log.line("cleanup", f"build VM {vmid} destroyed")
        return True
    except Exception as exc:  # noqa: BLE001 - reported, never hiding the original failure
        log.line("cleanup", f"could not destroy build VM {vmid}: {exc} (the key's next build removes it)")
        return False


def sweep_leftovers(api: PveApi, node: str, entry: TemplateEntry, layout: Layout) -> list[str]:
    """Remove what dead runs of the key left on the node; one line per thing removed.

    The caller holds the key's lock, so no live run of the key owns any of it: build VMs, smoke clones
    and placeholders of the key that are not templates (found by name in the key's VMID range), and
    the VMIDs of build records whose build never settled (packer allocates disks before the VM exists,
    so a record may name a VMID with disks and no VM)."""
    lines = []
    for guest in leftover_vms(api, entry.key, entry.vmid_range):
        destroy_build_vm(api, guest.node or node, guest.vmid, entry)
        lines.append(
            f"leftover VM {guest.vmid} ({guest.name}, {guest.status}) of a run that did not finish: "
            "stopped and destroyed"
        )
    for record in sorted(layout.work_dir(entry.key).glob(f"*/{VM_RECORD}")):
        try:
            vmid = int(json.loads(record.read_text())["vmid"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if vmid in entry.vmid_range and destroy_build_vm(api, node, vmid, entry):
            lines.append(f"leftovers of build VM {vmid} (record {record.parent.name}) removed")
        record.unlink(missing_ok=True)
    return lines


def prune_work_dirs(layout: Layout, entry: TemplateEntry) -> list[Path]:
    """After a successful build: keep the work directories of the key's last `work_dirs` successful
    builds; those of failed builds before it go (a failed build's stays until this next success)."""
    removed, kept = [], 0
    for folder in sorted(
        (p for p in layout.work_dir(entry.key).iterdir() if p.is_dir() and p.name[:1].isdigit()), reverse=True
    ):
        succeeded = (layout.build_log_dir(entry.key, folder.name) / RECORD).is_file()
        if succeeded and kept < entry.work_dirs:
            kept += 1
            continue
        if succeeded or kept:  # a failure older than a success: done with it
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class BuildPrivilegeError(OperationError):
    """The token lacks a privilege a build needs: found before packer starts."""


class NoPromotedBuild(OperationError):
    """The key has no promoted template whose build record is in this output root: nothing to prove."""


def promoted_record(layout: Layout, api: PveApi, key: str) -> tuple[Path, dict[str, Any]]:
    """(log folder, record) of the build of the key's promoted template, found by the chain ID in the
    template's description, whatever the logs' `latest` points at (a failed or interrupted build after
    it keeps its log, and must not hide the build that is in use)."""
    guest = promoted_template(api, key)
    if guest is None:
        raise NoPromotedBuild(f"{key}: no template is promoted (tag packer-assets-latest) on the node: build it first")
    described = template_description(api, guest)
    if described is None:
        raise NoPromotedBuild(
            f"{key}: promoted template {guest.vmid} has no packer-assets description: it was not built by this tool"
        )
    folder = layout.build_log_dir(key, parse_chain_id(described.chain_id).stamp)
    record = folder / RECORD
    if not record.is_file():
        raise NoPromotedBuild(
            f"{key}: the record of promoted template {guest.vmid} ({described.chain_id}) is not "
            f"in this output root: {record} is missing"
        )
    built = json.loads(record.read_text())
    # the proof names the template's tags as they are now (promotion, channels), not as the build left them
    return folder, {**built, "template": {**built["template"], "tags": sorted(guest.tags)}}


def write_proof(layout: Layout, record: dict[str, Any], log_file: Path, signer: Signer | None = None) -> Path:
    """template_proof: the bundle of a build that passed its checks (the record exists only then), with
    its SBOM and the package changes since the key's previous proved template."""
    sbom_ref, sbom_file = None, None
    if record.get("sbom"):
        sbom_file = Path(log_file).parent / record["sbom"]["file"]
        stamp = parse_chain_id(record["chain_id"]).stamp
        sbom_ref = SbomRef(
            sha256=record["sbom"]["sha256"],
            packages=record["sbom"]["packages"],
            changes=package_changes(layout, record["key"], stamp, sbom_file),
        )
    proof = BuildProof(
        chain_id=record["chain_id"],
        key=record["key"],
        dagster_run_id=record.get("dagster_run_id"),
        template=TemplateRef(**record["template"]),
        iso=IsoRef(**record["iso"]),
        rendered_files=record["rendered_files"],
        validated_by=record.get("validated_by") or {},
        packer_template_sha256=record.get("packer_template_sha256"),
        packer_version=record["packer_version"],
        timings=Timings(**record["timings"]),
        checks=[
            CheckResult(
                name="smoke_test",
                passed=True,
                description=f"clone {record['smoke']['clone_vmid']} booted {record['smoke']['os']} "
                f"(found {record['smoke'].get('found_os', '?')}, expected "
                f"{record['smoke'].get('expected_os', '?')}), guest agent answered with "
                f"{record['smoke']['ips']}" + _checks_passed(record["smoke"]),
                details=record["smoke"],
            )
        ],
        log_sha256=record["log_sha256"],
        input_fingerprint=record["input_fingerprint"],
        tool_version=record["tool_version"],
        previous_template_vmid=record.get("previous_template_vmid"),
        pruned_vmids=record.get("pruned_vmids", []),
        sbom=sbom_ref,
        warnings=record.get("warnings", []),
        guest=record.get("guest"),
        eol=EndOfLifeRef(**record["eol"]) if record.get("eol") else None,
    )
    with recorded_log(Path(log_file), record.get("log_bytes")) as log_copy:
        proof_dir = write_build_proof(layout, proof, log_copy, sbom_file, signer)
    try:  # the proof path in registry.json; a failure is a warning, the proof stands
        record_proof(layout, record["key"], record["chain_id"])
    except Exception as exc:  # noqa: BLE001 - reported; the proof stands and the next registry write catches up
        print(
            f"{log_header(record['chain_id'], 'warning')} registry {layout.registry_file} not updated with the "
            f"proof: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
    return proof_dir


@contextmanager
def recorded_log(log_file: Path, size: int | None) -> Iterator[Path]:
    """The log as its record named it: its first `size` bytes (a copy) when it grew after the record."""
    if size is None or log_file.stat().st_size == size:
        yield log_file
        return
    with tempfile.TemporaryDirectory(prefix=".recorded-log-", dir=log_file.parent) as tmp:
        copy = Path(tmp) / log_file.name
        with open(log_file, "rb") as source, open(copy, "wb") as target:
            target.write(source.read(size))
        yield copy


def _checks_passed(smoke: dict[str, Any]) -> str:
    guest = [s["name"] for s in smoke.get("steps", []) if s["name"] not in BASE_STEPS]
    return f"; in the clone: {', '.join(guest)} passed" if guest else ""


def package_changes(layout: Layout, key: str, stamp: str, sbom_file: Path) -> PackageChanges | None:
    """The SBOM's diff against the key's previous proved SBOM (None: the key's first)."""
    found = previous_sbom(layout, key, stamp)
    if found is None:
        return None
    chain_id, previous = found
    diff = diff_sboms(json.loads(previous.read_text()), json.loads(Path(sbom_file).read_text()))
    return PackageChanges(
        previous_chain_id=chain_id,
        added=[f"{n} {v}" for n, v in diff.added],
        removed=[f"{n} {v}" for n, v in diff.removed],
        changed=[f"{n} {old} -> {new}" for n, old, new in diff.changed],
    )


def render_and_validate(
    layout: Layout,
    entry: TemplateEntry,
    env: Mapping[str, str],
    settings: BuildSettings,
    *,
    project_dir: Path,
    reuse: bool = False,
) -> tuple["RenderResult | CachedRender", PackerCheck]:
    """unattended_files and `packer-assets validate`: render the key's files (each checked by its own
    validator; RenderError if one fails, the previous render kept), then `packer validate` on them.

    reuse (unattended_files): when the inputs are those of the last render that passed `packer validate`
    (plan.render_key: catalog entry, template folders, secrets as an HMAC, the Packer binary and the
    settings) and its files are on disk unchanged, that render and its validation stand: no crypt hash,
    no validators, no Packer. `packer-assets validate` never reuses: checking is what it is for.

    Either way the render's record (the files it wrote and its validators passed) is written as soon as
    the files are: builds serve exactly those (render/record.py); its render_key only once `packer
    validate` passed too, so only such a render is ever reused."""
    key = render_key(entry, env, SourceDigests(project_dir), plan_key(layout), _validator(settings)) if reuse else None
    cached = _cached_render(layout, entry.key, key) if key else None
    if cached is not None:
        return cached, PackerCheck(
            True,
            0,
            "inputs unchanged since the last render that passed packer validate; its validation stands",
            ["packer", "validate", "(cached)"],
        )
    result = render_unattended(entry, env, layout.rendered_dir(entry.key), project_dir=project_dir)
    record = _render_record(layout, entry.key)
    write_render_record(record, None, result.metadata(), result.written())
    check = validate_build(
        entry,
        result.out_dir,
        layout.work_dir(entry.key),
        settings,
        project_dir=project_dir,
        http_files=result.written(),
    )
    if key and check.ok:
        write_render_record(record, key, result.metadata(), result.written(), check.argv)
    return result, check


@dataclass(frozen=True)
class CachedRender:
    """A render found unchanged on disk: what unattended_files reports of it (RenderResult's reporting part)."""

    out_dir: Path
    content_hash: str
    recorded: dict[str, Any]
    ignored: tuple[str, ...] = ()  # other files found in out_dir: not the render's, never served

    def metadata(self) -> dict[str, Any]:
        return self.recorded


def _render_record(layout: Layout, key: str) -> Path:
    return layout.output_root / "output" / "state" / "render" / f"{key}.json"


def _validator(settings: BuildSettings) -> dict[str, str]:
    """The validating Packer (path, size, mtime: a new binary validates anew) and the settings that shape
    the prepared work directory."""
    binary = shutil.which(settings.packer) or settings.packer
    try:
        info = os.stat(binary)
        identity = f"{os.path.realpath(binary)}:{info.st_size}:{info.st_mtime_ns}"
    except OSError:
        identity = f"{binary}:missing"
    shape = {k: str(v) for k, v in vars(settings).items() if k not in ("force", "timeout", "grace", "smoke_timeout")}
    return {"packer": identity, **shape}


def _cached_render(layout: Layout, key: str, render_key_now: str) -> CachedRender | None:
    """The last validated render, if its key matches and every file it wrote is on disk unchanged. Other
    files in the folder neither make nor break it: they are named (ignored), never served."""
    record = read_record(_render_record(layout, key))
    if record is None or record.get("render_key") != render_key_now or not record["files"]:
        return None
    try:
        served = served_files(key, layout.rendered_dir(key), _render_record(layout, key))
    except RenderRecordError:
        return None
    return CachedRender(served.folder, record["metadata"]["content_hash"], record["metadata"], served.ignored)


def validate_build(
    entry: TemplateEntry,
    rendered_dir: Path,
    work_parent: Path,
    settings: BuildSettings,
    *,
    project_dir: Path,
    http_files: Mapping[str, str] | None = None,
) -> PackerCheck:
    """`packer validate` of the key's template on a work directory prepared as a build would be, with
    placeholder node values (validate checks the builder config without connecting). The directory is
    this call's own (`<work_parent>/validate-*`, removed after): validations of one key at once never
    share one."""
    caps = detect_packer(settings.packer)
    plan = plan_build(
        entry,
        settings,
        vmid=entry.vmid_range.first,
        name=template_name(entry.key),
        node="validate",
        iso_volid=f"local:iso/{entry.iso.filename}",
        extra_volids=[f"local:iso/{x.filename}" for x in entry.extra_isos],
        vm_storage="local-lvm",
        vm_storage_type="lvmthin",
        bridge="vmbr0",
        http_bind_address=None,
        http_port=BootstrapConfig().http_port,
    )
    Path(work_parent).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="validate-", dir=work_parent))
    try:
        prepare_workdir(
            workdir,
            entry,
            plan,
            caps,
            project_dir=project_dir,
            http_dir=rendered_dir,
            http_files=http_files,
            allow_degraded=settings.allow_degraded,
        )
        return packer_validate(workdir, validate_env().env, packer=settings.packer)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
