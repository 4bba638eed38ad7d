"""A real-guest build of debian-12, timed by phase (issue 16, item 7).

    .venv/bin/python bench/realguest_build.py [--key debian-12]

The lab runs in this process with a real guest for the key (`lab up --real-guest`: QEMU, KVM where it
really runs a guest, else TCG); the build is what `make demo-real` runs, a fresh
`dagster asset materialize` process. A thread watches the lab (the build VM's and the smoke clone's
machines) and the build log, and splits the wall time into:

  image prep      the base image (0 s when cached) + the installer emulation (the preseed fetched from
                  packer's HTTP server, the disk copied, the installer boot)
  boot            the installed system's first boot, until packer's SSH login
  provisioners    packer's provisioners and generalize step, until the VM is off
  clone + smoke   the smoke test's clone: created, booted (cloud-init), checked, destroyed
  orchestration   the rest: Dagster's process and steps, rendering and validators, ISO staging, packer's
                  own start and API calls, template conversion, promotion, the proof

and prints each with its share. Figures depend on the machine (TCG on a busy 2-core machine is slow).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _lab import BIN, REPO, BenchLab, dagster_home  # noqa: E402

ASSETS = "staged_iso,unattended_files,template,template_proof"


class Watch(threading.Thread):
    """First time each event was seen, polling the lab's state and the build log every 0.2 s."""

    def __init__(self, lab: BenchLab, key: str, started: float):
        super().__init__(daemon=True)
        self.lab, self.key, self.started = lab, key, started
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def mark(self, event: str) -> None:
        self.seen.setdefault(event, time.monotonic() - self.started)

    def run(self) -> None:
        while not self.done.wait(0.2):
            pve = self.lab.pve
            for vm in list(pve.vms):
                info = pve.real_guest_info(vm.vmid)
                if info is None:
                    continue
                role = "clone" if "-smoke-" in vm.name else "build"
                self.mark(f"{role} created")
                if info["phase"] in ("installing", "running") and role == "build":
                    self.mark(f"build {info['phase']}")
                if info["phase"] == "running" and role == "clone":
                    self.mark("clone running")
                if role == "build" and "build running" in self.seen and info["phase"] == "off":
                    self.mark("build off")
            if "clone created" in self.seen and not any("-smoke-" in vm.name for vm in pve.vms):
                self.mark("clone gone")
            for log in self.lab.root.glob(f"output/logs/packer/builds/{self.key}/*/*.log"):
                if "ssh connected" not in self.seen and "Connected to SSH!" in log.read_text(errors="replace"):
                    self.mark("ssh connected")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", default="debian-12")
    args = parser.parse_args()
    from packer_assets_lab.realguest.image import ensure_base_image
    from packer_assets_lab.realguest.qemu import detect_accel

    started = time.monotonic()
    image = ensure_base_image(progress=lambda line: print(line, flush=True))
    image_seconds = time.monotonic() - started
    with tempfile.TemporaryDirectory(prefix="bench-realguest-") as tmp:
        lab = BenchLab.start(Path(tmp), real_guests=(args.key,))
        try:
            home = dagster_home(Path(tmp) / "dagster_home")
            watch = Watch(lab, args.key, time.monotonic())
            watch.start()
            proc = subprocess.run([str(BIN / "dagster"), "asset", "materialize", "-m", "packer_assets.definitions",
                                   "--select", ASSETS, "--partition", args.key], env=lab.process_env(home),
                                  cwd=REPO, capture_output=True, text=True, check=False)
            total = time.monotonic() - watch.started
            watch.done.set()
            watch.join()
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                print(f"the build failed (exit {proc.returncode}); no figures")
                return 1
            build_vm = next(v for v in lab.pve.vms if v.template and v.name.startswith(f"{args.key}-"))
            install = (lab.pve.real_guest_info(build_vm.vmid)["install"] or {}).get("seconds", 0.0)
        finally:
            lab.stop()
    s = watch.seen
    need = ["build installing", "build running", "ssh connected", "build off", "clone created", "clone gone"]
    missing = [e for e in need if e not in s]
    if missing:
        print(f"events not seen: {missing} (seen: {s}); no split")
        return 1
    phases = {
        "image prep": image_seconds + (s["build running"] - s["build installing"]),
        "boot": s["ssh connected"] - s["build running"],
        "provisioners": s["build off"] - s["ssh connected"],
        "clone + smoke": s["clone gone"] - s["clone created"],
    }
    phases["orchestration"] = total + image_seconds - sum(phases.values())
    print(f"real-guest build of {args.key} ({detect_accel(image.kernel)}; base image {image.folder.name[:12]}, "
          f"{'built' if image_seconds > 5 else 'cached'}): {total + image_seconds:.0f} s in all")
    for name, seconds in phases.items():
        print(f"  {name:<14} {seconds:7.1f} s  {100 * seconds / (total + image_seconds):5.1f} %")
    print(f"  (installer emulation inside image prep: {install:.1f} s; the installer boot's own timer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
