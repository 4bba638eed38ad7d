"""The upstream keys shipped under templates/keys/ parse, and hold exactly the fingerprints templates/keys/SOURCES.md documents."""

import re
import shutil
import subprocess

import pytest

from support import REPO

KEYS = REPO / "templates/keys"
# What upstream documents (templates/keys/SOURCES.md says where): file -> {fingerprint: uid}
EXPECTED = {
    "debian-cd.asc": {
        "DF9B9C49EAA9298432589D76DA87E80D6294BE9B": "Debian CD signing key <debian-cd@lists.debian.org>",
        "10460DAD76165AD81FBC0CE9988021A964E6EA7D": "Debian CD signing key <debian-cd@lists.debian.org>",
    },
    "ubuntu-cdimage.asc": {
        "843938DF228D22F7B3742BC0D94AA3F0EFE21092": "Ubuntu CD Image Automatic Signing Key (2012) <cdimage@ubuntu.com>",
    },
    "rocky-10.asc": {
        "FC226859C0860BF0DDB95B085B106C736FEDFC85": "Release Engineering (Rocky Linux 10) <releng@rockylinux.org>",
    },
}


def primary_keys(path, tmp_path):
    """{primary fingerprint: first uid} of the keys in `path`, as gpg reads them (a throw-away home)."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    out = subprocess.run(["gpg", "--batch", "--homedir", str(home), "--with-colons", "--show-keys", str(path)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    keys, current, want_fpr = {}, None, False
    for fields in (line.split(":") for line in out.splitlines()):
        if fields[0] == "pub":
            want_fpr = True
        elif fields[0] == "fpr" and want_fpr:
            current, want_fpr = fields[9], False
            keys[current] = None
        elif fields[0] == "uid" and current and keys[current] is None:
            keys[current] = fields[9]
    return keys


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_shipped_key_parses_and_has_the_documented_fingerprints(name, tmp_path):
    if not shutil.which("gpg"):
        pytest.skip("needs gpg: apt-get install gnupg (make test installs it)")
    assert primary_keys(KEYS / name, tmp_path) == EXPECTED[name]


def test_sources_md_documents_every_shipped_key_and_its_fingerprints():
    sources = (KEYS / "SOURCES.md").read_text()
    assert sorted(p.name for p in KEYS.iterdir() if p.suffix in (".asc", ".gpg")) == sorted(EXPECTED)
    documented = {re.sub(r"\s", "", f) for f in re.findall(r"`((?:[0-9A-F]{4} ){9}[0-9A-F]{4})`", sources)}
    assert {f for keys in EXPECTED.values() for f in keys} <= documented
