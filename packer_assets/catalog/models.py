"""The catalog's schema: field types and the frozen pydantic models of an entry (the rules are listed
in `packer_assets/catalog/__init__.py`). No Dagster import here: this is the ground floor."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from packer_assets.catalog.cpu import DEFAULT_CPU_TYPE, check_cpu_type
from packer_assets.catalog.eol import parse_eol
from packer_assets.errors import ConfigError
from packer_assets.upstream.digests import Checksum

CATALOG_ENV = "PACKER_ASSETS_CATALOG"
MIRROR_ENV = "PACKER_ASSETS_ISO_MIRROR"
# A site mirror that re-hosts media it re-spins: a pinned checksum names upstream's bytes, not the mirror's,
# so with this set (a file name, e.g. SHA256SUMS) a pinned ISO takes its checksum from that file beside it.
MIRROR_CHECKSUMS_ENV = "PACKER_ASSETS_ISO_MIRROR_CHECKSUMS"
# A mirror that writes its own checksum files signs them with its own key: upstream's signature cannot cover them.
# With this set (a keyring file), an ISO whose catalog names a keyring is verified against the mirror's keyring.
MIRROR_KEYRING_ENV = "PACKER_ASSETS_ISO_MIRROR_KEYRING"
DEFAULT_CATALOG = PurePosixPath("templates/catalog.yaml")
CATALOG_VERSION = 1

Family = Literal["ubuntu", "debian", "rocky", "windows"]
FAMILIES: tuple[str, ...] = get_args(Family)
UNATTENDED = {"ubuntu": "autoinstall", "debian": "preseed", "rocky": "kickstart", "windows": "autounattend"}
# Whole-string patterns, used with fullmatch (`$` would let a trailing newline through).
KEY_RE = re.compile(r"[a-z][a-z0-9-]*")
ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
ISO_FILENAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\.iso")
# A key names the template's VM, `<key>-<yyyymmddhhmmss>`, which Proxmox wants a DNS label (<= 63).
KEY_MAX = 48
# The staged volume is `<name>.<12 hex>.iso`; file names stop at 255 bytes.
ISO_FILENAME_MAX = 200
# Install users a Linux installer refuses, or that would make the build log in as a system account.
RESERVED_USERS = frozenset(
    {
        "root",
        "daemon",
        "bin",
        "sys",
        "sync",
        "games",
        "man",
        "lp",
        "mail",
        "news",
        "uucp",
        "proxy",
        "www-data",
        "backup",
        "list",
        "irc",
        "gnats",
        "nobody",
        "nogroup",
        "adm",
        "admin",
        "sudo",
        "wheel",
        "operator",
        "shutdown",
        "halt",
        "ftp",
        "sshd",
        "messagebus",
        "polkitd",
        "systemd-network",
        "systemd-resolve",
        "systemd-timesync",
        "_apt",
        "tss",
        "ubuntu",
        "cloud-user",
    }
)
VMID_MIN, VMID_MAX = 100, 999_999_999
TAG_RE = re.compile(r"[a-z0-9_][a-z0-9_+.-]*")  # PVE's tag syntax (it accepts upper case, matching without case)
# Every tag the tool sets itself starts with this (pve/templates.py: the tool, promotion, revocation, smoke
# clones, channels); the template's key is the other one, refused as a tag of another entry (loader.py).
TOOL_TAG_NAMESPACE = "packer-assets"
WINDOWS_OS_TYPES = ("wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11")
OTHER_OS_TYPES = ("l24", "l26", "solaris", "other")
OsType = Literal[
    "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11", "l24", "l26", "solaris", "other"
]  # Proxmox `ostype`
CATALOG_ALGORITHMS = ("sha256", "sha512")


class CatalogError(ConfigError):
    """A catalog problem; every line names the file, the key and the field."""


class _FieldError(ValueError):
    """Raised inside a model validator to point at a field below the model being validated."""

    def __init__(self, field_path: str, message: str):
        super().__init__(message)
        self.field_path = field_path


# ---------------------------------------------------------------- pure helpers


def check_http_url(value: str) -> str:
    """Return `value` if it is an absolute http(s) URL with a host, else raise ValueError."""
    if not value or any(ch.isspace() for ch in value):
        raise ValueError("must be an http(s) URL without spaces")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL (scheme is {parts.scheme or 'missing'!r})")
    if not parts.hostname:
        raise ValueError("must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@); the catalog is logged")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("has a malformed port") from None
    return value


def check_mirror_base(value: str) -> str:
    """A mirror base URL: an http(s) URL with a host and no query or fragment. Returns it."""
    check_http_url(value)
    parts = urlsplit(value)
    if parts.query or parts.fragment:
        raise ValueError("must be a base URL without ?query or #fragment")
    return value


def mirror_url(url: str, base: str) -> str:
    """`<base>/<upstream host[:port]>/<upstream path>[?query]`; the fragment is dropped."""
    up = urlsplit(url)
    host = up.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if up.port is not None:
        host = f"{host}:{up.port}"
    out = f"{base.rstrip('/')}/{host}/{up.path.lstrip('/')}"
    return f"{out}?{up.query}" if up.query else out


def mirror_from_env(env: Mapping[str, str]) -> str | None:
    """The mirror base from `PACKER_ASSETS_ISO_MIRROR` (unset or blank: None). Raises ValueError."""
    value = (env.get(MIRROR_ENV) or "").strip()
    return check_mirror_base(value) if value else None


def mirror_checksums_from_env(env: Mapping[str, str]) -> str | None:
    """The checksum file name of `PACKER_ASSETS_ISO_MIRROR_CHECKSUMS` (unset or blank: None). Raises ValueError."""
    value = (env.get(MIRROR_CHECKSUMS_ENV) or "").strip()
    if not value:
        return None
    if not value.isprintable() or any(ch.isspace() or ch in "/\\?#" for ch in value) or value in (".", ".."):
        raise ValueError("must be a file name beside the ISO on the mirror (like SHA256SUMS), not a path or URL")
    return value


def mirror_keyring_from_env(env: Mapping[str, str], project_dir: Path) -> Path | None:
    """The keyring file of `PACKER_ASSETS_ISO_MIRROR_KEYRING` (unset or blank: None; relative: to the project
    directory). Raises ValueError when it is no file."""
    value = (env.get(MIRROR_KEYRING_ENV) or "").strip()
    if not value:
        return None
    path = project_dir / Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{value}: no such file (want the mirror's public OpenPGP keyring)")
    return path.resolve()


def parse_checksum(value: str) -> tuple[str, str]:
    """`'sha256:<hex>'` -> `('sha256', '<lower-case hex>')`; raises ValueError when malformed. The catalog
    pins with sha256 or sha512 only (digests.Checksum parses the form)."""
    algo, sep, _digest = value.partition(":")
    if not sep or algo.strip().lower() not in CATALOG_ALGORITHMS:
        raise ValueError("must be 'sha256:<64 hex digits>' or 'sha512:<128 hex digits>'")
    checksum = Checksum.parse(value)
    return checksum.algorithm, checksum.hex


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge recursively, `override` wins; lists and scalars (and None) replace."""
    out = dict(base)
    for name, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(name), Mapping):
            out[name] = deep_merge(out[name], value)
        else:
            out[name] = value
    return out


def _url_basename(url: str) -> str:
    return PurePosixPath(urlsplit(url).path).name


# ---------------------------------------------------------------- field types


def _norm_checksum(value: str) -> str:
    algo, digest = parse_checksum(value)
    return f"{algo}:{digest}"


def _check_key(value: str) -> str:
    if not KEY_RE.fullmatch(value):
        raise ValueError(f"{value!r} must start with a lower-case letter and hold only a-z, 0-9 and '-'")
    if len(value) > KEY_MAX:
        raise ValueError(
            f"is {len(value)} characters long; at most {KEY_MAX} (the VM name <key>-<yyyymmddhhmmss> "
            "must be a DNS label of at most 63)"
        )
    return value


def _check_env_name(value: str) -> str:
    if not ENV_NAME_RE.fullmatch(value):  # never echo the value: it may be a pasted password
        raise ValueError(
            "must be the NAME of an environment variable (like PACKER_INSTALL_PASSWORD: "
            "A-Z, 0-9, '_'), never the secret itself"
        )
    return value


def _check_filename(value: str) -> str:
    if not ISO_FILENAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a plain file name ending in .iso "
            "(taken from the url when not given; set filename explicitly)"
        )
    if len(value) > ISO_FILENAME_MAX:
        raise ValueError(f"is {len(value)} characters long; at most {ISO_FILENAME_MAX}")
    return value


def _check_tag(value: str) -> str:
    """A Proxmox tag, lower-cased (PVE matches tags case-insensitively; the tool writes them lower-case), that
    is not in the tool's own namespace: a catalog tag `packer-assets-revoked` would make every build fail at
    promotion, `packer-assets-channel-<name>` would move a channel."""
    tag = value.lower()
    if not TAG_RE.fullmatch(tag):
        raise ValueError(f"{value!r} is not a Proxmox tag: a-z, 0-9 or _ first, then also '+', '.', '-'")
    if tag == TOOL_TAG_NAMESPACE or tag.startswith(f"{TOOL_TAG_NAMESPACE}-"):
        raise ValueError(
            f"{value!r} is one of the tags this tool sets itself ({TOOL_TAG_NAMESPACE}, "
            f"{TOOL_TAG_NAMESPACE}-latest, -revoked, -smoke, -channel-<name>): choose another"
        )
    return tag


def _check_packer_dir(value: str) -> str:
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in path.parts or "\\" in value:
        raise ValueError("must be a relative POSIX path without '..', like templates/ubuntu")
    if len(path.parts) < 2 or path.parts[0] != "templates":
        raise ValueError("must be a folder under templates/, like templates/ubuntu")
    return path.as_posix()


Url = Annotated[str, AfterValidator(check_http_url)]
ChecksumText = Annotated[str, AfterValidator(_norm_checksum)]  # 'sha256:<hex>', normalised
IsoFilename = Annotated[str, AfterValidator(_check_filename)]
Key = Annotated[str, AfterValidator(_check_key)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
PackerDir = Annotated[str, AfterValidator(_check_packer_dir)]
Tag = Annotated[str, AfterValidator(lambda v: _check_tag(v))]  # Proxmox tag syntax, lower-cased
Vmid = Annotated[int, Field(ge=VMID_MIN, le=VMID_MAX)]
Retention = Annotated[int, Field(ge=1)]
WorkDirsKept = Annotated[int, Field(ge=1)]
Cores = Annotated[int, Field(ge=1, le=512)]
Sockets = Annotated[int, Field(ge=1, le=16)]
MemoryMiB = Annotated[int, Field(ge=256)]
DiskSize = Annotated[str, Field(pattern=r"^[1-9][0-9]*[MGT]$")]  # Proxmox size: 32G, 512M, 1T
Machine = Annotated[str, Field(pattern=r"^(pc|q35|pc-(i440fx|q35)-\d+\.\d+(\+pve\d+)?)$")]
Bios = Literal["seabios", "ovmf"]
# Proxmox's VM `cpu` type (catalog/cpu.py): x86-64-v2-AES, x86-64-v3, host, Haswell, custom-<name>, ...
CpuType = Annotated[str, AfterValidator(check_cpu_type)]
UserName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")]
SubiquityRelease = Annotated[str, Field(pattern=r"^\d{2}\.\d{2}(\.\d+)?$")]
EolDate = Annotated[date, BeforeValidator(parse_eol)]  # YAML 2028-06-30; a datetime or 'x\n' is refused


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- models


class IsoSource(_Model):
    """An upstream ISO: `url` plus exactly one of `checksum_url` / `checksum`."""

    url: Url
    checksum_url: Url | None = None
    checksum: ChecksumText | None = None
    filename: IsoFilename  # defaults to the URL's last path segment
    # OpenPGP keyring (path under the project root) that signed the checksum file; signature_url is a
    # detached signature (absent: the checksum file is clearsigned). Checked before the file is trusted.
    keyring: str | None = None
    signature_url: Url | None = None
    _mirror: str | None = PrivateAttr(default=None)
    _keyring_path: Path | None = PrivateAttr(default=None)
    # PACKER_ASSETS_ISO_MIRROR_CHECKSUMS: the file beside the ISO on the mirror that replaced a pinned checksum
    _mirror_checksums: str | None = PrivateAttr(default=None)
    # PACKER_ASSETS_ISO_MIRROR_KEYRING: the mirror's own keyring, for an ISO whose catalog names a keyring
    _mirror_keyring: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _default_filename(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "filename" not in data and isinstance(data.get("url"), str):
            data = {**data, "filename": _url_basename(data["url"])}
        return data

    @model_validator(mode="after")
    def _one_checksum(self) -> IsoSource:
        if self.checksum_url and self.checksum:
            raise _FieldError("checksum", "give checksum_url or checksum, not both")
        if not self.checksum_url and not self.checksum:
            raise _FieldError(
                "checksum",
                "missing: give checksum_url (a SHA256SUMS/CHECKSUM file) or checksum ('sha256:<64 hex>')",
            )
        if self.keyring and not self.checksum_url:
            raise _FieldError("keyring", "a keyring verifies a checksum file: give checksum_url too")
        if self.signature_url and not self.keyring:
            raise _FieldError("signature_url", "a signature needs a keyring to check it against")
        return self

    @property
    def keyring_path(self) -> Path | None:
        """The keyring as an absolute path (resolved against the project root at load)."""
        return self._keyring_path

    @property
    def signature_keyring(self) -> Path | None:
        """The keyring the checksum file's signature is checked against: the mirror's (it re-signs the files it
        serves) when PACKER_ASSETS_ISO_MIRROR_KEYRING is set, else upstream's from the catalog; None: unsigned."""
        return self._mirror_keyring or self._keyring_path

    @property
    def signed_by(self) -> str | None:
        """Whose key verifies the checksum file, for records and proofs: `mirror: <keyring> (<env>)` or
        `upstream: <catalog keyring>`; None when the catalog names no keyring."""
        if not self.keyring:
            return None
        if self._mirror_keyring:
            return f"mirror: {self._mirror_keyring} ({MIRROR_KEYRING_ENV})"
        return f"upstream: {self.keyring} (the catalog's keyring)"

    @property
    def upstream_name(self) -> str:
        """The file name to look up in the checksum file (last segment of the upstream URL)."""
        return _url_basename(self.url)

    @property
    def checksum_algorithm(self) -> str | None:
        return self.checksum.partition(":")[0] if self.checksum else None

    @property
    def checksum_hex(self) -> str | None:
        return self.checksum.partition(":")[2] if self.checksum else None

    @property
    def mirror(self) -> str | None:
        return self._mirror

    @property
    def effective_url(self) -> str:
        return mirror_url(self.url, self._mirror) if self._mirror else self.url

    @property
    def effective_checksum_url(self) -> str | None:
        if self._mirror_checksums and self._mirror:  # the mirror's own file, beside the mirrored ISO
            beside = urlsplit(self.effective_url)._replace(query="", fragment="")
            return beside._replace(path=posixpath.join(posixpath.dirname(beside.path), self._mirror_checksums)).geturl()
        if self.checksum_url is None or not self._mirror:
            return self.checksum_url
        return mirror_url(self.checksum_url, self._mirror)

    @property
    def checksum_source(self) -> str:
        """Where the ISO's checksum comes from, for records and proofs: the (mirrored) checksum file's URL,
        or `pinned in the catalog`."""
        return self.effective_checksum_url or "pinned in the catalog"

    def with_mirror_checksums(self, filename: str) -> Self:
        """A pinned ISO's copy that reads its checksum from `filename` beside it on the mirror (the loader,
        for PACKER_ASSETS_ISO_MIRROR_CHECKSUMS); an ISO whose catalog names a checksum file keeps it."""
        if not self.checksum:
            return self
        copy = self.model_copy(update={"checksum": None})  # neither checksum nor checksum_url: the file below
        copy._mirror_checksums = filename
        return copy

    def with_mirror(self, base: str | None) -> IsoSource:
        """A copy whose effective URLs go through `base` (None: upstream)."""
        copy = self.model_copy()
        copy._mirror = check_mirror_base(base) if base else None
        return copy

    def provenance(self) -> dict[str, str | None]:
        """Upstream and effective URLs side by side (for metadata and proofs)."""
        return {
            "url": self.url,
            "effective_url": self.effective_url,
            "checksum_url": self.checksum_url,
            "effective_checksum_url": self.effective_checksum_url,
            "checksum": self.checksum,
            "checksum_source": self.checksum_source,
            "signed_by": self.signed_by,
            "filename": self.filename,
            "mirror": self._mirror,
        }


class ExtraIso(IsoSource):
    """A further ISO attached to the build VM (e.g. virtio-win drivers)."""

    name: Key


class Hardware(_Model):
    cores: Cores
    sockets: Sockets = 1
    memory: MemoryMiB  # MiB
    disk: DiskSize
    bios: Bios
    efi: bool = False
    tpm: bool = False
    machine: Machine | None = None
    os_type: OsType
    # host: the node's own CPU, what every build used before this field; PVE's own default is kvm64
    cpu_type: CpuType = DEFAULT_CPU_TYPE

    @model_validator(mode="after")
    def _firmware(self) -> Hardware:
        if self.efi and self.bios != "ovmf":
            raise _FieldError("efi", "efi: true needs bios: ovmf")
        if self.bios == "ovmf" and not self.efi:
            raise _FieldError("efi", "bios: ovmf needs efi: true (an EFI vars disk keeps the boot entries)")
        if self.tpm and self.bios != "ovmf":
            raise _FieldError("tpm", "tpm: true needs bios: ovmf and efi: true")
        return self


class HardwareDefaults(_Model):
    """`defaults.hardware`: the same fields as `hardware`, all optional."""

    cores: Cores | None = None
    sockets: Sockets | None = None
    memory: MemoryMiB | None = None
    disk: DiskSize | None = None
    bios: Bios | None = None
    efi: bool | None = None
    tpm: bool | None = None
    machine: Machine | None = None
    os_type: OsType | None = None
    cpu_type: CpuType | None = None


class VmidRange(_Model):
    first: Vmid
    last: Vmid

    @model_validator(mode="after")
    def _ordered(self) -> VmidRange:
        if self.first > self.last:
            raise _FieldError("last", f"last ({self.last}) is below first ({self.first})")
        return self

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, vmid: object) -> bool:
        return isinstance(vmid, int) and self.first <= vmid <= self.last

    def overlaps(self, other: VmidRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


class InstallUser(_Model):
    name: UserName
    password_env: EnvName
    ssh_authorized_keys_env: EnvName | None = None


class InstallUserDefaults(_Model):
    name: UserName | None = None
    password_env: EnvName | None = None
    ssh_authorized_keys_env: EnvName | None = None


class Defaults(_Model):
    """The `defaults:` section: shared values every entry deep-merges over."""

    hardware: HardwareDefaults | None = None
    install_user: InstallUserDefaults | None = None
    retention: Retention | None = None
    work_dirs: WorkDirsKept | None = None
    tags: tuple[Tag, ...] | None = None
    smoke: SmokeSpec | None = None


# The OS id the QEMU guest agent reports (os-release ID on Linux; "mswindows" on Windows), per family.
OS_IDS = {"ubuntu": "ubuntu", "debian": "debian", "rocky": "rocky", "windows": "mswindows"}
RELEASE_RE = re.compile(r"[0-9][0-9A-Za-z.]*")


class ExpectedOs(_Model):
    """The OS a key's template must boot, as the guest agent's get-osinfo names it: `id` (os-release ID;
    `mswindows` for Windows) and `version_id` (`22.04`, `12`, `9`, `2022`). A reported version matches
    when it equals version_id or continues it after a dot (`9` matches Rocky's `9.4`)."""

    id: Annotated[str, AfterValidator(lambda v: _check_os_token(v, "id"))]
    # None: any release of that OS (a key that names no release, and no expect_os in the catalog)
    version_id: Annotated[str, AfterValidator(lambda v: _check_os_token(v, "version_id"))] | None = None

    def matches(self, os_id: str | None, version_id: str | None) -> bool:
        found = str(version_id or "")
        return str(os_id or "").lower() == self.id.lower() and (
            self.version_id is None or found == self.version_id or found.startswith(self.version_id + ".")
        )

    def __str__(self) -> str:
        return f"{self.id} {self.version_id or '(any release)'}"


def _check_os_token(value: str, name: str) -> str:
    if not RELEASE_RE.fullmatch(value) and not KEY_RE.fullmatch(value):
        raise ValueError(f"{name} {value!r} must be a plain token like ubuntu, 22.04 or 2022")
    return value


def default_expected_os(key: str, family: str) -> ExpectedOs:
    """The OS a key names by convention, `<family>-<release>`: ubuntu-2204 -> ubuntu 22.04 (YYMM),
    debian-12 -> debian 12, rocky-9 -> rocky 9, windows-2022 -> mswindows 2022; a key that names no
    release expects the family's OS, any release."""
    prefix, _, release = key.partition("-")
    release = release.split("-", 1)[0]
    if prefix != family or not release.isdigit() or (family == "ubuntu" and len(release) != 4):
        return ExpectedOs(id=OS_IDS[family])
    if family == "ubuntu":
        release = f"{release[:2]}.{release[2:]}"
    return ExpectedOs(id=OS_IDS[family], version_id=release)


# The smoke test's own step names (pve/smoke.py, guest_checks.FAMILY_CHECKS): a site check may not take one.
RESERVED_STEPS = frozenset(
    {
        "clone",
        "configure",
        "start",
        "agent",
        "osinfo",
        "identity",
        "network",
        "inventory",
        "cleanup",
        "cloud_init",
        "ssh_login",
        "fresh_identity",
        "password_locked",
        "guest_agent_enabled",
    }
)
CHECK_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc}): {value!r}") from None
    return value


class SmokeCommand(_Model):
    """A site's own smoke-test check: `run` in the clone, then `expect_exit` (and `expect_output`, a
    regex its output must contain). `via: agent` runs it as root through the guest agent (a shell
    command; PowerShell on Windows); `via: ssh` as the clone's cloud-init user over SSH (Linux)."""

    run: Annotated[str, Field(min_length=1)]
    expect_exit: Annotated[int, Field(ge=0, le=255)] = 0
    expect_output: Annotated[str | None, AfterValidator(_check_regex)] = None
    name: Annotated[str, AfterValidator(lambda v: _check_name(v))] | None = None
    via: Literal["agent", "ssh"] = "agent"

    @field_validator("run")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("run is blank")
        return value.strip()


def _check_name(value: str) -> str:
    if not CHECK_NAME_RE.fullmatch(value):
        raise ValueError(f"name {value!r} must be lower-case letters, digits and _ (a smoke-test step name)")
    return value


class SmokeSpec(_Model):
    """`smoke:` of an entry (or of `defaults`): checks the smoke test runs after the family's own."""

    commands: tuple[SmokeCommand, ...] = ()


class TemplateEntry(_Model):
    key: Key
    family: Family
    description: str | None = None
    tags: tuple[Tag, ...] = ()
    iso: IsoSource
    extra_isos: tuple[ExtraIso, ...] = ()
    hardware: Hardware
    vmid_range: VmidRange
    packer_dir: PackerDir
    install_user: InstallUser
    retention: Retention
    # work directories output/work/<key>/<ts>/ kept of the last successful builds; a failed build's is
    # kept too, until the next success
    work_dirs: WorkDirsKept = 3
    autoinstall_schema: SubiquityRelease | None = None  # ubuntu only: the Subiquity release
    # the OS the smoke test must find on a clone; default from the key (default_expected_os)
    expect_os: ExpectedOs | None = None
    # the site's own smoke-test checks (guest_checks.py runs them after the family's)
    smoke: SmokeSpec | None = None
    # the last day upstream supports the OS release (catalog/eol.py): past it, a build or a kept template
    # warns (the end_of_life check), the registry and the proof say so; never blocks, never a build input
    eol: EolDate | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TemplateEntry:
        seen: dict[str, int] = {}
        for i, extra in enumerate(self.extra_isos):
            if extra.name in seen:
                raise _FieldError(
                    f"extra_isos[{i}].name", f"duplicate name {extra.name!r} (also extra_isos[{seen[extra.name]}])"
                )
            seen[extra.name] = i
        if self.family != "windows" and self.install_user.name.lower() in RESERVED_USERS:
            raise _FieldError(
                "install_user.name",
                f"{self.install_user.name!r} is reserved (a system account or "
                "root, which Linux installers refuse as the first user): choose another name",
            )
        if self.autoinstall_schema is not None and self.family != "ubuntu":
            raise _FieldError("autoinstall_schema", f"only ubuntu entries take it (family is {self.family})")
        for i, command in enumerate(self.smoke.commands if self.smoke else ()):
            if command.via == "ssh" and self.family == "windows":
                raise _FieldError(
                    f"smoke.commands[{i}].via",
                    "ssh needs a cloud-init user, which Windows templates have not: use via: agent",
                )
        names = [c.name for c in (self.smoke.commands if self.smoke else ()) if c.name]
        taken = sorted({n for n in names if names.count(n) > 1} | (set(names) & RESERVED_STEPS))
        if taken:
            raise _FieldError(
                "smoke.commands", f"step name {taken[0]!r} is taken (a smoke-test step or another command of the entry)"
            )
        windows_os = self.hardware.os_type in WINDOWS_OS_TYPES
        if windows_os != (self.family == "windows"):
            want = "a Windows type (win11, win10, ...)" if self.family == "windows" else "l26 (or l24/other)"
            raise _FieldError(
                "hardware.os_type", f"{self.hardware.os_type!r} does not fit family {self.family}; use {want}"
            )
        if self.vmid_range.size < self.retention + 1:
            raise _FieldError(
                "vmid_range",
                f"{self.vmid_range} holds {self.vmid_range.size} VMIDs; retention {self.retention} needs at least "
                f"{self.retention + 1} (the new build sits beside the kept templates)",
            )
        return self

    @property
    def expected_os(self) -> ExpectedOs:
        """expect_os, else what the key names (default_expected_os)."""
        return self.expect_os or default_expected_os(self.key, self.family)

    @property
    def unattended(self) -> str:
        """The unattended-install mechanism: autoinstall, preseed, kickstart or autounattend."""
        return UNATTENDED[self.family]

    def all_isos(self) -> list[IsoSource]:
        """The boot ISO first, then the extra ISOs."""
        return [self.iso, *self.extra_isos]
