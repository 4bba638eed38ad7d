"""Channels and revocation: which template of a key consumers should clone, and which they must not.

`packer-assets channel set production debian-12 9301` tags that template of the key
`packer-assets-channel-production` and takes the tag from the key's other templates (the new one is
tagged first, as promotion does, so the channel never points nowhere); Terraform reads the channel's
VMID from registry.json. `latest` is no channel to set: it is the promoted template, moved by builds.

`packer-assets revoke 9301 --reason "..."` marks a template revoked on the node, in one config write:
the tag `packer-assets-revoked`, a line in its description, and its promotion and channel tags taken.
Consumers stop using it (the registry lists it as revoked and no channel points at it), and the key's
next build does not count it as up to date (pve/templates.promoted_template never returns a revoked
template), so that run builds a new one.

Every change is checked before anything is written (bad channel name, unknown key, a template not of
the key, a revoked one, a registry.json that cannot be written: one line naming it, nothing changed) and
ends with the registry rewritten. Every tag write is a compare-and-set on the config it was computed from
(pve/templates.edit_config): a promotion or another change racing this one is never undone by it.
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

from proxmoxer.core import ResourceException

from packer_assets.catalog import Catalog, TemplateEntry
from packer_assets.config.envfile import read_env_file
from packer_assets.errors import ConfigError
from packer_assets.evidence.chain import CHAIN_RE, parse_chain_id
from packer_assets.evidence.layout import Layout
from packer_assets.evidence.registry import CHANNEL_RE, LATEST, Registry, check_writable, write_registry
from packer_assets.pve.bootstrap import build_access
from packer_assets.pve.client import PveApi
from packer_assets.pve.tasks import said
from packer_assets.pve.templates import (
    CHANNEL_TAG_PREFIX,
    LATEST_TAG,
    REVOKED_TAG,
    Guest,
    Revocation,
    TemplateError,
    edit_config,
    edit_tags,
    find_guest,
    join_tags,
    list_templates,
    read_revocation,
    revoked_description,
    split_tags,
    take_tag,
    template_description,
)

MAX_REASON = 200


class ChannelError(ConfigError):
    """A channel or revocation request that cannot be done as asked; nothing was changed."""


def channel_name(name: str) -> str:
    """The channel name, checked: it becomes a PVE tag, and `latest` belongs to builds."""
    if name == LATEST:
        raise ChannelError("channel latest is the promoted template, moved by builds: choose another name")
    if not CHANNEL_RE.fullmatch(name):
        raise ChannelError(f"bad channel name {name!r}: 1-32 of a-z, 0-9, '-', '_', starting with a letter")
    return name


def channel_tag(name: str) -> str:
    return CHANNEL_TAG_PREFIX + channel_name(name)


def find_template(api: PveApi, catalog: Catalog, ref: str, key: str | None = None) -> tuple[TemplateEntry, Guest]:
    """The template `ref` (a VMID or a chain ID) names, as (its key's entry, the guest). With key, it must
    be one of that key's templates (in its VMID range, tagged and named as the key's)."""
    if ref.isascii() and ref.isdigit():  # not '²', which isdigit() takes and int() refuses
        guest = find_guest(api, int(ref))
        keys = [key] if key else [k for k in catalog.keys() if guest and guest.ours(k)]  # noqa: SIM118 - Catalog iterates entries
        entry = catalog.get(keys[0]) if keys else None
        found = (
            next((g for g in list_templates(api, entry.key, entry.vmid_range) if g.vmid == int(ref)), None)
            if entry
            else None
        )
    elif CHAIN_RE.fullmatch(ref):
        chain_key = parse_chain_id(ref).key
        if key and chain_key != key:
            raise ChannelError(f"{key}: chain ID {ref} is of key {chain_key}, not {key}")
        entry = catalog.get(chain_key)
        found = next(
            (
                g
                for g in list_templates(api, entry.key, entry.vmid_range)
                if (d := template_description(api, g)) and d.chain_id == ref
            ),
            None,
        )
    else:
        raise ChannelError(f"{ref!r} is neither a VMID nor a chain ID (CHAIN-<yyyymmddThhmmssZ>-<key>)")
    if found is None or entry is None:
        whose = f"key {key}" if key else "any catalog key"
        raise ChannelError(
            f"{ref}: no template of {whose} on the node (tagged packer-assets and the key, "
            "named <key>-<timestamp>, in the key's VMID range)"
        )
    return entry, found


@dataclass(frozen=True)
class ChannelChange:
    key: str
    channel: str
    vmid: int | None  # where the channel points now (None: unset)
    taken_from: tuple[int, ...]  # templates of the key that carried it before
    registry: Registry


def set_channel(layout: Layout, api: PveApi, catalog: Catalog, channel: str, key: str, ref: str) -> ChannelChange:
    """Point the key's channel at the template ref names (a VMID or chain ID of the key, not revoked)."""
    tag = channel_tag(channel)
    entry, target = find_template(api, catalog, ref, catalog.get(key).key)  # get: an unknown key is named first
    check_writable(layout)
    what = f"{key}: channel {channel} -> {target.vmid}"

    def point(tags: tuple[str, ...]) -> list[str]:  # refused on the tags as read, not as listed
        if REVOKED_TAG in tags:
            raise ChannelError(
                f"{key}: template {target.vmid} ({target.name}) is revoked: a channel cannot point at it"
            )
        return [*tags, tag]

    with _api_errors(what):
        edit_tags(api, target, point, what)
        taken = take_tag(api, key, tag, what, keep=target.vmid, vmid_range=entry.vmid_range)
    return ChannelChange(key, channel, target.vmid, taken, write_registry(layout, api, catalog))


def unset_channel(layout: Layout, api: PveApi, catalog: Catalog, channel: str, key: str) -> ChannelChange:
    """Take the channel from every template of the key (nothing to take is no error)."""
    tag, entry = channel_tag(channel), catalog.get(key)
    check_writable(layout)
    what = f"{key}: unset channel {channel}"
    with _api_errors(what):
        taken = take_tag(api, key, tag, what, vmid_range=entry.vmid_range)
    return ChannelChange(key, channel, None, taken, write_registry(layout, api, catalog))


@dataclass(frozen=True)
class Revoked:
    key: str
    vmid: int
    name: str
    was_promoted: bool
    channels: tuple[str, ...]  # the channels that pointed at it (now at nothing)
    registry: Registry


def revoke(
    layout: Layout, api: PveApi, catalog: Catalog, ref: str, reason: str | None = None, *, now: datetime | None = None
) -> Revoked:
    """Mark the template ref names revoked: tag, description line, promotion and channel tags taken."""
    if reason is not None and (not reason.strip() or len(reason) > MAX_REASON or not reason.isprintable()):
        raise ChannelError(f"--reason must be one line of 1-{MAX_REASON} printable characters")
    entry, guest = find_template(api, catalog, ref)
    check_writable(layout)
    revocation = Revocation(revoked_at=now or datetime.now(UTC), reason=reason.strip() if reason else None)
    what = f"{entry.key}: revoking {guest.vmid}"

    def change(config: Mapping[str, Any]) -> dict[str, str]:  # tags and description from one read
        found, text = split_tags(config.get("tags")), config.get("description")
        if REVOKED_TAG in found:
            said_before = read_revocation(text)
            raise ChannelError(
                f"{entry.key}: template {guest.vmid} ({guest.name}) is already revoked"
                + (f" ({said_before.revoked_at:%Y-%m-%d %H:%M:%S} UTC)" if said_before else "")
            )
        kept = [t for t in found if t != LATEST_TAG and not t.startswith(CHANNEL_TAG_PREFIX)]
        return {"tags": join_tags([*kept, REVOKED_TAG]), "description": revoked_description(text, revocation)}

    with _api_errors(what):
        config, _ = edit_config(api, guest.node, guest.vmid, change, what)
    was = replace(guest, tags=tuple(split_tags(config.get("tags"))))  # as it was when it was revoked
    return Revoked(entry.key, guest.vmid, guest.name, was.promoted, was.channels, write_registry(layout, api, catalog))


class _api_errors:
    """A refused API call as one TemplateError naming what was being done."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> Literal[False]:
        if isinstance(exc, ResourceException):
            raise TemplateError(f"{self.what}: {said(exc)}") from None
        return False


def channel_rows(registry: Registry, key: str | None = None) -> list[tuple[str, str, int, str]]:
    """(key, channel, VMID, template name) of every channel, `latest` included, for `channel list`."""
    rows = []
    for name, found in registry.templates.items():
        if key and name != key:
            continue
        names = {v.vmid: v.name for v in registry.versions(name)}
        rows += [(name, channel, vmid, names.get(vmid, "?")) for channel, vmid in found.channels.items()]
    return rows


def node_api(layout: Layout) -> PveApi:
    """The build token's API, from the env file proxmox_env wrote: the node as builds reach it."""
    if not layout.env_file.is_file():
        raise ConfigError(f"{layout.env_file} does not exist: run `make init` (proxmox_env) first")
    return build_access(read_env_file(layout.env_file), str(layout.env_file)).connect()
