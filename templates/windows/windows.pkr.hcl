# Windows Server (Autounattend on an answer ISO, OpenSSH for Packer) as a Proxmox template.
#
# Run only from a work directory prepared by packer_assets/packer/workdir.py, which adds:
#   build.auto.pkrvars.json   every non-secret variable below (VMID, node, ISO volume, storage, ...)
#   http/                     empty: the answer file is on its own small ISO (render/answer_iso.py),
#                             attached with virtio-win as extra CD-ROMs (extra_iso_files)
#   the region between the ">>> / <<< packer-assets: version-specific" markers, rewritten for the
#   installed Packer (packer_assets/packer/version.py): top-level iso_file on 1.6.6, a boot_iso {}
#   block, extra ISOs, bios/machine, efi_config/tpm_config and tags on current packer-plugin-proxmox.
# Secrets never appear here or in the var file: PROXMOX_URL + PROXMOX_USERNAME + PROXMOX_TOKEN or
# PROXMOX_PASSWORD (the API login), PKR_VAR_ssh_password (the install user's password) and
# SSL_CERT_FILE (the CA of the API's certificate) come from packer's environment.
#
# The variable block is the same in every family's template (tests/test_packer_workdir.py holds
# them to that); only locals, the source's family settings and the provisioners differ.

variable "node" { type = string }
variable "vm_id" { type = number }
variable "vm_name" { type = string }
variable "template_description" {
  type    = string
  default = ""
}
variable "tags" {
  type    = list(string)
  default = []
}
variable "iso_file" {
  type        = string
  description = "The boot ISO, already on the node's ISO storage (e.g. local:iso/ubuntu-24.04.iso)."
}
variable "extra_iso_files" {
  type    = list(string)
  default = []
}
variable "vm_storage" { type = string }
variable "disk_storage_pool_type" {
  type        = string
  default     = null
  description = "Set only for builders that still need it (packer 1.6.6): lvm-thin, directory, zfspool, ..."
}
variable "disk_format" {
  type    = string
  default = "raw"
}
variable "bridge" { type = string }
variable "http_bind_address" {
  type    = string
  default = null
}
variable "http_port_min" {
  type    = number
  default = 8802
}
variable "http_port_max" {
  type    = number
  default = 8802
}
variable "ssh_host" {
  type        = string
  default     = null
  description = "null: the address the guest agent reports."
}
variable "ssh_port" {
  type    = number
  default = 22
}
variable "ssh_username" { type = string }
variable "ssh_password" {
  type      = string
  sensitive = true
}
variable "ssh_timeout" {
  type        = string
  default     = null
  description = "null: the family's default (how long an unattended install may take)."
}
variable "cores" { type = number }
variable "sockets" {
  type    = number
  default = 1
}
variable "memory" { type = number }
variable "disk_size" { type = string }
variable "os_type" { type = string }
variable "cpu_type" {
  type    = string
  default = "host"
}
variable "bios" {
  type    = string
  default = "seabios"
}
variable "machine" {
  type    = string
  default = null
}
variable "efi" {
  type    = bool
  default = false
}
variable "tpm" {
  type    = bool
  default = false
}
variable "boot_wait" {
  type    = string
  default = null
}
variable "boot_command" {
  type    = list(string)
  default = null
}
variable "insecure_skip_tls_verify" {
  type    = bool
  default = false
}

locals {
  # "Press any key to boot from CD or DVD": a few presses while the prompt is up; Setup then finds
  # Autounattend.xml at the root of the answer ISO (an extra CD-ROM) by itself.
  boot_command = var.boot_command != null ? var.boot_command : [
    "<spacebar><wait><spacebar><wait><spacebar>",
  ]
  ssh_timeout = var.ssh_timeout != null ? var.ssh_timeout : "120m"
  boot_wait   = var.boot_wait != null ? var.boot_wait : "2s"
}

source "proxmox-iso" "windows" {
  node                     = var.node
  insecure_skip_tls_verify = var.insecure_skip_tls_verify

  vm_id                = var.vm_id
  vm_name              = var.vm_name
  template_name        = var.vm_name
  template_description = var.template_description

  # >>> packer-assets: version-specific (rewritten per installed Packer by packer_assets/packer/workdir.py)
  iso_file = var.iso_file
  # <<< packer-assets: version-specific

  os       = var.os_type
  cpu_type = var.cpu_type
  cores    = var.cores
  sockets  = var.sockets
  memory   = var.memory

  qemu_agent      = true
  scsi_controller = "virtio-scsi-single"

  network_adapters {
    model  = "virtio"
    bridge = var.bridge
  }

  disks {
    type              = "scsi"
    disk_size         = var.disk_size
    storage_pool      = var.vm_storage
    storage_pool_type = var.disk_storage_pool_type
    format            = var.disk_format
  }

  # No cloud-init drive: Windows clones are specialized by sysprep's OOBE pass, not by cloud-init.
  cloud_init = false

  http_directory    = "${path.root}/http"
  http_bind_address = var.http_bind_address
  http_port_min     = var.http_port_min
  http_port_max     = var.http_port_max
  boot_wait         = local.boot_wait
  boot_command      = local.boot_command

  communicator = "ssh"
  ssh_host     = var.ssh_host
  ssh_port     = var.ssh_port
  ssh_username = var.ssh_username
  ssh_password = var.ssh_password
  ssh_timeout  = local.ssh_timeout
}

build {
  sources = ["source.proxmox-iso.windows"]

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
