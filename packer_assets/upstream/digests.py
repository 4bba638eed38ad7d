"""`Checksum`: an algorithm and a hex digest, the one parser of the `algo:hex` form (catalog pins,
checksum files, the sensor's cursor, staged volume names)."""

from __future__ import annotations

import re
from dataclasses import dataclass

HEX_ALGORITHMS = {32: "md5", 40: "sha1", 56: "sha224", 64: "sha256", 96: "sha384", 128: "sha512"}
ALGORITHMS = frozenset(HEX_ALGORITHMS.values())


def hex_length(algo: str) -> int:
    return next(n for n, a in HEX_ALGORITHMS.items() if a == algo)


@dataclass(frozen=True)
class Checksum:
    algorithm: str  # md5 | sha1 | sha224 | sha256 | sha384 | sha512
    hex: str  # lower case

    def __post_init__(self) -> None:
        algo, digest = self.algorithm.strip().lower(), self.hex.strip().lower()
        if algo not in ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {self.algorithm!r} (want one of {sorted(ALGORITHMS)})")
        if len(digest) != hex_length(algo):
            raise ValueError(f"{algo} needs exactly {hex_length(algo)} hex digits, got {len(digest)}")
        if not re.fullmatch(r"[0-9a-f]+", digest):
            raise ValueError(f"{algo} digest must be hex digits only (0-9, a-f)")
        object.__setattr__(self, "algorithm", algo)
        object.__setattr__(self, "hex", digest)

    @classmethod
    def parse(cls, value: str) -> Checksum:
        """`'sha256:<hex>'` (the catalog's and the cursor's form)."""
        algo, sep, digest = value.partition(":")
        if not sep:
            raise ValueError(f"checksum {value!r} is not '<algorithm>:<hex>'")
        return cls(algo, digest)

    @property
    def short(self) -> str:
        """The first 12 hex digits: the release fragment of a staged volume name."""
        return self.hex[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
