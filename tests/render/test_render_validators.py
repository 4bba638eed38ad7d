"""Each validator passes the shipped renders and catches a seeded defect with a clear message."""

import re

import pytest
from support import REPO

from packer_assets.catalog import load_catalog
from packer_assets.render import render_files
from packer_assets.render.validators import (
    SHIPPED_SCHEMA_DIR,
    Expected,
    ValidatorUnavailable,
    validate_autoinstall,
    validate_autounattend,
    validate_kickstart,
    validate_preseed,
)

SCHEMAS = SHIPPED_SCHEMA_DIR
ENV = {"PACKER_INSTALL_PASSWORD": "Secret-123", "PACKER_SSH_AUTHORIZED_KEYS": "ssh-ed25519 AAAAC3Nz x@y"}
SALT = "fixedsaltfortest"  # an explicit salt: the hash is computed once per family


@pytest.fixture(scope="module")
def rendered():
    catalog = load_catalog(project_dir=REPO, env={})
    out = {}
    for key in ("ubuntu-2204", "ubuntu-2404", "debian-12", "rocky-9", "windows-2022"):
        files, context = render_files(catalog[key], ENV, salt=SALT)
        out[key] = ({name: data.decode() for name, data in files.items()}, context)
    return out


def _one(verdict, *fragments):
    """The verdict failed and one message holds every fragment."""
    assert not verdict.ok, "the validator must reject the seeded defect"
    joined = "\n".join(verdict.messages)
    assert any(all(f in m for f in fragments) for m in verdict.messages), joined
    return joined


# ------------------------------------------------------------------ autoinstall


@pytest.mark.parametrize("key,release", [("ubuntu-2204", "22.04.2"), ("ubuntu-2404", "24.04.1")])
def test_autoinstall_accepts_the_shipped_render(rendered, key, release):
    files, context = rendered[key]
    expected = Expected(user="packer", password_hash=context["password_hash"], ssh_keys=("ssh-ed25519 AAAAC3Nz x@y",))
    verdict = validate_autoinstall(files["user-data"], release, SCHEMAS, expected)
    assert verdict.ok and verdict.summary() == "ok", verdict.messages


def test_autoinstall_rejects_a_misspelled_top_level_key(rendered):
    text = rendered["ubuntu-2404"][0]["user-data"].replace("  identity:", "  identiy:")
    _one(validate_autoinstall(text, "24.04.1", SCHEMAS), "autoinstall/identiy", "unknown top-level key", "'identity'")


def test_autoinstall_is_pinned_to_the_release(rendered):
    text = rendered["ubuntu-2204"][0]["user-data"].replace("  updates: security", "  updates: security\n  source:\n    id: ubuntu-server-minimal")
    assert validate_autoinstall(text, "24.04.1", SCHEMAS).ok
    _one(validate_autoinstall(text, "22.04.2", SCHEMAS), "autoinstall/source", "unknown top-level key")


def test_autoinstall_schema_types_are_checked(rendered):
    text = rendered["ubuntu-2404"][0]["user-data"].replace("  shutdown: reboot", "  shutdown: halt")
    _one(validate_autoinstall(text, "24.04.1", SCHEMAS), "autoinstall (schema 24.04.1)/shutdown", "'halt' is not one of")


def test_autoinstall_user_data_is_checked_with_the_cloud_config_schema(rendered):
    text = rendered["ubuntu-2404"][0]["user-data"].replace("    disable_root: true", "    disable_root: \"maybe\"")
    _one(validate_autoinstall(text, "24.04.1", SCHEMAS), "autoinstall/user-data (cloud-config)/disable_root", "not of type 'boolean'")


@pytest.mark.parametrize("old,new,where", [
    ("    ethernets:", "    ethernet:", "autoinstall/network (network-config v2)"),
    ("          name: \"e*\"", "          nmae: \"e*\"", "autoinstall/network (network-config v2)/ethernets/wired/match"),
])
def test_autoinstall_network_is_checked_with_the_network_v2_schema(rendered, old, new, where):
    text = rendered["ubuntu-2404"][0]["user-data"].replace(old, new)
    assert text != rendered["ubuntu-2404"][0]["user-data"]
    _one(validate_autoinstall(text, "24.04.1", SCHEMAS), where, "Additional properties")


def test_autoinstall_needs_the_cloud_config_header_and_yaml(rendered):
    text = rendered["ubuntu-2404"][0]["user-data"]
    _one(validate_autoinstall(text.replace("#cloud-config\n", ""), "24.04.1", SCHEMAS), "#cloud-config")
    _one(validate_autoinstall(text + "  late-commands: [unclosed\n", "24.04.1", SCHEMAS), "YAML error")


def test_autoinstall_round_trip_catches_a_lost_value(rendered):
    files, context = rendered["ubuntu-2404"]
    expected = Expected(user="someone-else", password_hash=context["password_hash"])
    _one(validate_autoinstall(files["user-data"], "24.04.1", SCHEMAS, expected), "round trip", "username")


def test_autoinstall_without_schemas_is_unavailable_not_ok(rendered, tmp_path):
    with pytest.raises(ValidatorUnavailable, match="PACKER_ASSETS_SCHEMA_DIR"):
        validate_autoinstall(rendered["ubuntu-2404"][0]["user-data"], "24.04.1", tmp_path)
    with pytest.raises(ValidatorUnavailable, match="autoinstall-schema-99.99.json"):
        validate_autoinstall(rendered["ubuntu-2404"][0]["user-data"], "99.99", SCHEMAS)


# ------------------------------------------------------------------ kickstart


def test_kickstart_accepts_the_shipped_render(rendered):
    files, context = rendered["rocky-9"]
    verdict = validate_kickstart(files["ks.cfg"], Expected(user="packer", password_hash=context["password_hash"]), handler="RHEL9")
    assert verdict.ok, verdict.messages


def test_kickstart_rejects_an_unknown_command(rendered):
    text = rendered["rocky-9"][0]["ks.cfg"].replace("firstboot --disabled", "frstboot --disabled")
    _one(validate_kickstart(text, handler="RHEL9"), "RHEL9", "Unknown command: frstboot")


def test_kickstart_rejects_a_bad_option(rendered):
    text = rendered["rocky-9"][0]["ks.cfg"].replace("autopart --type=lvm", "autopart --type=lvn")
    _one(validate_kickstart(text, handler="RHEL9"), "RHEL9", "line")


def test_kickstart_deprecations_count_as_failures(rendered):
    text = rendered["rocky-9"][0]["ks.cfg"].replace("timezone Etc/UTC --utc", "timezone Etc/UTC --isUtc")
    _one(validate_kickstart(text, handler="RHEL9"), "warning", "--isUtc")


def test_kickstart_round_trip_checks_user_hash_and_dhcp(rendered):
    files, context = rendered["rocky-9"]
    text = files["ks.cfg"]
    good = Expected(user="packer", password_hash=context["password_hash"])
    _one(validate_kickstart(text.replace(" --iscrypted", ""), good, handler="RHEL9"), "round trip", "--iscrypted")
    _one(validate_kickstart(text, Expected(user="nobody"), handler="RHEL9"), "round trip", "install user")
    static = text.replace("--bootproto=dhcp", "--bootproto=static --ip=192.0.2.10 --netmask=255.255.255.0 --gateway=192.0.2.1")
    _one(validate_kickstart(static, good, handler="RHEL9"), "round trip", "dhcp")


# ------------------------------------------------------------------ preseed


def test_preseed_accepts_the_shipped_render(rendered):
    files, context = rendered["debian-12"]
    verdict = validate_preseed(files["preseed.cfg"], Expected(user="packer", password_hash=context["password_hash"]))
    assert verdict.ok, verdict.messages


def test_preseed_rejects_a_malformed_line(rendered):
    text = rendered["debian-12"][0]["preseed.cfg"] + "d-i passwd/username\n"
    _one(validate_preseed(text), "debconf-set-selections", "parse error")


def test_preseed_treats_a_warning_with_exit_0_as_a_failure(rendered):
    # debconf-set-selections exits 0 here but warns: any output fails the file.
    text = rendered["debian-12"][0]["preseed.cfg"] + "d-i pkgsel/include strnig vim\n"
    _one(validate_preseed(text), "Unknown type strnig")


def test_preseed_checks_running_at_once_do_not_fail_each_other(rendered):
    # debconf-set-selections locks the system debconf database even with -c: concurrent runs rendering
    # Debian keys failed with "exited 1" and no message until each check got its own database.
    from concurrent.futures import ThreadPoolExecutor

    text = rendered["debian-12"][0]["preseed.cfg"]
    with ThreadPoolExecutor(8) as pool:
        verdicts = list(pool.map(lambda _i: validate_preseed(text), range(24)))
    assert all(v.ok for v in verdicts), [v.messages for v in verdicts if not v.ok][:3]


def test_preseed_round_trip_checks_user_and_hash(rendered):
    files, context = rendered["debian-12"]
    text = files["preseed.cfg"].replace(context["password_hash"], "$6$other$hash")
    _one(validate_preseed(text, Expected(user="packer", password_hash=context["password_hash"])), "round trip", "crypted")


# ------------------------------------------------------------------ Autounattend


def test_autounattend_accepts_the_shipped_render(rendered):
    verdict = validate_autounattend(rendered["windows-2022"][0]["Autounattend.xml"], Expected(user="Administrator", password="Secret-123"))
    assert verdict.ok, verdict.messages


def test_autounattend_rejects_a_missing_pass(rendered):
    text = re.sub(r'<settings pass="specialize">.*?</settings>', "", rendered["windows-2022"][0]["Autounattend.xml"], flags=re.S)
    _one(validate_autounattend(text), "pass specialize is missing")


def test_autounattend_rejects_a_wrong_pass_name(rendered):
    text = rendered["windows-2022"][0]["Autounattend.xml"].replace('pass="oobeSystem"', 'pass="oobeSytem"')
    joined = _one(validate_autounattend(text), "unknown pass 'oobeSytem'", "did you mean 'oobeSystem'")
    assert "pass oobeSystem is missing" in joined


def test_autounattend_rejects_a_repeated_pass(rendered):
    text = rendered["windows-2022"][0]["Autounattend.xml"]
    block = re.search(r'  <settings pass="specialize">.*?</settings>\n', text, flags=re.S).group(0)
    _one(validate_autounattend(text.replace(block, block + block)), "specialize appears 2 times")


@pytest.mark.parametrize("old,new,fragment", [
    ('publicKeyToken="31bf3856ad364e35"', 'publicKeyToken="31bf3856ad364e3g"', "publicKeyToken '31bf3856ad364e3g' is not 16 hex digits"),
    ('processorArchitecture="amd64"', 'processorArchitecture="x64"', "processorArchitecture 'x64'"),
    ('language="neutral"', 'language="en-US"', "language 'en-US' must be 'neutral'"),
    ('versionScope="nonSxS"', 'versionScope="SxS"', "versionScope 'SxS' must be 'nonSxS'"),
])
def test_autounattend_rejects_malformed_component_attributes(rendered, old, new, fragment):
    text = rendered["windows-2022"][0]["Autounattend.xml"].replace(old, new, 1)
    _one(validate_autounattend(text), "line 4", "Microsoft-Windows-International-Core-WinPE", fragment)


def test_autounattend_rejects_an_external_entity_without_resolving_it(rendered, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    text = rendered["windows-2022"][0]["Autounattend.xml"].replace(
        '<?xml version="1.0" encoding="utf-8"?>\n',
        f'<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE unattend [<!ENTITY leak SYSTEM "{secret.as_uri()}">]>\n',
    ).replace("<TimeZone>UTC</TimeZone>", "<TimeZone>&leak;</TimeZone>", 1)
    joined = _one(validate_autounattend(text), "DOCTYPE")
    assert "entity reference" in joined and "TOP-SECRET-CONTENT" not in joined


def test_autounattend_rejects_the_wrong_namespace_and_broken_xml(rendered):
    text = rendered["windows-2022"][0]["Autounattend.xml"]
    _one(validate_autounattend(text.replace('xmlns="urn:schemas-microsoft-com:unattend"', 'xmlns="urn:example"')), "root element")
    _one(validate_autounattend(text.replace("</unattend>", "")), "XML error")


def test_autounattend_round_trip_decodes_the_passwords(rendered):
    text = rendered["windows-2022"][0]["Autounattend.xml"]
    _one(validate_autounattend(text, Expected(password="another")), "round trip", "AdministratorPassword")


def test_shipped_schemas_match_their_provenance_table():
    """Every schema in the package is listed in schemas/SOURCES.md with its sha256, and every row's file
    is there: an updated schema comes with an updated provenance row, and the licences ship beside them."""
    import hashlib

    sources = (SCHEMAS / "SOURCES.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+\.json)` \|.*\| `([0-9a-f]{64})` \|$", sources, re.M))
    shipped = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in SCHEMAS.glob("*.json")}
    assert rows == shipped
    for licence in re.findall(r"\]\((LICENSE-[^)]+)\)", sources):
        assert (SCHEMAS / licence).stat().st_size > 10_000, licence
