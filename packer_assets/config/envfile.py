"""`KEY=value` env files that bash `source` reads back exactly.

Values are written in single quotes (a quote inside becomes '\\'' ), which bash takes literally:
no `$`, backtick or backslash is interpreted, and newlines survive. Reading follows bash's quoting
rules without expansion, so files written by hand with "..." or bare words also load. A malformed line
is named by file, line and variable, never by its text: that text may be a secret.
"""

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from packer_assets.errors import ConfigError
from packer_assets.evidence.layout import atomic_write

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


class Word(NamedTuple):
    """A shell word of an env file: an assignment when `name` is set."""

    line: int
    name: str | None  # the variable of a `NAME=value` word; None for any other word
    value: str  # the value of an assignment, else the whole word


def _error(source: str, line: int, what: str) -> EnvFileError:
    # names the file, the line and at most a variable name: any other text there may be a secret
    return EnvFileError(f"{source}: line {line}: {what}")


def parse(text: str, source: str = "<string>") -> dict[str, str]:
    """The variables `text` sets as bash `source` reads them, without expansion."""
    return {word.name: word.value for word in assignments(text, source) if word.name is not None}


def assignments(text: str, source: str = "<string>") -> list[Word]:
    """The assignments of `text` with their lines. An error names the file, the line and the variable, never
    a value: a stray word is usually a secret wrapped or split by a blank."""
    words = list(_words(text, source))
    out: list[Word] = []
    for index, word in enumerate(words):
        before = words[index - 1] if index else None
        same_line = before is not None and before.line == word.line
        if word.name is None and word.value == "export" and not same_line:
            following = words[index + 1] if index + 1 < len(words) else None
            if following is None or following.line != word.line or following.name is None:
                raise _error(source, word.line, "`export` without a NAME=value after it")
            continue
        if word.name is None:
            raise _error(source, word.line, _stray_word(words[:index], same_line))
        if "\0" in word.value:
            raise _error(source, word.line, f"{word.name}: the value holds a NUL byte, which no shell can hold")
        out.append(word)
    return out


def _stray_word(earlier: list[Word], same_line: bool) -> str:
    last = next((w for w in reversed(earlier) if w.name), None)
    if same_line and last is not None:
        return (
            f"{last.name}: an unquoted blank in or before the value (bash would run the rest as a command); "
            "quote the whole value"
        )
    if last is None:
        return "not a KEY=value assignment"
    return (
        f"not a KEY=value assignment (the last variable before it: {last.name} on line {last.line}; "
        "a value wrapped onto a new line?)"
    )


ASSIGNMENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
BLANKS = " \t\r\n"  # a CR too: files saved with CRLF line ends load as before
ESCAPED_IN_DOUBLE_QUOTES = re.compile(r'\\([$`"\\\n])')  # bash: elsewhere in "..." a backslash stays


def _words(text: str, source: str) -> Iterator[Word]:
    """Shell words with their first line: blanks split, `#` at a word's start comments out the line,
    quotes and backslashes as bash takes them; nothing is expanded."""
    i, line = 0, 1
    while i < len(text):
        if text[i] in BLANKS:
            line += text[i] == "\n"
            i += 1
        elif text[i] == "#":
            end = text.find("\n", i)
            i = end if end >= 0 else len(text)
        else:
            assignment = ASSIGNMENT_RE.match(text, i)
            name = assignment.group()[:-1] if assignment else None
            value, end = _word_value(text, assignment.end() if assignment else i, source, line, name)
            yield Word(line, name, value)
            line += text.count("\n", i, end)
            i = end


def _word_value(text: str, i: int, source: str, line: int, name: str | None) -> tuple[str, int]:
    """(the word from i with its quotes removed, where it ends)."""
    out = []
    while i < len(text) and text[i] not in BLANKS:
        char = text[i]
        if char in "'\"":
            end = _closing_quote(text, i)
            if end < 0:
                what = (
                    f"{name}: the value's {char} quote is never closed" if name else f"a {char} quote is never closed"
                )
                raise _error(source, line, what)
            inner = text[i + 1 : end]
            out.append(inner if char == "'" else ESCAPED_IN_DOUBLE_QUOTES.sub(_unescape, inner))
            i = end + 1
        elif char == "\\":
            out.append(text[i + 1 : i + 2] if text[i + 1 : i + 2] != "\n" else "")
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out), min(i, len(text))


def _unescape(match: re.Match[str]) -> str:
    return "" if match.group(1) == "\n" else match.group(1)  # a backslash-newline joins the lines


def _closing_quote(text: str, i: int) -> int:
    """Index of the quote closing the one at i (-1: none); inside "..." a backslash escapes the next character."""
    if text[i] == "'":
        return text.find("'", i + 1)
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j
        else:
            j += 1
    return -1


def read_env_file(path: Path) -> dict[str, str]:
    return {word.name: word.value for word in read_assignments(path) if word.name is not None}


def read_assignments(path: Path) -> list[Word]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EnvFileError(f"{path}: no such env file") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise EnvFileError(f"{path}: line {line}: not UTF-8 text") from None
    except OSError as exc:
        raise EnvFileError(f"{path}: cannot read the env file ({exc.strerror or exc.__class__.__name__})") from None
    return assignments(text, str(path))
