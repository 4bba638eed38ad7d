# Windows Server 2022 and 2025 (Autounattend on an answer ISO, OpenSSH for Packer) as a Proxmox template.
#
# Run only from a work directory prepared by packer_assets/packer/workdir.py, which puts
# templates/common/common.pkr.hcl next to this file: every variable (none are declared here), the
# shared proxmox-iso source "base" with its version-specific region, the shared locals. This file
# holds what is Windows' own: its boot and SSH-timeout defaults, no cloud-init drive, the
# provisioners. Packer refuses an attribute set both here and in the shared source.
#   http/   empty: the answer file is on its own small ISO (render/answer_iso.py), attached with
#           virtio-win as extra CD-ROMs (extra_iso_files)

locals {
  # This family's defaults: the shared source uses them where var.boot_command, var.ssh_timeout or
  # var.boot_wait is null.
  #
  # "Press any key to boot from CD or DVD": a few presses while the prompt is up; Setup then finds
  # Autounattend.xml at the root of the answer ISO (an extra CD-ROM) by itself.
  default_boot_command = [
    "<spacebar><wait><spacebar><wait><spacebar>",
  ]
  default_ssh_timeout = "120m"
  default_boot_wait   = "2s"
}

build {
  source "source.proxmox-iso.base" {
    name = "windows"

    # No cloud-init drive: Windows clones are specialized by sysprep's OOBE pass, not by cloud-init.
    cloud_init = false
  }

  # The SSH session (OpenSSH Server set up by the answer ISO's firstlogon.ps1, PowerShell as its
  # shell) is the Administrator's, elevated: no sudo dance here.
  provisioner "powershell" {
    inline = [
      "$ErrorActionPreference = 'Stop'",
      "$agent = Get-Service -Name 'QEMU-GA' -ErrorAction SilentlyContinue",
      "if (-not $agent -or $agent.Status -ne 'Running') { throw 'the QEMU guest agent service (QEMU-GA) is not running' }",
      "Set-Service -Name 'QEMU-GA' -StartupType Automatic",
      "$drivers = pnputil.exe /enum-drivers | Out-String",
      "foreach ($inf in 'vioscsi.inf', 'netkvm.inf') { if ($drivers -notmatch [regex]::Escape($inf)) { throw \"virtio driver $inf is not installed\" } }",
    ]
  }

  # Last: sysprep /generalize /oobe. /quit, not /shutdown: the builder shuts the VM down itself right
  # after this step, and a guest that already powered off makes that call fail ("VM not running").
  # Sysprep.exe returns at once (a GUI program): the loop waits until it has sealed the image.
  provisioner "powershell" {
    inline = [
      "$ErrorActionPreference = 'Stop'",
      "& \"$env:SystemRoot\\System32\\Sysprep\\Sysprep.exe\" /generalize /oobe /quit /quiet",
      "$state = 'HKLM:\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Setup\\State'",
      "$deadline = (Get-Date).AddMinutes(30)",
      "while ((Get-ItemProperty -Path $state).ImageState -ne 'IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE') {",
      "  if ((Get-Date) -gt $deadline) { throw 'sysprep did not seal the image in 30 minutes: see C:\\Windows\\System32\\Sysprep\\Panther\\setuperr.log' }",
      "  Start-Sleep -Seconds 5",
      "}",
    ]
  }
}
