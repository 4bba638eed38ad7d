"""Real packer builds of a key through Dagster against the lab (lab_project), for the defs tests."""

import shutil

import dagster as dg

from packer_assets.defs import assets, jobs
from packer_assets.defs.resources import PackerSettings, ProjectSettings
from packer_assets.config.envfile import read_env_file

KEY = "debian-12"


def resources(lab_project, **packer):
    stack = lab_project.stack
    # Packer 1.6.6 logs in as the automation user, with the password proxmox_env gave it (never as root)
    kept = read_env_file(lab_project.layout.secrets_file)
    env = stack.env()  # what lab.env tells the project (a real guest's own SSH port, what the guests are)
    settings = dict(allow_degraded=True, ssh_host=stack.guest.host, ssh_port=stack.guest.port,
                    ssh_timeout=env["PACKER_ASSETS_SSH_TIMEOUT"], ssh_ports=env.get("PACKER_ASSETS_SSH_PORTS"),
                    guest_notes=env["PACKER_ASSETS_GUEST_NOTES"], console_log=env["PACKER_ASSETS_CONSOLE_LOG"],
                    boot_wait="100ms", build_user=kept["PROXMOX_BUILD_USER"], build_password=kept["PROXMOX_BUILD_PASSWORD"],
                    grace_seconds=10, smoke_timeout_seconds=60)
    settings.update(packer)
    return {"project": ProjectSettings(output_root=str(lab_project.root)), "packer": PackerSettings(**settings)}


def rebuild(lab_project, instance, key=KEY, force=False, **packer):
    return dg.materialize(jobs.REBUILD_ASSETS + [assets.iso_release], partition_key=key, instance=instance,
                          resources=resources(lab_project, **packer), raise_on_error=False,
                          selection=jobs.REBUILD_ASSETS,
                          run_config={"ops": {"template": {"config": {"force": force}}}})


def crashing_packer(folder) -> str:
    """The real binary for `packer version`, a crash for `packer build`."""
    fake = folder / "packer"
    fake.write_text(f"#!/bin/bash\nif [ \"$1\" = build ]; then echo '1,,ui,error,boom: plugin crashed'; exit 1; fi\n"
                    f"exec {shutil.which('packer')} \"$@\"\n")
    fake.chmod(0o755)
    return str(fake)


def templates_of(pve, key=KEY):
    return {vm.vmid: vm.config.get("tags", "") for vm in pve.vms if vm.template and key in vm.config.get("tags", "")}
