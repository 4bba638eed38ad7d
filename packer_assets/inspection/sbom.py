"""A template's software bill of materials: the installed-package inventory of a clone, as CycloneDX 1.5 JSON.

The smoke test runs `inventory_command(family)` on the guest; this module only parses its text
(`parse_inventory`), builds the SBOM (`build_sbom`, deterministic for equal inputs), checks it against the
official CycloneDX 1.5 JSON schema bundled in cyclonedx-python-lib (`validate_sbom`, offline) and compares
two SBOMs of one key (`diff_sboms`).

Linux packages get a package URL (purl spec, types deb and rpm) as bom-ref; Windows programs and hotfixes
have no purl type and get `win:<name>@<version>`. Malformed inventory lines raise `SbomError` naming the
line: a half-read inventory would be an SBOM that lies by omission.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from packageurl import PackageURL

from packer_assets import __version__
from packer_assets.errors import OperationError

SPEC_VERSION = "1.5"
SBOM_FILE = "sbom.cdx.json"  # its name in a build's log folder and proof bundle
PROPERTY_PREFIX = "packer-assets"
MAX_SCHEMA_ERRORS = 5  # a broken SBOM can yield hundreds of schema errors; the first ones say enough
_SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:packer-assets:sbom")

# Installed packages only: `-W` also lists removed packages whose config files remain (status "rc"),
# so the status comes first and the parser keeps the ones whose status is installed (second letter "i").
DPKG_QUERY = ["dpkg-query", "-W", "-f=${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"]
RPM_QUERY = ["rpm", "-qa", "--qf", "%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\t%{ARCH}\n"]
# One line, single quotes only: the argv survives cmd.exe, OpenSSH and the guest agent unchanged.
# Both registry views (64- and 32-bit programs); entries without DisplayName are not programs.
_WINDOWS_SCRIPT = "; ".join(
    [
        "$ErrorActionPreference = 'Stop'",
        "[Console]::OutputEncoding = [Text.Encoding]::UTF8",
        "$keys = @('HKLM:\\Software\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\*', "
        "'HKLM:\\Software\\WOW6432Node\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\*')",
        "$programs = @(Get-ItemProperty -Path $keys -ErrorAction SilentlyContinue | Where-Object { $_.DisplayName } | "
        "ForEach-Object { [pscustomobject]@{ DisplayName = [string]$_.DisplayName; "
        "DisplayVersion = [string]$_.DisplayVersion; Publisher = [string]$_.Publisher } })",
        "$hotfixes = @(Get-HotFix | ForEach-Object { [pscustomobject]@{ HotFixID = [string]$_.HotFixID } })",
        "[pscustomobject]@{ programs = $programs; hotfixes = $hotfixes } | ConvertTo-Json -Depth 4 -Compress",
    ]
)
WINDOWS_QUERY = ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command", _WINDOWS_SCRIPT]

Kind = Literal["deb", "rpm", "windows-program", "windows-hotfix"]
_NO_SPACE = re.compile(r"^\S+$")
_RPM_EVR = re.compile(r"^(?P<epoch>\d+):(?P<version>[^\s:]+)-(?P<release>[^\s-]+)$")
_HOTFIX = re.compile(r"^KB\d+$", re.IGNORECASE)


class SbomError(OperationError):
    """An inventory that cannot be read, or an SBOM that does not validate."""


@dataclass(frozen=True, order=True)
class Package:
    """One installed package. `version` is as shown (rpm: epoch only when non-zero); `epoch` is rpm's."""

    name: str
    version: str
    kind: Kind
    arch: str | None = None
    epoch: int = 0
    publisher: str | None = None


# ------------------------------------------------------------------ inventories


def inventory_command(family: str) -> list[str]:
    """The argv that prints the installed-package inventory on a guest of this family."""
    if family in ("debian", "ubuntu"):
        return list(DPKG_QUERY)
    if family == "rocky":
        return list(RPM_QUERY)
    if family == "windows":
        return list(WINDOWS_QUERY)
    raise SbomError(f"no package inventory for OS family {family!r} (known: debian, ubuntu, rocky, windows)")


def parse_inventory(family: str, text: str) -> list[Package]:
    """Parse the output of `inventory_command(family)`."""
    inventory_command(family)  # the same error for an unknown family
    if family == "rocky":
        return parse_rpm(text)
    if family == "windows":
        return parse_windows(text)
    return parse_dpkg(text)


def _fields(text: str, count: int, what: str) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty line, each field non-empty and without whitespace."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != count:
            raise SbomError(
                f"{what} inventory line {number}: {len(fields)} tab-separated fields, expected {count}: {line[:120]!r}"
            )
        # dpkg's status abbreviation is padded with a space ("ii "): only that field is stripped
        fields[0] = fields[0].strip() if what == "dpkg" else fields[0]
        for index, value in enumerate(fields):
            if not _NO_SPACE.match(value):
                raise SbomError(
                    f"{what} inventory line {number}: field {index + 1} is empty or holds whitespace: {line[:120]!r}"
                )
        yield number, fields


def _non_empty(packages: list[Package], what: str) -> list[Package]:
    if not packages:
        raise SbomError(f"{what} inventory is empty: the query printed no installed package")
    return sorted(set(packages))


def parse_dpkg(text: str) -> list[Package]:
    """`DPKG_QUERY` output (status, name, version, arch) -> the installed packages."""
    packages = []
    for number, (status, name, version, arch) in _fields(text, 4, "dpkg"):
        if len(status) < 2:
            raise SbomError(f"dpkg inventory line {number}: status {status!r} is not a dpkg status abbreviation")
        if status[1] == "i":  # ii, hi: installed; rc, un, pn: not
            packages.append(Package(name, version, "deb", arch))
    return _non_empty(packages, "dpkg")


def parse_rpm(text: str) -> list[Package]:
    """`RPM_QUERY` output (name, epoch:version-release, arch) -> the packages, gpg-pubkey entries skipped."""
    packages = []
    for number, (name, evr, arch) in _fields(text, 3, "rpm"):
        if name == "gpg-pubkey":  # an imported signing key, not a package
            continue
        match = _RPM_EVR.match(evr)
        if not match:
            raise SbomError(f"rpm inventory line {number}: {evr!r} is not epoch:version-release")
        epoch = int(match["epoch"])
        version = f"{match['version']}-{match['release']}"
        packages.append(
            Package(name, f"{epoch}:{version}" if epoch else version, "rpm", None if arch == "(none)" else arch, epoch)
        )
    return _non_empty(packages, "rpm")


def _entries(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    return value if isinstance(value, list) else [value]  # ConvertTo-Json may unwrap a single entry


def _text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    return value.strip() if isinstance(value, str) else ""


def parse_windows(text: str) -> list[Package]:
    """`WINDOWS_QUERY` output ({"programs": [...], "hotfixes": [...]}) -> programs and hotfixes."""
    try:
        data = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as err:
        raise SbomError(f"Windows inventory line {err.lineno} column {err.colno}: not JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise SbomError(
            f"Windows inventory: expected a JSON object with programs and hotfixes, got {type(data).__name__}"
        )
    packages = []
    for index, entry in enumerate(_entries(data, "programs")):
        name = _text(entry, "DisplayName") if isinstance(entry, dict) else ""
        if not name:
            raise SbomError(f"Windows inventory programs[{index}]: no DisplayName: {str(entry)[:120]}")
        packages.append(
            Package(
                name, _text(entry, "DisplayVersion"), "windows-program", publisher=_text(entry, "Publisher") or None
            )
        )
    for index, entry in enumerate(_entries(data, "hotfixes")):
        hotfix = _text(entry, "HotFixID") if isinstance(entry, dict) else ""
        if not _HOTFIX.match(hotfix):
            raise SbomError(f"Windows inventory hotfixes[{index}]: HotFixID {hotfix!r} is not KB<number>")
        packages.append(Package(hotfix.upper(), "", "windows-hotfix"))
    return _non_empty(packages, "Windows")


# ------------------------------------------------------------------ purls


def purl(package: Package, distro: str) -> str | None:
    """The package URL of a Linux package (None for Windows): pkg:deb/<distro>/... or pkg:rpm/<distro>/...

    Built by packageurl-python, which leaves `:` unencoded (the spec allows either); it is encoded here
    as well (`1:2.3` -> `1%3A2.3`), as syft and trivy write deb epochs, so one package has one string.
    """
    if package.kind not in ("deb", "rpm"):
        return None
    qualifiers = {"arch": package.arch} if package.arch else {}
    version = package.version
    if package.kind == "rpm" and package.epoch:
        qualifiers["epoch"] = str(package.epoch)
        version = version.split(":", 1)[1]
    text = PackageURL(
        type=package.kind, namespace=distro, name=package.name, version=version, qualifiers=qualifiers
    ).to_string()
    # "pkg:" is the only colon that is syntax; deb/rpm names and arch never hold one
    return "pkg:" + text[len("pkg:") :].replace(":", "%3A")


# ------------------------------------------------------------------ the SBOM


# What an SBOM, a proof and the registry say when nothing stated what the guest was: never a guess.
GUEST_UNKNOWN = "unknown: nothing stated what this guest was (no PACKER_ASSETS_GUEST_NOTES note for the key)"


def _property(name: str, value: str) -> dict[str, str]:
    return {"name": f"{PROPERTY_PREFIX}:{name}", "value": value}


def _component(package: Package, distro: str) -> dict[str, Any]:
    ref = purl(package, distro)
    component: dict[str, Any] = {"name": package.name}
    if package.version:
        component["version"] = package.version
    if ref is not None:
        component.update({"type": "library", "bom-ref": ref, "purl": ref})
    else:
        component.update(
            {
                "type": "application",
                "bom-ref": f"win:{package.name}@{package.version}" if package.version else f"win:{package.name}",
            }
        )
    if package.publisher:
        component["publisher"] = package.publisher
    properties = [_property("kind", package.kind)]
    if package.arch:
        properties.append(_property("arch", package.arch))
    component["properties"] = properties
    return component


def _utc(timestamp: datetime) -> str:
    if timestamp.tzinfo is None:
        raise SbomError(f"SBOM timestamp {timestamp.isoformat()} has no time zone")
    return timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_sbom(
    packages: Iterable[Package],
    *,
    family: str,
    os_id: str,
    os_version: str,
    template_name: str,
    key: str,
    chain_id: str,
    timestamp: datetime,
    guest: str | None = None,
) -> dict[str, Any]:
    """The CycloneDX 1.5 SBOM of one template: the OS as metadata.component, one component per package.

    `guest`: what the guest the packages were read from was, as the environment noted it (PACKER_ASSETS_GUEST_NOTES:
    a test lab says its guests are simulated); kept as the OS component's `packer-assets:guest` property, so the
    SBOM itself says where its packages came from. None: GUEST_UNKNOWN.
    Deterministic: the serial number is a UUID5 of the chain ID, components are sorted and deduplicated.
    """
    inventory_command(family)  # an unknown family is an error here too
    by_ref: dict[str, dict[str, Any]] = {}
    for package in sorted(set(packages)):  # one component per bom-ref (the first, in a fixed order)
        component = _component(package, os_id)
        by_ref.setdefault(component["bom-ref"], component)
    components = sorted(by_ref.values(), key=lambda c: (c["name"], c.get("version", ""), c["bom-ref"]))
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid5(_SERIAL_NAMESPACE, chain_id)}",
        "version": 1,
        "metadata": {
            "timestamp": _utc(timestamp),
            "tools": {"components": [{"type": "application", "name": "packer-assets", "version": __version__}]},
            "component": {
                "type": "operating-system",
                "bom-ref": f"os:{os_id}@{os_version}",
                "name": os_id,
                "version": os_version,
                "properties": [
                    _property("template", template_name),
                    _property("key", key),
                    _property("chain-id", chain_id),
                    _property("family", family),
                    _property("guest", guest or GUEST_UNKNOWN),
                ],
            },
        },
        "components": components,
    }


def sbom_json(bom: dict[str, Any]) -> str:
    """The SBOM as text: the same bytes for the same SBOM."""
    return json.dumps(bom, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def package_count(bom: dict[str, Any]) -> int:
    return len(bom.get("components") or [])


# ------------------------------------------------------------------ validation


@lru_cache(maxsize=1)
def _validator() -> Any:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    return JsonStrictValidator(SchemaVersion.V1_5)


def validate_sbom(bom: dict[str, Any]) -> None:
    """Raise SbomError with the first schema errors (JSON path: message) unless `bom` is valid CycloneDX 1.5.

    The schema takes any specVersion string, so a document that claims another version is refused here;
    bom-refs must be unique (the spec says so, the schema cannot).
    """
    problems = []
    if bom.get("specVersion") != SPEC_VERSION:
        problems.append(f"$.specVersion: {bom.get('specVersion')!r} is not {SPEC_VERSION!r}")
    errors = list(_validator().validate_str(json.dumps(bom), all_errors=True) or [])
    for error in errors[:MAX_SCHEMA_ERRORS]:
        message = error.data.message
        problems.append(f"{error.data.json_path}: {message[:200]}{'...' if len(message) > 200 else ''}")
    if len(errors) > MAX_SCHEMA_ERRORS:
        problems.append(f"and {len(errors) - MAX_SCHEMA_ERRORS} more schema errors")
    refs: list[str] = [
        c["bom-ref"]
        for c in bom.get("components") or []
        if isinstance(c, dict) and isinstance(c.get("bom-ref"), str) and c["bom-ref"]
    ]
    duplicates = sorted({r for r in refs if refs.count(r) > 1})
    if duplicates:
        problems.append(f"$.components: bom-ref not unique: {', '.join(duplicates[:3])}")
    if problems:
        raise SbomError(f"SBOM is not valid CycloneDX {SPEC_VERSION}: {'; '.join(problems)}")


# ------------------------------------------------------------------ diff


def _versions(bom: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(name, arch) -> versions; a name may be installed in several versions (rpm kernels)."""
    found: dict[tuple[str, str], set[str]] = {}
    for component in bom.get("components") or []:
        arch = next(
            (
                p.get("value", "")
                for p in component.get("properties") or []
                if p.get("name") == f"{PROPERTY_PREFIX}:arch"
            ),
            "",
        )
        found.setdefault((component["name"], arch), set()).add(component.get("version", ""))
    return found


def _cell(text: str) -> str:
    return (text or "-").replace("|", "\\|")


@dataclass(frozen=True)
class SbomDiff:
    added: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)
    first: bool = False  # no previous SBOM: everything is "added"

    @property
    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed), "changed": len(self.changed)}

    def markdown(self, limit: int = 20) -> str:
        if self.first:
            return f"first template of this key ({len(self.added)} packages)"
        if not (self.added or self.removed or self.changed):
            return "no changes"
        rows = (
            [f"| changed | {_cell(n)} | {_cell(old)} | {_cell(new)} |" for n, old, new in self.changed]
            + [f"| added | {_cell(n)} | - | {_cell(v)} |" for n, v in self.added]
            + [f"| removed | {_cell(n)} | {_cell(v)} | - |" for n, v in self.removed]
        )
        counts = ", ".join(f"{count} {what}" for what, count in self.counts.items() if count)
        lines = [counts, "", "| change | package | previous | current |", "| --- | --- | --- | --- |", *rows[:limit]]
        if len(rows) > limit:
            lines.append(f"\n... and {len(rows) - limit} more")
        return "\n".join(lines)


def diff_sboms(previous: dict[str, Any] | None, current: dict[str, Any]) -> SbomDiff:
    """What changed between two SBOMs of one key, by component name (and arch where there is one)."""
    now = _versions(current)
    if previous is None:
        return SbomDiff(added=sorted((n, v) for (n, _), vs in now.items() for v in vs), first=True)
    before = _versions(previous)
    added, removed, changed = [], [], []
    for key in sorted(before.keys() | now.keys()):
        gone = sorted(before.get(key, set()) - now.get(key, set()))
        new = sorted(now.get(key, set()) - before.get(key, set()))
        if len(gone) == 1 and len(new) == 1:
            changed.append((key[0], gone[0], new[0]))
        else:
            removed += [(key[0], v) for v in gone]
            added += [(key[0], v) for v in new]
    return SbomDiff(added=sorted(added), removed=sorted(removed), changed=sorted(changed))
