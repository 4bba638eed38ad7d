"""A crash at a named point: `python -m support.killpoint MODULE:NAME dagster ARGS...` runs dagster's CLI in
this process with MODULE.NAME replaced by a SIGKILL of the process, so a run dies exactly there (no timing)."""

import importlib
import os
import signal
import sys


def _die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    target, program, *args = sys.argv[1:]
    module, name = target.split(":")
    setattr(importlib.import_module(module), name, _die)
    from dagster._cli import main as dagster_main

    sys.argv = [program, *args]
    dagster_main()


if __name__ == "__main__":
    main()
