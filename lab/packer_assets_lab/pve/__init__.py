"""The lab's Proxmox node: fakepve's FakePve, extended where the lab needs real behaviour.

fakepve checks every request against PVE's API schema and answers with PVE's wording; LabPve keeps
that (new routes go through fakepve's `_routes_<area>` tables and `answer()`), and adds, one mixin
per module:

- access control as PVE has it (`access`, `roles`): users, API tokens (privilege separation),
  roles and ACLs, with ACLs switched on from the start (only root@pam and granted users can act);
- a download-url that really fetches the URL, verifies the checksum in the task and keeps the
  bytes under `data_dir`, and an upload that keeps them too (`transfer`);
- a guest agent that answers for a running VM whose config enables it (`agent`), and answers the smoke
  test's commands as the VM's guest would, with faults to prove each check fails (`guest_answers`);
- simulated guests whose state (machine-id, host keys, users, packages, services, cloud-init, sysprep)
  follows from the answer file packer's boot command names and from what the provisioners ran
  (`simguest`, `guest_state`, `answer_files`, `guest_shell`);
- what Debian's packer 1.6.6 proxmox-iso builder needs beyond fakepve (`packer_compat`);
- real guests for the keys `lab up --real-guest` marks: QEMU, a real disk, the real agent (`realguest`).
"""

from __future__ import annotations

import os

from fakepve import FakePve

from .access import (
    ACL_PATH,
    REALMS,
    TOKEN_FIELDS,
    TOKEN_ID,
    TOP_PATHS,
    USER_FIELDS,
    LabAccess,
    normalize_path,
)
from .agent import LabAgent, agent_enabled
from .guest_answers import FAULTS, LabGuestExec, decode_sshkeys
from .packer_compat import PackerCompat
from .realguest import LabRealGuest, RealGuests, kill_stale_qemus
from .roles import PRIV_GROUPS, Grant, builtin_roles
from .simguest import LabSimGuest
from .transfer import (
    CHUNK,
    CONTENT_DIRS,
    EXTENSIONS,
    HASHES,
    WGET_NETWORK,
    WGET_SERVER,
    WGET_TLS,
    LabTransfer,
    encode_text,
    normalize_content_filename,
    parse_multipart,
)

__all__ = [
    "ACL_PATH",
    "CHUNK",
    "CONTENT_DIRS",
    "EXTENSIONS",
    "FAULTS",
    "HASHES",
    "PRIV_GROUPS",
    "REALMS",
    "TOKEN_FIELDS",
    "TOKEN_ID",
    "TOP_PATHS",
    "USER_FIELDS",
    "WGET_NETWORK",
    "WGET_SERVER",
    "WGET_TLS",
    "Grant",
    "LabAccess",
    "LabAgent",
    "LabGuestExec",
    "LabPve",
    "LabRealGuest",
    "LabSimGuest",
    "LabTransfer",
    "PackerCompat",
    "RealGuests",
    "agent_enabled",
    "builtin_roles",
    "decode_sshkeys",
    "encode_text",
    "kill_stale_qemus",
    "normalize_content_filename",
    "normalize_path",
    "parse_multipart",
]


class LabPve(LabRealGuest, LabSimGuest, PackerCompat, LabAccess, LabTransfer, LabGuestExec, LabAgent, FakePve):
    """The lab's PVE node `pve1`, storages `local` (dir: iso, vztmpl, backup) and `local-lvm` (lvmthin).

    password is root@pam's (the caller picks it; there is no default). Files downloaded or uploaded
    are kept under data_dir/<storage>/<content dir>/<filename>. Serve it with serving.ServedPve.
    """

    def __init__(
        self, *, password: str, data_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if not password:
            raise ValueError("LabPve needs a root@pam password")
        super().__init__(user="root@pam", password=password, host=host, port=port)
        self._init_access()
        self._init_transfer(data_dir)
        self._init_agent()
        self._init_guest_exec()
        self._init_sim_guest()

    @property
    def root_password(self) -> str:
        return self.password
