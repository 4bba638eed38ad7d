"""Bootstrap API access for builds: role, automation user, ACLs, API token, discovery.

What `init-proxmox-env.sh` did, idempotent: every object is read first and only created or changed
when it differs. The toolkit's reuse rule for the token holds: a secret we already have is proven by
logging in with it and kept; a token whose secret we do not have is replaced; rotation happens only
when asked. Discovery runs before any change, so a missing storage or bridge changes nothing.
"""

import ipaddress
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from proxmoxer.core import ResourceException

from packer_assets.errors import OperationError
from packer_assets.pve.client import Endpoint, PveAccessError, PveApi, connect, translated_errors

# What a Packer build (create, configure, boot, type, template), ISO staging and the smoke test
# (clone, start, agent, destroy) need, on every PVE version.
COMMON_PRIVILEGES = (
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "SDN.Use",
    "Sys.Audit",
    "VM.Allocate",
    "VM.Audit",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.Console",
    "VM.PowerMgmt",
)
# PVE 9 dropped VM.Monitor (guest-agent access became VM.GuestAgent.*) and lets download-url run with
# Sys.AccessNetwork; before 9, download-url needs Sys.Audit + Sys.Modify and the agent VM.Monitor.
# The smoke test runs its checks in the clone with the agent's exec: VM.GuestAgent.Unrestricted on 9.
PVE9_PRIVILEGES = ("VM.GuestAgent.Audit", "VM.GuestAgent.Unrestricted", "Sys.AccessNetwork")
PVE8_PRIVILEGES = ("VM.Monitor", "Sys.Modify")


class BootstrapError(OperationError):
    """A bootstrap step failed; the message names the object (node, storage, user, token, ...)."""


def pve_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise BootstrapError(f"/version: cannot read the PVE version from {version!r}") from None


def required_privileges(version: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    specific = PVE9_PRIVILEGES if pve_major(version) >= 9 else PVE8_PRIVILEGES
    return tuple(sorted(set(COMMON_PRIVILEGES) | set(specific) | set(extra)))


@dataclass(frozen=True)
class BootstrapConfig:
    """What proxmox_env creates and builds use. Its defaults are the project's one copy of the toolkit's names
    (user, role, token, packer's HTTP port): the settings and the Dagster resource take them from here;
    templates/common/common.pkr.hcl and remote/init-packer-remote.sh repeat them, pinned by
    tests/pve/test_pve_defaults.py."""

    user: str = "automation@pve"
    role: str = "PackerBuilder"
    token_name: str = "packer"
    privsep: bool = True
    rotate: bool = False
    node: str | None = None
    vm_storage: str | None = None
    iso_storage: str | None = None
    bridge: str | None = None
    http_bind_address: str | None = None
    http_port: int = 8802
    extra_privileges: tuple[str, ...] = ()
    # Give the automation user a password, for a Packer that cannot log in with a token (< 1.7.1): builds
    # then run with the automation user's rights, not root's.
    build_password: bool = False

    @property
    def token_id(self) -> str:
        return f"{self.user}!{self.token_name}"


@dataclass(frozen=True)
class Discovery:
    node: str
    node_ip: str
    vm_storage: str
    iso_storage: str
    bridge: str
    http_bind_address: str
    http_port: int


@dataclass
class BootstrapResult:
    pve_version: str
    token_id: str
    token_secret: str = field(repr=False)
    token_action: str  # reused | created | replaced | rotated
    privileges: tuple[str, ...]
    discovery: Discovery
    changes: list[str]
    # The node's CA certificate (PEM), when the bootstrap could fetch it (the SSH path does).
    ca_pem: str | None = field(default=None, repr=False)
    # The automation user's password for Packer's login (config.build_password), and what happened to it.
    build_password: str | None = field(default=None, repr=False)
    build_password_action: str | None = None  # reused | set


# ------------------------------------------------------------------ discovery


def _pick(kind: str, wanted: str | None, candidates: list[str], everything: list[str]) -> str:
    if wanted:
        if wanted not in candidates:
            why = "exists but does not qualify" if wanted in everything else "does not exist"
            raise BootstrapError(f"configured {kind} {wanted!r} {why} (usable: {', '.join(candidates) or 'none'})")
        return wanted
    if not candidates:
        raise BootstrapError(f"no usable {kind} found (seen: {', '.join(everything) or 'none'}); configure one")
    return candidates[0]


def discover_node(api: PveApi, wanted: str | None) -> str:
    nodes = api.nodes.get()
    online = sorted(n["node"] for n in nodes if n.get("status") == "online")
    everything = sorted(n["node"] for n in nodes)
    if wanted:
        return _pick("node", wanted, online, everything)
    if len(online) > 1:
        raise BootstrapError(f"several nodes are online ({', '.join(online)}): choose one with the node setting")
    return _pick("node", None, online, everything)


def discover_storage(api: PveApi, node: str, content: str, wanted: str | None) -> str:
    stores = api.nodes(node).storage.get()
    everything = sorted(s["storage"] for s in stores)
    usable = [
        s for s in stores if s.get("enabled", 1) and s.get("active") and content in str(s.get("content", "")).split(",")
    ]
    # Most free space first: the one a human would pick on a fresh node.
    usable.sort(key=lambda s: (-int(s.get("avail") or 0), s["storage"]))
    kind = "VM storage (content images)" if content == "images" else "ISO storage (content iso)"
    return _pick(f"{kind} on node {node}", wanted, [s["storage"] for s in usable], everything)


def discover_bridge(api: PveApi, node: str, wanted: str | None) -> str:
    bridges = [i for i in api.nodes(node).network.get(type="any_bridge")]
    everything = sorted(b["iface"] for b in bridges)
    active = sorted(b["iface"] for b in bridges if b.get("active"))
    if not wanted and "vmbr0" in active:
        return "vmbr0"
    return _pick(f"bridge on node {node}", wanted, active if not wanted else everything, everything)


def discover_node_ip(api: PveApi, node: str, endpoint: Endpoint) -> str:
    for entry in api.cluster.status.get():
        if entry.get("type") == "node" and entry.get("name") == node and entry.get("ip"):
            return str(entry["ip"])
    return socket.gethostbyname(endpoint.host)


def local_address_towards(ip: str) -> str:
    """The control host's address on the route to ip: where the installer fetches its files from."""
    if ipaddress.ip_address(ip).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((ip, 9))  # UDP connect sends nothing; it only picks the route
        address: str = probe.getsockname()[0]
        return address


def http_bind_address(endpoint: Endpoint, config: BootstrapConfig) -> str:
    """The configured address, else the control host's address towards the API (both paths use this)."""
    return config.http_bind_address or local_address_towards(socket.gethostbyname(endpoint.host))


def discover(api: PveApi, endpoint: Endpoint, config: BootstrapConfig) -> Discovery:
    node = discover_node(api, config.node)
    node_ip = discover_node_ip(api, node, endpoint)
    return Discovery(
        node=node,
        node_ip=node_ip,
        vm_storage=discover_storage(api, node, "images", config.vm_storage),
        iso_storage=discover_storage(api, node, "iso", config.iso_storage),
        bridge=discover_bridge(api, node, config.bridge),
        http_bind_address=http_bind_address(endpoint, config),
        http_port=config.http_port,
    )


# ------------------------------------------------------------------ access objects


def ensure_role(api: PveApi, role: str, privileges: tuple[str, ...], changes: list[str]) -> None:
    roles = {r["roleid"]: r for r in api.access.roles.get()}
    wanted = ",".join(privileges)
    if role not in roles:
        api.access.roles.post(roleid=role, privs=wanted)
        changes.append(f"created role {role}")
        return
    have = set(filter(None, str(roles[role].get("privs", "")).split(",")))
    if have != set(privileges):
        api.access.roles(role).put(privs=wanted)
        changes.append(
            f"set role {role} privileges (was missing {sorted(set(privileges) - have)}, "
            f"had extra {sorted(have - set(privileges))})"
        )


def ensure_user(api: PveApi, user: str, changes: list[str]) -> None:
    if user not in {u["userid"] for u in api.access.users.get()}:
        api.access.users.post(userid=user, comment="packer-assets automation (templates)")
        changes.append(f"created user {user}")


def ensure_acl(api: PveApi, path: str, role: str, kind: str, ugid: str, changes: list[str]) -> None:
    for entry in api.access.acl.get():
        if (entry.get("path"), entry.get("roleid"), entry.get("type"), entry.get("ugid")) == (path, role, kind, ugid):
            return
    api.access.acl.put(path=path, roles=role, propagate=1, **{f"{kind}s": ugid})
    changes.append(f"granted {role} on {path} to {kind} {ugid}")


def logs_in(
    endpoint: Endpoint,
    user: str,
    *,
    password: str | None = None,
    token_name: str | None = None,
    token_secret: str | None = None,
) -> bool:
    """Whether these credentials (password=..., or token_name= + token_secret=) log in; other failures raise."""
    try:
        connect(endpoint, user, password=password, token_name=token_name, token_secret=token_secret)
    except PveAccessError as exc:
        if "authentication failed" in str(exc):
            return False
        raise
    return True


def token_works(endpoint: Endpoint, config: BootstrapConfig, secret: str) -> bool:
    return logs_in(endpoint, config.user, token_name=config.token_name, token_secret=secret)


def ensure_token(
    api: PveApi, endpoint: Endpoint, config: BootstrapConfig, known_secret: str | None, changes: list[str]
) -> tuple[str, str]:
    """(secret, action): reuse a working known secret unless rotating; otherwise (re)create the token."""
    tokens = api.access.users(config.user).token
    exists = config.token_name in {t["tokenid"] for t in tokens.get()}
    if known_secret and not config.rotate and exists and token_works(endpoint, config, known_secret):
        return known_secret, "reused"
    if exists:
        tokens(config.token_name).delete()
    created = tokens(config.token_name).post(
        privsep=int(config.privsep), comment="packer-assets builds (made by proxmox_env)"
    )
    action = "rotated" if config.rotate and exists else "replaced" if exists else "created"
    changes.append(f"{action} token {config.token_id}")
    return created["value"], action


def ensure_build_password(
    api: PveApi,
    endpoint: Endpoint,
    config: BootstrapConfig,
    known: str | None,
    admin_user: str,
    admin_password: str | None,
    changes: list[str],
) -> tuple[str, str]:
    """(password, action): a known password that still logs in is kept; otherwise a new one is set.
    PVE lets only a password login (not an API token) set passwords, and wants the admin's own password
    to confirm unless the admin is root@pam."""
    if known and logs_in(endpoint, config.user, password=known):
        return known, "reused"
    if not admin_password:
        raise BootstrapError(
            f"setting a password for {config.user} (Packer < 1.7.1 logs in with one) needs a "
            "password login for the bootstrap: PVE refuses it to API tokens "
            "(set PROXMOX_BOOTSTRAP_PASSWORD, or PROXMOX_BUILD_LOGIN=token with a newer Packer)"
        )
    new = secrets.token_urlsafe(24)
    confirm = {} if admin_user == "root@pam" else {"confirmation-password": admin_password}
    api.access.password.put(userid=config.user, password=new, **confirm)
    changes.append(f"set a password for {config.user} (Packer's login)")
    return new, "set"


def bootstrap(
    endpoint: Endpoint,
    admin_user: str,
    *,
    known_secret: str | None,
    config: BootstrapConfig,
    admin_password: str | None = None,
    admin_token_name: str | None = None,
    admin_token_secret: str | None = None,
    save_secret: Callable[[str], None] | None = None,
    known_password: str | None = None,
    save_password: Callable[[str], None] | None = None,
) -> BootstrapResult:
    """Run the whole bootstrap. save_secret (save_password) is called as soon as a new secret (password)
    exists, before anything else can fail, so a created token's secret is never lost."""
    admin = connect(
        endpoint, admin_user, password=admin_password, token_name=admin_token_name, token_secret=admin_token_secret
    )
    who = f"{admin_user}!{admin_token_name}" if admin_token_name else admin_user
    changes: list[str] = []
    with translated_errors(endpoint, who):
        try:
            version = str(admin.version.get()["version"])
            found = discover(admin, endpoint, config)
            privileges = required_privileges(version, config.extra_privileges)
            ensure_role(admin, config.role, privileges, changes)
            ensure_user(admin, config.user, changes)
            ensure_acl(admin, "/", config.role, "user", config.user, changes)
            secret, action = ensure_token(admin, endpoint, config, known_secret, changes)
            if action != "reused" and save_secret:
                save_secret(secret)
            if config.privsep:
                ensure_acl(admin, "/", config.role, "token", config.token_id, changes)
            password, password_action = None, None
            if config.build_password:
                password, password_action = ensure_build_password(
                    admin,
                    endpoint,
                    config,
                    known_password,
                    admin_user,
                    admin_password if not admin_token_name else None,
                    changes,
                )
                if password_action != "reused" and save_password:
                    save_password(password)
        except ResourceException as exc:
            raise BootstrapError(f"{endpoint.base}: {exc}") from None
    return BootstrapResult(
        version,
        config.token_id,
        secret,
        action,
        privileges,
        found,
        changes,
        build_password=password,
        build_password_action=password_action,
    )


def env_file_values(result: BootstrapResult, endpoint: Endpoint) -> dict[str, str]:
    """`infra/env/.env.proxmox`: the toolkit's names plus those Packer, Terraform bpg and Telmate read."""
    found, token_id, secret = result.discovery, result.token_id, result.token_secret
    values = {
        # the toolkit
        "PROXMOX_API_URL": endpoint.api_url,
        "PROXMOX_TOKEN_ID": token_id,
        "PROXMOX_TOKEN_SECRET": secret,
        "PROXMOX_NODE": found.node,
        "PROXMOX_NODE_IP": found.node_ip,
        "PROXMOX_VM_STORAGE": found.vm_storage,
        "PROXMOX_ISO_STORAGE": found.iso_storage,
        "PROXMOX_BRIDGE": found.bridge,
        "PROXMOX_HTTP_BIND_ADDRESS": found.http_bind_address,
        "PROXMOX_HTTP_PORT": str(found.http_port),
        # packer-plugin-proxmox
        "PROXMOX_URL": endpoint.api_url,
        "PROXMOX_USERNAME": token_id,
        "PROXMOX_TOKEN": secret,
        # Terraform bpg/proxmox
        "PROXMOX_VE_ENDPOINT": endpoint.base + "/",
        "PROXMOX_VE_API_TOKEN": f"{token_id}={secret}",
        # Terraform Telmate/proxmox
        "PM_API_URL": endpoint.api_url,
        "PM_API_TOKEN_ID": token_id,
        "PM_API_TOKEN_SECRET": secret,
    }
    if endpoint.ca_file:
        values["PROXMOX_CA_FILE"] = str(endpoint.ca_file)
    if endpoint.tls_fingerprint:
        values["PROXMOX_TLS_FINGERPRINT"] = endpoint.tls_fingerprint
    if endpoint.insecure:
        values["PROXMOX_INSECURE"] = "1"
    return values


# ------------------------------------------------------------------ checks


def needed_grants(privileges: tuple[str, ...], found: Discovery) -> dict[str, set[str]]:
    """Which privilege must hold on which path for a build, staging and the smoke test."""
    paths = {
        "VM.": ["/vms"],
        "Datastore.": sorted({f"/storage/{found.vm_storage}", f"/storage/{found.iso_storage}"}),
        "Sys.": [f"/nodes/{found.node}"],
        "SDN.": [f"/sdn/zones/localnetwork/{found.bridge}"],
    }
    grants: dict[str, set[str]] = {}
    for priv in privileges:
        for prefix, where in paths.items():
            if priv.startswith(prefix):
                for path in where:
                    grants.setdefault(path, set()).add(priv)
    return grants


def missing_privileges(api_as_token: PveApi, grants: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(path, privilege) pairs the token lacks, asked of /access/permissions as the token itself."""
    missing = []
    for path, privs in sorted(grants.items()):
        held = api_as_token.access.permissions.get(path=path).get(path, {})
        missing += [(path, priv) for priv in sorted(privs) if not held.get(priv)]
    return missing


def token_privilege_gaps(api_as_token: PveApi, found: Discovery) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(what a build needs where, the (path, privilege) pairs the token lacks): the check `token_privileges`
    and the build's own check before packer starts ask the same."""
    grants = needed_grants(required_privileges(str(api_as_token.version.get()["version"])), found)
    return grants, missing_privileges(api_as_token, grants)


@dataclass(frozen=True)
class BuildAccess:
    """What `infra/env/.env.proxmox` gives every later step: where, as whom, and on what."""

    endpoint: Endpoint
    token_id: str
    token_secret: str = field(repr=False)
    discovery: Discovery

    @property
    def user(self) -> str:
        return self.token_id.partition("!")[0]

    @property
    def token_name(self) -> str:
        return self.token_id.partition("!")[2]

    def connect(self) -> PveApi:
        return connect(self.endpoint, self.user, token_name=self.token_name, token_secret=self.token_secret)


def build_access(values: dict[str, str], source: str) -> BuildAccess:
    """Read the env file's values; a missing one is named with the file it should be in."""

    def need(name: str) -> str:
        if not values.get(name):
            raise BootstrapError(f"{source}: {name} is missing (materialize proxmox_env / run `make init`)")
        return values[name]

    endpoint = Endpoint(
        need("PROXMOX_API_URL"),
        ca_file=values.get("PROXMOX_CA_FILE") or None,
        tls_fingerprint=values.get("PROXMOX_TLS_FINGERPRINT") or None,
        insecure=values.get("PROXMOX_INSECURE") == "1",
    )
    found = Discovery(
        node=need("PROXMOX_NODE"),
        node_ip=values.get("PROXMOX_NODE_IP", ""),
        vm_storage=need("PROXMOX_VM_STORAGE"),
        iso_storage=need("PROXMOX_ISO_STORAGE"),
        bridge=need("PROXMOX_BRIDGE"),
        http_bind_address=need("PROXMOX_HTTP_BIND_ADDRESS"),
        http_port=int(need("PROXMOX_HTTP_PORT")),
    )
    return BuildAccess(endpoint, need("PROXMOX_TOKEN_ID"), need("PROXMOX_TOKEN_SECRET"), found)
