"""Render a catalog entry's unattended-install files, validate them, then write them.

`render_unattended(entry, env, out_dir)`:
1. reads the install password from `env[entry.install_user.password_env]` (a mapping handed in,
   never os.environ here) and the optional authorized keys from `ssh_authorized_keys_env`;
2. renders the family's Jinja templates from `<project_dir>/<entry.packer_dir>/` into memory;
3. runs every validator on every file; any failure raises ONE `RenderError` and writes nothing,
   so the previous good render stays in place;
4. writes each file atomically (password-bearing files mode 0600: Packer's HTTP server runs as the
   same user, nobody else needs them), and for Windows the answer ISO;
5. returns each file's sha256 and verdicts and `content_hash`, the data version: a hash of the
   rendered files alone, equal for equal inputs (the crypt salt is derived, see passwords.py), and
   the names of other files found in `out_dir` (`ignored`: never served, see record.py).

Escaping is by format, through filters, so a template can't forget it silently:
- XML (`*.xml.j2`): Jinja autoescape, chosen by the name without `.j2` (select_autoescape(["xml"])
  would not match `Autounattend.xml.j2`);
- YAML: `| yaml` JSON-encodes any value (JSON is YAML; characters YAML reads as line breaks or
  rejects are \\u-escaped);
- shell and kickstart: `| sh` is shlex.quote (pykickstart splits lines with shlex.split);
- debconf values: `| line`, verbatim to the end of the line, so line breaks are refused.
`| sh` and `| line` refuse line breaks and NUL. Undefined variables are errors (StrictUndefined).

No Dagster import: the asset calls this and turns the result into metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from packer_assets.catalog import TemplateEntry
from packer_assets.errors import ConfigError
from packer_assets.evidence.layout import Redactor, atomic_write
from packer_assets.render import passwords
from packer_assets.render.answer_iso import iso_bytes
from packer_assets.render.record import stray_files
from packer_assets.render.release_validators import NoValidator, ReleaseValidator, validator_for
from packer_assets.render.validators import (
    Expected,
    ValidatorUnavailable,
    Verdict,
    resolve_schema_dir,
    validate_autoinstall,
    validate_autounattend,
    validate_kickstart,
    validate_preseed,
    validate_yaml_mapping,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ANSWER_ISO_NAME = "autounattend.iso"
SECRET_MODE, PUBLIC_MODE = 0o600, 0o644
WINDOWS_SCRIPT = "firstlogon.ps1"
WINDOWS_KEYS_FILE = "administrators_authorized_keys"
# Per Windows Server release (the key's expect_os version): the edition the template installs (install.wim's
# /IMAGE/NAME of Standard with Desktop Experience, the same on the evaluation media) and the virtio-win driver
# folder (<driver>\\<os>\\amd64). A key that names no release installs 2022. Sources: docs/releases.md.
WINDOWS_RELEASES = {
    "2022": ("Windows Server 2022 SERVERSTANDARD", "2k22"),
    "2025": ("Windows Server 2025 SERVERSTANDARD", "2k25"),
}
WINDOWS_DEFAULT_RELEASE = "2022"


class RenderError(ConfigError):
    """One render problem (or several, one per line), naming the key, the file and the cause."""


class UnsafeValue(ConfigError):
    """A value that its format cannot carry (a line break in a one-line field)."""


@dataclass(frozen=True)
class RenderedFile:
    name: str
    path: Path
    sha256: str
    size: int
    mode: int
    verdicts: tuple[Verdict, ...] = ()


@dataclass(frozen=True)
class RenderResult:
    key: str
    family: str
    out_dir: Path
    files: tuple[RenderedFile, ...]
    content_hash: str  # the data version: sha256 over the files' names and sha256s
    answer_iso: RenderedFile | None = None
    ignored: tuple[str, ...] = ()  # other files found in out_dir: not this render's, never served

    def file(self, name: str) -> RenderedFile:
        return next(f for f in self.files if f.name == name)

    def written(self) -> dict[str, str]:
        """name -> sha256 of every file this render wrote (the answer ISO too): what its record lists."""
        return {f.name: f.sha256 for f in (*self.files, *([self.answer_iso] if self.answer_iso else []))}

    def metadata(self) -> dict[str, Any]:
        """Plain values for asset metadata: no secrets in here, only names, hashes and verdicts, and which
        upstream validator and release checked each file (`validated_by`, e.g. "pykickstart RHEL10")."""
        files = {
            f.name: {
                "sha256": f.sha256,
                "size": f.size,
                "verdicts": {v.validator: v.summary() for v in f.verdicts},
                "validated_by": [v.checked_by for v in f.verdicts if v.checked_by],
            }
            for f in self.files
        }
        out: dict[str, Any] = {
            "key": self.key,
            "family": self.family,
            "content_hash": self.content_hash,
            "files": files,
        }
        if self.answer_iso is not None:
            out["answer_iso"] = {
                "name": self.answer_iso.name,
                "sha256": self.answer_iso.sha256,
                "size": self.answer_iso.size,
            }
        return out


# ------------------------------------------------------------------ filters


def _one_line(value: Any) -> str:
    text = str(value)
    if any(ch in text for ch in "\n\r\x00\x0b\x0c\x85\u2028\u2029"):
        raise UnsafeValue("a value for a one-line field holds a line break or NUL")  # never echo it
    return text


def sh_quote(value: Any) -> str:
    """shlex.quote of a one-line value: the shell (and pykickstart's shlex.split) reads it back."""
    return shlex.quote(_one_line(value))


def debconf_value(value: Any) -> str:
    """A debconf value: taken verbatim to the end of the line, so only line breaks are refused."""
    return _one_line(value)


def _yaml_safe_char(ch: str) -> str:
    code = ord(ch)
    if 0xD800 <= code <= 0xDFFF:
        raise UnsafeValue("a value holds a lone UTF-16 surrogate, which no UTF-8 file can carry")
    printable = 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or code >= 0x10000
    # YAML 1.1 (PyYAML, cloud-init, subiquity) reads NEL/LS/PS as line breaks and rejects C0/C1
    # controls, DEL and BOM inside scalars: escape them; JSON already escaped C0 and quotes.
    if printable and code not in (0x2028, 0x2029, 0xFEFF):
        return ch
    return f"\\u{code:04x}"


def yaml_value(value: Any) -> str:
    """Any JSON-able value as a YAML flow value (a JSON document is YAML), unicode kept readable."""
    return "".join(_yaml_safe_char(ch) for ch in json.dumps(value, ensure_ascii=False))


def _autoescape(name: str | None) -> bool:
    return name is not None and name != "" and name.removesuffix(".j2").lower().endswith((".xml", ".html"))


def make_environment(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,
        autoescape=_autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(sh=sh_quote, line=debconf_value, yaml=yaml_value)
    return env


# ------------------------------------------------------------------ families


@dataclass(frozen=True)
class _Output:
    """One file of a family: rendered from `template` (Jinja) or copied from `static`."""

    name: str
    mode: int
    template: str | None = None
    static: str | None = None
    validate: Callable[[str, _Job], Verdict] | None = field(default=None, compare=False)
    by_release: bool = False  # checked by the key's release validator (its verdict names it)


@dataclass(frozen=True)
class _Job:
    entry: TemplateEntry
    schema_dir: Path
    expected: Expected
    validator: ReleaseValidator  # release_validators.validator_for(entry)


FAMILIES: dict[str, tuple[_Output, ...]] = {
    "ubuntu": (
        _Output(
            "user-data",
            SECRET_MODE,
            "user-data.j2",
            validate=lambda text, job: validate_autoinstall(text, job.validator.release, job.schema_dir, job.expected),
            by_release=True,
        ),
        _Output("meta-data", PUBLIC_MODE, "meta-data.j2", validate=lambda text, job: validate_yaml_mapping(text)),
    ),
    "debian": (
        _Output(
            "preseed.cfg",
            SECRET_MODE,
            "preseed.cfg.j2",
            validate=lambda text, job: validate_preseed(text, job.expected),
            by_release=True,
        ),
    ),
    "rocky": (
        _Output(
            "ks.cfg",
            SECRET_MODE,
            "ks.cfg.j2",
            validate=lambda text, job: validate_kickstart(text, job.expected, handler=job.validator.release),
            by_release=True,
        ),
    ),
    "windows": (
        _Output(
            "Autounattend.xml",
            SECRET_MODE,
            "Autounattend.xml.j2",
            validate=lambda text, job: validate_autounattend(text, job.expected),
            by_release=True,
        ),
        _Output(WINDOWS_SCRIPT, PUBLIC_MODE, static=f"scripts/{WINDOWS_SCRIPT}"),
        _Output(WINDOWS_KEYS_FILE, PUBLIC_MODE),  # generated below from the authorized keys
    ),
}


def read_ssh_keys(entry: TemplateEntry, env: Mapping[str, str]) -> tuple[str, ...]:
    """Authorized keys from `env[ssh_authorized_keys_env]`: one per line; blanks and #-lines skipped."""
    variable = entry.install_user.ssh_authorized_keys_env
    if not variable:
        return ()
    lines = (env.get(variable) or "").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def windows_release(entry: TemplateEntry) -> tuple[str, str]:
    """(/IMAGE/NAME, virtio-win folder) of the Windows Server release the key expects (WINDOWS_RELEASES)."""
    release = entry.expected_os.version_id or WINDOWS_DEFAULT_RELEASE
    if release not in WINDOWS_RELEASES:
        known = ", ".join(WINDOWS_RELEASES)
        raise RenderError(
            f"{entry.key}: expect_os.version_id: Windows Server {release} is not one the template knows ({known})"
        )
    return WINDOWS_RELEASES[release]


def _context(entry: TemplateEntry, password: str, ssh_keys: tuple[str, ...], salt: str) -> dict[str, Any]:
    """Template variables. Linux contexts never hold the password, only its hash. `release`: the OS version the
    key expects ("" when it names none), for the few lines a family's release changes."""
    user = entry.install_user.name
    context: dict[str, Any] = {"key": entry.key, "hostname": entry.key, "user": user, "ssh_keys": list(ssh_keys)}
    context["release"] = entry.expected_os.version_id or ""
    if entry.family == "windows":
        image_name, virtio_os = windows_release(entry)
        context.update(
            admin_password_b64=passwords.windows_encode(password, passwords.ADMIN_SUFFIX),
            user_password_b64=passwords.windows_encode(password, passwords.USER_SUFFIX),
            builtin_admin=user.lower() == "administrator",
            computer_name=entry.key[:15].rstrip("-"),  # NetBIOS names hold 15 characters
            efi=entry.hardware.efi,
            image_name=image_name,
            virtio_os=virtio_os,
            virtio_drivers=["vioscsi", "viostor", "NetKVM"],
            virtio_drive_letters=list("DEFGH"),
            first_logon_script=WINDOWS_SCRIPT,
        )
    else:
        context["password_hash"] = passwords.sha512_crypt_hash(password, salt)
    return context


def content_hash(files: Mapping[str, bytes]) -> str:
    """sha256 over `name NUL sha256(content) LF` for each file, names sorted: the data version."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\x00{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


# ------------------------------------------------------------------ render


def render_files(
    entry: TemplateEntry,
    env: Mapping[str, str],
    *,
    project_dir: Path | None = None,
    salt: str | None = None,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Render the family's files into memory: ({name: bytes}, context). Nothing is validated or written.

    Raises RenderError (missing password, undefined variable, unsafe value, template syntax).
    """
    project_dir = Path(project_dir) if project_dir is not None else PROJECT_ROOT
    template_dir = project_dir / entry.packer_dir
    try:
        password = passwords.read_password(env, entry.install_user.password_env, entry.key)
        seed = env.get(passwords.SALT_SEED_ENV) or passwords.DEFAULT_SALT_SEED
        salt = salt or passwords.derive_salt(entry.key, password, seed)
        context = _context(entry, password, read_ssh_keys(entry, env), salt)
    except passwords.PasswordError as exc:
        raise RenderError(str(exc)) from None
    jenv = make_environment(template_dir)
    files: dict[str, bytes] = {}
    for out in FAMILIES[entry.family]:
        where = f"{entry.key}: {entry.packer_dir}/{out.template or out.static or out.name}"
        try:
            if out.template:
                files[out.name] = jenv.get_template(out.template).render(context).encode("utf-8")
            elif out.static:
                files[out.name] = (template_dir / out.static).read_bytes()
            elif context["ssh_keys"]:  # no key configured: no file (firstlogon.ps1 then installs none)
                files[out.name] = "".join(f"{k}\n" for k in context["ssh_keys"]).encode("utf-8")
        except jinja2.TemplateNotFound:
            raise RenderError(f"{where}: template not found under {template_dir}") from None
        except FileNotFoundError:
            raise RenderError(f"{where}: file not found under {template_dir}") from None
        except jinja2.UndefinedError as exc:
            raise RenderError(f"{where}: undefined template variable: {exc.message}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(f"{where}: line {exc.lineno}: template syntax error: {exc.message}") from None
        except UnsafeValue as exc:
            raise RenderError(f"{where}: {exc}") from None
    return files, context


def _redactor(env: Mapping[str, str], entry: TemplateEntry, context: Mapping[str, Any]) -> Redactor:
    secrets = [env.get(entry.install_user.password_env)]
    secrets += [context.get(k) for k in ("password_hash", "admin_password_b64", "user_password_b64")]
    return Redactor([s for s in secrets if s])


def validate_files(
    entry: TemplateEntry, files: Mapping[str, bytes], expected: Expected, schema_dir: Path
) -> dict[str, tuple[Verdict, ...]]:
    """Run each file's validators: {name: verdicts}, the key's release validator (release_validators.py)
    named in each verdict it gave. Raises RenderError if the key's release has no validator (one line:
    key, release, what is missing) or a validator cannot run: nothing checked is never "ok"."""
    try:
        job = _Job(entry, schema_dir, expected, validator_for(entry, schema_dir))
    except NoValidator as exc:
        raise RenderError(str(exc)) from None
    verdicts: dict[str, tuple[Verdict, ...]] = {}
    for out in FAMILIES[entry.family]:
        if out.name not in files:
            continue
        if out.validate is None:
            verdicts[out.name] = ()
            continue
        try:
            verdict = out.validate(files[out.name].decode("utf-8"), job)
        except ValidatorUnavailable as exc:
            raise RenderError(f"{entry.key}: {out.name}: validator unavailable: {exc}") from None
        verdicts[out.name] = (
            dataclasses.replace(verdict, checked_by=str(job.validator)) if out.by_release else verdict,
        )
    return verdicts


def render_unattended(
    entry: TemplateEntry,
    env: Mapping[str, str],
    out_dir: str | Path,
    *,
    schema_dir: str | Path | None = None,
    project_dir: str | Path | None = None,
    salt: str | None = None,
) -> RenderResult:
    """Render, validate and write `entry`'s unattended files into `out_dir`; see the module doc.

    env: where the password (and `PACKER_ASSETS_SCHEMA_DIR`, `PACKER_ASSETS_SALT_SEED`) are read.
    schema_dir: validation schemas (default `$PACKER_ASSETS_SCHEMA_DIR`, relative to `project_dir`, else the
    schemas shipped in `packer_assets/render/schemas/`). project_dir: the project folder holding `templates/` (default: this checkout).
    salt: an explicit crypt salt instead of the derived one.
    """
    project_dir = Path(project_dir) if project_dir is not None else PROJECT_ROOT
    files, context = render_files(entry, env, project_dir=project_dir, salt=salt)
    expected = Expected(
        user=entry.install_user.name,
        password_hash=context.get("password_hash"),
        password=env[entry.install_user.password_env] if entry.family == "windows" else None,
        ssh_keys=tuple(context["ssh_keys"]),
    )
    verdicts = validate_files(entry, files, expected, resolve_schema_dir(env, project_dir, schema_dir))
    failures = [
        f"{entry.key}: {name}: {verdict.validator}: {message}"
        for name, found in verdicts.items()
        for verdict in found
        if not verdict.ok
        for message in verdict.messages
    ]
    if failures:
        raise RenderError(_redactor(env, entry, context)("\n".join(failures)))
    iso = iso_bytes(files) if entry.family == "windows" else None  # built before anything is written

    out_dir = Path(out_dir)
    modes = {out.name: out.mode for out in FAMILIES[entry.family]}
    written = []
    for name, data in files.items():
        path = atomic_write(out_dir / name, data, mode=modes[name])
        written.append(
            RenderedFile(name, path, hashlib.sha256(data).hexdigest(), len(data), modes[name], verdicts[name])
        )
    for name in modes.keys() - files.keys():  # one an earlier render wrote (keys configured then) goes
        (out_dir / name).unlink(missing_ok=True)
    answer = None
    if iso is not None:
        path = atomic_write(out_dir / ANSWER_ISO_NAME, iso, mode=SECRET_MODE)
        answer = RenderedFile(ANSWER_ISO_NAME, path, hashlib.sha256(iso).hexdigest(), len(iso), SECRET_MODE)
    names = [f.name for f in written] + ([ANSWER_ISO_NAME] if answer else [])
    return RenderResult(
        entry.key, entry.family, out_dir, tuple(written), content_hash(files), answer, stray_files(out_dir, names)
    )
