"""Chain IDs: one `CHAIN-<UTC yyyymmddThhmmssZ>-<key>` per run of one partition.

The ID is in the run tags, in every log line header, in the template description and in the proof,
so any one of them leads back to the others.
"""

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from packer_assets.errors import ConfigError

KEY_PATTERN = r"[a-z][a-z0-9-]*"  # the catalog's key rule (catalog.models.KEY_RE)
CHAIN_RE = re.compile(rf"CHAIN-(\d{{8}}T\d{{6}}Z)-({KEY_PATTERN})")  # fullmatch: no trailing newline
SHOWN = 80  # characters of bad input an error repeats


class ChainIdError(ConfigError):
    """Text that is not a chain ID (or a key); a ValueError too, as before."""


TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"


def utc_stamp(when: datetime | None = None) -> str:
    """`yyyymmddThhmmssZ` in UTC (the toolkit's timestamp, also used for evidence folders)."""
    when = when or datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("utc_stamp needs an aware datetime, got a naive one")
    return when.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


@dataclass(frozen=True)
class ChainId:
    stamp: str
    key: str

    def __str__(self) -> str:
        return f"CHAIN-{self.stamp}-{self.key}"

    @property
    def started_at(self) -> datetime:
        return datetime.strptime(self.stamp, TIMESTAMP_FORMAT).replace(tzinfo=UTC)


def new_chain_id(key: str, when: datetime | None = None) -> ChainId:
    chain = ChainId(utc_stamp(when), key)
    parse_chain_id(str(chain))  # the key must be a valid catalog key
    return chain


def fresh_chain_id(key: str, taken: Callable[[str], bool]) -> ChainId:
    """A chain ID whose stamp is not taken yet (its evidence folder does not exist).

    Two runs of one key in the same second would share a chain ID and an evidence folder; waiting for
    the next second keeps the format exact and costs at most a second.
    """
    while True:
        chain = new_chain_id(key)
        if not taken(chain.stamp):
            return chain
        time.sleep(1.0 - (time.time() % 1.0) + 0.001)


def parse_chain_id(text: str) -> ChainId:
    match = CHAIN_RE.fullmatch(text)
    if not match:
        raise ChainIdError(f"not a chain ID (want CHAIN-<yyyymmddThhmmssZ>-<key>): {_shown(text)}")
    return ChainId(match.group(1), match.group(2))


def check_key(text: str) -> str:
    """A template key as chain IDs and evidence folders hold it: never a path (`../x`), never a trailing newline."""
    if not re.fullmatch(KEY_PATTERN, text):
        raise ChainIdError(f"not a template key (lower-case letters, digits and -, a letter first): {_shown(text)}")
    return text


def _shown(text: str) -> str:
    # repr keeps the error one line (a newline shows as \n); a long argument is cut
    return repr(text[:SHOWN]) + ("..." if len(text) > SHOWN else "")


def log_header(chain: ChainId | str, stage: str) -> str:
    """The header every log line of a run starts with: `[CHAIN-...] [stage]`."""
    return f"[{chain}] [{stage}]"
