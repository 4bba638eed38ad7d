"""The template catalog: the shipped file, defaults merging, mirror rewriting, and broken catalogs."""

import copy
from pathlib import Path

import pytest
import yaml
from support import REPO

from packer_assets.catalog import (
    CATALOG_ENV,
    MIRROR_CHECKSUMS_ENV,
    MIRROR_ENV,
    CatalogError,
    check_catalog,
    deep_merge,
    load_catalog,
    mirror_url,
    parse_checksum,
)
from packer_assets.evidence.chain import CHAIN_RE
from packer_assets.pve.templates import CHANNEL_TAG_PREFIX, LATEST_TAG, REVOKED_TAG, SMOKE_TAG, TOOL_TAG

SHIPPED_KEYS = ["ubuntu-2204", "ubuntu-2404", "debian-12", "rocky-9", "windows-2022", "debian-13", "ubuntu-2604",
                "rocky-10", "windows-2025"]
SHA = "sha256:" + "ab" * 32

BASE = {
    "version": 1,
    "defaults": {
        "hardware": {"cores": 2, "memory": 2048, "disk": "32G", "bios": "seabios", "os_type": "l26"},
        "install_user": {"name": "packer", "password_env": "PACKER_INSTALL_PASSWORD"},
        "retention": 2,
        "tags": ["packer"],
    },
    "templates": [
        {
            "key": "alpha",
            "family": "ubuntu",
            "iso": {
                "url": "https://releases.example.org/alpha/alpha.iso?x=1",
                "checksum_url": "https://releases.example.org/alpha/SHA256SUMS",
            },
            "hardware": {"memory": 4096},
            "vmid_range": {"first": 1000, "last": 1099},
            "packer_dir": "templates/alpha",
        },
        {
            "key": "beta",
            "family": "windows",
            "iso": {"url": "http://dl.example.com:8080/win/BETA.iso", "checksum": SHA},
            "extra_isos": [
                {"name": "drivers", "url": "https://drivers.example.net/d/drivers-1.iso",
                 "checksum_url": "https://drivers.example.net/d/SHA256SUMS"},
            ],
            "hardware": {"bios": "ovmf", "efi": True, "tpm": True, "os_type": "win11"},
            "install_user": {"name": "Administrator"},
            "vmid_range": {"first": 2000, "last": 2099},
            "packer_dir": "templates/beta",
            "tags": ["win"],
            "retention": 5,
        },
    ],
}


def write(tmp_path: Path, doc, name: str = "catalog.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def load(tmp_path: Path, doc, env=None):
    return load_catalog(write(tmp_path, doc), env=env or {})


# ---------------------------------------------------------------- the shipped catalog


def test_shipped_catalog_loads_with_the_nine_keys():
    catalog = load_catalog(REPO / "templates" / "catalog.yaml", env={}, project_dir=REPO)
    assert catalog.keys() == SHIPPED_KEYS
    assert catalog.display == "templates/catalog.yaml"
    assert {e.family for e in catalog} == {"ubuntu", "debian", "rocky", "windows"}
    for entry in catalog:
        assert CHAIN_RE.match(f"CHAIN-20250101T000000Z-{entry.key}")
        assert entry.iso.url.startswith("https://")
        assert entry.install_user.password_env == "PACKER_INSTALL_PASSWORD"
    assert catalog.get("ubuntu-2204").autoinstall_schema == "22.04.2"
    assert catalog.get("ubuntu-2404").autoinstall_schema == "24.04.1"
    assert catalog.get("debian-12").unattended == "preseed"
    assert catalog.get("rocky-9").iso.checksum_url.endswith("/CHECKSUM")
    win = catalog.get("windows-2022")
    assert win.iso.checksum_algorithm == "sha256" and len(win.iso.checksum_hex) == 64
    assert win.iso.checksum_url is None
    assert [x.name for x in win.extra_isos] == ["virtio-win"]
    assert win.extra_isos[0].url.startswith("https://fedorapeople.org/groups/virt/virtio-win/direct-downloads/archive-virtio/")
    assert (win.hardware.bios, win.hardware.efi, win.hardware.tpm) == ("ovmf", True, True)
    # each shipped key names its upstream end of life (the comments beside them say which date and where from)
    assert {e.key: e.eol.isoformat() for e in catalog} == {
        "ubuntu-2204": "2027-04-30", "ubuntu-2404": "2029-04-30", "debian-12": "2028-06-30",
        "rocky-9": "2032-05-31", "windows-2022": "2031-10-14", "debian-13": "2030-06-30",
        "ubuntu-2604": "2031-04-30", "rocky-10": "2035-05-31", "windows-2025": "2034-10-10"}
    assert catalog.get("ubuntu-2604").autoinstall_schema == "26.04"
    assert catalog.get("rocky-10").iso.checksum_url.endswith("/pub/rocky/10/isos/x86_64/CHECKSUM")
    win25 = catalog.get("windows-2025")  # the eval ISOs share the upstream name: its own on storage
    assert win25.iso.filename == "windows-server-2025-eval-x64-en-us.iso" != win.iso.filename
    assert win25.extra_isos == win.extra_isos
    fields = ("bios", "efi", "tpm", "machine", "os_type", "memory", "disk")
    assert [getattr(win25.hardware, f) for f in fields] == [getattr(win.hardware, f) for f in fields]
    assert catalog.get("rocky-10").hardware.cpu_type == "x86-64-v3"  # RHEL 10 needs v3 (the fit check)
    signed = {e.key: e.iso.keyring for e in catalog if e.iso.keyring}
    assert signed == {
        "ubuntu-2204": "templates/keys/ubuntu-cdimage.asc", "ubuntu-2404": "templates/keys/ubuntu-cdimage.asc",
        "debian-12": "templates/keys/debian-cd.asc", "debian-13": "templates/keys/debian-cd.asc",
        "ubuntu-2604": "templates/keys/ubuntu-cdimage.asc", "rocky-10": "templates/keys/rocky-10.asc"}


def test_shipped_catalog_found_from_root_and_via_env(tmp_path):
    assert load_catalog(env={}, project_dir=REPO).keys() == SHIPPED_KEYS
    other = write(tmp_path, BASE, "other.yaml")
    assert load_catalog(env={CATALOG_ENV: str(other)}, project_dir=REPO).keys() == ["alpha", "beta"]
    assert load_catalog(env={CATALOG_ENV: "other.yaml"}, project_dir=tmp_path).display == "other.yaml"


def test_check_catalog_lines_for_the_shipped_catalog():
    lines = check_catalog(env={MIRROR_ENV: "http://127.0.0.1:8081"}, project_dir=REPO, check_dirs=False)
    assert lines[0] == "catalog templates/catalog.yaml: 9 templates, version 1"
    assert lines[1] == "iso mirror: http://127.0.0.1:8081"
    assert [line.split(":")[0] for line in lines[2:]] == SHIPPED_KEYS
    assert "http://127.0.0.1:8081/releases.ubuntu.com/22.04.5/SHA256SUMS" in lines[2]


def test_check_catalog_requires_packer_dirs(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(CatalogError) as exc:
        check_catalog(path, env={}, project_dir=tmp_path)
    assert "catalog.yaml: alpha: packer_dir: folder templates/alpha does not exist" in str(exc.value)
    (tmp_path / "templates" / "alpha").mkdir(parents=True)
    (tmp_path / "templates" / "beta").mkdir(parents=True)
    assert len(check_catalog(path, env={}, project_dir=tmp_path)) == 4


# ---------------------------------------------------------------- defaults and lookups


def test_entries_deep_merge_over_defaults(tmp_path):
    catalog = load(tmp_path, BASE)
    alpha, beta = catalog.get("alpha"), catalog.get("beta")
    assert alpha.hardware.memory == 4096  # entry wins
    assert (alpha.hardware.cores, alpha.hardware.disk, alpha.hardware.bios) == (2, "32G", "seabios")  # inherited
    assert alpha.hardware.sockets == 1 and alpha.hardware.efi is False  # model defaults
    assert alpha.retention == 2 and alpha.tags == ("packer",)
    assert beta.install_user.name == "Administrator"  # nested mapping merges ...
    assert beta.install_user.password_env == "PACKER_INSTALL_PASSWORD"  # ... and keeps the rest
    assert beta.tags == ("win",)  # lists replace
    assert beta.retention == 5
    assert catalog.defaults.hardware.cores == 2


def test_deep_merge_is_pure():
    base = {"a": {"b": 1, "c": 2}, "l": [1]}
    merged = deep_merge(base, {"a": {"c": 3}, "l": [2], "n": None})
    assert merged == {"a": {"b": 1, "c": 3}, "l": [2], "n": None}
    assert base == {"a": {"b": 1, "c": 2}, "l": [1]}


def test_get_unknown_key_lists_known_keys(tmp_path):
    catalog = load(tmp_path, BASE)
    with pytest.raises(CatalogError, match=r"catalog.yaml: gamma: unknown template key; known keys: alpha, beta"):
        catalog.get("gamma")
    assert "alpha" in catalog and len(catalog) == 2
    with pytest.raises(CatalogError) as caught:  # a key with a newline (make build KEY=$'alpha\n') is one line
        catalog.get("alpha\n")
    assert "\n" not in str(caught.value) and "'alpha\\n'" in str(caught.value)


def test_checksum_is_normalised_and_iso_filename_defaults_to_url_name(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["templates"][1]["iso"]["checksum"] = "SHA256:" + "AB" * 32
    beta = load(tmp_path, doc).get("beta")
    assert beta.iso.checksum == SHA
    assert beta.iso.filename == "BETA.iso" == beta.iso.upstream_name
    assert parse_checksum("sha512:" + "0f" * 64) == ("sha512", "0f" * 64)


# ---------------------------------------------------------------- the mirror


def test_mirror_url_rewrites_host_and_path_and_keeps_query():
    assert mirror_url("https://releases.ubuntu.com/22.04.5/SHA256SUMS", "http://127.0.0.1:8081") == (
        "http://127.0.0.1:8081/releases.ubuntu.com/22.04.5/SHA256SUMS"
    )
    assert mirror_url("https://a.example/x/y.iso?t=1&u=2#frag", "https://mirror.example.com/isos/") == (
        "https://mirror.example.com/isos/a.example/x/y.iso?t=1&u=2"
    )
    assert mirror_url("http://dl.example.com:8080/w.iso", "http://m") == "http://m/dl.example.com:8080/w.iso"


def test_mirror_env_rewrites_iso_checksum_and_extra_iso_urls_and_keeps_upstream(tmp_path):
    base = "https://mirror.example.com/isos"
    catalog = load(tmp_path, BASE, env={MIRROR_ENV: base})
    alpha, beta = catalog.get("alpha"), catalog.get("beta")
    assert catalog.mirror == base
    assert alpha.iso.url == "https://releases.example.org/alpha/alpha.iso?x=1"  # upstream kept
    assert alpha.iso.effective_url == f"{base}/releases.example.org/alpha/alpha.iso?x=1"
    assert alpha.iso.effective_checksum_url == f"{base}/releases.example.org/alpha/SHA256SUMS"
    assert beta.iso.effective_url == f"{base}/dl.example.com:8080/win/BETA.iso"
    assert beta.iso.effective_checksum_url is None  # pinned checksum: nothing to fetch
    drivers = beta.extra_isos[0]
    assert drivers.effective_url == f"{base}/drivers.example.net/d/drivers-1.iso"
    assert drivers.effective_checksum_url == f"{base}/drivers.example.net/d/SHA256SUMS"
    prov = drivers.provenance()
    assert prov["url"] == "https://drivers.example.net/d/drivers-1.iso"
    assert prov["effective_url"] == drivers.effective_url and prov["mirror"] == base
    # with_mirror gives a re-pointed copy and leaves the original alone
    assert alpha.iso.with_mirror(None).effective_url == alpha.iso.url
    assert alpha.iso.effective_url.startswith(base)


@pytest.mark.parametrize("env", [{}, {MIRROR_ENV: ""}, {MIRROR_ENV: "   "}])
def test_no_mirror_means_upstream_urls(tmp_path, env):
    catalog = load(tmp_path, BASE, env=env)
    assert catalog.mirror is None
    alpha = catalog.get("alpha")
    assert alpha.iso.effective_url == alpha.iso.url
    assert alpha.iso.effective_checksum_url == alpha.iso.checksum_url


@pytest.mark.parametrize("value", ["not a url", "ftp://mirror.example.com", "http://", "https://m.example/?q=1",
                                   "https://user:pw@m.example"])
def test_bad_mirror_env_is_one_catalog_error(tmp_path, value):
    path = write(tmp_path, BASE)
    with pytest.raises(CatalogError) as exc:
        load_catalog(path, env={MIRROR_ENV: value})
    message = str(exc.value)
    assert message.startswith(f"{path}: environment: {MIRROR_ENV}: ")
    assert "pw" not in message.split(MIRROR_ENV, 1)[1]


def test_mirror_checksums_replace_pinned_checksums_with_the_file_beside_the_iso(tmp_path):
    """A site mirror re-hosting media it re-spins: a pinned ISO reads the mirror's file beside it; an ISO
    whose catalog names a checksum file keeps that file; the catalog on disk is not touched."""
    base = "https://mirror.example.com/isos"
    path = write(tmp_path, BASE)
    before = path.read_text()
    catalog = load_catalog(path, env={MIRROR_ENV: base, MIRROR_CHECKSUMS_ENV: "SHA256SUMS"})
    beta, alpha = catalog.get("beta"), catalog.get("alpha")
    assert beta.iso.checksum is None and beta.iso.checksum_url is None
    assert beta.iso.effective_checksum_url == f"{base}/dl.example.com:8080/win/SHA256SUMS"
    assert beta.iso.checksum_source == beta.iso.effective_checksum_url == beta.iso.provenance()["checksum_source"]
    assert beta.extra_isos[0].effective_checksum_url == f"{base}/drivers.example.net/d/SHA256SUMS"  # its own file
    assert alpha.iso.effective_checksum_url == f"{base}/releases.example.org/alpha/SHA256SUMS"  # query dropped
    assert path.read_text() == before
    # without the setting the pin stays, and says so
    plain = load_catalog(path, env={MIRROR_ENV: base}).get("beta").iso
    assert plain.checksum == SHA and plain.checksum_source == "pinned in the catalog"


@pytest.mark.parametrize("env, problem", [
    ({MIRROR_CHECKSUMS_ENV: "SHA256SUMS"}, f"needs {MIRROR_ENV}"),
    ({MIRROR_ENV: "https://m.example", MIRROR_CHECKSUMS_ENV: "a/SHA256SUMS"}, "must be a file name"),
    ({MIRROR_ENV: "https://m.example", MIRROR_CHECKSUMS_ENV: "https://m.example/SUMS"}, "must be a file name"),
    ({MIRROR_ENV: "https://m.example", MIRROR_CHECKSUMS_ENV: ".."}, "must be a file name"),
])
def test_bad_mirror_checksums_setting_is_one_line_naming_it(tmp_path, env, problem):
    path = write(tmp_path, BASE)
    with pytest.raises(CatalogError) as exc:
        load_catalog(path, env=env)
    message = str(exc.value)
    assert message.startswith(f"{path}: environment: {MIRROR_CHECKSUMS_ENV}: ") and "\n" not in message
    assert problem in message


# ---------------------------------------------------------------- broken catalogs


def _set(path: str, value):
    """A mutation setting `path` (dots; ints index lists) in the document."""
    def mutate(doc):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for part in parents:
            node = node[part]
        node[last] = value
    return mutate


def _delete(path: str):
    def mutate(doc):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for part in parents:
            node = node[part]
        del node[last]
    return mutate


def _append_copy_of_alpha(**changes):
    def mutate(doc):
        doc["templates"].append({**copy.deepcopy(doc["templates"][0]), **changes})
    return mutate


BROKEN = [
    # id, mutation, key label, field path, fragment of the problem
    ("unknown-family", _set("templates.0.family", "arch"), "alpha", "family", "'arch'"),
    ("duplicate-key", _append_copy_of_alpha(vmid_range={"first": 5000, "last": 5099}),
     "alpha", "key", "duplicate key (templates[0] and templates[2])"),
    ("overlapping-vmids", _set("templates.1.vmid_range", {"first": 1050, "last": 1149}),
     "beta", "vmid_range", "overlaps alpha (1000-1099)"),
    ("missing-checksum", _delete("templates.0.iso.checksum_url"), "alpha", "iso.checksum", "missing"),
    ("both-checksums", _set("templates.0.iso.checksum", SHA), "alpha", "iso.checksum", "not both"),
    ("ftp-url", _set("templates.0.iso.url", "ftp://releases.example.org/a.iso"), "alpha", "iso.url", "http"),
    ("url-without-host", _set("templates.0.iso.checksum_url", "https:///SHA256SUMS"),
     "alpha", "iso.checksum_url", "host"),
    ("extra-iso-bad-url", _set("templates.1.extra_isos.0.url", "drivers.iso"), "beta", "extra_isos[0].url", "http"),
    ("extra-iso-no-checksum", _delete("templates.1.extra_isos.0.checksum_url"),
     "beta", "extra_isos[0].checksum", "missing"),
    ("bad-key-name", _set("templates.0.key", "Alpha_1"), "Alpha_1", "key", "lower-case letter"),
    ("key-starts-with-digit", _set("templates.0.key", "9alpha"), "9alpha", "key", "lower-case letter"),
    ("unknown-entry-field", _set("templates.0.hardwre", {}), "alpha", "hardwre", "did you mean 'hardware'"),
    ("unknown-nested-field", _set("templates.0.hardware.coress", 4), "alpha", "hardware.coress",
     "did you mean 'cores'"),
    ("unknown-extra-iso-field", _set("templates.1.extra_isos.0.sha", "x"), "beta", "extra_isos[0].sha",
     "unknown field"),
    ("unknown-defaults-field", _set("defaults.hardware.memroy", 1), "defaults", "hardware.memroy",
     "did you mean 'memory'"),
    ("unknown-top-level-field", _set("templatez", []), "top-level", "templatez", "did you mean 'templates'"),
    ("sha256-too-short", _set("templates.1.iso.checksum", "sha256:abc123"), "beta", "iso.checksum",
     "exactly 64 hex digits, got 6"),
    ("sha256-not-hex", _set("templates.1.iso.checksum", "sha256:" + "zz" * 32), "beta", "iso.checksum", "hex"),
    ("md5-checksum", _set("templates.1.iso.checksum", "md5:" + "ab" * 16), "beta", "iso.checksum", "sha256:"),
    ("retention-zero", _set("templates.1.retention", 0), "beta", "retention", "greater than or equal to 1"),
    ("defaults-retention-zero", _set("defaults.retention", 0), "defaults", "retention", "greater than or equal"),
    ("tpm-without-ovmf", _set("templates.1.hardware", {"tpm": True, "os_type": "win11"}), "beta", "hardware.tpm",
     "needs bios: ovmf"),
    ("ovmf-without-efi", _set("templates.1.hardware.efi", False), "beta", "hardware.efi", "needs efi: true"),
    ("windows-with-linux-os-type", _set("templates.1.hardware.os_type", "l26"), "beta", "hardware.os_type",
     "does not fit family windows"),
    ("missing-required-field", _delete("templates.0.packer_dir"), "alpha", "packer_dir", "missing required field"),
    ("packer-dir-escapes", _set("templates.0.packer_dir", "templates/../../etc"), "alpha", "packer_dir", ".."),
    ("vmid-first-after-last", _set("templates.0.vmid_range", {"first": 1099, "last": 1000}), "alpha",
     "vmid_range.last", "below first"),
    ("vmid-too-small", _set("templates.0.vmid_range", {"first": 99, "last": 1000}), "alpha",
     "vmid_range.first", "greater than or equal to 100"),
    ("range-smaller-than-retention", _set("templates.1.vmid_range", {"first": 2000, "last": 2004}), "beta",
     "vmid_range", "retention 5 needs at least 6"),
    ("schema-on-non-ubuntu", _set("templates.1.autoinstall_schema", "24.04.1"), "beta", "autoinstall_schema",
     "only ubuntu"),
    ("duplicate-extra-iso-name", lambda d: d["templates"][1]["extra_isos"].append(
        copy.deepcopy(d["templates"][1]["extra_isos"][0])), "beta", "extra_isos[1].name", "duplicate name"),
    ("bad-version", _set("version", 2), "top-level", "version", "must be 1"),
    ("no-templates", _set("templates", []), "top-level", "templates", "non-empty list"),
    ("entry-not-a-mapping", _set("templates.0", "alpha"), "templates[0]", "(entry)", "must be a mapping"),
    ("entry-without-key", _delete("templates.0.key"), "templates[0]", "key", "missing required field"),
    # whole-string checks and lengths: a trailing newline or a name no VM, partition or file can carry
    ("key-trailing-newline", _set("templates.0.key", "alpha\n"), "templates[0]", "key", "'alpha\\n' must start"),
    ("key-too-long", _set("templates.0.key", "a" * 301), "templates[0]", "key", "301 characters long; at most 48"),
    ("iso-filename-newline", _set("templates.0.iso.filename", "alpha.iso\n"), "alpha", "iso.filename",
     "not a plain file name"),
    ("iso-filename-too-long", _set("templates.0.iso.filename", "a" * 250 + ".iso"), "alpha", "iso.filename",
     "at most 200"),
    ("env-name-newline", _set("templates.0.install_user", {"password_env": "PACKER_PW\n"}), "alpha",
     "install_user.password_env", "NAME of an environment variable"),
    ("install-user-root", _set("templates.0.install_user", {"name": "root"}), "alpha", "install_user.name",
     "'root' is reserved"),
    ("install-user-system", _set("templates.0.install_user", {"name": "daemon"}), "alpha", "install_user.name",
     "reserved"),
    ("keyring-absolute", _set("templates.0.iso.keyring", "/etc/passwd"), "alpha", "iso.keyring",
     "outside the project root"),
    ("keyring-escapes", _set("templates.0.iso.keyring", "../../../etc/hostname"), "alpha", "iso.keyring",
     "outside the project root"),
    # the site's own smoke-test checks
    ("smoke-command-blank", _set("templates.0.smoke", {"commands": [{"run": "  \n"}]}), "alpha",
     "smoke.commands[0].run", "blank"),
    ("smoke-command-bad-regex", _set("templates.0.smoke", {"commands": [{"run": "true", "expect_output": "(x"}]}),
     "alpha", "smoke.commands[0].expect_output", "not a regular expression"),
    ("smoke-command-exit-range", _set("templates.0.smoke", {"commands": [{"run": "true", "expect_exit": 256}]}),
     "alpha", "smoke.commands[0].expect_exit", "less than or equal to 255"),
    ("smoke-command-step-name-taken", _set("templates.0.smoke", {"commands": [{"run": "true", "name": "cloud_init"}]}),
     "alpha", "smoke.commands", "'cloud_init' is taken"),
    ("smoke-command-bad-name", _set("templates.0.smoke", {"commands": [{"run": "true", "name": "Has Space"}]}),
     "alpha", "smoke.commands[0].name", "lower-case letters"),
    ("smoke-command-ssh-on-windows", _set("templates.1.smoke", {"commands": [{"run": "hostname", "via": "ssh"}]}),
     "beta", "smoke.commands[0].via", "Windows"),
    ("smoke-command-unknown-field", _set("templates.0.smoke", {"commands": [{"run": "true", "expect": 0}]}),
     "alpha", "smoke.commands[0].expect", "unknown field"),
    # tags: the tool's own (a revoked tag failed every promotion, a channel tag moved a channel), as PVE
    # compares them (without case); another key's (the tag the tool gives that key's templates)
    ("tag-latest", _set("templates.0.tags", ["packer-assets-latest"]), "alpha", "tags[0]", "this tool sets itself"),
    ("tag-revoked-upper-case", _set("templates.1.tags", ["win", "Packer-Assets-Revoked"]), "beta", "tags[1]",
     "'Packer-Assets-Revoked' is one of the tags this tool sets itself"),
    ("tag-channel", _set("templates.0.tags", ["packer-assets-channel-production"]), "alpha", "tags[0]",
     "this tool sets itself"),
    ("tag-tool-in-defaults", _set("defaults.tags", ["packer", "packer-assets"]), "defaults", "tags[1]",
     "this tool sets itself"),
    ("tag-another-key", _set("templates.0.tags", ["packer", "beta"]), "alpha", "tags[1]", "key of another entry"),
    ("tag-not-a-tag", _set("templates.0.tags", ["two words"]), "alpha", "tags[0]", "not a Proxmox tag"),
]


@pytest.mark.parametrize(("mutate", "key", "field", "fragment"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_catalog_names_file_key_and_field(tmp_path, mutate, key, field, fragment):
    doc = copy.deepcopy(BASE)
    mutate(doc)
    path = write(tmp_path, doc)
    with pytest.raises(CatalogError) as exc:
        load_catalog(path, env={})
    message = str(exc.value)
    line = next((ln for ln in message.splitlines() if ln.startswith(f"{path}: {key}: {field}: ")), None)
    assert line is not None, message
    assert fragment in line
    assert "pydantic" not in message and "validation error" not in message.lower()


def with_eol(raw: str) -> str:
    """BASE as YAML text, alpha with `eol: <raw>` written as a user would (a YAML date is unquoted)."""
    text = yaml.safe_dump(BASE, sort_keys=False)
    assert text.count("- key: alpha\n") == 1
    return text.replace("- key: alpha\n", f"- key: alpha\n  eol: {raw}\n")


def test_eol_is_an_optional_date_and_no_build_input(tmp_path):
    from datetime import date

    from packer_assets.pve.templates import catalog_entry_json

    catalog = load(tmp_path, with_eol("2028-06-30"))
    alpha, beta = catalog.get("alpha"), catalog.get("beta")
    assert alpha.eol == date(2028, 6, 30) and beta.eol is None  # optional
    assert load(tmp_path, with_eol("'2028-06-30'")).get("alpha").eol == date(2028, 6, 30)  # the string form too
    # a new end-of-life date rebuilds nothing: the entry's fingerprint input is the same without it
    assert catalog_entry_json(alpha) == catalog_entry_json(alpha.model_copy(update={"eol": None}))


@pytest.mark.parametrize(("raw", "fragment"), [
    ("2027-02-30", "'2027-02-30' is not a day of the calendar"),  # a YAML date PyYAML cannot make
    ('"2028-06-30\\n"', "got '2028-06-30\\n'"),  # a trailing newline
    ("2028-06-30 12:00:00", "not a date and time"),
    ("2028-06-30T00:00:00Z", "not a date and time"),
    ("20280630", "got 20280630"),
    ("30.06.2028", "got '30.06.2028'"),
    ("[2028-06-30]", "must be a date like 2028-06-30"),
], ids=["no-such-day", "trailing-newline", "datetime", "iso-datetime", "number", "other-format", "list"])
def test_a_bad_eol_is_one_line_naming_key_and_field(tmp_path, raw, fragment):
    path = write(tmp_path, with_eol(raw))
    with pytest.raises(CatalogError) as exc:
        load_catalog(path, env={})
    lines = str(exc.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: alpha: eol: "), lines
    assert fragment in lines[0], lines
    assert "Traceback" not in lines[0] and "pydantic" not in lines[0]


def test_eol_is_per_entry_not_a_default(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["defaults"]["eol"] = "2030-01-01"
    with pytest.raises(CatalogError, match=r"defaults: eol: unknown field"):
        load(tmp_path, doc)


def test_tags_are_lower_cased_as_proxmox_matches_them(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["templates"][0]["tags"] = ["Packer", "JAMMY", "alpha"]  # its own key is the tag it gets anyway
    assert load(tmp_path, doc).get("alpha").tags == ("packer", "jammy", "alpha")


@pytest.mark.parametrize("tag", [TOOL_TAG, LATEST_TAG, REVOKED_TAG, SMOKE_TAG, CHANNEL_TAG_PREFIX + "production"])
def test_every_tag_the_tool_sets_is_refused_in_the_catalog(tmp_path, tag):
    doc = copy.deepcopy(BASE)
    doc["templates"][0]["tags"] = [tag.upper()]
    with pytest.raises(CatalogError, match=r"alpha: tags\[0\]: .* is one of the tags this tool sets itself"):
        load(tmp_path, doc)


@pytest.mark.parametrize("value", ["hunter2!", "s3cret password", "export X=1", "lower_case_name"])
def test_password_value_instead_of_env_name_is_rejected_without_echo(tmp_path, value):
    doc = copy.deepcopy(BASE)
    doc["templates"][0]["install_user"] = {"password_env": value}
    path = write(tmp_path, doc)
    with pytest.raises(CatalogError) as exc:
        load_catalog(path, env={})
    message = str(exc.value)
    assert message.startswith(f"{path}: alpha: install_user.password_env: must be the NAME of an environment")
    assert value not in message


def test_bad_defaults_are_reported_once_not_per_entry(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["defaults"]["hardware"]["memroy"] = 1
    with pytest.raises(CatalogError) as exc:
        load(tmp_path, doc)
    assert str(exc.value).splitlines() == [
        f"{tmp_path / 'catalog.yaml'}: defaults: hardware.memroy: unknown field (did you mean 'memory'?)"
    ]


def test_all_problems_are_reported_in_one_error(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["templates"][0]["family"] = "arch"
    doc["templates"][1]["retention"] = 0
    with pytest.raises(CatalogError) as exc:
        load(tmp_path, doc)
    lines = str(exc.value).splitlines()
    assert len(lines) == 2
    assert "alpha: family:" in lines[0] and "beta: retention:" in lines[1]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version: 1\ntemplates:\n  - key: a\n    iso: [\n", "top-level: line "),
        ("version: 1\ndefaults:\n  retention: 1\n\ttabbed: x\n", "top-level: line 4"),
        ("version: 1\ntemplates:\n  - key: a\n    family: ubuntu\n    family: debian\n",
         "top-level: line 5, column 5: YAML error: found duplicate key 'family'"),
        ("", "top-level: catalog is empty"),
        ("# only a comment\n", "top-level: catalog is empty"),
        ("- a\n- b\n", "top-level: must be a mapping"),
    ],
    ids=["unclosed-flow", "tab-indent", "duplicate-mapping-key", "empty-file", "comment-only", "list-at-top"],
)
def test_unreadable_catalog_text(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as exc:
        load_catalog(path, env={})
    assert str(exc.value).startswith(f"{path}: ")
    assert fragment in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(CatalogError, match=r"nope\.yaml: top-level: catalog file not found"):
        load_catalog(tmp_path / "nope.yaml", env={})
    with pytest.raises(CatalogError) as exc:
        load_catalog(env={}, project_dir=tmp_path)
    assert str(exc.value).startswith("templates/catalog.yaml: top-level: catalog file not found")


def test_catalog_error_is_a_value_error():
    assert issubclass(CatalogError, ValueError)


def test_the_expected_os_comes_from_the_key_or_the_entry(tmp_path):
    from packer_assets.catalog import load_catalog as load_shipped

    shipped = {e.key: str(e.expected_os) for e in load_shipped(env={}, project_dir=REPO)}
    assert shipped == {"ubuntu-2204": "ubuntu 22.04", "ubuntu-2404": "ubuntu 24.04", "debian-12": "debian 12",
                       "rocky-9": "rocky 9", "windows-2022": "mswindows 2022", "debian-13": "debian 13",
                       "ubuntu-2604": "ubuntu 26.04", "rocky-10": "rocky 10", "windows-2025": "mswindows 2025"}
    doc = copy.deepcopy(BASE)
    doc["templates"][1]["expect_os"] = {"id": "mswindows", "version_id": "2025"}
    catalog = load(tmp_path, doc)
    assert str(catalog.get("alpha").expected_os) == "ubuntu (any release)"  # the key names no release
    assert catalog.get("alpha").expected_os.matches("ubuntu", "24.04")
    assert not catalog.get("alpha").expected_os.matches("debian", "12")
    assert str(catalog.get("beta").expected_os) == "mswindows 2025"
    doc["templates"][1]["expect_os"] = {"id": "mswindows", "version_id": "2025\n"}
    with pytest.raises(CatalogError, match=r"beta: expect_os\.version_id: .*must be a plain token"):
        load(tmp_path, doc)
