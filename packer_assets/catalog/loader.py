"""Loading the catalog: the file found (argument, PACKER_ASSETS_CATALOG or templates/catalog.yaml), YAML
read strictly (duplicate keys are errors), every entry validated against `models`, and every problem
gathered into ONE CatalogError whose lines name file, key and field."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from packer_assets.catalog.fit import fit_lines
from packer_assets.catalog.models import (
    CATALOG_ENV,
    CATALOG_VERSION,
    DEFAULT_CATALOG,
    KEY_MAX,
    MIRROR_CHECKSUMS_ENV,
    MIRROR_ENV,
    MIRROR_KEYRING_ENV,
    CatalogError,
    Defaults,
    TemplateEntry,
    _FieldError,
    deep_merge,
    mirror_checksums_from_env,
    mirror_from_env,
    mirror_keyring_from_env,
)

# ---------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Catalog:
    path: Path
    display: str  # how messages name the file
    project_dir: Path
    mirror: str | None
    defaults: Defaults
    entries: Mapping[str, TemplateEntry] = field(repr=False)

    def keys(self) -> list[str]:
        return list(self.entries)

    def get(self, key: str) -> TemplateEntry:
        try:
            return self.entries[key]
        except KeyError:
            known = ", ".join(self.entries) or "(none)"
            shown = key if key.isprintable() else repr(key)  # a newline in a key must not make two lines
            raise CatalogError(f"{self.display}: {shown}: unknown template key; known keys: {known}") from None

    __getitem__ = get

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __iter__(self) -> Iterator[TemplateEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def summary_rows(self) -> list[dict[str, str]]:
        rows = []
        for e in self:
            rows.append(
                {
                    "key": e.key,
                    "family": e.family,
                    "unattended": e.unattended,
                    "vmids": str(e.vmid_range),
                    "retention": str(e.retention),
                    "iso": e.iso.filename,
                    "iso_url": e.iso.effective_url,
                    "checksum": e.iso.checksum or f"file:{e.iso.effective_checksum_url}",
                    "extra_isos": ", ".join(x.name for x in e.extra_isos),
                    "packer_dir": e.packer_dir,
                }
            )
        return rows


def resolve_catalog_path(path: str | os.PathLike[str] | None, env: Mapping[str, str], project_dir: Path) -> Path:
    chosen = Path(path) if path is not None else Path(env.get(CATALOG_ENV) or DEFAULT_CATALOG)
    return chosen if chosen.is_absolute() else project_dir / chosen


def _display(path: Path, project_dir: Path) -> str:
    try:
        return path.relative_to(project_dir).as_posix()
    except ValueError:
        return str(path)


class _UniqueKeys(yaml.constructor.SafeConstructor):
    """Safe-loader mixin that rejects a key repeated within one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _date_or_text(loader: Any, node: yaml.ScalarNode) -> Any:
    """A YAML date that is no day of the calendar (`eol: 2027-02-30`) stays its text, so the field's own
    check names key and field; PyYAML would raise a bare ValueError (a traceback, no line)."""
    try:
        return yaml.constructor.SafeConstructor.construct_yaml_timestamp(loader, node)
    except ValueError:
        return loader.construct_scalar(node)


class _UniqueKeyLoader(_UniqueKeys, yaml.SafeLoader):
    """The pure-Python safe loader: its error messages are the ones users see."""


TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_UniqueKeyLoader.add_constructor(TIMESTAMP_TAG, _date_or_text)


# libyaml's C parser where PyYAML has it: ~7x faster on a large catalog, which the checksum sensor
# re-reads every tick. Same constructor and resolver (Python), so the same data.
_FastUniqueKeyLoader: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = _UniqueKeyLoader  # PyYAML built without libyaml
if getattr(yaml, "__with_libyaml__", False):

    class _CUniqueKeyLoader(_UniqueKeys, yaml.CSafeLoader):
        """libyaml's parser with the safe constructor."""

    _CUniqueKeyLoader.add_constructor(TIMESTAMP_TAG, _date_or_text)

    _FastUniqueKeyLoader = _CUniqueKeyLoader


def _load_yaml(text: str) -> Any:
    """Parse with the fast loader; on an error, parse again with the Python one for its wording
    (it names the alias or token where libyaml's does not; line and column are the same)."""
    try:
        return yaml.load(text, Loader=_FastUniqueKeyLoader)
    except yaml.YAMLError:
        if _FastUniqueKeyLoader is _UniqueKeyLoader:
            raise
        try:
            yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as error:
            raise error from None
        raise  # the parsers disagree: keep libyaml's error


def _yaml_error(display: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{display}: top-level: {where}YAML error: {problem}"


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model found by walking `loc` from `model` ([] if lost)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        info = current.model_fields.get(part) if current else None
        if info is None:
            return []
        candidates = [info.annotation, *get_args(info.annotation)]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return list(current.model_fields) if current else []


def _error_lines(display: str, label: str, model: type[BaseModel], exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        message = err["msg"]
        kind = err["type"]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            loc = loc + tuple(cause.field_path.split("."))
        if kind == "extra_forbidden":
            allowed = _model_fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            message = (
                f"unknown field (did you mean {close[0]!r}?)"
                if close
                else f"unknown field (allowed: {', '.join(allowed)})"
            )
        elif kind == "missing":
            message = "missing required field"
        elif kind == "literal_error":
            message = f"{message}; got {err['input']!r}"
        elif kind in ("value_error", "assertion_error"):
            message = message.split(", ", 1)[1] if ", " in message else message
        field_path = _loc_path(loc) or "(entry)"
        lines.append(f"{display}: {label}: {field_path}: {message}")
    return lines


def _validate(model: type[BaseModel], data: Any, display: str, label: str, errors: list[str]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors.extend(_error_lines(display, label, model, exc))
        return None


def _mirror_checksums(env: Mapping[str, str], display: str, mirror: str | None, errors: list[str]) -> str | None:
    """PACKER_ASSETS_ISO_MIRROR_CHECKSUMS, checked: a file name, and only with a mirror (the file is the mirror's)."""
    try:
        name = mirror_checksums_from_env(env)
    except ValueError as exc:
        errors.append(f"{display}: environment: {MIRROR_CHECKSUMS_ENV}: {exc}")
        return None
    if name and not mirror and not (env.get(MIRROR_ENV) or "").strip():
        errors.append(
            f"{display}: environment: {MIRROR_CHECKSUMS_ENV}: needs {MIRROR_ENV} (the checksum file is read "
            "beside the ISO on the mirror)"
        )
        return None
    return name


def _mirror_keyring(env: Mapping[str, str], display: str, project_path: Path, errors: list[str]) -> Path | None:
    """PACKER_ASSETS_ISO_MIRROR_KEYRING, checked: an existing file, and only with a mirror (the key signs its files)."""
    try:
        keyring = mirror_keyring_from_env(env, project_path)
    except ValueError as exc:
        errors.append(f"{display}: environment: {MIRROR_KEYRING_ENV}: {exc}")
        return None
    if keyring and not (env.get(MIRROR_ENV) or "").strip():
        errors.append(
            f"{display}: environment: {MIRROR_KEYRING_ENV}: needs {MIRROR_ENV} (the keyring verifies the "
            "checksum files the mirror signed)"
        )
        return None
    return keyring


def _pins_from_mirror(entry: TemplateEntry, filename: str) -> TemplateEntry:
    """The entry with every pinned ISO reading its checksum from `filename` beside it on the mirror."""
    return entry.model_copy(
        update={
            "iso": entry.iso.with_mirror_checksums(filename),
            "extra_isos": tuple(extra.with_mirror_checksums(filename) for extra in entry.extra_isos),
        }
    )


def load_catalog(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    project_dir: str | os.PathLike[str] | None = None,
) -> Catalog:
    """Read, validate and return the catalog, or raise ONE CatalogError listing every problem.

    path: default `$PACKER_ASSETS_CATALOG`, else `templates/catalog.yaml`; relative paths are taken
    from `project_dir` (default: the current directory). env: default os.environ (read only).
    """
    env = os.environ if env is None else env
    project_path = Path(project_dir) if project_dir is not None else Path.cwd()
    cat_path = resolve_catalog_path(path, env, project_path)
    display = _display(cat_path, project_path)
    errors: list[str] = []

    try:
        mirror = mirror_from_env(env)
    except ValueError as exc:
        errors.append(
            f"{display}: environment: {MIRROR_ENV}: {exc} (like http://127.0.0.1:8081 or https://mirror.example.com/isos)"
        )
        mirror = None
    mirror_checksums = _mirror_checksums(env, display, mirror, errors)
    mirror_keyring = _mirror_keyring(env, display, project_path, errors)

    try:
        text = cat_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(f"{display}: top-level: catalog file not found (set {CATALOG_ENV} or pass a path)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{display}: top-level: cannot read catalog: {exc.__class__.__name__}") from None
    try:
        doc = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise CatalogError(_yaml_error(display, exc)) from None

    if doc is None:
        raise CatalogError(f"{display}: top-level: catalog is empty (want version, defaults, templates)")
    if not isinstance(doc, dict):
        raise CatalogError(f"{display}: top-level: must be a mapping with version, defaults, templates")
    allowed = ("version", "defaults", "templates")
    for name in doc:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
            errors.append(f"{display}: top-level: {name}: unknown field ({hint})")
    if doc.get("version") != CATALOG_VERSION:
        errors.append(f"{display}: top-level: version: must be {CATALOG_VERSION}, got {doc.get('version')!r}")

    raw_defaults = doc.get("defaults") or {}
    defaults = (
        _validate(Defaults, raw_defaults, display, "defaults", errors) if isinstance(raw_defaults, dict) else None
    )
    if not isinstance(raw_defaults, dict):
        errors.append(f"{display}: defaults: (section): must be a mapping")
    defaults_ok = defaults is not None  # else entries would only echo the defaults' problems

    raw_templates = doc.get("templates")
    if not isinstance(raw_templates, list) or not raw_templates:
        what = "is missing" if raw_templates is None else "must be a non-empty list of entries"
        errors.append(f"{display}: top-level: templates: {what}")
        raw_templates = []

    entries: dict[str, TemplateEntry] = {}
    first_index: dict[str, int] = {}
    for i, raw in enumerate(raw_templates):
        raw_key = raw.get("key") if isinstance(raw, dict) else None
        # the key names the entry in messages, unless it would break the one line or flood it
        plain = isinstance(raw_key, str) and raw_key.strip() and raw_key.isprintable() and len(raw_key) <= KEY_MAX
        label = raw_key if plain and isinstance(raw_key, str) else f"templates[{i}]"
        if not isinstance(raw, dict):
            errors.append(f"{display}: {label}: (entry): must be a mapping")
            continue
        if isinstance(raw_key, str) and raw_key in first_index:
            errors.append(
                f"{display}: {label}: key: duplicate key (templates[{first_index[raw_key]}] and templates[{i}])"
            )
            continue
        if isinstance(raw_key, str):
            first_index[raw_key] = i
        if not defaults_ok:
            continue
        entry = _validate(TemplateEntry, deep_merge(raw_defaults, raw), display, label, errors)
        if entry is not None:
            entries[entry.key] = entry

    ordered = sorted(entries.values(), key=lambda e: (e.vmid_range.first, e.vmid_range.last))
    for a_i, a in enumerate(ordered):
        for b in ordered[a_i + 1 :]:
            if b.vmid_range.first > a.vmid_range.last:
                break
            errors.append(
                f"{display}: {b.key}: vmid_range: {b.vmid_range} overlaps {a.key} ({a.vmid_range}); "
                "each key owns its range"
            )

    for entry in entries.values():
        for i, tag in enumerate(entry.tags):
            if tag != entry.key and tag in entries:
                errors.append(
                    f"{display}: {entry.key}: tags[{i}]: {tag!r} is the key of another entry, a tag the "
                    "tool gives that key's templates: choose another"
                )

    inside = project_path.resolve()
    for entry in entries.values():
        for i, iso in enumerate(entry.all_isos()):
            where = "iso" if i == 0 else f"extra_isos[{i - 1}]"
            if iso.keyring and not (inside / iso.keyring).resolve().is_relative_to(inside):
                errors.append(
                    f"{display}: {entry.key}: {where}.keyring: {iso.keyring} is outside the project root "
                    f"{inside}: keep keyrings under it (e.g. keys/debian.gpg)"
                )
            elif iso.keyring and not (project_path / iso.keyring).is_file():
                errors.append(
                    f"{display}: {entry.key}: {where}.keyring: file {iso.keyring} does not exist under {project_path}"
                )
    for entry in entries.values():  # the VM can run its release (a CPU level, firmware, OS type)
        errors.extend(fit_lines(display, entry))
    if errors:
        raise CatalogError("\n".join(errors))
    if mirror_checksums:
        entries = {key: _pins_from_mirror(entry, mirror_checksums) for key, entry in entries.items()}
    for entry in entries.values():
        for iso in entry.all_isos():
            iso._mirror = mirror
            iso._keyring_path = (project_path / iso.keyring).resolve() if iso.keyring else None
            iso._mirror_keyring = mirror_keyring if iso.keyring else None  # only a signed source is re-signed
    return Catalog(cat_path, display, project_path, mirror, defaults or Defaults(), entries)


def check_catalog(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    project_dir: str | os.PathLike[str] | None = None,
    check_dirs: bool = True,
) -> list[str]:
    """Human lines for `packer-assets catalog check`; raises CatalogError on any problem.

    check_dirs: also require every entry's packer_dir to exist under the project folder.
    """
    catalog = load_catalog(path, env, project_dir)
    if check_dirs:
        missing = [
            f"{catalog.display}: {e.key}: packer_dir: folder {e.packer_dir} does not exist under {catalog.project_dir}"
            for e in catalog
            if not (catalog.project_dir / e.packer_dir).is_dir()
        ]
        if missing:
            raise CatalogError("\n".join(missing))
    lines = [
        f"catalog {catalog.display}: {len(catalog)} templates, version {CATALOG_VERSION}",
        f"iso mirror: {catalog.mirror}" if catalog.mirror else "iso mirror: none (upstream URLs)",
    ]
    for row in catalog.summary_rows():
        extra = f" +{row['extra_isos']}" if row["extra_isos"] else ""
        lines.append(
            f"{row['key']}: {row['family']}/{row['unattended']} vmids {row['vmids']} keep {row['retention']} "
            f"iso {row['iso']}{extra} checksum {row['checksum']} dir {row['packer_dir']}"
        )
    return lines
