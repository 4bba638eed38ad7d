"""Where this machine gets Debian packages: the Debian mirrors named in its apt sources.

The base image is debootstrapped from the same mirror the machine itself uses, because on a CI
machine or an air-gapped site that mirror is often the only Debian archive reachable. Both formats
are read: one-line `.list` files (`deb [opts] URI SUITE COMPONENT...`) and deb822 `.sources`
stanzas (`Types/URIs/Suites/Components`, `Enabled: no` honoured). Files with other suffixes
(`*.disabled`, `*.dpkg-old`, ...) are ignored, as apt ignores them.

A suite the machine does not name itself (a bookworm machine asked for trixie) comes from the archives it
names for another Debian release: a Debian mirror serves every release, so `<suite>`, `<suite>-updates` and
`<suite>-security` are taken from where the machine gets its own release, its updates and its security fixes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from packer_assets.errors import ConfigError

APT_ROOT = Path("/etc/apt")
# The Debian releases a real guest can be, by os-release's VERSION_ID (a catalog entry's expected_os), and their
# suites: the base image of a key is debootstrapped from its release's suite.
SUITES = {"12": "bookworm", "13": "trixie"}


def suite_for(key: str, os_id: str | None, version_id: str | None) -> str:
    """The Debian suite a real guest of `key` runs (its expected_os: debian 12 -> bookworm, 13 -> trixie);
    ConfigError in one line naming the key for any other system."""
    if os_id == "debian" and version_id in SUITES:
        return SUITES[version_id]
    known = " or ".join(f"{release} ({suite})" for release, suite in SUITES.items())
    raise ConfigError(
        f"--real-guest {key}: the lab's real guest is Debian {known}, debootstrapped; "
        f"{key} expects {os_id} {version_id or '(any release)'}"
    )


@dataclass(frozen=True)
class AptSource:
    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self) -> str:
        return f"deb {self.uri} {self.suite} {' '.join(self.components)}"


def _one_line_sources(text: str) -> list[AptSource]:
    found = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # options: [arch=amd64 signed-by=...]
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            found.append(AptSource(words[1].rstrip("/"), words[2], tuple(words[3:])))
    return found


def _deb822_sources(text: str) -> list[AptSource]:
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:  # a continuation line
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        components = tuple(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                found.append(AptSource(uri.rstrip("/"), suite, components))
    return found


def apt_sources(apt_root: str | os.PathLike[str] = APT_ROOT) -> list[AptSource]:
    """Every `deb` source of the machine, in apt's order (sources.list, then sources.list.d sorted)."""
    root = Path(apt_root)
    found = []
    if (main := root / "sources.list").is_file():
        found += _one_line_sources(main.read_text())
    parts = root / "sources.list.d"
    for path in sorted(parts.iterdir()) if parts.is_dir() else ():
        if path.suffix == ".list":
            found += _one_line_sources(path.read_text())
        elif path.suffix == ".sources":
            found += _deb822_sources(path.read_text())
    return found


@dataclass(frozen=True)
class DebianMirrors:
    """The archive debootstrap fetches `suite` from, and the apt lines of the suite and its updates."""

    mirror: str
    suite: str
    lines: tuple[str, ...]


# Debian's release codenames: an apt line naming one of these (or `<codename>-updates|-security`) is a
# Debian archive, which serves the other releases too.
DEBIAN_CODENAMES = frozenset({"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid"})


def _pocket(suite: str) -> tuple[str, str]:
    """`bookworm-security` -> (`bookworm`, `-security`); `trixie` -> (`trixie`, ``)."""
    name, dash, rest = suite.partition("-")
    return name, dash + rest


def _archive_for(sources: list[AptSource], suite: str) -> list[str]:
    """The URIs that serve `suite` (e.g. `trixie-security`): named for it, else named for the same pocket of
    another Debian release (`bookworm-security`), in apt's order."""
    named = [s.uri for s in sources if s.suite == suite]
    if named:
        return named
    pocket = _pocket(suite)[1]
    return [s.uri for s in sources if _pocket(s.suite) in {(c, pocket) for c in DEBIAN_CODENAMES}]


def debian_mirrors(
    suite: str = "bookworm", *, mirror: str | None = None, apt_root: str | os.PathLike[str] = APT_ROOT
) -> DebianMirrors:
    """The machine's mirror for `suite` (or `mirror`, an override), with `<suite>-updates` and
    `<suite>-security` where the machine has them (for its own release, or for another Debian release: the
    same archives serve `suite`). Only the `main` component: the image's packages are all in main."""
    sources = apt_sources(apt_root)
    if mirror is None:
        base = _archive_for(sources, suite)
        if not base:
            raise LookupError(
                f"no apt source for {suite} or another Debian release in {apt_root}/sources.list or "
                "sources.list.d/ (pass a mirror URL instead)"
            )
        mirror = base[0]
    mirror = mirror.rstrip("/")
    lines = [f"deb {mirror} {suite} main"]
    for extra in (f"{suite}-updates", f"{suite}-security"):
        # -updates comes from the chosen mirror's archive when the machine names it there; -security
        # lives in its own archive (debian-security) and is taken as the machine names it.
        found = _archive_for(sources, extra)
        if found:
            lines.append(f"deb {mirror if mirror in found else found[0]} {extra} main")
    return DebianMirrors(mirror=mirror, suite=suite, lines=tuple(lines))
