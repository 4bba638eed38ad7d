"""The accelerator is chosen by booting the guest's own kernel under KVM, with a bound (no real QEMU needed).

A stand-in `qemu-system-x86_64` on PATH plays the machines of issue 26: one whose KVM hangs a Linux kernel
(it prints nothing under `-accel kvm` and never exits), one where KVM works, and it records every run, so
the tests see the fallback, its reason, the remembered choice and the override. The only wait is the
probe's bound, which the hanging case spends in full (2 s here).
"""

import json
import os
from pathlib import Path

import pytest

from packer_assets_lab.realguest import qemu

BOUND = 2  # seconds the hanging stand-in is given under KVM
STAND_IN = r"""#!/bin/sh
# A stand-in QEMU (tests/lab/realguest/test_realguest_accel.py): records its argv, then behaves per accelerator.
echo "$*" >> "$STAND_IN_RUNS"
[ "$1" = --version ] && { echo "QEMU emulator version 0.0 (stand-in)"; exit 0; }
serial=
accel=
while [ $# -gt 0 ]; do
    case "$1" in
        -serial) serial=${2#file:}; shift ;;
        -accel) accel=${2%%,*}; shift ;;
    esac
    shift
done
if [ "$accel" = kvm ] && [ "$STAND_IN_KVM" = hangs ]; then exec sleep 600; fi
printf '[    0.000000] Linux version 6.1.0 (stand-in)\n[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n' > "$serial"
exit 0
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """PATH with the stand-in QEMU first, a writable stand-in /dev/kvm, a private cache; returns the runs file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "qemu-system-x86_64"
    script.write_text(STAND_IN)
    script.chmod(0o755)
    runs = tmp_path / "runs.txt"
    runs.touch()
    kvm = tmp_path / "kvm"
    kvm.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STAND_IN_RUNS", str(runs))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(qemu.ACCEL_ENV, raising=False)
    monkeypatch.setattr(qemu, "KVM_DEVICE", kvm)
    monkeypatch.setattr(qemu, "_CHOSEN", {})
    (tmp_path / "vmlinuz").write_bytes(b"a kernel")
    return runs


def probes(runs: Path) -> list[str]:
    return [line for line in runs.read_text().splitlines() if not line.startswith("--version")]


@pytest.mark.timeout(30)
def test_a_kvm_that_hangs_the_kernel_falls_back_to_tcg_within_the_bound_and_is_remembered(stand_in, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("STAND_IN_KVM", "hangs")
    logged = []
    assert qemu.detect_accel(tmp_path / "vmlinuz", bound=BOUND, log=logged.append) == "tcg"
    assert len(probes(stand_in)) == 1 and "-accel kvm" in probes(stand_in)[0]
    assert "-kernel" in probes(stand_in)[0] and "panic=-1" in probes(stand_in)[0]
    assert logged == [f"realguest: accelerator tcg: KVM probe failed: the kernel printed 0 bytes "
                      f"(markers seen: none) in {BOUND} s"]
    remembered = json.loads(qemu.accel_cache_path().read_text())
    assert [entry["accel"] for entry in remembered.values()] == ["tcg"]

    # Another process (a fresh log) on the same machine and kernel: no probe, the choice and why, remembered.
    monkeypatch.setattr(qemu, "_CHOSEN", {})
    logged.clear()
    assert qemu.detect_accel(tmp_path / "vmlinuz", bound=BOUND, log=logged.append) == "tcg"
    assert len(probes(stand_in)) == 1
    assert logged[0].startswith("realguest: accelerator tcg: KVM probe failed") and "remembered in" in logged[0]


@pytest.mark.timeout(30)
def test_a_kvm_that_runs_the_kernel_is_chosen_and_a_new_kernel_is_probed_again(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_KVM", "works")
    logged = []
    assert qemu.detect_accel(tmp_path / "vmlinuz", log=logged.append) == "kvm"
    assert logged == ["realguest: accelerator kvm: the kernel vmlinuz booted to its panic under KVM"]
    assert qemu.detect_accel(tmp_path / "vmlinuz", log=logged.append) == "kvm"
    assert len(probes(stand_in)) == 1 and len(logged) == 1  # remembered, logged once per process
    (tmp_path / "vmlinuz").write_bytes(b"another kernel")
    assert qemu.detect_accel(tmp_path / "vmlinuz", log=logged.append) == "kvm"
    assert len(probes(stand_in)) == 2


@pytest.mark.timeout(30)
def test_the_override_and_a_missing_kvm_device_skip_the_probe(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_KVM", "hangs")
    logged = []
    monkeypatch.setenv(qemu.ACCEL_ENV, "kvm")
    assert qemu.detect_accel(tmp_path / "vmlinuz", log=logged.append) == "kvm"
    monkeypatch.setenv(qemu.ACCEL_ENV, "TCG")
    assert qemu.detect_accel(tmp_path / "vmlinuz", log=logged.append) == "tcg"
    assert logged == [f"realguest: accelerator kvm: {qemu.ACCEL_ENV}=kvm", f"realguest: accelerator tcg: {qemu.ACCEL_ENV}=tcg"]
    monkeypatch.delenv(qemu.ACCEL_ENV)
    monkeypatch.setattr(qemu, "KVM_DEVICE", tmp_path / "no-kvm")
    assert qemu.detect_accel(tmp_path / "vmlinuz", log=logged.append) == "tcg"
    assert logged[-1] == f"realguest: accelerator tcg: no usable {tmp_path / 'no-kvm'}"
    assert probes(stand_in) == []


@pytest.mark.timeout(30)
def test_a_qemu_that_aborts_under_kvm_is_named_in_the_reason(stand_in, tmp_path, monkeypatch):
    script = Path(os.environ["PATH"].split(os.pathsep)[0]) / "qemu-system-x86_64"
    script.write_text(STAND_IN.replace('if [ "$accel" = kvm ]',
                                       'if [ "$accel" = kvm ]; then echo "kvm_buf_set_msrs: Assertion failed" >&2; '
                                       'exit 134; fi\nif false'))
    logged = []
    assert qemu.detect_accel(tmp_path / "vmlinuz", log=logged.append) == "tcg"
    assert logged == ["realguest: accelerator tcg: KVM probe failed: QEMU exited 134 before the kernel's banner "
                      "and panic (kvm_buf_set_msrs: Assertion failed)"]


def test_the_suite_lets_the_documented_override_through():
    import conftest

    assert "PACKER_ASSETS_QEMU_ACCEL" in conftest.PASSED_THROUGH
    assert qemu.ACCEL_ENV == "PACKER_ASSETS_QEMU_ACCEL"
