"""Notifications: a failed run or a promoted template, posted to webhooks.

Webhooks come from PACKER_ASSETS_WEBHOOKS (a secret: Slack webhook URLs carry their token), a
comma-separated list of `json:<url>` (the generic payload below) and `slack:<url>` (Slack's
`{"text": ...}`, which Mattermost, Rocket.Chat and Teams workflows also take). Each post has a
timeout and is retried with backoff on a connection error, a 429 or a 5xx; a webhook that still
fails is reported without its URL (only its scheme and host). Payloads hold the key, chain ID, run
status, template VMID, proof path, the error's first line (with known secrets masked) and the run's
URL: never a credential.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Literal
from urllib.parse import urlsplit

import requests

from .errors import ConfigError

Event = Literal["failed", "promoted"]
RETRIES = 3
TIMEOUT = 10.0
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
        parts = urlsplit(url) if sep else None
        if kind not in ("json", "slack") or parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookConfigError(f"PACKER_ASSETS_WEBHOOKS entry {i + 1}: want json:<http(s) URL> or "
                                     "slack:<http(s) URL>, comma-separated")
        hooks.append(Webhook(kind, url))  # type: ignore[arg-type]
    return hooks


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

    def payload(self) -> dict:
        return {"source": "packer-assets", **asdict(self)}

    def text(self) -> str:
        what = (f"template {self.template_vmid} promoted" if self.event == "promoted"
                else f"run FAILED: {self.error or 'no error message'}")
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


def body_for(hook: Webhook, notification: Notification) -> dict:
    return {"text": notification.text()} if hook.format == "slack" else notification.payload()


def deliver(hook: Webhook, notification: Notification, *, retries: int = RETRIES, timeout: float = TIMEOUT,
            backoff: float = BACKOFF, sleep: Callable[[float], None] = time.sleep) -> Delivery:
    """Post once, retrying a connection error, a 429 or a 5xx up to `retries` attempts in all."""
    data = json.dumps(body_for(hook, notification)).encode()
    said = "not attempted"
    for attempt in range(1, retries + 1):
        try:
            answer = requests.post(hook.url, data=data, timeout=timeout,
                                   headers={"Content-Type": "application/json", "User-Agent": "packer-assets"})
            if answer.status_code < 300:
                return Delivery(hook.shown, True, attempt, f"HTTP {answer.status_code}")
            said = f"HTTP {answer.status_code}"
            if answer.status_code != 429 and answer.status_code < 500:
                return Delivery(hook.shown, False, attempt, said)  # the receiver refused it: retrying won't help
        except requests.RequestException as exc:
            said = type(exc).__name__  # its text would carry the URL
        if attempt < retries:
            sleep(backoff * 2 ** (attempt - 1))
    return Delivery(hook.shown, False, retries, said)


def notify(hooks: Iterable[Webhook], notification: Notification, **options) -> list[Delivery]:
    return [deliver(hook, notification, **options) for hook in hooks]


SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|WEBHOOK|PASSPHRASE", re.I)


def secret_values(environ: dict[str, str]) -> list[str]:
    """Values of environment variables whose names say they are secret: masked in notifications."""
    return [value for name, value in environ.items() if SECRET_NAME.search(name) and value]
