"""`proxmox_env` in the core: bootstrap, env files, init log and proof bundle under one chain ID.

The toolkit's outputs, path for path: `infra/env/.env.proxmox` and `control/secrets.env` (0600,
atomic), `output/logs/packer/init/<ts>/init-packer.log` and
`docs/proof/platform/packer-builds/init/<ts>/` (README.md, proof.json, the log), each with `latest`.
A failed init keeps its log, writes no proof and leaves both env files as they were.

How the role, user, token and discovery come about is pluggable (a `Bootstrapper`): over the API
as an admin (`ApiBootstrap`, what an `AdminLogin` means) or over SSH as root on the node
(`packer_assets.pve.ssh.SshBootstrap`). The log, env files and proof are the same for both.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from packer_assets import __version__
from packer_assets.config.envfile import read_env_file, write_env_file
from packer_assets.evidence.chain import ChainId
from packer_assets.evidence.layout import Layout, Redactor, RunLog, atomic_write, sha256_file
from packer_assets.evidence.proof import InitProof, write_init_proof
from packer_assets.evidence.signing import Signer
from packer_assets.pve.bootstrap import BootstrapConfig, BootstrapResult, bootstrap, env_file_values
from packer_assets.pve.client import Endpoint

SECRET_KEY = "PROXMOX_TOKEN_SECRET"
# Packer's password login as the automation user (Packer < 1.7.1), kept beside the token secret.
BUILD_USER_KEY, BUILD_PASSWORD_KEY = "PROXMOX_BUILD_USER", "PROXMOX_BUILD_PASSWORD"
# The node's CA as the SSH path fetches it; PROXMOX_CA_FILE points here unless trust was configured.
CA_FILE = Path("infra/env/pve-root-ca.pem")


@dataclass(frozen=True)
class AdminLogin:
    """Bootstrap credentials: root's password or an admin token (never logged)."""

    user: str = "root@pam"
    password: str | None = field(default=None, repr=False)
    token_name: str | None = None
    token_secret: str | None = field(default=None, repr=False)

    @property
    def who(self) -> str:
        return f"{self.user}!{self.token_name}" if self.token_name else self.user


class Bootstrapper(Protocol):
    """One way to bootstrap. Called with the endpoint, the config, the secret we hold (or None),
    save_secret (call it the moment a new secret exists) and note (a line for the init log)."""

    method: str  # "api" | "ssh", recorded in the proof
    fetches_ca: bool  # True: the result carries the node's CA (ca_pem)

    def describe(self, endpoint: Endpoint) -> str: ...

    def secrets(self) -> list[str | None]: ...

    def __call__(
        self,
        endpoint: Endpoint,
        config: BootstrapConfig,
        known_secret: str | None,
        save_secret: Callable[[str], None],
        note: Callable[[str], object],
        known_password: str | None = None,
        save_password: Callable[[str], None] | None = None,
    ) -> BootstrapResult: ...


@dataclass(frozen=True)
class ApiBootstrap:
    """The API path: an admin login (root@pam's password or an admin token) does it all over HTTPS."""

    admin: AdminLogin
    method = "api"
    fetches_ca = False

    def describe(self, endpoint: Endpoint) -> str:
        return f"bootstrap {endpoint.base} as {self.admin.who}"

    def secrets(self) -> list[str | None]:
        return [self.admin.password, self.admin.token_secret]

    def __call__(
        self,
        endpoint: Endpoint,
        config: BootstrapConfig,
        known_secret: str | None,
        save_secret: Callable[[str], None],
        note: Callable[[str], object],
        known_password: str | None = None,
        save_password: Callable[[str], None] | None = None,
    ) -> BootstrapResult:
        admin = self.admin
        return bootstrap(
            endpoint,
            admin.user,
            admin_password=admin.password,
            admin_token_name=admin.token_name,
            admin_token_secret=admin.token_secret,
            known_secret=known_secret,
            config=config,
            save_secret=save_secret,
            known_password=known_password,
            save_password=save_password,
        )


@dataclass(frozen=True)
class InitOutcome:
    result: BootstrapResult
    env_file: Path
    secrets_file: Path
    log_file: Path
    proof_dir: Path
    proof: dict[str, Any]  # InitProof.model_dump(mode="json")


def _secrets(layout: Layout) -> dict[str, str]:
    return read_env_file(layout.secrets_file) if layout.secrets_file.exists() else {}


def known_secret(layout: Layout) -> str | None:
    return _secrets(layout).get(SECRET_KEY) or None


def known_build_password(layout: Layout, user: str) -> str | None:
    values = _secrets(layout)
    return (values.get(BUILD_PASSWORD_KEY) or None) if values.get(BUILD_USER_KEY) == user else None


def save_secrets(layout: Layout, **values: str) -> None:
    """Update control/secrets.env (0600, atomic), keeping any other secrets the toolkit kept there."""
    merged = {**_secrets(layout), **values}
    write_env_file(layout.secrets_file, merged, header="API token secret for packer-assets (mode 0600)")


def save_secret(layout: Layout, token_id: str, secret: str) -> None:
    save_secrets(layout, PROXMOX_TOKEN_ID=token_id, PROXMOX_TOKEN_SECRET=secret)


def explicit_trust(endpoint: Endpoint) -> bool:
    return bool(endpoint.ca_file or endpoint.tls_fingerprint or endpoint.insecure)


def run_init(
    layout: Layout,
    endpoint: Endpoint,
    admin: "AdminLogin | Bootstrapper",
    config: BootstrapConfig,
    chain: ChainId,
    run_id: str | None = None,
    echo: Callable[[str], object] | None = None,
    signer: Signer | None = None,
) -> InitOutcome:
    """admin: an AdminLogin (the API path) or any Bootstrapper (e.g. SshBootstrap); signer: signs the
    proof bundle's manifest when given."""
    method = ApiBootstrap(admin) if isinstance(admin, AdminLogin) else admin
    started = datetime.now(UTC)
    secret = known_secret(layout)
    password = known_build_password(layout, config.user) if config.build_password else None
    # Redactor.add skips empty values anyway: only the ones given are passed.
    redact = Redactor([value for value in (*method.secrets(), secret, password) if value])
    ca_path = (layout.output_root / CA_FILE).absolute()  # absolute: the env file is read from anywhere
    use_fetched_ca = method.fetches_ca and not explicit_trust(endpoint)
    # Without configured trust, the CA an earlier run fetched is what proves the known secret over TLS.
    if use_fetched_ca and ca_path.exists():
        endpoint = replace(endpoint, ca_file=str(ca_path))
    log_file = layout.init_log_dir(chain.stamp) / "init-packer.log"
    with RunLog(log_file, str(chain), redact, echo) as log:
        log.line(
            "init",
            f"{method.describe(endpoint)}: user {config.user}, role {config.role}, "
            f"token {config.token_id} (privsep={int(config.privsep)}, rotate={int(config.rotate)})",
        )

        def keep_secret(new: str) -> None:
            redact.add(new)
            save_secret(layout, config.token_id, new)

        def keep_password(new: str) -> None:
            redact.add(new)
            save_secrets(layout, **{BUILD_USER_KEY: config.user, BUILD_PASSWORD_KEY: new})

        try:
            result = method(
                endpoint,
                config,
                secret,
                keep_secret,
                lambda text: log.line(method.method, text),
                known_password=password,
                save_password=keep_password,
            )
        except Exception as exc:
            log.line("error", f"{type(exc).__name__}: {exc}")
            raise
        redact.add(result.token_secret)
        if result.ca_pem:
            atomic_write(ca_path, result.ca_pem)
            log.line("init", f"wrote the node's CA certificate to {ca_path}")
            if use_fetched_ca:
                # The CA came over an SSH connection whose host key was verified: TLS is verified from now on.
                endpoint = replace(endpoint, ca_file=str(ca_path))
        write_env_file(
            layout.env_file,
            env_file_values(result, endpoint),
            header=f"Written by packer-assets proxmox_env ({chain}); mode 0600, holds the token secret",
        )
        for change in result.changes or ["nothing to change"]:
            log.line("init", change)
        log.line("init", f"PVE {result.pve_version}; token {result.token_id} {result.token_action}")
        if result.build_password_action:
            log.line(
                "init",
                f"Packer logs in as {config.user} with a password ({result.build_password_action}; "
                f"in {layout.secrets_file})",
            )
        log.line("discover", ", ".join(f"{k}={v}" for k, v in asdict(result.discovery).items()))
        log.line("init", f"wrote {layout.env_file} and {layout.secrets_file}")
    proof = InitProof(
        bootstrap=method.method,
        chain_id=str(chain),
        dagster_run_id=run_id,
        tool_version=__version__,
        started_at=started,
        finished_at=datetime.now(UTC),
        api_url=endpoint.api_url,
        tls="ca_file"
        if endpoint.ca_file
        else "fingerprint"
        if endpoint.tls_fingerprint
        else "insecure"
        if endpoint.insecure
        else "system",
        pve_version=result.pve_version,
        token_id=result.token_id,
        token_action=result.token_action,
        build_login=f"password as {config.user}" if result.build_password_action else "token",
        role=config.role,
        privileges=list(result.privileges),
        changes=result.changes,
        discovery=asdict(result.discovery),
        env_file=str(layout.env_file.relative_to(layout.output_root)),
        log_sha256=sha256_file(log_file),
    )
    proof_dir = write_init_proof(layout, proof, log_file, signer)
    return InitOutcome(result, layout.env_file, layout.secrets_file, log_file, proof_dir, proof.model_dump(mode="json"))
