"""Connecting to the Proxmox API with proxmoxer, and turning its failures into one clear error.

TLS is verified: against a CA file, a pinned certificate fingerprint, or the system store. Only an
explicit `insecure=True` turns verification off. Error messages name the URL and the user or token,
never a password or secret.
"""

import hashlib
import logging
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, Self, cast
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3
from proxmoxer import ProxmoxAPI
from proxmoxer.core import AuthenticationError, ResourceException

from packer_assets.errors import OperationError

log = logging.getLogger(__name__)
# proxmoxer logs request bodies at INFO and response bodies at DEBUG: a created token's secret
# would reach any log handler set to those levels.
for _name in ("proxmoxer", "proxmoxer.core", "proxmoxer.backends.https"):
    logging.getLogger(_name).setLevel(logging.WARNING)

DEFAULT_TIMEOUT = 15


class PveResource(Protocol):
    """One step of proxmoxer's path chain, as this project uses it: attributes and calls build the path
    (`api.nodes(node).qemu(vmid).status.current`), the verbs send it. proxmoxer ships no types; the answers
    are PVE's JSON (`Any`: each caller reads the fields it knows)."""

    def __getattr__(self, name: str) -> "PveResource": ...

    def __call__(self, *path: str | int) -> "PveResource": ...

    def get(self, *args: Any, **params: Any) -> Any: ...

    def post(self, *args: Any, **params: Any) -> Any: ...

    def put(self, *args: Any, **params: Any) -> Any: ...

    def delete(self, *args: Any, **params: Any) -> Any: ...

    def create(self, *args: Any, **params: Any) -> Any: ...

    def set(self, *args: Any, **params: Any) -> Any: ...


# A logged-in proxmoxer.ProxmoxAPI, typed by what is done with it (connect() makes one; the tests' fakes and the
# lab's clients are the same shape). Every signature in pve/ and above takes this, never proxmoxer's class.
PveApi = PveResource


class PveAccessError(OperationError):
    """The API could not be reached, trusted or logged in to; the message says which and where."""


@dataclass(frozen=True)
class Endpoint:
    """Where the API is and how to trust it (no credentials)."""

    url: str  # https://host:port, with or without /api2/json
    ca_file: str | None = None
    tls_fingerprint: str | None = None
    insecure: bool = False
    timeout: int = DEFAULT_TIMEOUT

    @property
    def host(self) -> str:
        return urlsplit(self.base).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.base).port or 8006

    @property
    def base(self) -> str:
        return self.url.rstrip("/").removesuffix("/api2/json")

    @property
    def api_url(self) -> str:
        return self.base + "/api2/json"

    def verify(self) -> str | bool:
        if self.insecure:
            log.warning("TLS verification of %s is OFF (insecure was asked for)", self.base)
            return False
        if self.tls_fingerprint:
            self.check_tls_fingerprint()
            # Pinned: the fingerprint, not a CA chain, is what is trusted (see PinnedAdapter).
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            return False
        return self.ca_file or True

    def check_tls_fingerprint(self) -> str:
        """The API's certificate (PEM), if its SHA-256 fingerprint is the pinned one; PveAccessError if not."""
        try:
            pem = ssl.get_server_certificate((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise PveAccessError(f"{self.base}: cannot reach the API to check its certificate: {exc}") from None
        if not self.tls_fingerprint:
            raise PveAccessError(f"{self.base}: no TLS certificate fingerprint is pinned")
        digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
        seen = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
        if seen != self.tls_fingerprint.upper():
            raise PveAccessError(
                f"{self.base}: TLS certificate fingerprint {seen} does not match the pinned "
                f"{self.tls_fingerprint.upper()}"
            )
        return pem


class PinnedAdapter(requests.adapters.HTTPAdapter):
    """Accept exactly the certificate with this SHA-256 fingerprint (urllib3's assert_fingerprint)."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint.replace(":", "").lower()
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self.fingerprint
        return super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        conn.assert_fingerprint = self.fingerprint
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]  # unannotated in requests' stubs


def _who(user: str, token_name: str | None) -> str:
    return f"{user}!{token_name}" if token_name else user


def connect(
    endpoint: Endpoint,
    user: str,
    *,
    password: str | None = None,
    token_name: str | None = None,
    token_secret: str | None = None,
    check: bool = True,
) -> PveApi:
    """A logged-in ProxmoxAPI (password or API token); with check, /version is read to prove access."""
    who = _who(user, token_name)
    kwargs: dict[str, Any] = dict(port=endpoint.port, user=user, backend="https", timeout=endpoint.timeout)
    if token_name:
        kwargs.update(token_name=token_name, token_value=token_secret)
    else:
        kwargs.update(password=password)
    with translated_errors(endpoint, who):
        api = cast(PveApi, ProxmoxAPI(endpoint.host, verify_ssl=endpoint.verify(), **kwargs))
        if endpoint.tls_fingerprint:
            # Every later connection of the session is pinned too, not only the first check.
            cast(Any, api)._store["session"].mount(endpoint.base, PinnedAdapter(endpoint.tls_fingerprint))
        if check:
            api.version.get()
    return api


class translated_errors:
    """Turn proxmoxer/requests failures into one PveAccessError naming the URL and identity."""

    def __init__(self, endpoint: Endpoint, who: str):
        self.endpoint, self.who = endpoint, who

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> Literal[False]:
        if exc is None or isinstance(exc, PveAccessError):
            return False
        where = self.endpoint.base
        if isinstance(exc, requests.exceptions.SSLError):
            raise PveAccessError(
                f"{where}: TLS verification failed (wrong CA file or certificate?): {_short(exc)}"
            ) from None
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            raise PveAccessError(f"{where}: API unreachable: {_short(exc)}") from None
        if isinstance(exc, AuthenticationError) or (isinstance(exc, ResourceException) and exc.status_code == 401):
            raise PveAccessError(
                f"{where}: authentication failed for {self.who} (wrong password, or the token "
                "was deleted or its secret is wrong)"
            ) from None
        if isinstance(exc, ResourceException) and exc.status_code == 403:
            raise PveAccessError(f"{where}: {self.who} is not allowed: {exc.content.strip()}") from None
        return False


def _short(exc: Exception) -> str:
    text = str(exc)
    # requests nests urllib3's reason; keep the innermost, readable part.
    for marker in ("SSLError(", "NewConnectionError(", "ConnectTimeoutError("):
        if marker in text:
            text = text[text.index(marker) :]
    return text[:300]
