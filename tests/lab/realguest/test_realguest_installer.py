"""Installer emulation: the preseed's answers applied to a clone of the base image before its first boot.

The unit tests need no QEMU: the preseed URL a boot command typed, debconf's preseed syntax, and the
payload made from the project's own rendered Debian preseed. The `realguest` tests boot the cached base
image twice (installer boot, then first boot) for the success case and once for a failing late_command;
each boot is a minute or two under TCG. Times are printed (pytest -s) for docs/realguest.md.
"""

import base64
import re
import shlex
import subprocess
import time
from pathlib import Path

import paramiko
import pytest
from support.realguest import PASSWORD, rendered_preseed

from packer_assets.render.passwords import verify_sha512_crypt
from packer_assets_lab.realguest.image import (
    CONFIGURE_SCRIPT,
    INSTALLER_FW_CFG_NAME,
    INSTALLER_INIT,
    INSTALLER_INIT_PATH,
)
from packer_assets_lab.realguest.installer import (
    InstallBoot,
    InstallerError,
    emulate_install,
    parse_preseed,
    plan_install,
    preseed_url,
)
from packer_assets_lab.realguest.qemu import (
    QemuVm,
    VmSpec,
    linked_clone_disk,
    qemu_processes_under,
)

TYPED = ("<esc><wait>auto url=http://127.0.0.1:8123/preseed.cfg priority=critical locale=en_US.UTF-8 "
         "keyboard-configuration/xkb-keymap=us\n")


def test_preseed_url_is_the_url_argument_of_the_last_line_entered():
    assert preseed_url(TYPED) == "http://127.0.0.1:8123/preseed.cfg"
    assert preseed_url("") is None and preseed_url("<esc>install auto\n") is None
    assert preseed_url("auto url=http://a/p.cfg") is None  # typed, never entered
    two = "auto url=http://first/p.cfg\n<wait>auto preseed/url=http://second/p.cfg priority=critical\nauto url=http://x/"
    assert preseed_url(two) == "http://second/p.cfg"
    assert preseed_url("auto url=http://a/p.cfg\nboot\n") is None  # the last line entered names none


# ------------------------------------------------------------------ debconf syntax


def test_parse_preseed_reads_debconf_syntax():
    text = ("# a comment\n\n   # an indented comment\n"
            "d-i netcfg/hostname string first\n"
            "d-i preseed/late_command string echo one; \\\n  echo two\n"
            "d-i mirror/http/proxy string\n"
            "d-i pkgsel/include string  two  spaces \n"
            "d-i netcfg/hostname seen true\n"  # a flag, not an answer
            "d-i netcfg/hostname string second\r\n")
    answers = parse_preseed(text)
    assert answers == {"netcfg/hostname": "second", "preseed/late_command": "echo one;   echo two",
                       "mirror/http/proxy": "", "pkgsel/include": " two  spaces "}


@pytest.mark.parametrize("line, message", [("d-i passwd/username\n", "line 3"),
                                            ("d-i pkgsel/include strnig vim\n", "line 3.*unknown type 'strnig'")])
def test_a_malformed_preseed_line_is_named(line, message):
    with pytest.raises(InstallerError, match=message):
        parse_preseed("# header\nd-i time/zone string Etc/UTC\n" + line)


# ------------------------------------------------------------------ the payload


def test_the_payload_applies_the_rendered_preseed_and_runs_its_late_command_verbatim(tmp_path):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey it's \"mine\" $HOME"
    text, context = rendered_preseed(keys=(key,))
    answers = parse_preseed(text)
    plan = plan_install(answers)
    script = plan.script
    assert script.startswith("#!/bin/sh\n") and "set -eu" in script
    words = shlex.split(script, comments=True)
    assert context["password_hash"] in words and verify_sha512_crypt(PASSWORD, context["password_hash"])
    assert PASSWORD not in script
    assert words[words.index("useradd"):words.index("useradd") + 10] == [
        "useradd", "-m", "-s", "/bin/bash", "-c", "packer", "-p", context["password_hash"], "packer", "groups="]
    assert "debian-12" in words and "debian-12.localdomain\tdebian-12" in words  # /etc/hostname, /etc/hosts
    assert "for group in audio cdrom dip floppy video plugdev netdev sudo; do" in script  # root-login false: sudo
    late = answers["preseed/late_command"]
    assert f"late_command={late}" in words and key in shlex.split(late)  # verbatim, the key one word
    assert "passwd -l root" in script and "in-target" in script
    # tasksel's ssh-server task, then pkgsel/include, from the mirror through the lab's proxy, with Recommends
    # (in a boot of their own, whose disk is cached as a layer per selection: layers.py)
    packages = plan.packages_script.splitlines()
    install = next(line for line in packages if line.startswith("apt_get install"))
    assert "--no-install-recommends" not in install
    assert packages[packages.index(install) + 1].split()[:4] == ["openssh-server", "qemu-guest-agent", "cloud-init",
                                                                  "sudo"]
    assert "Acquire::http::Proxy=http://10.0.2.100:3142/" in plan.packages_script and "policy-rc.d" in plan.packages_script
    assert plan.selection.packages == ("openssh-server", "qemu-guest-agent", "cloud-init", "sudo")
    assert "apt-get" not in script and "ssh-keygen -A" in script  # this install's own host keys
    assert PASSWORD not in plan.packages_script and context["password_hash"] not in plan.packages_script
    for number, text in enumerate((script, plan.packages_script)):
        payload = tmp_path / f"payload-{number}.sh"
        payload.write_text(text)
        check = subprocess.run(["sh", "-n", str(payload)], check=False, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    ignored = {line.split(":")[0] for line in plan.ignored}
    assert {"partman-auto/method", "grub-installer/bootdev", "mirror/http/hostname", "tasksel/first",
            "pkgsel/upgrade", "clock-setup/ntp"} <= ignored
    applied = {line.split(":")[0] for line in plan.applied}
    assert {"netcfg/hostname", "time/zone", "debian-installer/locale", "passwd/username", "tasksel/first",
            "passwd/user-password-crypted", "pkgsel/include", "preseed/late_command"} <= applied
    # tasksel/first is both: its ssh-server task is installed, its standard task is not (and says why)
    assert applied & ignored == {"tasksel/first"}
    assert "tasksel/first: ssh-server: openssh-server from the mirror" in plan.applied
    assert any(line.startswith("tasksel/first: standard: ") and "TCG" in line for line in plan.ignored)
    assert context["password_hash"] not in "".join(plan.applied + plan.ignored)


def test_install_recommends_false_is_honoured_and_a_bad_package_name_is_named():
    text = rendered_preseed()[0] + "d-i base-installer/install-recommends boolean false\n"
    plan = plan_install(parse_preseed(text))
    assert "--no-install-recommends" in plan.packages_script and not plan.selection.recommends
    assert "base-installer/install-recommends: false (d-i's default: true)" in plan.applied
    with pytest.raises(InstallerError, match=re.escape("pkgsel/include: 'Bad;name' is not a package name")):
        plan_install(parse_preseed(text + "d-i pkgsel/include string sudo Bad;name\n"))


@pytest.mark.parametrize("question", ["passwd/username", "passwd/user-password-crypted"])
def test_a_missing_required_answer_is_named(question):
    answers = parse_preseed(rendered_preseed()[0])
    del answers[question]
    with pytest.raises(InstallerError, match=re.escape(question)):
        plan_install(answers)


def test_unsafe_answers_are_refused_and_odd_ones_stay_quoted():
    answers = parse_preseed(rendered_preseed()[0])
    for question, value in (("passwd/username", "root; reboot"), ("netcfg/hostname", "a b"),
                            ("time/zone", "../../etc/passwd"), ("passwd/user-password", "plain")):
        with pytest.raises(InstallerError, match=re.escape(question)):
            plan_install({**answers, question: value})
    script = plan_install({**answers, "passwd/user-fullname": "O'Brien $(reboot) `x`"}).script
    assert "O'Brien $(reboot) `x`" in shlex.split(script, comments=True)


def test_the_payload_reaches_qemu_as_a_fw_cfg_file(tmp_path):
    payload = tmp_path / "dir,with,commas" / "payload.sh"
    spec = VmSpec("installer", Path("/d.qcow2"), Path("/k"), Path("/i"), "ro", fw_cfg=[(INSTALLER_FW_CFG_NAME, payload)],
                  no_reboot=True)
    argv = QemuVm(spec, tmp_path).argv("tcg")
    assert argv[argv.index("-fw_cfg") + 1] == f"name={INSTALLER_FW_CFG_NAME},file={tmp_path}/dir,,with,,commas/payload.sh"
    assert "-no-reboot" in argv


def test_the_image_ships_the_installer_init():
    assert INSTALLER_INIT in CONFIGURE_SCRIPT and f"cat > {INSTALLER_INIT_PATH} <<" in CONFIGURE_SCRIPT
    assert f"/sys/firmware/qemu_fw_cfg/by_name/{INSTALLER_FW_CFG_NAME}/raw" in INSTALLER_INIT
    check = subprocess.run(["sh", "-n"], input=INSTALLER_INIT, check=False, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# ------------------------------------------------------------------ real boots


def guest(agent, *argv: str) -> str:
    result = agent.exec(list(argv), timeout=60)
    assert result.exitcode == 0, (argv, result)
    return result.stdout.decode()


def password_login(port: int, user: str, password: str, host_key: str, deadline: float) -> str:
    """`id -un; id -Gn` over SSH with a password (the preseed's hash's), the host key pinned to the guest's."""
    kind, blob = host_key.split()[:2]
    pinned = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    while True:  # slirp accepts at once; the handshake fails until sshd is up
        transport = paramiko.Transport(("127.0.0.1", port))
        transport.get_security_options().key_types = [kind]
        try:
            transport.start_client(timeout=60)
            break
        except (OSError, EOFError, paramiko.SSHException):
            transport.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(3)
    try:
        assert transport.get_remote_server_key() == pinned, "the guest's SSH host key is not the one the agent read"
        transport.auth_password(user, password)
        channel = transport.open_session()
        channel.exec_command("id -un; id -Gn")
        return channel.makefile("rb").read().decode()
    finally:
        transport.close()


@pytest.mark.realguest
@pytest.mark.timeout(2760)  # the session's install when first (2 x INSTALL_BOUND), then its own waits: 1533 s
def test_an_emulated_install_then_a_first_boot(installed, tmp_path):
    report, context, key = installed.report, installed.context, installed.key
    assert "packer-assets-installer: ok" in report.serial_log.read_text(errors="replace")
    assert any(line.startswith("preseed/late_command") for line in report.applied)
    assert any(line.startswith("partman-auto/method") for line in report.ignored)
    assert report.packages.startswith("pkgsel: layer ")
    assert (report.serial_log.parent / "installer-payload.sh").stat().st_mode & 0o777 == 0o600
    assert qemu_processes_under(installed.disk.parent) == []

    started = time.monotonic()
    disk = linked_clone_disk(installed.disk, tmp_path / "vm-9404-disk-0.qcow2")
    spec = VmSpec("rg-installed", disk, installed.image.kernel, installed.image.initrd, installed.image.cmdline)
    with QemuVm(spec, tmp_path / "first-boot") as vm:
        agent = vm.agent()
        agent.wait_ready(timeout=300)
        at_agent = time.monotonic() - started
        # what tasksel and pkgsel/include asked for came from the mirror; the image had none of it
        for package in ("openssh-server", "qemu-guest-agent", "cloud-init", "sudo"):
            assert guest(agent, "dpkg-query", "-W", "-f", "${db:Status-Status}", package) == "installed"
        assert guest(agent, "cat", "/etc/hostname").strip() == "debian-12"
        assert "127.0.1.1\tdebian-12.localdomain\tdebian-12" in guest(agent, "cat", "/etc/hosts")
        assert "sudo" in guest(agent, "id", "-Gn", "debian").split()
        shadow = dict(line.split(":")[:2] for line in guest(agent, "cat", "/etc/shadow").splitlines())
        assert shadow["debian"] == context["password_hash"] and shadow["root"].startswith("!")
        assert guest(agent, "cat", "/home/debian/.ssh/authorized_keys").split("\n")[0] == key.public
        assert guest(agent, "stat", "-c", "%U %a", "/home/debian/.ssh/authorized_keys").split() == ["debian", "600"]
        machine_id = guest(agent, "cat", "/etc/machine-id").strip()
        assert machine_id == "" or re.fullmatch(r"[0-9a-f]{32}", machine_id)  # emptied, then this boot's own
        assert guest(agent, "cat", "/etc/default/locale").strip() == "LANG=en_US.UTF-8"
        assert not guest(agent, "sh", "-c", "ls -d /target 2>/dev/null || true").strip()  # unmounted and removed
        assert not guest(agent, "sh", "-c", "ls /usr/sbin/policy-rc.d 2>/dev/null || true").strip()
        host_key = guest(agent, "cat", "/etc/ssh/ssh_host_ed25519_key.pub")
        login = password_login(vm.ssh_port, "debian", PASSWORD, host_key, deadline=time.monotonic() + 300)
        at_ssh = time.monotonic() - started
        assert login.split("\n")[0] == "debian" and "sudo" in login.split("\n")[1].split()
        assert vm.shutdown(timeout=120)
    print(f"first boot: agent {at_agent:.0f} s, SSH password login {at_ssh:.0f} s")
    assert qemu_processes_under(tmp_path) == []


@pytest.mark.realguest
@pytest.mark.timeout(1290)  # the session's install when first (2 x INSTALL_BOUND), then a 2 s one
def test_an_installer_boot_that_runs_out_of_time_is_killed(installed, tmp_path):
    with pytest.raises(InstallerError, match="no result after 2 s"):
        emulate_install(installed.image, tmp_path / "vm-9403-disk-0.qcow2", rendered_preseed()[0],
                        tmp_path / "install", InstallBoot(timeout=2))
    assert qemu_processes_under(tmp_path) == []
