"""Where the cuts are at each step, and which layers each side must therefore hold.

The cut points of step t (prefill is step 0) are a pure function of (seed, t): both sides compute
them, so no layer index ever crosses the link.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from .utils import TriadicError, is_unsigned, validate_split_sets


@dataclass(frozen=True)
class SplitSchedule:
    first: tuple[int, ...]
    second: tuple[int, ...]
    num_layers: int
    seed: int = 0
    resplit_every: int = 1  # draw new cuts every N steps; 0 = once per request

    def __post_init__(self) -> None:
        first, second = validate_split_sets(self.first, self.second, self.num_layers)
        object.__setattr__(self, "first", first)
        object.__setattr__(self, "second", second)
        # The START message carries both as unsigned integers (protocol.START_PAYLOAD: u64 and u32).
        if not is_unsigned(self.seed, 64):
            raise TriadicError(f"--seed {self.seed}: the split schedule's seed must be an integer in [0, 2**64)")
        if not is_unsigned(self.resplit_every, 32):
            raise TriadicError(f"--resplit-every {self.resplit_every}: must be an integer in [0, 2**32) (0: once per request)")

    def cuts(self, step: int) -> tuple[int, int]:
        """(a, b) for this step: uniform over each set, independent across draws."""
        epoch = 0 if self.resplit_every == 0 else step // self.resplit_every
        if len(self.first) == 1 and len(self.second) == 1:
            return self.first[0], self.second[0]
        rng = random.Random(f"triadic-split:{self.seed}:{epoch}")  # str seeds hash with SHA-512: same on every machine
        return rng.choice(self.first), rng.choice(self.second)

    # Ownership: the union of the layers a side may ever run.
    @property
    def edge_first_layers(self) -> range:
        return range(0, self.first[-1])

    @property
    def edge_third_layers(self) -> range:
        return range(self.second[0], self.num_layers)

    @property
    def cloud_layers(self) -> range:
        return range(self.first[0], self.second[-1])

    @property
    def needs_cloud(self) -> bool:
        """Whether some step has a < b, i.e. the cloud has layers to run at all."""
        return len(self.cloud_layers) > 0

    def fingerprint(self) -> int:
        """A checksum of the configuration both sides must share (checked when a session starts)."""
        text = f"{self.first}|{self.second}|{self.num_layers}"
        return zlib.crc32(text.encode())
