"""End of life: the upstream date a catalog entry names (`eol: 2028-06-30`) against today's date.

A template past its OS release's end of life still builds and stays promoted: the `end_of_life` asset check
warns (never blocks), the registry marks the key and the proof says so. Today's date comes from `today()`
only, so a test fixes the clock by replacing that one function (monkeypatch), never by waiting.
"""

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

# Whole-string pattern (fullmatch): YYYY-MM-DD and nothing else, so a trailing newline or a time is refused.
EOL_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
NO_EOL = "no end-of-life date in the catalog"


def days(count: int) -> str:
    """`1 day`, `3 days`."""
    return f"{count} day{'' if count == 1 else 's'}"


def today() -> date:
    """Today's date in UTC: the one clock every end-of-life decision reads (tests replace it)."""
    return datetime.now(UTC).date()


def parse_eol(value: Any) -> date:
    """The catalog's `eol` as a date: a YAML date, or a string `YYYY-MM-DD` naming a real day. Raises
    ValueError (one line) for anything else: a date and time, a trailing newline, 2027-02-30, a number."""
    if isinstance(value, datetime):  # a datetime is a date too: refuse it first
        raise ValueError("must be a date like 2028-06-30 (YYYY-MM-DD), not a date and time")
    if isinstance(value, date):
        return value
    if isinstance(value, str) and EOL_RE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a day of the calendar (YYYY-MM-DD)") from None
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise ValueError(f"must be a date like 2028-06-30 (YYYY-MM-DD), got {shown}")


@dataclass(frozen=True)
class EndOfLife:
    """A key's end-of-life date (None: the catalog names none) seen on `on`. The date is the last day of
    upstream support: a template is past it from the next day on."""

    key: str
    eol: date | None
    on: date

    @property
    def past(self) -> bool:
        return self.eol is not None and self.on > self.eol

    @property
    def days_past(self) -> int:
        return (self.on - self.eol).days if self.eol is not None and self.past else 0

    def summary(self) -> str:
        """One line for a check, a proof and a plan: the date, or how long it is past."""
        if self.eol is None:
            return NO_EOL
        if self.past:
            return f"past end of life since {self.eol.isoformat()} ({days(self.days_past)} on {self.on.isoformat()})"
        return f"end of life {self.eol.isoformat()} ({days((self.eol - self.on).days)} left on {self.on.isoformat()})"

    def facts(self) -> dict[str, Any]:
        """What a build record and its proof keep: the date, whether it was past and by how many days."""
        return {"date": self.eol.isoformat() if self.eol else None, "past": self.past, "days_past": self.days_past}


def end_of_life(key: str, eol: date | None, on: date | None = None) -> EndOfLife:
    """The key's end of life as of `on` (default: today())."""
    return EndOfLife(key, eol, today() if on is None else on)
