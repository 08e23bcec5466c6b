"""The face-recognition training loop (Digi2Real paper, section 4: IResNet50 + AdaFace, 30 epochs, batch 256, SGD with a
cosine schedule; FACTS 6: lr 0.1, momentum 0.9, weight decay 5e-4 with none on BN, gradient-norm clip 5, flip,
``(x / 255 - 0.5) / 0.5`` RGB input).

Its parts live beside it: ``checkpoint`` (what a checkpoint holds, reading it back checked, writing it in the
background), ``verify`` (verification sets), ``distributed`` (the torchrun process group) and ``data`` (the loader and
the network's input), all in :mod:`digi2real.training`.

The recipe reads as :func:`_train` calls it: :func:`_set_up` (settings, process group, run folder, net, optimiser),
:func:`_resume` (the checkpoint put back), :func:`_compile`, then :func:`_train_steps`: :func:`train_step` after step,
with the statistics read from the device every ``log_every`` steps (:class:`DeviceStats`), each read followed by the
log line, a verification and the end-of-epoch checkpoint where due (:func:`_after_read`); then :func:`_end_of_call`.

Outputs in ``out_dir``: ``checkpoint.pt`` (everything needed to resume exactly, written atomically at the end of every
epoch and when stopped by Ctrl-C / SIGTERM / ``max_steps``), ``train_log.jsonl`` (one JSON object per log line),
``model.pt`` (the backbone's state dict in insightface's key names, loadable by
:func:`digi2real.evaluation.models.load_face_model`) and ``train_config.json`` (the resolved config).

``train_log.jsonl`` lines carry an ``event``: ``start`` (world size, per-process batch, backend, device, memory
``layout`` and, when the setting asked for another, ``layout_note``; ``compiled``, ``compile_note``, ``compile_s``;
``workers``), ``train`` (windowed loss / accuracy / lr / throughput), ``verify`` (``<set>_acc``, ``<set>_std``,
``<set>_best_threshold``, ``<set>_best_acc`` per verification set) and, under DDP, ``ddp_sync`` (whether the
parameters are still identical on every process when the call ends).

No step waits for the device (issue 12): the loss and accuracy of each step stay on the device until the next read,
every ``log_every`` steps and at epoch ends, verifications and the last step. A non-finite loss is found at that read
and reported with the step it happened at; checkpoints are written only after a read, so never from a diverged state.
One DataLoader serves the whole call (:func:`digi2real.training.data.make_run_loader`), so epoch boundaries do not
restart its workers, and the end-of-epoch checkpoint is written on a background thread from a host copy
(:class:`CheckpointWriter`).

Verification during training (``train.verify_sets``): insightface ``.bin`` files are read and decoded when training
starts (a missing or damaged file fails at once), then scored every ``train.verify_every`` steps (or at each epoch end)
with the evaluation code: flip-summed embeddings (:class:`digi2real.evaluation.models.FaceModel`) and the 10-fold
protocol (:func:`digi2real.evaluation.verification.evaluate_verification`). It runs on the main process with the
backbone in eval mode and the RNG states saved and restored, so it never changes the training trajectory.

Multi-GPU: launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) it joins a process group (nccl on CUDA, gloo
on CPU) and splits the global batch across the processes; only rank 0 writes files. BatchNorm statistics are per
process (as in insightface's DDP training), so an N-process run is close to, not bit-identical with, a one-process run
of the same global batch. A stop request (SIGTERM, Ctrl-C) travels with the statistics at the next read, so every
process stops after the same step.

Memory layout: channels_last on CUDA (2.9x on an H200), NCHW on the CPU whatever ``train.channels_last`` says
(:func:`use_channels_last`); the layout used is recorded in the ``start`` log line and the checkpoint. Compilation
(``train.compile``): the backbone is compiled with torch.compile on CUDA (auto: eager when compiling fails, the reason
in the ``start`` line), never on the CPU.

One process trains into a run folder at a time: the main process holds ``RUN/.train.lock`` (an ``flock``, released
when the process ends, however it ends) for the whole call; a second ``train`` into the same folder stops at once.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
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
from digi2real.training.data import INPUT_SIZE, TrainingSet, make_run_loader, model_input
from digi2real.training.heads import MarginHead, build_head
from digi2real.training.checkpoint import CheckpointWriter, _rng_state, _set_rng_state, read_checkpoint
from digi2real.training.distributed import _any_rank, _Dist, _init_distributed, _params_in_sync
from digi2real.training.iresnet import DEPTHS, IResNet
from digi2real.training.verify import VerifySet, load_verify_sets, verify_backbone  # noqa: F401

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "train_log.jsonl"
CONFIG = "train_config.json"
LOCK = ".train.lock"
LOCK_BUSY = ("another digi2real train process is training in this run folder (it holds .train.lock); wait for it to "
             "finish or stop it, or choose another -o")
# Settings that may change between a run and its resume without changing what is computed. The memory layout and
# compilation are such: like the device, they change only the order of floating-point operations (and checkpoints
# made before channels_last became "auto", or before train.compile existed, must still resume).
_RESUME_FREE = ("log_every", "device", "verify_sets", "verify_every", "channels_last", "compile")
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
    compiled: bool = False

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
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None

    def use_compiled(self, backbone: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Train through ``backbone`` (``torch.compile(self.backbone)``, sharing its parameters). Kept outside the
        module tree, so the state dicts, DDP and verification see the eager backbone alone."""
        object.__setattr__(self, "_compiled", backbone)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone if self._compiled is None else self._compiled  # a module's truth is its len()
        return self.head(backbone(x), labels)


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


def _human(record: dict[str, Any], epochs: int, total_steps: int, set_names: list[str]) -> str:
    """The stderr progress line of a log record."""
    event = record.get("event", "train")
    where = f"epoch {record['epoch'] + 1}/{epochs} step {record['step']}/{total_steps}"
    if event == "start":
        split = (f"{record['world']} processes ({record['backend']}) x {record['per_process_batch']} images"
                 if record["world"] > 1 else "1 process")
        resumed = f", resuming at step {record['step']}" if record["resumed_from_step"] else ""
        sets = f"; verifying on {', '.join(record['verify_sets'])}" if record["verify_sets"] else ""
        compiled = ", compiled" if record.get("compiled") else ""
        return (f"training on {record['device']} in {record['layout']}{compiled}: {split}, global batch "
                f"{record['batch_size']}, {record['num_images']} images of {record['num_classes']} classes{resumed}{sets}")
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
    # The kernel choice is this machine's, not the checkpoint's: load_state_dict would bring back the saved groups'
    # flags (a CPU checkpoint's unfused SGD under a CUDA run's gradient scaler would skip its inf check).
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    try:
        net.backbone.load_state_dict(ckpt["backbone"])
        net.head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, kernel in zip(optimizer.param_groups, kernels):
            group.update(kernel)
        if use_scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise Digi2RealError(f"{path}: damaged checkpoint ({first}); delete it, or pass --no-resume to start this run "
                             "afresh") from None


# ------------------------------------------------------------------------------------------------------ compile
#: Devices where ``train.compile`` applies. Not the CPU: inductor's CPU code turns convolutions channels_last, where
#: torch's CPU backward corrupts the heap for the miniature widths (compiling widths (8, 8, 16, 16) aborted here with
#: "free(): invalid next size"; widths (16, ...) compiled in 23 s), and CPU training is for trial runs. The tests add
#: "cpu" to run the compiled path on a miniature.
COMPILE_DEVICES: tuple[str, ...] = ("cuda",)


def _compile(run: _Run) -> None:
    """``train.compile`` applied to ``run``'s net; what was done, and why not, is kept for the start line."""
    t0 = time.time()
    record = _compile_backbone(run)
    run.compiled = {**record, "compile_s": round(time.time() - t0, 3)}


def _compile_backbone(run: _Run) -> dict[str, Any]:
    """torch.compile the backbone (``train.compile`` auto or true) on CUDA, compiled and tried once on a batch of the
    training shape before the first step, so a failure falls back to eager (auto; the reason is recorded) or stops at
    once (true) instead of failing inside the run. The eager backbone stays the one verified and saved."""
    cfg, device = run.cfg, run.device
    if cfg.compile is False:
        return {"compiled": False, "compile_note": "train.compile is false: eager"}
    if device.type not in COMPILE_DEVICES:
        note = (f"train.compile is {str(cfg.compile).lower()}, but training on {device.type} runs eager: the backbone "
                "is compiled on CUDA only (inductor's CPU convolutions hit torch's channels_last heap corruption)")
        if cfg.compile is True and run.dist.main:
            print(f"digi2real: note: {note}", file=sys.stderr, flush=True)
        return {"compiled": False, "compile_note": note}
    failure: str | None = None
    compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
    try:
        compiled = torch.compile(run.net.backbone, dynamic=False)
        example = model_input(torch.zeros((run.per_process_batch, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8),
                              device, run.channels_last)
        _warm_up(compiled, run.net.backbone, example, run.amp_dtype)
    except Exception as exc:  # noqa: BLE001 - dynamo and inductor raise many types; the reason is recorded
        failure = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
    if _any_rank(failure is not None, run.world, device):  # every process takes the same path
        failure = failure or "it failed on another process"
        with contextlib.suppress(Exception):  # drop what the failed try compiled or cached
            importlib.import_module("torch._dynamo").reset()
        if cfg.compile is True:
            raise ConfigError(f"train.compile is true, but torch.compile failed here ({failure}); set "
                              "train.compile to auto (eager when it fails) or false")
        return {"compiled": False, "compile_note": f"torch.compile failed ({failure}); training runs eager"}
    assert compiled is not None
    run.net.use_compiled(compiled)
    return {"compiled": True, "compile_note": None}


def _warm_up(fn: Callable[[torch.Tensor], torch.Tensor], backbone: nn.Module, example: torch.Tensor,
             amp_dtype: torch.dtype | None) -> None:
    """One forward and backward of ``fn`` on ``example``, so torch.compile compiles (or fails) here; the backbone's
    buffers (BatchNorm statistics), its gradients and the random streams are put back: the trajectory does not move."""
    buffers = [b.detach().clone() for b in backbone.buffers()]
    rng = _rng_state()
    try:
        with torch.autocast(example.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = fn(example)
        out.float().sum().backward()
    finally:
        with torch.no_grad():
            for b, saved in zip(backbone.buffers(), buffers):
                b.copy_(saved)
        for p in backbone.parameters():
            p.grad = None
        _set_rng_state(rng)


# ---------------------------------------------------------------------------------------------- step statistics
class DeviceStats:
    """The loss and accuracy of every step since the last read, kept on the device: reading them each step made every
    step wait for the device (issue 12). :meth:`read` is the one host read (and, under DDP, the one all-reduce, which
    also carries the stop flag, so every process stops after the same step)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.pending: list[torch.Tensor] = []

    def add(self, row: torch.Tensor) -> None:
        self.pending.append(row)

    def read(self, stop: bool) -> tuple[list[list[float]], bool]:
        """``([[loss, acc] per pending step], stop requested on any process)``; the pending steps are cleared."""
        rows = torch.stack(self.pending)
        self.pending = []
        if self.world == 1:
            return rows.tolist(), stop
        import torch.distributed as dist

        packed = torch.cat([rows, torch.full((1, 2), float(stop), device=rows.device)])
        dist.all_reduce(packed)
        packed /= self.world
        values = packed.tolist()
        return values[:-1], values[-1][0] > 0


# ------------------------------------------------------------------------------------------------------ the run
@dataclass
class _Run:
    """What one call trains with, fixed once :func:`_set_up` has built it (``model`` and ``compiled`` follow)."""

    cfg: TrainConfig
    out: Path
    dist: _Dist
    device: torch.device
    num_classes: int
    n: int
    steps_per_epoch: int
    total_steps: int
    stop_at: int
    verify_sets: list[VerifySet]
    net: _Net
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_scaler: bool
    amp_dtype: torch.dtype | None
    channels_last: bool
    layout_note: str | None
    model: nn.Module | None = None  # the net, or its DDP wrapper
    compiled: dict[str, Any] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.dist.world

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "nchw"

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def per_process_batch(self) -> int:
        return self.cfg.batch_size // self.dist.world

    def epoch_of(self, step: int) -> int:
        """The (0-based) epoch global step ``step`` (1-based, as logged) belongs to."""
        return (step - 1) // self.steps_per_epoch


@dataclass
class _Ledger:
    """Where the run stands on the host, brought up to date at each read of the device statistics."""

    step: int = 0
    resumed_from: int = 0
    verify_best: dict[str, dict[str, Any]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    last_finite: float | None = None
    verifications: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    win_loss: float = 0.0
    win_acc: float = 0.0
    win_n: int = 0
    win_t: float = field(default_factory=time.time)
    win_pause: float = 0.0

    def take(self, rows: list[list[float]], first: int, run: _Run) -> None:
        """Book the read ``[loss, acc]`` of steps ``first + 1 ...``; the first non-finite loss stops the run, naming
        its step, before anything is written (checkpoints are written only after a read)."""
        for i, (loss, acc) in enumerate(rows):
            if not math.isfinite(loss):
                step = first + i + 1
                raise Digi2RealError(
                    f"training diverged: the loss became {loss} at step {step} (epoch {run.epoch_of(step) + 1}); "
                    f"last finite loss {self.last_finite}; {run.ckpt_path} holds the last good state. Lower train.lr "
                    "(--lr), add warm-up (--set train.warmup_epochs=1) or use fp32 precision")
            self.last_finite = loss
            self.losses.append(loss)
            self.win_loss += loss
            self.win_acc += acc
            self.win_n += 1

    def window(self, run: _Run) -> dict[str, Any]:
        """The ``train`` log record of the steps since the last one (verification time left out), and a new window."""
        now = time.time()
        rate = self.win_n * run.cfg.batch_size / max(now - self.win_t - self.win_pause, 1e-9)
        record = {"event": "train", "epoch": run.epoch_of(self.step), "step": self.step,
                  "loss": self.win_loss / self.win_n, "acc": self.win_acc / self.win_n,
                  "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": rate,
                  "eta_s": (run.total_steps - self.step) * run.cfg.batch_size / max(rate, 1e-9),
                  "epoch_end": self.step % run.steps_per_epoch == 0, "time": now}
        self.win_loss, self.win_acc, self.win_n, self.win_t, self.win_pause = 0.0, 0.0, 0, now, 0.0
        return record


class _Log:
    """``train_log.jsonl`` (written by the main process only) and its progress lines on stderr."""

    def __init__(self, run: _Run, resumed_from: int, progress: bool) -> None:
        self.run, self.progress = run, progress
        self.file = None
        if run.dist.main:
            if resumed_from == 0 and (run.out / LOG).exists():
                (run.out / LOG).unlink()  # a fresh run: the old log belongs to a discarded run
            write_json(run.out / CONFIG, run.cfg.model_dump(mode="json"))
            self.file = open(run.out / LOG, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def emit(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.progress:
            run = self.run
            print(_human(record, run.cfg.epochs, run.total_steps, [vs.name for vs in run.verify_sets]),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ------------------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, dataset: TrainingSet, out_dir: str | Path, progress: bool = True, resume: bool = True,
          max_steps: int | None = None, overwrite: bool = False,
          on_step: Callable[[int, float], None] | None = None) -> TrainSummary:
    """Train ``cfg``'s backbone + head on ``dataset`` into ``out_dir`` (see the module docstring for the files).

    ``resume``: continue from ``out_dir/checkpoint.pt`` when present (refused if its config differs, unless
    ``overwrite``, which starts afresh). ``max_steps``: stop (with a checkpoint) once this many global steps are done in
    total, e.g. for a trial run. ``on_step(step, loss)`` is called after every optimiser step (tests, monitoring): it
    makes every step read its loss from the device, which training otherwise does every ``log_every`` steps.
    The main process holds ``out_dir/.train.lock`` until this returns.
    """
    with contextlib.ExitStack() as held:
        return _train(cfg, dataset, Path(out_dir), held, progress, resume, max_steps, overwrite, on_step)


def _train(cfg: TrainConfig, dataset: TrainingSet, out: Path, held: contextlib.ExitStack, progress: bool,
           resume: bool, max_steps: int | None, overwrite: bool,
           on_step: Callable[[int, float], None] | None) -> TrainSummary:
    """The recipe: set up, resume, compile, then steps (logged, verified and checkpointed at the reads of their
    statistics) until the end, ``max_steps`` or a stop request; then the model file."""
    t_start = time.time()
    run = _set_up(cfg, dataset, out, held, max_steps)
    log: _Log | None = None
    writer = CheckpointWriter(run.ckpt_path)
    try:
        ledger = _resume(run, resume, overwrite)
        _compile(run)
        run.model = _distributed(run)
        log = _Log(run, ledger.resumed_from, progress)
        log.emit(_start_record(run, ledger))
        t_loop = time.time()
        with _stop_requests() as stop:
            stopped = _train_steps(run, ledger, dataset, log, writer, stop, on_step)
            _end_of_call(run, ledger, log, writer, stopped, stop)
        loop_s = time.time() - t_loop
        finished = ledger.step >= run.total_steps
        if finished and run.dist.main:
            _write_model(run)
        if run.world > 1:
            import torch.distributed as dist

            dist.barrier()  # no process leaves (and may exit) while another still talks to it
    finally:
        with contextlib.suppress(BaseException):  # never replaces the exception already on its way out
            writer.wait()
        if log is not None:
            log.close()
        _leave_process_group(run)
    return TrainSummary(out_dir=out, steps_done=ledger.step, total_steps=run.total_steps,
                        epoch=ledger.step // run.steps_per_epoch, finished=finished,
                        resumed_from_step=ledger.resumed_from, seconds=time.time() - t_start,
                        images_per_second=ledger.images / max(loop_s, 1e-9), last_loss=ledger.last_finite,
                        losses=ledger.losses, world=run.world, layout=run.layout, verify_best=ledger.verify_best,
                        verifications=ledger.verifications, compiled=bool(run.compiled.get("compiled")))


# ------------------------------------------------------------------------------------------------------- set-up
def _set_up(cfg: TrainConfig, dataset: TrainingSet, out: Path, held: contextlib.ExitStack,
            max_steps: int | None) -> _Run:
    """Check the settings against the data, join the process group, take the run folder (``_start_up``) and build the
    net, optimiser and gradient scaler, seeded identically on every process."""
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps {max_steps}: give at least 1 step (or leave it out to train to the end)")
    check_run_folder(out, cfg)
    num_classes, n = int(dataset.num_classes), len(dataset)
    dist_info = _init_distributed("cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(cfg, dist_info.local_rank)
    if cfg.batch_size % dist_info.world:
        raise ConfigError(f"train.batch_size {cfg.batch_size} must be divisible by the {dist_info.world} processes")
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size {cfg.batch_size} exceeds the {n} training images; lower --batch-size")
    total_steps = cfg.epochs * steps_per_epoch
    verify_sets = _start_up(cfg, out, dist_info, device, held)

    # Identical initialisation on every rank: seeded before any module is built.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    net = _build_net(cfg, num_classes, device)
    channels_last = use_channels_last(cfg, device)
    note = layout_note(cfg, device)
    if note and dist_info.main:
        print(f"digi2real: note: {note}", file=sys.stderr, flush=True)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    use_scaler = cfg.precision == "fp16" and device.type == "cuda"
    return _Run(cfg=cfg, out=out, dist=dist_info, device=device, num_classes=num_classes, n=n,
                steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                stop_at=total_steps if max_steps is None else min(total_steps, max_steps), verify_sets=verify_sets,
                net=net, optimizer=make_optimizer(net, cfg, device),
                scaler=torch.amp.GradScaler("cuda", enabled=use_scaler), use_scaler=use_scaler,
                amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision),
                channels_last=channels_last, layout_note=note)


def make_optimizer(net: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.SGD:
    """SGD with momentum (FACTS 6), fused on CUDA: the fused kernel applies the gradient scaler's inf check on the
    device, where the unfused path reads it on the host every step (``GradScaler._maybe_opt_step``'s ``.item()``)."""
    groups = param_groups(net, cfg.weight_decay, cfg.no_decay_on_bn_and_bias)
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError, ValueError):  # a torch without the fused kernel: the plain one
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _distributed(run: _Run) -> nn.Module:
    """The module the steps call: the net, or under torchrun its DDP wrapper (which averages the gradients)."""
    if run.world <= 1:
        return run.net
    return nn.parallel.DistributedDataParallel(
        run.net, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def _leave_process_group(run: _Run) -> None:
    """Destroy the process group this call created (after freeing the DDP wrapper, whose reducer holds it: otherwise
    the group's destructor can wait forever on a peer that has already exited)."""
    if not run.dist.created:
        return
    import gc

    import torch.distributed as dist

    run.model = None
    gc.collect()
    dist.destroy_process_group()


def _start_record(run: _Run, ledger: _Ledger) -> dict[str, Any]:
    """The ``start`` log line: how this call trains (processes, batch, device, layout, compilation, data workers)."""
    backend = None
    if run.world > 1:
        import torch.distributed as dist

        backend = str(dist.get_backend())
    return {"event": "start", "epoch": ledger.step // run.steps_per_epoch, "step": ledger.step, "world": run.world,
            "per_process_batch": run.per_process_batch, "batch_size": run.cfg.batch_size, "backend": backend,
            "device": str(run.device), "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total_steps,
            "stop_at": run.stop_at, "num_images": run.n, "num_classes": run.num_classes,
            "resumed_from_step": ledger.resumed_from, "verify_sets": [vs.name for vs in run.verify_sets],
            "layout": run.layout, "layout_note": run.layout_note, **run.compiled, "workers": run.cfg.data.workers,
            "time": time.time()}


# ------------------------------------------------------------------------------------------------------- resume
def _resume(run: _Run, resume: bool, overwrite: bool) -> _Ledger:
    """The checkpoint's weights, optimiser, scaler and random states put back, and its step; a fresh start when there
    is none (or ``overwrite`` discards one that cannot be continued). Refused with one line: a damaged checkpoint, or
    one made with other settings or another dataset."""
    path = run.ckpt_path
    ckpt: dict[str, Any] | None = None
    if path.is_file() and resume:
        try:
            ckpt = read_checkpoint(path)
        except Digi2RealError as exc:
            if not overwrite:
                raise Digi2RealError(f"{exc}; delete it (or pass --overwrite) to start this run afresh") from None
    if ckpt is None:
        return _Ledger()
    diff = _resume_diff(ckpt, run.cfg, run.num_classes, run.n)
    if diff and not overwrite:
        raise ConfigError(f"{path}: the run there was started with different settings ({'; '.join(diff[:4])}"
                          f"{'; ...' if len(diff) > 4 else ''}); use the same config to resume, another -o, "
                          "--no-resume, or --overwrite to start afresh there")
    damaged = None if diff else _shape_mismatch(ckpt, run.net, run.total_steps)
    if damaged and not overwrite:
        raise Digi2RealError(f"{path}: damaged checkpoint ({damaged}); delete it, or pass --overwrite to start this "
                             "run afresh")
    if diff or damaged:
        return _Ledger()
    _restore(ckpt, path, run.net, run.optimizer, run.scaler, run.use_scaler)
    step = int(ckpt["step"])
    return _Ledger(step=step, resumed_from=step, verify_best=dict(ckpt.get("verify_best") or {}))


# ----------------------------------------------------------------------------------------------------- the steps
def _train_steps(run: _Run, ledger: _Ledger, dataset: TrainingSet, log: _Log, writer: CheckpointWriter,
                 stop: dict[str, Any], on_step: Callable[[int, float], None] | None) -> bool:
    """Steps from ``ledger.step`` to ``run.stop_at`` over one DataLoader. The statistics stay on the device until a
    read (:func:`_read_due`); logging, verification and checkpoints follow a read. Returns whether a stop request
    (signal) ended the steps: one process stops at the next step, DDP processes at the next read, all together."""
    stats = DeviceStats(run.world)
    ledger.win_t = time.time()
    with _batches(run, dataset, ledger.step) as batches:
        for images, labels in batches:
            stats.add(train_step(run, images, labels, ledger.step))
            ledger.step += 1
            ledger.images += run.cfg.batch_size
            agreed = False
            asked = stop["signal"] is not None
            if on_step is not None or _read_due(run, ledger.step) or (run.world == 1 and asked):
                agreed = _read(run, ledger, stats, asked, on_step)
                _after_read(run, ledger, log, writer)
            stopped = agreed if run.world > 1 else stop["signal"] is not None
            if stopped or ledger.step >= run.stop_at:
                if stats.pending:  # one process, stopped by a signal that came after this step's read decision
                    _read(run, ledger, stats, asked, on_step)
                return stopped
    return False


@contextlib.contextmanager
def _batches(run: _Run, dataset: TrainingSet, start: int) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """The batches of steps ``start`` to ``run.stop_at`` from one DataLoader (workers started once, for the whole
    call); its workers are shut down however the steps end."""
    cfg = run.cfg
    loader = make_run_loader(dataset, global_batch=cfg.batch_size, seed=cfg.seed, start_step=start,
                             stop_step=run.stop_at, augment_mode=cfg.augment, workers=cfg.data.workers,
                             rank=run.dist.rank, world=run.world, pin_memory=run.device.type == "cuda")
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def train_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
    """One SGD step of the recipe (FACTS 6) at 0-based global step ``step``: its learning rate, the forward pass under
    autocast, the margin head's cross-entropy, backward (scaled under fp16), gradient-norm clip, update. Returns the
    step's ``[loss, accuracy]`` on the device, unread."""
    cfg, optimizer, scaler = run.cfg, run.optimizer, run.scaler
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, cfg, run.steps_per_epoch)
    x = model_input(images, run.device, run.channels_last)
    y = labels.to(run.device, non_blocking=True)
    assert run.model is not None
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        logits = run.model(x, y)
    loss = F.cross_entropy(logits.float(), y)
    row = torch.stack([loss.detach(), (logits.detach().argmax(1) == y).float().mean()])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(run.net.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return row


def _read_due(run: _Run, step: int) -> bool:
    """Whether the statistics are read after global step ``step`` (the same answer on every process): every
    ``log_every`` steps, at epoch ends (checkpoints), verifications and the last step of the call."""
    return (step % run.cfg.log_every == 0 or step % run.steps_per_epoch == 0 or step == run.stop_at
            or _verify_due(run, step))


def _verify_due(run: _Run, step: int) -> bool:
    cfg = run.cfg
    if not run.verify_sets:
        return False
    return step == run.total_steps or (step % cfg.verify_every == 0 if cfg.verify_every is not None
                                       else step % run.steps_per_epoch == 0)


def _read(run: _Run, ledger: _Ledger, stats: DeviceStats, asked: bool,
          on_step: Callable[[int, float], None] | None) -> bool:
    """Read the pending statistics (one host read), book them (the first non-finite loss stops the run), tell
    ``on_step``; returns whether any process asked to stop."""
    first = ledger.step - len(stats.pending)
    rows, agreed = stats.read(asked)
    ledger.take(rows, first, run)
    if on_step is not None:
        for i, (loss, _) in enumerate(rows):
            on_step(first + i + 1, loss)
    return agreed


def _after_read(run: _Run, ledger: _Ledger, log: _Log, writer: CheckpointWriter) -> None:
    """What follows a read at ``ledger.step``: the log line, a verification, the end-of-epoch checkpoint."""
    step = ledger.step
    epoch_end = step % run.steps_per_epoch == 0
    if step % run.cfg.log_every == 0 or epoch_end or step == run.stop_at:
        log.emit(ledger.window(run))
    if _verify_due(run, step):
        ledger.win_pause += _verify(run, ledger, log)  # before the checkpoint, so it holds the best so far
    if epoch_end:
        _save_checkpoint(run, ledger, writer)


# ------------------------------------------------------------------------------------------- verify, save, end
def _verify(run: _Run, ledger: _Ledger, log: _Log) -> float:
    """Score the verification sets on the main process (the others wait); returns the seconds it took."""
    t0 = time.time()
    step, epoch = ledger.step, run.epoch_of(ledger.step)
    failed: BaseException | None = None
    if run.dist.main:
        rng = _rng_state()  # the forward passes draw nothing, but the training streams must stay untouched
        try:
            results = verify_backbone(run.net.backbone, run.verify_sets, run.device, run.cfg.embedding_dim,
                                      max(run.per_process_batch, 1), run.channels_last, run.amp_dtype)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other processes are told
            failed = exc
        finally:
            _set_rng_state(rng)
        if failed is None:
            record: dict[str, Any] = {"event": "verify", "epoch": epoch, "step": step}
            for name, res in results.items():
                thr = float(np.mean(res.best_thresholds))
                best = ledger.verify_best.get(name)
                if best is None or res.accuracy > best["acc"]:
                    best = ledger.verify_best[name] = {"acc": res.accuracy, "std": res.std, "best_threshold": thr,
                                                       "step": step, "epoch": epoch}
                record.update({f"{name}_acc": res.accuracy, f"{name}_std": res.std, f"{name}_best_threshold": thr,
                               f"{name}_best_acc": best["acc"], f"{name}_best_step": best["step"]})
            record.update({"seconds": time.time() - t0, "time": time.time()})
            ledger.verifications.append(record)
            log.emit(record)
    # Doubles as the barrier the other processes wait at; an error on the main process stops every process.
    if _any_rank(failed is not None, run.world, run.device):
        if failed is not None:
            raise failed
        raise Digi2RealError(f"verification failed on the main process at step {step}; see its error")
    return time.time() - t0


def _save_checkpoint(run: _Run, ledger: _Ledger, writer: CheckpointWriter) -> None:
    """``checkpoint.pt`` of the state after ``ledger.step`` (main process; written in the background): everything a
    resume needs to continue exactly."""
    if not run.dist.main:
        return
    step, spe = ledger.step, run.steps_per_epoch
    writer.save({
        "backbone": run.net.backbone.state_dict(), "head": run.net.head.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict() if run.use_scaler else None,
        "step": step, "epoch": step // spe, "position": step % spe, "steps_per_epoch": spe, "rng": _rng_state(),
        "config": run.cfg.model_dump(mode="json"), "config_compare": _config_for_compare(run.cfg),
        "num_classes": run.num_classes, "num_images": run.n, "verify_best": ledger.verify_best, "layout": run.layout,
    })


def _end_of_call(run: _Run, ledger: _Ledger, log: _Log, writer: CheckpointWriter, stopped: bool,
                 stop: dict[str, Any]) -> None:
    """After the last step of this call: the mid-epoch checkpoint of a stopped run (so it resumes from exactly here),
    every checkpoint on disk, the DDP parameter check, and the stop reported as a KeyboardInterrupt."""
    if ledger.step < run.total_steps and ledger.step % run.steps_per_epoch:
        _save_checkpoint(run, ledger, writer)
    writer.wait()
    if run.world > 1:
        in_sync, diff = _params_in_sync(run.net, run.world, run.device)
        log.emit({"event": "ddp_sync", "epoch": ledger.step // run.steps_per_epoch, "step": ledger.step,
                  "world": run.world, "params_in_sync": in_sync, "max_fingerprint_diff": diff, "time": time.time()})
    if stopped:
        how = f"signal {stop['signal']}" if stop["signal"] is not None else "a signal to another process"
        raise KeyboardInterrupt(f"stopped by {how} after step {ledger.step}; {run.ckpt_path} saved, run the same "
                                "command again to resume")


def _write_model(run: _Run) -> None:
    """``model.pt``: the eager backbone's state dict (insightface's key names), on the CPU."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in run.net.backbone.state_dict().items()}
    with atomic_open(run.out / MODEL, "wb") as fh:
        torch.save(state, fh)
