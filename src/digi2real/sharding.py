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


MAX_SHARDS = 1_000_000


def parse_shard(text: str, origin: str | None = None) -> Shard:
    """``"2/8"`` -> Shard(2, 8). ``origin`` names where the text came from in errors (default: ``--shard``)."""
    where = origin or f"--shard {text!r}"
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise Digi2RealError(f"{where}: expected INDEX/COUNT with 0 <= INDEX < COUNT, e.g. --shard 0/4") from None
    if n < 1 or not 0 <= i < n or n > MAX_SHARDS:
        raise Digi2RealError(f"{where}: need 0 <= INDEX < COUNT and 1 <= COUNT <= {MAX_SHARDS:,}, e.g. --shard 0/4")
    return Shard(i, n)


def shard_from_env(explicit: str | None = None, environ: dict[str, str] | None = None) -> Shard:
    """An explicit ``--shard`` wins; then torchrun (RANK, WORLD_SIZE); then Slurm (SLURM_PROCID, SLURM_NTASKS)."""
    if explicit:
        return parse_shard(explicit)
    env = os.environ if environ is None else environ
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in env and size_key in env:
            origin = (f"environment {rank_key}={env[rank_key]!r} {size_key}={env[size_key]!r} (set by torchrun or "
                      "Slurm, or by hand)")
            return parse_shard(f"{env[rank_key].strip()}/{env[size_key].strip()}", origin)
    return Shard()
