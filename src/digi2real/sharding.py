"""Which share of the work this process does: ``--shard i/N``, torchrun's RANK/WORLD_SIZE, or Slurm's variables.

Work is always split by position modulo N, so the union of all shards is the whole and no shard depends on how many
others there are for anything but its membership.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from digi2real.errors import Digi2RealError


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"2/8"`` -> Shard(2, 8)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise Digi2RealError(f"--shard {text!r}: expected INDEX/COUNT with 0 <= INDEX < COUNT, e.g. --shard 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise Digi2RealError(f"--shard {text!r}: need 0 <= INDEX < COUNT and COUNT >= 1, e.g. --shard 0/4")
    return Shard(i, n)


def shard_from_env(explicit: str | None = None, environ: dict[str, str] | None = None) -> Shard:
    """An explicit ``--shard`` wins; then torchrun (RANK, WORLD_SIZE); then Slurm (SLURM_PROCID, SLURM_NTASKS)."""
    if explicit:
        return parse_shard(explicit)
    env = os.environ if environ is None else environ
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in env and size_key in env:
            return parse_shard(f"{env[rank_key]}/{env[size_key]}")
    return Shard()
