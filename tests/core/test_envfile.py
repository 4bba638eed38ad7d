import stat
import subprocess

import pytest

from packer_assets.config.envfile import EnvFileError, parse, read_env_file, write_env_file
from support.settings_cli import settings_command

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


SECRET = "Sup3rS3cretPw"
# (file text, line named, variable named or None): each is a mistake a person makes writing a secret by hand
MALFORMED = [
    (f"A=1\nPROXMOX_BOOTSTRAP_PASSWORD= {SECRET}\n", 2, "PROXMOX_BOOTSTRAP_PASSWORD"),  # a blank after =
    (f"PROXMOX_TOKEN_SECRET=a b9f0{SECRET}\n", 1, "PROXMOX_TOKEN_SECRET"),  # a blank inside
    (f"A=1\nPROXMOX_BOOTSTRAP_PASSWORD=\n{SECRET}\n", 3, "PROXMOX_BOOTSTRAP_PASSWORD"),  # wrapped onto a line
    (f"PROXMOX_TOKEN_SECRET='{SECRET}' '{SECRET}'\n", 1, "PROXMOX_TOKEN_SECRET"),  # quoted in two pieces
    (f"A=1\nPROXMOX_TOKEN_SECRET='{SECRET}\n", 2, "PROXMOX_TOKEN_SECRET"),  # unterminated '
    (f'PROXMOX_TOKEN_SECRET="{SECRET}\\"\nB=2\n', 1, "PROXMOX_TOKEN_SECRET"),  # unterminated " (escaped)
    (f"A=1\n'{SECRET}\n", 2, None),  # an unterminated quote that starts no assignment
    (f"export {SECRET}\n", 1, None),  # export prefix, no assignment
    (f"export\nPROXMOX_TOKEN_SECRET={SECRET}\n", 1, None),  # export alone on its line
    (f"PROXMOX_TOKEN_SECRET={SECRET} export\n", 1, "PROXMOX_TOKEN_SECRET"),
    (f"1PROXMOX={SECRET}\n", 1, None),  # not a variable name
    (f"PROXMOX-TOKEN={SECRET}\n", 1, None),
    (f"{SECRET}\n", 1, None),  # a bare word
    (f"PROXMOX_TOKEN_SECRET={SECRET}\0x\n", 1, "PROXMOX_TOKEN_SECRET"),  # NUL
]


@pytest.mark.parametrize("text, line, variable", MALFORMED)
def test_malformed_lines_name_file_line_and_variable_never_the_value(tmp_path, monkeypatch, capsys, text, line,
                                                                    variable):
    path = tmp_path / "bad.env"
    path.write_text(text)
    with pytest.raises(EnvFileError) as err:
        read_env_file(path)
    message = str(err.value)
    assert SECRET not in message and "Sup3r" not in message and "\n" not in message
    assert message.startswith(f"{path}: line {line}: ")
    if variable:
        assert variable in message
    # `packer-assets settings` with the file named: that one line on stderr, nothing else anywhere
    assert settings_command(monkeypatch, capsys, tmp_path, PACKER_ASSETS_ENV_FILE=str(path)) == \
        (2, "", f"packer-assets: {message}\n")


def test_unreadable_files_are_one_line_without_their_text(tmp_path):
    binary = tmp_path / "binary.env"
    binary.write_bytes(f"A=1\nPROXMOX_TOKEN_SECRET={SECRET}\xff\n".encode("latin-1"))
    for path, said in ((tmp_path / "missing.env", "no such env file"), (tmp_path, "cannot read the env file"),
                       (binary, "line 2: not UTF-8 text")):
        with pytest.raises(EnvFileError, match=said) as err:
            read_env_file(path)
        assert str(err.value).startswith(f"{path}: ") and SECRET not in str(err.value)


HAND_WRITTEN = [
    "A=plain",
    'A="double \\$ \\` \\" \\\\ \\x"',
    "A='single $x \\ \"'",
    "A='it'\\''s'",
    "A=b#not-a-comment",
    "A=x # a comment",
    "A=one\\\ntwo",
    'A="one\\\ntwo"',
    "A='one\ntwo'",
    "export A=1 B=2",
    "A=",
    "A=x\\ y",
]


@pytest.mark.parametrize("text", HAND_WRITTEN)
def test_hand_written_lines_read_as_bash_reads_them(text):
    """Differential: our reading of each line equals what bash `source` sets."""
    ours = parse(text + "\n")
    script = 'source /dev/stdin; for n in ' + " ".join(ours) + '; do printf "%s\\0" "${!n}"; done'
    out = subprocess.run(["bash", "-c", script], input=text + "\n", capture_output=True, text=True, check=True)
    assert out.stdout.split("\0")[:-1] == list(ours.values())


def test_bad_names_and_nul_are_refused(tmp_path):
    with pytest.raises(EnvFileError, match="bad variable name"):
        write_env_file(tmp_path / "x", {"A-B": "1"})
    with pytest.raises(EnvFileError, match="NUL"):
        write_env_file(tmp_path / "x", {"A": "a\0b"})
    assert not (tmp_path / "x").exists()
