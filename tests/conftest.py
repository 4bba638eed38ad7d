"""Shared fixtures and the suite's markers. Fixtures and helpers live in tests/support/, one module per part (lab, pve, mirror, guest, sshd, postgres, packer, dagster_procs).

Markers say what a test needs beyond the Python core (registered in pyproject.toml):
  lab       the in-process lab (the lab distribution, lab/: packer_assets_lab, fakepve, cryptography)
  packer    the real packer binary
  sshd      a real OpenSSH server (openssh-server) and client
  postgres  a real PostgreSQL server (postgresql)
  e2e       real Dagster processes (daemon, code server, webserver)
  browser   Chromium and ChromeDriver
  realguest a real QEMU guest (TCG) booted from a debootstrapped Debian image (qemu-system-x86,
            qemu-utils, debootstrap; root)
A test gets its markers from the fixtures it uses (below) or from its module. `make test` installs
everything; elsewhere a test whose needs are missing is skipped, and the reason is in the summary.
Two fast tiers: `make test-fast` (`pytest -m "not (lab or packer or sshd or postgres or e2e or browser or
realguest)"`) runs the unit tests alone; `make test-lab` (`pytest -m "lab and not (packer or sshd or postgres
or e2e or browser or realguest)"`) the lab's tests that need no binary. Each make target writes a JUnit report
with every test's duration to test-output/junit-<target>.xml.

Timeouts: pytest-timeout stops any test at 600 s (pyproject.toml). A test whose own waits (its `timeout=`,
`wait_for(..., N)`, `.wait(N)`, `time.monotonic() + N` deadlines, those of the helpers it calls) add up to
more carries `@pytest.mark.timeout(N)` above their sum, so a slow run ends with the test's own message;
a loop of waits bounds itself with one deadline. tests/core/test_suite_timeouts.py reads every test module
and fails on a test whose waits outlast its timeout.
"""

import atexit
import glob
import importlib.util
import os
import shutil
import tempfile

import pytest

# Hermetic: what a developer's shell or `make` exported (a lab's PACKER_ASSETS_ENV_FILE left by `make demo`,
# a site's PROXMOX_* settings) must not reach the tests; each test sets what it needs.
PROJECT_VARIABLES = ("PACKER_ASSETS_", "PROXMOX_", "PACKER_INSTALL_", "PACKER_SSH_", "PACKER_BINARY", "PM_API_",
                     "DAGSTER_HOME", "DAGSTER_PG_", "DAGSTER_CODE_")
# Except the documented machine-level override of the real guests' accelerator (docs/realguest.md): on a
# machine whose KVM hangs a Linux guest, `PACKER_ASSETS_QEMU_ACCEL=tcg make test` must reach the realguest tests.
PASSED_THROUGH = ("PACKER_ASSETS_QEMU_ACCEL",)
for _name in [n for n in os.environ if n.startswith(PROJECT_VARIABLES) and n not in PASSED_THROUGH]:
    del os.environ[_name]
# Nor what `make demo` left in the checkout (infra/env/.env.proxmox, control/secrets.env): the output root
# is an empty folder unless a test names its own (with monkeypatch: no test leaves os.environ changed).
os.environ["PACKER_ASSETS_ROOT"] = _EMPTY_ROOT = tempfile.mkdtemp(prefix="packer-assets-tests-root-")
atexit.register(shutil.rmtree, _EMPTY_ROOT, True)

HAVE_LAB = all(importlib.util.find_spec(name) is not None for name in ("packer_assets_lab", "fakepve", "cryptography"))

pytest_plugins = ["support.postgres"]
if HAVE_LAB:  # the fixture modules import the lab; without it, the tests that use them are skipped
    pytest_plugins += ["support.lab", "support.pve", "support.mirror", "support.guest", "support.sshd", "support.templates",
                       "support.realguest"]

INSTALL = "make test installs it"


def _missing_lab() -> str | None:
    return None if HAVE_LAB else f"needs the lab: pip install -e ./lab ({INSTALL})"


def _missing_commands(package: str, *commands: str) -> str | None:
    absent = [c for c in commands if not (shutil.which(c) or os.access(c, os.X_OK))]
    return f"needs {', '.join(absent)}: apt-get install {package} ({INSTALL})" if absent else None


def _missing_postgres() -> str | None:
    return None if glob.glob("/usr/lib/postgresql/*/bin/initdb") else f"needs PostgreSQL: apt-get install postgresql ({INSTALL})"


def _missing_browser() -> str | None:
    if importlib.util.find_spec("selenium") is None:
        return f"needs selenium (the dev extra: pip install -e '.[dev]', {INSTALL})"
    return _missing_commands("chromium chromium-driver", "chromium", "chromedriver")


def _missing_realguest() -> str | None:
    """QEMU and the tools that build the Debian base image, root, the builder's namespaces and the apt mirror
    (unless the image is cached): packer_assets_lab.realguest.image.real_guest_unavailable says which is missing."""
    from packer_assets_lab.realguest.image import real_guest_unavailable

    return real_guest_unavailable()


REQUIREMENTS = {
    "lab": _missing_lab,
    "packer": lambda: _missing_commands("packer", "packer"),
    "sshd": lambda: _missing_commands("openssh-server openssh-client", "/usr/sbin/sshd", "ssh", "ssh-keygen", "scp"),
    "postgres": _missing_postgres,
    "e2e": lambda: None,
    "browser": _missing_browser,
    "realguest": _missing_realguest,
}

# fixture -> the markers a test using it gets
FIXTURE_MARKS = {
    "lab_project": ("lab",), "lab_pki": ("lab",), "lab_pve_serving": ("lab",), "lab_pve": ("lab",),
    "pve_root": ("lab",), "pve_login": ("lab",), "iso_mirror": ("lab",), "mirror_root": ("lab",),
    "mirror_items": ("lab",), "lab_guest": ("lab",), "guest_ssh": ("lab",), "guest_client_key": ("lab",),
    "lab_sshd": ("lab", "sshd"), "ssh_keys": ("sshd",), "postgres_server": ("postgres",),
    "browser": ("browser",), "webserver": ("e2e",),
}


def pytest_collection_modifyitems(config, items):
    missing: dict[str, str | None] = {}  # each need checked once, and only if a collected test has it

    def lacks(mark: str) -> str | None:
        if mark not in missing:
            missing[mark] = REQUIREMENTS[mark]()
        return missing[mark]

    for item in items:
        for fixture in item.fixturenames:
            for mark in FIXTURE_MARKS.get(fixture, ()):
                item.add_marker(mark)
        for mark in REQUIREMENTS:
            if item.get_closest_marker(mark) is not None and lacks(mark):
                item.add_marker(pytest.mark.skip(reason=missing[mark]))
                break


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """dagster 1.13: DagsterInstance.__exit__ disposes the instance but never closes what its __enter__ opened,
    so the instance's defs-state storage stays the current one (a context variable). A later test that resolves
    definitions outside an instance of its own then fails on the disposed one ("Attempted to resolve undefined
    DagsterInstance weakref"), or not, by the order the tests run in. Each test ends with none current."""
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)


@pytest.fixture(autouse=True)
def _no_defs_state_storage_of_a_gone_instance(monkeypatch):
    """Dagster 1.13: entering a DagsterInstance (`with instance:`) sets the current DefsStateStorage (a context
    variable) and its __exit__ (dispose) never resets it, so once that instance is gone the next definitions load
    in this process (dg.materialize) fails with "Attempted to resolve undefined DagsterInstance weakref" — a
    garbage-collection race seen under load. A storage whose instance is gone counts as none, as for a process that
    never set one (the product's runs are one instance per process: `dagster asset materialize`)."""
    from dagster._core.storage.defs_state import base

    def live_storage():
        storage = base._current_storage.get()
        weak = getattr(storage, "_instance_weakref", None) if storage is not None else None
        return None if weak is not None and weak() is None else storage

    monkeypatch.setattr(base.DefsStateStorage, "get", classmethod(lambda cls: live_storage()))
