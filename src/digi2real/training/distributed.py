"""The process group of a torchrun launch (RANK / WORLD_SIZE / LOCAL_RANK): joining it, agreeing on a flag, and
checking that every process still holds the same parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        created = True
    return _Dist(rank, world, local, created)


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any of them (a collective: every process must call it)."""
    if world <= 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _params_in_sync(net: nn.Module, world: int, device: torch.device) -> tuple[bool, float]:
    """Whether every process holds bit-identical parameters (per-tensor float64 sum and sum of squares compared by
    all-reduce max/min), and the largest fingerprint difference. A collective under DDP."""
    if world <= 1:
        return True, 0.0
    import torch.distributed as dist

    fp = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                      for p in net.parameters()]).flatten().to(device)
    hi, lo = fp.clone(), fp.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return bool(torch.equal(hi, lo)), float((hi - lo).abs().max())
