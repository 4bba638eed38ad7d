"""The smoke test of a new template: clone it, boot the clone, hear from its guest agent, remove the clone.

What `test-template.sh` did, without leaving clones behind: the clone is stopped and destroyed in
every case (a `finally`), and a failure to clean up is reported, never hidden: in the error of a
failed test, or as a failure of its own (step `cleanup`) after a passing one.

Steps, as errors name them: clone, configure, start, agent, osinfo, identity (the OS found is the one the
key's catalog entry expects: `expected_os`), network, then the guest checks of the key's family and the
catalog's `smoke.commands` (guest_checks.py: cloud_init, fresh_identity, ssh_login, password_locked,
guest_agent_enabled, ...), inventory (the installed packages, for the SBOM), cleanup.

What fails a step is the guest's answer (or the node's): a SmokeTestError, "the template failed". A
KeyError, ValueError, TypeError, AttributeError or IndexError inside a step is our own code failing on
what came back: a SmokeInternalError, named a packer-assets bug, its traceback kept (`__cause__`), so a
parsing bug is never reported as a broken template (the build still destroys the new template).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from proxmoxer.core import ResourceException

from packer_assets.catalog import TemplateEntry
from packer_assets.errors import ConfigError, OperationError
from packer_assets.inspection.guest_checks import GuestCheck, checks_for, parse_identity
from packer_assets.inspection.sbom import Package, SbomError, inventory_command, parse_inventory
from packer_assets.pve.client import PveApi, PveResource
from packer_assets.pve.guest_exec import EphemeralKey, GuestExecTimeout, GuestOutput, SshLoginError, agent_exec, ssh_run
from packer_assets.pve.tasks import TASK_TIMEOUT, TaskError, run_task, said
from packer_assets.pve.templates import (
    SMOKE_TAG,
    TOOL_TAG,
    TemplateError,
    allocate_vmid,
    cloudinit_drive,
    destroy_vm,
    find_guest,
    join_tags,
)

DEFAULT_CI_USER = "packer-smoke"
# The steps every smoke test has (the guest checks of guest_checks.py come between network and inventory).
BASE_STEPS = ("clone", "configure", "start", "agent", "osinfo", "identity", "network", "inventory", "cleanup")
# Interfaces that say nothing about the template's network.
LOOPBACK_NAMES = ("lo", "Loopback Pseudo-Interface 1")


class SmokeTestError(OperationError):
    """The smoke test failed at `step`; the message names the step, the template and the clone."""

    def __init__(
        self,
        step: str,
        template_vmid: int,
        clone_vmid: int | None,
        key: str,
        reason: str,
        cleanup: str | None = None,
        steps: tuple[SmokeStep, ...] = (),
    ):
        self.step, self.template_vmid, self.clone_vmid, self.key = step, template_vmid, clone_vmid, key
        self.reason, self.cleanup, self.steps = reason, cleanup, steps
        text = (
            f"{key}: smoke test of template {template_vmid} failed at step {step!r} "
            f"(clone {clone_vmid if clone_vmid is not None else '-'}): {reason}"
        )
        super().__init__(text + (f"; cleanup: {cleanup}" if cleanup else ""))


class SmokeInternalError(OperationError):
    """A bug in packer-assets' smoke-test code at `step` (its cause, with the traceback, is `__cause__`):
    no verdict on the template."""

    def __init__(self, step: str, template_vmid: int, key: str, exc: BaseException):
        self.step, self.template_vmid, self.key = step, template_vmid, key
        self.steps: tuple[SmokeStep, ...] = ()
        super().__init__(
            f"{key}: smoke test of template {template_vmid}: internal error at step {step!r}: "
            f"{type(exc).__name__}: {exc}: a bug in packer-assets, not a fault of the template "
            "(the traceback is in the build log)"
        )


# Our own code failing on what it read (a bug), as opposed to the guest or the node failing.
INTERNAL_ERRORS = (KeyError, ValueError, TypeError, AttributeError, IndexError)


@dataclass(frozen=True)
class SmokeStep:
    name: str
    seconds: float
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class SmokeResult:
    template_vmid: int
    clone_vmid: int
    os_info: dict[str, Any]
    interfaces: list[dict[str, Any]]
    ips: list[str]
    seconds: float
    steps: tuple[SmokeStep, ...] = field(default_factory=tuple)

    expected_os: str = ""
    packages: tuple[Package, ...] = ()
    machine_id: str | None = None
    host_keys: tuple[str, ...] = ()  # `type base64` of the clone's SSH host keys
    warnings: tuple[str, ...] = ()  # checks that passed with a warning (cloud-init's exit 2), each naming why

    @property
    def os_name(self) -> str:
        return str(self.os_info.get("pretty-name") or self.os_info.get("name") or "unknown OS")

    @property
    def found_os(self) -> str:
        """`<id> <version-id>` as the agent reported them (what expected_os is compared with)."""
        return found_os(self.os_info)


def found_os(os_info: dict[str, Any]) -> str:
    return f"{os_info.get('id') or '?'} {os_info.get('version-id') or '?'}"


def encode_sshkeys(keys: str) -> str:
    """`sshkeys` as PVE wants it: percent-encoded once more than the form encoding.

    PVE's schema (format `urlencoded`) accepts only `[-%a-zA-Z0-9_.!~*'()]`, and it URI-unescapes the
    value again when it writes the cloud-init data. So the value handed to proxmoxer is
    `quote(keys, safe="")` (spaces as %20, not `+`, which PVE would keep as `+`), and on the wire it
    is encoded twice: `ssh-ed25519%2520AAAA...`.
    """
    return quote(keys.strip() + "\n", safe="")


def guest_ips(interfaces: list[dict[str, Any]]) -> list[str]:
    """Addresses of the guest's real interfaces: no loopback interface, no link-local address."""
    ips = []
    for iface in interfaces:
        if iface.get("name") in LOOPBACK_NAMES:
            continue
        for addr in iface.get("ip-addresses") or []:
            ip = str(addr.get("ip-address", ""))
            if ip and not ip.lower().startswith("fe80:") and not ip.startswith("169.254."):
                ips.append(ip)
    return ips


class _Run:
    """Step bookkeeping: times each step; turns any failure in it into one SmokeTestError naming it."""

    def __init__(self, key: str, template_vmid: int):
        self.key, self.template_vmid = key, template_vmid
        self.clone_vmid: int | None = None
        self.clone_name: str | None = None
        self.created = False  # True once PVE accepted our clone request: from then on the VMID is ours
        self.steps: list[SmokeStep] = []
        self.detail = ""  # what the current step saw, for its record (set inside the step)
        self.warnings: list[str] = []

    def error(self, step: str, reason: str) -> SmokeTestError:
        return SmokeTestError(step, self.template_vmid, self.clone_vmid, self.key, reason)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started, self.detail = time.monotonic(), ""
        try:
            yield
        except SmokeTestError:
            self.steps.append(SmokeStep(name, time.monotonic() - started, False, self.detail))
            raise
        except (ResourceException, TemplateError, TaskError, OSError, SbomError, ConfigError) as exc:
            reason = said(exc) if isinstance(exc, ResourceException) else str(exc)
            self.steps.append(SmokeStep(name, time.monotonic() - started, False, reason))
            raise self.error(name, reason) from exc
        except INTERNAL_ERRORS as exc:
            self.steps.append(
                SmokeStep(name, time.monotonic() - started, False, f"internal error: {type(exc).__name__}")
            )
            raise SmokeInternalError(name, self.template_vmid, self.key, exc) from exc
        self.steps.append(SmokeStep(name, time.monotonic() - started, True, self.detail))
        self.detail = ""


def _poll(run: _Run, step: str, deadline: float, poll: float, attempt: Callable[[], Any]) -> Any:
    """attempt() until it returns something truthy; a 500 (agent not up yet) is retried, others are not."""
    last = "no answer"
    while True:
        try:
            answer = attempt()
            if answer:
                return answer
            last = "no usable answer yet"
        except ResourceException as exc:
            if exc.status_code != 500:
                raise
            last = said(exc)
        if time.monotonic() >= deadline:
            raise run.error(step, f"gave up after waiting; last: {last}")
        time.sleep(poll)


@dataclass(frozen=True)
class SmokeOptions:
    """How one smoke test runs (smoke_test's docstring says what each does); the defaults are the build's."""

    clone_vmid: int | None = None  # as asked for (None: allocated in the key's range)
    ssh_public_key: str | None = None
    ci_user: str = DEFAULT_CI_USER
    storage: str | None = None
    timeout: float = 600.0
    task_timeout: float = TASK_TIMEOUT
    poll: float = 2.0
    ssh_address: tuple[str, int] | None = None


DEFAULT_OPTIONS = SmokeOptions()


@dataclass(frozen=True)
class SmokeContext:
    """What every step of one smoke test reads: smoke_test's arguments, its step bookkeeping and login key."""

    api: PveApi
    node: str
    template_vmid: int
    entry: TemplateEntry
    run: _Run
    login: EphemeralKey  # the key pair made for this test (Linux: in the clone's cloud-init keys)
    options: SmokeOptions

    @property
    def linux(self) -> bool:
        return self.entry.family != "windows"


@dataclass(frozen=True)
class Observed:
    """What the steps saw of the clone (smoke_test adds the timings, steps and warnings)."""

    clone_vmid: int
    os_info: dict[str, Any]
    interfaces: list[dict[str, Any]]
    ips: list[str]
    packages: tuple[Package, ...]
    machine_id: str | None
    host_keys: list[str]


def smoke_test(
    api: PveApi,
    node: str,
    template_vmid: int,
    entry: TemplateEntry,
    *,
    options: SmokeOptions = DEFAULT_OPTIONS,
) -> SmokeResult:
    """Full-clone template_vmid to clone_vmid (a free VMID of the key's range; allocated when None),
    set a cloud-init user and SSH keys (Linux: `ssh_public_key` if given, and a key pair made for this
    test; Windows templates have no cloud-init drive), start it, wait for the guest agent and an address
    (up to `timeout` seconds from the start, checks included), read OS info and network, run the
    family's guest checks and the catalog's, read the package inventory, then stop and destroy the
    clone, whatever happened. SSH goes to `ssh_address` when given (the lab's guest), else to the
    clone's first address on port 22.

    The options are SmokeOptions' fields. Raises SmokeTestError naming the step; its message also says how
    the cleanup went."""
    task_timeout = options.task_timeout
    run = _Run(entry.key, template_vmid)
    started = time.monotonic()
    try:
        ctx = SmokeContext(
            api,
            node,
            template_vmid,
            entry,
            run,
            EphemeralKey.generate(),
            options,
        )
        seen = _test(ctx)
    except BaseException as exc:
        cleaned, note = _cleanup(api, node, run, task_timeout)
        if isinstance(exc, SmokeTestError):
            raise SmokeTestError(
                exc.step, template_vmid, run.clone_vmid, entry.key, exc.reason, note, tuple(run.steps)
            ) from exc
        if isinstance(exc, SmokeInternalError):
            exc.steps = tuple(run.steps)
        if not cleaned:
            exc.add_note(f"smoke test cleanup: {note}")
        raise
    cleaned, note = _cleanup(api, node, run, task_timeout)
    if not cleaned:  # a failed cleanup always says why (note is None only when nothing was created)
        raise SmokeTestError("cleanup", template_vmid, run.clone_vmid, entry.key, note or "", steps=tuple(run.steps))
    return SmokeResult(
        template_vmid,
        seen.clone_vmid,
        seen.os_info,
        seen.interfaces,
        seen.ips,
        time.monotonic() - started,
        tuple(run.steps),
        str(entry.expected_os),
        seen.packages,
        seen.machine_id,
        tuple(seen.host_keys),
        tuple(run.warnings),
    )


def _cleanup(api: PveApi, node: str, run: _Run, task_timeout: float) -> tuple[bool, str | None]:
    """Stop and destroy the clone: (True, what happened, None when nothing was created) or (False, the failure)."""
    vmid = run.clone_vmid
    if not run.created or vmid is None:  # created implies clone_vmid: _clone sets it before the clone request
        return True, None
    started = time.monotonic()
    try:
        found = find_guest(api, vmid)
        if found is not None and found.name != run.clone_name:
            run.steps.append(SmokeStep("cleanup", time.monotonic() - started, False))
            return False, (
                f"VM {run.clone_vmid} is not our clone (named {found.name!r}, not {run.clone_name!r}); left alone"
            )
        destroyed = found is not None and destroy_vm(api, found.node or node, vmid, timeout=task_timeout)
        left = find_guest(api, vmid)
    except Exception as exc:  # noqa: BLE001 - any failure here must be reported, not raised over the test's own
        run.steps.append(SmokeStep("cleanup", time.monotonic() - started, False, str(exc)))
        return False, f"FAILED to destroy clone {run.clone_vmid}, remove it by hand: {exc}"
    if left is not None:
        run.steps.append(SmokeStep("cleanup", time.monotonic() - started, False))
        return False, f"FAILED: clone {run.clone_vmid} still exists after its destroy task; remove it by hand"
    run.steps.append(SmokeStep("cleanup", time.monotonic() - started, True))
    return True, f"clone {run.clone_vmid} destroyed" if destroyed else f"clone {run.clone_vmid} was already gone"


def _test(ctx: SmokeContext) -> Observed:
    """The steps in order, each timed and named by ctx.run (the clone is removed by the caller)."""
    run = ctx.run
    clone_vmid = _clone(ctx)
    clone = ctx.api.nodes(ctx.node).qemu(clone_vmid)
    agent_on = _configure(ctx, clone)
    with run.step("start"):
        run_task(ctx.api, clone.status.start.post(), f"start clone {clone_vmid}", ctx.options.task_timeout)
    deadline = time.monotonic() + ctx.options.timeout  # the guest's boot: agent up and an address, together
    os_info = _booted_os(ctx, clone, agent_on, deadline)
    with run.step("network"):
        interfaces = _poll(
            run,
            "network",
            deadline,
            ctx.options.poll,
            lambda: _with_ips(clone.agent("network-get-interfaces").get().get("result") or []),
        )
    ips = guest_ips(interfaces)
    machine_id, host_keys = _guest_checks(ctx, clone, ips, deadline)
    packages = _inventory(ctx, clone, deadline)
    return Observed(clone_vmid, os_info, interfaces, ips, packages, machine_id, host_keys)


def _clone(ctx: SmokeContext) -> int:
    """Step clone: the template full-cloned to a free VMID of the key's range (run.created once PVE took it)."""
    run, entry, api, template_vmid = ctx.run, ctx.entry, ctx.api, ctx.template_vmid
    with run.step("clone"):
        clone_vmid = ctx.options.clone_vmid
        if clone_vmid is None:
            clone_vmid = allocate_vmid(api, entry, exclude=[template_vmid])
        run.clone_vmid = clone_vmid
        if clone_vmid not in entry.vmid_range or clone_vmid == template_vmid:
            raise run.error(
                "clone",
                f"clone VMID {clone_vmid} must be a free VMID of the key's range "
                f"{entry.vmid_range} other than the template's",
            )
        if find_guest(api, clone_vmid) is not None:
            raise run.error("clone", f"VMID {clone_vmid} is in use")
        params: dict[str, Any] = dict(
            newid=clone_vmid,
            full=1,
            name=f"{entry.key}-smoke-{template_vmid}",
            description=f"Temporary smoke-test clone of template {template_vmid} (packer-assets); "
            "destroyed when the test ends.",
        )
        if ctx.options.storage:
            params["storage"] = ctx.options.storage
        run.clone_name = params["name"]
        try:
            upid = api.nodes(ctx.node).qemu(template_vmid).clone.post(**params)
        except ResourceException:
            raise  # PVE refused it: nothing was created, and the VMID may be someone else's
        except Exception:
            # No answer (network): the clone may exist anyway; it is ours if it carries our name.
            run.created = True  # _cleanup destroys it only if it carries our name
            raise
        run.created = True
        run_task(api, upid, f"clone {template_vmid} -> {clone_vmid}", ctx.options.task_timeout)
    return clone_vmid


def _configure(ctx: SmokeContext, clone: Any) -> bool:
    """Step configure: the clone's tags, and (Linux) its cloud-init user and keys; True if the template
    enables the guest agent."""
    with ctx.run.step("configure"):
        config = clone.config.get()
        # The clone inherits the template's tags (maybe the promotion tag) and description: replace both,
        # so it is never taken for a template of the key.
        updates: dict[str, Any] = {"tags": join_tags([TOOL_TAG, ctx.entry.key, SMOKE_TAG])}
        if ctx.linux:
            if cloudinit_drive(config) is None:
                raise ctx.run.error("configure", "the template has no cloud-init drive (finish_template adds one)")
            updates["ciuser"] = ctx.options.ci_user
            key = ctx.options.ssh_public_key
            keys = [key.strip()] if key and key.strip() else []
            updates["sshkeys"] = encode_sshkeys("\n".join([*keys, ctx.login.public]))
            if "net0" in config:
                updates["ipconfig0"] = "ip=dhcp"
            if _has_ciupgrade(ctx.api):
                # PVE >= 8.1 upgrades a clone's packages on first boot by default: the clone would then not be
                # the template (and its inventory not the template's SBOM), and would need a mirror and minutes.
                updates["ciupgrade"] = 0
        clone.config.put(**updates)
        return agent_enabled(config)


def _booted_os(ctx: SmokeContext, clone: Any, agent_on: bool, deadline: float) -> dict[str, Any]:
    """Steps agent, osinfo and identity: the agent answers, and the OS it reports is the one expected."""
    run = ctx.run
    with run.step("agent"):
        if not agent_on:
            raise run.error("agent", "the template does not enable the QEMU guest agent (agent=1 in its config)")
        _poll(run, "agent", deadline, ctx.options.poll, lambda: clone.agent.ping.post() or True)

    with run.step("osinfo"):
        os_info = clone.agent("get-osinfo").get().get("result") or {}
        if not os_info:
            raise run.error("osinfo", "the guest agent returned no OS information")

    with run.step("identity"):
        expected = ctx.entry.expected_os
        if not expected.matches(os_info.get("id"), os_info.get("version-id")):
            raise run.error(
                "identity",
                f"expected {expected}, found {found_os(os_info)} "
                f"({os_info.get('pretty-name') or os_info.get('name') or 'no name'}): "
                "the template was not installed from the key's ISO",
            )
    return os_info


def _guest_checks(ctx: SmokeContext, clone: Any, ips: list[str], deadline: float) -> tuple[str | None, list[str]]:
    """The family's and the catalog's checks, a step each: (machine ID, SSH host keys) as fresh_identity read them."""
    run, entry = ctx.run, ctx.entry
    values = {"install_user": entry.install_user.name, "ci_user": ctx.options.ci_user}
    machine_id: str | None = None
    host_keys: list[str] = []
    for check in checks_for(entry):
        with run.step(check.name):
            if check.via == "ssh":
                host, port = ctx.options.ssh_address or (_ssh_host(ips), 22)
                output = _ssh_output(ctx, check, (host, port), host_keys, check.ssh_command(values), deadline)
            else:
                output = _agent_output(run, check.name, clone.agent, check.command(values), deadline)
            passed, run.detail = check.judge(output.exit_code, output.out, values, output.err)
            if not passed:
                raise run.error(check.name, f"{check.purpose}: {run.detail}")
            if check.warned(output.exit_code):
                run.warnings.append(f"{entry.key}: smoke test: {check.name} {run.detail}")
            if check.name == "fresh_identity" and ctx.linux:
                machine_id, host_keys = parse_identity(output.out)
    return machine_id, host_keys


def _inventory(ctx: SmokeContext, clone: Any, deadline: float) -> tuple[Package, ...]:
    """Step inventory: the installed packages (for the SBOM)."""
    run, family = ctx.run, ctx.entry.family
    with run.step("inventory"):
        output = _agent_output(run, "inventory", clone.agent, inventory_command(family), deadline)
        if output.exit_code != 0:
            raise run.error(
                "inventory",
                f"the package query exited {output.exit_code}: {' '.join((output.err or output.out).split())[:300]}",
            )
        packages = tuple(parse_inventory(family, output.out))
        run.detail = f"{len(packages)} packages"
    return packages


def _has_ciupgrade(api: PveApi) -> bool:
    """Does the node know `ciupgrade` (PVE 8.1 and later)?"""
    try:
        version = str(api.version.get().get("version") or "")
    except Exception:  # noqa: BLE001 - no answer: do not send an option the node may not know
        return False
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found.group(1)), int(found.group(2))) >= (8, 1)


def _ssh_host(ips: list[str]) -> str:
    return next((ip for ip in ips if ":" not in ip), ips[0])


def _agent_output(run: _Run, step: str, agent: PveResource, argv: list[str], deadline: float) -> GuestOutput:
    try:
        return agent_exec(agent, argv, deadline)
    except GuestExecTimeout as exc:
        raise run.error(step, f"gave up waiting for the guest: {exc}") from None


def _ssh_output(
    ctx: SmokeContext, check: GuestCheck, address: tuple[str, int], host_keys: list[str], command: str, deadline: float
) -> GuestOutput:
    """`command` over SSH as the cloud-init user with the test's key (host keys pinned once known)."""
    host, port = address
    try:
        return ssh_run(host, port, ctx.options.ci_user, ctx.login, host_keys, command, deadline=deadline)
    except SshLoginError as exc:
        raise ctx.run.error(check.name, f"{check.purpose}: {exc}") from None


def _with_ips(interfaces: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return interfaces if guest_ips(interfaces) else None


def agent_enabled(config: dict[str, Any]) -> bool:
    """PVE's `agent` option enables the agent: `1`, `enabled=1`, `1,fstrim_cloned_disks=1`, ..."""
    for part in str(config.get("agent", "0")).split(","):
        name, eq, value = part.partition("=")
        flag = value if eq and name.strip() == "enabled" else None if eq else name
        if flag is not None and flag.strip().lower() in ("1", "yes", "on", "true"):
            return True
    return False
