"""A small POSIX-shell effects interpreter for simulated guests (invented by the lab, not a shell).

It reads what the templates send (packer's execute_command, uploaded scripts run by `sh -eu <path>`,
d-i late_command, autoinstall late-commands, kickstart %post) and applies the effects the lab models to a
GuestState (guest_state.py). Grammar: lists (`;`, newlines), `&&`, `||`, pipelines (the last command's
status), `{ ...; }`, `if/elif/else/fi`, comments, `$(...)`, `$VAR`/`${VAR}`/`$?` in words, redirections
(`: > /etc/machine-id` truncates). `set -e` (or `sh -e`) exits on a failing command as sh does.

Modelled commands: passwd -l / usermod -L, truncate -s 0 and `: >` of machine-id, rm -f of machine-id and
host keys (globs), cloud-init clean [--logs --seed --machine-id] and status, systemctl enable/disable
[--now] / is-enabled (the unit must exist: a package provides it), apt-get/apt/dnf/yum install/remove,
dpkg -s, rpm -q, `[ ... ]`/test, exit, set, sudo/env/in-target/curtin in-target (run what follows), sh/bash
of a script or -c, `.`. Anything else succeeds with no effect. `root` is the installed system's mount point
in the installer (`/target` in d-i and curtin): paths outside it are the installer's own and change nothing.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from packer_assets.errors import OperationError

from .guest_state import LOCKED, GuestState

NOT_FOUND = 127
MACHINE_ID = "/etc/machine-id"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
Node = tuple[Any, ...]


class ShellExit(OperationError):
    """The simulated shell's `exit N` (and `set -e` stopping a script): control flow the shell catches."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


@dataclass
class Shell:
    """One run: the state it changes, how an uploaded file is read, the install's package versions."""

    state: GuestState
    read_file: Callable[[str], str | None] = lambda _path: None
    version_of: Callable[[str], tuple[str, str]] = lambda _name: ("0.0-lab-synthetic", "all")
    root: str = ""  # the installed system's mount point ("/target" in d-i's late_command)
    errexit: bool = False
    quiet: int = 0  # inside an `if` condition or left of && / ||: set -e does not apply
    vars: dict[str, str] = field(default_factory=dict)
    out: list[str] = field(default_factory=list)
    status: int = 0

    def run(self, script: str) -> int:
        """Run script; returns its exit status (what it printed is in `out`)."""
        try:
            self._list(_Parser(tokenize(script)).parse())
        except ShellExit as e:
            self.status = e.status
        return self.status

    def say(self, text: str) -> None:
        self.out.append(text if text.endswith("\n") else text + "\n")

    # ---- evaluation -----------------------------------------------------------------------------

    def _list(self, node: Node) -> int:
        for chain in node[1]:
            self.status = self._and_or(chain)
        return self.status

    def _and_or(self, chain: list[tuple[str, Node]]) -> int:
        """`a && b || c`: set -e exits only when the chain's last command ran and failed (as sh does)."""
        status, last = 0, -1
        for index, (op, pipeline) in enumerate(chain):
            if (op == "&&" and status != 0) or (op == "||" and status == 0):
                continue
            self.quiet += index < len(chain) - 1
            try:
                status = self._pipeline(pipeline)
            finally:
                self.quiet -= index < len(chain) - 1
            last = index
        if self.errexit and not self.quiet and status != 0 and last == len(chain) - 1:
            raise ShellExit(status)
        return status

    def _pipeline(self, node: Node) -> int:
        """Each command runs; only the last one's output is printed (the others' goes down the pipe)."""
        status = 0
        for index, command in enumerate(node[1]):
            kept = len(self.out)
            status = self._command(command)
            if index < len(node[1]) - 1:
                del self.out[kept:]
        return status

    def _condition(self, node: Node) -> int:
        self.quiet += 1
        try:
            return self._list(node)
        finally:
            self.quiet -= 1

    def _command(self, node: Node) -> int:
        if node[0] == "group":
            return self._list(node[1])
        if node[0] == "if":
            for condition, body in node[1]:
                if self._condition(condition) == 0:
                    return self._list(body)
            return self._list(node[2]) if node[2] is not None else 0
        words = [self.expand(w) for w in node[1]]
        to_file = False
        for op, target in node[2]:
            if op == ">" and self.path(self.expand(target)) == MACHINE_ID:
                self.state.machine_id = ""
            to_file = to_file or op in (">", ">>")
        kept = len(self.out)
        status = self.simple(words)
        if to_file:
            del self.out[kept:]  # written to the file, not printed
        return status

    def expand(self, raw: str) -> str:
        """A word with quotes removed, `$VAR`, `${VAR}`, `$?` and `$(...)` substituted (no globbing)."""
        out, i, quote = [], 0, ""
        while i < len(raw):
            c = raw[i]
            if quote != "'" and c == "\\" and i + 1 < len(raw):
                out.append(raw[i + 1])
                i += 2
            elif c in "'\"" and (not quote or quote == c):
                quote = "" if quote else c
                i += 1
            elif c == "$" and quote != "'":
                text, i = self._dollar(raw, i)
                out.append(text)
            else:
                out.append(c)
                i += 1
        return "".join(out)

    def _dollar(self, raw: str, i: int) -> tuple[str, int]:
        if raw.startswith("$(", i):
            end = _closing(raw, i + 1)
            inner = Shell(self.state, self.read_file, self.version_of, self.root, vars=self.vars)
            inner.run(raw[i + 2 : end])
            self.status = inner.status
            return "".join(inner.out).rstrip("\n"), end + 1
        found = re.match(r"\$(?:\{(\w+)\}|(\w+)|(\?))", raw[i:])
        if not found:
            return "$", i + 1
        if found.group(3):
            return str(self.status), i + 2
        return self.vars.get(found.group(1) or found.group(2), ""), i + found.end()

    def path(self, path: str) -> str | None:
        """The installed system's path that `path` names here, or None (the installer's own files)."""
        path = posixpath.normpath(path) if path else path
        if not self.root:
            return path
        if path == self.root or path.startswith(self.root + "/"):
            return path[len(self.root) :] or "/"
        return None

    # ---- commands -------------------------------------------------------------------------------

    def simple(self, words: list[str]) -> int:
        while words and re.fullmatch(r"\w+=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            self.vars[name] = value
        if not words:
            return self.status if self.status else 0
        name = posixpath.basename(words[0])
        handler = COMMANDS.get(name)
        return handler(self, words[1:]) if handler else 0


def _closing(text: str, open_at: int) -> int:
    depth = 0
    for index in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return len(text)


# ---- tokens and parsing -------------------------------------------------------------------------

OPERATORS = ("&&", "||", ";;", ">>", ";", "\n", "|", "&", ">", "<")


def tokenize(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens: ("w", raw word, quotes kept) and ("op", operator); newlines are ";"."""
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in " \t\r" or text.startswith("\\\n", i):
            i += 2 if c == "\\" else 1
        elif c == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
        elif op := next((o for o in OPERATORS if text.startswith(o, i)), None):
            i += len(op)
            if op in (">", ">>") and text.startswith("&", i):  # >&2: a dup, not a file
                i = _skip_word(text, i + 1)
                continue
            tokens.append(("op", ";" if op in ("\n", "&") else op))
        else:
            end = _skip_word(text, i)
            word = text[i:end]
            if word.isdigit() and text.startswith((">", "<"), end):
                i = end  # `2>...`: the fd of a redirection
                continue
            tokens.append(("w", word))
            i = end
    return tokens


def _skip_word(text: str, i: int) -> int:
    quote = ""
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif text.startswith("$(", i):
            i = _closing(text, i + 1)
        elif c in " \t\r\n;&|<>":
            break
        i += 1
    return i


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens, self.at = tokens, 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def parse(self) -> Node:
        return self.list_until(())

    def list_until(self, ends: tuple[str, ...]) -> Node:
        chains = []
        while (token := self.peek()) is not None:
            if token == ("op", ";"):
                self.at += 1
            elif token[0] == "w" and token[1] in ends:
                break
            else:
                chains.append(self.and_or(ends))
        return ("list", chains)

    def and_or(self, ends: tuple[str, ...]) -> list[tuple[str, Node]]:
        chain, op = [], ""
        while True:
            chain.append((op, self.pipeline(ends)))
            token = self.peek()
            if token is None or token[1] not in ("&&", "||") or token[0] != "op":
                return chain
            op = token[1]
            self.at += 1
            while self.peek() == ("op", ";"):
                self.at += 1

    def pipeline(self, ends: tuple[str, ...]) -> Node:
        commands = [self.command(ends)]
        while self.peek() == ("op", "|"):
            self.at += 1
            commands.append(self.command(ends))
        return ("pipeline", commands)

    def command(self, ends: tuple[str, ...]) -> Node:
        token = self.peek()
        if token == ("w", "{"):
            self.at += 1
            body = self.list_until(("}",))
            self.at += 1
            return ("group", body)
        if token == ("w", "if"):
            return self.if_clause()
        words, redirects = [], []
        while (token := self.peek()) is not None:
            if token[0] == "op" and token[1] in (">", ">>", "<"):
                self.at += 1
                target = self.peek()
                redirects.append((token[1], target[1] if target else ""))
                self.at += 1
            elif token[0] == "op" or (not words and token[1] in ends):
                break
            else:
                words.append(token[1])
                self.at += 1
        return ("simple", words, redirects)

    def if_clause(self) -> Node:
        branches, otherwise = [], None
        word = "if"
        while word in ("if", "elif"):
            self.at += 1
            condition = self.list_until(("then",))
            self.at += 1
            body = self.list_until(("elif", "else", "fi"))
            branches.append((condition, body))
            token = self.peek()
            word = token[1] if token else "fi"
        if word == "else":
            self.at += 1
            otherwise = self.list_until(("fi",))
        self.at += 1  # fi
        return ("if", branches, otherwise)


# ---- the modelled commands ----------------------------------------------------------------------


def _targets(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("-")]


def _passwd(shell: Shell, args: list[str]) -> int:
    if not ({"-l", "--lock", "-L"} & set(args)):
        return 0
    users = _targets(args)
    user = users[-1] if users else "root"
    if user not in shell.state.users:
        shell.say(f"passwd: user '{user}' does not exist")
        return 1
    shell.state.users[user] = LOCKED
    return 0


def _truncate(shell: Shell, args: list[str]) -> int:
    if "-s" in args and args[args.index("-s") + 1 : args.index("-s") + 2] == ["0"]:
        for path in [a for a in args[args.index("-s") + 2 :] if not a.startswith("-")]:
            if shell.path(path) == MACHINE_ID:
                shell.state.machine_id = ""
    return 0


def _rm(shell: Shell, args: list[str]) -> int:
    for pattern in _targets(args):
        path = shell.path(pattern)
        if path is None:
            continue
        if fnmatch.fnmatch(MACHINE_ID, path):
            shell.state.machine_id = ""
        if fnmatch.fnmatch(HOST_KEY, path) or fnmatch.fnmatch(HOST_KEY + ".pub", path):
            shell.state.host_keys_boot = None
    return 0


def _cloud_init(shell: Shell, args: list[str]) -> int:
    if not shell.state.has("cloud-init"):
        shell.say("sh: 1: cloud-init: not found")
        return NOT_FOUND
    if args[:1] == ["clean"]:
        shell.state.cloud_init = "clean"
        if "--machine-id" in args:
            shell.state.machine_id = ""
    elif args[:1] == ["status"]:
        shell.say("status: done")
    return 0


def _systemctl(shell: Shell, args: list[str]) -> int:
    verb, units = (args[0] if args else ""), [a.removesuffix(".service") for a in _targets(args[1:])]
    if verb == "is-enabled":
        return _is_enabled(shell, units[0] if units else "")
    if verb not in ("enable", "disable"):
        return 0
    for unit in units:
        if not shell.state.unit_exists(unit):
            shell.say(f"Failed to {verb} unit: Unit file {unit}.service does not exist.")
            return 1
    for unit in units:
        (shell.state.enabled.add if verb == "enable" else shell.state.enabled.discard)(unit)
    return 0


def _is_enabled(shell: Shell, unit: str) -> int:
    if not shell.state.unit_exists(unit):
        shell.say(f"Failed to get unit file state for {unit}.service: No such file or directory")
        return 1
    if unit == "qemu-guest-agent" and shell.state.family != "rocky":
        shell.say("static")  # Debian's unit has no [Install] section: udev starts it
        return 0
    enabled = unit in shell.state.enabled
    shell.say("enabled" if enabled else "disabled")
    return 0 if enabled else 1


def _packages(shell: Shell, args: list[str]) -> int:
    verb = next((a for a in args if not a.startswith("-")), "")
    names = [a for a in _targets(args) if a != verb]
    if verb == "install":
        for name in names:
            shell.state.packages[name] = shell.version_of(name)
    elif verb in ("remove", "purge", "erase", "autoremove"):
        for name in names:
            shell.state.packages.pop(name, None)
            shell.state.enabled.discard(name)
    return 0


def _query(shell: Shell, args: list[str]) -> int:
    if not ({"-s", "--status", "-q"} & set(args)):
        return 0
    missing = [n for n in _targets(args) if not shell.state.has(n)]
    for name in missing:
        shell.say(f"dpkg-query: package '{name}' is not installed and no information is available")
    return 1 if missing else 0


def _test(shell: Shell, args: list[str]) -> int:
    args = args[:-1] if args and args[-1] == "]" else args
    if len(args) == 2 and args[0] in ("-f", "-e", "-s"):
        return 0 if _exists(shell, args[1]) else 1
    if len(args) == 2 and args[0] in ("-n", "-z"):
        return 0 if bool(args[1]) == (args[0] == "-n") else 1
    if len(args) == 3:
        left, op, right = args
        numeric = {"-eq": int.__eq__, "-ne": int.__ne__, "-lt": int.__lt__, "-gt": int.__gt__}
        if op in numeric:
            try:
                return 0 if numeric[op](int(left), int(right)) else 1
            except ValueError:
                return 2
        return 0 if (left == right) == (op == "=") else 1
    return 0


def _exists(shell: Shell, path: str) -> bool:
    path = shell.path(path) or ""
    if path == MACHINE_ID:
        return True
    if fnmatch.fnmatch(HOST_KEY, path):
        return shell.state.host_keys_boot is not None
    if path == "/etc/sysconfig/qemu-ga":
        return shell.state.has("qemu-guest-agent") and shell.state.family == "rocky"
    return shell.read_file(path) is not None


def _exit(shell: Shell, args: list[str]) -> int:
    raise ShellExit(int(args[0]) if args and args[0].isdigit() else shell.status)


def _set(shell: Shell, args: list[str]) -> int:
    for arg in args:
        if arg[:1] in "-+" and "e" in arg:
            shell.errexit = arg.startswith("-")
    return 0


def _wrapped(shell: Shell, args: list[str]) -> int:
    """sudo [opts] / env [-u X] [V=v] / in-target / curtin in-target ... -- : run what follows."""
    rest, root = list(args), shell.root
    while rest and (rest[0].startswith("-") or re.fullmatch(r"\w+=.*", rest[0]) or rest[0] == "in-target"):
        flag = rest.pop(0)
        if flag in ("-u", "-p", "-g") and rest:
            rest.pop(0)
        if flag == "--":
            break
        if flag == "in-target" or flag.startswith("--target"):
            root = ""
    inner = Shell(shell.state, shell.read_file, shell.version_of, root, vars=shell.vars)
    status = inner.simple(rest)
    shell.out += inner.out
    return status


def _in_target(shell: Shell, args: list[str]) -> int:
    return _wrapped(shell, ["in-target", *args])


def _sh(shell: Shell, args: list[str]) -> int:
    errexit, rest = False, list(args)
    while rest and rest[0].startswith("-") and rest[0] != "-c":
        errexit = errexit or "e" in rest.pop(0)
    if rest[:1] == ["-c"]:
        script = rest[1] if len(rest) > 1 else ""
    else:
        script = shell.read_file(rest[0]) if rest else None
        if script is None:
            shell.say(f"sh: 0: cannot open {rest[0] if rest else ''}: No such file")
            return 2
    return run_script(shell, script, errexit)


def run_script(shell: Shell, script: str, errexit: bool) -> int:
    inner = Shell(shell.state, shell.read_file, shell.version_of, shell.root, errexit=errexit)
    status = inner.run(script)
    shell.out += inner.out
    return status


def _echo(shell: Shell, args: list[str]) -> int:
    shell.say(" ".join(a for a in args if a != "-n"))
    return 0


def _printf(shell: Shell, args: list[str]) -> int:
    """printf FORMAT ARGS, as far as the templates use it (`%s`, `\\n`)."""
    if args:
        shell.say(args[0].replace("%s", " ".join(args[1:])).replace("\\n", ""))
    return 0


COMMANDS: dict[str, Callable[[Shell, list[str]], int]] = {
    "passwd": _passwd,
    "usermod": _passwd,
    "truncate": _truncate,
    "rm": _rm,
    "cloud-init": _cloud_init,
    "systemctl": _systemctl,
    "apt-get": _packages,
    "apt": _packages,
    "dnf": _packages,
    "yum": _packages,
    "dpkg": _query,
    "rpm": _query,
    "[": _test,
    "test": _test,
    "exit": _exit,
    "set": _set,
    "false": lambda _shell, _args: 1,
    "sudo": _wrapped,
    "env": _wrapped,
    "in-target": _in_target,
    "curtin": lambda shell, args: _in_target(shell, args[1:]) if args[:1] == ["in-target"] else 0,
    "sh": _sh,
    "bash": _sh,
    "echo": _echo,
    "printf": _printf,
}
