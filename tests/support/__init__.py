"""What the tests share: fixtures (one module per part: lab, pve, mirror, guest, sshd, postgres), helpers
for packer (packer.py) and for real Dagster processes (dagster_procs.py). tests/conftest.py loads the
fixture modules as plugins; tests import helpers as `from support.<part> import ...`."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout
