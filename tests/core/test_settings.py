import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import certifi
import pytest

from packer_assets.config.envfile import write_env_file
from packer_assets.config.settings import SettingsError, load_settings
from support.settings_cli import settings_command

CA = certifi.where()  # a real PEM bundle: the CA file must load


def test_defaults_verify_tls_with_the_system_store(tmp_path):
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)})
    assert settings.output_root == tmp_path.resolve()
    assert settings.proxmox_url is None
    assert settings.verify is True


def test_env_file_supplies_values_and_the_environment_wins(tmp_path):
    ca = Path(CA)
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
        ({"PROXMOX_URL": "http://pve:8006"}, "PROXMOX_URL must be an https:// URL"),
        ({"PROXMOX_CA_FILE": "/nonexistent/ca.pem"}, "PROXMOX_CA_FILE names no file"),
        ({"PROXMOX_TLS_FINGERPRINT": "AB:CD"}, "PROXMOX_TLS_FINGERPRINT must be a SHA-256"),
        ({"PROXMOX_INSECURE": "maybe"}, "PROXMOX_INSECURE is not a yes/no"),
        ({"PROXMOX_INSECURE": "1", "PROXMOX_TLS_FINGERPRINT": ":".join(["AB"] * 32)}, "contradicts"),
        ({"PROXMOX_INSECURE": "1", "PROXMOX_CA_FILE": CA}, "PROXMOX_INSECURE=1 contradicts PROXMOX_CA_FILE"),
        ({"PROXMOX_CA_FILE": "/etc/hostname"}, "is not a PEM CA certificate"),
        ({"PROXMOX_HTTP_PORT": "70000"}, "PROXMOX_HTTP_PORT is not a TCP port"),
        ({"PACKER_ASSETS_SSH_PORT": "ssh"}, "PACKER_ASSETS_SSH_PORT is not a TCP port"),
        ({"PROXMOX_NODE": "pve1\n"}, "PROXMOX_NODE has leading/trailing white space"),
        ({"PROXMOX_PRIVSEP": "perhaps"}, "PROXMOX_PRIVSEP is not a yes/no"),
        ({"PROXMOX_BOOTSTRAP_METHOD": "telnet"}, "PROXMOX_BOOTSTRAP_METHOD is neither api nor ssh"),
        ({"PROXMOX_BOOTSTRAP_METHOD": "ssh"}, "needs PROXMOX_SSH_HOST"),
        ({"PROXMOX_SSH_KEY_FILE": "/nonexistent/id_ed25519"}, "PROXMOX_SSH_KEY_FILE names no file"),
        ({"PACKER_ASSETS_SENSOR_INTERVAL": "1h"}, "PACKER_ASSETS_SENSOR_INTERVAL is not a whole number of seconds"),
        ({"PACKER_ASSETS_SENSOR_INTERVAL": "0"}, "PACKER_ASSETS_SENSOR_INTERVAL is not a whole number"),
        ({"PACKER_ASSETS_REBUILD_CRON": "0 3 * *"}, "PACKER_ASSETS_REBUILD_CRON is not a five-field cron"),
        ({"PACKER_ASSETS_REBUILD_CRON": "@weekly; rm"}, "is not a five-field cron"),
        ({"PACKER_ASSETS_WEBHOOKS": "https://hooks.example.org/T/B/secret"}, "PACKER_ASSETS_WEBHOOKS entry 1: want json:"),
        ({"PACKER_ASSETS_SIGNING_KEY": "/etc/hostname"}, "PACKER_ASSETS_SIGNING_KEY: signing key /etc/hostname: "),
        ({"PACKER_ASSETS_SIGNING_KEY": "/nonexistent/key"}, "PACKER_ASSETS_SIGNING_KEY names no file"),
        ({"PACKER_ASSETS_SIGNING_KEY": "/tmp"}, "PACKER_ASSETS_SIGNING_KEY: /tmp is a directory, not a file"),
        ({"PACKER_ASSETS_UI_URL": "localhost:3000"}, "PACKER_ASSETS_UI_URL must be an http:// or https:// URL"),
        ({"PACKER_ASSETS_SSH_PORTS": "debian-12=40022,ubuntu-2204"}, "PACKER_ASSETS_SSH_PORTS: item 2 is not key=port"),
        ({"PACKER_ASSETS_SSH_PORTS": "debian-12=70000"}, "PACKER_ASSETS_SSH_PORTS: item 1: not a TCP port"),
        ({"PACKER_ASSETS_GUEST_NOTES": "debian-12=a VM;rocky-9"}, "PACKER_ASSETS_GUEST_NOTES: item 2 is not key=text"),
        ({"PACKER_ASSETS_CONSOLE_LOG": "/var/log/console.log"}, "PACKER_ASSETS_CONSOLE_LOG: must be an absolute path "
                                                                "holding {vmid}"),
        ({"PACKER_ASSETS_CONSOLE_LOG": "console/{vmid}.log"}, "PACKER_ASSETS_CONSOLE_LOG: must be an absolute path"),
        ({"PACKER_ASSETS_CONSOLE_LOG": "/var/log/{node}/{vmid}.log"}, "PACKER_ASSETS_CONSOLE_LOG: holds a placeholder "
                                                                      "other than {vmid}"),
    ],
)
def test_bad_settings_name_the_variable(tmp_path, env, message):
    with pytest.raises(SettingsError, match=re.escape(message)) as err:
        load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), **env})
    assert "environment" in str(err.value)
    assert "secret" not in str(err.value)  # a webhook's path is its token: never echoed


def test_webhooks_are_checked_but_not_held_and_never_printed(tmp_path):
    hooks = "slack:https://hooks.example.org/T0/B0/tokensecret, json:http://127.0.0.1:9/generic"
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_WEBHOOKS": hooks})
    assert "tokensecret" not in repr(settings)
    shown = subprocess.run([sys.executable, "-m", "packer_assets.cli", "settings"], capture_output=True, text=True,
                           env={**os.environ, "PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_WEBHOOKS": hooks},
                           timeout=120)
    assert shown.returncode == 0 and "tokensecret" not in shown.stdout + shown.stderr


def test_sensor_interval_and_rebuild_cron_reach_the_definitions(tmp_path):
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)})
    assert (settings.sensor_interval, settings.rebuild_cron) == (3600, "0 3 * * 0")
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_SENSOR_INTERVAL": "600",
                              "PACKER_ASSETS_REBUILD_CRON": "30  2 * * mon"})  # cron allows runs of blanks
    assert (settings.sensor_interval, settings.rebuild_cron) == (600, "30  2 * * mon")
    from packer_assets.defs.schedules import build_weekly_rebuild
    from packer_assets.defs.sensors import build_iso_checksum_sensor

    assert build_iso_checksum_sensor(settings.sensor_interval).minimum_interval_seconds == 600
    assert build_weekly_rebuild(settings.rebuild_cron).cron_schedule == "30  2 * * mon"


def test_toolkit_config_is_read_as_defaults(tmp_path, monkeypatch, capsys):
    from packer_assets.config.settings import TOOLKIT_CONF, environment

    conf = tmp_path / TOOLKIT_CONF
    conf.parent.mkdir(parents=True)
    conf.write_text("PROXMOX_HOST=pve.lan\nPROXMOX_NODE=pve1\nPROXMOX_VM_STORAGE=local-zfs\n")
    write_env_file(tmp_path / "control/secrets.env", {"PROXMOX_TOKEN_SECRET": "s3cret-value"})
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)})
    assert settings.proxmox_url == "https://pve.lan:8006/api2/json"
    assert settings.environment["PROXMOX_TOKEN_SECRET"] == "s3cret-value"  # read, for the resources
    env = {"PACKER_ASSETS_ROOT": str(tmp_path), "PROXMOX_NODE": "pve2"}
    merged = environment(env)
    assert merged["PROXMOX_NODE"] == "pve2"  # the environment wins
    assert merged["PROXMOX_VM_STORAGE"] == "local-zfs" and merged["PROXMOX_TOKEN_SECRET"] == "s3cret-value"
    assert env == {"PACKER_ASSETS_ROOT": str(tmp_path), "PROXMOX_NODE": "pve2"}  # nothing exported into it
    with pytest.raises(TypeError):
        merged["PROXMOX_NODE"] = "pve3"  # read-only
    code, out, _err = settings_command(monkeypatch, capsys, tmp_path)  # prints every setting, not what it read
    assert code == 0 and "local-zfs" in out and "s3cret-value" not in out


def test_insecure_with_a_ca_from_an_env_file_names_both_origins(tmp_path):
    lab = write_env_file(tmp_path / "lab.env", {"PROXMOX_CA_FILE": CA})
    with pytest.raises(SettingsError) as err:
        load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_ENV_FILE": str(lab),
                       "PROXMOX_INSECURE": "1"})
    assert str(err.value).startswith("environment: PROXMOX_INSECURE=1 contradicts PROXMOX_CA_FILE")
    assert f"(from {lab}: line 1)" in str(err.value)  # a value from a file is named by its line


def test_insecure_is_never_inherited_from_the_env_file_init_writes(tmp_path):
    """.env.proxmox records an earlier init's PROXMOX_INSECURE=1; the next run verifies TLS unless asked again."""
    write_env_file(tmp_path / "infra/env/.env.proxmox", {"PROXMOX_INSECURE": "1", "PROXMOX_NODE": "pve1"})
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)})
    assert settings.insecure is False and settings.bootstrap.node == "pve1"
    asked = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PROXMOX_INSECURE": "1"})
    assert asked.insecure is True and asked.insecure_origin == "environment"


def test_definitions_refuse_a_contradiction_before_any_api_call(tmp_path):
    """`dagster asset materialize --select proxmox_env` with insecure AND a CA: one error naming both, and
    the API (a listening socket here) is never contacted."""
    with socket.socket() as api:
        api.bind(("127.0.0.1", 0))
        api.listen(8)
        api.setblocking(False)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXMOX_", "PACKER_ASSETS_", "DAGSTER_"))}
        env.update(PACKER_ASSETS_ROOT=str(tmp_path), DAGSTER_HOME=str(tmp_path), PROXMOX_INSECURE="1",
                   PROXMOX_CA_FILE=CA, PROXMOX_URL=f"https://127.0.0.1:{api.getsockname()[1]}/api2/json",
                   PROXMOX_BOOTSTRAP_PASSWORD="not-used")
        (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "--select",
                               "proxmox_env", "-m", "packer_assets.definitions"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        with pytest.raises(BlockingIOError):
            api.accept()  # nobody connected
    assert proc.returncode != 0
    assert "environment: PROXMOX_INSECURE=1 contradicts PROXMOX_CA_FILE (from environment)" in proc.stderr
    assert not (tmp_path / "infra/env/.env.proxmox").exists()


def test_a_keys_own_ssh_port_and_the_note_on_its_guest(tmp_path):
    from packer_assets.build.pipeline import BuildSettings
    from packer_assets.config.settings import guest_note

    notes = "debian-12=a VM on the staging node (2 vCPU, q35);*=a VM of the production cluster"
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_SSH_PORT": "2222",
                              "PACKER_ASSETS_SSH_PORTS": "debian-12=40022", "PACKER_ASSETS_GUEST_NOTES": notes})
    build = BuildSettings(ssh_port=settings.packer_ssh_port, ssh_ports=settings.packer_ssh_ports)
    assert (build.ssh_port_for("debian-12"), build.ssh_port_for("ubuntu-2204")) == (40022, 2222)
    assert guest_note(settings.guest_notes, "debian-12") == "a VM on the staging node (2 vCPU, q35)"
    assert guest_note(settings.guest_notes, "rocky-9") == "a VM of the production cluster"  # `*`: the others
    assert guest_note("debian-12=only this one", "rocky-9") is None
    assert guest_note(None, "debian-12") is None  # nothing stated: the proof says so, and claims nothing


def test_the_console_log_setting_reaches_the_build_with_its_vmid_placeholder(tmp_path):
    from packer_assets.defs.resources import build_resources

    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_CONSOLE_LOG": "/var/log/c/{vmid}.log"})
    assert settings.console_log == "/var/log/c/{vmid}.log"
    assert build_resources(settings)["packer"].settings().console_log == "/var/log/c/{vmid}.log"
    assert load_settings({"PACKER_ASSETS_ROOT": str(tmp_path)}).console_log is None


SECRET = "Sup3rS3cretPw"
# Each typed setting given a secret where a value belongs (a paste into the wrong variable, a URL with a password):
# the error names the variable and where it came from, never the text.
SECRET_VALUES = [
    ("PROXMOX_URL", f"http://{SECRET}:8006"), ("PROXMOX_URL", f"https://root:{SECRET}@pve:8006"),
    ("PROXMOX_URL", f"https://[{SECRET}:8006"), ("PROXMOX_URL", f"https://pve:{SECRET}"),
    ("PROXMOX_API_URL", f"https://{SECRET}@pve:8006"), ("PROXMOX_CA_FILE", f"/nonexistent/{SECRET}"),
    ("PROXMOX_TLS_FINGERPRINT", SECRET), ("PROXMOX_INSECURE", SECRET), ("PROXMOX_PRIVSEP", SECRET),
    ("PROXMOX_SSH_TRUST_ON_FIRST_USE", SECRET), ("PACKER_ASSETS_ALLOW_DEGRADED", SECRET),
    ("PROXMOX_HTTP_PORT", SECRET), ("PROXMOX_SSH_PORT", SECRET), ("PACKER_ASSETS_SSH_PORT", SECRET),
    ("PROXMOX_BOOTSTRAP_METHOD", SECRET), ("PROXMOX_BUILD_LOGIN", SECRET), ("PACKER_ASSETS_SENSOR_INTERVAL", SECRET),
    ("PACKER_ASSETS_REBUILD_CRON", SECRET), ("PACKER_ASSETS_WEBHOOKS", f"https://hooks.example.org/{SECRET}"),
    ("PACKER_ASSETS_SIGNING_KEY", f"/nonexistent/{SECRET}"), ("PROXMOX_SSH_KEY_FILE", f"/nonexistent/{SECRET}"),
    ("PACKER_ASSETS_UI_URL", f"localhost:{SECRET}"), ("PACKER_ASSETS_UI_URL", f"http://admin:{SECRET}@dagster:3000"),
    ("PACKER_ASSETS_SSH_PORTS", f"debian-12={SECRET}"), ("PACKER_ASSETS_SSH_PORTS", SECRET),
    ("PACKER_ASSETS_GUEST_NOTES", SECRET), ("PACKER_ASSETS_GUEST_NOTES", f"debian-12=x;{SECRET}"),
    ("PACKER_ASSETS_CONSOLE_LOG", SECRET), ("PACKER_ASSETS_CONSOLE_LOG", f"/x/{{{SECRET}}}/{{vmid}}"),
    ("PROXMOX_NODE", f"{SECRET}\n"), ("PROXMOX_TOKEN_NAME", f" {SECRET}"), ("PROXMOX_ROLE", f"{SECRET}\x07"),
]


@pytest.mark.parametrize("name, value", SECRET_VALUES)
def test_a_bad_value_is_named_by_variable_and_origin_never_echoed(tmp_path, monkeypatch, capsys, name, value):
    env_file = write_env_file(tmp_path / "x.env", {"PROXMOX_BRIDGE": "vmbr0", name: value})
    from_file = {"PACKER_ASSETS_ENV_FILE": str(env_file)}
    for env, origin in (({name: value}, "environment"), (from_file, f"{env_file}: line 2")):
        with pytest.raises(SettingsError) as err:
            load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), **env})
        assert str(err.value).startswith(f"{origin}: {name}")
        assert SECRET not in str(err.value) and "Sup3r" not in str(err.value)
        # and `packer-assets settings` prints that one line, nothing else
        assert settings_command(monkeypatch, capsys, tmp_path, **env) == (2, "", f"packer-assets: {err.value}\n")


def test_settings_command_never_prints_a_secret_from_a_bad_env_file(tmp_path):
    """What the issue showed: `PROXMOX_BOOTSTRAP_PASSWORD= Sup3rS3cretPw` printed the password back."""
    env_file = tmp_path / "lab.env"
    env_file.write_text(f"PROXMOX_NODE=pve1\nPROXMOX_BOOTSTRAP_PASSWORD= {SECRET}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKER_ASSETS_", "PROXMOX_"))}
    shown = subprocess.run([sys.executable, "-m", "packer_assets.cli", "settings"], capture_output=True, text=True,
                           env={**env, "PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_ENV_FILE": str(env_file)},
                           timeout=120)
    assert shown.returncode == 2 and shown.stdout == "" and SECRET not in shown.stderr
    assert shown.stderr == (f"packer-assets: {env_file}: line 2: PROXMOX_BOOTSTRAP_PASSWORD: an unquoted blank in or "
                            "before the value (bash would run the rest as a command); quote the whole value\n")


def test_a_new_lab_s_url_wins_over_the_api_url_a_previous_init_recorded(tmp_path):
    """`make demo-real` after an earlier lab in the same tree: infra/env/.env.proxmox still records the old lab's
    PROXMOX_API_URL, the new lab's env file (the explicit, stronger source) names its PROXMOX_URL: the new one counts.
    From one source, PROXMOX_API_URL still wins as before."""
    from packer_assets.evidence.layout import Layout

    recorded = Layout(tmp_path).env_file
    recorded.parent.mkdir(parents=True)
    write_env_file(recorded, {"PROXMOX_API_URL": "https://127.0.0.1:33099/api2/json"})
    lab = write_env_file(tmp_path / "lab.env", {"PROXMOX_URL": "https://127.0.0.1:39979/api2/json"})
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_ENV_FILE": str(lab)})
    assert settings.proxmox_url == "https://127.0.0.1:39979/api2/json"
    write_env_file(lab, {"PROXMOX_URL": "https://127.0.0.1:1/api2/json", "PROXMOX_API_URL": "https://127.0.0.1:2/api2/json"})
    settings = load_settings({"PACKER_ASSETS_ROOT": str(tmp_path), "PACKER_ASSETS_ENV_FILE": str(lab)})
    assert settings.proxmox_url == "https://127.0.0.1:2/api2/json"
