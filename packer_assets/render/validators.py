"""Validators for rendered unattended-install files, each the ecosystem's own tool or schema.

Every validator takes the rendered text (plus what it needs) and returns a `Verdict`; problems in
the file are messages in the verdict, never exceptions. `ValidatorUnavailable` is raised only when
the validator itself cannot run (schema file or `debconf-set-selections` missing, no pykickstart
handler for the release), because then nothing was checked and saying "ok" would be a lie. Which
validator and which release of it checks a key is chosen in `release_validators.py`.

`Expected` carries the values the renderer put in; validators that can parse the file back check
that those come out unchanged (the round trip catches quoting that "validates" but means
something else). Messages may quote file content; the renderer redacts secrets before showing them.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from packer_assets.errors import OperationError
from packer_assets.render.passwords import ADMIN_SUFFIX, USER_SUFFIX, windows_decode

SCHEMA_DIR_ENV = "PACKER_ASSETS_SCHEMA_DIR"
# The schemas shipped as package data (provenance and licences: schemas/SOURCES.md).
SHIPPED_SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
CLOUD_CONFIG_SCHEMA = "schema-cloud-config-v1.json"
NETWORK_V2_SCHEMA = "schema-network-config-v2.json"
UNATTEND_NS = "urn:schemas-microsoft-com:unattend"
UNATTEND_PASSES = (
    "windowsPE",
    "offlineServicing",
    "generalize",
    "specialize",
    "auditSystem",
    "auditUser",
    "oobeSystem",
)
REQUIRED_PASSES = ("windowsPE", "specialize", "oobeSystem")
ARCHITECTURES = ("amd64", "x86", "arm64")
PUBLIC_KEY_TOKEN = re.compile(r"^[0-9a-fA-F]{16}$")
_WEAK_ERRORS = ("required", "oneOf", "anyOf")
MAX_MESSAGES = 20  # a broken file can yield hundreds of schema errors; the first ones say enough


class ValidatorUnavailable(OperationError):
    """The validator could not run (missing schema file or tool); nothing was checked."""


@dataclass(frozen=True)
class Verdict:
    validator: str
    ok: bool
    messages: tuple[str, ...] = ()
    # the upstream validator and its release that checked the file ("pykickstart RHEL10"; see
    # release_validators.py), set by the render; "" for a check that has no release (meta-data's YAML)
    checked_by: str = ""

    def label(self) -> str:
        return f"{self.validator} ({self.checked_by})" if self.checked_by else self.validator

    def summary(self) -> str:
        return "ok" if self.ok else "; ".join(self.messages)


@dataclass(frozen=True)
class Expected:
    """Values the renderer put into the file, to be found again when it is parsed back."""

    user: str | None = None
    password_hash: str | None = None  # Linux: the crypt hash
    password: str | None = field(default=None, repr=False)  # Windows: the decoded password
    ssh_keys: tuple[str, ...] | None = None
    dhcp: bool = True


def _verdict(name: str, messages: list[str]) -> Verdict:
    shown = messages[:MAX_MESSAGES]
    if len(messages) > MAX_MESSAGES:
        shown.append(f"... and {len(messages) - MAX_MESSAGES} more")
    return Verdict(name, not messages, tuple(shown))


# ------------------------------------------------------------------ schemas


def resolve_schema_dir(env: Mapping[str, str] | None, project_dir: Path, schema_dir: str | Path | None = None) -> Path:
    """`schema_dir` if given, else `$PACKER_ASSETS_SCHEMA_DIR` (relative to `project_dir`), else the shipped schemas."""
    chosen = schema_dir or (env or {}).get(SCHEMA_DIR_ENV)
    if not chosen:
        return SHIPPED_SCHEMA_DIR
    path = Path(chosen)
    return (path if path.is_absolute() else project_dir / path).resolve()


@lru_cache(maxsize=16)
def _load_schema(path: Path) -> dict[str, Any]:
    try:
        schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return schema
    except FileNotFoundError:
        raise ValidatorUnavailable(
            f"schema file {path} not found (set {SCHEMA_DIR_ENV} to the folder holding the validation schemas)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValidatorUnavailable(f"schema file {path} is unreadable: {exc}") from None


def autoinstall_schema_path(schema_dir: Path, release: str | None) -> Path:  # None: no such file, said so
    return schema_dir / f"autoinstall-schema-{release}.json"


@lru_cache(maxsize=16)
def _validator(path: Path) -> Any:  # a jsonschema validator (jsonschema ships no types)
    """A validator of the class the schema declares (cloud-config: draft-04, network v2: draft-07;
    the autoinstall schemas declare none: the latest draft, as subiquity's `jsonschema.validate`).

    The schemas keep their definitions under `$defs` even in draft-04, where `$defs` is no keyword:
    refs like `#/$defs/x` are plain JSON pointers into the same document. The schema is registered
    as a resource of its declared draft under its file URI, so those refs resolve against it.
    """
    from jsonschema import Draft202012Validator
    from jsonschema.validators import validator_for
    from referencing import Registry
    from referencing.jsonschema import specification_with

    schema = _load_schema(path)
    cls = validator_for(schema, default=Draft202012Validator)
    spec = specification_with(schema.get("$schema") or cls.META_SCHEMA["$schema"])
    uri = path.resolve().as_uri()
    registry = Registry().with_resource(uri, spec.create_resource(schema))
    return cls(schema, registry=registry)


def _schema_messages(validator: Any, instance: Any, where: str) -> list[str]:
    """One line per schema error, `where/<json path>: message`.

    A oneOf/anyOf failure says only "is not valid under any of the given schemas"; the line shows
    its most specific sub-error instead: not a "required" (the other alternative's wrapper key is
    rarely what went wrong), then the deepest, which names the key that is actually wrong.
    """
    out = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]):
        while error.context:
            error = max(error.context, key=lambda e: (e.validator not in _WEAK_ERRORS, len(e.absolute_path)))
        path = "/".join(str(p) for p in error.absolute_path)
        out.append(f"{where}{'/' + path if path else ''}: {error.message}")
    return out


# ------------------------------------------------------------------ autoinstall (Ubuntu)


def validate_autoinstall(text: str, release: str | None, schema_dir: Path, expected: Expected | None = None) -> Verdict:
    """Subiquity user-data: `#cloud-config` with `autoinstall:` checked against the pinned schema.

    Beyond the schema: unknown top-level autoinstall keys are errors (the schema allows them, and
    a typo like `identiy:` would silently install a system without our user); `user-data` is
    checked with the cloud-config schema and `network` with the network-config v2 schema.
    """
    name = "autoinstall"
    auto_path = autoinstall_schema_path(schema_dir, release)
    cloud = _validator(schema_dir / CLOUD_CONFIG_SCHEMA)
    network = _validator(schema_dir / NETWORK_V2_SCHEMA)
    auto = _validator(auto_path)
    if not text.startswith("#cloud-config\n"):
        return _verdict(name, ["first line must be '#cloud-config' (cloud-init ignores the file otherwise)"])
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return _verdict(name, [f"YAML error: {exc}"])
    if not isinstance(doc, dict) or not isinstance(doc.get("autoinstall"), dict):
        return _verdict(name, ["top level must be a mapping with an 'autoinstall:' mapping"])
    section = doc["autoinstall"]
    messages = _schema_messages(cloud, doc, "cloud-config")
    messages += _schema_messages(auto, section, f"autoinstall (schema {release})")
    known = list(auto.schema.get("properties", {}))
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"schema {release} knows: {', '.join(known)}"
            messages.append(f"autoinstall/{key}: unknown top-level key ({hint})")
    if "user-data" in section:
        messages += _schema_messages(cloud, section["user-data"], "autoinstall/user-data (cloud-config)")
    if "network" in section:
        messages += _schema_messages(network, section["network"], "autoinstall/network (network-config v2)")
    if expected is not None and not messages:
        messages += _autoinstall_round_trip(section, expected)
    return _verdict(name, messages)


def _autoinstall_round_trip(auto: dict[str, Any], expected: Expected) -> list[str]:
    out = []
    identity = auto.get("identity") or {}
    if expected.user is not None and identity.get("username") != expected.user:
        out.append("round trip: identity/username is not the install user")
    if expected.password_hash is not None and identity.get("password") != expected.password_hash:
        out.append("round trip: identity/password is not the password hash that was rendered")
    keys = tuple((auto.get("ssh") or {}).get("authorized-keys") or ())
    if expected.ssh_keys is not None and keys != expected.ssh_keys:
        out.append("round trip: ssh/authorized-keys differ from the keys that were rendered")
    return out


def validate_yaml_mapping(text: str) -> Verdict:
    """meta-data: a YAML mapping (cloud-init NoCloud reads instance-id / local-hostname from it)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return _verdict("yaml", [f"YAML error: {exc}"])
    return _verdict("yaml", [] if isinstance(doc, dict) else ["must be a YAML mapping"])


# ------------------------------------------------------------------ kickstart (Rocky)


def validate_kickstart(text: str, expected: Expected | None = None, *, handler: str) -> Verdict:
    """pykickstart with the release's handler (`RHEL10`, chosen by release_validators.py), errors
    fatal; deprecation warnings count as errors too (the next release removes what this one deprecates).

    Then the round trip: user name, crypted password and DHCP networking must parse back.
    """
    from pykickstart.errors import KickstartError, KickstartVersionError
    from pykickstart.parser import KickstartParser
    from pykickstart.version import makeVersion, stringToVersion

    name = "kickstart"
    try:
        commands = makeVersion(stringToVersion(handler))
    except KickstartVersionError:
        raise ValidatorUnavailable(f"the installed pykickstart has no {handler} handler") from None
    parser = KickstartParser(commands, errorsAreFatal=True, missingIncludeIsFatal=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser.readKickstartFromString(text)
        except KickstartError as exc:
            return _verdict(name, [f"pykickstart ({handler}): {' '.join(str(exc).split())}"])
    messages = [
        f"pykickstart ({handler}) warning: {' '.join(str(w.message).split())}"
        for w in caught
        if w.category.__module__.startswith("pykickstart") or "kickstart" in w.category.__name__.lower()
    ]
    if expected is not None and not messages:
        messages += _kickstart_round_trip(commands, expected)
    return _verdict(name, messages)


def _kickstart_round_trip(handler: Any, expected: Expected) -> list[str]:  # pykickstart: untyped
    out = []
    users = {u.name: u for u in handler.user.userList}
    user = users.get(expected.user) if expected.user is not None else None
    if expected.user is not None and user is None:
        out.append("round trip: no 'user' command for the install user")
    if (
        user is not None
        and expected.password_hash is not None
        and (not user.isCrypted or user.password != expected.password_hash)
    ):
        out.append("round trip: the install user's password is not the rendered hash with --iscrypted")
    if expected.dhcp and not any(n.bootProto == "dhcp" for n in handler.network.network):
        out.append("round trip: no 'network --bootproto=dhcp'")
    return out


# ------------------------------------------------------------------ preseed (Debian)


def validate_preseed(text: str, expected: Expected | None = None) -> Verdict:
    """`debconf-set-selections -c` (Debian's own parser); ANY output is a failure.

    It exits 0 on some bad lines (an unknown type is a "warning ... skipping line"), so its output,
    not its exit code, decides.
    """
    name = "preseed"
    tool = shutil.which("debconf-set-selections")
    if tool is None:
        raise ValidatorUnavailable(
            "debconf-set-selections not found (Debian package 'debconf': apt-get install debconf)"
        )
    with tempfile.TemporaryDirectory(prefix="preseed-check-") as tmp:
        path = Path(tmp) / "preseed.cfg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold a password hash
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        proc = subprocess.run(
            [tool, "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LC_ALL": "C.UTF-8",
                "DEBCONF_SYSTEMRC": str(_private_debconf(Path(tmp))),
            },
        )
    output = (proc.stdout + proc.stderr).strip()
    messages = [f"debconf-set-selections: {line}" for line in output.splitlines()]
    if proc.returncode != 0 and not messages:
        messages.append(f"debconf-set-selections -c exited {proc.returncode}")
    if expected is not None and not messages:
        messages += _preseed_round_trip(text, expected)
    return _verdict(name, messages)


def _private_debconf(folder: Path) -> Path:
    """A debconf.conf whose databases are files in `folder`. Even with -c, debconf-set-selections opens
    (and locks) the system's debconf database; a second check running at the same moment (two keys
    rendered by concurrent runs) then finds it locked and exits 1 without a word (-c silences the
    warning). With its own empty databases each check is independent; the parse is the same."""
    conf = folder / "debconf.conf"
    conf.write_text(
        f"Config: configdb\nTemplates: templatedb\n\n"
        f"Name: configdb\nDriver: File\nFilename: {folder / 'config.dat'}\n\n"
        f"Name: templatedb\nDriver: File\nMode: 644\nFilename: {folder / 'templates.dat'}\n"
    )
    return conf


def parse_preseed(text: str) -> dict[str, tuple[str, str]]:
    """{question: (type, value)} for `owner question type value` lines (comments skipped)."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 3)
        if len(parts) >= 3:
            out[parts[1]] = (parts[2], parts[3] if len(parts) == 4 else "")
    return out


def _preseed_round_trip(text: str, expected: Expected) -> list[str]:
    out = []
    answers = parse_preseed(text)
    if expected.user is not None and answers.get("passwd/username", ("", ""))[1] != expected.user:
        out.append("round trip: passwd/username is not the install user")
    if (
        expected.password_hash is not None
        and answers.get("passwd/user-password-crypted", ("", ""))[1] != expected.password_hash
    ):
        out.append("round trip: passwd/user-password-crypted is not the rendered hash")
    if expected.dhcp and answers.get("netcfg/disable_autoconfig", ("", "false"))[1] != "false":
        out.append("round trip: netcfg/disable_autoconfig must stay false (DHCP)")
    return out


# ------------------------------------------------------------------ Autounattend (Windows)


def validate_autounattend(text: str | bytes, expected: Expected | None = None) -> Verdict:
    """lxml with entities, DTDs and the network off; the unattend structure Windows Setup requires."""
    from lxml import etree

    name = "autounattend"
    data = text.encode("utf-8") if isinstance(text, str) else text
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        return _verdict(name, [f"XML error: {exc}"])
    messages: list[str] = []
    tree = root.getroottree()
    if tree.docinfo.internalDTD is not None or tree.docinfo.doctype:
        messages.append("DOCTYPE present: entity and DTD declarations are not allowed in an answer file")
    if any(isinstance(node, etree._Entity) for node in root.iter()):
        messages.append("entity reference present: entities are not allowed in an answer file")
    if root.tag != f"{{{UNATTEND_NS}}}unattend":
        messages.append(f"root element is {root.tag!r}, expected 'unattend' in namespace {UNATTEND_NS}")
        return _verdict(name, messages)
    for element in root.iter(etree.Element):
        if etree.QName(element).namespace != UNATTEND_NS:
            messages.append(f"line {element.sourceline}: element {element.tag!r} is outside the unattend namespace")
    seen: dict[str, int] = {}
    for settings in root.findall(f"{{{UNATTEND_NS}}}settings"):
        pass_name = settings.get("pass")
        if pass_name not in UNATTEND_PASSES:
            close = difflib.get_close_matches(str(pass_name), UNATTEND_PASSES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            messages.append(f"line {settings.sourceline}: unknown pass {pass_name!r}{hint}")
            continue
        seen[pass_name] = seen.get(pass_name, 0) + 1
        for component in settings.findall(f"{{{UNATTEND_NS}}}component"):
            messages += _component_messages(component, pass_name)
    for pass_name, count in seen.items():
        if count > 1:
            messages.append(f"pass {pass_name} appears {count} times (once at most)")
    for pass_name in REQUIRED_PASSES:
        if pass_name not in seen:
            messages.append(f"pass {pass_name} is missing")
    if expected is not None and not messages:
        messages += _autounattend_round_trip(root, expected)
    return _verdict(name, messages)


def _component_messages(component: Any, pass_name: str) -> list[str]:  # an lxml element (untyped)
    label = f"line {component.sourceline}: {pass_name}/{component.get('name') or '(no name)'}"
    out = []
    if not component.get("name"):
        out.append(f"{label}: component without a name")
    arch = component.get("processorArchitecture")
    if arch not in ARCHITECTURES:
        out.append(f"{label}: processorArchitecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    token = component.get("publicKeyToken")
    if token is None or not PUBLIC_KEY_TOKEN.match(token):
        out.append(f"{label}: publicKeyToken {token!r} is not 16 hex digits")
    if component.get("language") != "neutral":
        out.append(f"{label}: language {component.get('language')!r} must be 'neutral'")
    if component.get("versionScope") != "nonSxS":
        out.append(f"{label}: versionScope {component.get('versionScope')!r} must be 'nonSxS'")
    return out


def _autounattend_round_trip(root: Any, expected: Expected) -> list[str]:  # an lxml element
    ns = {"u": UNATTEND_NS}
    out = []
    shell = root.xpath(
        "u:settings[@pass='oobeSystem']/u:component[@name='Microsoft-Windows-Shell-Setup']", namespaces=ns
    )
    if not shell:
        return ["round trip: oobeSystem has no Microsoft-Windows-Shell-Setup component"]
    shell = shell[0]
    if expected.password is not None:
        admin = shell.xpath("u:UserAccounts/u:AdministratorPassword/u:Value/text()", namespaces=ns)
        if not admin or windows_decode(admin[0], ADMIN_SUFFIX) != expected.password:
            out.append("round trip: AdministratorPassword does not decode to the install password")
        logon = shell.xpath("u:AutoLogon/u:Password/u:Value/text()", namespaces=ns)
        if not logon or windows_decode(logon[0], USER_SUFFIX) != expected.password:
            out.append("round trip: AutoLogon password does not decode to the install password")
    if expected.user is not None and shell.xpath("string(u:AutoLogon/u:Username)", namespaces=ns) != expected.user:
        out.append("round trip: AutoLogon/Username is not the install user")
    return out
