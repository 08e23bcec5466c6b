"""The face-recognition training loop (Digi2Real paper, section 4: IResNet50 + AdaFace, 30 epochs, batch 256, SGD with a
cosine schedule; FACTS 6: lr 0.1, momentum 0.9, weight decay 5e-4 with none on BN, gradient-norm clip 5, flip,
``(x / 255 - 0.5) / 0.5`` RGB input).

Outputs in ``out_dir``: ``checkpoint.pt`` (everything needed to resume exactly, written atomically at the end of every
epoch and when stopped by Ctrl-C / SIGTERM / ``max_steps``), ``train_log.jsonl`` (one JSON object per log line),
``model.pt`` (the backbone's state dict in insightface's key names, loadable by
:func:`digi2real.evaluation.models.load_face_model`) and ``train_config.json`` (the resolved config).

Multi-GPU: launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) it joins a process group (nccl on CUDA, gloo
on CPU) and splits the global batch across the processes; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from digi2real.config import TrainConfig
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.fileio import atomic_open, write_json
from digi2real.training.data import TrainingSet, make_loader, normalize
from digi2real.training.heads import MarginHead, build_head
from digi2real.training.iresnet import DEPTHS, IResNet

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "train_log.jsonl"
CONFIG = "train_config.json"
# Settings that may change between a run and its resume without changing what is computed.
_RESUME_FREE = ("log_every", "device")
_RESUME_FREE_DATA = ("workers",)


@dataclass
class TrainSummary:
    """What one call of :func:`train` did. ``losses`` holds the loss of every step run in this call, in order."""

    out_dir: Path
    steps_done: int
    total_steps: int
    epoch: int
    finished: bool
    resumed_from_step: int
    seconds: float
    images_per_second: float
    last_loss: float | None
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d.pop("losses")
        return d


# ------------------------------------------------------------------------------------------------- construction
def build_backbone_from(cfg: TrainConfig) -> IResNet:
    """The IResNet of ``cfg``: ``depths`` overrides the named ``backbone``; widths and stem stride as configured."""
    depths = tuple(cfg.depths) if cfg.depths is not None else DEPTHS[cfg.backbone]
    return IResNet(depths, widths=tuple(cfg.widths), embedding_dim=cfg.embedding_dim, dropout=cfg.dropout,
                   stem_stride=cfg.stem_stride)


def build_head_from(cfg: TrainConfig, num_classes: int) -> MarginHead:
    """The margin head of ``cfg`` (paper: AdaFace with m = 0.4, h = 0.333, s = 64)."""
    kw: dict[str, Any] = {"s": cfg.scale}
    if cfg.margin is not None:
        kw["m"] = cfg.margin
    if cfg.head == "adaface":
        kw["h"] = cfg.h
    return build_head(cfg.head, cfg.embedding_dim, num_classes, **kw)


class _Net(nn.Module):
    """Backbone + head as one module, so a single DDP wrapper synchronises the gradients of both."""

    def __init__(self, backbone: IResNet, head: MarginHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x), labels)


def param_groups(net: nn.Module, weight_decay: float, no_decay_on_bn_and_bias: bool) -> list[dict[str, Any]]:
    """SGD parameter groups: tensors with one dimension (BatchNorm and PReLU weights, biases) get no weight decay when
    ``no_decay_on_bn_and_bias`` (AdaFace's recipe, FACTS 6); frozen parameters (the fixed BN1d scale) are left out."""
    decay, no_decay = [], []
    for p in net.parameters():
        if not p.requires_grad:
            continue
        (no_decay if (no_decay_on_bn_and_bias and p.ndim <= 1) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Per-iteration schedule: linear warm-up over ``warmup_epochs``, then cosine decay to 0 at the last step."""
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(total - warm, 1)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(step - warm, span) / span))


def resolve_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use --device cpu")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if cfg.precision == "fp16":
        raise ConfigError("train.precision fp16 needs CUDA (gradient scaling); use bf16 or fp32 on the CPU")
    return torch.device("cpu")


def _config_for_compare(cfg: TrainConfig) -> dict[str, Any]:
    d = cfg.model_dump(mode="json")
    for k in _RESUME_FREE:
        d.pop(k, None)
    for k in _RESUME_FREE_DATA:
        d.get("data", {}).pop(k, None)
    return d


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"train.{prefix}{k}: checkpoint {va!r}, now {vb!r}")
    return out


# ------------------------------------------------------------------------------------------------- distributed
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


# ---------------------------------------------------------------------------------------------------- RNG state
def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a different GPU count on resume: keep the fresh CUDA generators
            torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _stop_requests() -> Iterator[dict[str, Any]]:
    """Turn SIGTERM and the first Ctrl-C into a request honoured at the next step boundary (a second Ctrl-C interrupts
    at once). Local state only: the previous handlers are restored on exit."""
    flag: dict[str, Any] = {"signal": None}
    old: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signum

    import threading

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


# ------------------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, dataset: TrainingSet, out_dir: str | Path, progress: bool = True, resume: bool = True,
          max_steps: int | None = None, overwrite: bool = False,
          on_step: Callable[[int, float], None] | None = None) -> TrainSummary:
    """Train ``cfg``'s backbone + head on ``dataset`` into ``out_dir`` (see the module docstring for the files).

    ``resume``: continue from ``out_dir/checkpoint.pt`` when present (refused if its config differs, unless
    ``overwrite``, which starts afresh). ``max_steps``: stop (with a checkpoint) once this many global steps are done in
    total, e.g. for a trial run. ``on_step(step, loss)`` is called after every optimiser step (tests, monitoring).
    """
    out = Path(out_dir)
    t_start = time.time()
    num_classes = int(dataset.num_classes)
    n = len(dataset)
    dist_info = _init_distributed("cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(cfg, dist_info.local_rank)
    if cfg.batch_size % dist_info.world:
        raise ConfigError(f"train.batch_size {cfg.batch_size} must be divisible by the {dist_info.world} processes")
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size {cfg.batch_size} exceeds the {n} training images; lower --batch-size")
    total_steps = cfg.epochs * steps_per_epoch
    ckpt_path = out / CHECKPOINT
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)

    # Identical initialisation on every rank: seeded before any module is built.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    backbone = build_backbone_from(cfg)
    head = build_head_from(cfg, num_classes)
    net = _Net(backbone, head).to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(net, cfg.weight_decay, cfg.no_decay_on_bn_and_bias), lr=cfg.lr,
                                momentum=cfg.momentum)
    use_scaler = cfg.precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    step = 0
    if ckpt_path.is_file() and resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diff = _config_diff(ckpt["config_compare"], _config_for_compare(cfg))
        if ckpt.get("num_classes") != num_classes or ckpt.get("num_images") != n:
            diff.append(f"dataset: checkpoint {ckpt.get('num_images')} images / {ckpt.get('num_classes')} classes, "
                        f"now {n} / {num_classes}")
        if diff and not overwrite:
            raise ConfigError(f"{ckpt_path}: the run there was started with different settings ({'; '.join(diff[:4])}"
                              f"{'; ...' if len(diff) > 4 else ''}); use the same config to resume, another -o, "
                              "--no-resume, or --overwrite to start afresh there")
        if not diff:
            net.backbone.load_state_dict(ckpt["backbone"])
            net.head.load_state_dict(ckpt["head"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if use_scaler and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            step = int(ckpt["step"])
            _set_rng_state(ckpt["rng"])
    resumed_from = step

    model: nn.Module = net
    if dist_info.world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    log_file = None
    if dist_info.main:
        if resumed_from == 0 and (out / LOG).exists():
            (out / LOG).unlink()  # a fresh run: the old log belongs to a discarded run
        write_json(out / CONFIG, cfg.model_dump(mode="json"))
        log_file = open(out / LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally

    def emit(record: dict[str, Any]) -> None:
        if not dist_info.main:
            return
        assert log_file is not None
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if progress:
            eta = record.get("eta_s", 0.0)
            print(f"epoch {record['epoch'] + 1}/{cfg.epochs} step {record['step']}/{total_steps} "
                  f"loss {record['loss']:.4f} acc {record['acc']:.3f} lr {record['lr']:.5f} "
                  f"{record['images_per_s']:.1f} img/s ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)

    def save_checkpoint() -> None:
        if not dist_info.main:
            return
        state = {
            "backbone": net.backbone.state_dict(), "head": net.head.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None, "step": step, "epoch": step // steps_per_epoch,
            "position": step % steps_per_epoch, "steps_per_epoch": steps_per_epoch, "rng": _rng_state(),
            "config": cfg.model_dump(mode="json"), "config_compare": _config_for_compare(cfg),
            "num_classes": num_classes, "num_images": n,
        }
        with atomic_open(ckpt_path, "wb") as fh:
            torch.save(state, fh)

    losses: list[float] = []
    last_finite: float | None = None
    images_seen = 0
    t_loop = time.time()
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    interrupted = False
    win_loss, win_acc, win_n, win_t = 0.0, 0.0, 0, time.time()
    world = dist_info.world
    try:
        with _stop_requests() as stop:
            net.train()
            while step < stop_at and not interrupted:
                epoch, start = divmod(step, steps_per_epoch)
                loader = make_loader(dataset, global_batch=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                     augment_mode=cfg.augment, workers=cfg.data.workers, rank=dist_info.rank,
                                     world=world, start_step=start, pin_memory=device.type == "cuda")
                for images, labels in loader:
                    for g in optimizer.param_groups:
                        g["lr"] = lr_at(step, cfg, steps_per_epoch)
                    x = normalize(images.to(device, non_blocking=True))
                    x = x if cfg.channels_last else x.contiguous()
                    y = labels.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        logits = model(x, y)
                    loss = F.cross_entropy(logits.float(), y)
                    stats = torch.stack([loss.detach(), (logits.detach().argmax(1) == y).float().mean()])
                    if world > 1:
                        import torch.distributed as dist

                        dist.all_reduce(stats)
                        stats /= world
                    loss_v, acc_v = (float(v) for v in stats.tolist())
                    if not math.isfinite(loss_v):
                        # Nothing is written: checkpoint.pt keeps the last end-of-epoch (or interrupt) state.
                        raise Digi2RealError(
                            f"training diverged: the loss became {loss_v} at step {step + 1} (epoch {epoch + 1}); "
                            f"last finite loss {last_finite}; {ckpt_path} holds the last good state. Lower train.lr "
                            "(--lr), add warm-up (--set train.warmup_epochs=1) or use fp32 precision")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                    last_finite = loss_v
                    losses.append(loss_v)
                    images_seen += cfg.batch_size
                    win_loss += loss_v
                    win_acc += acc_v
                    win_n += 1
                    if on_step is not None:
                        on_step(step, loss_v)
                    epoch_end = step % steps_per_epoch == 0
                    if step % cfg.log_every == 0 or epoch_end or step == stop_at:
                        now = time.time()
                        rate = win_n * cfg.batch_size / max(now - win_t, 1e-9)
                        emit({"epoch": epoch, "step": step, "loss": win_loss / win_n, "acc": win_acc / win_n,
                              "lr": optimizer.param_groups[0]["lr"], "images_per_s": rate,
                              "eta_s": (total_steps - step) * cfg.batch_size / max(rate, 1e-9),
                              "epoch_end": epoch_end, "time": now})
                        win_loss, win_acc, win_n, win_t = 0.0, 0.0, 0, now
                    if epoch_end:
                        save_checkpoint()
                    if stop["signal"] is not None or step >= stop_at:
                        interrupted = stop["signal"] is not None or step < total_steps
                        break
            if step < total_steps and step % steps_per_epoch:
                save_checkpoint()  # stopped mid-epoch (signal or max_steps): resume from exactly here
            if stop["signal"] is not None:
                raise KeyboardInterrupt(f"stopped by signal {stop['signal']} after step {step}; "
                                        f"{ckpt_path} saved, run the same command again to resume")
        finished = step >= total_steps
        if finished and dist_info.main:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in net.backbone.state_dict().items()}
            with atomic_open(out / MODEL, "wb") as fh:
                torch.save(state, fh)
    finally:
        if log_file is not None:
            log_file.close()
        if dist_info.created:
            import torch.distributed as dist

            dist.destroy_process_group()
    seconds = time.time() - t_start
    return TrainSummary(out_dir=out, steps_done=step, total_steps=total_steps, epoch=step // steps_per_epoch,
                        finished=finished, resumed_from_step=resumed_from, seconds=seconds,
                        images_per_second=images_seen / max(time.time() - t_loop, 1e-9), last_loss=last_finite,
                        losses=losses)
