"""The lab's Proxmox node: fakepve's FakePve, extended where the lab needs real behaviour.

fakepve checks every request against PVE's API schema and answers with PVE's wording; LabPve keeps
that (new routes go through fakepve's `_routes_<area>` tables and `answer()`), and adds:

- access control as PVE has it: users, API tokens (privilege separation), roles and ACLs, with
  ACLs switched on from the start (only root@pam and granted users can act);
- a download-url that really fetches the URL, verifies the checksum in the task and keeps the
  bytes under `data_dir`, and an upload that keeps them too;
- a guest agent that answers for a running VM whose config enables it.

The behaviour follows pve-access-control (AccessControl.pm, RPCEnvironment.pm, API2/User.pm,
API2/Role.pm, API2/ACL.pm) and pve-storage / pve-common (API2/Storage/Status.pm,
PVE::Tools::download_file_from_url). Messages are PVE's, including the "... failed: " prefixes
that PVE's lock_user_config adds.
"""

import hashlib
import os
import re
import time
import uuid
from pathlib import Path

import aiohttp
from fakepve import FakePve
from fakepve.generic import root_only
from fakepve.model import PveError, TaskError
from fakepve.routing import die, param_error, split_list
from fakepve.server import API, USER, ok, params
from fakepve.shapes import PRIVILEGES, networks
from fakepve.storage import _is_file

from packer_assets.evidence import file_digest
from packer_assets.lab.pve_packer import PackerCompat

# ------------------------------------------------------------------ privileges and roles

# PVE::AccessControl's privilege groups (PVE 9): per category the privileges only root@pam has,
# and those of the category's admin, user and audit roles. The built-in roles are derived from them.
PRIV_GROUPS = {
    "VM": {"root": (),
           "admin": ("VM.Config.Disk", "VM.Config.CPU", "VM.Config.Memory", "VM.Config.Network",
                     "VM.Config.HWType", "VM.Config.Options", "VM.Allocate", "VM.Clone", "VM.Migrate",
                     "VM.Replicate", "VM.Snapshot", "VM.Snapshot.Rollback", "VM.GuestAgent.FileRead",
                     "VM.GuestAgent.FileWrite", "VM.GuestAgent.FileSystemMgmt", "VM.GuestAgent.Unrestricted"),
           "user": ("VM.Config.CDROM", "VM.Config.Cloudinit", "VM.Console", "VM.Backup", "VM.PowerMgmt"),
           "audit": ("VM.Audit", "VM.GuestAgent.Audit")},
    "Sys": {"root": ("Sys.PowerMgmt", "Sys.Modify", "Sys.Incoming", "Sys.AccessNetwork"),
            "admin": ("Sys.Console", "Sys.Syslog"), "user": (), "audit": ("Sys.Audit",)},
    "Datastore": {"root": (), "admin": ("Datastore.Allocate", "Datastore.AllocateTemplate"),
                  "user": ("Datastore.AllocateSpace",), "audit": ("Datastore.Audit",)},
    "SDN": {"root": (), "admin": ("SDN.Allocate",), "user": ("SDN.Use",), "audit": ("SDN.Audit",)},
    "User": {"root": ("Realm.Allocate",), "admin": ("User.Modify", "Group.Allocate", "Realm.AllocateUser"),
             "user": (), "audit": ()},
    "Pool": {"root": (), "admin": ("Pool.Allocate",), "user": (), "audit": ("Pool.Audit",)},
    "Mapping": {"root": (), "admin": ("Mapping.Modify",), "user": ("Mapping.Use",), "audit": ("Mapping.Audit",)},
}


def builtin_roles():
    """PVE's special (auto-generated) roles: roleid -> frozenset of privileges."""
    roles = {"Administrator": frozenset(PRIVILEGES), "NoAccess": frozenset(),
             "PVETemplateUser": frozenset({"VM.Clone", "VM.Audit"}), "PVEPoolUser": frozenset({"Pool.Audit"})}
    admin, auditor = set(), set()
    for cat, group in PRIV_GROUPS.items():
        roles["PVE{0}Admin".format(cat)] = frozenset(group["admin"] + group["user"] + group["audit"])
        admin.update(roles["PVE{0}Admin".format(cat)])
        if group["user"]:
            roles["PVE{0}User".format(cat)] = frozenset(group["user"] + group["audit"])
        auditor.update(group["audit"])
    roles["PVEAdmin"], roles["PVEAuditor"] = frozenset(admin), frozenset(auditor)
    return roles


REALMS = {"pam": "pam", "pve": "pve"}
# Paths GET /access/permissions reports even without ACLs there (RPCEnvironment::get_effective_permissions).
TOP_PATHS = ("/", "/access", "/access/groups", "/nodes", "/pool", "/sdn", "/storage", "/vms")
ACL_PATH = re.compile(r"^(/|/access|/access/groups|/access/groups/[\w.-]+|/access/realm|/access/realm/[\w.-]+"
                      r"|/nodes|/nodes/[\w.-]+|/pool|/pool/[\w.-]+|/sdn|/sdn/zones/[\w.-]+|/sdn/vnets/[\w.-]+"
                      r"|/storage|/storage/[\w.-]+|/vms|/vms/[1-9][0-9]{2,}|/mapping(?:/\w+(?:/[\w.-]+)?)?)$")
TOKEN_ID = re.compile(r"^([^\s:/]+@[A-Za-z][A-Za-z0-9.\-_]+)!([A-Za-z][A-Za-z0-9.\-_]+)$")
TOKEN_FIELDS = ("privsep", "expire", "comment")
USER_FIELDS = ("enable", "expire", "firstname", "lastname", "email", "comment", "keys")


def normalize_path(path):
    """PVE::AccessControl::normalize_path: None if it is not a usable ACL path."""
    if not path:
        return None
    path = re.sub(r"/+", "/", path).rstrip("/") or "/"
    path = path if path.startswith("/") else "/" + path
    return path if re.fullmatch(r"[A-Za-z0-9./_-]+", path) else None


class Grant:
    """One ACL entry's role, as it sits in fakepve's `acl` lists: (path, Grant).

    It looks like the privilege set fakepve expects there (`priv in grant`, iteration), but the
    privileges are the role's, looked up when asked, so a role change applies at once.
    """

    __slots__ = ("roles", "roleid", "propagate")

    def __init__(self, roles, roleid, propagate=1):
        self.roles, self.roleid, self.propagate = roles, roleid, int(propagate)

    def privileges(self):
        return self.roles.get(self.roleid, frozenset())  # a deleted role grants nothing (PVE keeps the ACL)

    def __contains__(self, priv):
        return priv in self.privileges()

    def __iter__(self):
        return iter(sorted(self.privileges()))

    def __repr__(self):
        return "Grant({0!r}, propagate={1})".format(self.roleid, self.propagate)


def _grant_of(entry_privs):
    """(role key, privileges, propagate) of an acl entry: a Grant, or a plain set someone appended."""
    if isinstance(entry_privs, Grant):
        return entry_privs.roleid, entry_privs.privileges(), entry_privs.propagate
    return frozenset(entry_privs), frozenset(entry_privs), 1


# ------------------------------------------------------------------------ access control

class LabAccess:
    """Mixin: stateful users, API tokens, roles and ACLs, and PVE's permission model over them.

    State: `user_records` (userid -> enable/expire/... and `tokens`), `roles` (roleid -> privileges),
    fakepve's `users` (passwords), `apitokens` (token secrets) and `acl` (ugid -> [(path, Grant)]).
    Groups are not modelled: an ACL or user naming a group fails as PVE does for a missing group.
    """

    def _init_access(self):
        self.roles = builtin_roles()
        self.special_roles = frozenset(self.roles)
        self.user_records = {"root@pam": {"enable": 1, "expire": 0, "tokens": {}}}
        # ACLs on from the start: fakepve lets everyone do everything while acl is None.
        self.acl = {}

    def _routes_lab_access(self):
        user, token = "/access/users/{userid}", "/access/users/{userid}/token/{tokenid}"
        role = "/access/roles/{roleid}"
        return [("GET", "/access/users", self._user_index), ("POST", "/access/users", self._user_create),
                ("GET", user, self._user_read), ("PUT", user, self._user_update), ("DELETE", user, self._user_delete),
                ("GET", user + "/token", self._token_index), ("GET", token, self._token_read),
                ("POST", token, self._token_create), ("PUT", token, self._token_update),
                ("DELETE", token, self._token_delete),
                ("GET", "/access/roles", self._role_index), ("POST", "/access/roles", self._role_create),
                ("GET", role, self._role_read), ("PUT", role, self._role_update), ("DELETE", role, self._role_delete),
                ("GET", "/access/acl", self._acl_index), ("PUT", "/access/acl", self._acl_update)]

    # ------------------------------------------------------------ permissions

    def permissions(self, authid, path):
        """{privilege: propagate} that a user or token holds on path (RPCEnvironment::permissions).

        A token with privsep=0 holds exactly its user's privileges; with privsep=1 those of its own
        ACLs that its user holds too.
        """
        if authid == "root@pam":
            return dict.fromkeys(self.roles["Administrator"], 1)
        path = normalize_path(path) or path
        user, bang, tokenid = authid.partition("!")
        if bang:
            info = self.user_records.get(user, {}).get("tokens", {}).get(tokenid)
            if info is None:
                return {}
            held = self.permissions(user, path)
            if not info.get("privsep", 1):
                return held
            own = self._compiled(authid, path)
            return {p: int(held[p] and flag) for p, flag in own.items() if p in held}
        return self._compiled(user, path)

    def allowed(self, user, path, priv):
        # fakepve's allowed() unites token and user privileges; PVE intersects them (or, privsep=0, uses the user's).
        return priv in self.permissions(user, path)

    def _roles_at(self, ugid, path):
        """AccessControl::roles for one user or token: the most specific ACL path wins, propagation decides
        whether an ancestor's roles reach `path`, NoAccess empties the set. {role key: (privileges, propagate)}."""
        entries = self.acl.get(ugid, [])
        roles = {}
        for acl_path in sorted({p for p, _ in entries}):
            final = acl_path == path
            if not (acl_path == "/" or final or path.startswith(acl_path + "/")):
                continue
            found = {}
            for entry_path, grant in entries:
                key, privs, propagate = _grant_of(grant)
                if entry_path == acl_path and (final or propagate):
                    found[key] = (privs, propagate)
            if found:
                roles = found
        if "NoAccess" in roles:
            return {"NoAccess": (frozenset(), roles["NoAccess"][1])}
        return roles

    def _pool_paths(self, path):
        """The /pool/<name> paths whose ACLs reach path: pools holding the VM or storage."""
        kind, _, ident = path[1:].partition("/")
        if kind == "vms" and ident.isdigit():
            return ["/pool/" + name for name, ids in self.pools.items() if int(ident) in ids]
        if kind == "storage" and ident and "/" not in ident:
            return ["/pool/" + name for name, meta in self.pool_info.items() if ident in meta.get("storage", ())]
        return []

    def _compiled(self, ugid, path):
        """RPCEnvironment's compile_acl_path: roles on path, plus (without propagation) those of its pools."""
        roles = self._roles_at(ugid, path)
        if "NoAccess" not in roles:
            for pool_path in self._pool_paths(path):
                pool_roles = self._roles_at(ugid, pool_path)
                if "NoAccess" in pool_roles:
                    roles = {"NoAccess": (frozenset(), 0)}
                    break
                for key, (privs, _) in pool_roles.items():
                    roles.setdefault(key, (privs, 0))
        privs = {}
        for role_privs, propagate in roles.values():
            for priv in role_privs:
                privs[priv] = int(privs.get(priv, 0) or propagate)
        return privs

    def check_permissions(self, user, perms, values, declared=None):
        if user is None or "!" not in user or not root_only(user):
            return super().check_permissions(user, perms, values, declared)
        # fakepve waves every root@pam token through. In PVE only the root@pam login is root; its
        # tokens hold what permissions() gives them. The same rule, without that shortcut:
        if perms and "check" in perms:
            allowed, why = self._check(user, perms["check"], values, declared)
        elif perms and perms.get("user") in ("all", "world"):
            return
        else:
            allowed, why = False, "user != root@pam"
        if not allowed:
            raise PveError(403, "Permission check failed ({0})".format(why) if why else "Permission check failed")

    def _check(self, user, check, values, declared=None):
        if check[0] == "perm-modify":
            # RPCEnvironment::check_perm_modify: VM.Allocate on a VM (and the like) may also hand out ACLs there.
            path = normalize_path(str(values.get("path", ""))) or str(values.get("path", ""))
            privs = ["Permissions.Modify"]
            for prefix, extra in (("/storage/", "Datastore.Allocate"), ("/vms/", "VM.Allocate"),
                                  ("/pool/", "Pool.Allocate")):
                if path.startswith(prefix) and len(path) > len(prefix):
                    privs.append(extra)
            return any(self._has(user, path, p) for p in privs), "{0}, {1}".format(path, "|".join(privs))
        return super()._check(user, check, values, declared)

    async def _permissions(self, v, user):
        """GET /access/permissions: your own, your tokens', or (with Sys.Audit on /access) anyone's."""
        who = v.get("userid") or user
        if not (who == user or who.partition("!")[0] == user):
            self.require(user, "/access", "Sys.Audit")
        if v.get("path") is not None:
            return {v["path"]: self.permissions(who, v["path"])}
        paths = set(TOP_PATHS) | {p for entries in self.acl.values() for p, _ in entries}
        paths |= {"/vms/{0}".format(i) for ids in self.pools.values() for i in ids}
        paths |= {"/storage/" + s for meta in self.pool_info.values() for s in meta.get("storage", ())}
        held = {p: self.permissions(who, p) for p in sorted(paths)}
        return {p: privs for p, privs in held.items() if privs}

    def grant(self, user, path, *privs):
        """fakepve's shortcut, kept working under real roles: an ad-hoc role holding privs, assigned on path."""
        unknown = set(privs) - set(PRIVILEGES)
        if unknown:
            raise ValueError("unknown privileges: {0}".format(sorted(unknown)))
        roleid = "LabGrant-" + hashlib.sha1(",".join(sorted(privs)).encode()).hexdigest()[:10]
        self.roles.setdefault(roleid, frozenset(privs))
        self.acl_assign(normalize_path(path), roleid, user)

    def acl_assign(self, path, roleid, ugid, propagate=1):
        """Give ugid (a user or token id) roleid on path, replacing the same role there."""
        self.acl_remove(path, roleid, ugid)
        self.acl.setdefault(ugid, []).append((path, Grant(self.roles, roleid, propagate)))

    def acl_remove(self, path, roleid, ugid):
        entries = [e for e in self.acl.get(ugid, []) if not (e[0] == path and _grant_of(e[1])[0] == roleid)]
        if entries:
            self.acl[ugid] = entries
        else:
            self.acl.pop(ugid, None)

    # ----------------------------------------------------------- login checks

    @staticmethod
    def _enabled(record):
        return bool(record.get("enable", 1)) and not (record.get("expire") and record["expire"] < time.time())

    def check_password(self, user, password):
        record = self.user_records.get(user)
        return record is not None and self._enabled(record) and super().check_password(user, password)

    def _authenticate(self, request):
        # fakepve knows secrets and tickets; PVE also refuses a disabled or expired user, or an expired token.
        who = super()._authenticate(request)
        if who is None:
            return who
        user, bang, tokenid = who.partition("!")
        record = self.user_records.get(user)
        if record is None or not self._enabled(record):
            raise PveError(401, "authentication failure" if bang else "permission denied - invalid PVE ticket")
        if bang:
            info = record.get("tokens", {}).get(tokenid)
            if info is None or (info.get("expire") and info["expire"] < time.time()):
                raise PveError(401, "authentication failure")
        return who

    # ------------------------------------------------------------------ users

    def _user(self, userid, prefix=""):
        record = self.user_records.get(userid)
        if record is None:
            raise die("{0}no such user ('{1}')".format(prefix, userid))
        return record

    @staticmethod
    def _user_view(record, full):
        out = {k: record[k] for k in USER_FIELDS if record.get(k) is not None}
        if full:
            out["groups"] = []
            if record.get("tokens"):
                out["tokens"] = {t: dict(info) for t, info in record["tokens"].items()}
        return out

    async def _user_index(self, v, user):
        see_all = any(self.allowed(user, "/access/groups", p) for p in ("User.Modify", "Sys.Audit"))
        out = []
        for userid in sorted(self.user_records):
            record = self.user_records[userid]
            if not (see_all or userid == user):
                continue
            if v.get("enabled") is not None and bool(record.get("enable", 1)) != bool(v["enabled"]):
                continue
            entry = self._user_view(record, v.get("full"))
            if v.get("full"):
                entry["groups"] = ""
                entry["tokens"] = [dict(info, tokenid=t) for t, info in sorted(record.get("tokens", {}).items())]
            realm = userid.rpartition("@")[2]
            if realm in REALMS:
                entry["realm-type"] = REALMS[realm]
            entry["userid"] = userid
            out.append(entry)
        return out

    def add_user(self, userid, password=None, **fields):
        """Create a user as POST /access/users does (lab setup needs no HTTP). fields: enable, expire,
        firstname, lastname, email, comment, keys."""
        if userid in self.user_records:
            raise ValueError("user {0!r} already exists".format(userid))
        record = {"enable": int(fields.pop("enable", 1)), "expire": int(fields.pop("expire", 0) or 0), "tokens": {}}
        record.update((k, val) for k, val in fields.items() if k in USER_FIELDS and val)
        self.user_records[userid] = record
        if password is not None:
            # The lab keeps pam passwords too (a real node would set the Linux account's password).
            self.users[userid] = password
        return record

    async def _user_create(self, v, user):
        userid, fail = v["userid"], "create user failed: "
        if userid in self.user_records:
            raise die(fail + "user '{0}' already exists".format(userid))
        realm = userid.rpartition("@")[2]
        if v.get("password") is not None and realm not in REALMS:
            raise die(fail + "auth domain '{0}' does not exist".format(realm))
        for group in split_list(v.get("groups")):
            raise die(fail + "no such group '{0}'".format(group))
        self.add_user(userid, v.get("password"), **{k: v[k] for k in USER_FIELDS if v.get(k) is not None})

    async def _user_read(self, v, user):
        return self._user_view(self._user(v["userid"]), full=True)

    async def _user_update(self, v, user):
        record = self._user(v["userid"], "update user failed: ")
        for group in split_list(v.get("groups")):
            raise die("update user failed: no such group '{0}'".format(group))
        record.update((k, v[k]) for k in USER_FIELDS if v.get(k) is not None)

    async def _user_delete(self, v, user):
        userid = v["userid"]
        record = self._user(userid, "delete user failed: ")
        for tokenid in record.get("tokens", {}):
            self.apitokens.pop("{0}!{1}".format(userid, tokenid), None)
            self.acl.pop("{0}!{1}".format(userid, tokenid), None)
        self.acl.pop(userid, None)
        self.users.pop(userid, None)
        del self.user_records[userid]
        if userid == "root@pam":  # PVE's userconfig_force_defaults: root@pam always exists
            self.user_records[userid] = {"enable": 1, "expire": 0, "tokens": {}}

    # ----------------------------------------------------------------- tokens

    def _token(self, userid, tokenid):
        record = self._user(userid)
        info = record.setdefault("tokens", {}).get(tokenid)
        if info is None:
            raise die("no such token '{0}' for user '{1}'".format(tokenid, userid))
        return info

    async def _token_index(self, v, user):
        tokens = self._user(v["userid"]).get("tokens", {})
        return [dict(info, tokenid=t) for t, info in sorted(tokens.items())]

    async def _token_read(self, v, user):
        return dict(self._token(v["userid"], v["tokenid"]))

    def add_token(self, userid, tokenid, privsep=1, expire=None, comment=None):
        """Create an API token as POST .../token/{tokenid} does; returns that answer (full-tokenid, info, value)."""
        record = self._user(userid)
        if tokenid in record.setdefault("tokens", {}):
            raise param_error(tokenid="Token already exists.")
        info = {"privsep": int(privsep)}
        if expire is not None:
            info["expire"] = int(expire)
        if comment:
            info["comment"] = comment
        record["tokens"][tokenid] = dict({"expire": 0}, **info)
        full = "{0}!{1}".format(userid, tokenid)
        self.apitokens[full] = str(uuid.uuid4())  # PVE's token values are UUIDs
        return {"full-tokenid": full, "info": info, "value": self.apitokens[full]}

    async def _token_create(self, v, user):
        privsep = 1 if v.get("privsep") is None else v["privsep"]
        return self.add_token(v["userid"], v["tokenid"], privsep, v.get("expire"), v.get("comment"))

    async def _token_update(self, v, user):
        userid, tokenid = v["userid"], v["tokenid"]
        info = self._token(userid, tokenid)
        for key in split_list(v.get("delete")):
            if key not in ("comment", "expire"):
                raise param_error(delete="unknown option '{0}'".format(key))
            info.pop(key, None)
        for key in TOKEN_FIELDS:
            if v.get(key) is not None and (key != "comment" or v[key]):
                info[key] = int(v[key]) if key != "comment" else v[key]
        out = dict(info)
        if v.get("regenerate"):
            full = "{0}!{1}".format(userid, tokenid)
            self.apitokens[full] = str(uuid.uuid4())
            out.update({"full-tokenid": full, "value": self.apitokens[full]})
        return out

    async def _token_delete(self, v, user):
        userid, tokenid = v["userid"], v["tokenid"]
        self._token(userid, tokenid)
        full = "{0}!{1}".format(userid, tokenid)
        del self.user_records[userid]["tokens"][tokenid]
        self.apitokens.pop(full, None)
        self.acl.pop(full, None)  # PVE drops ACL entries of tokens that no longer exist

    # ------------------------------------------------------------------ roles

    @staticmethod
    def _privileges(text):
        """The privileges of a pve-priv-list, or PVE's 400 (fakepve does not check that format)."""
        privs = split_list(text)
        for priv in privs:
            if priv not in PRIVILEGES:
                raise param_error(privs="invalid privilege '{0}'".format(priv))
        return privs

    async def _role_index(self, v, user):
        return [{"roleid": r, "privs": ",".join(sorted(p)), "special": int(r in self.special_roles)}
                for r, p in sorted(self.roles.items())]

    async def _role_create(self, v, user):
        privs, roleid = self._privileges(v.get("privs")), v["roleid"]
        if roleid.upper().startswith("PVE"):
            raise param_error(roleid="cannot use role ID starting with the (case-insensitive) 'PVE' namespace")
        if roleid in self.roles:
            raise die("create role failed: role '{0}' already exists".format(roleid))
        self.roles[roleid] = frozenset(privs)

    async def _role_read(self, v, user):
        if v["roleid"] not in self.roles:
            raise die("role '{0}' does not exist".format(v["roleid"]))
        return dict.fromkeys(sorted(self.roles[v["roleid"]]), 1)

    async def _role_update(self, v, user):
        privs, roleid = self._privileges(v.get("privs")), v["roleid"]
        if roleid in self.special_roles:
            raise die("auto-generated role '{0}' cannot be modified".format(roleid))
        if roleid not in self.roles:
            raise die("update role failed: role '{0}' does not exist".format(roleid))
        base = self.roles[roleid] if v.get("append") else frozenset()
        self.roles[roleid] = frozenset(base | set(privs))

    async def _role_delete(self, v, user):
        roleid = v["roleid"]
        if roleid in self.special_roles:
            raise die("auto-generated role '{0}' cannot be deleted".format(roleid))
        if roleid not in self.roles:
            raise die("delete role failed: role '{0}' does not exist".format(roleid))
        del self.roles[roleid]  # PVE leaves ACL entries naming it; they grant nothing now

    # ------------------------------------------------------------------- ACLs

    def _may_modify(self, user, path):
        return self._check(user, ["perm-modify", "{path}"], {"path": path})[0]

    async def _acl_index(self, v, user):
        audit = self.allowed(user, "/access", "Sys.Audit")
        out = []
        for ugid, entries in sorted(self.acl.items()):
            kind = "token" if "!" in ugid else "group" if ugid.startswith("@") else "user"
            for path, grant in entries:
                if audit or self._may_modify(user, path):
                    key, _, propagate = _grant_of(grant)
                    out.append({"path": path, "type": kind, "ugid": ugid.lstrip("@"),
                                "roleid": key if isinstance(key, str) else ",".join(sorted(key)),
                                "propagate": propagate})
        return sorted(out, key=lambda e: (e["path"], e["type"], e["ugid"], e["roleid"]))

    def _check_delegation(self, user, path, roleid, propagate, delete):
        """API2/ACL.pm: without Permissions.Modify you may only hand out privileges you hold yourself."""
        held = self.permissions(user, path)
        if "Permissions.Modify" in held:
            return
        verb = "remove" if delete else "add"
        for priv in sorted(self.roles[roleid]):
            if priv not in held:
                raise param_error(role="Cannot {0} role '{1}' - requires 'Permissions.Modify' or superset of "
                                       "privileges.".format(verb, roleid))
            if propagate and held[priv] != propagate and not delete:
                raise param_error(role="Cannot {0} role '{1}' with propagation - requires 'Permissions.Modify' "
                                       "or propagated superset of privileges.".format(verb, roleid))
        if roleid == "NoAccess":
            raise param_error(role="Cannot {0} role '{1}' - requires 'Permissions.Modify'".format(verb, roleid))

    async def _acl_update(self, v, user):
        users, groups, tokens = (split_list(v.get(k)) for k in ("users", "groups", "tokens"))
        if not (users or groups or tokens):
            raise param_error(**dict.fromkeys(("users", "groups", "tokens"),
                                              "either 'users', 'groups' or 'tokens' is required."))
        path = normalize_path(v["path"])
        if path is None or (not v.get("delete") and not ACL_PATH.match(path)):
            raise param_error(path="invalid ACL path '{0}'".format(v["path"]))
        propagate = 0 if v.get("propagate") in (0, "0") else 1
        fail = "ACL update failed: "
        roles = split_list(v["roles"])
        # Check everything first: PVE writes user.cfg only when the whole request went through.
        for roleid in roles:
            if roleid not in self.roles:
                raise die(fail + "role '{0}' does not exist".format(roleid))
            self._check_delegation(user, path, roleid, propagate, v.get("delete"))
            for group in groups:
                raise die(fail + "group '{0}' does not exist".format(group))
            for userid in users:
                if userid not in self.user_records:
                    raise die(fail + "user '{0}' does not exist".format(userid))
            for full in tokens:
                found = TOKEN_ID.match(full)
                if not found:
                    raise die(fail + "'{0}' is not a valid token ID - not able to split into user and token "
                                     "parts".format(full))
                try:
                    self._token(found.group(1), found.group(2))
                except PveError as e:
                    raise die(fail + e.message) from e
        for roleid in roles:
            for ugid in users + tokens:
                if v.get("delete"):
                    self.acl_remove(path, roleid, ugid)
                else:
                    self.acl_assign(path, roleid, ugid, propagate)


# ----------------------------------------------------------------------- storage transfer

# Where a content type lives below a directory storage (PVE::Storage::Plugin's get_subdir).
CONTENT_DIRS = {"iso": "template/iso", "vztmpl": "template/cache", "import": "import"}
EXTENSIONS = {"iso": r"\.(?:iso|img)$", "vztmpl": r"\.tar\.(?:gz|xz|zst|bz2)$",
              "import": r"\.(?:ova|ovf|qcow2|raw|vmdk)$"}
HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
CHUNK = 1024 * 1024
# wget's exit codes, which PVE reports: network failure, TLS failure, error answer from the server.
WGET_NETWORK, WGET_TLS, WGET_SERVER = 4, 5, 8


def normalize_content_filename(name):
    """PVE::Storage::normalize_content_filename: the base name, unsafe characters replaced by '_'."""
    return re.sub(r"[^a-zA-Z0-9_.-]", "_", re.sub(r"^.*[/\\]", "", name.strip("\n")))


def encode_text(text):
    """PVE::Tools::encode_text, for a task's worker id."""
    return re.sub(r"[\x00-\x1f\x7f-\xff:\\]", lambda m: "\\x{0:02x}".format(ord(m.group(0))), text)




def parse_multipart(body, content_type):
    """The form fields and the file part ((filename, bytes) or None) of a multipart/form-data body."""
    found = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not found:
        raise PveError(400, "bad upload request")
    fields, upload = {}, None
    for part in body.split(b"--" + found.group(1).encode())[1:-1]:
        head, _, data = part[2:].partition(b"\r\n\r\n")
        data = data[:-2] if data.endswith(b"\r\n") else data
        head = head.decode("utf-8", "replace")
        name = re.search(r'(?<!file)name="([^"]*)"', head)
        filename = re.search(r'filename="([^"]*)"', head)
        if filename:
            upload = (filename.group(1), data)
        elif name:
            fields[name.group(1)] = data.decode("utf-8", "replace")
    return fields, upload


class LabTransfer:
    """Mixin: download-url and upload that keep the real bytes under `data_dir`.

    `downloads` lists every download that ended in a stored file, `failed_downloads` the others
    (dicts with url, storage, filename, size, checksum, ...), so tests can tell what was fetched.
    """

    def _init_transfer(self, data_dir):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.downloads = []
        self.failed_downloads = []

    def content_file(self, storage, content, filename):
        """Where the lab keeps the bytes of a file volume (it need not exist)."""
        return self.data_dir / storage / CONTENT_DIRS[content] / filename

    def volume_file(self, volid):
        """The bytes of a volume such as 'local:iso/debian.iso' on disk, or None if there are none."""
        storage, _, volname = volid.partition(":")
        content, _, filename = volname.partition("/")
        kind = content if content in CONTENT_DIRS else None
        path = self.content_file(storage, kind, filename) if kind and filename else None
        return path if path is not None and path.is_file() and self._has_volume(storage, kind, filename) else None

    def _has_volume(self, storage, content, filename):
        return storage in self.storages and "{0}/{1}".format(content, filename) in self._volumes(storage)

    def _forget_volume(self, storage, content, filename):
        """Drop a volume's record (before it is written again), giving back its space."""
        store = self.storages[storage]
        vol = store.get("volumes", {}).pop("{0}/{1}".format(content, filename), None)
        store["files"].discard(filename)
        if vol and "avail" in store:
            store["avail"] += int(vol.get("size") or 0)

    def _keep(self, storage, content, filename, tmp, size):
        """Register the volume, then move the finished temporary file into place."""
        path = self.content_file(storage, content, filename)
        if self._has_volume(storage, content, filename):
            self._forget_volume(storage, content, filename)
        self.store_file(storage, filename, size, content)  # TaskError if the storage is full
        os.replace(tmp, path)

    def _target(self, v, verb):
        """The checks PVE makes before it forks the worker: (store, content, filename, PVE's path)."""
        name = v["storage"]
        store = self._active_store(name, v["node"])
        content = v["content"]
        if verb == "download":
            if not _is_file(store):
                raise die("can't upload to storage type '{0}', not a file based storage!".format(store.get("type")))
            if content not in split_list(store.get("content")):
                raise die("storage '{0}' is not configured for content-type '{1}'".format(name, content))
        elif not _is_file(store):
            raise die("can't upload to storage type '{0}'".format(store.get("type")))
        filename = normalize_content_filename(v["filename"])
        if not re.search(EXTENSIONS[content], filename, re.I):
            raise param_error(filename="invalid filename or wrong extension" if content == "import"
                              else "wrong file extension")
        if verb == "upload" and content not in split_list(store.get("content")):
            raise die("storage '{0}' does not support '{1}' content".format(name, content))
        pve_path = "{0}/{1}/{2}".format(self._base_path(name), CONTENT_DIRS[content], filename)
        self.content_file(name, content, filename).parent.mkdir(parents=True, exist_ok=True)
        return store, content, filename, pve_path

    def _worker_log(self, first_line):
        """The log of the task started with this first line.

        fakepve's task() copies the initial log list but not its strings, so the very string object
        identifies the record; the worker appends its lines there as PVE's worker prints them.
        """
        for record in reversed(self.tasklog):
            if record["log"] and record["log"][0] is first_line:
                return record["log"]
        raise LookupError("task record not found")

    # ------------------------------------------------------------- download

    async def _download_url(self, request):
        user = request[USER]

        async def call(_match, values):
            return await self._download(values, user)
        return ok(await self.answer(request, self.resolve(request, API), await params(request), user, call))

    async def _download(self, v, user):
        store, content, filename, pve_path = self._target(v, "download")
        name, url = v["storage"], v["url"]
        algorithm, expected = v.get("checksum-algorithm"), v.get("checksum")
        first = "downloading {0} to {1}".format(url, pve_path)

        async def body():
            log = self._worker_log(first)
            if v.get("compression"):
                if content != "iso":
                    raise TaskError("decompression not supported for {0}".format(content))
                raise TaskError("no decompression method found")  # the lab does not decompress
            path = self.content_file(name, content, filename)
            if path.is_file() and self._has_volume(name, content, filename):
                return self._existing(path, pve_path, algorithm, expected, log)
            tmp = path.with_name("{0}.tmp.{1}".format(path.name, os.getpid()))
            try:
                size, got = await self._fetch(url, tmp, algorithm, bool(v.get("verify-certificates", 1)), pve_path,
                                              log)
                if algorithm:
                    if got.lower() != expected.lower():
                        log.append("calculating checksum...")
                        raise TaskError("checksum mismatch: got '{0}' != expect '{1}'".format(got, expected))
                    log.append("calculating checksum...OK, checksum verified")
                self._keep(name, content, filename, tmp, size)
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                self.failed_downloads.append(self._download_entry(v, filename, None, expected, str(e)))
                raise
            self.downloads.append(self._download_entry(v, filename, size, expected, None))
            return "download of '{0}' to '{1}' finished".format(url, pve_path)
        return await self.task(v["node"], "download", encode_text(filename), user, body, log=[first])

    @staticmethod
    def _download_entry(v, filename, size, checksum, error):
        return {"url": v["url"], "storage": v["storage"], "content": v["content"], "filename": filename,
                "size": size, "checksum": checksum, "checksum-algorithm": v.get("checksum-algorithm"),
                "error": error}

    @staticmethod
    def _existing(path, pve_path, algorithm, expected, log):
        """download_file_from_url when the file is there: keep it if the checksum matches, else refuse."""
        if not algorithm:
            raise TaskError("refusing to override existing file '{0}'".format(pve_path))
        got = file_digest(path, algorithm)
        if got.lower() != expected.lower():
            log.append("calculating checksum of existing file...")
            raise TaskError("checksum mismatch: got '{0}' != expect '{1}', aborting".format(got, expected))
        return "calculating checksum of existing file...OK, got correct file already, no need to download"

    @staticmethod
    async def _fetch(url, tmp, algorithm, verify, pve_path, log):
        """Stream url into tmp, hashing on the way: (size, hex digest or None). Errors as PVE's wget ones."""
        digest = hashlib.new(algorithm) if algorithm else None
        size = 0
        wget = "wget --progress=dot:giga -O {0}.tmp.{1} {2}".format(pve_path, os.getpid(), url)
        # Like wget: no proxies from the environment, no compressed transfer encoding.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
        try:
            async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
                async with session.get(url, ssl=bool(verify),
                                       headers={"Accept-Encoding": "identity"}) as resp:
                    if resp.status >= 400:
                        log.append("ERROR {0}: {1}.".format(resp.status, resp.reason))
                        raise TaskError("download failed: command '{0}' failed: exit code {1}".format(
                            wget, WGET_SERVER))
                    with open(tmp, "wb") as out:
                        async for chunk in resp.content.iter_chunked(CHUNK):
                            out.write(chunk)
                            size += len(chunk)
                            if digest:
                                digest.update(chunk)
        except (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError) as e:
            log.append("ERROR: cannot verify certificate: {0}".format(e))
            raise TaskError("download failed: command '{0}' failed: exit code {1}".format(wget, WGET_TLS)) from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.append("failed: {0}.".format(e))
            raise TaskError("download failed: command '{0}' failed: exit code {1}".format(wget, WGET_NETWORK)) from e
        log.append("{0} bytes received".format(size))
        return size, digest.hexdigest() if digest else None

    # --------------------------------------------------------------- upload

    async def _upload(self, request):
        # fakepve's upload records the size only, and checks neither the schema nor a checksum.
        user = request[USER]
        fields, upload = parse_multipart(await request.read(), request.headers.get("Content-Type"))
        if upload is None:
            raise PveError(400, "bad upload request")
        fields["filename"] = upload[0]
        self.uploaded = dict(fields, data=upload[1])

        async def call(_match, values):
            return await self._store_upload(values, upload[1], user)
        return ok(await self.answer(request, self.resolve(request, API), fields, user, call))

    async def _store_upload(self, v, data, user):
        store, content, filename, pve_path = self._target(v, "upload")
        name = v["storage"]
        tmpname = "/var/tmp/pveupload-" + uuid.uuid4().hex  # where PVE's HTTP server would have spooled it
        first = "starting file import from: " + tmpname

        async def body():
            log = self._worker_log(first)
            algorithm, expected = v.get("checksum-algorithm"), v.get("checksum")
            if algorithm:
                got = hashlib.new(algorithm, data).hexdigest()
                if got.lower() != expected.lower():
                    log.append("calculating checksum...")
                    raise TaskError("checksum mismatch: got '{0}' != expect '{1}'".format(got, expected))
                log.append("calculating checksum...OK, checksum verified")
            log += ["target node: " + v["node"], "target file: " + pve_path, "file size is: {0}".format(len(data)),
                    "command: cp -- {0} {1}".format(tmpname, pve_path)]
            path = self.content_file(name, content, filename)
            tmp = path.with_name("{0}.tmp.{1}".format(path.name, os.getpid()))
            try:
                tmp.write_bytes(data)
                self._keep(name, content, filename, tmp, len(data))  # PVE overwrites an existing file
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return "finished file import successfully"
        return await self.task(v["node"], "imgcopy", "", user, body, log=[first])


# -------------------------------------------------------------------------- guest and node

def agent_enabled(config):
    """True if a VM config's `agent` option enables the guest agent ('1', 'enabled=1,...', '1,fstrim...')."""
    for part in str(config.get("agent", "0")).split(","):
        key, eq, value = part.partition("=")
        if (not eq and key.strip().lower() in ("1", "yes", "on", "true")) or \
                (eq and key.strip() == "enabled" and value.strip().lower() in ("1", "yes", "on", "true")):
            return True
    return False


class LabGuest:
    """Mixin: the guest agent of running VMs that enable it, and a stateful network listing of the node.

    lab_guest_ip is the address the agent reports for eth0 (the lab's guests are reached on loopback);
    lab_guest_os_name the OS name get-osinfo reports. A test can still set vm.agent to a dict of its own
    answers (fakepve's keys: 'interfaces', 'os', ...).
    """

    lab_guest_ip = "127.0.0.1"
    lab_guest_os_name = "Debian GNU/Linux"

    def _init_guest(self):
        # fakepve's generic answer (vmbr0 and eno1), kept here so a type filter works and tests can add bridges.
        self.lab_networks = networks({})

    def _routes_lab_node(self):
        return [("GET", "/nodes/{node}/network", self._network_list)]

    async def _network_list(self, v, user):
        wanted = v.get("type")
        kinds = {"any_bridge": ("bridge", "OVSBridge"), "any_local_bridge": ("bridge", "OVSBridge"),
                 "include_sdn": None}.get(wanted, (wanted,) if wanted else None)
        return [dict(n) for n in self.lab_networks if kinds is None or n["type"] in kinds]

    async def _agent_call(self, match, values):
        vm = self.find(values["node"], values["vmid"])
        auto = getattr(vm, "lab_agent_auto", False)
        if agent_enabled(vm.config) and vm.agent is None:
            vm.agent, vm.lab_agent_auto = {}, True  # the agent comes up with the enabled VM
        elif not agent_enabled(vm.config) and auto:
            vm.agent, vm.lab_agent_auto = None, False  # disabled in the config: it is gone
        data = await super()._agent_call(match, values)
        command = match.template.rsplit("/", 1)[1]
        if command == "network-get-interfaces" and "interfaces" not in vm.agent:
            data = {"result": self.lab_interfaces(vm)}
        elif command == "get-osinfo" and "os" not in vm.agent:
            data["result"] = dict(data["result"], name=self.lab_guest_os_name,
                                  **{"pretty-name": "{0} {1}".format(self.lab_guest_os_name,
                                                                     data["result"].get("version", ""))})
        return data

    def lab_interfaces(self, vm):
        """What the agent reports: loopback, and eth0 with net0's MAC and lab_guest_ip."""
        found = re.search(r"([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})", str(vm.config.get("net0", "")))
        mac = found.group(1).lower() if found else "bc:24:11:00:00:01"
        family = "ipv6" if ":" in self.lab_guest_ip else "ipv4"
        prefix = 64 if family == "ipv6" else 8 if self.lab_guest_ip.startswith("127.") else 24
        return [{"name": "lo", "hardware-address": "00:00:00:00:00:00",
                 "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8},
                                  {"ip-address": "::1", "ip-address-type": "ipv6", "prefix": 128}]},
                {"name": "eth0", "hardware-address": mac,
                 "ip-addresses": [{"ip-address": self.lab_guest_ip, "ip-address-type": family, "prefix": prefix}]}]


# ------------------------------------------------------------------------------ the node

class LabPve(PackerCompat, LabAccess, LabTransfer, LabGuest, FakePve):
    """The lab's PVE node `pve1`, storages `local` (dir: iso, vztmpl, backup) and `local-lvm` (lvmthin).

    password is root@pam's (the caller picks it; there is no default). Files downloaded or uploaded
    are kept under data_dir/<storage>/<content dir>/<filename>. Serve it with serving.ServedPve.
    """

    def __init__(self, *, password, data_dir, host="127.0.0.1", port=0):
        if not password:
            raise ValueError("LabPve needs a root@pam password")
        super().__init__(user="root@pam", password=password, host=host, port=port)
        self._init_access()
        self._init_transfer(data_dir)
        self._init_guest()

    @property
    def root_password(self):
        return self.password
