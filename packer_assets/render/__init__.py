"""Unattended-install rendering and the validators of each ecosystem (core: no Dagster import).

- `render_unattended(entry, env, out_dir)` -> `RenderResult`: render, validate, then write.
- `build_answer_iso(files, path)` -> (path, sha256): the Windows answer ISO (pycdlib, Joliet).
- `validate_*`: one function per format, each returning a `Verdict`.
- `validator_for(entry, schema_dir)` -> `ReleaseValidator`: which upstream validator, and which release of
  it, checks the key (`NoValidator`, one line, when its release has none).
"""

from packer_assets.render.answer_iso import build_answer_iso, read_iso
from packer_assets.render.engine import (
    ANSWER_ISO_NAME,
    RenderedFile,
    RenderError,
    RenderResult,
    content_hash,
    make_environment,
    render_files,
    render_unattended,
)
from packer_assets.render.passwords import (
    PasswordError,
    sha512_crypt_hash,
    verify_sha512_crypt,
    windows_decode,
    windows_encode,
)
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
)

__all__ = [
    "ANSWER_ISO_NAME",
    "Expected",
    "NoValidator",
    "PasswordError",
    "ReleaseValidator",
    "RenderError",
    "RenderResult",
    "RenderedFile",
    "ValidatorUnavailable",
    "Verdict",
    "build_answer_iso",
    "content_hash",
    "make_environment",
    "read_iso",
    "render_files",
    "render_unattended",
    "resolve_schema_dir",
    "sha512_crypt_hash",
    "validate_autoinstall",
    "validate_autounattend",
    "validate_kickstart",
    "validate_preseed",
    "validator_for",
    "verify_sha512_crypt",
    "windows_decode",
    "windows_encode",
]
