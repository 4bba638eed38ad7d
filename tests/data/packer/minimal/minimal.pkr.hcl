# A minimal proxmox-iso build, run by the lab tests with Debian's packer 1.6.6.
#
# Credentials never appear in this file or on packer's command line:
#   PROXMOX_URL, PROXMOX_USERNAME, PROXMOX_PASSWORD  the API login (packer 1.6.6 reads them when
#                                                    proxmox_url/username/password are unset; it has
#                                                    no API-token auth)
#   PKR_VAR_ssh_password                             the communicator's password
#   SSL_CERT_FILE                                    the CA that signs the API's certificate
# Everything else comes from a var file (-var-file=...).
#
# Version facts kept out of the template: always an explicit vm_id (1.6.6 would pick one itself);
# no unmount_iso (1.6.6 fails after the template exists because PVE appends size= to the cdrom entry:
# eject the ISO through the API afterwards); ssh_host/ssh_port set explicitly (1.6.6 ignores loopback
# addresses reported by the guest agent).

variable "node" {
  type    = string
  default = "pve1"
}

variable "vm_id" {
  type = number
}

variable "vm_name" {
  type    = string
  default = "packer-minimal"
}

variable "iso_file" {
  type        = string
  description = "An ISO already on the node's ISO storage, e.g. local:iso/minimal.iso."
}

variable "disk_storage_pool" {
  type    = string
  default = "local-lvm"
}

variable "disk_storage_pool_type" {
  type    = string
  default = "lvm-thin"
}

variable "bridge" {
  type    = string
  default = "vmbr0"
}

variable "boot_wait" {
  type    = string
  default = "10s"
}

variable "boot_command" {
  type = list(string)
  default = [
    "<esc><wait>",
    "auto url=http://{{ .HTTPIP }}:{{ .HTTPPort }}/preseed.cfg<enter>",
  ]
}

variable "ssh_host" {
  type = string
}

variable "ssh_port" {
  type    = number
  default = 22
}

variable "ssh_username" {
  type    = string
  default = "packer"
}

variable "ssh_password" {
  type      = string
  sensitive = true
}

variable "ssh_timeout" {
  type    = string
  default = "30m"
}

variable "template_description" {
  type    = string
  default = "packer-assets minimal template"
}

source "proxmox-iso" "minimal" {
  node                     = var.node
  insecure_skip_tls_verify = false

  vm_id                = var.vm_id
  vm_name              = var.vm_name
  template_name        = var.vm_name
  template_description = var.template_description

  iso_file = var.iso_file
  os       = "l26"
  memory   = 1024
  cores    = 1
  sockets  = 1

  qemu_agent      = true
  scsi_controller = "virtio-scsi-pci"

  network_adapters {
    model  = "virtio"
    bridge = var.bridge
  }

  disks {
    type              = "scsi"
    disk_size         = "4G"
    storage_pool      = var.disk_storage_pool
    storage_pool_type = var.disk_storage_pool_type
    format            = "raw"
  }

  cloud_init              = true
  cloud_init_storage_pool = var.disk_storage_pool

  http_directory = "${path.root}/http"
  boot_wait      = var.boot_wait
  boot_command   = var.boot_command

  communicator = "ssh"
  ssh_host     = var.ssh_host
  ssh_port     = var.ssh_port
  ssh_username = var.ssh_username
  ssh_password = var.ssh_password
  ssh_timeout  = var.ssh_timeout
}

build {
  sources = ["source.proxmox-iso.minimal"]

  provisioner "shell" {
    inline = ["echo packer-assets-provisioned > /tmp/packer-assets.provisioned"]
  }
}
