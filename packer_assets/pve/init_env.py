"""`proxmox_env` in the core: bootstrap, env files, init log and proof bundle under one chain ID.

The toolkit's outputs, path for path: `infra/env/.env.proxmox` and `control/secrets.env` (0600,
atomic), `output/logs/packer/init/<ts>/init-packer.log` and
`docs/proof/platform/packer-builds/init/<ts>/` (README.md, proof.json, the log), each with `latest`.
A failed init keeps its log, writes no proof and leaves both env files as they were.
"""

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .. import __version__
from ..chain import ChainId
from ..envfile import read_env_file, write_env_file
from ..evidence import Layout, Redactor, RunLog, sha256_file, write_proof_bundle
from .bootstrap import BootstrapConfig, BootstrapResult, bootstrap, env_file_values
from .client import Endpoint

SECRET_KEY = "PROXMOX_TOKEN_SECRET"


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


@dataclass(frozen=True)
class InitOutcome:
    result: BootstrapResult
    env_file: Path
    secrets_file: Path
    log_file: Path
    proof_dir: Path
    proof: dict


def known_secret(layout: Layout) -> str | None:
    if not layout.secrets_file.exists():
        return None
    return read_env_file(layout.secrets_file).get(SECRET_KEY) or None


def save_secret(layout: Layout, token_id: str, secret: str) -> None:
    """Update the token in control/secrets.env, keeping any other secrets the toolkit kept there."""
    values = read_env_file(layout.secrets_file) if layout.secrets_file.exists() else {}
    values.update(PROXMOX_TOKEN_ID=token_id, PROXMOX_TOKEN_SECRET=secret)
    write_env_file(layout.secrets_file, values, header="API token secret for packer-assets (mode 0600)")


def run_init(layout: Layout, endpoint: Endpoint, admin: AdminLogin, config: BootstrapConfig, chain: ChainId,
             run_id: str | None = None, echo=None) -> InitOutcome:
    started = datetime.now(UTC)
    secret = known_secret(layout)
    redact = Redactor([admin.password, admin.token_secret, secret])
    log_file = layout.init_log_dir(chain.stamp) / "init-packer.log"
    with RunLog(log_file, str(chain), redact, echo) as log:
        log.line("init", f"bootstrap {endpoint.base} as {admin.who}: user {config.user}, role {config.role}, "
                         f"token {config.token_id} (privsep={int(config.privsep)}, rotate={int(config.rotate)})")
        try:
            result = bootstrap(endpoint, admin.user, admin_password=admin.password,
                               admin_token_name=admin.token_name, admin_token_secret=admin.token_secret,
                               known_secret=secret, config=config,
                               save_secret=lambda new: (redact.add(new), save_secret(layout, config.token_id, new)))
        except Exception as exc:
            log.line("error", f"{type(exc).__name__}: {exc}")
            raise
        redact.add(result.token_secret)
        write_env_file(layout.env_file, env_file_values(result, endpoint),
                       header=f"Written by packer-assets proxmox_env ({chain}); mode 0600, holds the token secret")
        for change in result.changes or ["nothing to change"]:
            log.line("init", change)
        log.line("init", f"PVE {result.pve_version}; token {result.token_id} {result.token_action}")
        log.line("discover", ", ".join(f"{k}={v}" for k, v in asdict(result.discovery).items()))
        log.line("init", f"wrote {layout.env_file} and {layout.secrets_file}")
    proof = {
        "kind": "init",
        "chain_id": str(chain),
        "dagster_run_id": run_id,
        "tool_version": __version__,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "api_url": endpoint.api_url,
        "tls": "ca_file" if endpoint.ca_file else "fingerprint" if endpoint.fingerprint else
               "insecure" if endpoint.insecure else "system",
        "pve_version": result.pve_version,
        "token_id": result.token_id,
        "token_action": result.token_action,
        "role": config.role,
        "privileges": list(result.privileges),
        "changes": result.changes,
        "discovery": asdict(result.discovery),
        "env_file": str(layout.env_file.relative_to(layout.root)),
        "log_sha256": sha256_file(log_file),
    }
    proof_dir = write_proof_bundle(layout.init_proof_dir(chain.stamp), init_readme(proof), proof, log_file,
                                   "init-packer.log")
    return InitOutcome(result, layout.env_file, layout.secrets_file, log_file, proof_dir, proof)


def init_readme(proof: dict) -> str:
    rows = [("Chain ID", proof["chain_id"]), ("Dagster run", proof["dagster_run_id"] or "-"),
            ("API", proof["api_url"]), ("TLS trust", proof["tls"]), ("PVE version", proof["pve_version"]),
            ("Node", proof["discovery"]["node"]), ("VM storage", proof["discovery"]["vm_storage"]),
            ("ISO storage", proof["discovery"]["iso_storage"]), ("Bridge", proof["discovery"]["bridge"]),
            ("Token", f"{proof['token_id']} ({proof['token_action']})"), ("Role", proof["role"]),
            ("Log sha256", proof["log_sha256"])]
    table = "\n".join(f"| {name} | `{value}` |" for name, value in rows)
    changes = "\n".join(f"- {c}" for c in proof["changes"]) or "- nothing to change"
    privs = ", ".join(proof["privileges"])
    return (f"# Proxmox API bootstrap {proof['chain_id']}\n\n| | |\n|---|---|\n{table}\n\n"
            f"## Changes\n\n{changes}\n\n## Privileges of {proof['role']}\n\n{privs}\n")
