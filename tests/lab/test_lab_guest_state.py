"""Simulated guests whose state follows from what ran on them (lab/pve/guest_state, answer_files, guest_shell).

Each test installs from the family's RENDERED answer file (the shipped template, or an edit of it), runs the
shipped provisioners' commands as packer sends them (read from templates/*.pkr.hcl), clones, boots and asks
the smoke test's checks, at the state level (no PVE, no packer). The packer builds of the same are in
tests/lab/test_lab_sim_builds.py.
"""

import json
import re

import pytest

pytest.importorskip("packer_assets_lab", reason="needs the lab: pip install -e ./lab (make test installs it)")

from support import REPO

from packer_assets.catalog import load_catalog
from packer_assets.inspection import guest_checks, sbom
from packer_assets.render.engine import render_files
from packer_assets_lab.pve import guest_state as gs
from packer_assets_lab.pve.answer_files import Base, InstallFailed, install, install_windows
from packer_assets_lab.pve.guest_answers import Guest, answer
from packer_assets_lab.pve.guest_shell import Shell
from packer_assets_lab.pve.inventory import inventory_rows
from packer_assets_lab.pve.simguest import _powershell

pytestmark = pytest.mark.lab

KEYS = {"debian": "debian-12", "ubuntu": "ubuntu-2204", "rocky": "rocky-9", "windows": "windows-2022"}
# every shipped key of each family (the release's template, rendered for its key): the family's tests above by family,
# the pass/fail of the shipped template and of its generalize-less variant per key
RELEASES = {"debian-12": "debian", "debian-13": "debian", "ubuntu-2204": "ubuntu", "ubuntu-2604": "ubuntu",
            "rocky-9": "rocky", "rocky-10": "rocky", "windows-2022": "windows", "windows-2025": "windows"}
ANSWER = {"debian": ("preseed", "preseed.cfg"), "ubuntu": ("autoinstall", "user-data"), "rocky": ("kickstart", "ks.cfg")}
LINUX = ["debian", "ubuntu", "rocky"]
USER = "packer"
EXEC = ("chmod +x {path}; . /tmp/packer-ps-env-vars-1 && printf '%s\\n' \"$BUILD_SUDO_PASSWORD\" | "
        "sudo -S -p '' env -u BUILD_SUDO_PASSWORD sh -eu {path}")


def hcl_strings(block: str) -> list[str]:
    """The quoted strings of an HCL list (HCL string escapes are JSON's for what the templates hold)."""
    found = [json.loads(s) for s in re.findall(r'"(?:[^"\\]|\\.)*"', block)]
    return [s.replace("${var.ssh_username}", USER) for s in found]  # packer fills in the install user


def hcl_list(text: str, start: str) -> list[str]:
    """The strings of the list that starts at `start` (up to its closing bracket at the same depth)."""
    at = text.index(start) + len(start)
    depth, end = 1, at
    while depth:
        depth += {"[": 1, "]": -1}.get(text[end], 0)
        end += 1
    return hcl_strings(text[at : end - 1])


def provisioner_steps(family: str, template: str | None = None) -> list[list[str]]:
    """Each provisioner's inline commands, as the shipped template (or `template`'s text) gives them."""
    common = (REPO / "templates/common/common.pkr.hcl").read_text()
    locals_ = {name: hcl_list(common, f"{name} = [") for name in ("wait_cloud_init", "generalize_linux")}
    text = template if template is not None else (REPO / f"templates/{family}/{family}.pkr.hcl").read_text()
    steps = []
    for block in re.split(r'\n  provisioner "', text)[1:]:
        if "inline = concat(local.wait_cloud_init, [" in block:
            steps.append(locals_["wait_cloud_init"] + hcl_list(block, "inline = concat(local.wait_cloud_init, ["))
        elif "inline           = local.generalize_linux" in block:
            steps.append(locals_["generalize_linux"])
        else:
            steps.append(hcl_list(block, "inline = ["))
    return steps


@pytest.fixture(scope="module")
def rendered():
    """{family or key: {file name: text}} of the shipped templates, rendered as a build renders them (a family
    names its KEYS key)."""
    catalog = load_catalog(REPO / "templates/catalog.yaml", env={}, project_dir=REPO)
    out = {}
    for key in RELEASES:
        entry = catalog.get(key)
        files, _context = render_files(entry, {entry.install_user.password_env: "lab-test-pass"}, project_dir=REPO)
        out[key] = {name: data.decode() for name, data in files.items()}
    return out | {family: out[key] for family, key in KEYS.items()}


DEFAULT_VERSIONS = {"debian": "12", "ubuntu": "22.04", "rocky": "9.4", "windows": "2022"}


def os_version(key: str) -> str:
    """The OS version of a key's system (its expect_os, as the lab's ISO carries it)."""
    return load_catalog(REPO / "templates/catalog.yaml", env={}, project_dir=REPO).get(key).expected_os.version_id


def base(family: str, version: str | None = None) -> Base:
    rows = inventory_rows(family, version or DEFAULT_VERSIONS[family], 1)
    return Base(family, {row[0]: (row[1], row[2]) for row in rows})


def installed(family: str, files: dict[str, str], version: str | None = None) -> gs.GuestState:
    if family == "windows":
        return install_windows({k: v.encode() for k, v in files.items()}, base(family, version))
    kind, name = ANSWER[family]
    return install(kind, files[name], base(family, version))


def provision(state: gs.GuestState, steps: list[list[str]]) -> list[tuple[int, str]]:
    """Run each step as packer's shell provisioner does (an uploaded script, sh -eu through sudo)."""
    results = []
    for number, lines in enumerate(steps):
        path = f"/tmp/script_{number}.sh"
        if state.windows:
            path = f"c:/Windows/Temp/script-{number}.ps1"
            status, out = _powershell(state, "powershell \"& { &'" + path + "'; exit $LastExitCode }\"",
                                      {path: "\n".join(lines)}.get)
            results.append((status, out.decode()))
        else:
            shell = Shell(state, read_file={path: "\n".join(lines) + "\n"}.get, version_of=base(state.family).version_of)
            results.append((shell.run(EXEC.format(path=path)), "".join(shell.out)))
        if results[-1][0] != 0:
            break
    return results


def built_template(family: str, files: dict[str, str], steps: list[list[str]], version: str | None = None
                   ) -> gs.GuestState:
    """Install (of OS `version`, default the family's first), the first boot (stamp 1), the provisioners: the
    template's disk."""
    state = gs.boot(installed(family, files, version), 1, "iid-build")
    results = provision(state, steps)
    assert all(status == 0 for status, _ in results), results
    return state


def smoke(template: gs.GuestState, stamp: int = 2) -> dict[str, tuple[int, str]]:
    """A clone's first boot at `stamp`, and the family's agent checks' (exit, output) by name."""
    clone = gs.boot(gs.clone(template), stamp, "iid-clone")
    guest = Guest(family=clone.family, os_version="12", release=1, vmid=200, boot=stamp,
                  host_keys=("ssh-ed25519 AAAAlab",), state=clone)
    values = {"install_user": USER, "ci_user": "smoke"}
    found = {}
    for check in guest_checks.FAMILY_CHECKS[clone.family]:
        if check.via == "agent":
            said = answer(check.command(values), guest)
            found[check.name] = (said.exitcode, said.out + said.err)
    said = answer(list(sbom.inventory_command(clone.family)), guest)
    found["inventory"] = (said.exitcode, said.out)
    return found


def without(steps: list[list[str]], line: str) -> list[list[str]]:
    return [[x for x in step if x != line and not x.startswith(line)] for step in steps]


# ---- the shipped templates pass; each duty removed fails its check --------------------------------


@pytest.mark.parametrize("key", list(RELEASES))
def test_the_shipped_template_passes_every_check(rendered, key):
    family = RELEASES[key]
    checks = smoke(built_template(family, rendered[key], provisioner_steps(family), os_version(key)))
    for name, check in ((c.name, c) for c in guest_checks.FAMILY_CHECKS[family] if c.via == "agent"):
        passed, why = check.judge(checks[name][0], checks[name][1], {"install_user": re.escape(USER)})
        assert passed, f"{name}: {why}"


@pytest.mark.parametrize("key", list(RELEASES))
def test_without_the_generalize_step_fresh_identity_fails(rendered, key):
    family = RELEASES[key]
    steps = provisioner_steps(family)[:-1]  # every template's last provisioner generalizes
    status, said = smoke(built_template(family, rendered[key], steps, os_version(key)))["fresh_identity"]
    assert status == 1
    assert ("sysprep /generalize never ran" if family == "windows" else "dates from before this boot") in said


@pytest.mark.parametrize("family", LINUX)
def test_without_passwd_l_password_locked_fails(rendered, family):
    steps = without(provisioner_steps(family), "passwd -l")
    status, said = smoke(built_template(family, rendered[family], steps))["password_locked"]
    assert (status, said) == (1, f"{USER} can still log in with the install password: the template was not generalized\n")


def test_an_install_user_that_does_not_exist_fails_password_locked(rendered):
    # the answer file names another user: passwd -l of the catalog's user fails the build as on a real guest
    files = dict(rendered["debian"], **{"preseed.cfg": rendered["debian"]["preseed.cfg"].replace(
        f"passwd/username string {USER}", "passwd/username string someone")})
    state = gs.boot(installed("debian", files), 1, "iid-build")
    results = provision(state, provisioner_steps("debian"))
    assert results[-1] == (1, f"passwd: user '{USER}' does not exist\n")
    status, said = smoke(state)["password_locked"]
    assert status == 1 and f"user {USER} does not exist" in said


# ---- qemu-guest-agent dropped from the answer file -----------------------------------------------


def test_ubuntu_without_the_agent_package_fails_at_the_late_command(rendered):
    files = dict(rendered["ubuntu"], **{"user-data": rendered["ubuntu"]["user-data"].replace("    - qemu-guest-agent\n", "")})
    with pytest.raises(InstallFailed, match="Failed to enable unit: Unit file qemu-guest-agent.service does not exist"):
        installed("ubuntu", files)


def test_rocky_without_the_agent_package_fails_at_post_erroronfail(rendered):
    ks = rendered["rocky"]["ks.cfg"]
    files = dict(rendered["rocky"], **{"ks.cfg": ks.replace("openssh-server\nqemu-guest-agent\n", "openssh-server\n")})
    with pytest.raises(InstallFailed, match=r"%post --erroronfail.*Unit file qemu-guest-agent.service does not exist"):
        installed("rocky", files)


def test_debian_without_the_agent_package_fails_at_the_late_command_or_at_the_template_s_check(rendered):
    """The preseed's late_command joins its steps with && (d-i counts only the last status): the failed enable
    stops the install. A preseed whose late_command does not enable the agent gets through the install, and the
    template's first provisioner then fails the build by name; the agent never answers."""
    preseed = rendered["debian"]["preseed.cfg"].replace(" qemu-guest-agent cloud-init", " cloud-init")
    with pytest.raises(InstallFailed, match="Unit file qemu-guest-agent.service does not exist"):
        installed("debian", dict(rendered["debian"], **{"preseed.cfg": preseed}))
    quiet = preseed.replace("in-target systemctl enable qemu-guest-agent ssh && ", "")
    files = dict(rendered["debian"], **{"preseed.cfg": quiet})
    assert not installed("debian", files).has("qemu-guest-agent")
    state = gs.boot(installed("debian", files), 1, "iid-build")
    results = provision(state, provisioner_steps("debian"))
    assert results[0][0] == 1, results
    assert "qemu-guest-agent or cloud-init is not installed: the preseed (pkgsel/include) must install both" in (
        results[0][1]), results
    assert not state.agent_runs()


def test_windows_without_the_guest_tools_fails_at_the_provisioner_and_has_no_agent(rendered):
    script = "\n".join(line for line in rendered["windows"]["firstlogon.ps1"].splitlines()
                       if "Start-Process" not in line)
    state = gs.boot(installed("windows", dict(rendered["windows"], **{"firstlogon.ps1": script})), 1, "iid-build")
    assert not state.agent_runs() and "QEMU guest agent" not in state.packages
    assert provision(state, provisioner_steps("windows"))[0] == (1, "the QEMU guest agent service (QEMU-GA) is not running\r\n")


def test_an_agent_installed_but_not_enabled_on_rocky_does_not_run():
    state = gs.GuestState("rocky", packages={"qemu-guest-agent": ("1", "x86_64")})
    assert not state.agent_runs()
    state.enabled.add("qemu-guest-agent")
    assert state.agent_runs()


# ---- the SBOM lists what the answer file added ---------------------------------------------------


ADD_JQ = {
    "debian": ("preseed.cfg", "pkgsel/include string openssh-server", "pkgsel/include string jq openssh-server"),
    "ubuntu": ("user-data", "  packages:\n", "  packages:\n    - jq\n"),
    "rocky": ("ks.cfg", "%packages\n", "%packages\njq\n"),
}


@pytest.mark.parametrize("family", LINUX)
def test_the_inventory_lists_what_the_answer_file_added(rendered, family):
    name, old, new = ADD_JQ[family]
    plain = smoke(built_template(family, rendered[family], provisioner_steps(family)))["inventory"][1]
    files = dict(rendered[family], **{name: rendered[family][name].replace(old, new)})
    listed = smoke(built_template(family, files, provisioner_steps(family)))["inventory"][1]
    assert "jq" not in plain and re.search(r"(^|\t)jq\t0\.0-lab-synthetic\t", listed, re.M), listed
    assert "qemu-guest-agent" in plain  # added by the shipped answer file, with the table's version


def test_windows_inventory_lists_the_guest_tools_only_when_installed(rendered):
    plain = smoke(built_template("windows", rendered["windows"], provisioner_steps("windows")))["inventory"][1]
    names = {p["DisplayName"] for p in json.loads(plain)["programs"]}
    assert {"QEMU guest agent", "Virtio-win-guest-tools"} <= names
    bare = gs.boot(installed("windows", {"Autounattend.xml": rendered["windows"]["Autounattend.xml"]}), 1, "i")
    assert "QEMU guest agent" not in bare.packages


# ---- boots, clones and the interpreter -----------------------------------------------------------


def test_a_boot_makes_identity_only_where_it_is_missing():
    state = gs.GuestState("debian", packages={"openssh-server": ("1", "amd64")})
    first = gs.boot(state, 3, "iid-a")
    assert first.machine_id and first.machine_id_boot == 3 and first.host_keys_boot == 3
    again = gs.boot(first, 5, "iid-a")
    assert (again.machine_id, again.machine_id_boot, again.host_keys_boot) == (first.machine_id, 3, 3)
    assert "dates from before this boot" in again.identity_is_fresh()
    with_ci = gs.GuestState("debian", packages={"openssh-server": ("1", "amd64"), "cloud-init": ("1", "all")})
    booted = gs.boot(gs.boot(with_ci, 1, "iid-a"), 2, "iid-b")  # a new instance: cloud-init remakes host keys
    assert booted.host_keys_boot == 2 and booted.machine_id_boot == 1


@pytest.mark.parametrize(("script", "status", "effect"), [
    ("set -e\nfalse\npasswd -l packer", 1, "set"),  # set -e: stops at false
    ("false || passwd -l packer", 0, "locked"),
    ("false && passwd -l packer; true", 0, "set"),
    ("if [ -f /etc/machine-id ]; then passwd -l packer; fi", 0, "locked"),
    ("{ false; passwd -l packer; }", 0, "locked"),  # no set -e
    ("# a comment\n passwd -l packer # trailing", 0, "locked"),
    ("usermod -L packer", 0, "locked"),
])
def test_the_shell_interpreter(script, status, effect):
    state = gs.GuestState("debian", users={USER: gs.SET})
    assert Shell(state).run(script) == status
    assert state.users[USER] == effect


def test_d_i_paths_outside_target_are_the_installer_s_own():
    state = gs.GuestState("debian", machine_id="abc", host_keys_boot=0)
    Shell(state, root="/target").run("truncate -s 0 /etc/machine-id; rm -f /etc/ssh/ssh_host_*")
    assert state.machine_id == "abc" and state.host_keys_boot == 0
    Shell(state, root="/target").run("in-target truncate -s 0 /etc/machine-id; rm -f /target/etc/ssh/ssh_host_*")
    assert state.machine_id == "" and state.host_keys_boot is None
    state.machine_id = "abc"
    Shell(state).run(": > /etc/machine-id")
    assert state.machine_id == ""


def test_output_sent_to_a_file_is_not_printed_and_a_failure_never_shows_a_hash():
    state = gs.GuestState("debian")
    shell = Shell(state)
    shell.run("printf '%s\\n' 'ssh-ed25519 AAAA k' > /target/home/u/.ssh/authorized_keys; echo shown")
    assert shell.out == ["shown\n"]
    late = "d-i preseed/late_command string echo '$6$salt$secretlookinghash'; false\n"
    with pytest.raises(InstallFailed) as failed:
        install("preseed", late, base("debian"))
    assert "secretlookinghash" not in str(failed.value) and "<hash>" in str(failed.value)


def test_a_grub_command_line_boots_the_installer_at_its_boot_line_not_at_the_url_line():
    """Ubuntu's boot command opens GRUB's command line with `c` (which types nothing there), then `linux ...`
    naming the answer file, `initrd ...`, `boot`: the installer starts (and may fail, powering off) only at
    `boot`, so packer's remaining keys still reach a running VM."""
    from packer_assets_lab.pve.answer_files import boots_now

    url_line = "clinux /casper/vmlinuz --- autoinstall ds=nocloud-net;s=http://10.0.2.2:8000/\n"
    assert not boots_now(url_line)
    assert not boots_now(url_line + "initrd /casper/initrd\n")
    assert boots_now(url_line + "initrd /casper/initrd\nboot\n")
    assert boots_now(" auto url=http://10.0.2.2:8000/preseed.cfg priority=critical\n")  # isolinux: at once
