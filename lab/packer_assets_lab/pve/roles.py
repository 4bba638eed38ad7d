"""PVE's privileges and roles: the privilege groups, the built-in roles, and an ACL entry's role.

The built-in (special) roles are derived from PVE::AccessControl's privilege groups as PVE 9 does;
a Grant is how LabAccess stores a role on an ACL path in fakepve's `acl` lists, so that a role
changed or deleted later applies to every ACL that names it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fakepve.shapes import PRIVILEGES

# PVE::AccessControl's privilege groups (PVE 9): per category the privileges only root@pam has,
# and those of the category's admin, user and audit roles. The built-in roles are derived from them.
PRIV_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "VM": {
        "root": (),
        "admin": (
            "VM.Config.Disk",
            "VM.Config.CPU",
            "VM.Config.Memory",
            "VM.Config.Network",
            "VM.Config.HWType",
            "VM.Config.Options",
            "VM.Allocate",
            "VM.Clone",
            "VM.Migrate",
            "VM.Replicate",
            "VM.Snapshot",
            "VM.Snapshot.Rollback",
            "VM.GuestAgent.FileRead",
            "VM.GuestAgent.FileWrite",
            "VM.GuestAgent.FileSystemMgmt",
            "VM.GuestAgent.Unrestricted",
        ),
        "user": ("VM.Config.CDROM", "VM.Config.Cloudinit", "VM.Console", "VM.Backup", "VM.PowerMgmt"),
        "audit": ("VM.Audit", "VM.GuestAgent.Audit"),
    },
    "Sys": {
        "root": ("Sys.PowerMgmt", "Sys.Modify", "Sys.Incoming", "Sys.AccessNetwork"),
        "admin": ("Sys.Console", "Sys.Syslog"),
        "user": (),
        "audit": ("Sys.Audit",),
    },
    "Datastore": {
        "root": (),
        "admin": ("Datastore.Allocate", "Datastore.AllocateTemplate"),
        "user": ("Datastore.AllocateSpace",),
        "audit": ("Datastore.Audit",),
    },
    "SDN": {"root": (), "admin": ("SDN.Allocate",), "user": ("SDN.Use",), "audit": ("SDN.Audit",)},
    "User": {
        "root": ("Realm.Allocate",),
        "admin": ("User.Modify", "Group.Allocate", "Realm.AllocateUser"),
        "user": (),
        "audit": (),
    },
    "Pool": {"root": (), "admin": ("Pool.Allocate",), "user": (), "audit": ("Pool.Audit",)},
    "Mapping": {"root": (), "admin": ("Mapping.Modify",), "user": ("Mapping.Use",), "audit": ("Mapping.Audit",)},
}


def builtin_roles() -> dict[str, frozenset[str]]:
    """PVE's special (auto-generated) roles: roleid -> frozenset of privileges."""
    roles = {
        "Administrator": frozenset(PRIVILEGES),
        "NoAccess": frozenset(),
        "PVETemplateUser": frozenset({"VM.Clone", "VM.Audit"}),
        "PVEPoolUser": frozenset({"Pool.Audit"}),
    }
    admin: set[str] = set()
    auditor: set[str] = set()
    for cat, group in PRIV_GROUPS.items():
        roles[f"PVE{cat}Admin"] = frozenset(group["admin"] + group["user"] + group["audit"])
        admin.update(roles[f"PVE{cat}Admin"])
        if group["user"]:
            roles[f"PVE{cat}User"] = frozenset(group["user"] + group["audit"])
        auditor.update(group["audit"])
    roles["PVEAdmin"], roles["PVEAuditor"] = frozenset(admin), frozenset(auditor)
    return roles


class Grant:
    """One ACL entry's role, as it sits in fakepve's `acl` lists: (path, Grant).

    It looks like the privilege set fakepve expects there (`priv in grant`, iteration), but the
    privileges are the role's, looked up when asked, so a role change applies at once.
    """

    __slots__ = ("propagate", "roleid", "roles")

    def __init__(self, roles: dict[str, frozenset[str]], roleid: str, propagate: int | str = 1) -> None:
        self.roles, self.roleid, self.propagate = roles, roleid, int(propagate)

    def privileges(self) -> frozenset[str]:
        return self.roles.get(self.roleid, frozenset())  # a deleted role grants nothing (PVE keeps the ACL)

    def __contains__(self, priv: object) -> bool:
        return priv in self.privileges()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.privileges()))

    def __repr__(self) -> str:
        return f"Grant({self.roleid!r}, propagate={self.propagate})"


def grant_of(entry_privs: Grant | Iterable[str]) -> tuple[str | frozenset[str], frozenset[str], int]:
    """(role key, privileges, propagate) of an acl entry: a Grant, or a plain set someone appended."""
    if isinstance(entry_privs, Grant):
        return entry_privs.roleid, entry_privs.privileges(), entry_privs.propagate
    return frozenset(entry_privs), frozenset(entry_privs), 1
