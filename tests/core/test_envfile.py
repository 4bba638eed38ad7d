import stat
import subprocess

import pytest

from packer_assets.envfile import EnvFileError, parse, read_env_file, write_env_file

TRICKY = {
    "PLAIN": "value",
    "SPACES": "two  words ",
    "QUOTES": "it's \"quoted\"",
    "SHELL": "$HOME `id` $(id) \\n ; & | * ?",
    "NEWLINE": "line1\nline2",
    "EMPTY": "",
    "UNICODE": "pässwörd-✓",
    "SECRET": "a'b\"c$d\\e!f#g",
}


def test_bash_source_reads_back_every_value_exactly(tmp_path):
    path = write_env_file(tmp_path / "x.env", TRICKY)
    script = 'source "$1"; for n in ' + " ".join(TRICKY) + '; do printf "%s\\0" "${!n}"; done'
    out = subprocess.run(["bash", "-c", script, "bash", str(path)], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == list(TRICKY.values())


def test_python_reads_back_what_it_wrote(tmp_path):
    path = write_env_file(tmp_path / "x.env", TRICKY, header="written by a test")
    assert read_env_file(path) == TRICKY


def test_secret_files_are_0600_and_others_0644(tmp_path):
    assert stat.S_IMODE(write_env_file(tmp_path / "s", {"A": "1"}).stat().st_mode) == 0o600
    assert stat.S_IMODE(write_env_file(tmp_path / "p", {"A": "1"}, secret=False).stat().st_mode) == 0o644


def test_hand_written_toolkit_style_files_load():
    text = '# comment\nPROXMOX_NODE=pve1\nexport PROXMOX_BRIDGE="vmbr0"  # trailing\nEMPTY=\n'
    assert parse(text) == {"PROXMOX_NODE": "pve1", "PROXMOX_BRIDGE": "vmbr0", "EMPTY": ""}


@pytest.mark.parametrize(
    "text, message",
    [("A='open\n", "No closing quotation"), ("just words\n", "not a KEY=value"), ("1A=x\n", "not a KEY=value")],
)
def test_malformed_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad.env"
    path.write_text(text)
    with pytest.raises(EnvFileError, match=message) as err:
        read_env_file(path)
    assert str(path) in str(err.value)


def test_bad_names_and_nul_are_refused(tmp_path):
    with pytest.raises(EnvFileError, match="bad variable name"):
        write_env_file(tmp_path / "x", {"A-B": "1"})
    with pytest.raises(EnvFileError, match="NUL"):
        write_env_file(tmp_path / "x", {"A": "a\0b"})
    assert not (tmp_path / "x").exists()
