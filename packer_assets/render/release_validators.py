"""Which upstream validator checks a key's unattended file, and which release of it.

The one place that answers it (`validator_for`), from the OS release the key installs
(`entry.expected_os`: the catalog's `expect_os`, else what the key names):

- ubuntu: the subiquity autoinstall schema the entry names (`autoinstall_schema`), a file shipped in
  `schemas/` (or `$PACKER_ASSETS_SCHEMA_DIR`); no such file, or a schema of another release than the
  key installs (24.04.1's for 26.04), no validator.
- rocky N: pykickstart's `RHEL<N>` handler (Rocky N is a rebuild of RHEL N); a release the installed
  pykickstart has no handler for, no validator.
- debian: `debconf-set-selections -c` (the host's, from Debian's `debconf`) for the releases in
  `DEBCONF_RELEASES`. Its check is release-independent: it parses the line format
  `<owner> <question> <type> <value>` (comments, backslash continuations) and the debconf types, none
  of which depends on the release being installed; the question names are the installer's, and it
  checks none of them (it makes a dummy template for each). What was checked for trixie (13): its
  installation guide (appendix B.3, "for trixie") still defines the file as "the format used by the
  debconf-set-selections command" with bookworm's rules (one space or tab between type and value,
  backslash continuation joins lines, `#_preseed_V1` as the recommended first line, already in
  bookworm's guide), and d-i loads it with its own `debconf-set-selections` (the `preseed` udeb).
  Not checked: trixie's debconf 1.5.91 itself (a bookworm host runs 1.5.82). A release outside the
  set has not been looked at, so it gets no validator rather than an unchecked "ok".
- windows: the lxml unattend checks (the `urn:schemas-microsoft-com:unattend` namespace, the passes,
  the component attributes) for the releases in `UNATTEND_RELEASES`: Windows Setup of Server 2022 and
  2025 reads the same answer-file format.

A key whose release has no validator raises `NoValidator`: one line naming the key, its release and
what is missing. The render turns it into its RenderError, so `unattended_files` and
`packer-assets validate` fail instead of passing a file nothing checked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packer_assets.catalog import TemplateEntry
from packer_assets.render.validators import SCHEMA_DIR_ENV, ValidatorUnavailable, autoinstall_schema_path

DEBCONF_RELEASES = frozenset({"12", "13"})  # Debian releases whose preseed format was checked (above)
UNATTEND_RELEASES = frozenset({"2022", "2025"})  # Windows Server releases the unattend checks cover
FAMILY_NAMES = {"ubuntu": "Ubuntu", "debian": "Debian", "rocky": "Rocky", "windows": "Windows Server"}


class NoValidator(ValidatorUnavailable):
    """No upstream validator checks this key's release: nothing would be checked, so the render fails."""


@dataclass(frozen=True)
class ReleaseValidator:
    """The upstream validator of a key's unattended file and the release of it that applies.

    tool: the validator ("pykickstart"); release: the name the tool gives that release ("RHEL10",
    the subiquity tag "26.04", "Debian 13"); schema: ubuntu's autoinstall schema file."""

    family: str
    tool: str
    release: str
    schema: Path | None = None

    def __str__(self) -> str:
        return f"{self.tool} {self.release}"


@dataclass(frozen=True)
class _Release:
    """The key and the release it installs, for the choosers and their one-line refusals."""

    entry: TemplateEntry
    schema_dir: Path

    @property
    def version(self) -> str | None:
        return self.entry.expected_os.version_id

    @property
    def name(self) -> str:
        return f"{FAMILY_NAMES[self.entry.family]} {self.version or '(no release named)'}"

    def refuse(self, kind: str, why: str) -> NoValidator:
        return NoValidator(f"{self.entry.key}: no {kind} validator for {self.name}: {why}")


def _ubuntu(release: _Release) -> ReleaseValidator:
    tag = release.entry.autoinstall_schema
    if not tag:
        raise release.refuse(
            "autoinstall", "autoinstall_schema: missing; name the Subiquity release of the ISO (like 26.04)"
        )
    if release.version and ".".join(tag.split(".")[:2]) != release.version:
        # 24.04's schema lacks keys 26.04 knows (and the reverse): a file valid under the wrong one proves little
        raise release.refuse(
            "autoinstall",
            f"autoinstall_schema {tag} is another release's schema; name {release.version}'s (like {release.version})",
        )
    path = autoinstall_schema_path(release.schema_dir, tag)
    if not path.is_file():
        raise release.refuse(
            "autoinstall",
            f"autoinstall_schema {tag}: no schema file {path.name} in {path.parent} "
            f"({SCHEMA_DIR_ENV} names the folder of the validation schemas)",
        )
    return ReleaseValidator("ubuntu", "subiquity autoinstall schema", tag, path)


def _rocky(release: _Release) -> ReleaseValidator:
    from importlib.metadata import version

    from pykickstart.errors import KickstartVersionError
    from pykickstart.version import stringToVersion

    major = (release.version or "").split(".")[0]
    if not major.isdigit():
        raise release.refuse("kickstart", "the key names no Rocky release (set expect_os.version_id)")
    handler = f"RHEL{int(major)}"
    try:
        stringToVersion(handler)
    except KickstartVersionError:
        raise release.refuse("kickstart", f"pykickstart {version('pykickstart')} has no {handler} handler") from None
    return ReleaseValidator("rocky", "pykickstart", handler)


def _debian(release: _Release) -> ReleaseValidator:
    major = (release.version or "").split(".")[0]
    if major not in DEBCONF_RELEASES:
        known = ", ".join(sorted(DEBCONF_RELEASES, key=int))
        raise release.refuse(
            "preseed", f"debconf-set-selections is known to parse the preseed format of Debian {known} only"
        )
    return ReleaseValidator("debian", "debconf-set-selections", f"Debian {major}")


def _windows(release: _Release) -> ReleaseValidator:
    if release.version not in UNATTEND_RELEASES:
        known = ", ".join(sorted(UNATTEND_RELEASES))
        raise release.refuse("Autounattend", f"the lxml unattend checks cover Windows Server {known} only")
    return ReleaseValidator("windows", "lxml unattend checks", f"Windows Server {release.version}")


CHOOSERS: dict[str, Callable[[_Release], ReleaseValidator]] = {
    "ubuntu": _ubuntu,
    "rocky": _rocky,
    "debian": _debian,
    "windows": _windows,
}


def validator_for(entry: TemplateEntry, schema_dir: Path) -> ReleaseValidator:
    """The upstream validator (and its release) that checks `entry`'s unattended file; NoValidator
    (one line: key, release, what is missing) when its release has none."""
    return CHOOSERS[entry.family](_Release(entry, schema_dir))
