# What every family's template shares: all variables, the shared locals and the one proxmox-iso
# source. packer_assets/packer/workdir.py copies this file into every work directory next to the
# family's template (templates/<family>/<family>.pkr.hcl); Packer reads every *.pkr.hcl of the
# directory as one configuration. Its sha256 counts in the input fingerprint with the family's
# template (workdir.template_sha256): an edit here is a changed input for every key.
#
# The family's template declares no variables of its own (tests/packer/test_packer_workdir.py holds it to
# that). Its build block names this source (`source "source.proxmox-iso.base" { name = "<family>" }`)
# and fills in only what differs per family: the cloud-init drive. Its locals default_boot_command,
# default_boot_wait and default_ssh_timeout give the family's defaults, used below where the variable
# is null. Packer merges the build's source block into this one and refuses an attribute set in both.
#
# The work directory also holds:
#   build.auto.pkrvars.json   every non-secret variable below (VMID, node, ISO volume, storage, ...)
#   http/                     the rendered unattended files, served by Packer's HTTP server
#   the region between the ">>> / <<< packer-assets: version-specific" markers below, rewritten for
#   the installed Packer (packer_assets/packer/version.py): top-level iso_file on 1.6.6, a boot_iso {}
#   block, extra ISOs, bios/machine, efi_config/tpm_config and tags on current packer-plugin-proxmox.
# Secrets never appear here or in the var file: PROXMOX_URL + PROXMOX_USERNAME + PROXMOX_TOKEN or
# PROXMOX_PASSWORD (the API login), PKR_VAR_ssh_password (the install user's password) and
# SSL_CERT_FILE (the CA of the API's certificate) come from packer's environment.

variable "node" { type = string }
variable "vm_id" { type = number }
variable "vm_name" { type = string }
variable "os_version" {
  type        = string
  default     = ""
  description = "The OS release the key installs (its expect_os version_id, e.g. 10 or 26.04; \"\": any): the few family defaults a release changes branch on it."
}
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
  # Linux families: sudo reads the install password from stdin; Packer uploads it in its env-var file
  # (removed after the step), so it is in no command line on the guest and no log here.
  sudo_environment     = ["BUILD_SUDO_PASSWORD=${var.ssh_password}"]
  sudo_execute_command = "chmod +x {{ .Path }}; . {{ .EnvVarFile }} && printf '%s\\n' \"$BUILD_SUDO_PASSWORD\" | sudo -S -p '' env -u BUILD_SUDO_PASSWORD sh -eu {{ .Path }}"

  # Linux families, the first step: first boot's cloud-init must be finished before anything is changed.
  # Exit 2 (cloud-init 23.4+: done, with recoverable errors) is accepted with a WARNING line naming the
  # errors, as the smoke test's cloud_init check accepts it (packer_assets/inspection/guest_checks.py); 1 fails.
  wait_cloud_init = [
    "ci=0; out=$(cloud-init status --wait --long) || ci=$?",
    "printf '%s\\n' \"$out\"",
    "if [ \"$ci\" -eq 2 ]; then echo \"WARNING: cloud-init finished with recoverable errors (exit 2): $(printf '%s\\n' \"$out\" | sed -n 's/^[[:space:]]*- //p' | paste -sd ';' -)\"; elif [ \"$ci\" -ne 0 ]; then echo \"cloud-init failed (exit $ci)\" >&2; exit \"$ci\"; fi",
  ]

  # Linux families, the last step: forget this install's identity, so every clone is a new machine
  # to cloud-init, systemd and sshd, and lock the install user's password: clones are reached with the
  # keys cloud-init gives them, never with the password the installer was given (the smoke test checks).
  generalize_linux = [
    "passwd -l ${var.ssh_username}",
    "cloud-init clean --logs --seed",
    "truncate -s 0 /etc/machine-id",
    "rm -f /var/lib/dbus/machine-id",
    "rm -f /etc/ssh/ssh_host_*",
    "sync",
  ]
}

# The one builder of every family. Never built under this name: each family's build block names it
# (`source "source.proxmox-iso.base" { name = "<family>" ... }`), so builds show as proxmox-iso.<family>.
source "proxmox-iso" "base" {
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

  http_directory    = "${path.root}/http"
  http_bind_address = var.http_bind_address
  http_port_min     = var.http_port_min
  http_port_max     = var.http_port_max
  # default_*: locals of the family's template (its installer's boot, how long its install may take)
  boot_wait    = var.boot_wait != null ? var.boot_wait : local.default_boot_wait
  boot_command = var.boot_command != null ? var.boot_command : local.default_boot_command

  communicator = "ssh"
  ssh_host     = var.ssh_host
  ssh_port     = var.ssh_port
  ssh_username = var.ssh_username
  ssh_password = var.ssh_password
  ssh_timeout  = var.ssh_timeout != null ? var.ssh_timeout : local.default_ssh_timeout
}
