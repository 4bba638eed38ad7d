"""The template lifecycle through the API: VMID, finishing, up-to-date rule, cleanup, promotion, retention.

Everything takes a proxmoxer `PveApi` (the build token) and works with the PackerBuilder role.

Ownership. A VM is "ours for key K" when it is a QEMU guest tagged `packer-assets` and `K`, named
`K-<yyyymmddhhmmss>`. Promotion, pruning and the up-to-date rule only ever look at such VMs; a VM of
another key, an untagged VM or a renamed one is never promoted, pruned or compared.

Promotion tag. The promoted template carries `packer-assets-latest` next to the key tag. A bare
`latest` is a tag people use for their own VMs; a prefixed one cannot be confused with theirs and
is still a valid PVE tag (`[a-z0-9_][a-z0-9_+.-]*`).

Channels and revocation (set by `packer-assets channel` / `revoke`, see channels.py). A channel is the
tag `packer-assets-channel-<name>` on one template of the key; prune never destroys a template a
channel points at. A revoked template carries `packer-assets-revoked` and a line in its description,
and has lost its promotion and channel tags: it is never promoted again nor counted as up to date.

Writes against what was read. Every tag (and finishing) write is a compare-and-set: the config is read
once, the change computed from that read and written with its digest, which PVE refuses if anyone wrote
in between; then it is read and computed again (`edit_config`, a few tries, then one line). A
promotion ends by listing the key again until only the new template carries the tag (`take_tag`).

Order (the caller's duty, see `template` and its smoke-test check): build under a new VMID ->
`finish_template` -> smoke test -> `promote` -> `prune`. A failed build or smoke test ends in
`destroy_build_vm`, which refuses the promoted template: nothing is destroyed before its
successor passed.

Why one module of ~600 lines: every step below applies the ownership, promotion, channel and revocation
rules above, and reviewing one against them is easier when they sit together; the task waiting lives in
`tasks.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from proxmoxer.core import ResourceException
from pydantic import BaseModel, ConfigDict, ValidationError

from packer_assets.catalog import TOOL_TAG_NAMESPACE, TemplateEntry, VmidRange
from packer_assets.catalog.cpu import DEFAULT_CPU_TYPE
from packer_assets.errors import OperationError
from packer_assets.pve.client import PveApi
from packer_assets.pve.tasks import TASK_TIMEOUT, TaskError, run_task, said

TOOL_TAG = TOOL_TAG_NAMESPACE  # every tag below starts with it, and the catalog refuses them all
LATEST_TAG = "packer-assets-latest"
SMOKE_TAG = "packer-assets-smoke"
REVOKED_TAG = "packer-assets-revoked"
CHANNEL_TAG_PREFIX = "packer-assets-channel-"
REVOKED_PREFIX = "packer-assets-revoked: "  # the description line of a revocation (not DESCRIPTION_PREFIX)
DESCRIPTION_PREFIX = "packer-assets: "
NAME_STAMP = "%Y%m%d%H%M%S"
# PVE's drive keys; which of them may take a new cloud-init drive, in the order we try them
# (ide2 is the install CD-ROM by convention, ide3 is where Packer puts its own cloud-init drive).
DRIVE_KEY = re.compile(r"^(ide[0-3]|sata[0-5]|scsi\d+|virtio\d+)$")
CLOUDINIT_SLOTS = ("ide3", "ide1", "ide0", *(f"sata{n}" for n in range(6)))
CLOUDINIT_VOLUME = re.compile(r"(^|[:/])(vm-\d+-)?cloudinit(\.(raw|qcow2|vmdk))?$")
TAG_SPLIT = re.compile(r"[;, ]+")


class TemplateError(OperationError):
    """A lifecycle step failed or was refused; the message names the VMID, the key and the reason."""


class VmidRangeFull(TemplateError):
    """Every VMID of the key's range is in use."""


# ------------------------------------------------------------------ small helpers


def split_tags(text: str | None) -> list[str]:
    """PVE's tag list (`a;b`, also `a,b` / `a b` as PVE accepts them) as lower-case names."""
    return [t.lower() for t in TAG_SPLIT.split(text or "") if t]


def join_tags(tags: Iterable[str]) -> str:
    """The API's form: `;`-separated, sorted, no duplicates (what PVE writes with sorted tag order)."""
    return ";".join(sorted({t.lower() for t in tags if t}))


def template_tags(key: str, extra: Iterable[str] = ()) -> list[str]:
    """The tags of a built template: the tool, the key and the catalog entry's own tags."""
    return sorted({TOOL_TAG, key, *extra})


def template_name(key: str, when: datetime | None = None) -> str:
    """`<key>-<yyyymmddhhmmss>` (UTC): the name sorts by build time, which `prune` relies on."""
    when = when or datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("template_name needs an aware datetime, got a naive one")
    return f"{key}-{when.astimezone(UTC).strftime(NAME_STAMP)}"


def name_time(key: str, name: str | None) -> datetime | None:
    """The build time in a template name of key, or None if the name is not ours."""
    found = re.fullmatch(re.escape(key) + r"-(\d{14})", name or "")
    if not found:
        return None
    try:
        return datetime.strptime(found.group(1), NAME_STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None


# ------------------------------------------------------------------ the cluster's guests


@dataclass(frozen=True)
class Guest:
    """One VM or container as /cluster/resources lists it."""

    vmid: int
    node: str
    kind: str  # qemu | lxc
    name: str
    tags: tuple[str, ...]
    template: bool
    status: str
    lock: str | None = None

    @classmethod
    def of(cls, item: Mapping[str, Any]) -> Guest:
        return cls(
            vmid=int(item["vmid"]),
            node=str(item.get("node", "")),
            kind=str(item.get("type", "")),
            name=str(item.get("name") or ""),
            tags=tuple(split_tags(item.get("tags"))),
            template=bool(int(item.get("template") or 0)),
            status=str(item.get("status", "")),
            lock=item.get("lock") or None,
        )

    def ours(self, key: str) -> bool:
        """A QEMU guest tagged with the tool and the key, named `<key>-<timestamp>`."""
        return (
            self.kind == "qemu" and TOOL_TAG in self.tags and key in self.tags and name_time(key, self.name) is not None
        )

    @property
    def promoted(self) -> bool:
        return LATEST_TAG in self.tags

    @property
    def revoked(self) -> bool:
        return REVOKED_TAG in self.tags

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels (`packer-assets-channel-<name>` tags) that point at this template, sorted."""
        return tuple(sorted(t.removeprefix(CHANNEL_TAG_PREFIX) for t in self.tags if t.startswith(CHANNEL_TAG_PREFIX)))


def guests(api: PveApi) -> dict[int, Guest]:
    """vmid -> Guest, VMs and containers of the whole cluster (those the caller may audit)."""
    return {g.vmid: g for g in (Guest.of(i) for i in api.cluster.resources.get(type="vm"))}


def find_guest(api: PveApi, vmid: int) -> Guest | None:
    return guests(api).get(int(vmid))


def leftover_vms(api: PveApi, key: str, vmid_range: VmidRange) -> list[Guest]:
    """QEMU guests of the key's range that are not templates and carry a name only this tool gives: a
    build VM `<key>-<yyyymmddhhmmss>`, a smoke clone `<key>-smoke-<vmid>`, a disk-cleanup placeholder
    `cleanup-<vmid>`. Leftovers of a dead run only to a caller that holds the key's lock (locks.py):
    then no live run of the key can own them."""
    ours = re.compile(rf"{re.escape(key)}-smoke-\d+|cleanup-\d+")
    return sorted(
        (
            g
            for g in guests(api).values()
            if g.kind == "qemu"
            and not g.template
            and g.vmid in vmid_range
            and (name_time(key, g.name) is not None or ours.fullmatch(g.name))
        ),
        key=lambda g: g.vmid,
    )


def list_templates(api: PveApi, key: str, vmid_range: VmidRange | None = None) -> list[Guest]:
    """Our templates of key (template=1), newest first by the time in their name, then by VMID."""
    found = [
        g for g in guests(api).values() if g.template and g.ours(key) and (vmid_range is None or g.vmid in vmid_range)
    ]
    return sorted(found, key=lambda g: (name_time(key, g.name), g.vmid), reverse=True)


# ------------------------------------------------------------------ VMIDs


def allocate_vmid(api: PveApi, entry: TemplateEntry, exclude: Iterable[int] = ()) -> int:
    """The lowest free VMID of the key's range.

    /cluster/resources shows what the caller may audit (VMs and containers on every node); each
    candidate is then confirmed with /cluster/nextid?vmid=X, which PVE answers from the cluster's own
    VMID list whatever the caller may see. Two builds of one key racing for one VMID are settled by
    PVE's create, which refuses an existing VMID.
    """
    used = set(guests(api)) | {int(v) for v in exclude}
    for vmid in range(entry.vmid_range.first, entry.vmid_range.last + 1):
        if vmid in used:
            continue
        try:
            api.cluster.nextid.get(vmid=vmid)
        except ResourceException as exc:
            if exc.status_code == 400:  # "VM <vmid> already exists": a guest we may not see
                continue
            raise TemplateError(f"{entry.key}: /cluster/nextid?vmid={vmid}: {said(exc)}") from None
        return vmid
    raise VmidRangeFull(
        f"{entry.key}: no free VMID in its range {entry.vmid_range} (all "
        f"{entry.vmid_range.size} in use); prune old templates or widen vmid_range in the catalog"
    )


# ------------------------------------------------------------------ description


class TemplateDescription(BaseModel):
    """What a template's description records; `render()` writes it, `read_description()` reads it back."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # ignore: a newer tool may add fields

    chain_id: str
    key: str
    iso_url: str
    iso_checksum: str
    iso_volid: str | None = None
    input_fingerprint: str
    built_at: datetime
    tool_version: str
    packer_version: str | None = None

    def render(self) -> str:
        """A Markdown block for the Notes panel, then one machine-readable line (keep it last)."""
        rows = [
            ("Chain ID", self.chain_id),
            ("ISO", self.iso_url),
            ("ISO volume", self.iso_volid or "-"),
            ("ISO checksum", self.iso_checksum),
            ("Input fingerprint", self.input_fingerprint),
            ("Built", self.built_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
            ("Packer", self.packer_version or "-"),
            ("Tool", f"packer-assets {self.tool_version}"),
        ]
        table = "\n".join(f"| {name} | `{value}` |" for name, value in rows)
        return (
            f"**Template `{self.key}`**, built by packer-assets. The last line is read by the tool: "
            f"do not edit it.\n\n| | |\n|---|---|\n{table}\n\n"
            f"{DESCRIPTION_PREFIX}{self.model_dump_json()}\n"
        )


def read_description(text: str | None) -> TemplateDescription | None:
    """The record in a description (its last `packer-assets: {json}` line), or None if there is none."""
    return _last_record(text, DESCRIPTION_PREFIX, TemplateDescription)


class Revocation(BaseModel):
    """Why a template was revoked: a line of its description, written by `revoked_description()`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    revoked_at: datetime
    reason: str | None = None


def read_revocation(text: str | None) -> Revocation | None:
    """The revocation in a description (its last `packer-assets-revoked: {json}` line), or None."""
    return _last_record(text, REVOKED_PREFIX, Revocation)


_Record = TypeVar("_Record", bound=BaseModel)


def _last_record(text: str | None, prefix: str, model: type[_Record]) -> _Record | None:
    for line in reversed((text or "").splitlines()):
        if line.startswith(prefix):
            try:
                return model.model_validate_json(line[len(prefix) :])
            except ValidationError:
                return None
    return None


def revoked_description(text: str | None, revocation: Revocation) -> str:
    """The description with the revocation (a Markdown line and the machine-readable line) inserted just
    before the build record, which stays the last line `read_description` reads."""
    when = revocation.revoked_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    block = [
        f"**Revoked** {when}" + (f": {revocation.reason}" if revocation.reason else ""),
        "",
        f"{REVOKED_PREFIX}{revocation.model_dump_json()}",
        "",
    ]
    lines = (text or "").splitlines()
    at = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(DESCRIPTION_PREFIX)), len(lines))
    return "\n".join(lines[:at] + block + lines[at:]) + "\n"


# ------------------------------------------------------------------ finishing a template


def split_drive(value: str) -> tuple[str, dict[str, str]]:
    """`local:iso/x.iso,media=cdrom,size=1G` -> ('local:iso/x.iso', {'media': 'cdrom', 'size': '1G'})."""
    volume, *rest = str(value).split(",")
    props = dict(part.partition("=")[::2] for part in rest if part)
    if "=" in volume:  # `file=...` form
        name, _, val = volume.partition("=")
        props[name] = val
        volume = props.pop("file", "")
    return volume, props


def is_cloudinit(volume: str) -> bool:
    return bool(CLOUDINIT_VOLUME.search(volume))


def iso_cdroms(config: Mapping[str, Any]) -> list[str]:
    """Drive keys holding an ISO image (install ISO, drivers ISO, answer ISO), not the cloud-init drive."""
    out = []
    for key, value in config.items():
        if DRIVE_KEY.match(key):
            volume, props = split_drive(value)
            if props.get("media") == "cdrom" and volume not in ("none", "cdrom", "") and not is_cloudinit(volume):
                out.append(key)
    return sorted(out)


def cloudinit_drive(config: Mapping[str, Any]) -> str | None:
    for key, value in config.items():
        if DRIVE_KEY.match(key) and is_cloudinit(split_drive(value)[0]):
            return key
    return None


def free_cloudinit_slot(config: Mapping[str, Any], where: str = "") -> str:
    for slot in CLOUDINIT_SLOTS:
        if slot not in config:
            return slot
    raise TemplateError(f"{where}: no free slot for a cloud-init drive (tried {', '.join(CLOUDINIT_SLOTS)})")


def _finish_updates(
    config: Mapping[str, Any],
    family: str,
    vm_storage: str,
    description: TemplateDescription,
    tags: Iterable[str] | None,
    name: str | None,
    where: str,
) -> dict[str, Any]:
    """finish_template's config write, from the config as read: every ISO ejected, a cloud-init drive for a
    Linux template that has none, the tags, the description and the name."""
    updates: dict[str, Any] = {key: "none,media=cdrom" for key in iso_cdroms(config)}
    if family != "windows" and cloudinit_drive(config) is None:
        updates[free_cloudinit_slot(config, where)] = f"{vm_storage}:cloudinit"
    # The tool's and the key's tags always: without them the template would not be ours to promote.
    updates["tags"] = join_tags(template_tags(description.key, tags or ()))
    updates["description"] = description.render()
    if name:
        updates["name"] = name
    return updates


@dataclass(frozen=True)
class FinishedTemplate:
    vmid: int
    node: str
    name: str
    tags: tuple[str, ...]
    ejected: tuple[str, ...]  # drive keys whose ISO was ejected
    cloudinit: str | None  # the cloud-init drive's key (None: none, as for Windows)
    cloudinit_added: bool
    converted: bool  # True if this call made it a template (Packer had not)


def finish_template(
    api: PveApi,
    node: str,
    vmid: int,
    *,
    family: str,
    vm_storage: str,
    description: TemplateDescription,
    tags: Iterable[str] | None = None,
    name: str | None = None,
    timeout: float = TASK_TIMEOUT,
) -> FinishedTemplate:
    """After Packer: eject every ISO, give a Linux template its cloud-init drive, write description and
    tags (`packer-assets`, the key, plus `tags`), and convert it to a template if Packer did not.

    Ejecting through the API is what works on every Packer version (1.6.6's `unmount_iso` fails on the
    `size=` PVE appends). The cloud-init drive stays: clones take their user, keys and IP from it.
    """
    vm = api.nodes(node).qemu(vmid)
    where = f"{description.key}: VM {vmid} on {node}"
    try:
        if vm.status.current.get().get("status") == "running":
            raise TemplateError(f"{where}: still running; Packer did not shut it down, it cannot become a template")

        def configure(values: Mapping[str, Any]) -> None:  # POST: allocating the cloud-init volume is a task
            run_task(api, vm.config.post(**values), f"{where}: configure", timeout)

        # A compare-and-set: what is ejected and where the cloud-init drive goes follow the config it replaces.
        config, updates = edit_config(
            api,
            node,
            vmid,
            lambda read: _finish_updates(read, family, vm_storage, description, tags, name, where),
            f"{where}: configure",
            write=configure,
        )
        ejected = tuple(iso_cdroms(config))
        slot, added = cloudinit_drive(config), False
        if slot is None and family != "windows":
            slot, added = cloudinit_drive(updates), True
        converted = not int(vm.config.get().get("template") or 0)
        if converted:
            run_task(api, vm.template.post(), f"{where}: convert to template", timeout)
        final = vm.config.get()
    except ResourceException as exc:
        raise TemplateError(f"{where}: {said(exc)}") from None
    if not int(final.get("template") or 0):
        raise TemplateError(f"{where}: still not a template after conversion")
    return FinishedTemplate(
        vmid, node, str(final.get("name", "")), tuple(split_tags(final.get("tags"))), ejected, slot, added, converted
    )


# ------------------------------------------------------------------ up-to-date rule


# Entry fields that never change what is built: how many templates and work directories to keep, what
# the smoke test expects to find, and upstream's end-of-life date (a new date must not rebuild anything).
NOT_BUILD_INPUTS = frozenset({"retention", "work_dirs", "expect_os", "smoke", "eol"})


def catalog_entry_json(entry: TemplateEntry) -> str:
    """The entry as canonical JSON (sorted keys), without NOT_BUILD_INPUTS. The ISO mirror is not part
    of it either (a private attribute): fetching the same ISO elsewhere does not make a template old.
    hardware.cpu_type is left out while it is `host`: every build before the field ran on host, so a
    template built then has the same inputs, not older ones."""
    data = entry.model_dump(mode="json", exclude=set(NOT_BUILD_INPUTS))
    if data["hardware"].get("cpu_type") == DEFAULT_CPU_TYPE:
        del data["hardware"]["cpu_type"]
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def input_fingerprint(
    iso_checksum: str,
    rendered_files: Mapping[str, str],
    packer_template_sha256: str,
    catalog_entry_json: str | Mapping[str, Any],
) -> str:
    """sha256 hex over everything a build depends on, in a canonical form (key order and JSON
    whitespace do not matter)."""
    entry = catalog_entry_json
    if isinstance(entry, str):
        try:
            entry = json.loads(entry)
        except ValueError:
            pass  # not JSON: hashed as the text it is
    blob = json.dumps(
        {
            "v": 1,
            "iso_checksum": iso_checksum,
            "rendered_files": dict(sorted(rendered_files.items())),
            "packer_template_sha256": packer_template_sha256,
            "catalog_entry": entry,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def promoted_template(api: PveApi, key: str) -> Guest | None:
    """The template of key tagged `packer-assets-latest`. Should several carry it (a promotion cut
    short between its two steps), the newest wins, which is the one promote() was moving it to."""
    promoted = [g for g in list_templates(api, key) if g.promoted and not g.revoked]
    return promoted[0] if promoted else None


def promoted_vmids(api: PveApi, keys: Iterable[str]) -> dict[str, int]:
    """key -> VMID of its promoted template, for many keys from one /cluster/resources call (the newest
    wins, as in promoted_template)."""
    wanted: set[str] = set(keys)
    found: dict[str, tuple[int, datetime]] = {}
    for guest in sorted(guests(api).values(), key=lambda g: g.vmid):
        if guest.template and guest.promoted and not guest.revoked:
            for key in wanted.intersection(guest.tags):
                when = name_time(key, guest.name)  # not None for a guest that is ours(key)
                if when is not None and guest.ours(key) and (key not in found or when >= found[key][1]):
                    found[key] = (guest.vmid, when)
    return {key: vmid for key, (vmid, _when) in found.items()}


def template_description(api: PveApi, guest: Guest) -> TemplateDescription | None:
    return read_description(api.nodes(guest.node).qemu(guest.vmid).config.get().get("description"))


def is_up_to_date(api: PveApi, key: str, fingerprint: str) -> tuple[bool, int | None]:
    """(True, vmid) when the promoted template was built from exactly these inputs; otherwise
    (False, the promoted vmid or None when nothing is promoted). A revoked template is never the promoted
    one (promoted_template), so revoking the current template makes the key's next build build. Forcing a
    build is the caller's choice."""
    promoted = promoted_template(api, key)
    if promoted is None:
        return False, None
    recorded = template_description(api, promoted)
    return (recorded is not None and recorded.input_fingerprint == fingerprint), promoted.vmid


# ------------------------------------------------------------------ destroying


def destroy_vm(api: PveApi, node: str, vmid: int, *, timeout: float = TASK_TIMEOUT, poll: float = 0.5) -> bool:
    """Stop (if running) and destroy a VM with its disks, waiting for each task. No guards: callers
    check ownership first. False if the VM did not exist.

    Only root may `skiplock`, so a locked VM (a create, clone or shutdown task still holding it) is
    waited for; if the lock stays, the error says so and names what would clear it.
    """
    vm = api.nodes(node).qemu(vmid)
    where = f"VM {vmid} on {node}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                status = vm.status.current.get()
            except ResourceException as exc:
                if _gone(exc):
                    return False
                raise
            if not status.get("lock"):
                break
            if time.monotonic() >= deadline:
                raise TemplateError(
                    f"{where}: locked ({status['lock']}) for {timeout:g}s; only root can override "
                    f"it (`qm unlock {vmid}` on {node}), then destroy it"
                )
            time.sleep(poll)
        if status.get("status") != "stopped":
            run_task(api, vm.status.stop.post(), f"{where}: stop", max(1.0, deadline - time.monotonic()))
        run_task(
            api,
            vm.delete(purge=1, **{"destroy-unreferenced-disks": 1}),
            f"{where}: destroy",
            max(1.0, deadline - time.monotonic()),
        )
    except ResourceException as exc:
        if _gone(exc):
            return False
        raise TemplateError(f"{where}: {said(exc)}") from None
    return True


def _gone(exc: ResourceException) -> bool:
    return exc.status_code == 500 and "does not exist" in str(exc.content)


def destroy_build_vm(api: PveApi, node: str, vmid: int, entry: TemplateEntry, *, timeout: float = TASK_TIMEOUT) -> bool:
    """Remove whatever a failed build left at vmid (running or not, template or not, with its disks).

    Guards, checked before anything is changed: vmid must lie in the key's range; the VM must not be
    the promoted template, nor carry the tool's tag without the key's (another key's VM). Idempotent:
    False when nothing was left, True when this call removed something.

    Disks without a VM count too: Packer allocates disks before it creates the VM, so a failed create
    leaves volumes owned by vmid. Deleting a volume directly needs Datastore.Allocate, which the
    PackerBuilder role does not hold; so a placeholder VM is created at vmid and destroyed with
    `destroy-unreferenced-disks=1`, which PVE lets VM.Allocate do.
    """
    if vmid not in entry.vmid_range:
        raise TemplateError(f"{entry.key}: refusing to destroy VM {vmid}: outside the key's range {entry.vmid_range}")
    guest = find_guest(api, vmid)
    if guest is None:
        return _destroy_orphans(api, node, vmid, entry, timeout)
    if guest.kind != "qemu":
        raise TemplateError(f"{entry.key}: refusing to destroy {vmid}: it is a container, not a build VM")
    if guest.promoted:
        raise TemplateError(f"{entry.key}: refusing to destroy VM {vmid} ({guest.name}): it is the promoted template")
    if TOOL_TAG in guest.tags and entry.key not in guest.tags:
        raise TemplateError(
            f"{entry.key}: refusing to destroy VM {vmid} ({guest.name}): it belongs to another key "
            f"(tags {';'.join(guest.tags)})"
        )
    return destroy_vm(api, guest.node or node, vmid, timeout=timeout)


def orphan_volumes(api: PveApi, node: str, vmid: int) -> list[str]:
    """Image volumes owned by vmid on the node's storages (with or without a VM)."""
    found: set[str] = set()
    for store in api.nodes(node).storage.get(content="images", enabled=1):
        for item in api.nodes(node).storage(store["storage"]).content.get(content="images", vmid=vmid):
            found.add(item["volid"])
    return sorted(found)


def _destroy_orphans(api: PveApi, node: str, vmid: int, entry: TemplateEntry, timeout: float) -> bool:
    where = f"{entry.key}: VM {vmid} on {node}"
    try:
        if not orphan_volumes(api, node, vmid):
            return False
        run_task(
            api,
            api.nodes(node).qemu.post(
                vmid=vmid, name=f"cleanup-{vmid}", description="Placeholder of packer-assets, to remove orphaned disks"
            ),
            f"{where}: placeholder for orphaned disks",
            timeout,
        )
    except ResourceException as exc:
        raise TemplateError(f"{where}: orphaned disks: {said(exc)}") from None
    destroy_vm(api, node, vmid, timeout=timeout)
    return True


# ------------------------------------------------------------------ promotion and retention


# How many times one config change is read, computed and written before it gives up: each retry follows a
# write by someone else between our read and our write, so more than a few means the VM is being fought over.
CONFIG_WRITE_TRIES = 5
# PVE's words for a write whose digest is not the config's (PVE::Tools::assert_if_modified; fakepve's wording)
DIGEST_REFUSED = re.compile(r"file changed? by other user|checksum mismatch")


class ConfigChanged(TemplateError):
    """A config change lost its compare-and-set every time: the VM changed between each read and write."""


def digest_refused(exc: Exception) -> bool:
    """True when PVE refused a config write because the config changed since the digest was read."""
    return DIGEST_REFUSED.search(str(exc)) is not None


def edit_config(
    api: PveApi,
    node: str,
    vmid: int,
    change: Callable[[Mapping[str, Any]], Mapping[str, Any]],
    what: str,
    write: Callable[[Mapping[str, Any]], Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A compare-and-set on the VM's config: read it, compute the updates from THAT read (change(config);
    empty: nothing to write), and write them with the read's digest, which PVE refuses if anyone wrote in
    between. Refused: read again and recompute, up to CONFIG_WRITE_TRIES times, then ConfigChanged.

    write: how the updates (digest included) are written; default a PUT. Returns (the config read, the
    updates written)."""
    vm = api.nodes(node).qemu(vmid)
    write = write or (lambda values: vm.config.put(**values))
    for _ in range(CONFIG_WRITE_TRIES):
        config = vm.config.get()
        updates = dict(change(config))
        if not updates:
            return config, updates
        try:
            write({**updates, "digest": config["digest"]})
            return config, updates
        except (ResourceException, TaskError) as exc:
            if not digest_refused(exc):
                raise
    raise ConfigChanged(
        f"{what}: VM {vmid} on {node} was changed by someone else between each of "
        f"{CONFIG_WRITE_TRIES} reads and writes; nothing written, try again"
    )


def edit_tags(
    api: PveApi, guest: Guest, edit: Callable[[tuple[str, ...]], Iterable[str]], what: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Set the guest's tags to edit(its tags as read from its config), as a compare-and-set (edit_config):
    a tag someone else wrote meanwhile is never lost nor put back. edit may raise to refuse what it
    read. Returns (tags read, tags now)."""

    def change(config: Mapping[str, Any]) -> dict[str, str]:
        before = join_tags(split_tags(config.get("tags")))
        after = join_tags(edit(tuple(split_tags(before))))
        return {} if after == before else {"tags": after}

    config, updates = edit_config(api, guest.node, guest.vmid, change, what)
    before = tuple(split_tags(config.get("tags")))
    return before, tuple(split_tags(updates["tags"])) if updates else before


def remove_tag(api: PveApi, guest: Guest, tag: str, what: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return edit_tags(api, guest, lambda tags: [t for t in tags if t != tag], what)


@dataclass(frozen=True)
class Promotion:
    vmid: int
    previous: tuple[int, ...]  # templates the tag was taken from


def promote(api: PveApi, node: str, key: str, new_vmid: int) -> Promotion:
    """Move `packer-assets-latest` to new_vmid. Call it only after new_vmid's smoke test passed.

    The new template is tagged first, then the tag is taken from the others: there is never a moment
    without a promoted template, and if this is cut short in between, promoted_template() picks the
    newest, i.e. the new one. Every write is a compare-and-set on what was read (edit_tags), and the
    key is listed again until no other template carries the tag (one a concurrent writer put back):
    a promotion ends with exactly one promoted template of the key.
    """
    templates = list_templates(api, key)
    new = next((g for g in templates if g.vmid == new_vmid), None)
    if new is None:
        raise TemplateError(
            f"{key}: refusing to promote VM {new_vmid}: not a template of this key "
            f"(tagged {TOOL_TAG};{key}, named {key}-<timestamp>)"
        )
    if new.node != node:
        raise TemplateError(f"{key}: VM {new_vmid} is on node {new.node}, not {node}")
    what = f"{key}: promoting VM {new_vmid}"
    try:
        _tag_latest(api, new, what, f"{key}: refusing to promote VM {new_vmid}: it is revoked")
        previous = take_tag(api, key, LATEST_TAG, what, keep=new_vmid)
    except ResourceException as exc:
        raise TemplateError(f"{what}: {said(exc)}") from None
    return Promotion(new_vmid, previous)


def _tag_latest(api: PveApi, guest: Guest, what: str, refused: str) -> None:
    """Add the promotion tag to guest, refused (TemplateError(refused)) when its tags as read say revoked."""

    def tag(tags: tuple[str, ...]) -> list[str]:
        if REVOKED_TAG in tags:
            raise TemplateError(refused)
        return [*tags, LATEST_TAG]

    edit_tags(api, guest, tag, what)


def take_tag(
    api: PveApi, key: str, tag: str, what: str, *, keep: int | None = None, vmid_range: VmidRange | None = None
) -> tuple[int, ...]:
    """Take tag from every template of the key but `keep` (which must still carry it, unrevoked), each a
    compare-and-set, listing the key again after each pass until none carries it (a writer that does not
    compare-and-set may have put it back). Returns the VMIDs it was taken from."""
    taken: list[int] = []
    for _ in range(CONFIG_WRITE_TRIES):
        templates = list_templates(api, key, vmid_range)
        if keep is not None and not any(g.vmid == keep and tag in g.tags and not g.revoked for g in templates):
            raise TemplateError(
                f"{what}: VM {keep} lost {tag} (or was revoked) meanwhile; the other templates keep theirs"
            )
        others = [g for g in templates if tag in g.tags and g.vmid != keep]
        if not others:
            return tuple(taken)
        for old in others:
            if tag in remove_tag(api, old, tag, what)[0] and old.vmid not in taken:
                taken.append(old.vmid)
    raise ConfigChanged(
        f"{what}: {tag} kept coming back on other templates of the key after {CONFIG_WRITE_TRIES} passes"
    )


def withdraw(api: PveApi, node: str, entry: TemplateEntry, vmid: int, previous: Guest | None) -> tuple[bool, str]:
    """After a failure past vmid's smoke test (promotion refused, an API error, a later step): take back what
    its promotion did and destroy vmid, so no such template is left behind. `previous` is the template
    that was promoted before (promoted_template, read before promote); it gets the tag back first, so a
    key is never left without the promoted template it had. When that fails while vmid carries the tag,
    vmid stays, promoted: never both gone. Returns (destroyed, one line saying what was done); raises
    TemplateError (or TaskError) when vmid could not be destroyed."""
    what = f"{entry.key}: withdrawing VM {vmid}"
    if previous is not None:
        try:
            _tag_latest(api, previous, what, f"{what}: the previous template {previous.vmid} was revoked meanwhile")
        except (ResourceException, TemplateError) as exc:
            new = find_guest(api, vmid)
            if new is not None and new.promoted:
                why = said(exc) if isinstance(exc, ResourceException) else str(exc)
                return False, (
                    f"VM {vmid} stays the promoted template: {previous.vmid} could not be promoted again ({why})"
                )
    new = find_guest(api, vmid)
    try:
        if new is not None:
            remove_tag(api, new, LATEST_TAG, what)
    except ResourceException as exc:
        raise TemplateError(f"{what}: {said(exc)}") from None
    destroy_build_vm(api, node, vmid, entry)
    return True, f"VM {vmid} destroyed" + (f"; {previous.vmid} is the promoted template again" if previous else "")


@dataclass(frozen=True)
class PruneResult:
    destroyed: tuple[int, ...]  # oldest first
    failed: Mapping[int, str]  # vmid -> why it could not be destroyed (e.g. linked clones still use it)


def prune(
    api: PveApi,
    node: str,
    key: str,
    retention: int,
    keep: Iterable[int] = (),
    *,
    vmid_range: VmidRange | None = None,
    timeout: float = TASK_TIMEOUT,
) -> PruneResult:
    """Destroy the oldest templates of key beyond `retention`.

    Age is the timestamp in the name, not the VMID: VMIDs are reused lowest-first, so a new template
    may have a lower VMID than an old one. Counted are the promoted template and those older than it;
    templates newer than the promoted one (a build not yet promoted, or one whose test failed) are
    neither counted nor touched, and without a promoted template nothing is pruned: nothing goes
    before a successor has passed. Never destroyed: the promoted template, a template a channel points
    at (consumers use it), anything in `keep`, and anything not ours for key (see the module docstring). A template PVE will not destroy (linked
    clones still use its disks) is reported in `failed` and the others are still pruned.
    """
    if retention < 1:
        raise ValueError(f"{key}: retention must be at least 1, got {retention}")
    templates = list_templates(api, key, vmid_range)
    promoted = next((g for g in templates if g.promoted), None)
    if promoted is None:
        return PruneResult((), {})
    candidates = templates[templates.index(promoted) :]  # the promoted one and older, newest first
    keep = set(keep)
    doomed = [g for g in candidates[retention:] if g.vmid not in keep and not g.promoted and not g.channels]
    destroyed, failed = [], {}
    for guest in reversed(doomed):
        fresh = find_guest(api, guest.vmid)  # the tags could have moved since the listing
        if fresh is None or fresh.promoted or fresh.channels or not fresh.ours(key) or not fresh.template:
            continue
        try:
            if destroy_vm(api, fresh.node or node, fresh.vmid, timeout=timeout):
                destroyed.append(fresh.vmid)
        except (TemplateError, TaskError) as exc:
            failed[fresh.vmid] = str(exc)
    return PruneResult(tuple(destroyed), failed)


__all__ = [
    "CHANNEL_TAG_PREFIX",
    "CONFIG_WRITE_TRIES",
    "LATEST_TAG",
    "REVOKED_TAG",
    "SMOKE_TAG",
    "TOOL_TAG",
    "ConfigChanged",
    "FinishedTemplate",
    "Guest",
    "Promotion",
    "PruneResult",
    "Revocation",
    "TemplateDescription",
    "TemplateError",
    "VmidRangeFull",
    "allocate_vmid",
    "catalog_entry_json",
    "destroy_build_vm",
    "destroy_vm",
    "digest_refused",
    "edit_config",
    "edit_tags",
    "find_guest",
    "finish_template",
    "input_fingerprint",
    "is_up_to_date",
    "list_templates",
    "orphan_volumes",
    "promote",
    "promoted_template",
    "prune",
    "read_description",
    "read_revocation",
    "remove_tag",
    "revoked_description",
    "take_tag",
    "template_name",
    "template_tags",
    "withdraw",
]
