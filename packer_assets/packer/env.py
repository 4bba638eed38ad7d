"""Packer's environment: the only way credentials reach it (never argv, never a file in the workdir).

PROXMOX_URL                      the API (https://host:port/api2/json)
PROXMOX_USERNAME + PROXMOX_TOKEN or PROXMOX_PASSWORD   the login (version.auth_env decides which)
SSL_CERT_FILE                    the CA file, or the pinned certificate itself (Go trusts a root
                                 that is the leaf), so TLS stays verified; `insecure` is the only
                                 way off, and it is logged
PKR_VAR_ssh_password             the install user's password (a sensitive template variable)
CHECKPOINT_DISABLE=1             no update check against the internet
PATH, HOME, TMPDIR, plugin dirs  copied from the caller's environment; nothing else is inherited,
                                 so unrelated secrets of the calling process stay out of Packer
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packer_assets.errors import ConfigError
from packer_assets.packer.version import BuildCredentials, PackerCapabilities, auth_env
from packer_assets.pve.client import Endpoint, PveAccessError

log = logging.getLogger(__name__)

INHERITED = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "XDG_CONFIG_HOME", "PACKER_PLUGIN_PATH", "PACKER_CONFIG_DIR")
# The API login used only by `packer validate`, which checks that a login is configured but does not
# connect. Placeholders, not secrets.
VALIDATE_LOGIN = {"PROXMOX_USERNAME": "validate@pve", "PROXMOX_PASSWORD": "validate-only"}


class PackerEnvError(ConfigError):
    """The API endpoint cannot be trusted the way Packer needs (pinned certificate mismatch, ...)."""


@dataclass
class PackerEnv:
    env: dict[str, str] = field(repr=False)
    secrets: list[str] = field(repr=False)
    login: str  # token | password | validate


def _base(base_env: Mapping[str, str] | None) -> dict[str, str]:
    source = os.environ if base_env is None else base_env
    env = {k: source[k] for k in INHERITED if source.get(k)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["CHECKPOINT_DISABLE"] = "1"
    return env


def tls_env(endpoint: Endpoint, workdir: Path) -> dict[str, str]:
    if endpoint.insecure:
        log.warning("packer: TLS verification of %s is OFF (insecure was asked for)", endpoint.base)
        return {}
    if endpoint.ca_file:
        return {"SSL_CERT_FILE": str(Path(endpoint.ca_file).resolve())}
    if endpoint.tls_fingerprint:
        # Packer cannot pin a fingerprint; it can trust one certificate as its only root.
        try:
            pem = endpoint.check_tls_fingerprint()
        except PveAccessError as exc:
            raise PackerEnvError(str(exc)) from None
        pinned = Path(workdir) / "pve-pinned-cert.pem"
        pinned.write_text(pem)
        return {"SSL_CERT_FILE": str(pinned.resolve())}
    return {}  # the system store


def packer_env(
    endpoint: Endpoint,
    caps: PackerCapabilities,
    credentials: BuildCredentials,
    *,
    ssh_password: str,
    workdir: Path,
    base_env: Mapping[str, str] | None = None,
) -> PackerEnv:
    """The environment of `packer build`; raises PackerAuthError before anything runs when the
    credentials do not fit the installed Packer. Call it after prepare_workdir: with a pinned
    fingerprint it writes the certificate (public, not a secret) into `workdir`."""
    login = auth_env(caps, credentials)
    env = _base(base_env)
    env.update(tls_env(endpoint, workdir))
    env["PROXMOX_URL"] = endpoint.api_url
    env.update(login)
    env["PKR_VAR_ssh_password"] = ssh_password
    mode = "token" if "PROXMOX_TOKEN" in login else "password"
    return PackerEnv(env, [*credentials.secrets(), ssh_password], mode)


def validate_env(
    endpoint_url: str = "https://pve.invalid:8006/api2/json", *, base_env: Mapping[str, str] | None = None
) -> PackerEnv:
    """An environment for `packer validate`: a placeholder login and ssh password (validate does not connect)."""
    env = _base(base_env)
    env["PROXMOX_URL"] = endpoint_url
    env.update(VALIDATE_LOGIN)
    env["PKR_VAR_ssh_password"] = "validate-only"
    return PackerEnv(env, [], "validate")
