# Debian 12 and 13 (netinst, preseed) as a Proxmox template.
#
# Run only from a work directory prepared by packer_assets/packer/workdir.py, which puts
# templates/common/common.pkr.hcl next to this file: every variable (none are declared here), the
# shared proxmox-iso source "base" with its version-specific region, the shared locals (sudo,
# generalize). This file holds what is Debian's own: its boot and SSH-timeout defaults, the cloud-init
# drive, the provisioners. Packer refuses an attribute set both here and in the shared source.
#   http/   the rendered preseed.cfg (fetched by the installer from Packer's HTTP server)

locals {
  # This family's defaults: the shared source uses them where var.boot_command, var.ssh_timeout or
  # var.boot_wait is null.
  #
  # isolinux (BIOS; Debian 13's netinst still boots with it): <esc> leaves the menu for the boot: prompt; the `auto` label preseeds from the URL
  # (priority=critical: no questions before the preseed file is read).
  default_boot_command = [
    "<esc><wait>",
    "auto url=http://{{ .HTTPIP }}:{{ .HTTPPort }}/preseed.cfg priority=critical locale=en_US.UTF-8 keyboard-configuration/xkb-keymap=us<enter>",
  ]
  default_ssh_timeout = "60m"
  default_boot_wait   = "5s"
}

build {
  source "source.proxmox-iso.base" {
    name = "debian"

    # Clones take their IP, user and SSH keys from a cloud-init drive (Terraform, `qm set`).
    cloud_init              = true
    cloud_init_storage_pool = var.vm_storage
  }

  # sudo with the install password on stdin, never on a command line (local.sudo_*). The agent and cloud-init
  # come from the preseed (pkgsel/include): a template is what its answer file says, so a preseed that lost one
  # fails here, by name, instead of being patched from the network at build time.
  provisioner "shell" {
    environment_vars = local.sudo_environment
    use_env_var_file = true
    execute_command  = local.sudo_execute_command
    inline = concat(local.wait_cloud_init, [
      "export DEBIAN_FRONTEND=noninteractive",
      "dpkg -s qemu-guest-agent cloud-init >/dev/null 2>&1 || { echo 'qemu-guest-agent or cloud-init is not installed: the preseed (pkgsel/include) must install both' >&2; exit 1; }",
      "systemctl enable qemu-guest-agent",
      "apt-get clean",
    ])
  }

  # Last: forget this install's identity (local.generalize_linux).
  provisioner "shell" {
    environment_vars = local.sudo_environment
    use_env_var_file = true
    execute_command  = local.sudo_execute_command
    inline           = local.generalize_linux
  }
}
