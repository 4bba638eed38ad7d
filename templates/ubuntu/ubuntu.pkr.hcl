# Ubuntu Server (22.04 / 24.04 / 26.04 live-server, Subiquity autoinstall) as a Proxmox template.
#
# Run only from a work directory prepared by packer_assets/packer/workdir.py, which puts
# templates/common/common.pkr.hcl next to this file: every variable (none are declared here), the
# shared proxmox-iso source "base" with its version-specific region, the shared locals (sudo,
# generalize). This file holds what is Ubuntu's own: its boot and SSH-timeout defaults, the cloud-init
# drive, the provisioners. Packer refuses an attribute set both here and in the shared source.
#   http/   the rendered user-data + meta-data (NoCloud over Packer's HTTP server)

locals {
  # This family's defaults: the shared source uses them where var.boot_command, var.ssh_timeout or
  # var.boot_wait is null.
  #
  # GRUB (BIOS and UEFI alike on 22.04+): the command line, then the kernel with autoinstall and
  # the NoCloud seed on Packer's HTTP server. GRUB reads ';' as a command separator: escaped.
  default_boot_command = [
    "c<wait>",
    "linux /casper/vmlinuz --- autoinstall ds=nocloud-net\\;s=http://{{ .HTTPIP }}:{{ .HTTPPort }}/<enter><wait>",
    "initrd /casper/initrd<enter><wait>",
    "boot<enter>",
  ]
  default_ssh_timeout = "60m"
  default_boot_wait   = "5s"
}

build {
  source "source.proxmox-iso.base" {
    name = "ubuntu"

    # Clones take their IP, user and SSH keys from a cloud-init drive (Terraform, `qm set`).
    cloud_init              = true
    cloud_init_storage_pool = var.vm_storage
  }

  # sudo with the install password on stdin, never on a command line (local.sudo_*). 26.04's sudo is sudo-rs,
  # which takes the same -S and -p '' (docs/releases.md); env -u is GNU's and uutils' alike.
  provisioner "shell" {
    environment_vars = local.sudo_environment
    use_env_var_file = true
    execute_command  = local.sudo_execute_command
    inline = concat(local.wait_cloud_init, [
      "export DEBIAN_FRONTEND=noninteractive",
      "dpkg -s qemu-guest-agent >/dev/null 2>&1 || { apt-get update && apt-get install -y qemu-guest-agent; }",
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
