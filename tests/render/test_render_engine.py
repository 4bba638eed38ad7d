"""Rendering: every catalog key renders and validates; escaping per format; secrets; reproducibility;
a failed render writes nothing."""

import re
import shlex
import shutil

import pytest
import yaml
from lxml import etree
from pykickstart.constants import KS_SCRIPT_POST
from pykickstart.parser import KickstartParser
from pykickstart.version import RHEL9, makeVersion
from support import REPO

from packer_assets.catalog import ExpectedOs, InstallUser, load_catalog
from packer_assets.render import (
    ANSWER_ISO_NAME,
    RenderError,
    read_iso,
    render_files,
    render_unattended,
    verify_sha512_crypt,
    windows_decode,
)
from packer_assets.render.engine import (
    PROJECT_ROOT,
    UnsafeValue,
    debconf_value,
    make_environment,
    sh_quote,
    yaml_value,
)
from packer_assets.render.passwords import ADMIN_SUFFIX, USER_SUFFIX
from packer_assets.render.validators import (
    SHIPPED_SCHEMA_DIR,
    UNATTEND_NS,
    parse_preseed,
)

SCHEMAS = SHIPPED_SCHEMA_DIR
NASTY_PASSWORD = "pa<&\"' :#\\$`ss wörd 😀 $(reboot)"
LONG_KEY = "ssh-rsa " + "A" * 700 + " ops@example.org \"q'uote\" $HOME <&>"
ENV = {
    "PACKER_INSTALL_PASSWORD": NASTY_PASSWORD,
    "PACKER_SSH_AUTHORIZED_KEYS": f"# a comment line\n{LONG_KEY}\n\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB x@y\n",
}
KEYS = (LONG_KEY, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB x@y")
NASTY_VALUES = ['a"b', "a'b", "a$b$(x)`y`", "a<b>&c", "a#b c;d|e", "ü 😀", "\\back\\", " lead", "-dash"]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(project_dir=REPO, env={})


def _render(entry, tmp_path, env=ENV, **kw):
    return render_unattended(entry, env, tmp_path / entry.key, schema_dir=SCHEMAS, **kw)


# ------------------------------------------------------------------ every key


@pytest.mark.parametrize("key", ["ubuntu-2204", "ubuntu-2404", "debian-12", "rocky-9", "windows-2022", "debian-13",
                                 "ubuntu-2604", "rocky-10", "windows-2025"])
def test_every_catalog_key_renders_and_passes_its_validators(catalog, tmp_path, key):
    entry = catalog[key]
    result = _render(entry, tmp_path)
    assert result.key == key and len(result.content_hash) == 64
    validated = [f for f in result.files if f.verdicts]
    assert validated, "every family has at least one validated file"
    for f in result.files:
        assert f.path.read_bytes() and f.path.stat().st_mode & 0o777 == f.mode
        assert all(v.ok for v in f.verdicts), f.verdicts
    assert result.metadata()["files"]  # plain values for the asset
    text = b"".join(f.path.read_bytes() for f in result.files)
    assert NASTY_PASSWORD.encode() not in text


@pytest.mark.parametrize("key", ["ubuntu-2204", "debian-12", "rocky-9"])
def test_linux_files_hold_only_a_hash_that_verifies(catalog, tmp_path, key):
    result = _render(catalog[key], tmp_path)
    main = result.files[0]
    text = main.path.read_text()
    assert NASTY_PASSWORD not in text
    hashes = re.findall(r"\$6\$rounds=\d+\$[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}", text)
    assert hashes, "a SHA-512 crypt hash is in the file"
    assert main.mode == 0o600
    assert all(verify_sha512_crypt(NASTY_PASSWORD, h) for h in hashes)
    assert not verify_sha512_crypt("wrong", hashes[0])


def test_ubuntu_values_parse_back(catalog, tmp_path):
    result = _render(catalog["ubuntu-2404"], tmp_path)
    doc = yaml.safe_load(result.file("user-data").path.read_text())
    auto = doc["autoinstall"]
    assert auto["identity"]["username"] == "packer"
    assert verify_sha512_crypt(NASTY_PASSWORD, auto["identity"]["password"])
    assert tuple(auto["ssh"]["authorized-keys"]) == KEYS
    assert {"qemu-guest-agent", "cloud-init"} <= set(auto["packages"])
    assert yaml.safe_load(result.file("meta-data").path.read_text())["local-hostname"] == "ubuntu-2404"


def test_kickstart_values_parse_back(catalog, tmp_path):
    result = _render(catalog["rocky-9"], tmp_path)
    handler = makeVersion(RHEL9)
    KickstartParser(handler, errorsAreFatal=True).readKickstartFromString(result.file("ks.cfg").path.read_text())
    (user,) = handler.user.userList
    assert user.name == "packer" and user.isCrypted and verify_sha512_crypt(NASTY_PASSWORD, user.password)
    (post,) = [s.script for s in handler.scripts if s.type == KS_SCRIPT_POST]
    printf = next(line for line in post.splitlines() if line.startswith("printf "))
    assert tuple(shlex.split(printf)[2:-2]) == KEYS  # printf '%s\n' KEY... > file
    assert handler.rootpw.lock
    assert {"qemu-guest-agent", "cloud-init", "openssh-server"} <= set(handler.packages.packageList)


def test_preseed_values_parse_back(catalog, tmp_path):
    result = _render(catalog["debian-12"], tmp_path)
    answers = parse_preseed(result.file("preseed.cfg").path.read_text())
    assert answers["passwd/username"] == ("string", "packer")
    kind, hashed = answers["passwd/user-password-crypted"]
    assert kind == "password" and verify_sha512_crypt(NASTY_PASSWORD, hashed)
    assert set(answers["pkgsel/include"][1].split()) >= {"openssh-server", "qemu-guest-agent", "cloud-init", "sudo"}
    late = shlex.split(answers["preseed/late_command"][1])
    assert LONG_KEY in late and KEYS[1] in late  # the shell reads each key back as one word


def test_windows_passwords_decode_back_and_iso_holds_the_files(catalog, tmp_path):
    result = _render(catalog["windows-2022"], tmp_path)
    xml = result.file("Autounattend.xml").path.read_bytes()
    assert NASTY_PASSWORD.encode() not in xml
    root = etree.fromstring(xml)
    ns = {"u": UNATTEND_NS}
    admin = root.xpath("//u:AdministratorPassword/u:Value/text()", namespaces=ns)[0]
    logon = root.xpath("//u:AutoLogon/u:Password/u:Value/text()", namespaces=ns)[0]
    assert windows_decode(admin, ADMIN_SUFFIX) == NASTY_PASSWORD
    assert windows_decode(logon, USER_SUFFIX) == NASTY_PASSWORD
    # UEFI (catalog: efi true): EFI + MSR + Windows, installed to partition 3
    assert root.xpath("//u:CreatePartition/u:Type/text()", namespaces=ns) == ["EFI", "MSR", "Primary"]
    assert root.xpath("string(//u:InstallTo/u:PartitionID)", namespaces=ns) == "3"
    paths = root.xpath("//u:DriverPaths/u:PathAndCredentials/u:Path/text()", namespaces=ns)
    assert "E:\\vioscsi\\2k22\\amd64" in paths and "H:\\NetKVM\\2k22\\amd64" in paths
    iso = result.answer_iso
    assert iso is not None and iso.path.name == ANSWER_ISO_NAME and iso.path.stat().st_mode & 0o777 == 0o600
    volume, files = read_iso(iso.path)
    assert volume == "AUTOUNATTEND"
    assert files["Autounattend.xml"] == xml
    assert files["administrators_authorized_keys"].decode().splitlines() == list(KEYS)
    assert b"Add-WindowsCapability" in files["firstlogon.ps1"]


@pytest.mark.parametrize(("key", "image", "folder"), [
    ("windows-2022", "Windows Server 2022 SERVERSTANDARD", "2k22"),
    ("windows-2025", "Windows Server 2025 SERVERSTANDARD", "2k25"),
])
def test_the_windows_release_picks_its_image_and_virtio_folder(catalog, tmp_path, key, image, folder):
    root = etree.fromstring(_render(catalog[key], tmp_path).file("Autounattend.xml").path.read_bytes())
    ns = {"u": UNATTEND_NS}
    assert root.xpath("string(//u:InstallFrom/u:MetaData/u:Value)", namespaces=ns) == image
    paths = root.xpath("//u:DriverPaths/u:PathAndCredentials/u:Path/text()", namespaces=ns)
    assert paths and all(f"\\{folder}\\amd64" in path for path in paths), paths


def test_a_windows_release_the_template_does_not_know_is_one_line(catalog, tmp_path):
    entry = catalog["windows-2025"].model_copy(update={"expect_os": ExpectedOs(id="mswindows", version_id="2019")})
    with pytest.raises(RenderError) as failed:
        _render(entry, tmp_path)
    assert str(failed.value) == (
        "windows-2025: expect_os.version_id: Windows Server 2019 is not one the template knows (2022, 2025)")


@pytest.mark.parametrize(("key", "repo"), [("rocky-9", "AppStream-9"), ("rocky-10", "AppStream-10")])
def test_the_kickstart_names_the_appstream_of_its_release(catalog, tmp_path, key, repo):
    ks = _render(catalog[key], tmp_path).file("ks.cfg").path.read_text()
    assert f"mirrorlist?arch=x86_64&repo={repo}'" in ks
    # a key naming no release has no kickstart validator, so it never renders (test_render_release_validators.py)


def test_windows_without_keys_has_no_authorized_keys_file_nor_keeps_an_old_one(catalog, tmp_path):
    """No key configured: no empty administrators_authorized_keys in the folder, the answer ISO or (through the
    rendered folder) the proof; a file left by an earlier render with keys is removed."""
    entry = catalog["windows-2022"]
    with_keys = _render(entry, tmp_path)
    assert (with_keys.out_dir / "administrators_authorized_keys").is_file()
    result = _render(entry, tmp_path, env={"PACKER_INSTALL_PASSWORD": NASTY_PASSWORD})
    assert sorted(f.name for f in result.files) == ["Autounattend.xml", "firstlogon.ps1"]
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["Autounattend.xml", ANSWER_ISO_NAME, "firstlogon.ps1"]
    _volume, files = read_iso(result.answer_iso.path)
    assert sorted(files) == ["Autounattend.xml", "firstlogon.ps1"]


def test_windows_bios_layout_when_the_catalog_says_seabios(catalog, tmp_path):
    entry = catalog["windows-2022"]
    bios = entry.model_copy(update={"hardware": entry.hardware.model_copy(update={"bios": "seabios", "efi": False, "tpm": False})})
    root = etree.fromstring(_render(bios, tmp_path).file("Autounattend.xml").path.read_bytes())
    ns = {"u": UNATTEND_NS}
    assert root.xpath("//u:CreatePartition/u:Type/text()", namespaces=ns) == ["Primary", "Primary"]
    assert root.xpath("string(//u:ModifyPartition/u:Active)", namespaces=ns) == "true"


# ------------------------------------------------------------------ nasty user names per format


def _with_user(entry, name):
    # The catalog's pattern keeps such names out; model_copy skips it so the escaping is what is tested.
    user = InstallUser.model_construct(name=name, password_env="PACKER_INSTALL_PASSWORD", ssh_authorized_keys_env=None)
    return entry.model_copy(update={"install_user": user})


@pytest.mark.parametrize("name", ['o"k', "o'k", "o$k", "o<k>&", "ü😀"])
def test_nasty_user_names_render_validate_and_parse_back(catalog, tmp_path, name):
    ubuntu = _render(_with_user(catalog["ubuntu-2204"], name), tmp_path)
    assert yaml.safe_load(ubuntu.file("user-data").path.read_text())["autoinstall"]["identity"]["username"] == name
    rocky = _render(_with_user(catalog["rocky-9"], name), tmp_path)
    handler = makeVersion(RHEL9)
    KickstartParser(handler, errorsAreFatal=True).readKickstartFromString(rocky.file("ks.cfg").path.read_text())
    assert handler.user.userList[0].name == name
    debian = _render(_with_user(catalog["debian-12"], name), tmp_path)
    assert parse_preseed(debian.file("preseed.cfg").path.read_text())["passwd/username"] == ("string", name)
    windows = _render(_with_user(catalog["windows-2022"], name), tmp_path)
    root = etree.fromstring(windows.file("Autounattend.xml").path.read_bytes())
    assert root.xpath("string(//u:AutoLogon/u:Username)", namespaces={"u": UNATTEND_NS}) == name


def test_a_newline_in_a_one_line_field_is_refused_without_echoing_it(catalog, tmp_path):
    for key in ("debian-12", "rocky-9"):
        with pytest.raises(RenderError) as err:
            _render(_with_user(catalog[key], "evil\nd-i x/y string z"), tmp_path)
        assert key in str(err.value) and "line break" in str(err.value) and "evil" not in str(err.value)
    # YAML and XML can carry it (escaped): it parses back as given.
    ubuntu = _render(_with_user(catalog["ubuntu-2204"], "two\nlines"), tmp_path)
    assert yaml.safe_load(ubuntu.file("user-data").path.read_text())["autoinstall"]["identity"]["username"] == "two\nlines"


# ------------------------------------------------------------------ filters


@pytest.mark.parametrize("value", NASTY_VALUES + ["line\nbreak", "nel\x85ls\u2028ps\u2029", "del\x7fbom\ufeff", "tab\tnul\x00", "yes", "1.0", "null", "- x", "{a: b}", "*ref"])
def test_yaml_filter_gives_a_scalar_that_parses_back(value):
    assert yaml.safe_load(f"k: {yaml_value(value)}\n") == {"k": value}
    assert yaml.safe_load(f"k: {yaml_value([value, value])}\n") == {"k": [value, value]}


@pytest.mark.parametrize("value", NASTY_VALUES)
def test_sh_filter_quotes_for_the_shell_and_kickstart(value):
    assert shlex.split(f"cmd --opt={sh_quote(value)} {sh_quote(value)}", comments=True) == ["cmd", f"--opt={value}", value]


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\x00b", "a\u2028b"])
def test_one_line_filters_refuse_line_breaks(value):
    with pytest.raises(UnsafeValue):
        sh_quote(value)
    with pytest.raises(UnsafeValue):
        debconf_value(value)


def test_xml_autoescape_is_chosen_by_the_name_without_j2(tmp_path):
    (tmp_path / "a.xml.j2").write_text("<a b=\"{{ v }}\" c='{{ v }}'>{{ v }}</a>")
    (tmp_path / "a.cfg.j2").write_text("{{ v }}")
    env = make_environment(tmp_path)
    for value in NASTY_VALUES:
        root = etree.fromstring(env.get_template("a.xml.j2").render(v=value).encode())
        assert root.text == value and root.get("b") == value and root.get("c") == value
    assert env.get_template("a.cfg.j2").render(v="<&>") == "<&>"  # no HTML escaping outside XML


def test_strict_undefined_names_the_template_and_variable(catalog, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(REPO / "templates" / "rocky", root / "templates" / "rocky")
    ks = root / "templates" / "rocky" / "ks.cfg.j2"
    ks.write_text(ks.read_text().replace("{{ hostname | sh }}", "{{ host_name | sh }}"))
    with pytest.raises(RenderError) as err:
        render_files(catalog["rocky-9"], ENV, project_dir=root)
    message = str(err.value)
    assert "rocky-9" in message and "ks.cfg.j2" in message and "host_name" in message and "undefined" in message


# ------------------------------------------------------------------ password from env


@pytest.mark.parametrize("env", [{}, {"PACKER_INSTALL_PASSWORD": ""}])
def test_missing_password_names_the_variable_and_key(catalog, tmp_path, env):
    with pytest.raises(RenderError) as err:
        _render(catalog["debian-12"], tmp_path, env=env)
    assert "PACKER_INSTALL_PASSWORD" in str(err.value) and "debian-12" in str(err.value)
    assert not (tmp_path / "debian-12").exists()


def test_the_password_is_read_from_the_variable_the_catalog_names(catalog, tmp_path):
    entry = catalog["rocky-9"]
    user = entry.install_user.model_copy(update={"password_env": "OTHER_PW"})
    result = _render(entry.model_copy(update={"install_user": user}), tmp_path, env={"OTHER_PW": "x-y-z!"})
    text = result.file("ks.cfg").path.read_text()
    hashed = shlex.split(next(line for line in text.splitlines() if line.startswith("user ")))[-1].split("=", 1)[1]
    assert verify_sha512_crypt("x-y-z!", hashed)


# ------------------------------------------------------------------ reproducible, atomic


@pytest.mark.parametrize("key", ["ubuntu-2204", "windows-2022"])
def test_identical_inputs_give_identical_bytes_and_hash(catalog, tmp_path, key):
    first = render_unattended(catalog[key], ENV, tmp_path / "a", schema_dir=SCHEMAS)
    second = render_unattended(catalog[key], ENV, tmp_path / "b", schema_dir=SCHEMAS)
    assert first.content_hash == second.content_hash
    for a, b in zip(first.files, second.files):
        assert a.path.read_bytes() == b.path.read_bytes() and a.sha256 == b.sha256
    if key == "windows-2022":
        assert first.answer_iso.sha256 == second.answer_iso.sha256


def test_another_password_or_seed_or_salt_changes_the_data_version(catalog, tmp_path):
    entry = catalog["debian-12"]
    base = _render(entry, tmp_path).content_hash
    assert _render(entry, tmp_path, env={**ENV, "PACKER_INSTALL_PASSWORD": "other"}).content_hash != base
    assert _render(entry, tmp_path, env={**ENV, "PACKER_ASSETS_SALT_SEED": "site-2"}).content_hash != base
    assert _render(entry, tmp_path, salt="abcdefgh").content_hash != base
    assert _render(entry, tmp_path).content_hash == base


def test_a_failed_validation_leaves_the_previous_render_untouched(catalog, tmp_path):
    entry = catalog["rocky-9"]
    out = tmp_path / "out"
    render_unattended(entry, ENV, out, schema_dir=SCHEMAS)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    root = tmp_path / "project"
    shutil.copytree(REPO / "templates" / "rocky", root / "templates" / "rocky")
    ks = root / "templates" / "rocky" / "ks.cfg.j2"
    ks.write_text(ks.read_text().replace("firstboot --disabled", "frstboot --disabled"))
    with pytest.raises(RenderError) as err:
        render_unattended(entry, {**ENV, "PACKER_INSTALL_PASSWORD": "changed"}, out, schema_dir=SCHEMAS, project_dir=root)
    assert "rocky-9: ks.cfg: kickstart:" in str(err.value) and "frstboot" in str(err.value)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_validator_errors_never_show_the_hash(catalog, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(REPO / "templates" / "debian", root / "templates" / "debian")
    preseed = root / "templates" / "debian" / "preseed.cfg.j2"
    # a broken line that carries the hash: debconf-set-selections echoes the line
    preseed.write_text(preseed.read_text() + "{{ password_hash | line }}\n")
    with pytest.raises(RenderError) as err:
        render_unattended(catalog["debian-12"], ENV, tmp_path / "out", schema_dir=SCHEMAS, project_dir=root)
    assert "parse error" in str(err.value) and "$6$" not in str(err.value) and "***" in str(err.value)


def test_missing_schemas_are_a_clear_error_not_a_pass(catalog, tmp_path):
    with pytest.raises(RenderError) as err:
        render_unattended(catalog["ubuntu-2204"], ENV, tmp_path / "out", schema_dir=tmp_path / "nowhere")
    assert "PACKER_ASSETS_SCHEMA_DIR" in str(err.value) and "ubuntu-2204" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_schema_dir_comes_from_the_env_mapping_then_the_shipped_default(catalog, tmp_path):
    from packer_assets.render import resolve_schema_dir

    assert resolve_schema_dir({}, PROJECT_ROOT) == SCHEMAS
    assert resolve_schema_dir({"PACKER_ASSETS_SCHEMA_DIR": "elsewhere"}, tmp_path) == tmp_path / "elsewhere"
    result = render_unattended(catalog["ubuntu-2204"], {**ENV, "PACKER_ASSETS_SCHEMA_DIR": str(SCHEMAS)}, tmp_path / "o")
    assert result.file("user-data").verdicts[0].ok
