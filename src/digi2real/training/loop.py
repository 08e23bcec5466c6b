"""The face-recognition training loop (Digi2Real paper, section 4: IResNet50 + AdaFace, 30 epochs, batch 256, SGD with a
cosine schedule; FACTS 6: lr 0.1, momentum 0.9, weight decay 5e-4 with none on BN, gradient-norm clip 5, flip,
``(x / 255 - 0.5) / 0.5`` RGB input).

Outputs in ``out_dir``: ``checkpoint.pt`` (everything needed to resume exactly, written atomically at the end of every
epoch and when stopped by Ctrl-C / SIGTERM / ``max_steps``), ``train_log.jsonl`` (one JSON object per log line),
``model.pt`` (the backbone's state dict in insightface's key names, loadable by
:func:`digi2real.evaluation.models.load_face_model`) and ``train_config.json`` (the resolved config).

``train_log.jsonl`` lines carry an ``event``: ``start`` (world size, per-process batch, backend, device, memory
``layout`` and, when the setting asked for another, ``layout_note``), ``train`` (windowed loss / accuracy / lr /
throughput), ``verify`` (``<set>_acc``, ``<set>_std``, ``<set>_best_threshold``, ``<set>_best_acc`` per verification
set) and, under DDP, ``ddp_sync`` (whether the parameters are still identical on every process when the call ends).

Verification during training (``train.verify_sets``): insightface ``.bin`` files are read and decoded when training
starts (a missing or damaged file fails at once), then scored every ``train.verify_every`` steps (or at each epoch end)
with the evaluation code: flip-summed embeddings (:class:`digi2real.evaluation.models.FaceModel`) and the 10-fold
protocol (:func:`digi2real.evaluation.verification.evaluate_verification`). It runs on the main process with the
backbone in eval mode and the RNG states saved and restored, so it never changes the training trajectory.

Multi-GPU: launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) it joins a process group (nccl on CUDA, gloo
on CPU) and splits the global batch across the processes; only rank 0 writes files. BatchNorm statistics are per
process (as in insightface's DDP training), so an N-process run is close to, not bit-identical with, a one-process run
of the same global batch.

Memory layout: channels_last on CUDA (2.9x on an H200), NCHW on the CPU whatever ``train.channels_last`` says
(:func:`use_channels_last`); the layout used is recorded in the ``start`` log line and the checkpoint.

One process trains into a run folder at a time: the main process holds ``RUN/.train.lock`` (an ``flock``, released
when the process ends, however it ends) for the whole call; a second ``train`` into the same folder stops at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
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

from digi2real.config import TrainConfig, settings_diff
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.fileio import atomic_open, check_apart, exclusive_lock, write_json
from digi2real.training.data import TrainingSet, make_loader, normalize
from digi2real.training.heads import MarginHead, build_head
from digi2real.training.iresnet import DEPTHS, IResNet

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "train_log.jsonl"
CONFIG = "train_config.json"
LOCK = ".train.lock"
LOCK_BUSY = ("another digi2real train process is training in this run folder (it holds .train.lock); wait for it to "
             "finish or stop it, or choose another -o")
# Settings that may change between a run and its resume without changing what is computed. The memory layout is one:
# like the device, it changes only the order of floating-point operations (and checkpoints made before
# channels_last became "auto" must still resume).
_RESUME_FREE = ("log_every", "device", "verify_sets", "verify_every", "channels_last")
VERIFY_FOLDS = 10  # insightface's protocol
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
    world: int = 1
    layout: str = "nchw"
    verify_best: dict[str, dict[str, Any]] = field(default_factory=dict)
    verifications: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; the per-step ``losses`` and the ``verifications`` of this call are left out."""
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d.pop("losses")
        d.pop("verifications")
        return d


# ------------------------------------------------------------------------------------------------- construction
def build_backbone_from(cfg: TrainConfig) -> IResNet:
    """The IResNet of ``cfg``: ``depths`` overrides the named ``backbone``; widths and stem stride as configured."""
    depths = tuple(cfg.depths) if cfg.depths is not None else DEPTHS[cfg.backbone]
    for name, values in (("widths", cfg.widths), ("depths", depths)):
        if min(values) < 1:  # torch would fail deep inside a conv (width 0) or build a stage of no block (depth 0)
            raise ConfigError(f"train.{name}: {list(values)}; every stage needs at least 1 (e.g. "
                              f"--set train.{name}=[1,1,1,1])")
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


def _build_net(cfg: TrainConfig, num_classes: int, device: torch.device) -> _Net:
    """Backbone + head of ``cfg`` on ``device``; a model too large for memory is a one-line settings error."""
    try:
        return _Net(build_backbone_from(cfg), build_head_from(cfg, num_classes)).to(device)
    except RuntimeError as exc:
        if "alloc" not in str(exc).lower() and "out of memory" not in str(exc).lower():
            raise
        asked = re.search(r"allocate (\d+) bytes", str(exc))
        size = f"{int(asked[1]) / 2**30:.1f} GiB at once" if asked else "more than there is"
        raise ConfigError(f"the model does not fit in memory on {device} (train.widths {list(cfg.widths)}, "
                          f"embedding_dim {cfg.embedding_dim}, {num_classes} classes: it needs {size}); use a smaller "
                          "model or another device") from None


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


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs in channels_last: on CUDA unless turned off (with fp16 autocast, 2.9x the plain fp32 step
    on an H200), never on the CPU, where it gains 1.14-1.22x and torch's oneDNN backward of 1x1 stride-2 convolutions
    with fewer than 16 input channels corrupts the heap (SIGSEGV/SIGABRT on torch 2.11-2.13; BENCHMARKS.md "Training
    layout on the CPU")."""
    return device.type == "cuda" and cfg.channels_last is not False


def layout_note(cfg: TrainConfig, device: torch.device) -> str | None:
    """The one-line notice for ``train.channels_last: true`` on a device that runs NCHW instead (None otherwise)."""
    if cfg.channels_last is not True or use_channels_last(cfg, device):
        return None
    return (f"train.channels_last is true, but training on {device.type} runs in NCHW: torch's CPU backward of "
            "channels_last 1x1 stride-2 convolutions with fewer than 16 input channels corrupts memory (SIGSEGV), "
            "and channels_last gains little on CPUs (BENCHMARKS.md); set channels_last to auto to silence this")


def model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A uint8 N x H x W x 3 batch as the network's input on ``device``: normalised (FACTS 6) and in the layout training
    runs. :func:`normalize`'s permuted view is channels_last in memory, so NCHW needs the copy."""
    x = normalize(images.to(device, non_blocking=True))
    return x if channels_last else x.contiguous()


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A dumped train config without the settings a resume may change (``_RESUME_FREE``)."""
    d = json.loads(json.dumps(config))  # a deep copy: the checkpoint's dict is not modified
    for k in _RESUME_FREE:
        d.pop(k, None)
    for k in _RESUME_FREE_DATA:
        if isinstance(d.get("data"), dict):
            d["data"].pop(k, None)
    return d


def _config_for_compare(cfg: TrainConfig) -> dict[str, Any]:
    return _comparable(cfg.model_dump(mode="json"))


# ------------------------------------------------------------------------------------------------ verification
@dataclass
class VerifySet:
    """One verification benchmark: ``images`` (2N x 112 x 112 x 3 uint8, pair i = rows 2i, 2i+1; ``None`` where it
    was only checked, not decoded) and ``issame`` (N booleans)."""

    name: str
    path: Path
    images: np.ndarray | None
    issame: np.ndarray


def load_verify_sets(paths: list[Path] | tuple[Path, ...], decode: bool = True) -> list[VerifySet]:
    """Read (and with ``decode``, decode) the ``.bin`` files of ``train.verify_sets``, each named by its stem.

    Raises a one-line :class:`Digi2RealError` naming the file for a missing, unreadable or damaged file, an image that
    does not decode, fewer pairs than the 10 folds need, or two files with the same stem.
    """
    from digi2real.evaluation.bins import decode_pairs, read_bin

    sets: list[VerifySet] = []
    seen: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        name = path.stem
        if name in seen:
            raise ConfigError(f"train.verify_sets: {seen[name]} and {path} are both named {name!r} (sets are named by "
                              "their file stem); rename one")
        seen[name] = path
        try:
            images, issame = read_bin(path)
            if len(issame) < VERIFY_FOLDS:
                raise Digi2RealError(f"{path}: {len(issame)} pairs; the {VERIFY_FOLDS}-fold protocol needs at least "
                                     f"{VERIFY_FOLDS}")
            decoded = decode_pairs(images, 112, name=str(path)) if decode else None
        except Digi2RealError as exc:
            raise Digi2RealError(f"train.verify_sets: {exc}") from None
        sets.append(VerifySet(name, path, decoded, np.asarray(issame, dtype=bool)))
    return sets


def verify_backbone(backbone: nn.Module, sets: list[VerifySet], device: torch.device, embedding_dim: int,
                    batch_size: int, channels_last: bool = True,
                    amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Score ``backbone`` on each set: flip-summed embeddings and insightface's 10-fold protocol.

    Returns ``{name: VerificationResult}``. The backbone is put in eval mode for the forward passes and given back in
    the mode it had; no random number is drawn (the caller may still guard the RNG states).
    """
    from digi2real.evaluation.models import FaceModel
    from digi2real.evaluation.verification import evaluate_verification

    def forward(images: np.ndarray) -> np.ndarray:
        x = model_input(torch.from_numpy(images), device, channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                    enabled=amp_dtype is not None):
            return backbone(x).float().cpu().numpy()

    was_training = backbone.training
    backbone.eval()
    try:
        results = {}
        for vs in sets:
            if vs.images is None:
                raise ValueError(f"verification set {vs.name} was not decoded")
            model = FaceModel(vs.path, "iresnet", embedding_dim, batch_size, True, device.type,
                              {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32"), forward)
            results[vs.name] = evaluate_verification(model.embed(vs.images), vs.issame, folds=VERIFY_FOLDS)
        return results
    finally:
        backbone.train(was_training)


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


def _human(record: dict[str, Any], epochs: int, total_steps: int, set_names: list[str]) -> str:
    """The stderr progress line of a log record."""
    event = record.get("event", "train")
    where = f"epoch {record['epoch'] + 1}/{epochs} step {record['step']}/{total_steps}"
    if event == "start":
        split = (f"{record['world']} processes ({record['backend']}) x {record['per_process_batch']} images"
                 if record["world"] > 1 else "1 process")
        resumed = f", resuming at step {record['step']}" if record["resumed_from_step"] else ""
        sets = f"; verifying on {', '.join(record['verify_sets'])}" if record["verify_sets"] else ""
        return (f"training on {record['device']} in {record['layout']}: {split}, global batch {record['batch_size']}, "
                f"{record['num_images']} images of {record['num_classes']} classes{resumed}{sets}")
    if event == "verify":
        parts = [f"{name} {100 * record[f'{name}_acc']:.2f}% +- {100 * record[f'{name}_std']:.2f} "
                 f"(thr {record[f'{name}_best_threshold']:.2f}, best {100 * record[f'{name}_best_acc']:.2f}% "
                 f"at step {record[f'{name}_best_step']})" for name in set_names if f"{name}_acc" in record]
        return f"{where} verify: {'; '.join(parts)} [{record['seconds']:.1f} s]"
    if event == "ddp_sync":
        state = "identical" if record["params_in_sync"] else f"DIFFERENT (by {record['max_fingerprint_diff']:.3g})"
        return f"{where} parameters on the {record['world']} processes: {state}"
    eta = record.get("eta_s", 0.0)
    return (f"{where} loss {record['loss']:.4f} acc {record['acc']:.3f} lr {record['lr']:.5f} "
            f"{record['images_per_s']:.1f} img/s ETA {eta / 60:.1f} min")


# ---------------------------------------------------------------------------------------------------- RNG state
def _rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(gauss)],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
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


# ------------------------------------------------------------------------------------------------ run folder
def check_run_folder(out: Path, cfg: TrainConfig) -> None:
    """Refuse, before anything is built or written, a run folder that cannot hold a run: a file, a folder that is,
    lies inside or holds the training data or a verification set (DESIGN "Safety": a command never writes into its
    input), or one where a file training writes is a folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out}: a file is there, not a run folder; choose a folder (it is created)")
    check_apart(out, [cfg.data.path, cfg.data.real_path, *cfg.verify_sets])
    for name in (CHECKPOINT, MODEL, LOG, CONFIG):
        if (out / name).exists() and not (out / name).is_file():
            raise ConfigError(f"{out / name}: not a regular file (training writes a file there); remove it or "
                              "choose another -o")


def _start_up(cfg: TrainConfig, out: Path, dist_info: _Dist, device: torch.device,
              held: contextlib.ExitStack) -> list[VerifySet]:
    """Fail fast, before anything is built: every process checks the verification sets (only the main one decodes
    and keeps the images), and the main process creates the run folder and takes its lock (held until ``held``
    closes). A failure anywhere stops every process, so none waits on a collective forever."""
    verify_sets: list[VerifySet] = []
    failure: Digi2RealError | OSError | None = None
    try:
        verify_sets = load_verify_sets(cfg.verify_sets, decode=dist_info.main)
        if dist_info.main:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(exclusive_lock(out / LOCK, LOCK_BUSY))
    except (Digi2RealError, OSError) as exc:  # OSError: -o under a file, a read-only folder (one line in the CLI)
        failure = exc
    if _any_rank(failure is not None, dist_info.world, device) and failure is None:
        failure = Digi2RealError(f"training into {out} could not start on another process; see its error")
    if failure is not None:
        if dist_info.created:
            import torch.distributed as dist

            dist.destroy_process_group()
        raise failure
    return verify_sets


# ------------------------------------------------------------------------------------------------- checkpoint
#: What every checkpoint we write holds (anything else, or another type, is a damaged or foreign file).
_CHECKPOINT_KEYS: dict[str, type | tuple[type, ...]] = {
    "backbone": dict, "head": dict, "optimizer": dict, "step": int, "rng": dict, "config_compare": dict}


def describe_load_error(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words (torch's message runs to a page)."""
    text = str(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds objects other than tensors, which could run code when loaded: refused"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "not a complete torch file: truncated or of another kind"
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first[:120]}"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``checkpoint.pt`` loaded with ``weights_only=True`` (a pickle that would run code is refused, never executed)
    and checked for the keys every checkpoint holds; a one-line :class:`Digi2RealError` otherwise."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged or hostile file
        raise Digi2RealError(f"{path}: not a readable digi2real checkpoint ({describe_load_error(exc)})") from None
    if not isinstance(ckpt, dict):
        raise Digi2RealError(f"{path}: not a digi2real checkpoint (a {type(ckpt).__name__}, not a dict)")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise Digi2RealError(f"{path}: not a digi2real checkpoint ({key!r} missing or of the wrong type)")
    try:  # the saved settings are compared value by value: plain JSON values only
        json.dumps(ckpt["config_compare"], allow_nan=False)
    except (TypeError, ValueError):
        raise Digi2RealError(f"{path}: not a digi2real checkpoint (its settings are not plain values)") from None
    return ckpt


def _resume_diff(ckpt: dict[str, Any], cfg: TrainConfig, num_classes: int, n: int) -> list[str]:
    """Why ``ckpt`` cannot be continued with ``cfg`` on this dataset (empty: it can)."""
    diff = [f"train.{k}: checkpoint {a!r}, now {b!r}"
            for k, a, b in settings_diff(_comparable(ckpt["config_compare"]), _config_for_compare(cfg))]
    if ckpt.get("num_classes") != num_classes or ckpt.get("num_images") != n:
        diff.append(f"dataset: checkpoint {ckpt.get('num_images')} images / {ckpt.get('num_classes')} classes, "
                    f"now {n} / {num_classes}")
    return diff


def _shape_mismatch(ckpt: dict[str, Any], net: _Net, total_steps: int) -> str | None:
    """What in a checkpoint of matching settings does not fit the net built from them (a damaged file)."""
    for part in ("backbone", "head"):
        want = {k: tuple(v.shape) for k, v in getattr(net, part).state_dict().items()}
        have = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in ckpt[part].items()}
        if want != have:
            bad = sorted(set(want) ^ set(have) or {k for k in want if want[k] != have.get(k)})
            return f"its {part} does not fit the configured net ({', '.join(map(str, bad[:3]))})"
    if not 0 <= ckpt["step"] <= total_steps:
        return f"step {ckpt['step']} is outside 0..{total_steps}"
    return None


def _restore(ckpt: dict[str, Any], path: Path, net: _Net, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, use_scaler: bool) -> None:
    """Put the checkpoint's weights, optimiser, scaler and random states back (checked by :func:`_shape_mismatch`)."""
    try:
        net.backbone.load_state_dict(ckpt["backbone"])
        net.head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if use_scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise Digi2RealError(f"{path}: damaged checkpoint ({first}); delete it, or pass --no-resume to start this run "
                             "afresh") from None


# ------------------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, dataset: TrainingSet, out_dir: str | Path, progress: bool = True, resume: bool = True,
          max_steps: int | None = None, overwrite: bool = False,
          on_step: Callable[[int, float], None] | None = None) -> TrainSummary:
    """Train ``cfg``'s backbone + head on ``dataset`` into ``out_dir`` (see the module docstring for the files).

    ``resume``: continue from ``out_dir/checkpoint.pt`` when present (refused if its config differs, unless
    ``overwrite``, which starts afresh). ``max_steps``: stop (with a checkpoint) once this many global steps are done in
    total, e.g. for a trial run. ``on_step(step, loss)`` is called after every optimiser step (tests, monitoring).
    The main process holds ``out_dir/.train.lock`` until this returns.
    """
    with contextlib.ExitStack() as held:
        return _train(cfg, dataset, Path(out_dir), held, progress, resume, max_steps, overwrite, on_step)


def _train(cfg: TrainConfig, dataset: TrainingSet, out: Path, held: contextlib.ExitStack, progress: bool,
           resume: bool, max_steps: int | None, overwrite: bool,
           on_step: Callable[[int, float], None] | None) -> TrainSummary:
    t_start = time.time()
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps {max_steps}: give at least 1 step (or leave it out to train to the end)")
    check_run_folder(out, cfg)
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
    verify_sets = _start_up(cfg, out, dist_info, device, held)

    # Identical initialisation on every rank: seeded before any module is built.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    net = _build_net(cfg, num_classes, device)
    channels_last = use_channels_last(cfg, device)
    layout = "channels_last" if channels_last else "nchw"
    note = layout_note(cfg, device)
    if note and dist_info.main:
        print(f"digi2real: note: {note}", file=sys.stderr, flush=True)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(net, cfg.weight_decay, cfg.no_decay_on_bn_and_bias), lr=cfg.lr,
                                momentum=cfg.momentum)
    use_scaler = cfg.precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    step = 0
    verify_best: dict[str, dict[str, Any]] = {}
    ckpt: dict[str, Any] | None = None
    if ckpt_path.is_file() and resume:
        try:
            ckpt = read_checkpoint(ckpt_path)
        except Digi2RealError as exc:
            if not overwrite:
                raise Digi2RealError(f"{exc}; delete it (or pass --overwrite) to start this run afresh") from None
    if ckpt is not None:
        diff = _resume_diff(ckpt, cfg, num_classes, n)
        if diff and not overwrite:
            raise ConfigError(f"{ckpt_path}: the run there was started with different settings ({'; '.join(diff[:4])}"
                              f"{'; ...' if len(diff) > 4 else ''}); use the same config to resume, another -o, "
                              "--no-resume, or --overwrite to start afresh there")
        damaged = None if diff else _shape_mismatch(ckpt, net, total_steps)
        if damaged and not overwrite:
            raise Digi2RealError(f"{ckpt_path}: damaged checkpoint ({damaged}); delete it, or pass --overwrite to "
                                 "start this run afresh")
        if not diff and not damaged:
            _restore(ckpt, ckpt_path, net, optimizer, scaler, use_scaler)
            step = int(ckpt["step"])
            verify_best = dict(ckpt.get("verify_best") or {})
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
            print(_human(record, cfg.epochs, total_steps, [vs.name for vs in verify_sets]), file=sys.stderr,
                  flush=True)

    def save_checkpoint() -> None:
        if not dist_info.main:
            return
        state = {
            "backbone": net.backbone.state_dict(), "head": net.head.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None, "step": step, "epoch": step // steps_per_epoch,
            "position": step % steps_per_epoch, "steps_per_epoch": steps_per_epoch, "rng": _rng_state(),
            "config": cfg.model_dump(mode="json"), "config_compare": _config_for_compare(cfg),
            "num_classes": num_classes, "num_images": n, "verify_best": verify_best, "layout": layout,
        }
        with atomic_open(ckpt_path, "wb") as fh:
            torch.save(state, fh)

    world = dist_info.world
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    verifications: list[dict[str, Any]] = []

    def run_verification(epoch: int) -> float:
        """Score the verification sets on the main process (the others wait); returns the seconds it took."""
        t0 = time.time()
        failed: BaseException | None = None
        if dist_info.main:
            rng = _rng_state()  # the forward passes draw nothing, but the training streams must stay untouched
            try:
                results = verify_backbone(net.backbone, verify_sets, device, cfg.embedding_dim,
                                          max(cfg.batch_size // world, 1), channels_last, amp_dtype)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other processes are told
                failed = exc
            finally:
                _set_rng_state(rng)
            if failed is None:
                record: dict[str, Any] = {"event": "verify", "epoch": epoch, "step": step}
                for name, res in results.items():
                    thr = float(np.mean(res.best_thresholds))
                    best = verify_best.get(name)
                    if best is None or res.accuracy > best["acc"]:
                        best = verify_best[name] = {"acc": res.accuracy, "std": res.std, "best_threshold": thr,
                                                    "step": step, "epoch": epoch}
                    record.update({f"{name}_acc": res.accuracy, f"{name}_std": res.std,
                                   f"{name}_best_threshold": thr, f"{name}_best_acc": best["acc"],
                                   f"{name}_best_step": best["step"]})
                record.update({"seconds": time.time() - t0, "time": time.time()})
                verifications.append(record)
                emit(record)
        # Doubles as the barrier the other processes wait at; an error on the main process stops every process.
        if _any_rank(failed is not None, world, device):
            if failed is not None:
                raise failed
            raise Digi2RealError(f"verification failed on the main process at step {step}; see its error")
        return time.time() - t0

    losses: list[float] = []
    last_finite: float | None = None
    images_seen = 0
    t_loop = time.time()
    interrupted = False
    stopped = False  # a stop request (signal), agreed on by every process under DDP
    win_loss, win_acc, win_n, win_t, win_pause = 0.0, 0.0, 0, time.time(), 0.0
    backend = None
    if world > 1:
        import torch.distributed as dist

        backend = str(dist.get_backend())
    emit({"event": "start", "epoch": step // steps_per_epoch, "step": step, "world": world,
          "per_process_batch": cfg.batch_size // world, "batch_size": cfg.batch_size, "backend": backend,
          "device": str(device), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
          "stop_at": stop_at, "num_images": n, "num_classes": num_classes, "resumed_from_step": resumed_from,
          "verify_sets": [vs.name for vs in verify_sets], "layout": layout, "layout_note": note,
          "time": time.time()})
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
                    x = model_input(images, device, channels_last)
                    y = labels.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        logits = model(x, y)
                    loss = F.cross_entropy(logits.float(), y)
                    stats = torch.stack([loss.detach(), (logits.detach().argmax(1) == y).float().mean()])
                    if world > 1:
                        import torch.distributed as dist

                        # The stop flag travels with the statistics, so every process stops at the same step.
                        flag = torch.tensor([float(stop["signal"] is not None)], device=stats.device)
                        stats = torch.cat([stats, flag])
                        dist.all_reduce(stats)
                        stats /= world
                    loss_v, acc_v = (float(v) for v in stats[:2].tolist())
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
                        rate = win_n * cfg.batch_size / max(now - win_t - win_pause, 1e-9)
                        emit({"event": "train", "epoch": epoch, "step": step, "loss": win_loss / win_n,
                              "acc": win_acc / win_n, "lr": optimizer.param_groups[0]["lr"], "images_per_s": rate,
                              "eta_s": (total_steps - step) * cfg.batch_size / max(rate, 1e-9),
                              "epoch_end": epoch_end, "time": now})
                        win_loss, win_acc, win_n, win_t, win_pause = 0.0, 0.0, 0, now, 0.0
                    if verify_sets and (step == total_steps or (
                            step % cfg.verify_every == 0 if cfg.verify_every is not None else epoch_end)):
                        win_pause += run_verification(epoch)  # before the checkpoint, so it holds the best so far
                    if epoch_end:
                        save_checkpoint()
                    stopped = bool(stats[2] > 0) if world > 1 else stop["signal"] is not None
                    if stopped or step >= stop_at:
                        interrupted = stopped or step < total_steps
                        break
            if step < total_steps and step % steps_per_epoch:
                save_checkpoint()  # stopped mid-epoch (signal or max_steps): resume from exactly here
            if world > 1:
                in_sync, diff = _params_in_sync(net, world, device)
                emit({"event": "ddp_sync", "epoch": step // steps_per_epoch, "step": step, "world": world,
                      "params_in_sync": in_sync, "max_fingerprint_diff": diff, "time": time.time()})
            if stopped:
                how = f"signal {stop['signal']}" if stop["signal"] is not None else "a signal to another process"
                raise KeyboardInterrupt(f"stopped by {how} after step {step}; "
                                        f"{ckpt_path} saved, run the same command again to resume")
        finished = step >= total_steps
        if finished and dist_info.main:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in net.backbone.state_dict().items()}
            with atomic_open(out / MODEL, "wb") as fh:
                torch.save(state, fh)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # no process leaves (and may exit) while another still talks to it
    finally:
        if log_file is not None:
            log_file.close()
        if dist_info.created:
            import gc

            import torch.distributed as dist

            # The DDP wrapper's reducer holds the process group: free it first, or the group's destructor can
            # wait forever on a peer that has already exited.
            model = net
            gc.collect()
            dist.destroy_process_group()
    seconds = time.time() - t_start
    return TrainSummary(out_dir=out, steps_done=step, total_steps=total_steps, epoch=step // steps_per_epoch,
                        finished=finished, resumed_from_step=resumed_from, seconds=seconds,
                        images_per_second=images_seen / max(time.time() - t_loop, 1e-9), last_loss=last_finite,
                        losses=losses, world=world, layout=layout, verify_best=verify_best,
                        verifications=verifications)
