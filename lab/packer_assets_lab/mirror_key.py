"""The lab mirror's OpenPGP signing key: invented, a lab key and no upstream's (its uid says so).

The mirror writes its own checksum files, so no upstream signature can cover them; like a site mirror it
signs them itself, and the project verifies them against this key's public keyring
(PACKER_ASSETS_ISO_MIRROR_KEYRING). The key lives under the mirror's root in a dot directory (never served):
`secret.asc` (no passphrase: a lab key) and `keyring.gpg` (the public keyring), so a restarted mirror signs
with the same key. gpg runs in a throw-away GNUPGHOME under the system's temp directory: gpg-agent's socket
sits in the home, and a deep lab state path would pass the 107-byte socket path limit. The agent each run
starts is ended before the home is removed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from packer_assets.errors import OperationError

UID = "packer-assets lab mirror (invented lab key, not an upstream key) <lab-mirror@lab.invalid>"
GPG_TIMEOUT = 60  # key generation and a signature take well under a second


class MirrorKeyError(OperationError):
    """gpg could not make or use the lab mirror's key; the message says what gpg said."""


@contextmanager
def _gpg_home() -> Iterator[Path]:
    if not shutil.which("gpg"):
        raise MirrorKeyError("the lab mirror signs checksum files with gpg: apt-get install gnupg")
    home = Path(tempfile.mkdtemp(prefix="lab-gpg-"))
    try:
        yield home
    finally:
        try:  # bounded: a wedged agent must not hang the lab; the folder goes either way
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "all"],
                capture_output=True,
                check=False,
                timeout=GPG_TIMEOUT,
            )
        except (OSError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(home, ignore_errors=True)


def _gpg(home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    cmd = ["gpg", "--batch", "--no-tty", "--homedir", str(home), "--pinentry-mode", "loopback", "--passphrase", ""]
    try:
        out = subprocess.run([*cmd, *args], input=stdin, capture_output=True, timeout=GPG_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise MirrorKeyError(f"gpg {args[0]}: no answer within {GPG_TIMEOUT} s") from None
    if out.returncode != 0:
        said = out.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {out.returncode}"]
        raise MirrorKeyError(f"gpg {args[0]}: {said[0]}")
    return out.stdout


@dataclass(frozen=True)
class MirrorKey:
    """The lab mirror's key in `directory` (made on first use)."""

    directory: Path

    @property
    def secret_file(self) -> Path:
        return self.directory / "secret.asc"

    @property
    def keyring(self) -> Path:
        """The public keyring (binary): what PACKER_ASSETS_ISO_MIRROR_KEYRING names."""
        return self.directory / "keyring.gpg"

    def ensure(self) -> MirrorKey:
        if self.secret_file.is_file() and self.keyring.is_file():
            return self
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _gpg_home() as home:
            _gpg(home, "--quick-gen-key", UID, "ed25519", "sign", "never")
            self.keyring.write_bytes(_gpg(home, "--export"))
            self.secret_file.write_bytes(_gpg(home, "--armor", "--export-secret-keys"))
        return self

    def sign(self, texts: list[bytes], *, clear: bool) -> list[bytes]:
        """An armoured signature of each text: clearsigned texts (clear) or detached signatures."""
        self.ensure()
        with _gpg_home() as home:
            _gpg(home, "--import", str(self.secret_file))
            how = "--clearsign" if clear else "--detach-sign"
            return [_gpg(home, "--armor", how, stdin=text) for text in texts]
