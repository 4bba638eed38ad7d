"""Packer version detection (real 1.6.6 and fake binaries), capabilities, and the login environment."""

from __future__ import annotations

import os
import time

import pytest
from support.packer import PACKER, fake_packer

from packer_assets.packer import version as v
from packer_assets.packer.version import (
    BuildCredentials,
    PackerAuthError,
    PackerVersionError,
    auth_env,
    capabilities_for,
    detect_packer,
    login_mode,
    parse_packer_version,
    parse_plugin_version,
)

needs_packer = pytest.mark.packer
TOKEN = BuildCredentials(token_id="automation@pve!packer", token_secret="tok-5ecret-0123")
PASSWORD = BuildCredentials(user="automation@pve", password="pw-5ecret-4567")
BOTH = BuildCredentials("automation@pve!packer", "tok-5ecret-0123", "automation@pve", "pw-5ecret-4567")


@pytest.fixture(autouse=True)
def fresh_cache():
    v.clear_cache()
    yield
    v.clear_cache()


def fake(tmp_path, version_text, plugins=None, name="packer"):
    """A packer script that logs each call (and its environment) and prints the given answers."""
    plugins_part = (f'  plugins) printf "%s\\n" "{plugins}";;\n' if plugins is not None
                    else '  plugins) echo "Usage: packer [--version]" >&2; exit 1;;\n')
    body = (f'echo "$*" >> "{tmp_path}/calls.log"\nenv > "{tmp_path}/env.log"\n'
            f'case "$1" in\n  version) printf "%s\\n" "{version_text}";;\n{plugins_part}esac\n')
    return fake_packer(tmp_path / "bin", body, name=name)


def calls(tmp_path):
    path = tmp_path / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------ the real binary


@needs_packer
def test_the_real_debian_packer_is_1_6_6_with_its_limits():
    caps = detect_packer(PACKER)
    assert caps.packer_version == "1.6.6" and caps.plugin_version is None and caps.plugin_source == "builtin"
    assert (caps.token_auth, caps.boot_iso_block, caps.additional_isos, caps.efi_tpm_blocks, caps.firmware,
            caps.tags) == (False,) * 6
    assert caps.needs_storage_pool_type and not caps.needs_init
    assert caps.binary == os.path.realpath(PACKER)
    assert caps.describe() == "packer 1.6.6 (builtin proxmox builder)"
    assert detect_packer(PACKER) is caps  # cached


# ------------------------------------------------------------------ fakes


def test_current_packer_with_an_installed_plugin(tmp_path):
    path = "/root/.config/packer/plugins/github.com/hashicorp/proxmox/packer-plugin-proxmox_v{0}_x5.0_linux_amd64"
    script = fake(tmp_path, "Packer v1.11.2", plugins="\\n".join(path.format(x) for x in ("1.1.8", "1.2.2")))
    caps = detect_packer(str(script), env={"PATH": "/usr/bin:/bin"})
    assert (caps.packer_version, caps.plugin_version, caps.plugin_source) == ("1.11.2", "1.2.2", "installed")
    assert caps.token_auth and caps.boot_iso_block and caps.additional_isos and caps.efi_tpm_blocks
    assert caps.firmware and caps.tags and caps.needs_init and not caps.needs_storage_pool_type
    assert calls(tmp_path) == ["version", "plugins installed"]


def test_current_packer_without_the_plugin_assumes_what_packer_init_installs(tmp_path):
    script = fake(tmp_path, "Packer v1.12.0", plugins="")
    caps = detect_packer(str(script))
    assert caps.plugin_version == "1.2.0" and caps.plugin_source == "packer init (assumed >= 1.2.0)"
    assert caps.boot_iso_block and caps.needs_init


def test_packer_1_8_with_its_bundled_plugin(tmp_path):
    script = fake(tmp_path, "Packer v1.8.7")  # `plugins installed` fails: bundled plugin assumed
    caps = detect_packer(str(script))
    assert caps.plugin_source == "bundled (assumed)" and caps.plugin_version == "1.0.0"
    assert caps.token_auth and caps.additional_isos and caps.firmware
    assert not caps.boot_iso_block and not caps.efi_tpm_blocks and not caps.tags
    assert caps.needs_storage_pool_type and not caps.needs_init


def test_token_auth_starts_at_1_7_1():
    assert not capabilities_for((1, 7, 0)).token_auth
    assert capabilities_for((1, 7, 1)).token_auth
    assert not capabilities_for((1, 6, 6)).additional_isos


def test_detection_is_cached_per_binary_and_redone_when_it_changes(tmp_path):
    script = fake(tmp_path, "Packer v1.9.4")
    first = detect_packer(str(script))
    assert detect_packer(str(script)) is first
    assert calls(tmp_path).count("version") == 1
    time.sleep(0.01)
    script2 = fake(tmp_path, "Packer v1.11.2", plugins="")  # same path, new content and mtime
    assert script2 == script
    second = detect_packer(str(script))
    assert second.packer_version == "1.11.2" and calls(tmp_path).count("version") == 2


def test_detection_through_path_and_its_probe_environment(tmp_path):
    script = fake(tmp_path, "Packer v1.10.3", plugins="")
    caps = detect_packer("packer", env={"PATH": f"{script.parent}:/usr/bin:/bin", "HOME": str(tmp_path),
                                        "PROXMOX_PASSWORD": "pw-5ecret-4567", "PROXMOX_TOKEN": "tok-5ecret-0123"})
    assert caps.packer_version == "1.10.3" and caps.binary == str(script)
    seen = (tmp_path / "env.log").read_text()
    assert "CHECKPOINT_DISABLE=1" in seen and f"HOME={tmp_path}" in seen
    assert "5ecret" not in seen and "PROXMOX" not in seen


def test_a_missing_or_mute_binary_is_a_clear_error(tmp_path):
    with pytest.raises(PackerVersionError, match="'packer' not found"):
        detect_packer("packer", env={"PATH": str(tmp_path)})
    mute = fake(tmp_path, "Hello there", name="mute")
    with pytest.raises(PackerVersionError, match="cannot read a Packer version"):
        detect_packer(str(mute))
    broken = fake_packer(tmp_path / "bin", "echo boom >&2\nexit 3\n", name="broken")
    with pytest.raises(PackerVersionError, match="exited 3: boom"):
        detect_packer(str(broken))


def test_version_parsing():
    assert parse_packer_version("Packer v1.6.6\n") == (1, 6, 6)
    assert parse_packer_version("Packer v1.11.2\n\nYour version of Packer is out of date!") == (1, 11, 2)
    assert parse_packer_version("1.9.4") == (1, 9, 4)
    assert parse_plugin_version("nothing") is None
    assert parse_plugin_version("a/packer-plugin-proxmox_v1.1.10_x5.0_linux_amd64\n"
                                "b/packer-plugin-proxmox_v1.1.9_x5.0_linux_amd64") == (1, 1, 10)


# ------------------------------------------------------------------ credentials


OLD = capabilities_for((1, 6, 6))
NEW = capabilities_for((1, 11, 2), (1, 2, 2))


def test_token_login_where_packer_has_it():
    assert auth_env(NEW, TOKEN) == {"PROXMOX_USERNAME": "automation@pve!packer", "PROXMOX_TOKEN": "tok-5ecret-0123"}
    assert auth_env(NEW, BOTH)["PROXMOX_TOKEN"] == "tok-5ecret-0123"
    assert auth_env(NEW, PASSWORD) == {"PROXMOX_USERNAME": "automation@pve", "PROXMOX_PASSWORD": "pw-5ecret-4567"}


def test_password_login_on_1_6_6():
    assert login_mode(OLD, BOTH) == "password"
    assert auth_env(OLD, BOTH) == {"PROXMOX_USERNAME": "automation@pve", "PROXMOX_PASSWORD": "pw-5ecret-4567"}


def test_only_a_token_on_1_6_6_is_refused_naming_the_versions():
    with pytest.raises(PackerAuthError) as err:
        auth_env(OLD, TOKEN)
    message = str(err.value)
    assert "packer 1.6.6" in message and "packer >= 1.7.1" in message
    assert "automation@pve!packer" in message and "password login" in message
    assert "5ecret" not in message


def test_credentials_are_checked_and_never_shown():
    assert "5ecret" not in repr(BOTH)
    with pytest.raises(PackerAuthError, match="token_id and token_secret go together"):
        BuildCredentials(token_id="a@pve!t")
    with pytest.raises(PackerAuthError, match="not user@realm!tokenname"):
        BuildCredentials(token_id="automation", token_secret="x")
    with pytest.raises(PackerAuthError, match="give an API token"):
        BuildCredentials()
    creds = BuildCredentials.from_env({"PROXMOX_TOKEN_ID": "automation@pve!packer", "PROXMOX_TOKEN_SECRET": "t",
                                       "PROXMOX_BUILD_PASSWORD": "p"})
    assert (creds.user, creds.password, creds.token_id) == ("automation@pve", "p", "automation@pve!packer")
    assert sorted(creds.secrets()) == ["p", "t"]
