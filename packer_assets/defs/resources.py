"""Resources: where the project writes and how it reaches Proxmox, built from the validated settings
(build_resources). Secrets are read when a run needs them (secret), never held in a resource's config."""

from collections.abc import Mapping
from pathlib import Path

import dagster as dg
from pydantic import Field

from packer_assets.build.pipeline import BuildSettings
from packer_assets.catalog import Catalog, load_catalog
from packer_assets.config.envfile import read_env_file
from packer_assets.config.settings import Settings, environment
from packer_assets.evidence.layout import Layout
from packer_assets.evidence.signing import Signer
from packer_assets.packer.version import BuildCredentials, PackerVersionError, detect_packer
from packer_assets.pve.bootstrap import BootstrapConfig, BuildAccess, build_access
from packer_assets.pve.client import Endpoint
from packer_assets.pve.init_env import AdminLogin, Bootstrapper
from packer_assets.pve.ssh import SshBootstrap, SshTarget


class ProjectSettings(dg.ConfigurableResource):
    """The output root for env files, logs, proofs and rendered files."""

    output_root: str = Field(default=".", description="output root (PACKER_ASSETS_ROOT)")
    signing_key: str | None = Field(
        default=None,
        description="Ed25519 OpenSSH private key file that signs every "
        "proof bundle's manifest (PACKER_ASSETS_SIGNING_KEY); unset: unsigned",
    )
    signing_key_id: str | None = Field(
        default=None, description="who signs, as in allowed_signers (PACKER_ASSETS_SIGNING_KEY_ID)"
    )

    def layout(self) -> Layout:
        return Layout(Path(self.output_root).resolve())

    def signer(self) -> Signer | None:
        return Signer(Path(self.signing_key), self.signing_key_id) if self.signing_key else None

    def environment(self) -> Mapping[str, str]:
        """The process environment over the env files, read-only (settings.environment): what the catalog
        names (install passwords, authorized keys), read per run."""
        return environment()

    def catalog(self) -> Catalog:
        """The catalog as the environment names it (PACKER_ASSETS_CATALOG, mirror), read per run."""
        return load_catalog(env=self.environment())

    def build_access(self) -> BuildAccess:
        """Where and as whom builds talk to Proxmox: what proxmox_env wrote."""
        env_file = self.layout().env_file
        if not env_file.exists():
            raise FileNotFoundError(f"{env_file} does not exist: materialize proxmox_env first (`make init`)")
        return build_access(read_env_file(env_file), str(env_file))


# The fields ProxmoxBootstrap shares with BootstrapConfig: Dagster needs them as the resource's own config
# schema (launchpad, run config); config_fields() and config() are the one mapping between the two.
BOOTSTRAP_FIELDS = (
    "user",
    "role",
    "token_name",
    "privsep",
    "node",
    "vm_storage",
    "iso_storage",
    "bridge",
    "http_bind_address",
    "http_port",
)
DEFAULTS = BootstrapConfig()  # their defaults: BootstrapConfig's, the one copy


class ProxmoxBootstrap(dg.ConfigurableResource):
    """Admin access used once by `proxmox_env` to create the build user, role, ACLs and token."""

    api_url: str = Field(description="https://host:8006/api2/json (PROXMOX_URL)")
    ca_file: str | None = Field(default=None, description="CA certificate of the API (PROXMOX_CA_FILE)")
    tls_fingerprint: str | None = Field(default=None, description="pinned SHA-256 fingerprint instead of a CA")
    insecure: bool = Field(default=False, description="turn TLS verification off (explicit, logged)")
    insecure_origin: str | None = Field(default=None, description="where PROXMOX_INSECURE=1 came from")
    admin_user: str = "root@pam"
    admin_password: str | None = Field(default=None, description="PROXMOX_BOOTSTRAP_PASSWORD")
    admin_token_name: str | None = None
    admin_token_secret: str | None = Field(default=None, description="PROXMOX_BOOTSTRAP_TOKEN_SECRET")
    user: str = DEFAULTS.user
    role: str = DEFAULTS.role
    token_name: str = DEFAULTS.token_name
    privsep: bool = DEFAULTS.privsep
    node: str | None = None
    vm_storage: str | None = None
    iso_storage: str | None = None
    bridge: str | None = None
    http_bind_address: str | None = None
    http_port: int = DEFAULTS.http_port
    method: str = Field(default="api", description="api (admin login over HTTPS) or ssh (script run on the node)")
    ssh_host: str | None = Field(default=None, description="node address for the SSH path (PROXMOX_SSH_HOST)")
    ssh_port: int = 22
    ssh_user: str = "root"
    ssh_key_file: str | None = None
    ssh_password: str | None = Field(default=None, description="PROXMOX_SSH_PASSWORD (prefer a key)")
    known_hosts: str | None = Field(default=None, description="known_hosts file (default ~/.ssh/known_hosts)")
    trust_on_first_use: bool = Field(default=False, description="accept and record an unknown host key")
    build_login: str = Field(
        default="auto",
        description="PROXMOX_BUILD_LOGIN: how Packer logs in. token; password "
        "(proxmox_env gives the automation user one, kept in control/secrets.env); auto: "
        "password when the installed Packer has no token login (< 1.7.1)",
    )
    packer_binary: str = Field(default="packer", description="the Packer whose version `auto` asks")

    def bootstrapper(self) -> AdminLogin | Bootstrapper:
        if self.method == "api":
            return self.admin()
        if self.method != "ssh" or not self.ssh_host:
            raise ValueError(f"pve_admin.method={self.method!r}: use 'api', or 'ssh' with ssh_host set")
        return SshBootstrap(
            SshTarget(
                self.ssh_host,
                self.ssh_port,
                self.ssh_user,
                self.ssh_key_file,
                secret(self.ssh_password, "PROXMOX_SSH_PASSWORD"),
                self.known_hosts,
                self.trust_on_first_use,
            )
        )

    def endpoint(self) -> Endpoint:
        return Endpoint(
            self.api_url, ca_file=self.ca_file, tls_fingerprint=self.tls_fingerprint, insecure=self.insecure
        )

    def admin(self) -> AdminLogin:
        return AdminLogin(
            self.admin_user,
            secret(self.admin_password, "PROXMOX_BOOTSTRAP_PASSWORD"),
            self.admin_token_name,
            secret(self.admin_token_secret, "PROXMOX_BOOTSTRAP_TOKEN_SECRET"),
        )

    @classmethod
    def config_fields(cls, config: BootstrapConfig) -> dict:
        return {name: getattr(config, name) for name in BOOTSTRAP_FIELDS}

    def config(self, rotate: bool = False) -> BootstrapConfig:
        return BootstrapConfig(
            **{name: getattr(self, name) for name in BOOTSTRAP_FIELDS},
            rotate=rotate,
            build_password=self.wants_build_password(),
        )

    def wants_build_password(self) -> bool:
        if self.build_login != "auto":
            return self.build_login == "password"
        try:
            return not detect_packer(self.packer_binary).token_auth
        except PackerVersionError:
            return False  # no usable packer here: builds will say what they need


class PackerSettings(dg.ConfigurableResource):
    """How `packer build` runs here. Credentials: the token from .env.proxmox, or (Packer < 1.7.1,
    which has no token login) a password login for builds through PROXMOX_BUILD_USER/PASSWORD."""

    binary: str = "packer"
    allow_degraded: bool = Field(
        default=False,
        description="build without EFI/TPM/extra ISOs where the "
        "installed Packer cannot do them (recorded as warnings); the lab sets it",
    )
    ssh_host: str | None = Field(default=None, description="communicator address override (the lab's guest)")
    ssh_port: int | None = None
    ssh_timeout: str | None = None
    ssh_ports: str | None = Field(
        default=None,
        description="`key=port,...`: a key's own SSH port (the lab's real guests; PACKER_ASSETS_SSH_PORTS)",
    )
    guest_notes: str | None = Field(
        default=None,
        description="`key=text;...;*=text`: what each key's guests are, "
        "said in its proofs (PACKER_ASSETS_GUEST_NOTES); unset: not stated",
    )
    boot_wait: str | None = None
    console_log: str | None = Field(
        default=None,
        description="a path with `{vmid}`: where a VM's serial console is logged (PACKER_ASSETS_CONSOLE_LOG); "
        "a build whose VM stops before SSH quotes its last lines",
    )
    vm_watch_seconds: float = Field(
        default=5.0, description="while packer waits for SSH, how often the build VM's status is read"
    )
    timeout_seconds: float = 4 * 3600
    grace_seconds: float = Field(default=60.0, description="after one SIGINT, how long Packer may clean up")
    smoke_timeout_seconds: float = 600.0
    build_user: str | None = Field(default=None, description="PROXMOX_BUILD_USER (password login)")
    build_password: str | None = Field(default=None, description="PROXMOX_BUILD_PASSWORD")

    def settings(self, force: bool = False) -> BuildSettings:
        return BuildSettings(
            packer=self.binary,
            allow_degraded=self.allow_degraded,
            ssh_host=self.ssh_host,
            ssh_port=self.ssh_port,
            ssh_timeout=self.ssh_timeout,
            boot_wait=self.boot_wait,
            ssh_ports=self.ssh_ports,
            guest_notes=self.guest_notes,
            console_log=self.console_log,
            vm_watch_interval=self.vm_watch_seconds,
            timeout=self.timeout_seconds,
            grace=self.grace_seconds,
            smoke_timeout=self.smoke_timeout_seconds,
            force=force,
        )

    def credentials(self, access: BuildAccess) -> BuildCredentials:
        return BuildCredentials(
            token_id=access.token_id,
            token_secret=access.token_secret,
            user=self.build_user,
            password=secret(self.build_password, "PROXMOX_BUILD_PASSWORD"),
        )


def secret(configured: str | None, name: str) -> str | None:
    """A secret as a run uses it: the resource's own value if one was configured, else the variable `name` of
    the process environment over the env files (settings.environment), read when it is needed. Never put into
    a resource's config by the definitions: the UI shows configured values."""
    return configured or environment().get(name) or None


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The definitions' resources, from the one validated settings object; secrets are read per run (secret)."""
    from packer_assets.defs.notifications import Notifier  # notifications imports the assets, which import this module

    return {
        "notifier": Notifier(ui_url=settings.ui_url),
        "packer": PackerSettings(
            binary=settings.packer_binary,
            allow_degraded=settings.allow_degraded,
            ssh_host=settings.packer_ssh_host,
            ssh_port=settings.packer_ssh_port,
            ssh_ports=settings.packer_ssh_ports,
            guest_notes=settings.guest_notes,
            console_log=settings.console_log,
            ssh_timeout=settings.packer_ssh_timeout,
            boot_wait=settings.boot_wait,
            build_user=settings.build_user,
        ),
        "project": ProjectSettings(
            output_root=str(settings.output_root),
            signing_key=str(settings.signing_key) if settings.signing_key else None,
            signing_key_id=settings.signing_key_id,
        ),
        "pve_admin": ProxmoxBootstrap(
            api_url=settings.proxmox_url or "https://pve.invalid:8006",
            ca_file=str(settings.ca_file) if settings.ca_file else None,
            tls_fingerprint=settings.tls_fingerprint,
            insecure=settings.insecure,
            insecure_origin=settings.insecure_origin,
            admin_user=settings.bootstrap_user,
            admin_token_name=settings.bootstrap_token_name,
            # the toolkit's names; after a first init, .env.proxmox pins what was discovered
            **ProxmoxBootstrap.config_fields(settings.bootstrap),
            method=settings.bootstrap_method,
            ssh_host=settings.ssh_host,
            ssh_port=settings.ssh_port,
            ssh_user=settings.ssh_user,
            ssh_key_file=settings.ssh_key_file,
            known_hosts=settings.ssh_known_hosts,
            trust_on_first_use=settings.ssh_trust_on_first_use,
            build_login=settings.build_login,
            packer_binary=settings.packer_binary,
        ),
    }
