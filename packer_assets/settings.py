"""Settings that every layer shares: the output root and how to reach and trust the Proxmox API.

Read from the process environment and from env files (`infra/env/.env.proxmox` under the root,
and the file named by PACKER_ASSETS_ENV_FILE, e.g. the lab's). The process environment wins, so a
one-off override needs no file edit.
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .envfile import read_env_file
from .evidence import Layout

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}
# The shell toolkit's init config: KEY=value lines, read as defaults so its users need nothing new.
TOOLKIT_CONF = Path("control/tools/provision/init/.conf/proxmox.conf")
FINGERPRINT_RE = re.compile(r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$")


class SettingsError(ValueError):
    """A setting with a bad value; the message names the variable and where it came from."""


@dataclass(frozen=True)
class Settings:
    root: Path
    proxmox_url: str | None
    ca_file: Path | None
    fingerprint: str | None
    insecure: bool
    sources: tuple[str, ...]

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

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
    raise SettingsError(f"{origin}: {name}={value!r} is not a yes/no value (use 1 or 0)")


def merged_environment(env: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(values, origin of each value): env files first, then the process environment over them."""
    env = dict(os.environ if env is None else env)
    root = Path(env.get("PACKER_ASSETS_ROOT") or ".").resolve()
    values: dict[str, str] = {}
    origin: dict[str, str] = {}
    layout = Layout(root)
    # Lowest first: the shell toolkit's config (migration), then our own files, then an explicit one.
    files = [root / TOOLKIT_CONF, layout.secrets_file, layout.env_file]
    if env.get("PACKER_ASSETS_ENV_FILE"):
        files.append(Path(env["PACKER_ASSETS_ENV_FILE"]))
    for path in files:
        if path.is_file():
            for name, value in read_env_file(path).items():
                values[name], origin[name] = value, str(path)
    for name, value in env.items():
        values[name], origin[name] = value, "environment"
    if not values.get("PROXMOX_URL") and values.get("PROXMOX_HOST"):
        # the toolkit named the node, not the URL
        port = values.get("PROXMOX_PORT") or "8006"
        values["PROXMOX_URL"] = f"https://{values['PROXMOX_HOST']}:{port}/api2/json"
        origin["PROXMOX_URL"] = origin["PROXMOX_HOST"]
    values.setdefault("PACKER_ASSETS_ROOT", str(root))
    return values, origin


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    values, origin = merged_environment(env)

    def where(name: str) -> str:
        return origin.get(name, "environment")

    url = values.get("PROXMOX_API_URL") or values.get("PROXMOX_URL") or None
    if url:
        name = "PROXMOX_API_URL" if values.get("PROXMOX_API_URL") else "PROXMOX_URL"
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise SettingsError(f"{where(name)}: {name}={url!r} must be an https:// URL with a host")
    ca_file = values.get("PROXMOX_CA_FILE") or None
    if ca_file and not Path(ca_file).is_file():
        raise SettingsError(f"{where('PROXMOX_CA_FILE')}: PROXMOX_CA_FILE={ca_file!r} does not exist")
    fingerprint = values.get("PROXMOX_TLS_FINGERPRINT") or None
    if fingerprint and not FINGERPRINT_RE.match(fingerprint):
        raise SettingsError(
            f"{where('PROXMOX_TLS_FINGERPRINT')}: PROXMOX_TLS_FINGERPRINT must be a SHA-256 fingerprint "
            "as PVE shows it (32 colon-separated hex bytes)"
        )
    insecure = _flag("PROXMOX_INSECURE", values.get("PROXMOX_INSECURE", "0"), where("PROXMOX_INSECURE"))
    if insecure and (ca_file or fingerprint):
        raise SettingsError(
            f"{where('PROXMOX_INSECURE')}: PROXMOX_INSECURE=1 contradicts PROXMOX_CA_FILE/PROXMOX_TLS_FINGERPRINT; "
            "choose one way to trust the API"
        )
    return Settings(
        root=Path(values["PACKER_ASSETS_ROOT"]).resolve(),
        proxmox_url=url,
        ca_file=Path(ca_file).resolve() if ca_file else None,
        fingerprint=fingerprint.upper() if fingerprint else None,
        insecure=insecure,
        sources=tuple(sorted(set(origin.values()))),
    )


def export_env_files(env: "os._Environ[str] | None" = None) -> list[str]:
    """Put values from the env files into the process environment where it has none (like Dagster's .env).

    Returns the names set. The process environment always wins.
    """
    target = os.environ if env is None else env
    values, origin = merged_environment(dict(target))
    added = [name for name in values if name not in target and origin.get(name, "environment") != "environment"]
    for name in added:
        target[name] = values[name]
    return added
