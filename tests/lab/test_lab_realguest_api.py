"""The lab's real-guest VMs (lab/packer_assets_lab/pve/realguest.py) where no QEMU is needed: which VMs are
real, the installer waiting for its boot command, and a boot command whose preseed cannot be fetched or
cannot be emulated (the VM stops, the reason is kept, no disk is left, nothing secret is said). The real boots are in
tests/lab/realguest/test_realguest_builds.py."""

import asyncio
import http.server
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support.realguest import INSTALL_BOUND, rendered_preseed, without_package

from packer_assets.config.settings import parse_guest_notes
from packer_assets_lab.console import console_path
from packer_assets_lab.pve import RealGuests
from packer_assets_lab.realguest.image import BaseImage
from packer_assets_lab.realguest.qemu import qemu_processes_under
from packer_assets_lab.stack import GUEST_NOTES, real_guest_note

pytestmark = pytest.mark.lab

NODE = "pve1"
ISO = "debian-12.iso"
KEYS = {" ": "spc", "\n": "ret", ".": "dot", "/": "slash", ":": "shift-semicolon", "=": "equal", "-": "minus",
        "_": "shift-minus"}


def typed(text: str) -> list[str]:
    return [KEYS.get(ch, ch) for ch in text]


@pytest.fixture
def real_pve(lab_pve_serving, tmp_path):
    """The lab's PVE with real guests for debian-12; the image is never booted here (paths only)."""
    pve = lab_pve_serving.pve
    image = BaseImage(tmp_path / "image", tmp_path / "image/disk.qcow2", tmp_path / "image/vmlinuz",
                      tmp_path / "image/initrd.img", "root=UUID=x ro", {})
    pve.enable_real_guests(RealGuests(images={"debian-12": image}, root=tmp_path / "realguest",
                                      ssh_ports={"debian-12": 1}))

    async def stage():
        pve.store_file("local", ISO, 4096)
    lab_pve_serving.call(stage())
    return pve


def create_and_start(api, vmid: int, name: str):
    api.nodes(NODE).qemu.post(vmid=vmid, name=name, scsi0="local-lvm:4", ide2=f"local:iso/{ISO},media=cdrom",
                              net0="virtio,bridge=vmbr0", agent="1")
    vm = api.nodes(NODE).qemu(vmid)
    vm.status.start.post()
    return vm


def wait_for(check, what: str, timeout: float = 300):  # bounds a failure only
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def serve_once(text: str) -> str:
    """A URL that serves `text` (what packer's HTTP server would)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/preseed.cfg"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_only_vms_of_marked_keys_are_real_and_an_installer_waits_for_its_boot_command(real_pve, pve_root):
    create_and_start(pve_root, 130, "ubuntu-2204-20261130120000")
    assert real_pve.real_guest_info(130) is None  # another key: the lab's answering guest
    vm = create_and_start(pve_root, 131, "debian-12-20261130120000")
    info = real_pve.real_guest_info(131)
    assert info["phase"] == "installer" and info["disk"] is None  # nothing boots before the boot command
    assert vm.status.current.get()["status"] == "running"  # the installer ISO "runs", as on PVE
    for key in typed("no url here\n"):
        vm.sendkey.put(key=key)
    assert real_pve.real_guest_info(131)["phase"] == "installer"
    # PVE's shutdown asks the guest (ACPI): an installer waiting at its prompt does not answer
    upid = vm.status.shutdown.post(timeout=1)
    assert pve_root.nodes(NODE).tasks(upid).status.get()["exitstatus"] == "VM quit/powerdown failed - got timeout"
    vm.status.shutdown.post(timeout=1, forceStop=1)
    assert vm.status.current.get()["status"] == "stopped"
    vm.delete()
    assert not Path(info["folder"]).exists()


@pytest.mark.parametrize(("preseed", "reason"), [
    (None, "installer emulation failed: <urlopen error"),  # nothing listens at the URL typed
    ("d-i passwd/root-login boolean false\nd-i passwd/username string debian\n"
     "d-i passwd/user-password password s3cr3t-pw\n",
     "installer emulation failed: preseed: passwd/user-password is a plain password"),
    ("d-i passwd/username\n", "installer emulation failed: preseed line 1: not 'owner question type value'"),
])
def test_a_preseed_that_cannot_be_fetched_or_emulated_stops_the_vm_and_says_why(real_pve, pve_root, capsys,
                                                                               preseed, reason):
    url = serve_once(preseed) if preseed is not None else f"http://127.0.0.1:{closed_port()}/preseed.cfg"
    vm = create_and_start(pve_root, 140, "debian-12-20261130120000")
    for key in ["esc", *typed(f"auto url={url} priority=critical\n")]:
        vm.sendkey.put(key=key)
    wait_for(lambda: real_pve.real_guest_info(140)["phase"] == "failed", "the installer never gave up")
    info = real_pve.real_guest_info(140)
    assert info["failure"].startswith(reason), info["failure"]
    assert vm.status.current.get()["status"] == "stopped" and info["disk"] is None
    assert not Path(info["folder"], "disk.qcow2").exists()
    assert (Path(info["folder"]) / "failure.txt").read_text().startswith(reason)
    # and in the VM's console log, where the project reads why a VM stopped before SSH
    console = console_path(real_pve.data_dir, 140).read_text()
    assert f"lab: VM 140 stopped: {reason}" in console and "s3cr3t-pw" not in console
    said = capsys.readouterr().out
    assert reason in said and "s3cr3t-pw" not in said + info["failure"]


def test_stopping_the_lab_kills_every_qemu_under_its_real_guests_folder(real_pve, tmp_path):
    """`lab down` (LabStack.stop) kills the real guests' QEMUs, also one no machine tracks (an installer
    boot in flight). A stand-in QEMU: a process named qemu-system-* whose argv names a disk there."""
    disk = tmp_path / "realguest/vm-150/disk.qcow2"
    disk.parent.mkdir(parents=True)
    disk.touch()
    stray = subprocess.Popen(["bash", "-c", f'exec -a qemu-system-x86_64 tail -f /dev/null "{disk}"'],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elsewhere = subprocess.Popen(["bash", "-c", f'exec -a qemu-system-x86_64 tail -f /dev/null "{tmp_path}/other"'],
                                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: qemu_processes_under(tmp_path / "realguest"), "the stand-in QEMU never showed")
        real_pve.stop_real_guests()
        assert stray.wait(timeout=120) == -9  # SIGKILL
        assert elsewhere.poll() is None  # a QEMU of no disk of this lab is not the lab's
    finally:
        for proc in (stray, elsewhere):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_real_guest_that_stops_leaves_its_serial_consoles_end_in_the_vms_console_log(real_pve, tmp_path):
    """The thread that sees a real guest's QEMU exit appends the end of its serial console (a stand-in QEMU
    that has exited: no boot needed)."""
    serial = tmp_path / "serial.log"
    serial.write_text("".join(f"boot line {n}\r\n" for n in range(200)) + "reboot: Power down\r\n")

    class Exited:
        serial_log = serial

        def wait_exit(self, timeout):
            return True

    machine = type("M", (), {"qemu": None})()
    vm = type("V", (), {"vmid": 141})()
    loop = asyncio.new_event_loop()
    real_pve._watch(vm, machine, Exited(), loop)
    loop.close()
    console = console_path(real_pve.data_dir, 141).read_text()
    assert f"lab: real guest VM 141 stopped: last lines of {serial}" in console
    assert "boot line 199\nreboot: Power down" in console and "boot line 100\n" not in console


@pytest.mark.realguest
@pytest.mark.timeout(1290)  # two installer boots (2 x INSTALL_BOUND) and the API's calls
def test_a_preseed_without_qemu_guest_agent_fails_the_install_at_its_late_command(base_image, lab_pve_serving,
                                                                                  pve_root, tmp_path):
    """Issue 26: the image has no qemu-guest-agent and nothing enables it but the template, so a preseed that
    drops it from pkgsel/include fails at its late_command (`in-target systemctl enable qemu-guest-agent ssh`):
    the VM stops, the reason names the command and the missing unit, in failure.txt and the console log."""
    pve = lab_pve_serving.pve
    pve.enable_real_guests(RealGuests(images={"debian-12": base_image}, root=tmp_path / "realguest",
                                      ssh_ports={"debian-12": 0}, install_timeout=INSTALL_BOUND))

    async def stage():
        pve.store_file("local", ISO, 4096)
    lab_pve_serving.call(stage())
    url = serve_once(without_package(rendered_preseed()[0], "qemu-guest-agent"))
    vm = create_and_start(pve_root, 142, "debian-12-20261207120000")
    for key in ["esc", *typed(f"auto url={url} priority=critical\n")]:
        vm.sendkey.put(key=key)
    wait_for(lambda: pve.real_guest_info(142)["phase"] == "failed", "the install never failed",
             timeout=1200)  # 2 x INSTALL_BOUND: the package layer's boot (when new), the install's
    info = pve.real_guest_info(142)
    assert "preseed/late_command failed (exit 1)" in info["failure"], info["failure"]
    assert "qemu-guest-agent.service" in info["failure"]  # systemctl's own words, from the installer's console
    assert vm.status.current.get()["status"] == "stopped" and info["disk"] is None
    console = console_path(pve.data_dir, 142).read_text()
    assert "lab: VM 142 stopped: installer emulation failed" in console and "qemu-guest-agent.service" in console
    assert qemu_processes_under(tmp_path) == []


def test_the_real_guest_note_names_the_image_recipe_and_is_a_valid_setting():
    """The proof and the registry name the system's image recipe beside the ISO: the note carries its sha256 and
    its Debian release, and parses as PACKER_ASSETS_GUEST_NOTES (whose items are `;`-separated)."""
    recipe, trixie = "0123456789abcdef" * 4, "fedcba9876543210" * 4
    notes = parse_guest_notes(f"debian-12={real_guest_note(recipe)};debian-13={real_guest_note(trixie, 'trixie')};"
                              f"*={GUEST_NOTES['simulated']}")
    assert notes["debian-12"].startswith("lab: real guest") and f"base image recipe sha256 {recipe}" in notes["debian-12"]
    assert "running Debian 12 (bookworm)" in notes["debian-12"]
    assert "running Debian 13 (trixie)" in notes["debian-13"] and f"recipe sha256 {trixie}" in notes["debian-13"]
    assert notes["*"] == GUEST_NOTES["simulated"]


def test_each_marked_key_runs_its_debian_releases_image(tmp_path, monkeypatch):
    """Issue 27: `--real-guest debian-12,debian-13` builds (or finds) one base image per suite, bookworm's and
    trixie's, and each key's VMs run its own; the lab's env notes each key's release and recipe."""
    from support.realguest import project_with_debian_13

    from packer_assets.catalog import load_catalog
    from packer_assets_lab import stack
    from packer_assets_lab.realguest import image as image_module

    project = project_with_debian_13(tmp_path / "project")
    catalog = load_catalog(project / "templates/catalog.yaml", env={}, project_dir=project)
    asked = []

    def fake_image(*, suite, progress):
        asked.append(suite)
        return BaseImage(tmp_path / suite, tmp_path / suite / "disk.qcow2", tmp_path / suite / "vmlinuz",
                         tmp_path / suite / "initrd.img", "root=UUID=x ro", {"suite": suite, "recipe_sha256": suite})
    monkeypatch.setattr(image_module, "ensure_base_image", fake_image)
    images = stack.real_guest_images(catalog, ("debian-13", "debian-12"), print)
    assert sorted(asked) == ["bookworm", "trixie"]
    assert {key: image.suite for key, image in images.items()} == {"debian-12": "bookworm", "debian-13": "trixie"}
    assert RealGuests(images=images, root=tmp_path, ssh_ports={}).keys == {"debian-12", "debian-13"}
    # the accelerator is probed on each image's kernel; kernels that disagree leave it to each VM's QEMU (None)
    from packer_assets_lab.realguest import qemu

    for choices, expected in (({"bookworm": "tcg", "trixie": "tcg"}, "tcg"), ({"bookworm": "kvm", "trixie": "tcg"}, None)):
        monkeypatch.setattr(qemu, "detect_accel", lambda kernel, log, choices=choices: choices[kernel.parent.name])
        assert stack.real_guest_accel(images, print) == expected


def test_a_failed_install_s_summary_is_the_lines_that_say_why_not_the_kernel_s_power_off():
    """The last line of a failed real install in the VM's console log, which a build stopped by its VM watch quotes:
    systemctl's and the installer's words, without colour codes, not the kernel's timestamped power-off lines."""
    from packer_assets_lab.pve.realguest import failure_summary

    reason = ("installer boot of /x/disk.qcow2: failed (exit 1) after 28 s; end of /x/serial.log:\n"
              "Executing: /lib/systemd/systemd-sysv-install enable ssh\n\n"
              "\x1b[0;1;31mFailed to enable unit, unit qemu-guest-agent.service does not exist.\x1b[0m\n\n"
              "packer-assets-installer: preseed/late_command failed (exit 1)\n"
              "packer-assets-installer: failed (exit 1)\n"
              "[   23.448965] sysrq: Power Off\n"
              "[   23.452138] I/O error, dev vda, sector 200256 op 0x0:(READ) flags 0x80700\n"
              "[   23.453194] reboot: Power down\n")
    assert failure_summary(reason) == (
        "Failed to enable unit, unit qemu-guest-agent.service does not exist. | "
        "packer-assets-installer: preseed/late_command failed (exit 1) | packer-assets-installer: failed (exit 1)")
    assert failure_summary("") == "no reason given"
