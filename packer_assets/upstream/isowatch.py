"""The checksum sensor's polling logic, as a plain function: which upstream ISOs have a new release?

`poll(sources, cursor)` fetches every key's checksum file concurrently (a bounded thread pool, short
timeouts), each distinct URL once, conditionally (If-None-Match / If-Modified-Since from the
cursor), so an unchanged upstream costs one 304. The cursor is plain JSON:

    {key: {"checksum": "sha256:<hex>", "url": <checksum URL or null if pinned>,
           "name": <file name looked up>, "etag": ..., "last_modified": ...}}

A cursor entry's validators are used only while its URL and name still match the catalog (a
changed mirror or URL starts over with a plain GET, compared against the old checksum).

Outcome per key, exactly one of:
- changed: the checksum differs from the cursor's;
- unchanged: same checksum (a 304, or a 200 with the same line);
- first_seen: no cursor entry with a checksum: the key is new to the sensor. What to do with it
  is the caller's decision (observe it; rebuild only if it was never built; see the issue notes);
- errors: the fetch or the lookup failed; the key keeps its old cursor entry, the others go on.

A pinned key (catalog `checksum`) is never fetched; it is `changed` only if the pin itself was
edited since the cursor was written (a new pinned release is a new release).
Keys no longer in `sources` are dropped from the cursor.
No Dagster import here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from packer_assets.catalog import IsoSource
from packer_assets.upstream.checksums import ChecksumError, ChecksumFile, FetchResult, fetch_checksum_file
from packer_assets.upstream.digests import Checksum


@dataclass
class PollResult:
    cursor: dict[str, dict[str, Any]]  # the next cursor (JSON-serialisable)
    changed: dict[str, str] = field(default_factory=dict)  # key -> new "algo:hex"
    unchanged: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # key -> message naming the URL
    first_seen: dict[str, str] = field(default_factory=dict)  # key -> "algo:hex"
    fetches: dict[str, str] = field(default_factory=dict)  # url -> "200" | "304" | "error"

    def checksum(self, key: str) -> str | None:
        """The key's current checksum as far as this poll knows (None: never seen, or failed)."""
        return (self.cursor.get(key) or {}).get("checksum")

    def summary(self) -> str:
        """What this poll found, in words: `baseline of 6 sources, 2 unchanged (1 checksum file answered 304),
        1 changed (debian-12), 1 failed (rocky-9: <why>)`."""
        parts = []
        if self.first_seen:
            parts.append(f"baseline of {len(self.first_seen)} source(s)")
        if self.unchanged:
            not_modified = sum(1 for status in self.fetches.values() if status == "304")
            parts.append(
                f"{len(self.unchanged)} unchanged"
                + (f" ({not_modified} checksum file(s) answered 304)" if not_modified else "")
            )
        if self.changed:
            parts.append(f"{len(self.changed)} changed ({', '.join(sorted(self.changed))})")
        if self.errors:
            parts.append(
                f"{len(self.errors)} failed (" + "; ".join(f"{k}: {m}" for k, m in sorted(self.errors.items())) + ")"
            )
        return ", ".join(parts) or "no ISO source in the catalog"


def _entry(cursor: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = cursor.get(key) if isinstance(cursor, Mapping) else None
    return dict(value) if isinstance(value, Mapping) else {}


def _validators(entries: list[dict[str, Any]], url: str, names: list[str]) -> tuple[str | None, str | None]:
    """The (etag, last_modified) to send for a URL: only if every key sharing it holds the same ones,
    for this URL and name, with a checksum (otherwise a 304 would leave some key without an answer)."""
    seen = {(e.get("etag"), e.get("last_modified")) for e in entries}
    usable = all(
        e.get("checksum") and e.get("url") == url and e.get("name") == n for e, n in zip(entries, names, strict=False)
    )
    if usable and len(seen) == 1:
        return next(iter(seen))
    return None, None


def poll(
    sources: Mapping[str, IsoSource], cursor: Mapping[str, Any] | None, max_workers: int = 8, timeout: float = 5
) -> PollResult:
    cursor = cursor or {}
    result = PollResult(cursor={})
    groups: dict[str, list[str]] = {}
    for key, iso in sources.items():
        old = _entry(cursor, key)
        if iso.checksum:
            new = {
                "checksum": str(Checksum.parse(iso.checksum)),
                "url": None,
                "name": iso.upstream_name,
                "etag": None,
                "last_modified": None,
            }
            _classify(result, key, old.get("checksum"), new)
        else:
            url = iso.effective_checksum_url
            assert url is not None  # the catalog holds exactly one of checksum and checksum_url
            groups.setdefault(url, []).append(key)

    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()

    def session() -> requests.Session:
        # one keep-alive session per worker thread (requests.Session is not thread-safe)
        if not hasattr(local, "session"):
            local.session = requests.Session()
            with lock:
                sessions.append(local.session)
        current: requests.Session = local.session
        return current

    def fetch(url: str) -> FetchResult | ChecksumError:
        keys = groups[url]
        etag, modified = _validators([_entry(cursor, k) for k in keys], url, [sources[k].upstream_name for k in keys])
        try:
            return fetch_checksum_file(url, etag, modified, timeout=timeout, session=session())
        except ChecksumError as exc:
            return exc

    try:
        if groups:
            with ThreadPoolExecutor(
                max_workers=max(1, min(max_workers, len(groups))), thread_name_prefix="isowatch"
            ) as pool:
                outcomes = dict(zip(groups, pool.map(fetch, groups), strict=True))
        else:
            outcomes = {}
    finally:
        for s in sessions:
            s.close()

    for url, outcome in outcomes.items():
        _apply(result, cursor, sources, url, groups[url], outcome)
    return result


def _apply(
    result: PollResult,
    cursor: Mapping[str, Any],
    sources: Mapping[str, IsoSource],
    url: str,
    keys: list[str],
    outcome: FetchResult | ChecksumError,
) -> None:
    if isinstance(outcome, ChecksumError):
        result.fetches[url] = "error"
        for key in keys:
            _failed(result, cursor, key, str(outcome))
        return
    result.fetches[url] = "304" if outcome.status == "unchanged" else "200"
    parsed = ChecksumFile.parse(outcome.text, source=url) if outcome.text is not None else None
    for key in keys:
        old = _entry(cursor, key)
        if parsed is None:  # 304: only sent when every key here had a checksum for this URL and name
            checksum = old["checksum"]
        else:
            try:
                checksum = str(parsed.lookup(sources[key].upstream_name))
            except ChecksumError as exc:
                _failed(result, cursor, key, str(exc))
                continue
        new = {
            "checksum": checksum,
            "url": url,
            "name": sources[key].upstream_name,
            "etag": outcome.etag,
            "last_modified": outcome.last_modified,
        }
        _classify(result, key, old.get("checksum"), new)


def _classify(result: PollResult, key: str, old_checksum: str | None, new: dict[str, Any]) -> None:
    result.cursor[key] = new
    if not old_checksum:
        result.first_seen[key] = new["checksum"]
    elif old_checksum != new["checksum"]:
        result.changed[key] = new["checksum"]
    else:
        result.unchanged.append(key)


def _failed(result: PollResult, cursor: Mapping[str, Any], key: str, message: str) -> None:
    result.errors[key] = message
    old = _entry(cursor, key)
    if old:
        result.cursor[key] = old  # keep the last known state: the next poll retries with it
