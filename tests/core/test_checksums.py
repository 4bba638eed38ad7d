"""Checksum files: real-world formats, conditional fetches against the lab mirror, gpg signatures."""

import shutil
import socket
import subprocess

import pytest

from packer_assets.catalog import IsoSource
from packer_assets.upstream.checksums import (
    Checksum,
    ChecksumError,
    ChecksumFile,
    fetch_checksum_file,
    resolve_checksum,
    verify_signature,
)

# Ubuntu publishes binary-mode GNU lines ("<hex> *<name>"); these are 22.04.5's real values.
UBUNTU_SHA256SUMS = """\
bfd1cee02bc4f35db939e69b934ba49a39a378797ce9aee20f6e3e3e728fefbf *ubuntu-22.04.5-desktop-amd64.iso
9bc6028870aef3f74f4e16b900008179e78b130e6b0b9a140635434a46aa98b0 *ubuntu-22.04.5-live-server-amd64.iso
"""
UBUNTU_SERVER = "9bc6028870aef3f74f4e16b900008179e78b130e6b0b9a140635434a46aa98b0"

# Debian: text-mode GNU lines (two spaces), SHA256SUMS and SHA512SUMS side by side (layout as published).
DEBIAN_SHA256SUMS = """\
8fde79cfc6b20a696200fc5c15219cf6d721e8feb367e9e0e33a79d1cb68fa83  debian-12.7.0-amd64-netinst.iso
0af0c2a8d9ec4b4a2b3f0ea3e1b5a1a4a3d6f6a0b9d0d1c9a2e34f0c55c1a111  debian-edu-12.7.0-amd64-netinst.iso
"""
DEBIAN_SHA512SUMS = (
    "e0bd9ba03084a6fd42413b425a2d20e3731678a31fe5fb2cc84f79332129afca"
    "f4a8c69a8e5d5a8a4a9d3bd1e1c5a4e4a5b5f1f6d9a7c3e2b1f0e9d8c7b6a5f4"
    "  debian-12.7.0-amd64-netinst.iso\n"
)

# Rocky's CHECKSUM: BSD lines, each preceded by a "# <name>: <size> bytes" comment.
ROCKY_CHECKSUM = """\
# Rocky-9.5-x86_64-boot.iso: 1034944512 bytes
SHA256 (Rocky-9.5-x86_64-boot.iso) = 628c069c9685477360640a6b58dc919692a11c44b49a50a024b5627ce3c27d5f
# Rocky-9.5-x86_64-dvd.iso: 11382292480 bytes
SHA256 (Rocky-9.5-x86_64-dvd.iso) = ba60c3653640b5747610ddfb4d09520529bef2d1d83c1feb86b0c84dff31e04e
# Rocky-9.5-x86_64-minimal.iso: 2037372928 bytes
SHA256 (Rocky-9.5-x86_64-minimal.iso) = EEDBDC2875C32C7F00E70FC861EDEF48587C7CBFD106885AF80BDF434543820B
"""

CLEARSIGNED = """\
-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA256

9bc6028870aef3f74f4e16b900008179e78b130e6b0b9a140635434a46aa98b0 *ubuntu-22.04.5-live-server-amd64.iso
-----BEGIN PGP SIGNATURE-----

iQIzBAEBCAAdFiEEhDVbVPJ1zEo3mtP3WkpTd6L3uyUFAmbZFtoACgkQWkpTd6L3
uyUfXw/+P0qjCd2GN8b2WDVQpJ7m1qfCgC3M9yQm6nE5fF5cU1pz5mZ0V2n7d4n0
=Xk2b
-----END PGP SIGNATURE-----
"""


def test_ubuntu_gnu_binary_mode_lines():
    parsed = ChecksumFile.parse(UBUNTU_SHA256SUMS, source="https://releases.ubuntu.com/22.04.5/SHA256SUMS")
    assert parsed.lookup("ubuntu-22.04.5-live-server-amd64.iso") == Checksum("sha256", UBUNTU_SERVER)
    assert len(parsed) == 2 and parsed.skipped == []


def test_debian_sha256_and_sha512_text_mode_lines():
    assert ChecksumFile.parse(DEBIAN_SHA256SUMS).lookup("debian-12.7.0-amd64-netinst.iso").algorithm == "sha256"
    found = ChecksumFile.parse(DEBIAN_SHA512SUMS).lookup("debian-12.7.0-amd64-netinst.iso")
    assert found.algorithm == "sha512" and len(found.hex) == 128


def test_rocky_bsd_lines_with_size_comments_and_upper_case_hex():
    parsed = ChecksumFile.parse(ROCKY_CHECKSUM)
    assert parsed.names == ["Rocky-9.5-x86_64-boot.iso", "Rocky-9.5-x86_64-dvd.iso", "Rocky-9.5-x86_64-minimal.iso"]
    found = parsed.lookup("Rocky-9.5-x86_64-minimal.iso")
    assert found == Checksum("sha256", "eedbdc2875c32c7f00e70fc861edef48587c7cbfd106885af80bdf434543820b")
    assert str(found).startswith("sha256:eedbdc") and found.short == "eedbdc2875c3"
    assert parsed.skipped == []  # the size comments are comments, not unreadable lines


def test_clearsigned_file_skips_armour_and_signature():
    parsed = ChecksumFile.parse(CLEARSIGNED)
    assert parsed.names == ["ubuntu-22.04.5-live-server-amd64.iso"]
    assert parsed.skipped == []  # neither `Hash: SHA256` nor base64 lines count as entries or junk


@pytest.mark.parametrize("line, algorithm", [
    ("d41d8cd98f00b204e9800998ecf8427e  f.iso", "md5"),
    ("da39a3ee5e6b4b0d3255bfef95601890afd80709 *f.iso", "sha1"),
    ("d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f  f.iso", "sha224"),
    ("38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b  f.iso",
     "sha384"),
    ("SHA512 (f.iso) = " + "ab" * 64, "sha512"),
    ("SHA2-256 (f.iso) = " + "CD" * 32, "sha256"),  # NetBSD-style name
    ("MD5(f.iso)= " + "0f" * 16, "md5"),  # openssl dgst style
])
def test_algorithm_from_hex_length_or_declared_name(line, algorithm):
    assert ChecksumFile.parse(line + "\n").lookup("f.iso").algorithm == algorithm


def test_match_by_basename_and_windows_line_endings():
    text = "\ufeff" + "aa" * 32 + " *./amd64/iso-cd/x.iso\r\n" + "bb" * 32 + "  sub/dir/y.iso\r\n"
    parsed = ChecksumFile.parse(text)
    assert parsed.lookup("x.iso").hex == "aa" * 32
    assert parsed.lookup("https://example.org/any/where/y.iso").hex == "bb" * 32


def test_strongest_algorithm_wins_and_conflicts_are_errors():
    both = f"SHA256 (f.iso) = {'11' * 32}\nSHA512 (f.iso) = {'22' * 64}\n"
    assert ChecksumFile.parse(both).lookup("f.iso").algorithm == "sha512"
    rival = f"{'11' * 32}  a/f.iso\n{'33' * 32}  b/f.iso\n"
    with pytest.raises(ChecksumError, match=r"different sha256 checksums \(a/f.iso, b/f.iso\)"):
        ChecksumFile.parse(rival, source="SUMS").lookup("f.iso")


def test_junk_is_skipped_not_fatal():
    text = "not a checksum line\n" + "zz" * 32 + "  bad.iso\n" + "SHA256 (short.iso) = abcd\n" + "aa" * 32 + "  ok.iso\n"
    parsed = ChecksumFile.parse(text)
    assert parsed.names == ["ok.iso"] and parsed.skipped == [1, 2, 3]


def test_missing_name_error_names_url_file_and_contents():
    url = "https://download.rockylinux.org/pub/rocky/9/isos/x86_64/CHECKSUM"
    with pytest.raises(ChecksumError) as err:
        ChecksumFile.parse(ROCKY_CHECKSUM, source=url).lookup("Rocky-9.5-x86_64-minmal.iso")
    message = str(err.value)
    assert url in message and "'Rocky-9.5-x86_64-minmal.iso'" in message
    assert "Rocky-9.5-x86_64-boot.iso" in message and "did you mean 'Rocky-9.5-x86_64-minimal.iso'" in message
    with pytest.raises(ChecksumError, match="lists no checksums at all"):
        ChecksumFile.parse("<html>404</html>", source=url).lookup("x.iso")


def test_checksum_value_checks():
    assert Checksum.parse("SHA256:" + "AB" * 32) == Checksum("sha256", "ab" * 32)
    with pytest.raises(ValueError):
        Checksum("sha256", "ab" * 20)
    with pytest.raises(ValueError):
        Checksum("blake2b", "ab" * 64)


# ------------------------------------------------------------------ fetching from the lab mirror


def test_conditional_fetch_costs_a_304(iso_mirror):
    url = iso_mirror.checksum_url("ubuntu-2204")
    first = fetch_checksum_file(url, timeout=5)
    assert first.status == "changed" and first.etag and first.last_modified
    assert iso_mirror.sha256("ubuntu-2204") in first.text
    again = fetch_checksum_file(url, first.etag, first.last_modified, timeout=5)
    assert (again.status, again.text, again.etag) == ("unchanged", None, first.etag)
    by_date = fetch_checksum_file(url, last_modified=first.last_modified, timeout=5)
    assert by_date.status == "unchanged"
    path = url.removeprefix(iso_mirror.base_url)
    assert iso_mirror.hits[(path, 200)] == 1 and iso_mirror.hits[(path, 304)] == 2
    iso_mirror.publish("ubuntu-2204")
    changed = fetch_checksum_file(url, first.etag, first.last_modified, timeout=5)
    assert changed.status == "changed" and changed.etag != first.etag
    assert iso_mirror.sha256("ubuntu-2204") in changed.text


def test_fetch_errors_name_the_url(iso_mirror):
    missing = iso_mirror.base_url + "/nowhere/SHA256SUMS"
    with pytest.raises(ChecksumError, match=f"^{missing}: HTTP 404"):
        fetch_checksum_file(missing, timeout=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/SHA256SUMS"  # bound, not listening: refused
        with pytest.raises(ChecksumError, match=f"^{closed}: unreachable"):
            fetch_checksum_file(closed, timeout=2)


def test_fetch_times_out_quickly():
    with socket.socket() as s:  # listening but never answering: connect succeeds, the read hangs
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/SHA256SUMS"
        with pytest.raises(ChecksumError, match=r"timed out after 0.5s"):
            fetch_checksum_file(url, timeout=0.5)


def _source(mirror, key, **extra):
    item = mirror.items[key]
    return IsoSource(url="https:/" + item.iso_path, checksum_url="https:/" + item.checksum_path,
                     **extra).with_mirror(mirror.base_url)


def test_resolve_checksum_pinned_or_from_the_mirrored_file(iso_mirror):
    pinned = IsoSource(url="https://example.org/w.iso", checksum="sha256:" + "AB" * 32)
    assert resolve_checksum(pinned) == Checksum("sha256", "ab" * 32)
    cache = {}
    rocky = resolve_checksum(_source(iso_mirror, "rocky-9"), cache=cache)
    boot = resolve_checksum(_source(iso_mirror, "rocky-9-boot"), cache=cache)
    assert (rocky.hex, boot.hex) == (iso_mirror.sha256("rocky-9"), iso_mirror.sha256("rocky-9-boot"))
    checksum_path = iso_mirror.items["rocky-9"].checksum_path
    assert iso_mirror.hits[(checksum_path, 200)] == 1  # one fetch for both ISOs


def test_resolve_checksum_error_names_checksum_url_and_file(iso_mirror):
    item = iso_mirror.items["ubuntu-2204"]
    iso = IsoSource(url="https:/" + item.iso_path.replace("live-server", "desktop"),
                    checksum_url="https:/" + item.checksum_path).with_mirror(iso_mirror.base_url)
    with pytest.raises(ChecksumError) as err:
        resolve_checksum(iso)
    assert iso.effective_checksum_url in str(err.value)
    assert "ubuntu-22.04.5-desktop-amd64.iso" in str(err.value)
    assert "ubuntu-22.04.5-live-server-amd64.iso" in str(err.value)


# ------------------------------------------------------------------ signatures (real gpg)


def _gpg(home, *args, stdin=None):
    return subprocess.run(["gpg", "--batch", "--homedir", str(home), *args], input=stdin, capture_output=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    """A signing key made for the test (no passphrase), its exported public keyring (binary and
    armoured), and a second, unrelated key."""
    if not (shutil.which("gpg") and shutil.which("gpgconf")):
        pytest.skip("needs gpg: apt-get install gnupg (make test installs it)")
    base = tmp_path_factory.mktemp("gpg")
    keys = {}
    for who in ("signer", "stranger"):
        home = base / who
        home.mkdir(mode=0o700)
        _gpg(home, "--passphrase", "", "--quick-gen-key", f"{who} <{who}@example.invalid>", "ed25519", "sign", "never")
        (base / f"{who}.gpg").write_bytes(_gpg(home, "--export"))
        keys[who] = home
    (base / "signer.asc").write_bytes(_gpg(keys["signer"], "--armor", "--export"))

    class Signer:
        home = keys["signer"]
        keyring = base / "signer.gpg"
        armoured = base / "signer.asc"
        stranger = base / "stranger.gpg"

        @staticmethod
        def clearsign(text):
            return _gpg(keys["signer"], "--clearsign", stdin=text.encode()).decode()

        @staticmethod
        def detach(data, armor=False):
            return _gpg(keys["signer"], "--detach-sign", *(["--armor"] if armor else []), stdin=data)
    yield Signer
    for home in keys.values():  # key generation and signing started a gpg-agent per home: end them
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)


def test_clearsigned_file_verifies_and_only_the_signed_text_is_returned(signer):
    signed = signer.clearsign(UBUNTU_SHA256SUMS)
    injected = signed + "0000000000000000000000000000000000000000000000000000000000000000 *evil.iso\n"
    result = verify_signature(injected, keyring=signer.keyring, source="SHA256SUMS")
    assert result.text == UBUNTU_SHA256SUMS and len(result.fingerprints) == 1
    assert "evil.iso" not in ChecksumFile.parse(result.text)
    assert "evil.iso" in ChecksumFile.parse(injected)  # why the verified text, not the file, must be parsed


def test_tampered_clearsigned_file_is_refused(signer):
    signed = signer.clearsign(UBUNTU_SHA256SUMS).replace("9bc60288", "9bc60289")
    with pytest.raises(ChecksumError, match=r"^https://x/SHA256SUMS: signature verification .* failed: BADSIG"):
        verify_signature(signed, keyring=signer.keyring, source="https://x/SHA256SUMS")


def test_detached_signatures_binary_and_armoured(signer):
    data = DEBIAN_SHA256SUMS.encode()
    assert verify_signature(data, signer.detach(data), keyring=signer.keyring).text == DEBIAN_SHA256SUMS
    assert verify_signature(data, signer.detach(data, armor=True), keyring=signer.armoured).text == DEBIAN_SHA256SUMS
    with pytest.raises(ChecksumError, match="BADSIG"):
        verify_signature(data + b"\n", signer.detach(data), keyring=signer.keyring)


def test_a_key_outside_the_keyring_is_not_trusted(signer):
    data = DEBIAN_SHA256SUMS.encode()
    with pytest.raises(ChecksumError, match="failed: ERRSIG"):
        verify_signature(data, signer.detach(data), keyring=signer.stranger)
    with pytest.raises(ChecksumError, match="no signature found"):
        verify_signature(UBUNTU_SHA256SUMS, keyring=signer.keyring)  # not signed at all
    with pytest.raises(ChecksumError, match="does not exist"):
        verify_signature(data, keyring=signer.keyring.with_name("missing.gpg"))


def test_resolve_checksum_verifies_a_detached_signature_on_the_mirror(iso_mirror, signer):
    item = iso_mirror.items["debian-12"]
    sums = iso_mirror.root / item.checksum_path.lstrip("/")
    sig = sums.with_name("SHA256SUMS.sign")
    sig.write_bytes(signer.detach(sums.read_bytes()))  # the mirror serves any file under its root
    iso = _source(iso_mirror, "debian-12")
    upstream_sig = "https:/" + item.checksum_path + ".sign"
    found = resolve_checksum(iso, keyring=signer.keyring, signature_url=upstream_sig)
    assert found.hex == iso_mirror.sha256("debian-12")
    assert iso_mirror.hits[(item.checksum_path + ".sign", 200)] == 1  # fetched through the mirror
    with pytest.raises(ChecksumError, match="ERRSIG"):
        resolve_checksum(iso, keyring=signer.stranger, signature_url=upstream_sig)
    iso_mirror.publish("debian-12")  # the checksum file changes, the old signature no longer matches
    with pytest.raises(ChecksumError, match="BADSIG"):
        resolve_checksum(iso, keyring=signer.keyring, signature_url=upstream_sig)


def test_gnu_escaped_names():
    # coreutils marks a line whose name holds a backslash or newline with a leading backslash
    line = "\\" + "aa" * 32 + "  we\\\\ird\\nname.iso\n"
    assert ChecksumFile.parse(line).names == ["we\\ird\nname.iso"]


def _signed_catalog(tmp_path, item, keyring_bytes):
    """A catalog whose debian-12 ISO (the mirror item's paths) names KEYRING and a detached signature; the keyring
    file keys/debian.gpg holds `keyring_bytes`."""
    from support.mirror import signed_catalog

    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys/debian.gpg").write_bytes(keyring_bytes)
    return signed_catalog("debian-12", item, "KEYRING", item.checksum_path + ".sign")


def test_catalog_keyring_is_used_by_staging_resolution(iso_mirror, signer, tmp_path, monkeypatch):
    """keyring + signature_url in the catalog reach the resolver staging uses (and a bad path is named)."""
    from packer_assets.catalog import CatalogError, load_catalog
    from packer_assets.pve import staging

    item = iso_mirror.items["debian-12"]
    sums = iso_mirror.root / item.checksum_path.lstrip("/")
    sums.with_name("SHA256SUMS.sign").write_bytes(signer.detach(sums.read_bytes()))
    text = _signed_catalog(tmp_path, item, signer.keyring.read_bytes())
    catalog_file = tmp_path / "catalog.yaml"
    catalog_file.write_text(text.replace("KEYRING", "keys/debian.gpg"))
    env = {"PACKER_ASSETS_ISO_MIRROR": iso_mirror.base_url}
    iso = load_catalog(catalog_file, env=env, project_dir=tmp_path).get("debian-12").iso
    assert iso.keyring_path == (tmp_path / "keys/debian.gpg").resolve()
    resolved = resolve_checksum(iso, keyring=iso.keyring_path, signature_url=iso.signature_url)
    assert resolved.hex == iso_mirror.sha256("debian-12")
    seen = {}

    def spy(iso_arg, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before touching the API")

    monkeypatch.setattr(staging, "resolve_checksum", spy)
    with pytest.raises(RuntimeError, match="stop before"):
        staging.stage_iso(None, "pve1", "local", iso)
    assert (seen["keyring"], seen["signature_url"]) == (iso.keyring_path, iso.signature_url)
    catalog_file.write_text(text.replace("KEYRING", "keys/missing.gpg"))
    with pytest.raises(CatalogError, match=r"debian-12: iso.keyring: file keys/missing.gpg does not exist"):
        load_catalog(catalog_file, env=env, project_dir=tmp_path)


def test_a_mirror_that_signs_its_checksum_files_is_verified_against_its_own_keyring(iso_mirror, signer, tmp_path):
    """PACKER_ASSETS_ISO_MIRROR_KEYRING: the mirror re-signed the checksum file (upstream's key, the stranger
    here, cannot verify it): with the setting the mirror's keyring verifies it and the ISO says so; without
    it the catalog's keyring is used against the mirror's files and fails; bad settings are one line."""
    from packer_assets.catalog import MIRROR_KEYRING_ENV, CatalogError, load_catalog

    item = iso_mirror.items["debian-12"]
    sums = iso_mirror.root / item.checksum_path.lstrip("/")
    sums.with_name("SHA256SUMS.sign").write_bytes(signer.detach(sums.read_bytes()))  # the mirror's own signature
    catalog_file = tmp_path / "catalog.yaml"
    catalog_file.write_text(_signed_catalog(tmp_path, item, signer.stranger.read_bytes()).replace("KEYRING", "keys/debian.gpg"))
    env = {"PACKER_ASSETS_ISO_MIRROR": iso_mirror.base_url, MIRROR_KEYRING_ENV: str(signer.keyring)}
    iso = load_catalog(catalog_file, env=env, project_dir=tmp_path).get("debian-12").iso
    assert iso.signature_keyring == signer.keyring.resolve()
    assert iso.signed_by == f"mirror: {signer.keyring.resolve()} ({MIRROR_KEYRING_ENV})" == iso.provenance()["signed_by"]
    found = resolve_checksum(iso, keyring=iso.signature_keyring, signature_url=iso.signature_url)
    assert found.hex == iso_mirror.sha256("debian-12")

    upstream = load_catalog(catalog_file, env={"PACKER_ASSETS_ISO_MIRROR": iso_mirror.base_url}, project_dir=tmp_path)
    iso = upstream.get("debian-12").iso
    assert iso.signature_keyring == (tmp_path / "keys/debian.gpg").resolve()
    assert iso.signed_by == "upstream: keys/debian.gpg (the catalog's keyring)"
    with pytest.raises(ChecksumError, match="ERRSIG"):
        resolve_checksum(iso, keyring=iso.signature_keyring, signature_url=iso.signature_url)

    for bad, said in (({MIRROR_KEYRING_ENV: str(signer.keyring)}, "needs PACKER_ASSETS_ISO_MIRROR"),
                      ({**env, MIRROR_KEYRING_ENV: "keys/none.gpg"}, "keys/none.gpg: no such file")):
        with pytest.raises(CatalogError) as err:
            load_catalog(catalog_file, env=bad, project_dir=tmp_path)
        assert str(err.value) == f"catalog.yaml: environment: {MIRROR_KEYRING_ENV}: " + str(err.value).split(": ", 3)[3]
        assert said in str(err.value) and "\n" not in str(err.value)


def test_an_iso_without_a_keyring_stays_unsigned_with_the_mirror_keyring(iso_mirror, signer, tmp_path):
    """The mirror's keyring replaces a keyring the catalog names; it never makes an unsigned source signed."""
    from packer_assets.catalog import MIRROR_KEYRING_ENV, load_catalog

    text = _signed_catalog(tmp_path, iso_mirror.items["debian-12"], signer.keyring.read_bytes())
    (tmp_path / "catalog.yaml").write_text("\n".join(ln for ln in text.splitlines() if "KEYRING" not in ln
                                                     and "signature_url" not in ln))
    env = {"PACKER_ASSETS_ISO_MIRROR": iso_mirror.base_url, MIRROR_KEYRING_ENV: str(signer.keyring)}
    iso = load_catalog(tmp_path / "catalog.yaml", env=env, project_dir=tmp_path).get("debian-12").iso
    assert (iso.keyring, iso.signature_keyring, iso.signed_by) == (None, None, None)
