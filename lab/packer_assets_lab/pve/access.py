"""Access control as PVE has it: users, API tokens (privilege separation), roles and ACLs.

LabAccess, a mixin of LabPve, keeps them as state and answers /access/users, /access/roles and
/access/acl with PVE's checks and wording, and replaces fakepve's permission model with PVE's:
ACLs are on from the start (only root@pam and granted users can act), the most specific ACL path
wins, a separated token holds only what both it and its user hold. The behaviour follows
pve-access-control (AccessControl.pm, RPCEnvironment.pm, API2/User.pm, API2/Role.pm, API2/ACL.pm),
including the "... failed: " prefixes that PVE's lock_user_config adds.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from typing import Any

from aiohttp import web
from fakepve.generic import root_only
from fakepve.model import PveError
from fakepve.routing import die, param_error, split_list
from fakepve.shapes import PRIVILEGES

from .roles import Grant, builtin_roles, grant_of

REALMS = {"pam": "pam", "pve": "pve"}
# Paths GET /access/permissions reports even without ACLs there (RPCEnvironment::get_effective_permissions).
TOP_PATHS = ("/", "/access", "/access/groups", "/nodes", "/pool", "/sdn", "/storage", "/vms")
ACL_PATH = re.compile(
    r"^(/|/access|/access/groups|/access/groups/[\w.-]+|/access/realm|/access/realm/[\w.-]+"
    r"|/nodes|/nodes/[\w.-]+|/pool|/pool/[\w.-]+|/sdn|/sdn/zones/[\w.-]+|/sdn/vnets/[\w.-]+"
    r"|/storage|/storage/[\w.-]+|/vms|/vms/[1-9][0-9]{2,}|/mapping(?:/\w+(?:/[\w.-]+)?)?)$"
)
TOKEN_ID = re.compile(r"^([^\s:/]+@[A-Za-z][A-Za-z0-9.\-_]+)!([A-Za-z][A-Za-z0-9.\-_]+)$")
TOKEN_FIELDS = ("privsep", "expire", "comment")
USER_FIELDS = ("enable", "expire", "firstname", "lastname", "email", "comment", "keys")

Values = dict[str, Any]  # a request's checked parameters, path parameters included


def normalize_path(path: str | None) -> str | None:
    """PVE::AccessControl::normalize_path: None if it is not a usable ACL path."""
    if not path:
        return None
    path = re.sub(r"/+", "/", path).rstrip("/") or "/"
    path = path if path.startswith("/") else "/" + path
    return path if re.fullmatch(r"[A-Za-z0-9./_-]+", path) else None


# ------------------------------------------------------------------------ access control


class LabAccess:
    """Mixin: stateful users, API tokens, roles and ACLs, and PVE's permission model over them.

    State: `user_records` (userid -> enable/expire/... and `tokens`), `roles` (roleid -> privileges),
    fakepve's `users` (passwords), `apitokens` (token secrets) and `acl` (ugid -> [(path, Grant)]).
    Groups are not modelled: an ACL or user naming a group fails as PVE does for a missing group.
    """

    def _init_access(self) -> None:
        self.roles = builtin_roles()
        self.special_roles = frozenset(self.roles)
        self.user_records: dict[str, dict[str, Any]] = {"root@pam": {"enable": 1, "expire": 0, "tokens": {}}}
        # ACLs on from the start: fakepve lets everyone do everything while acl is None.
        self.acl: dict[str, list[tuple[str, Any]]] = {}

    def _routes_lab_access(self) -> list[tuple[str, str, Any]]:
        user, token = "/access/users/{userid}", "/access/users/{userid}/token/{tokenid}"
        role = "/access/roles/{roleid}"
        return [
            ("GET", "/access/users", self._user_index),
            ("POST", "/access/users", self._user_create),
            ("GET", user, self._user_read),
            ("PUT", user, self._user_update),
            ("DELETE", user, self._user_delete),
            ("GET", user + "/token", self._token_index),
            ("GET", token, self._token_read),
            ("POST", token, self._token_create),
            ("PUT", token, self._token_update),
            ("DELETE", token, self._token_delete),
            ("GET", "/access/roles", self._role_index),
            ("POST", "/access/roles", self._role_create),
            ("GET", role, self._role_read),
            ("PUT", role, self._role_update),
            ("DELETE", role, self._role_delete),
            ("GET", "/access/acl", self._acl_index),
            ("PUT", "/access/acl", self._acl_update),
        ]

    # ------------------------------------------------------------ permissions

    def permissions(self, authid: str, path: str) -> dict[str, int]:
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

    def allowed(self, user: str, path: str, priv: str) -> bool:
        # fakepve's allowed() unites token and user privileges; PVE intersects them (or, privsep=0, uses the user's).
        return priv in self.permissions(user, path)

    def _roles_at(self, ugid: str, path: str) -> dict[str | frozenset[str], tuple[frozenset[str], int]]:
        """AccessControl::roles for one user or token: the most specific ACL path wins, propagation decides
        whether an ancestor's roles reach `path`, NoAccess empties the set. {role key: (privileges, propagate)}."""
        entries = self.acl.get(ugid, [])
        roles: dict[str | frozenset[str], tuple[frozenset[str], int]] = {}
        for acl_path in sorted({p for p, _ in entries}):
            final = acl_path == path
            if not (acl_path == "/" or final or path.startswith(acl_path + "/")):
                continue
            found = {}
            for entry_path, grant in entries:
                key, privs, propagate = grant_of(grant)
                if entry_path == acl_path and (final or propagate):
                    found[key] = (privs, propagate)
            if found:
                roles = found
        if "NoAccess" in roles:
            return {"NoAccess": (frozenset(), roles["NoAccess"][1])}
        return roles

    def _pool_paths(self, path: str) -> list[str]:
        """The /pool/<name> paths whose ACLs reach path: pools holding the VM or storage."""
        kind, _, ident = path[1:].partition("/")
        if kind == "vms" and ident.isdigit():
            return ["/pool/" + name for name, ids in self.pools.items() if int(ident) in ids]
        if kind == "storage" and ident and "/" not in ident:
            return ["/pool/" + name for name, meta in self.pool_info.items() if ident in meta.get("storage", ())]
        return []

    def _compiled(self, ugid: str, path: str) -> dict[str, int]:
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
        privs: dict[str, int] = {}
        for role_privs, propagate in roles.values():
            for priv in role_privs:
                privs[priv] = int(privs.get(priv, 0) or propagate)
        return privs

    def check_permissions(
        self, user: str | None, perms: dict[str, Any] | None, values: Values, declared: dict[str, Any] | None = None
    ) -> None:
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
            raise PveError(403, f"Permission check failed ({why})" if why else "Permission check failed")

    def _check(
        self, user: str, check: list[Any], values: Values, declared: dict[str, Any] | None = None
    ) -> tuple[bool, str | None]:
        if check[0] == "perm-modify":
            # RPCEnvironment::check_perm_modify: VM.Allocate on a VM (and the like) may also hand out ACLs there.
            path = normalize_path(str(values.get("path", ""))) or str(values.get("path", ""))
            privs = ["Permissions.Modify"]
            for prefix, extra in (
                ("/storage/", "Datastore.Allocate"),
                ("/vms/", "VM.Allocate"),
                ("/pool/", "Pool.Allocate"),
            ):
                if path.startswith(prefix) and len(path) > len(prefix):
                    privs.append(extra)
            return any(self._has(user, path, p) for p in privs), f"{path}, {'|'.join(privs)}"
        return super()._check(user, check, values, declared)

    async def _permissions(self, v: Values, user: str) -> dict[str, dict[str, int]]:
        """GET /access/permissions: your own, your tokens', or (with Sys.Audit on /access) anyone's."""
        who = v.get("userid") or user
        if not (who == user or who.partition("!")[0] == user):
            self.require(user, "/access", "Sys.Audit")
        if v.get("path") is not None:
            return {v["path"]: self.permissions(who, v["path"])}
        paths = set(TOP_PATHS) | {p for entries in self.acl.values() for p, _ in entries}
        paths |= {f"/vms/{i}" for ids in self.pools.values() for i in ids}
        paths |= {"/storage/" + s for meta in self.pool_info.values() for s in meta.get("storage", ())}
        held = {p: self.permissions(who, p) for p in sorted(paths)}
        return {p: privs for p, privs in held.items() if privs}

    def grant(self, user: str, path: str, *privs: str) -> None:
        """fakepve's shortcut, kept working under real roles: an ad-hoc role holding privs, assigned on path."""
        unknown = set(privs) - set(PRIVILEGES)
        if unknown:
            raise ValueError(f"unknown privileges: {sorted(unknown)}")
        roleid = "LabGrant-" + hashlib.sha1(",".join(sorted(privs)).encode()).hexdigest()[:10]
        self.roles.setdefault(roleid, frozenset(privs))
        self.acl_assign(normalize_path(path), roleid, user)

    def acl_assign(self, path: str | None, roleid: str, ugid: str, propagate: int | str = 1) -> None:
        """Give ugid (a user or token id) roleid on path, replacing the same role there."""
        self.acl_remove(path, roleid, ugid)
        self.acl.setdefault(ugid, []).append((path, Grant(self.roles, roleid, propagate)))

    def acl_remove(self, path: str | None, roleid: str, ugid: str) -> None:
        entries = [e for e in self.acl.get(ugid, []) if not (e[0] == path and grant_of(e[1])[0] == roleid)]
        if entries:
            self.acl[ugid] = entries
        else:
            self.acl.pop(ugid, None)

    # ----------------------------------------------------------- login checks

    @staticmethod
    def _enabled(record: dict[str, Any]) -> bool:
        return bool(record.get("enable", 1)) and not (record.get("expire") and record["expire"] < time.time())

    def check_password(self, user: str, password: str) -> bool:
        record = self.user_records.get(user)
        return record is not None and self._enabled(record) and super().check_password(user, password)

    def _authenticate(self, request: web.Request) -> str | None:
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

    def _user(self, userid: str, prefix: str = "") -> dict[str, Any]:
        record = self.user_records.get(userid)
        if record is None:
            raise die(f"{prefix}no such user ('{userid}')")
        return record

    @staticmethod
    def _user_view(record: dict[str, Any], full: Any) -> dict[str, Any]:
        out = {k: record[k] for k in USER_FIELDS if record.get(k) is not None}
        if full:
            out["groups"] = []
            if record.get("tokens"):
                out["tokens"] = {t: dict(info) for t, info in record["tokens"].items()}
        return out

    async def _user_index(self, v: Values, user: str) -> list[dict[str, Any]]:
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

    def add_user(self, userid: str, password: str | None = None, **fields: Any) -> dict[str, Any]:
        """Create a user as POST /access/users does (lab setup needs no HTTP). fields: enable, expire,
        firstname, lastname, email, comment, keys."""
        if userid in self.user_records:
            raise ValueError(f"user {userid!r} already exists")
        record = {"enable": int(fields.pop("enable", 1)), "expire": int(fields.pop("expire", 0) or 0), "tokens": {}}
        record.update((k, val) for k, val in fields.items() if k in USER_FIELDS and val)
        self.user_records[userid] = record
        if password is not None:
            # The lab keeps pam passwords too (a real node would set the Linux account's password).
            self.users[userid] = password
        return record

    async def _user_create(self, v: Values, user: str) -> None:
        userid, fail = v["userid"], "create user failed: "
        if userid in self.user_records:
            raise die(fail + f"user '{userid}' already exists")
        realm = userid.rpartition("@")[2]
        if v.get("password") is not None and realm not in REALMS:
            raise die(fail + f"auth domain '{realm}' does not exist")
        for group in split_list(v.get("groups")):
            raise die(fail + f"no such group '{group}'")
        self.add_user(userid, v.get("password"), **{k: v[k] for k in USER_FIELDS if v.get(k) is not None})

    async def _user_read(self, v: Values, user: str) -> dict[str, Any]:
        return self._user_view(self._user(v["userid"]), full=True)

    async def _user_update(self, v: Values, user: str) -> None:
        record = self._user(v["userid"], "update user failed: ")
        for group in split_list(v.get("groups")):
            raise die(f"update user failed: no such group '{group}'")
        record.update((k, v[k]) for k in USER_FIELDS if v.get(k) is not None)

    async def _user_delete(self, v: Values, user: str) -> None:
        userid = v["userid"]
        record = self._user(userid, "delete user failed: ")
        for tokenid in record.get("tokens", {}):
            self.apitokens.pop(f"{userid}!{tokenid}", None)
            self.acl.pop(f"{userid}!{tokenid}", None)
        self.acl.pop(userid, None)
        self.users.pop(userid, None)
        del self.user_records[userid]
        if userid == "root@pam":  # PVE's userconfig_force_defaults: root@pam always exists
            self.user_records[userid] = {"enable": 1, "expire": 0, "tokens": {}}

    # ----------------------------------------------------------------- tokens

    def _token(self, userid: str, tokenid: str) -> dict[str, Any]:
        record = self._user(userid)
        info = record.setdefault("tokens", {}).get(tokenid)
        if info is None:
            raise die(f"no such token '{tokenid}' for user '{userid}'")
        return info

    async def _token_index(self, v: Values, user: str) -> list[dict[str, Any]]:
        tokens = self._user(v["userid"]).get("tokens", {})
        return [dict(info, tokenid=t) for t, info in sorted(tokens.items())]

    async def _token_read(self, v: Values, user: str) -> dict[str, Any]:
        return dict(self._token(v["userid"], v["tokenid"]))

    def add_token(
        self,
        userid: str,
        tokenid: str,
        privsep: int | str = 1,
        expire: int | str | None = None,
        comment: str | None = None,
    ) -> dict[str, Any]:
        """Create an API token as POST .../token/{tokenid} does; returns that answer (full-tokenid, info, value)."""
        record = self._user(userid)
        if tokenid in record.setdefault("tokens", {}):
            raise param_error(tokenid="Token already exists.")
        info: dict[str, Any] = {"privsep": int(privsep)}
        if expire is not None:
            info["expire"] = int(expire)
        if comment:
            info["comment"] = comment
        record["tokens"][tokenid] = dict({"expire": 0}, **info)
        full = f"{userid}!{tokenid}"
        self.apitokens[full] = str(uuid.uuid4())  # PVE's token values are UUIDs
        return {"full-tokenid": full, "info": info, "value": self.apitokens[full]}

    async def _token_create(self, v: Values, user: str) -> dict[str, Any]:
        privsep = 1 if v.get("privsep") is None else v["privsep"]
        return self.add_token(v["userid"], v["tokenid"], privsep, v.get("expire"), v.get("comment"))

    async def _token_update(self, v: Values, user: str) -> dict[str, Any]:
        userid, tokenid = v["userid"], v["tokenid"]
        info = self._token(userid, tokenid)
        for key in split_list(v.get("delete")):
            if key not in ("comment", "expire"):
                raise param_error(delete=f"unknown option '{key}'")
            info.pop(key, None)
        for key in TOKEN_FIELDS:
            if v.get(key) is not None and (key != "comment" or v[key]):
                info[key] = int(v[key]) if key != "comment" else v[key]
        out = dict(info)
        if v.get("regenerate"):
            full = f"{userid}!{tokenid}"
            self.apitokens[full] = str(uuid.uuid4())
            out.update({"full-tokenid": full, "value": self.apitokens[full]})
        return out

    async def _token_delete(self, v: Values, user: str) -> None:
        userid, tokenid = v["userid"], v["tokenid"]
        self._token(userid, tokenid)
        full = f"{userid}!{tokenid}"
        del self.user_records[userid]["tokens"][tokenid]
        self.apitokens.pop(full, None)
        self.acl.pop(full, None)  # PVE drops ACL entries of tokens that no longer exist

    # ------------------------------------------------------------------ roles

    @staticmethod
    def _privileges(text: str | None) -> list[str]:
        """The privileges of a pve-priv-list, or PVE's 400 (fakepve does not check that format)."""
        privs = split_list(text)
        for priv in privs:
            if priv not in PRIVILEGES:
                raise param_error(privs=f"invalid privilege '{priv}'")
        return privs

    async def _role_index(self, v: Values, user: str) -> list[dict[str, Any]]:
        return [
            {"roleid": r, "privs": ",".join(sorted(p)), "special": int(r in self.special_roles)}
            for r, p in sorted(self.roles.items())
        ]

    async def _role_create(self, v: Values, user: str) -> None:
        privs, roleid = self._privileges(v.get("privs")), v["roleid"]
        if roleid.upper().startswith("PVE"):
            raise param_error(roleid="cannot use role ID starting with the (case-insensitive) 'PVE' namespace")
        if roleid in self.roles:
            raise die(f"create role failed: role '{roleid}' already exists")
        self.roles[roleid] = frozenset(privs)

    async def _role_read(self, v: Values, user: str) -> dict[str, int]:
        if v["roleid"] not in self.roles:
            raise die(f"role '{v['roleid']}' does not exist")
        return dict.fromkeys(sorted(self.roles[v["roleid"]]), 1)

    async def _role_update(self, v: Values, user: str) -> None:
        privs, roleid = self._privileges(v.get("privs")), v["roleid"]
        if roleid in self.special_roles:
            raise die(f"auto-generated role '{roleid}' cannot be modified")
        if roleid not in self.roles:
            raise die(f"update role failed: role '{roleid}' does not exist")
        base = self.roles[roleid] if v.get("append") else frozenset()
        self.roles[roleid] = frozenset(base | set(privs))

    async def _role_delete(self, v: Values, user: str) -> None:
        roleid = v["roleid"]
        if roleid in self.special_roles:
            raise die(f"auto-generated role '{roleid}' cannot be deleted")
        if roleid not in self.roles:
            raise die(f"delete role failed: role '{roleid}' does not exist")
        del self.roles[roleid]  # PVE leaves ACL entries naming it; they grant nothing now

    # ------------------------------------------------------------------- ACLs

    def _may_modify(self, user: str, path: str) -> bool:
        return self._check(user, ["perm-modify", "{path}"], {"path": path})[0]

    async def _acl_index(self, v: Values, user: str) -> list[dict[str, Any]]:
        audit = self.allowed(user, "/access", "Sys.Audit")
        out = []
        for ugid, entries in sorted(self.acl.items()):
            kind = "token" if "!" in ugid else "group" if ugid.startswith("@") else "user"
            for path, grant in entries:
                if audit or self._may_modify(user, path):
                    key, _, propagate = grant_of(grant)
                    out.append(
                        {
                            "path": path,
                            "type": kind,
                            "ugid": ugid.lstrip("@"),
                            "roleid": key if isinstance(key, str) else ",".join(sorted(key)),
                            "propagate": propagate,
                        }
                    )
        return sorted(out, key=lambda e: (e["path"], e["type"], e["ugid"], e["roleid"]))

    def _check_delegation(self, user: str, path: str, roleid: str, propagate: int, delete: Any) -> None:
        """API2/ACL.pm: without Permissions.Modify you may only hand out privileges you hold yourself."""
        held = self.permissions(user, path)
        if "Permissions.Modify" in held:
            return
        verb = "remove" if delete else "add"
        for priv in sorted(self.roles[roleid]):
            if priv not in held:
                raise param_error(
                    role=f"Cannot {verb} role '{roleid}' - requires 'Permissions.Modify' or superset of privileges."
                )
            if propagate and held[priv] != propagate and not delete:
                raise param_error(
                    role=f"Cannot {verb} role '{roleid}' with propagation - requires "
                    "'Permissions.Modify' or propagated superset of privileges."
                )
        if roleid == "NoAccess":
            raise param_error(role=f"Cannot {verb} role '{roleid}' - requires 'Permissions.Modify'")

    async def _acl_update(self, v: Values, user: str) -> None:
        users, groups, tokens = (split_list(v.get(k)) for k in ("users", "groups", "tokens"))
        if not (users or groups or tokens):
            raise param_error(
                **dict.fromkeys(("users", "groups", "tokens"), "either 'users', 'groups' or 'tokens' is required.")
            )
        path = normalize_path(v["path"])
        if path is None or (not v.get("delete") and not ACL_PATH.match(path)):
            raise param_error(path=f"invalid ACL path '{v['path']}'")
        propagate = 0 if v.get("propagate") in (0, "0") else 1
        fail = "ACL update failed: "
        roles = split_list(v["roles"])
        # Check everything first: PVE writes user.cfg only when the whole request went through.
        for roleid in roles:
            if roleid not in self.roles:
                raise die(fail + f"role '{roleid}' does not exist")
            self._check_delegation(user, path, roleid, propagate, v.get("delete"))
            for group in groups:
                raise die(fail + f"group '{group}' does not exist")
            for userid in users:
                if userid not in self.user_records:
                    raise die(fail + f"user '{userid}' does not exist")
            for full in tokens:
                found = TOKEN_ID.match(full)
                if not found:
                    raise die(fail + f"'{full}' is not a valid token ID - not able to split into user and token parts")
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
