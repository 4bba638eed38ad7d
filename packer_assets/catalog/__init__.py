"""The template catalog: `templates/catalog.yaml`, validated into frozen pydantic models.

One entry per template key (= one Dagster partition). A bad catalog fails before any side effect
with ONE `CatalogError` whose lines read `<file>: <key>: <field>: <problem>`, where <key> is a
template key, `templates[<i>]` (an entry without a usable key), `defaults`, `top-level` or
`environment`.

Rules the models enforce beyond plain types (documented here because they are choices):
- every mapping rejects unknown fields (typos must not pass), including `defaults`;
- `templates` is a list, so a duplicate key is visible (and an error); duplicate YAML mapping keys
  are errors too;
- an entry deep-merges over `defaults` (mappings merge, the entry wins; lists and scalars replace);
- an ISO has exactly one of `checksum_url` (SHA256SUMS / CHECKSUM file) or `checksum`
  (`sha256:<64 hex>` or `sha512:<128 hex>`); `filename` (name on the PVE ISO storage) defaults to
  the last segment of the URL path and must end in `.iso`;
- `hardware`: `efi: true` <=> `bios: ovmf` (a template booted by OVMF needs an EFI vars disk to
  keep its boot entries); `tpm: true` requires `bios: ovmf`; windows families need a `w*` os_type,
  the others a Linux/other one; `cpu_type` is a Proxmox CPU type (`cpu.py`; default `host`, the node's own);
- the VM fits the entry's OS release (`fit.py`, docs/vm-requirements.md): a CPU type at or above the release's
  x86-64 level (never a 32-bit or ARM one; `host`, `max`, `custom-*` are not judged), the release's Proxmox
  `os_type`, and UEFI where the release's template needs it (Windows Server 2025);
- `vmid_range` lies within 100..999999999, first <= last, holds at least `retention + 1` VMIDs
  (the new template is built beside the kept ones), and no two entries' ranges overlap;
- `install_user.password_env` is the NAME of an environment variable, never the password; error
  messages never echo it;
- `autoinstall_schema` (the Subiquity release whose autoinstall schema applies) is ubuntu-only;
- `eol` (optional) is a date, `YYYY-MM-DD` (a YAML date or that string): a date and time, a trailing
  newline or a day the calendar lacks is an error; it is not a build input (catalog/eol.py);
- `tags` are Proxmox tags, lower-cased (PVE matches them without case), never one the tool sets itself
  (`packer-assets`, `packer-assets-*`: promotion, revocation, channels) nor another entry's key.

Mirror: `PACKER_ASSETS_ISO_MIRROR=<base>` rewrites every upstream ISO / checksum URL to
`<base>/<host[:port]>/<path>[?query]`. Models keep the upstream `url` and expose
`effective_url` / `effective_checksum_url`; `provenance()` carries both. With the mirror set,
`PACKER_ASSETS_ISO_MIRROR_CHECKSUMS=<file>` (e.g. SHA256SUMS; a site mirror that re-hosts media it
re-spins) makes every ISO whose checksum is pinned take its checksum from `<file>` beside the ISO on
the mirror, when the catalog is loaded: such an ISO has neither `checksum` nor `checksum_url` then,
its `effective_checksum_url` is that file and `checksum_source` says so; checksum files the catalog
names stay. `PACKER_ASSETS_ISO_MIRROR_KEYRING=<keyring file>` (with the mirror set; a mirror that signs the
checksum files it serves with its own key) makes every ISO whose catalog names a `keyring` verify its
(mirrored) checksum file and signature against that keyring instead: `signature_keyring` is the one used,
`signed_by` says whose it is (`mirror: ...` or `upstream: ...`) for records and proofs.

The schema is `models.py`, loading and error gathering `loader.py`, CPU types `cpu.py`, the fit check `fit.py`.
No Dagster import here: this is the ground floor.
"""

from packer_assets.catalog.loader import (  # noqa: F401 - the catalog's public names, importable from packer_assets.catalog
    Catalog,
    check_catalog,
    load_catalog,
    resolve_catalog_path,
)
from packer_assets.catalog.models import (  # noqa: F401 - the catalog's public names, importable from packer_assets.catalog
    CATALOG_ALGORITHMS,
    CATALOG_ENV,
    CATALOG_VERSION,
    DEFAULT_CATALOG,
    ENV_NAME_RE,
    FAMILIES,
    ISO_FILENAME_MAX,
    ISO_FILENAME_RE,
    KEY_MAX,
    KEY_RE,
    MIRROR_CHECKSUMS_ENV,
    MIRROR_ENV,
    MIRROR_KEYRING_ENV,
    OS_IDS,
    OTHER_OS_TYPES,
    RESERVED_STEPS,
    RESERVED_USERS,
    TAG_RE,
    TOOL_TAG_NAMESPACE,
    UNATTENDED,
    WINDOWS_OS_TYPES,
    Bios,
    CatalogError,
    ChecksumText,
    Cores,
    CpuType,
    Defaults,
    DiskSize,
    EnvName,
    ExpectedOs,
    ExtraIso,
    Family,
    Hardware,
    HardwareDefaults,
    InstallUser,
    InstallUserDefaults,
    IsoFilename,
    IsoSource,
    Key,
    Machine,
    MemoryMiB,
    OsType,
    PackerDir,
    Retention,
    SmokeCommand,
    SmokeSpec,
    Sockets,
    SubiquityRelease,
    Tag,
    TemplateEntry,
    Url,
    UserName,
    Vmid,
    VmidRange,
    WorkDirsKept,
    check_http_url,
    check_mirror_base,
    deep_merge,
    default_expected_os,
    mirror_checksums_from_env,
    mirror_from_env,
    mirror_keyring_from_env,
    mirror_url,
    parse_checksum,
)
