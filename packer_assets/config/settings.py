"""Settings that every layer shares: the output root and how to reach and trust the Proxmox API.

Read from the process environment and from env files (`infra/env/.env.proxmox` under the output_root,
and the file named by PACKER_ASSETS_ENV_FILE, e.g. the lab's). The process environment wins, so a
one-off override needs no file edit. Nothing here writes to os.environ: `environment()` is the merged,
read-only view whatever needs a variable (install passwords, secrets, the catalog's) reads.
"""

import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import overload
from urllib.parse import urlsplit

from packer_assets.config.envfile import read_assignments
from packer_assets.errors import ConfigError
from packer_assets.evidence.layout import Layout
from packer_assets.pve.bootstrap import BootstrapConfig
from packer_assets.runs.notify import WebhookConfigError, parse_webhooks

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}
# The shell toolkit's init config: KEY=value lines, read as defaults so its users need nothing new.
TOOLKIT_CONF = Path("control/tools/provision/init/.conf/proxmox.conf")
FINGERPRINT_RE = re.compile(r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$")
# Five cron fields of numbers, ranges, steps, lists, `*` and names (mon, jan); Dagster checks the rest.
CRON_RE = re.compile(r"[\w*/,-]+([ \t]+[\w*/,-]+){4}")
BOOTSTRAP = BootstrapConfig()  # the defaults of what proxmox_env creates (user, role, token, packer's HTTP port)


class SettingsError(ConfigError):
    """A setting with a bad value; the message names the variable and where it came from."""


@dataclass(frozen=True)
class Settings:
    """Everything the live path (definitions, CLI, Makefile) reads from the environment, validated once.

    Secrets are in no field but `environment` (never printed, compared or shown): resources read them per
    run from settings.environment().
    """

    output_root: Path
    proxmox_url: str | None
    ca_file: Path | None
    tls_fingerprint: str | None
    insecure: bool
    sources: tuple[str, ...]
    insecure_origin: str | None = None  # where PROXMOX_INSECURE=1 came from (logged on every run)
    # proxmox_env: bootstrap login, what to create, what to use (configured names win over discovery)
    bootstrap_user: str = "root@pam"
    bootstrap_token_name: str | None = None
    bootstrap_method: str = "api"
    bootstrap: BootstrapConfig = BootstrapConfig()  # noqa: RUF009 - frozen, one shared default is safe. user, role, token, node, storages, bridge, HTTP bind
    ssh_host: str | None = None
    ssh_port: int = 22
    ssh_user: str = "root"
    ssh_key_file: str | None = None
    ssh_known_hosts: str | None = None
    ssh_trust_on_first_use: bool = False
    # builds
    packer_binary: str = "packer"
    allow_degraded: bool = False
    packer_ssh_host: str | None = None
    packer_ssh_port: int | None = None
    packer_ssh_timeout: str | None = None
    packer_ssh_ports: str | None = None  # `key=port,...`: the lab's real guests (parse_ssh_ports)
    guest_notes: str | None = None  # `key=text;...;*=text`: what each key's guests are, for proofs (parse_guest_notes)
    console_log: str | None = None  # a path with `{vmid}`: where a VM's serial console is logged (parse_console_log)
    boot_wait: str | None = None
    build_user: str | None = None
    build_login: str = "auto"  # how Packer logs in: token, password (the automation user's), auto (by version)
    # automation
    sensor_interval: int = 3600  # seconds between iso_checksum_sensor ticks
    rebuild_cron: str = "0 3 * * 0"  # weekly_rebuild, UTC: Sunday 03:00
    # evidence: proof bundles are signed (SSHSIG over manifest.json) when a key file is named
    signing_key: Path | None = None
    signing_key_id: str | None = None
    ui_url: str | None = None  # the Dagster webserver, for links to runs (PACKER_ASSETS_UI_URL)
    # every variable as read: the process environment over the env files, read-only (secrets too: not printed)
    environment: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False, compare=False)

    @property
    def layout(self) -> Layout:
        return Layout(self.output_root)

    @property
    def api_base(self) -> str | None:
        """`https://host:port` without `/api2/json` (what proxmoxer and Terraform bpg take)."""
        if not self.proxmox_url:
            return None
        return self.proxmox_url.rstrip("/").removesuffix("/api2/json")

    @property
    def verify(self) -> str | bool:
        """What requests/proxmoxer take as `verify`: a CA file, True for the system store, or False."""
        if self.ca_file:
            return str(self.ca_file)
        return not self.insecure


def _flag(name: str, value: str, origin: str) -> bool:
    lowered = value.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise SettingsError(f"{origin}: {name} is not a yes/no value (use 1 or 0)")


def merged_environment(env: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(values, origin of each value): env files first, then the process environment over them."""
    values, origin, _ = _merged(env)
    return values, origin


def environment(env: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """The process environment over the env files, read now and read-only: what the live path reads a variable
    from (the catalog's PACKER_ASSETS_CATALOG, an install password, a secret, packer's PATH) where it is not a
    setting of its own. Nothing is exported: os.environ stays what the process was given."""
    return MappingProxyType(merged_environment(env)[0])


def _merged(env: Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    """merged_environment, and the line of each value read from a file (for errors)."""
    env = dict(os.environ if env is None else env)
    output_root = Path(env.get("PACKER_ASSETS_ROOT") or ".").resolve()
    values: dict[str, str] = {}
    origin: dict[str, str] = {}
    lines: dict[str, int] = {}
    layout = Layout(output_root)
    # Lowest first: the shell toolkit's config (migration), then our own files, then an explicit one.
    files = [output_root / TOOLKIT_CONF, layout.secrets_file, layout.env_file]
    if env.get("PACKER_ASSETS_ENV_FILE"):
        files.append(Path(env["PACKER_ASSETS_ENV_FILE"]))
    rank: dict[str, int] = {}  # the source each value came from, weakest first (the environment last)
    for number, path in enumerate(files):
        if path.is_file():
            for line, name, value in read_assignments(path):
                # .env.proxmox records the last init's choice; turning TLS verification off must be asked
                # for on each init, never inherited from that record
                if name is None or (name == "PROXMOX_INSECURE" and path == layout.env_file):
                    continue
                values[name], origin[name], lines[name], rank[name] = value, str(path), line, number
    for name, value in env.items():
        values[name], origin[name], rank[name] = value, "environment", len(files)
        lines.pop(name, None)
    _drop_weaker_url(values, rank)
    if not values.get("PROXMOX_URL") and values.get("PROXMOX_HOST"):
        # the toolkit named the node, not the URL
        port = values.get("PROXMOX_PORT") or "8006"
        values["PROXMOX_URL"] = f"https://{values['PROXMOX_HOST']}:{port}/api2/json"
        origin["PROXMOX_URL"] = origin["PROXMOX_HOST"]
        if "PROXMOX_HOST" in lines:
            lines["PROXMOX_URL"] = lines["PROXMOX_HOST"]
    values.setdefault("PACKER_ASSETS_ROOT", str(output_root))
    return values, origin, lines


def _drop_weaker_url(values: dict[str, str], rank: dict[str, int]) -> None:
    """PROXMOX_API_URL and PROXMOX_URL name the same endpoint: where both are set, the one from the stronger source
    counts (a lab's env file over the .env.proxmox a previous init recorded for a lab since stopped)."""
    both = ("PROXMOX_API_URL", "PROXMOX_URL")
    if all(values.get(name) for name in both) and rank["PROXMOX_API_URL"] != rank["PROXMOX_URL"]:
        del values[min(both, key=lambda name: rank[name])]


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check every setting; the first bad one is a SettingsError naming the variable and where it
    came from (`environment` or the env file), before anything has run."""
    values, origin, lines = _merged(env)
    output_root = Path(values["PACKER_ASSETS_ROOT"]).resolve()

    def where(name: str) -> str:
        return f"{origin[name]}: line {lines[name]}" if name in lines else origin.get(name, "environment")

    @overload
    def text(name: str) -> str | None: ...
    @overload
    def text(name: str, default: str) -> str: ...
    def text(name: str, default: str | None = None) -> str | None:
        value = values.get(name)
        if value is None or value == "":
            return default
        if value != value.strip() or not value.isprintable():
            raise SettingsError(
                f"{where(name)}: {name} has leading/trailing white space or a control character (a stray newline?)"
            )
        return value

    def flag(name: str, default: bool) -> bool:
        value = values.get(name)
        return default if value is None or value == "" else _flag(name, value, where(name))

    @overload
    def port(name: str, default: int) -> int: ...
    @overload
    def port(name: str, default: None) -> int | None: ...
    def port(name: str, default: int | None) -> int | None:
        value = text(name)
        if value is None:
            return default
        if not value.isdigit() or not 1 <= int(value) <= 65535:
            raise SettingsError(f"{where(name)}: {name} is not a TCP port (1-65535)")
        return int(value)

    def checked(parse: Callable[[str], object], name: str) -> str | None:
        value = text(name)
        if value is not None:
            try:
                parse(value)
            except ValueError as exc:
                raise SettingsError(f"{where(name)}: {name}: {exc}") from None
        return value

    def existing_file(name: str) -> str | None:
        value = text(name)
        if value is not None and Path(value).expanduser().is_dir():  # a directory is no secret: named
            raise SettingsError(f"{where(name)}: {name}: {value} is a directory, not a file")
        if value is not None and not Path(value).expanduser().is_file():  # unnamed: what was meant as a path
            raise SettingsError(f"{where(name)}: {name} names no file")  # may be a secret pasted in
        return value

    url_name = "PROXMOX_API_URL" if values.get("PROXMOX_API_URL") else "PROXMOX_URL"
    url = text(url_name)
    if url:
        problem = _url_problem(url, ("https",))
        if problem:
            raise SettingsError(f"{where(url_name)}: {url_name} {problem}")
    ca_file = existing_file("PROXMOX_CA_FILE")
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise SettingsError(
                f"{where('PROXMOX_CA_FILE')}: PROXMOX_CA_FILE {ca_file} is not a PEM CA "
                f"certificate ({exc.__class__.__name__})"
            ) from None
    fingerprint = text("PROXMOX_TLS_FINGERPRINT")
    if fingerprint and not FINGERPRINT_RE.fullmatch(fingerprint):
        raise SettingsError(
            f"{where('PROXMOX_TLS_FINGERPRINT')}: PROXMOX_TLS_FINGERPRINT must be a SHA-256 fingerprint "
            "as PVE shows it (32 colon-separated hex bytes)"
        )
    insecure = flag("PROXMOX_INSECURE", False)
    if insecure and (ca_file or fingerprint):
        trusted = "PROXMOX_CA_FILE" if ca_file else "PROXMOX_TLS_FINGERPRINT"
        raise SettingsError(
            f"{where('PROXMOX_INSECURE')}: PROXMOX_INSECURE=1 contradicts {trusted} (from {where(trusted)}); "
            "choose one way to trust the API"
        )
    method = text("PROXMOX_BOOTSTRAP_METHOD", "api")
    if method not in ("api", "ssh"):
        raise SettingsError(f"{where('PROXMOX_BOOTSTRAP_METHOD')}: PROXMOX_BOOTSTRAP_METHOD is neither api nor ssh")
    if method == "ssh" and not text("PROXMOX_SSH_HOST"):
        raise SettingsError(f"{where('PROXMOX_BOOTSTRAP_METHOD')}: PROXMOX_BOOTSTRAP_METHOD=ssh needs PROXMOX_SSH_HOST")
    build_login = text("PROXMOX_BUILD_LOGIN", "auto")
    if build_login not in ("auto", "token", "password"):
        raise SettingsError(f"{where('PROXMOX_BUILD_LOGIN')}: PROXMOX_BUILD_LOGIN is none of auto, token, password")
    interval = text("PACKER_ASSETS_SENSOR_INTERVAL", str(Settings.sensor_interval))
    if not interval.isdigit() or int(interval) < 1:
        raise SettingsError(
            f"{where('PACKER_ASSETS_SENSOR_INTERVAL')}: PACKER_ASSETS_SENSOR_INTERVAL is not a "
            "whole number of seconds (1 or more)"
        )
    try:  # a secret: checked here, read per run by the notifier resource (defs/resources.secret)
        parse_webhooks(values.get("PACKER_ASSETS_WEBHOOKS"))
    except WebhookConfigError as exc:
        raise SettingsError(f"{where('PACKER_ASSETS_WEBHOOKS')}: {exc}") from None
    cron = text("PACKER_ASSETS_REBUILD_CRON", Settings.rebuild_cron)
    if not CRON_RE.fullmatch(cron):
        raise SettingsError(
            f"{where('PACKER_ASSETS_REBUILD_CRON')}: PACKER_ASSETS_REBUILD_CRON is not a "
            "five-field cron expression (minute hour day month weekday)"
        )
    return Settings(
        output_root=output_root,
        proxmox_url=url,
        ca_file=Path(ca_file).resolve() if ca_file else None,
        tls_fingerprint=fingerprint.upper() if fingerprint else None,
        insecure=insecure,
        sources=tuple(sorted(set(origin.values()))),
        insecure_origin=where("PROXMOX_INSECURE") if insecure else None,
        bootstrap_user=text("PROXMOX_BOOTSTRAP_USER", "root@pam"),
        bootstrap_token_name=text("PROXMOX_BOOTSTRAP_TOKEN_NAME"),
        bootstrap_method=method,
        bootstrap=BootstrapConfig(
            user=text("PROXMOX_AUTOMATION_USER", BOOTSTRAP.user),
            role=text("PROXMOX_ROLE", BOOTSTRAP.role),
            token_name=text("PROXMOX_TOKEN_NAME", BOOTSTRAP.token_name),
            privsep=flag("PROXMOX_PRIVSEP", BOOTSTRAP.privsep),
            node=text("PROXMOX_NODE"),
            vm_storage=text("PROXMOX_VM_STORAGE"),
            iso_storage=text("PROXMOX_ISO_STORAGE"),
            bridge=text("PROXMOX_BRIDGE"),
            http_bind_address=text("PROXMOX_HTTP_BIND_ADDRESS"),
            http_port=port("PROXMOX_HTTP_PORT", BOOTSTRAP.http_port),
        ),
        ssh_host=text("PROXMOX_SSH_HOST"),
        ssh_port=port("PROXMOX_SSH_PORT", 22),
        ssh_user=text("PROXMOX_SSH_USER", "root"),
        ssh_key_file=existing_file("PROXMOX_SSH_KEY_FILE"),
        ssh_known_hosts=text("PROXMOX_SSH_KNOWN_HOSTS"),
        ssh_trust_on_first_use=flag("PROXMOX_SSH_TRUST_ON_FIRST_USE", False),
        packer_binary=text("PACKER_BINARY", "packer"),
        allow_degraded=flag("PACKER_ASSETS_ALLOW_DEGRADED", False),
        packer_ssh_host=text("PACKER_ASSETS_SSH_HOST"),
        packer_ssh_port=port("PACKER_ASSETS_SSH_PORT", None),
        packer_ssh_timeout=text("PACKER_ASSETS_SSH_TIMEOUT"),
        packer_ssh_ports=checked(parse_ssh_ports, "PACKER_ASSETS_SSH_PORTS"),
        guest_notes=checked(parse_guest_notes, "PACKER_ASSETS_GUEST_NOTES"),
        console_log=checked(parse_console_log, "PACKER_ASSETS_CONSOLE_LOG"),
        boot_wait=text("PACKER_ASSETS_BOOT_WAIT"),
        build_user=text("PROXMOX_BUILD_USER"),
        build_login=build_login,
        sensor_interval=int(interval),
        rebuild_cron=cron,
        signing_key=_signing_key(existing_file("PACKER_ASSETS_SIGNING_KEY"), where("PACKER_ASSETS_SIGNING_KEY")),
        signing_key_id=text("PACKER_ASSETS_SIGNING_KEY_ID"),
        ui_url=_ui_url(text("PACKER_ASSETS_UI_URL"), where("PACKER_ASSETS_UI_URL")),
        environment=MappingProxyType(values),
    )


def _pairs(value: str | None, what: str, separator: str = ",") -> list[tuple[int, str, str]]:
    """(item number, name, value) of `name=value,...`; errors name the item by number: no text is echoed."""
    pairs = []
    for number, item in enumerate((value or "").split(separator), 1):
        name, eq, right = item.strip().partition("=")
        if not item.strip():
            continue
        if not eq or not name or not right:
            raise ValueError(f"item {number} is not {what}")
        pairs.append((number, name, right))
    return pairs


def parse_ssh_ports(value: str | None) -> dict[str, int]:
    """PACKER_ASSETS_SSH_PORTS (`debian-12=40022,...`): the SSH port of each key's guests where it is not
    PACKER_ASSETS_SSH_PORT (the lab's real guests are each reached through a port of their own)."""
    ports = {}
    for number, key, port in _pairs(value, "key=port"):
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"item {number}: not a TCP port (1-65535)")
        ports[key] = int(port)
    return ports


def parse_guest_notes(value: str | None) -> dict[str, str]:
    """PACKER_ASSETS_GUEST_NOTES (`debian-12=a VM on the staging node;*=...`): a note per key on what its guests
    are, which its proofs print (`guest`, the README's Guest row); `*` is every other key. Any environment may
    say it (the lab says which of its guests are real); unset, a proof says the guest is not stated."""
    return {key.strip(): note.strip() for _number, key, note in _pairs(value, "key=text", ";")}


def parse_console_log(value: str) -> Path:
    """PACKER_ASSETS_CONSOLE_LOG (`/var/log/pve-console/{vmid}.log`): where a VM's serial console is logged to a
    file this host can read; a build whose VM stops before SSH came up quotes its last lines. The path of
    VM 100 is returned; errors never echo the value (what was meant as a path may be a pasted secret)."""
    try:
        path = Path(value.format(vmid=100))
    except (KeyError, IndexError, ValueError):
        raise ValueError("holds a placeholder other than {vmid} (or a stray brace)") from None
    if "{vmid}" not in value or not path.is_absolute():
        raise ValueError("must be an absolute path holding {vmid}, e.g. /var/log/pve-console/{vmid}.log")
    return path


def guest_note(value: str | None, key: str) -> str | None:
    """The note of PACKER_ASSETS_GUEST_NOTES for `key` (its own, else `*`'s); None: not stated."""
    notes = parse_guest_notes(value)
    return notes.get(key, notes.get("*"))


def _ui_url(value: str | None, origin: str) -> str | None:
    if value is None:
        return None
    problem = _url_problem(value, ("http", "https"))
    if problem:
        raise SettingsError(f"{origin}: PACKER_ASSETS_UI_URL {problem} (the Dagster webserver's)")
    return value.rstrip("/")


def _url_problem(url: str, schemes: tuple[str, ...]) -> str | None:
    """What is wrong with a URL setting, without its text; a user or password in it would be printed and logged."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return "is not a URL"
    if parts.scheme not in schemes or not parts.hostname:
        return f"must be an {' or '.join(s + '://' for s in schemes)} URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user or password (it is shown and logged; the API token is a setting of its own)"
    return None


def _signing_key(path: str | None, origin: str) -> Path | None:
    """The signing key file, checked now (an Ed25519 OpenSSH private key), not at the first proof."""
    if path is None:
        return None
    from packer_assets.evidence.signing import Signer, SigningKeyError

    try:
        Signer(Path(path).expanduser()).public_key()
    except SigningKeyError as exc:
        raise SettingsError(f"{origin}: PACKER_ASSETS_SIGNING_KEY: {exc}") from None
    return Path(path).expanduser().resolve()
