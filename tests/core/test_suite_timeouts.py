"""No test waits longer than pytest-timeout lets it run: a slow run ends with the test's own message
("timed out after 900s waiting for ..."), never with pytest-timeout's stack dump.

Read statically (ast) from every test module: a test's literal waits are
  - a keyword argument or dict key named like a wait (`timeout`, `deadline`, `*_timeout`, `*_timeout_seconds`)
    whose value is a number or a module constant bound to one (`timeout=900`, `**{"smoke_timeout_seconds": 900}`);
  - a parameter of that name of a function the test calls (defined in its module or in tests/support), as bound
    at the call or by its default (`wait_for(check, 600, ...)`, `wait_task(api, upid)` with `timeout=600`);
  - the first argument of `.wait(N)`, `.join(N)`, `sleep(N)`; `time.monotonic() + N`, a deadline of the test's own;
counted in the test, in the functions it calls (its module's and tests/support's, at each call) and in the
module's fixtures it requests. A wait in a loop counts once: a loop of waits bounds itself with one deadline,
`time.monotonic() + N`, which counts. Fixtures of tests/support (a lab's start) are not counted.
Their sum plus MARGIN must stay within the test's timeout: `@pytest.mark.timeout(N)` on the test, else its
module's `pytestmark`, else pyproject.toml's `timeout`.
"""

import ast
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from support import REPO

TESTS = REPO / "tests"
DEFAULT = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["timeout"]
MARGIN = 30  # seconds left for the test to fail with its own message after its last wait
WAIT = re.compile(r"(?:^|_)(?:timeout|deadline)(?:_seconds|_s)?$")
POSITIONAL = {"wait", "join", "sleep"}  # Popen.wait(600), Thread.join(30), time.sleep(5)


@dataclass
class Module:
    """One parsed file: its functions and fixtures by name, its numeric and dict constants."""
    path: Path
    tree: ast.Module
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    fixtures: dict[str, ast.FunctionDef] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)
    dicts: dict[str, ast.Dict] = field(default_factory=dict)
    imported: dict[str, tuple["Module", str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path.relative_to(REPO)) if self.path.is_relative_to(REPO) else self.path.name

    @classmethod
    def parse(cls, path: Path, source: str | None = None, support: dict[str, "Module"] | None = None) -> "Module":
        module = cls(path, ast.parse(source if source is not None else path.read_text()))
        for node in module.tree.body:
            if isinstance(node, ast.FunctionDef):
                fixture = any("fixture" in ast.unparse(d) for d in node.decorator_list)
                (module.fixtures if fixture else module.functions)[node.name] = node
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name, value = node.targets[0].id, node.value
                if isinstance(value, ast.Constant) and isinstance(value.value, (int, float)):
                    module.numbers[name] = value.value
                elif isinstance(value, ast.Dict):
                    module.dicts[name] = value
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("support.") and support:
                source_module = support.get(node.module.removeprefix("support."))
                for alias in node.names:
                    if source_module is not None:
                        module.imported[alias.asname or alias.name] = (source_module, alias.name)
        return module

    def number(self, node: ast.expr | None) -> float | None:
        """A number, a module constant bound to one, or a sum or product of those (`BUDGET + 300`)."""
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            return self.numbers.get(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = self.number(node.left), self.number(node.right)
            if left is not None and right is not None:
                return left + right if isinstance(node.op, ast.Add) else left * right
        return None

    def callee(self, call: ast.Call) -> tuple["Module", ast.FunctionDef] | None:
        if not isinstance(call.func, ast.Name):
            return None
        name = call.func.id
        if name in self.functions:
            return self, self.functions[name]
        if name in self.imported:
            module, original = self.imported[name]
            if original in module.functions:
                return module, module.functions[original]
        return None


@dataclass(frozen=True)
class Wait:
    seconds: float
    where: str  # file:line

    def order(self) -> tuple[str, int]:
        path, line = self.where.rsplit(":", 1)
        return path, int(line)


def timeout_mark(decorators: list[ast.expr], module: Module) -> float | None:
    for node in decorators:
        for call in [n for n in ast.walk(node) if isinstance(n, ast.Call)]:
            if ast.unparse(call.func).endswith("mark.timeout") and call.args:
                return module.number(call.args[0])
    return None


def module_timeout(module: Module) -> float | None:
    for node in module.tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            return timeout_mark([node.value], module)
    return None


def keyword_waits(call: ast.Call, module: Module) -> list[tuple[str, ast.expr]]:
    """(name, value) of the call's wait keywords, `**CONSTANT_DICT` and `**{...}` spread."""
    found = []
    for keyword in call.keywords:
        if keyword.arg is not None:
            found.append((keyword.arg, keyword.value))
            continue
        spread = keyword.value
        if isinstance(spread, ast.Name):
            spread = module.dicts.get(spread.id)
        if isinstance(spread, ast.Dict):
            found += [(k.value, v) for k, v in zip(spread.keys, spread.values)
                      if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return found


def call_waits(call: ast.Call, module: Module, seen: frozenset) -> list[Wait]:
    where = f"{module.label}:{call.lineno}"
    keywords = keyword_waits(call, module)
    resolved = module.callee(call)
    waits = []
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    if resolved is None and name in POSITIONAL and call.args and (seconds := module.number(call.args[0])) is not None:
        waits.append(Wait(seconds, where))
    if resolved is None:
        for name, value in keywords:
            if WAIT.search(name) and (seconds := module.number(value)) is not None:
                waits.append(Wait(seconds, where))
        return waits
    callee_module, function = resolved
    params = [a.arg for a in function.args.posonlyargs + function.args.args]
    defaults = dict(zip(reversed(params), reversed(function.args.defaults)))
    defaults.update({a.arg: d for a, d in zip(function.args.kwonlyargs, function.args.kw_defaults) if d is not None})
    bound = dict(zip(params, call.args)) | dict(keywords)
    for name in [*params, *(a.arg for a in function.args.kwonlyargs)]:
        if not WAIT.search(name):
            continue
        if name in bound:
            seconds = module.number(bound[name])
        else:
            seconds = callee_module.number(defaults.get(name))
        if seconds is not None:
            waits.append(Wait(seconds, where))
    for name, value in keywords:  # passed on through **kwargs
        if name not in params and WAIT.search(name) and (seconds := module.number(value)) is not None:
            waits.append(Wait(seconds, where))
    return waits + body_waits(function, callee_module, seen)


def body_waits(function: ast.FunctionDef, module: Module, seen: frozenset) -> list[Wait]:
    """The literal waits of a function's body and of the functions it calls, at each call."""
    if (module.path, function.name) in seen:  # recursion
        return []
    seen = seen | {(module.path, function.name)}
    waits = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            waits += call_waits(node, module, seen)
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and "monotonic()" in ast.unparse(node.left)
              and (seconds := module.number(node.right)) is not None):
            waits.append(Wait(seconds, f"{module.label}:{node.lineno}"))
    return waits


def waits_of(test: ast.FunctionDef, module: Module) -> list[Wait]:
    """The test's waits, with those of the module's fixtures it requests (directly or through another)."""
    waits = body_waits(test, module, frozenset())
    done, requested = set(), [a.arg for a in test.args.args]
    while requested:
        name = requested.pop()
        if name in module.fixtures and name not in done:
            done.add(name)
            waits += body_waits(module.fixtures[name], module, frozenset())
            requested += [a.arg for a in module.fixtures[name].args.args]
    return waits


def overruns(module: Module) -> list[str]:
    found = []
    default = module_timeout(module) or DEFAULT
    for name, test in module.functions.items():
        if not name.startswith("test_"):
            continue
        limit = timeout_mark(test.decorator_list, module) or default
        waits = waits_of(test, module)
        total = sum(w.seconds for w in waits)
        if total + MARGIN > limit:
            counted = Counter(w for w in sorted(waits, key=Wait.order) if w.seconds >= 10)
            listed = ", ".join(f"{n} × " * (n > 1) + f"{w.seconds:g} s at {w.where}" for w, n in counted.items())
            found.append(f"{module.label}::{name} waits up to {total:g} s ({listed}) within a timeout of "
                         f"{limit:g} s: give it @pytest.mark.timeout({int(total + MARGIN)}) or more, or wait less")
    return found


def support_modules() -> dict[str, Module]:
    return {p.stem: Module.parse(p) for p in (TESTS / "support").glob("*.py") if p.stem != "__init__"}


def test_no_test_waits_longer_than_its_timeout():
    support = support_modules()
    found = [line for path in sorted(TESTS.rglob("test_*.py"))
             for line in overruns(Module.parse(path, support=support))]
    assert found == [], "tests whose own waits outlast their pytest timeout:\n" + "\n".join(found)


SAMPLE = '''
import time
import pytest
from support.dagster_procs import wait_for
pytestmark = [pytest.mark.lab, pytest.mark.timeout(700)]
LONG = 700
REAL = {"smoke_timeout_seconds": 300}

def helper(api, timeout=600):
    run(api, timeout=timeout)

@pytest.fixture
def built():
    rebuild(**REAL)

def test_positional(built):
    wait_for(check, 400, "x")

@pytest.mark.timeout(LONG * 4 + 200)
def test_marked():
    deadline = time.monotonic() + LONG
    helper(api)
    helper(api, timeout=900)
    proc.wait(60)

def test_in_time():
    subprocess.run([], timeout=120)
'''


def test_the_reading_finds_each_kind_of_wait(tmp_path):
    path = tmp_path / "test_sample.py"
    module = Module.parse(path, SAMPLE, support_modules())
    assert module_timeout(module) == 700
    waits = {name: sorted(w.seconds for w in waits_of(module.functions[name], module))
             for name in ("test_positional", "test_marked", "test_in_time")}
    assert waits == {"test_positional": [300, 400], "test_marked": [60, 600, 700, 900], "test_in_time": [120]}
    # 300 + 400 s do not fit the module's 700 s; 2260 s fit the test's own 3000 s
    (overrun,) = overruns(module)
    assert overrun.startswith("test_sample.py::test_positional waits up to 700 s (300 s at test_sample.py:14, 400 s at ")
    assert overrun.endswith("give it @pytest.mark.timeout(730) or more, or wait less")
