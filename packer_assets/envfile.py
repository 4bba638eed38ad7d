"""`KEY=value` env files that bash `source` reads back exactly.

Values are written in single quotes (a quote inside becomes '\\'' ), which bash takes literally:
no `$`, backtick or backslash is interpreted, and newlines survive. Reading uses POSIX shell
quoting rules without expansion, so files written by hand with "..." or bare words also load.
"""

import re
import shlex
from collections.abc import Mapping
from pathlib import Path

from .evidence import atomic_write
from .errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_MODE = 0o600


class EnvFileError(ConfigError):
    """A malformed env file or value; the message names the file and the line or key."""


def quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def render(values: Mapping[str, str], export: bool = True, header: str = "") -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    prefix = "export " if export else ""
    for name, value in values.items():
        if not NAME_RE.match(name):
            raise EnvFileError(f"bad variable name {name!r}")
        text = str(value)
        if "\0" in text:
            raise EnvFileError(f"{name}: value contains a NUL byte, which no shell can hold")
        lines.append(f"{prefix}{name}={quote(text)}")
    return "\n".join(lines) + "\n"


def write_env_file(path: Path, values: Mapping[str, str], *, secret: bool = True, header: str = "") -> Path:
    """Write atomically; mode 0600 when the file holds secrets (the default), else 0644."""
    return atomic_write(Path(path), render(values, header=header), mode=SECRET_MODE if secret else 0o644)


def parse(text: str, source: str = "<string>") -> dict[str, str]:
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: dict[str, str] = {}
    try:
        tokens = list(lexer)
    except ValueError as exc:  # an unclosed quote
        raise EnvFileError(f"{source}: {exc} (line {lexer.lineno})") from None
    for token in tokens:
        if token == "export":
            continue
        name, sep, value = token.partition("=")
        if not sep or not NAME_RE.match(name):
            raise EnvFileError(f"{source}: not a KEY=value assignment: {token.splitlines()[0][:60]!r}")
        out[name] = value
    return out


def read_env_file(path: Path) -> dict[str, str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EnvFileError(f"{path}: no such env file") from None
    return parse(text, str(path))
