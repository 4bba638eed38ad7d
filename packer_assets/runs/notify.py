"""Notifications: a failed run or a promoted template, posted to webhooks.

Webhooks come from PACKER_ASSETS_WEBHOOKS (a secret: Slack webhook URLs carry their token), a
comma-separated list of `json:<url>` (the generic payload below) and `slack:<url>` (Slack's
`{"text": ...}`, which Mattermost, Rocket.Chat and Teams workflows also take). Each post has a
timeout and is retried with backoff on a connection error, a 429 or a 5xx, all attempts of one
delivery within one deadline (every read checks it, so a trickled answer cannot outlast it); a webhook that still
fails is reported without its URL (only its scheme and host). Payloads hold the key, chain ID, run
status, template VMID, proof path, the error's first line (with known secrets masked) and the run's
URL: never a credential.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection

from packer_assets.errors import ConfigError, OperationError

Event = Literal["failed", "promoted"]
RETRIES = 3
TIMEOUT = 10.0  # one connect or read
DEADLINE = 30.0  # every attempt and pause of one delivery
BACKOFF = 1.0  # seconds before the 2nd attempt; doubled before each further one
ERROR_SHOWN = 300


class WebhookConfigError(ConfigError):
    """PACKER_ASSETS_WEBHOOKS is malformed; the message names the entry by position, never its URL."""


@dataclass(frozen=True)
class Webhook:
    format: Literal["json", "slack"]
    url: str

    @property
    def shown(self) -> str:
        """The webhook as logs may name it: scheme and host only (the path is the secret)."""
        parts = urlsplit(self.url)
        return f"{self.format}:{parts.scheme}://{parts.hostname}"

    def __repr__(self) -> str:
        return f"Webhook({self.shown})"


def parse_webhooks(text: str | None) -> list[Webhook]:
    hooks = []
    for i, raw in enumerate(x.strip() for x in (text or "").split(",")):
        if not raw:
            continue
        kind, sep, url = raw.partition(":")
        if kind not in ("json", "slack") or not sep or not _valid_url(url):
            raise WebhookConfigError(
                f"PACKER_ASSETS_WEBHOOKS entry {i + 1}: want json:<http(s) URL> or slack:<http(s) URL>, comma-separated"
            )
        hooks.append(Webhook(kind, url))  # type: ignore[arg-type]
    return hooks


def _valid_url(url: str) -> bool:
    """An http(s) URL with a host and a valid port; urlsplit's ValueError (a bad IPv6 bracket, a port out of
    range) would name the URL, and the URL may hold credentials."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@dataclass(frozen=True)
class Notification:
    event: Event
    key: str | None
    chain_id: str | None
    status: str
    run_id: str
    template_vmid: int | None = None
    proof: str | None = None
    error: str | None = None
    run_url: str | None = None

    def payload(self) -> dict[str, Any]:
        return {"source": "packer-assets", **asdict(self)}

    def text(self) -> str:
        what = (
            f"template {self.template_vmid} promoted"
            if self.event == "promoted"
            else f"run FAILED: {self.error or 'no error message'}"
        )
        where = f" ({self.chain_id})" if self.chain_id else ""
        tail = f" {self.run_url}" if self.run_url else f" run {self.run_id}"
        proof = f"; proof {self.proof}" if self.proof else ""
        return f"packer-assets {self.key or '-'}{where}: {what}{proof}.{tail}"


def first_line(text: str | None, secrets: Iterable[str] = ()) -> str | None:
    """The first non-empty line of an error, cut short, with every known secret value masked."""
    if not text:
        return None
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        line = line.replace(secret, "***")
    line = re.sub(r"(https?://)[^/@\s]+@", r"\1***@", line)  # credentials in URLs
    return line[:ERROR_SHOWN]


@dataclass(frozen=True)
class Delivery:
    webhook: str  # Webhook.shown
    ok: bool
    attempts: int
    said: str


def body_for(hook: Webhook, notification: Notification) -> dict[str, Any]:
    return {"text": notification.text()} if hook.format == "slack" else notification.payload()


def deliver(
    hook: Webhook,
    notification: Notification,
    *,
    retries: int = RETRIES,
    timeout: float = TIMEOUT,
    backoff: float = BACKOFF,
    deadline: float = DEADLINE,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Delivery:
    """Post once, retrying a connection error, a 429 or a 5xx up to `retries` attempts in all, every attempt
    and pause within `deadline` seconds of the first (`timeout` bounds one read: a receiver that trickles
    its answer would pass every read)."""
    data = json.dumps(body_for(hook, notification)).encode()
    until = clock() + deadline
    said = "not attempted"

    def late(attempts: int) -> Delivery:
        return Delivery(hook.shown, False, attempts, f"gave up at the {deadline:g} s deadline ({said})")

    with _deadline_session() as session:
        for attempt in range(1, retries + 1):
            if clock() >= until:  # a read gave up at the deadline
                return late(attempt - 1)
            answer, said = _post(session, hook.url, data, min(timeout, until - clock()), (until, clock))
            if answer is not None and answer.status_code < 300:
                return Delivery(hook.shown, True, attempt, said)
            if answer is not None and answer.status_code != 429 and answer.status_code < 500:
                return Delivery(hook.shown, False, attempt, said)  # the receiver refused it: retrying won't help
            pause = backoff * 2 ** (attempt - 1)
            if attempt < retries and clock() + pause >= until:
                return late(attempt)
            if attempt < retries:
                sleep(pause)
    return Delivery(hook.shown, False, retries, said)


def _post(
    session: requests.Session, url: str, data: bytes, timeout: float, limit: tuple[float, Callable[[], float]]
) -> tuple[requests.Response | None, str]:
    """One attempt: the answer (None on a connection error or a timeout) and what to say of it."""
    token = _LIMIT.set(limit)
    try:
        answer = session.post(
            url, data=data, timeout=timeout, headers={"Content-Type": "application/json", "User-Agent": "packer-assets"}
        )
        return answer, f"HTTP {answer.status_code}"
    except requests.RequestException as exc:
        return None, type(exc).__name__  # its text would carry the URL
    finally:
        _LIMIT.reset(token)


class DeadlinePassed(OperationError, TimeoutError):
    """The delivery's deadline passed while the receiver was still answering (urllib3: a read timeout)."""


# (until, clock) of the delivery under way in this thread: what every read of its answer checks
_LIMIT: ContextVar[tuple[float, Callable[[], float]] | None] = ContextVar("packer_assets_notify_limit", default=None)


class _DeadlineReader:
    """The response's socket file, checking the delivery's deadline before each read and bounding the
    read's socket timeout by the time left."""

    def __init__(self, fp: Any, sock: Any, limit: tuple[float, Callable[[], float]]) -> None:  # a socket file, a socket
        self._fp, self._sock, (self._until, self._clock) = fp, sock, limit
        self._timeout = sock.gettimeout()

    def _check(self) -> None:
        left = self._until - self._clock()
        if left <= 0:
            raise DeadlinePassed("the delivery's deadline passed")
        self._sock.settimeout(min(self._timeout, left) if self._timeout is not None else left)

    def read(self, *args: Any) -> Any:
        return self._checked("read", args)

    def read1(self, *args: Any) -> Any:
        return self._checked("read1", args)

    def readinto(self, *args: Any) -> Any:
        return self._checked("readinto", args)

    def readline(self, *args: Any) -> Any:
        return self._checked("readline", args)

    def peek(self, *args: Any) -> Any:
        return self._checked("peek", args)

    def _checked(self, name: str, args: tuple[Any, ...]) -> Any:
        self._check()
        return getattr(self._fp, name)(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fp, name)


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        limit = _LIMIT.get()
        if limit is not None:
            self.fp = _DeadlineReader(self.fp, sock, limit)  # type: ignore[assignment]  # reads like the socket file


class _HTTPConnection(urllib3.connection.HTTPConnection):
    response_class = _DeadlineResponse


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    response_class = _DeadlineResponse


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests as usual (proxies from the environment, certifi's CAs), answers read through _DeadlineReader."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


def _deadline_session() -> requests.Session:
    session = requests.Session()
    adapter = _DeadlineAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def notify(hooks: Iterable[Webhook], notification: Notification, **options: Any) -> list[Delivery]:
    return [deliver(hook, notification, **options) for hook in hooks]


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|WEBHOOK|PASSPHRASE", re.I)


def secret_values(environ: dict[str, str]) -> list[str]:
    """Values of environment variables whose names say they are secret: masked in notifications."""
    return [value for name, value in environ.items() if SECRET_NAME.search(name) and value]
