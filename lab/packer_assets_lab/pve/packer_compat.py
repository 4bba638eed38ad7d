"""What Debian's packer 1.6.6 proxmox-iso builder needs from the lab's fake PVE.

Measured against plain fakepve 0.5.0, a proxmox-iso build (password login, explicit vm_id, an ISO
already on the storage) makes these requests, in this order:

    POST /access/ticket                                   password login (1.6.6 has no API tokens)
    POST /nodes/{node}/storage/{storage}/content          allocate vm-<vmid>-disk-<n> per `disks` block
    POST /nodes/{node}/qemu                               create (ide2 = the ISO, media=cdrom)
    POST /nodes/{node}/qemu/{vmid}/status/start
    PUT  /nodes/{node}/qemu/{vmid}/sendkey  key=...       the boot_command, one request per key
    (SSH communicator, provisioners: nothing on the API when ssh_host is set)
    POST /nodes/{node}/qemu/{vmid}/status/shutdown
    POST /nodes/{node}/qemu/{vmid}/template
    GET  /nodes/{node}/qemu/{vmid}/config                 only with cloud_init / unmount_iso
    POST /nodes/{node}/qemu/{vmid}/config                 name, description, ide3=<storage>:cloudinit
    GET  /nodes/{node}/tasks/{upid}/status                after every request that returns a UPID

and, when a build fails after the VM exists, `POST status/stop` and `DELETE /nodes/{node}/qemu/{vmid}`.

fakepve answers all of them, so this mixin only adds what it does not model the way PVE does:

- `sendkey`: fakepve's generic handler accepts any key on any VM. PVE (vm_sendkey) takes the config
  lock, refuses a locked VM (unless root's skiplock), needs the VM running and hands the key to
  QEMU's HMP `sendkey`, which rejects names that are not QEMU key codes ("invalid parameter: x").
  The keys a VM got are kept on `vm.sendkeys`; `typed_text(vmid)` reads them back as text.
- `<storage>:cloudinit` drives (packer's `cloud_init = true` adds one after the template is made):
  PVE allocates `vm-<vmid>-cloudinit` (`.qcow2` on file storages), 4 MiB, and writes the drive as
  `<storage>:vm-<vmid>-cloudinit,media=cdrom`; fakepve stored the request's value verbatim on a
  config update and named the volume like a disk on create.
- VM destroy frees only the volumes the VM owns (PVE's destroy_vm skips CD-ROMs and volumes without
  an owner). fakepve freed the ISO in the VM's ide2 too, so a failed packer build (whose cleanup
  destroys the VM) dropped the pre-staged ISO from the storage.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

from fakepve.model import FakeVm, PveError, TaskError
from fakepve.qemu import DRIVE_KEY, join_drive, split_drive, volume_ref
from fakepve.routing import die, param_error
from fakepve.storage import _exists_message, _is_file

__all__ = ["QEMU_KEYS", "PackerCompat", "keys_to_text"]

# QEMU's QKeyCode names (qapi/ui.json), the names HMP `sendkey` takes; kept as text, to compare with qapi/ui.json.
_QEMU_KEY_TEXT = """
unmapped pause ro kp_comma kp_equals power hiragana henkan yen sleep wake audionext audioprev audiostop
audioplay audiomute volumeup volumedown mediaselect mail calculator computer ac_home ac_back ac_forward
ac_refresh ac_bookmarks muhenkan katakanahiragana lang1 lang2 shift shift_r alt alt_r ctrl ctrl_r menu esc
1 2 3 4 5 6 7 8 9 0 minus equal backspace tab q w e r t y u i o p bracket_left bracket_right ret
a s d f g h j k l semicolon apostrophe grave_accent backslash z x c v b n m comma dot slash asterisk spc
caps_lock f1 f2 f3 f4 f5 f6 f7 f8 f9 f10 num_lock scroll_lock kp_divide kp_multiply kp_subtract kp_add
kp_enter kp_decimal sysrq kp_0 kp_1 kp_2 kp_3 kp_4 kp_5 kp_6 kp_7 kp_8 kp_9 less f11 f12 print home pgup
pgdn end left up down right insert delete stop again props undo front copy open paste find cut lf help
meta_l meta_r compose f13 f14 f15 f16 f17 f18 f19 f20 f21 f22 f23 f24
"""
QEMU_KEYS = frozenset(_QEMU_KEY_TEXT.split())

# A US keyboard: key code -> (character, character with shift).
_US: dict[str, tuple[str, str]] = dict(
    [(c, (c, c.upper())) for c in "abcdefghijklmnopqrstuvwxyz"]
    + list(zip("1234567890", zip("1234567890", "!@#$%^&*()", strict=True), strict=True))
    + [
        ("minus", ("-", "_")),
        ("equal", ("=", "+")),
        ("bracket_left", ("[", "{")),
        ("bracket_right", ("]", "}")),
        ("semicolon", (";", ":")),
        ("apostrophe", ("'", '"')),
        ("grave_accent", ("`", "~")),
        ("backslash", ("\\", "|")),
        ("comma", (",", "<")),
        ("dot", (".", ">")),
        ("slash", ("/", "?")),
        ("spc", (" ", " ")),
        ("ret", ("\n", "\n")),
        ("kp_enter", ("\n", "\n")),
        ("tab", ("\t", "\t")),
        ("asterisk", ("*", "*")),
    ]
)
_SHIFT = ("shift", "shift_r")
# The size of a new cloud-init drive (PVE::QemuServer::Cloudinit::CLOUDINIT_DISK_SIZE).
CLOUDINIT_SIZE = 4 * 1024**2
CLOUDINIT_VOLUME = re.compile(r"^(?:([^/:\s]+):)?cloudinit$")


def _bad_key(keys: str) -> str | None:
    """The first part of an HMP sendkey argument QEMU does not know, or None."""
    for part in keys.split("-"):
        if not part:
            continue
        if part.startswith("0x"):
            try:
                int(part, 16)
                continue
            except ValueError:
                return part
        if part not in QEMU_KEYS:
            return part
    return None


def keys_to_text(keys: Iterable[str]) -> str:
    """What a sequence of sendkey arguments types on a US keyboard.

    Printable keys (with or without shift) become their characters, ret a newline; anything else
    (esc, f-keys, ctrl/alt combinations) shows as `<name>`, e.g. `<esc>` or `<ctrl-alt-delete>`.
    """
    out = []
    for combo in keys:
        parts = [p for p in combo.split("-") if p]
        shifted = any(p in _SHIFT for p in parts)
        rest = [p for p in parts if p not in _SHIFT]
        if len(rest) == 1 and rest[0] in _US:
            out.append(_US[rest[0]][1 if shifted else 0])
        else:
            out.append(f"<{combo}>")
    return "".join(out)


class PackerCompat:
    """Mixin of LabPve (first in its bases): what packer 1.6.6's proxmox-iso builder needs beyond fakepve."""

    def _routes_packer_compat(self) -> list[tuple[str, str, Any]]:
        return [("PUT", "/nodes/{node}/qemu/{vmid}/sendkey", self._qm_sendkey)]

    # ------------------------------------------------------------ sendkey

    async def _qm_sendkey(self, v: dict[str, Any], user: str) -> None:
        """PVE::API2::Qemu vm_sendkey -> PVE::QemuServer::vm_sendkey -> HMP `sendkey <key>`."""
        skiplock = v.get("skiplock")
        if skiplock and user != "root@pam":  # a root@pam token is not root here
            raise param_error(skiplock="Only root may use this option.")
        vm = self.find(v["node"], v["vmid"])
        try:
            await self.acquire(vm, "sendkey")
        except TaskError as e:
            raise die(str(e)) from e
        try:
            if not skiplock:
                self._check_lock(vm)
            self._need_running(vm)
            key = str(v["key"])
            bad = _bad_key(key)
            if bad is not None or not key.strip("-"):
                raise die(f"invalid parameter: {bad if bad is not None else key}")
            if not hasattr(vm, "sendkeys"):
                vm.sendkeys = []
            vm.sendkeys.append(key)
        finally:
            self.release(vm, "sendkey")

    def typed_text(self, vmid: int | str) -> str:
        """The keys the VM was sent through sendkey, as text (see keys_to_text)."""
        return keys_to_text(getattr(self.vm(int(vmid)), "sendkeys", []))

    # ---------------------------------------------------------- cloud-init

    def _ci_alloc(self, sid: str, vmid: int, fmt: str | None) -> tuple[str, str]:
        """Allocate the VM's cloud-init volume as create_disks does: returns (volume id, format)."""
        store = self._store(sid)
        if not store.get("active", 1):
            raise die(f"storage '{sid}' is not online")
        name = f"vm-{vmid}-cloudinit"
        if _is_file(store):
            fmt = fmt or "qcow2"
            name += "." + fmt
        else:
            fmt = fmt or "raw"
        volname, fmt = self._volume_name(store, vmid, fmt, name)
        if volname in self._volumes(sid):
            if _is_file(store):
                raise die(f"disk image '{self._volume_path(sid, volname, 'images')}' already exists")
            raise die(_exists_message(store, volname))
        if "avail" in store:
            if store["avail"] < CLOUDINIT_SIZE:
                raise die(f"unable to write to storage '{sid}': No space left on device")
            store["avail"] -= CLOUDINIT_SIZE
        store.setdefault("volumes", {})[volname] = {
            "content": "images",
            "format": fmt,
            "size": CLOUDINIT_SIZE,
            "vmid": vmid,
            "ctime": int(time.time()),
        }
        return f"{sid}:{volname}", fmt

    @staticmethod
    def _ci_attached(config: dict[str, Any], but: str | None = None) -> str | None:
        """The key of the config's cloud-init drive, or None (PVE::QemuConfig::has_cloudinit)."""
        for key, value in config.items():
            if key == but or not DRIVE_KEY.match(key) or value is None:
                continue
            volume = split_drive(value)[0]
            if re.search(r"[:/](?:vm-\d+-)?cloudinit(?:\.(?:raw|qcow2|vmdk))?$", volume):
                return key
        return None

    def _qm_new_drive(self, vmid: int, key: str, value: str, default: str | None) -> tuple[str, list[str]]:
        volume, props = split_drive(value)
        found = CLOUDINIT_VOLUME.match(volume)
        if not found:
            return super()._qm_new_drive(vmid, key, value, default)
        sid = found.group(1) or default
        if not sid:
            raise die("no storage ID specified (and no default storage)")
        props = dict(props)
        props.pop("size", None)
        volid, _fmt = self._ci_alloc(sid, vmid, props.pop("format", None))
        props["media"] = "cdrom"
        return join_drive(volid, props), [volid]

    async def _apply_config(self, vm: FakeVm, user: str, p: dict[str, Any]) -> None:
        """A config update that adds `<storage>:cloudinit` allocates the drive first, as PVE does."""
        wanted: dict[str, tuple[str | None, dict[str, Any]]] = {}
        for key, value in p.items():
            if DRIVE_KEY.match(key):
                volume, props = split_drive(value)
                found = CLOUDINIT_VOLUME.match(volume)
                if found:
                    wanted[key] = (found.group(1), dict(props))
        if not wanted:
            return await super()._apply_config(vm, user, p)
        updates = dict(p)
        made: list[str] = []
        final: dict[str, tuple[str, str]] = {}
        try:
            for key, (sid, props) in sorted(wanted.items()):
                if not sid:
                    raise die("no storage ID specified (and no default storage)")
                other = self._ci_attached(dict(vm.config, **{k: x for k, x in vm.pending.items() if x}), but=key)
                if other:
                    raise die(f"{key} - cloud-init drive is already attached at '{other}'")
                self._qm_image_store(sid, user)
                props.pop("size", None)
                volid, _fmt = self._ci_alloc(sid, vm.vmid, props.pop("format", None))
                made.append(volid)
                # The request asks for a disk (VM.Config.Disk); media=cdrom is what PVE writes once it exists.
                updates[key] = join_drive(volid, props)
                final[key] = (updates[key], join_drive(volid, dict(props, media="cdrom")))
            await super()._apply_config(vm, user, updates)
        except (PveError, TaskError):
            for volid in made:
                super()._qm_free(volid)
            raise
        for key, (asked, written) in final.items():
            for place in (vm.config, vm.pending):
                if place.get(key) == asked:
                    place[key] = written
        return None

    # -------------------------------------------------------------- destroy

    def _qm_free(self, volid: str) -> None:
        """Free a volume only if a guest owns it: never an ISO, template or snippet a VM merely uses."""
        sid, name = volume_ref(volid)
        store = self.storages.get(sid)
        if store is None:
            return None
        try:
            _vtype, owner, _fmt = self._parse_volname(store, name)
        except PveError:
            owner = None
        if not owner:
            return None
        return super()._qm_free(volid)
