"""The lab's ISO mirror: real ISOs, both checksum formats, HTTP caching, releases, corruption."""

import hashlib
import posixpath
import re
import subprocess

import pycdlib
import pytest
import requests
from packer_assets_lab.iso import make_iso
from packer_assets_lab.mirror import IsoMirror, MirrorItem

from packer_assets.render import read_iso


# Independent parsers: the test must not trust the mirror's own formatting code.
def parse_gnu(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        assert m, f"not a GNU checksum line: {line!r}"
        out[m.group(2)] = m.group(1)
    return out


def parse_bsd(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"SHA256 \((.+)\) = ([0-9a-f]{64})", line)
        assert m, f"not a BSD checksum line: {line!r}"
        out[m.group(1)] = m.group(2)
    return out


def get(url, **headers):
    return requests.get(url, headers=headers, timeout=10)


def dir_url(mirror, key):
    return posixpath.dirname(mirror.url(key))


def test_make_iso_reads_back_with_pycdlib(tmp_path):
    files = {"key.txt": b"ubuntu-2204\n", "release.txt": b"7\n"}
    path = make_iso(tmp_path / "x.iso", "LAB ubuntu-2204 R7", files)
    assert path.stat().st_size < 128 * 1024
    assert read_iso(path) == ("LAB_UBUNTU_2204_R7", files)


def test_both_checksum_formats_match_the_served_bytes(iso_mirror):
    for key in ("ubuntu-2204", "rocky-9", "rocky-9-boot", "windows-2022"):
        served = get(iso_mirror.url(key))
        assert served.status_code == 200
        digest = hashlib.sha256(served.content).hexdigest()
        name = posixpath.basename(iso_mirror.url(key))
        gnu = parse_gnu(get(dir_url(iso_mirror, key) + "/SHA256SUMS").text)
        bsd = parse_bsd(get(dir_url(iso_mirror, key) + "/CHECKSUM").text)
        assert gnu[name] == bsd[name] == digest == iso_mirror.sha256(key)
    # Both Rocky ISOs are listed in their shared directory, with different checksums.
    rocky = parse_bsd(get(iso_mirror.checksum_url("rocky-9")).text)
    assert set(rocky) == {"Rocky-9.4-x86_64-minimal.iso", "Rocky-9.4-x86_64-boot.iso"}
    assert len(set(rocky.values())) == 2


def test_pinned_item_gets_directory_sha256sums_url(iso_mirror):
    assert iso_mirror.checksum_url("windows-2022").endswith("/SHA256SUMS")
    assert get(iso_mirror.checksum_url("windows-2022")).status_code == 200


def test_other_checksum_basename_is_written_in_the_implied_format(tmp_path):
    items = [
        MirrorItem("alma-9", "/repo.almalinux.org/9/alma.iso", "/repo.almalinux.org/9/SHA256SUMS.txt"),
        MirrorItem("fedora", "/fedora/iso/fedora.iso", "/fedora/iso/Fedora-CHECKSUM"),
    ]
    with IsoMirror(tmp_path, items) as m:
        assert parse_gnu(get(m.checksum_url("alma-9")).text) == {"alma.iso": m.sha256("alma-9")}
        assert parse_bsd(get(m.checksum_url("fedora")).text) == {"fedora.iso": m.sha256("fedora")}


def test_served_iso_is_a_real_iso9660_carrying_its_key(iso_mirror, tmp_path):
    path = tmp_path / "dl.iso"
    path.write_bytes(get(iso_mirror.url("debian-12")).content)
    iso = pycdlib.PyCdlib()
    iso.open(str(path))  # raises on anything that is not ISO9660
    iso.close()
    _, files = read_iso(path)
    assert files["key.txt"] == b"debian-12\n"


def test_conditional_requests_get_304(iso_mirror):
    url = iso_mirror.checksum_url("ubuntu-2204")
    first = get(url)
    etag, last_modified = first.headers["ETag"], first.headers["Last-Modified"]
    assert etag.startswith('"') and first.headers["Content-Length"] == str(len(first.content))
    assert get(url, **{"If-None-Match": etag}).status_code == 304
    assert get(url, **{"If-Modified-Since": last_modified}).status_code == 304
    assert get(url, **{"If-None-Match": '"other"'}).status_code == 200
    # If-None-Match wins over a matching If-Modified-Since (RFC 9110).
    assert get(url, **{"If-None-Match": '"other"', "If-Modified-Since": last_modified}).status_code == 200
    path = iso_mirror.checksum_url("ubuntu-2204").removeprefix(iso_mirror.base_url)
    assert iso_mirror.hits[(path, 304)] == 2 and iso_mirror.hits[(path, 200)] == 3


def test_head_has_length_and_no_body(iso_mirror):
    head = requests.head(iso_mirror.url("ubuntu-2204"), timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(get(iso_mirror.url("ubuntu-2204")).content)
    assert iso_mirror.downloads("ubuntu-2204") == 1  # the HEAD did not count as a download


def test_unknown_and_hidden_paths_are_404(iso_mirror):
    assert get(iso_mirror.base_url + "/nope.iso").status_code == 404
    assert get(iso_mirror.base_url + "/.lab-mirror.json").status_code == 404
    assert get(iso_mirror.base_url + "/releases.ubuntu.com/../.lab-mirror.json").status_code == 404


def test_publish_changes_exactly_one_key(iso_mirror):
    keys = list(iso_mirror.items)
    before = {k: iso_mirror.sha256(k) for k in keys}
    sums_before = {k: get(iso_mirror.checksum_url(k)) for k in keys}
    iso_url = iso_mirror.url("rocky-9")
    iso_before = get(iso_url)

    new = iso_mirror.publish("rocky-9")

    assert new != before["rocky-9"] and iso_mirror.release("rocky-9") == 2
    assert {k: iso_mirror.sha256(k) for k in keys if k != "rocky-9"} == {
        k: v for k, v in before.items() if k != "rocky-9"
    }
    rocky_sums = get(iso_mirror.checksum_url("rocky-9"))
    assert parse_bsd(rocky_sums.text)["Rocky-9.4-x86_64-minimal.iso"] == new
    assert rocky_sums.headers["ETag"] != sums_before["rocky-9"].headers["ETag"]
    # Conditional requests now see the change, even within the same second as the first GET.
    old = sums_before["rocky-9"].headers
    assert get(iso_mirror.checksum_url("rocky-9"), **{"If-None-Match": old["ETag"]}).status_code == 200
    assert get(iso_mirror.checksum_url("rocky-9"), **{"If-Modified-Since": old["Last-Modified"]}).status_code == 200
    for k in ("ubuntu-2204", "debian-12", "windows-2022"):
        assert get(iso_mirror.checksum_url(k)).headers["ETag"] == sums_before[k].headers["ETag"]
    iso_after = get(iso_url)
    assert iso_after.headers["ETag"] != iso_before.headers["ETag"]
    assert hashlib.sha256(iso_after.content).hexdigest() == new
    assert iso_url == iso_mirror.url("rocky-9")  # same file name, new bytes


def test_corrupt_serves_bytes_not_matching_the_checksum(iso_mirror):
    key = "ubuntu-2204"
    sums = get(iso_mirror.checksum_url(key)).text
    published = parse_gnu(sums)["ubuntu-22.04.5-live-server-amd64.iso"]

    iso_mirror.corrupt(key)
    bad = get(iso_mirror.url(key))
    assert hashlib.sha256(bad.content).hexdigest() != published
    assert get(iso_mirror.checksum_url(key)).text == sums  # checksum files unchanged
    assert hashlib.sha256(get(iso_mirror.url("debian-12")).content).hexdigest() == iso_mirror.sha256("debian-12")

    iso_mirror.corrupt(key, False)
    assert hashlib.sha256(get(iso_mirror.url(key)).content).hexdigest() == published


def test_restart_on_same_root_keeps_checksums_and_releases(mirror_root, mirror_items):
    with IsoMirror(mirror_root, mirror_items) as m:
        m.publish("debian-12")
        sums = {k: m.sha256(k) for k in m.items}
        etag = get(m.checksum_url("debian-12")).headers
    with IsoMirror(mirror_root, mirror_items) as m2:
        assert {k: m2.sha256(k) for k in m2.items} == sums
        assert m2.release("debian-12") == 2 and m2.release("ubuntu-2204") == 1
        again = get(m2.checksum_url("debian-12")).headers
        assert (again["ETag"], again["Last-Modified"]) == (etag["ETag"], etag["Last-Modified"])


def test_iso_downloaded_once_then_only_304s(iso_mirror):
    url = iso_mirror.url("ubuntu-2204")
    etag = get(url).headers["ETag"]
    for _ in range(3):
        assert get(url, **{"If-None-Match": etag}).status_code == 304
    path = url.removeprefix(iso_mirror.base_url)
    assert iso_mirror.downloads("ubuntu-2204") == 1
    assert iso_mirror.hits == {(path, 200): 1, (path, 304): 3}


def test_bad_items_are_refused(tmp_path):
    with pytest.raises(ValueError, match="next to its ISO"):
        IsoMirror(tmp_path, [MirrorItem("k", "/a/k.iso", "/b/SHA256SUMS")])
    with pytest.raises(ValueError, match="duplicate"):
        IsoMirror(tmp_path, [MirrorItem("k", "/a/k.iso"), MirrorItem("k", "/a/j.iso")])


# ------------------------------------------------------------------ the mirror signs (its own invented key)

SIGNED = "/cdimage.debian.org/debian-cd/13.2.0/amd64/iso-cd"
CLEAR = "/releases.example.org/clear"


@pytest.fixture
def signed_items():
    """A detached signature (Debian's SHA256SUMS.sign) and a clearsigned checksum file, as the catalog names them."""
    return [
        MirrorItem("debian-13", f"{SIGNED}/debian-13.iso", f"{SIGNED}/SHA256SUMS", signature_path=f"{SIGNED}/SHA256SUMS.sign"),
        MirrorItem("clear", f"{CLEAR}/clear.iso", f"{CLEAR}/SHA256SUMS", clearsigned=True),
    ]


def verified(mirror, key, signature=None):
    """The checksum file's text as the product verifies it against the lab key's keyring (or raises)."""
    from packer_assets.upstream.checksums import verify_signature

    body = get(mirror.checksum_url(key)).content
    sig = get(mirror.base_url + signature).content if signature else None
    return verify_signature(body, sig, keyring=mirror.signing_key.keyring, source=key).text


def test_the_mirror_signs_the_checksum_files_the_catalog_names_with_its_invented_key(mirror_root, signed_items,
                                                                                     monkeypatch):
    from packer_assets.upstream.checksums import ChecksumError
    from packer_assets_lab.mirror_key import MirrorKey

    sign_path = f"{SIGNED}/SHA256SUMS.sign"
    with IsoMirror(mirror_root, signed_items) as m:
        assert get(m.base_url + sign_path).text.startswith("-----BEGIN PGP SIGNATURE-----")
        assert parse_gnu(verified(m, "debian-13", sign_path))["debian-13.iso"] == m.sha256("debian-13")
        assert get(m.checksum_url("clear")).text.startswith("-----BEGIN PGP SIGNED MESSAGE-----")
        assert m.sha256("clear") in verified(m, "clear")
        home = mirror_root.parent / "gnupg"
        home.mkdir(mode=0o700)
        assert "invented lab key" in subprocess.run(
            ["gpg", "--batch", "--homedir", str(home), "--show-keys", str(m.signing_key.keyring)],
            capture_output=True, text=True, check=True, timeout=30).stdout
        assert get(m.base_url + "/.lab-signing/secret.asc").status_code == 404  # the key is never served
        m.publish("debian-13")  # a new release: the file changes and is signed again
        assert parse_gnu(verified(m, "debian-13", sign_path))["debian-13.iso"] == m.sha256("debian-13")

    signed, real_sign = [], MirrorKey.sign

    def counted(self, texts, *, clear):  # a named point: which signatures the mirror makes
        signed.append(clear)
        return real_sign(self, texts, clear=clear)

    monkeypatch.setattr(MirrorKey, "sign", counted)
    with IsoMirror(mirror_root, signed_items) as m2:  # a restart keeps the key and signs no text signed before
        assert signed == []
        assert m2.sha256("clear") in verified(m2, "clear")
        m2.tamper_checksums("debian-13")
        with pytest.raises(ChecksumError, match="BADSIG"):
            verified(m2, "debian-13", sign_path)
        m2.tamper_checksums("clear")
        with pytest.raises(ChecksumError, match="BADSIG"):
            verified(m2, "clear")
    with IsoMirror(mirror_root, signed_items) as m3:  # the tampered files are written and signed anew
        assert sorted(signed) == [False, True]
        assert m3.sha256("clear") in verified(m3, "clear")
        assert parse_gnu(verified(m3, "debian-13", sign_path))["debian-13.iso"] == m3.sha256("debian-13")


def test_a_signature_needs_its_checksum_file(tmp_path):
    with pytest.raises(ValueError, match="give its checksum_path"):
        IsoMirror(tmp_path, [MirrorItem("k", "/a/k.iso", clearsigned=True)])
