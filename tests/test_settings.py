import pytest

from packer_assets.envfile import write_env_file
from packer_assets.settings import SettingsError, load_settings


def test_defaults_verify_tls_with_the_system_store(tmp_path):
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)})
    assert settings.root == tmp_path.resolve()
    assert settings.proxmox_url is None
    assert settings.verify is True


def test_env_file_supplies_values_and_the_environment_wins(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    write_env_file(tmp_path / "infra/env/.env.proxmox", {"PROXMOX_URL": "https://pve1:8006/api2/json",
                                                         "PROXMOX_CA_FILE": str(ca)})
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)})
    assert settings.api_base == "https://pve1:8006"
    assert settings.verify == str(ca)
    override = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PROXMOX_URL": "https://other:8006"})
    assert override.proxmox_url == "https://other:8006"


def test_extra_env_file(tmp_path):
    lab = write_env_file(tmp_path / "lab.env", {"PROXMOX_URL": "https://127.0.0.1:9/api2/json"})
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_ENV_FILE": str(lab)})
    assert settings.proxmox_url.startswith("https://127.0.0.1:9")
    assert str(lab) in settings.sources


def test_insecure_is_explicit(tmp_path):
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PROXMOX_INSECURE": "1"})
    assert settings.verify is False


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PROXMOX_URL": "http://pve:8006"}, "PROXMOX_URL='http://pve:8006' must be an https:// URL"),
        ({"PROXMOX_CA_FILE": "/nonexistent/ca.pem"}, "PROXMOX_CA_FILE='/nonexistent/ca.pem' does not exist"),
        ({"PROXMOX_TLS_FINGERPRINT": "AB:CD"}, "PROXMOX_TLS_FINGERPRINT must be a SHA-256"),
        ({"PROXMOX_INSECURE": "maybe"}, "PROXMOX_INSECURE='maybe' is not a yes/no"),
        ({"PROXMOX_INSECURE": "1", "PROXMOX_TLS_FINGERPRINT": ":".join(["AB"] * 32)}, "contradicts"),
    ],
)
def test_bad_settings_name_the_variable(tmp_path, env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), **env})
    assert "environment" in str(err.value)


def test_toolkit_config_is_read_as_defaults(tmp_path):
    from packer_assets.settings import TOOLKIT_CONF, export_env_files

    conf = tmp_path / TOOLKIT_CONF
    conf.parent.mkdir(parents=True)
    conf.write_text("PROXMOX_HOST=pve.lan\nPROXMOX_NODE=pve1\nPROXMOX_VM_STORAGE=local-zfs\n")
    write_env_file(tmp_path / "control/secrets.env", {"PROXMOX_TOKEN_SECRET": "s3cret-value"})
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)})
    assert settings.proxmox_url == "https://pve.lan:8006/api2/json"
    env = {"PACKER_ASSETS_ROOT": str(tmp_path), "PROXMOX_NODE": "pve2"}
    added = export_env_files(env)
    assert env["PROXMOX_NODE"] == "pve2"  # the environment wins
    assert env["PROXMOX_VM_STORAGE"] == "local-zfs" and "PROXMOX_VM_STORAGE" in added
    assert env["PROXMOX_TOKEN_SECRET"] == "s3cret-value"
