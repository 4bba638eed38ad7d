"""The lab's PKI: a CA and a server certificate it signs, so clients verify TLS instead of turning it off.

fakepve's own certificate is self-signed with CA=false: Python accepts it as a trust anchor, Go does
not. A real CA that signs the server certificate satisfies both (proxmoxer `verify_ssl=<ca_file>`,
Go programs such as packer `SSL_CERT_FILE=<ca_file>`).
"""

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
# Long enough for any lab session, short enough that a leaked file is soon worthless.
VALID_DAYS = 30


@dataclass(frozen=True)
class LabPki:
    """Paths of the PEM files, and the server certificate's fingerprint as PVE shows it (AA:BB:...)."""

    ca_file: str
    cert_file: str
    key_file: str
    fingerprint_sha256: str


def cert_fingerprint(der):
    """SHA-256 of a DER certificate, colon-separated upper-case hex (PVE's ssl_fingerprint format)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return ":".join(f"{b:02X}" for b in digest.finalize())


def _name(common_name):
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "packer-assets lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts):
    entries = []
    for host in hosts:
        try:
            entry = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in entries:
            entries.append(entry)
    return x509.SubjectAlternativeName(entries)


def _write(path, data, private=False):
    # Keys are created 0600 from the start, whatever the umask: no window where others can read them.
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        os.chmod(path, mode)
        out.write(data)


def _key_usage(**on):
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


def make_lab_pki(directory, hosts=DEFAULT_HOSTS):
    """Write ca.crt, server.crt and server.key into directory; the server certificate names `hosts`.

    The CA's private key is never written: nothing else needs to be signed, so it dies with this call.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("packer-assets lab CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    ca_file, cert_file, key_file = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    _write(ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    _write(
        key_file,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        private=True,
    )
    return LabPki(
        str(ca_file), str(cert_file), str(key_file), cert_fingerprint(cert.public_bytes(serialization.Encoding.DER))
    )


SIGNING_KEY_ID = "lab-signer@packer-assets"


@dataclass(frozen=True)
class LabSigningKey:
    """The key that signs the lab's proof bundles, and the allowed_signers file that trusts it."""

    key_file: Path
    allowed_signers: Path
    key_id: str = SIGNING_KEY_ID


def make_signing_key(folder: Path) -> LabSigningKey:
    """An Ed25519 OpenSSH key (0600) kept across restarts, and `allowed_signers` naming it for proofs."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "proof-signing-ed25519"
    if not key_file.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
    private = serialization.load_ssh_private_key(key_file.read_bytes(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    allowed = folder / "allowed_signers"
    allowed.write_text(f'{SIGNING_KEY_ID} namespaces="packer-assets-proof" {public.decode()}\n')
    return LabSigningKey(key_file, allowed)
