# Rocky Linux 9 and 10 (minimal ISO, kickstart) as a Proxmox template.
#
# Run only from a work directory prepared by packer_assets/packer/workdir.py, which puts
# templates/common/common.pkr.hcl next to this file: every variable (none are declared here), the
# shared proxmox-iso source "base" with its version-specific region, the shared locals (sudo,
# generalize). This file holds what is Rocky's own: its boot and SSH-timeout defaults, the cloud-init
# drive, the provisioners. Packer refuses an attribute set both here and in the shared source.
#   http/   the rendered ks.cfg (fetched by Anaconda from Packer's HTTP server)

locals {
  # This family's defaults: the shared source uses them where var.boot_command, var.ssh_timeout or
  # var.boot_wait is null.
  #
  # Rocky 8 and 9 boot their ISO with isolinux on BIOS: <up> selects "Install Rocky Linux" (the default is
  # the media test), <tab> opens its kernel line; text mode and the kickstart URL are appended.
  isolinux_boot = [
    "<up><tab> inst.text inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg<enter>",
  ]
  # Rocky 10 (as RHEL 10, after Fedora 37) has no isolinux: GRUB 2 boots the ISO on BIOS too. Editing its
  # menu entry (e, arrows, Ctrl-X) depends on the entry's layout; GRUB's command line boots the installer
  # kernel directly, stage 2 found on the ISO (inst.repo=cdrom: any optical drive), so the volume label
  # (it changes with every 10.x ISO) is never typed. The key's OS version (var.os_version) chooses.
  grub_boot = [
    "c<wait>",
    "linux /images/pxeboot/vmlinuz inst.repo=cdrom inst.text inst.ks=http://{{ .HTTPIP }}:{{ .HTTPPort }}/ks.cfg<enter><wait>",
    "initrd /images/pxeboot/initrd.img<enter><wait>",
    "boot<enter>",
  ]
  default_boot_command = contains(["", "8", "9"], element(split(".", var.os_version), 0)) ? local.isolinux_boot : local.grub_boot

  default_ssh_timeout = "60m"
  default_boot_wait   = "5s"
}

build {
  source "source.proxmox-iso.base" {
    name = "rocky"

    # Clones take their IP, user and SSH keys from a cloud-init drive (Terraform, `qm set`).
    cloud_init              = true
    cloud_init_storage_pool = var.vm_storage
  }

  # sudo with the install password on stdin, never on a command line (local.sudo_*).
  provisioner "shell" {
    environment_vars = local.sudo_environment
    use_env_var_file = true
    execute_command  = local.sudo_execute_command
    inline = concat(local.wait_cloud_init, [
      "rpm -q qemu-guest-agent cloud-init >/dev/null 2>&1 || dnf install -y qemu-guest-agent cloud-init",
      "systemctl enable qemu-guest-agent",
      "dnf clean all",
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
