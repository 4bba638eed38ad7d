"""The ONE place where Packer / packer-plugin-proxmox version differences live.

`detect_packer()` asks the binary once (`packer version`, and `packer plugins installed` where that
exists), caches the answer per binary (path, mtime, size) and plugin directory, and turns it into
`PackerCapabilities`. Everything else (the version region of the work directory's common.pkr.hcl, the
login environment) reads only the capabilities, never a version number.

What differs, and from which version (conservative: a feature is claimed only from a release that
certainly has it):

| capability              | true from                              | when false                               |
| ----------------------- | -------------------------------------- | ---------------------------------------- |
| token_auth              | packer 1.7.1                           | password login (PROXMOX_PASSWORD)        |
| additional_isos         | packer 1.7.0 (1.6.6's HCL2 decoder     | no extra CD-ROMs (Windows answer ISO,    |
|                         | rejects `additional_iso_files`)        | virtio-win): a capability gap            |
| firmware (bios/machine) | packer 1.7.0 (plugin)                  | SeaBIOS, default machine: gap if asked   |
| boot_iso_block          | plugin 1.2.0                           | top-level `iso_file`                     |
| efi_tpm_blocks          | plugin 1.2.0                           | no EFI vars disk / TPM: a capability gap |
| tags                    | plugin 1.2.0                           | tags are set through the API afterwards  |
| needs_storage_pool_type | builder before plugin 1.1.0            | (deprecated later: left unset)           |
| needs_init              | packer 1.10.0 (no bundled plugins)     | no `required_plugins`, no `packer init`  |

Packer 1.7-1.9 bundle the plugin; without `packer plugins installed` we assume plugin 1.0.0
(the oldest bundled one). On packer >= 1.10 without an installed plugin we assume the version the
generated `required_plugins` constraint will install (PLUGIN_MIN) and say so in `plugin_source`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, overload

from packer_assets.errors import ConfigError, OperationError

Version = tuple[int, int, int]

PLUGIN_SOURCE = "github.com/hashicorp/proxmox"
PLUGIN_MIN: Version = (1, 2, 0)
PLUGIN_CONSTRAINT = ">= 1.2.0"

TOKEN_AUTH_CORE: Version = (1, 7, 1)
PLUGIN_SPLIT_CORE: Version = (1, 7, 0)
NO_BUNDLED_PLUGINS_CORE: Version = (1, 10, 0)
BUNDLED_PLUGIN_ASSUMED: Version = (1, 0, 0)
BOOT_ISO_PLUGIN: Version = (1, 2, 0)
EFI_TPM_PLUGIN: Version = (1, 2, 0)
TAGS_PLUGIN: Version = (1, 2, 0)
STORAGE_POOL_TYPE_OPTIONAL_PLUGIN: Version = (1, 1, 0)

_CORE_RE = re.compile(r"Packer v?(\d+)\.(\d+)\.(\d+)")
_PLUGIN_RE = re.compile(r"packer-plugin-proxmox_v(\d+)\.(\d+)\.(\d+)")
# Only these reach the probe: where packer finds its plugins, nothing secret.
_PROBE_ENV = ("PATH", "HOME", "TMPDIR", "XDG_CONFIG_HOME", "PACKER_PLUGIN_PATH", "PACKER_CONFIG_DIR")


class PackerVersionError(OperationError):
    """The packer binary is missing or did not say its version."""


class PackerAuthError(ConfigError):
    """The build credentials do not fit what the installed Packer can log in with."""


@overload
def vtext(version: Version) -> str: ...
@overload
def vtext(version: Version | None) -> str | None: ...
def vtext(version: Version | None) -> str | None:
    return ".".join(map(str, version)) if version else None


def parse_packer_version(text: str) -> Version:
    found = _CORE_RE.search(text) or re.search(r"^v?(\d+)\.(\d+)\.(\d+)", text.strip())
    if not found:
        raise PackerVersionError(f"cannot read a Packer version from {text.strip()[:200]!r}")
    return tuple(int(x) for x in found.groups())  # type: ignore[return-value]


def parse_plugin_version(text: str) -> Version | None:
    """The highest packer-plugin-proxmox version in `packer plugins installed` output, or None."""
    found = [tuple(int(x) for x in m.groups()) for m in _PLUGIN_RE.finditer(text)]
    return max(found) if found else None  # type: ignore[return-value]


@dataclass(frozen=True)
class PackerCapabilities:
    packer_version: str
    plugin_version: str | None  # None: the builder is built into packer (< 1.7.0)
    plugin_source: str  # builtin | installed | bundled (assumed) | packer init (assumed)
    token_auth: bool
    boot_iso_block: bool
    additional_isos: bool
    efi_tpm_blocks: bool
    firmware: bool
    tags: bool
    needs_storage_pool_type: bool
    needs_init: bool
    binary: str = "packer"

    def describe(self) -> str:
        plugin = (
            "builtin proxmox builder"
            if self.plugin_version is None
            else f"packer-plugin-proxmox {self.plugin_version}, {self.plugin_source}"
        )
        return f"packer {self.packer_version} ({plugin})"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def capabilities_for(core: Version, plugin: Version | None = None, binary: str = "packer") -> PackerCapabilities:
    """Capabilities of packer `core` with proxmox plugin `plugin` (None: not found / builtin)."""
    if core < PLUGIN_SPLIT_CORE:
        plugin, source = None, "builtin"
    elif plugin is not None:
        source = "installed"
    elif core < NO_BUNDLED_PLUGINS_CORE:
        plugin, source = BUNDLED_PLUGIN_ASSUMED, "bundled (assumed)"
    else:
        plugin, source = PLUGIN_MIN, f"packer init (assumed {PLUGIN_CONSTRAINT})"

    def has(need: Version) -> bool:
        return plugin is not None and plugin >= need

    return PackerCapabilities(
        packer_version=vtext(core),
        plugin_version=vtext(plugin),
        plugin_source=source,
        token_auth=core >= TOKEN_AUTH_CORE,
        boot_iso_block=has(BOOT_ISO_PLUGIN),
        additional_isos=core >= PLUGIN_SPLIT_CORE,
        efi_tpm_blocks=has(EFI_TPM_PLUGIN),
        firmware=core >= PLUGIN_SPLIT_CORE,
        tags=has(TAGS_PLUGIN),
        needs_storage_pool_type=plugin is None or plugin < STORAGE_POOL_TYPE_OPTIONAL_PLUGIN,
        needs_init=core >= NO_BUNDLED_PLUGINS_CORE,
        binary=binary,
    )


# ------------------------------------------------------------------ detection (cached)

_cache: dict[tuple[Any, ...], PackerCapabilities] = {}
_lock = threading.Lock()


def _probe_env(env: Mapping[str, str] | None) -> dict[str, str]:
    source = os.environ if env is None else env
    out = {k: source[k] for k in _PROBE_ENV if source.get(k)}
    out["CHECKPOINT_DISABLE"] = "1"  # no update check against the internet, no "out of date" noise
    return out


def _run(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False
    )


def resolve_binary(binary: str = "packer", env: Mapping[str, str] | None = None) -> str:
    """The absolute, symlink-free path of the packer binary (PATH searched as `env` has it)."""
    path = (env if env is not None else os.environ).get("PATH")
    found = shutil.which(binary, path=path)
    if not found:
        raise PackerVersionError(
            f"packer binary {binary!r} not found (PATH={path!r}); install Packer or configure its path"
        )
    return os.path.realpath(found)


def detect_packer(
    binary: str = "packer", env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> PackerCapabilities:
    """Ask the binary once; later calls with the same unchanged binary come from the cache."""
    real = resolve_binary(binary, env)
    stat = os.stat(real)
    probe_env = _probe_env(env)
    key = (real, stat.st_mtime_ns, stat.st_size, tuple(sorted(probe_env.items())))
    with _lock:
        if key in _cache:
            return _cache[key]
    done = _run([real, "version"], probe_env, timeout)
    if done.returncode != 0:
        raise PackerVersionError(
            f"{real} version exited {done.returncode}: {(done.stderr or done.stdout).strip()[:300]}"
        )
    core = parse_packer_version(done.stdout)
    plugin = None
    if core >= PLUGIN_SPLIT_CORE:
        # `plugins installed` exists from 1.8 on; older ones answer with usage text and no version.
        listed = _run([real, "plugins", "installed"], probe_env, timeout)
        plugin = parse_plugin_version(listed.stdout) if listed.returncode == 0 else None
    caps = capabilities_for(core, plugin, binary=real)
    with _lock:
        _cache[key] = caps
    return caps


def clear_cache() -> None:
    with _lock:
        _cache.clear()


# ------------------------------------------------------------------ credentials -> login environment


@dataclass(frozen=True)
class BuildCredentials:
    """How Packer logs in to the PVE API: an API token, a password login, or both.

    The token is used where the installed Packer can (>= 1.7.1); a password login is the only way
    for older ones (Debian's 1.6.6), so an installation with such a Packer must hold a password for
    the automation user. Secrets are excluded from repr.
    """

    token_id: str | None = None  # user@realm!name
    token_secret: str | None = field(default=None, repr=False)
    user: str | None = None  # user@realm
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if bool(self.token_id) != bool(self.token_secret):
            raise PackerAuthError("build_credentials: token_id and token_secret go together")
        if bool(self.user) != bool(self.password):
            raise PackerAuthError("build_credentials: user and password go together")
        if self.token_id and not re.fullmatch(r"[^@!\s]+@[^@!\s]+![A-Za-z][A-Za-z0-9._-]*", self.token_id):
            raise PackerAuthError(f"build_credentials: token_id {self.token_id!r} is not user@realm!tokenname")
        if self.user and not re.fullmatch(r"[^@!\s]+@[^@!\s]+", self.user):
            raise PackerAuthError(f"build_credentials: user {self.user!r} is not user@realm")
        if not (self.token_id or self.user):
            raise PackerAuthError(
                "build_credentials: give an API token (token_id + token_secret) or a password login (user + password)"
            )

    @classmethod
    def from_env(cls, values: Mapping[str, str]) -> BuildCredentials:
        """PROXMOX_TOKEN_ID/PROXMOX_TOKEN_SECRET and/or PROXMOX_BUILD_USER/PROXMOX_BUILD_PASSWORD."""
        password = values.get("PROXMOX_BUILD_PASSWORD") or None
        user = values.get("PROXMOX_BUILD_USER") or None
        token_id = values.get("PROXMOX_TOKEN_ID") or None
        if password and not user and token_id:
            user = token_id.partition("!")[0]  # the token's own user, logging in by password
        return cls(token_id, values.get("PROXMOX_TOKEN_SECRET") or None, user, password)

    def secrets(self) -> list[str]:
        return [s for s in (self.token_secret, self.password) if s]


def login_mode(caps: PackerCapabilities, creds: BuildCredentials) -> str:
    """'token' or 'password', or PackerAuthError naming the versions involved (before any side effect)."""
    if creds.token_id and caps.token_auth:
        return "token"
    if creds.user:
        return "password"
    raise PackerAuthError(
        f"{caps.describe()} cannot log in with the API token {creds.token_id}: API-token login needs packer >= "
        f"{vtext(TOKEN_AUTH_CORE)} (packer-plugin-proxmox). Give build_credentials a password login for the "
        f"automation user (user + password, e.g. PROXMOX_BUILD_USER/PROXMOX_BUILD_PASSWORD), or install packer >= "
        f"{vtext(TOKEN_AUTH_CORE)}"
    )


def auth_env(caps: PackerCapabilities, creds: BuildCredentials) -> dict[str, str]:
    """The PROXMOX_* login variables for packer's environment (never its arguments or files)."""
    if login_mode(caps, creds) == "token":
        # The plugin takes the token ID as the username and the secret as PROXMOX_TOKEN.
        assert creds.token_id and creds.token_secret  # __post_init__: a token ID comes with its secret
        return {"PROXMOX_USERNAME": creds.token_id, "PROXMOX_TOKEN": creds.token_secret}
    assert creds.user and creds.password  # login_mode: a password login has a user; __post_init__: and its password
    return {"PROXMOX_USERNAME": creds.user, "PROXMOX_PASSWORD": creds.password}
