"""Each key's release picks its upstream validator (release_validators.py): rocky-10 is checked by pykickstart's
RHEL10 handler, ubuntu-2604 by subiquity 26.04's schema; a key whose release has no validator fails its render
with one line naming key, release and what is missing, and the render names the validator that checked each file."""

import re
from importlib.metadata import version

import pytest
from support import REPO

from packer_assets.catalog import TemplateEntry, load_catalog
from packer_assets.render import RenderError, render_files, render_unattended
from packer_assets.render.release_validators import NoValidator, validator_for
from packer_assets.render.validators import (
    SHIPPED_SCHEMA_DIR,
    Expected,
    ValidatorUnavailable,
    validate_autoinstall,
    validate_kickstart,
)

SCHEMAS = SHIPPED_SCHEMA_DIR
ENV = {"PACKER_INSTALL_PASSWORD": "Secret-123", "PACKER_SSH_AUTHORIZED_KEYS": "ssh-ed25519 AAAAC3Nz x@y"}
SALT = "fixedsaltfortest"
PYKICKSTART = version("pykickstart")


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(project_dir=REPO, env={})


def release_entry(catalog, base, key, **fields):
    """A catalog entry for `key` (its release named by the key, as the catalog's own keys), the rest as `base`'s:
    validated like a catalog entry, so `autoinstall_schema: "26.04"` passes the catalog's own checks."""
    data = catalog[base].model_dump(mode="json", exclude_none=True)
    data.update(key=key, **fields)
    return TemplateEntry.model_validate(data)


def _text(entry, name):
    files, _context = render_files(entry, ENV, project_dir=REPO, salt=SALT)
    return files[name].decode()


# ------------------------------------------------------------------ the choice


@pytest.mark.parametrize(
    ("base", "key", "fields", "chosen"),
    [
        ("ubuntu-2204", "ubuntu-2204", {}, "subiquity autoinstall schema 22.04.2"),
        ("ubuntu-2404", "ubuntu-2404", {}, "subiquity autoinstall schema 24.04.1"),
        ("ubuntu-2404", "ubuntu-2604", {"autoinstall_schema": "26.04"}, "subiquity autoinstall schema 26.04"),
        ("debian-12", "debian-12", {}, "debconf-set-selections Debian 12"),
        ("debian-12", "debian-13", {}, "debconf-set-selections Debian 13"),
        ("rocky-9", "rocky-9", {}, "pykickstart RHEL9"),
        ("rocky-9", "rocky-10", {}, "pykickstart RHEL10"),
        ("rocky-9", "rocky-x", {"expect_os": {"id": "rocky", "version_id": "10.1"}}, "pykickstart RHEL10"),
        ("windows-2022", "windows-2022", {}, "lxml unattend checks Windows Server 2022"),
        ("windows-2022", "windows-2025", {}, "lxml unattend checks Windows Server 2025"),
    ],
)
def test_each_release_picks_its_validator(catalog, base, key, fields, chosen):
    assert str(validator_for(release_entry(catalog, base, key, **fields), SCHEMAS)) == chosen


NO_VALIDATOR = [
    (
        "rocky-9",
        "rocky-12",
        {},
        f"rocky-12: no kickstart validator for Rocky 12: pykickstart {PYKICKSTART} has no RHEL12 handler",
    ),
    (
        "rocky-9",
        "rocky-lab",
        {},
        "rocky-lab: no kickstart validator for Rocky (no release named): the key names no "
        "Rocky release (set expect_os.version_id)",
    ),
    (
        "debian-12",
        "debian-14",
        {},
        "debian-14: no preseed validator for Debian 14: debconf-set-selections is known to "
        "parse the preseed format of Debian 12, 13 only",
    ),
    (
        "windows-2022",
        "windows-2019",
        {},
        "windows-2019: no Autounattend validator for Windows Server 2019: the lxml "
        "unattend checks cover Windows Server 2022, 2025 only",
    ),
    (
        "ubuntu-2404",
        "ubuntu-2610",
        {"autoinstall_schema": "26.10"},
        "ubuntu-2610: no autoinstall validator for Ubuntu "
        f"26.10: autoinstall_schema 26.10: no schema file autoinstall-schema-26.10.json in {SCHEMAS} "
        "(PACKER_ASSETS_SCHEMA_DIR names the folder of the validation schemas)",
    ),
    (
        "ubuntu-2404",
        "ubuntu-2604",
        {"autoinstall_schema": None},
        "ubuntu-2604: no autoinstall validator for Ubuntu "
        "26.04: autoinstall_schema: missing; name the Subiquity release of the ISO (like 26.04)",
    ),
    (
        "ubuntu-2404",
        "ubuntu-2604",
        {"autoinstall_schema": "24.04.1"},
        "ubuntu-2604: no autoinstall validator for Ubuntu 26.04: autoinstall_schema 24.04.1 is another "
        "release's schema; name 26.04's (like 26.04)",
    ),
]


RENDER_LINES = {
    "windows-2019": "windows-2019: expect_os.version_id: Windows Server 2019 is not one the template knows (2022, 2025)"
}


@pytest.mark.parametrize(("base", "key", "fields", "line"), NO_VALIDATOR)
def test_a_release_without_a_validator_fails_its_render_with_one_line(catalog, tmp_path, base, key, fields, line):
    entry = release_entry(catalog, base, key, **fields)
    with pytest.raises(NoValidator) as chosen:
        validator_for(entry, SCHEMAS)
    assert str(chosen.value) == line
    with pytest.raises(RenderError) as failed:
        render_unattended(entry, ENV, tmp_path / key, schema_dir=SCHEMAS, project_dir=REPO)
    # the whole error: one line, no traceback, no secret (Windows: the template itself knows no 2019 edition first)
    assert str(failed.value) == RENDER_LINES.get(key, line)
    assert not (tmp_path / key).exists(), "nothing unchecked is written"


def test_kickstart_without_the_release_handler_is_unavailable_not_ok(catalog):
    with pytest.raises(ValidatorUnavailable, match="no RHEL12 handler"):
        validate_kickstart(_text(catalog["rocky-9"], "ks.cfg"), handler="RHEL12")


# ------------------------------------------------------------------ the render names what checked each file


@pytest.mark.parametrize(
    ("base", "key", "fields", "name", "label"),
    [
        ("rocky-9", "rocky-10", {}, "ks.cfg", "kickstart (pykickstart RHEL10)"),
        ("rocky-9", "rocky-9", {}, "ks.cfg", "kickstart (pykickstart RHEL9)"),
        (
            "ubuntu-2404",
            "ubuntu-2604",
            {"autoinstall_schema": "26.04"},
            "user-data",
            "autoinstall (subiquity autoinstall schema 26.04)",
        ),
        ("debian-12", "debian-13", {}, "preseed.cfg", "preseed (debconf-set-selections Debian 13)"),
        (
            "windows-2022",
            "windows-2025",
            {},
            "Autounattend.xml",
            "autounattend (lxml unattend checks Windows Server 2025)",
        ),
    ],
)
def test_the_render_records_which_validator_and_release_checked_each_file(
    catalog, tmp_path, base, key, fields, name, label
):
    result = render_unattended(
        release_entry(catalog, base, key, **fields),
        ENV,
        tmp_path / key,
        schema_dir=SCHEMAS,
        project_dir=REPO,
        salt=SALT,
    )
    (verdict,) = result.file(name).verdicts
    assert verdict.ok and verdict.label() == label, verdict.messages
    assert result.metadata()["files"][name]["validated_by"] == [verdict.checked_by]


def test_meta_data_names_no_release_validator(catalog, tmp_path):
    result = render_unattended(catalog["ubuntu-2404"], ENV, tmp_path / "u", schema_dir=SCHEMAS, project_dir=REPO)
    assert result.metadata()["files"]["meta-data"]["validated_by"] == []


# ------------------------------------------------------------------ rocky-10 under RHEL10


def test_rocky_10_kickstart_passes_rhel10_with_no_warning(catalog):
    text = _text(release_entry(catalog, "rocky-9", "rocky-10"), "ks.cfg")
    verdict = validate_kickstart(text, Expected(user="packer"), handler="RHEL10")
    assert verdict.ok and verdict.summary() == "ok", verdict.messages


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("nvdimm use --namespace=namespace0.0", "nvdimm has been removed"),  # RHEL9 parses it cleanly
        ("timezone Etc/UTC --isUtc", "unrecognized arguments: --isUtc"),  # RHEL9: a deprecation warning only
    ],
)
def test_a_command_rhel10_removed_fails_rocky_10(catalog, line, said):
    text = _text(release_entry(catalog, "rocky-9", "rocky-10"), "ks.cfg").replace(
        "firstboot --disabled\n", f"firstboot --disabled\n{line}\n"
    )
    verdict = validate_kickstart(text, handler="RHEL10")
    assert not verdict.ok and any("pykickstart (RHEL10)" in m and said in m for m in verdict.messages), verdict
    if line.startswith("nvdimm"):
        assert validate_kickstart(text, handler="RHEL9").ok  # the release decides: the same file passes RHEL9


def test_a_command_rhel10_deprecates_fails_rocky_10_as_a_warning(catalog):
    text = _text(release_entry(catalog, "rocky-9", "rocky-10"), "ks.cfg").replace("text\n", "text\nvnc\n", 1)
    assert validate_kickstart(text, handler="RHEL9").ok
    verdict = validate_kickstart(text, handler="RHEL10")
    assert not verdict.ok and re.search(
        r"pykickstart \(RHEL10\) warning: .*vnc command has been deprecated", verdict.messages[0]
    ), verdict


# ------------------------------------------------------------------ ubuntu-2604 under subiquity 26.04


def test_ubuntu_2604_user_data_passes_the_26_04_schema(catalog):
    files, context = render_files(
        release_entry(catalog, "ubuntu-2404", "ubuntu-2604", autoinstall_schema="26.04"),
        ENV,
        project_dir=REPO,
        salt=SALT,
    )
    expected = Expected(user="packer", password_hash=context["password_hash"], ssh_keys=("ssh-ed25519 AAAAC3Nz x@y",))
    verdict = validate_autoinstall(files["user-data"].decode(), "26.04", SCHEMAS, expected)
    assert verdict.ok and verdict.summary() == "ok", verdict.messages


def test_a_key_the_26_04_schema_does_not_know_fails_ubuntu_2604(catalog, tmp_path):
    entry = release_entry(catalog, "ubuntu-2404", "ubuntu-2604", autoinstall_schema="26.04")
    text = _text(entry, "user-data").replace(
        "  updates: security", "  updates: security\n  kernel-crash-dump:\n    enabled: false"
    )
    verdict = validate_autoinstall(text, "26.04", SCHEMAS)
    assert not verdict.ok
    assert any(
        "autoinstall/kernel-crash-dump: unknown top-level key (did you mean 'kernel-crash-dumps'?)" in m
        for m in verdict.messages
    ), verdict.messages


@pytest.mark.parametrize(
    "added",
    [
        "  kernel-crash-dumps:\n    enabled: false",  # a top-level key new in 26.04
        "  zdevs: []",  # another
    ],
)
def test_keys_new_in_26_04_pass_its_schema_and_fail_24_04_1(catalog, added):
    text = _text(catalog["ubuntu-2404"], "user-data").replace("  updates: security", f"  updates: security\n{added}")
    assert validate_autoinstall(text, "26.04", SCHEMAS).ok
    assert not validate_autoinstall(text, "24.04.1", SCHEMAS).ok


def test_identity_groups_is_new_in_26_04(catalog):
    text = _text(catalog["ubuntu-2404"], "user-data")
    assert "    username: " in text
    grouped = text.replace("    username: ", "    groups: [adm, sudo]\n    username: ", 1)
    assert validate_autoinstall(grouped, "26.04", SCHEMAS).ok
    verdict = validate_autoinstall(grouped, "24.04.1", SCHEMAS)
    assert not verdict.ok and any(
        "autoinstall (schema 24.04.1)/identity" in m and "groups" in m for m in verdict.messages
    ), verdict.messages
