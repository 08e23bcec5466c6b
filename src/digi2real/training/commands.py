"""The `train` and `export` sub-commands. ``register(subparsers)`` adds both; handlers return an exit status.

Importing this module is cheap (no torch): the loop and the dataset are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path
from typing import Any

TRAIN_DESCRIPTION = textwrap.dedent("""\
    Train a face-recognition model on a generated (or any folder-per-identity / insightface RecordIO) dataset:
    IResNet backbone + margin head, SGD with a per-iteration cosine schedule. The defaults are the Digi2Real
    paper's recipe: IResNet50 + AdaFace (m 0.4, h 0.333, s 64), 30 epochs, global batch 256, lr 0.1, momentum
    0.9, weight decay 5e-4 (none on BatchNorm/PReLU/bias), gradient-norm clip 5, horizontal flip, input
    (x/255 - 0.5)/0.5 RGB.

    Settings come from CONFIG's `train:` section (an experiment YAML), then --set, then the flags below.
    The data path is train.data.path (--data).

    RUN receives: checkpoint.pt (written at the end of every epoch and on Ctrl-C/SIGTERM), train_log.jsonl
    (JSON lines with an "event": "start" once per call with the process count and per-process batch; "train"
    every train.log_every steps and at each epoch end: epoch, step, loss, acc, lr, images/s, ETA; "verify"
    with --verify; "ddp_sync" under torchrun), train_config.json and, when training ends, model.pt (the
    backbone's state dict in insightface's key names; evaluate it with `digi2real eval RUN`, export it with
    `digi2real export RUN --onnx`).

    Verification while training: --verify lfw.bin (repeatable; insightface .bin files, each named by its file
    stem) scores the backbone on the main process at each epoch end, or every --verify-every N steps, with the
    eval command's protocol (flip-summed embeddings, 10 folds); it logs <set>_acc, <set>_std,
    <set>_best_threshold (mean of the folds' thresholds) and the best accuracy so far, which the checkpoint and
    the final summary keep. A missing or damaged file stops the command before training starts. It does not
    change the training itself: a run resumes exactly with or without it.

    Resuming: run the same command again; it continues from checkpoint.pt exactly (same data order,
    augmentation and random state). A different config is refused unless --overwrite (which restarts the
    run in place) or --no-resume (start afresh, ignoring the checkpoint). One process trains into RUN at a
    time: a second `train` into the same RUN stops at once (RUN/.train.lock). RUN must lie apart from the
    training data and the --verify files.

    Memory layout (train.channels_last: auto, true or false; default auto): channels_last on CUDA (with
    fp16 autocast, 2.9x the plain fp32 step on an H200), NCHW on the CPU whatever the setting: torch's CPU
    backward of channels_last 1x1 stride-2 convolutions with fewer than 16 input channels corrupts memory
    (SIGSEGV; small-width nets such as widths [8,8,16,16] hit it), and channels_last gains only 1.14-1.22x
    on CPUs (BENCHMARKS.md, "Training layout on the CPU"). `true` on the CPU prints a note and runs NCHW;
    `false` turns it off on CUDA too. The layout used ("channels_last" or "nchw") is in the "start" log
    line, the first progress line and checkpoint.pt; a run may resume in another layout (it changes
    rounding, not what is computed).

    Precision: fp32 is the default and the fastest on CPUs without native bf16 (AVX2); bf16 autocast on
    recent CPUs (AMX/AVX-512-BF16) or CUDA; fp16 with gradient scaling on CUDA only.

    No stalls: one DataLoader serves the whole call (its workers start once and decode across epoch
    boundaries), and the steps never wait for the device: the loss and accuracy are read every
    train.log_every steps (and at epoch ends, verifications and the last step). A NaN/inf loss is found
    at that read and reported with the step it happened at; no checkpoint is written past it. Under
    torchrun a Ctrl-C/SIGTERM stops every process after the same step, at the next such read.

    Compilation (train.compile: auto, true or false; default auto): torch.compile of the backbone on CUDA,
    tried on one batch before the first step; auto trains eager when compiling fails (the reason is in
    the "start" log line), true stops with the reason. Never on the CPU (a note says so for true).""")

TRAIN_EPILOG = textwrap.dedent("""\
    examples:
      digi2real train digi2real-20k -o runs/d2r20k
      digi2real train -o runs/try --data out/dataset --epochs 1 --batch-size 64 --device cpu
      digi2real train -o runs/casia --data faces_webface_112x112/ --head arcface --set train.scale=64
      digi2real train -o runs/tiny --data out/dataset --set train.widths=[16,32,64,128] \\
          --set train.depths=[1,1,1,1] --set train.stem_stride=2 --head cosface --set train.scale=32

    several GPUs (one process per GPU; the global batch is split across them):
      torchrun --standalone --nproc_per_node 4 -m digi2real train digi2real-20k -o runs/d2r20k

    log lines (train_log.jsonl):
      {"event": "train", "epoch": 0, "step": 50, "loss": 41.2, "acc": 0.0, "lr": 0.0999, "images_per_s": 1210.4, ...}
      {"event": "verify", "epoch": 0, "step": 2000, "lfw_acc": 0.981, "lfw_std": 0.006, "lfw_best_threshold": 1.42,
       "lfw_best_acc": 0.981, "lfw_best_step": 2000, "seconds": 12.3, ...}

    verification while training:
      digi2real train digi2real-20k -o runs/d2r20k --verify bins/lfw.bin --verify bins/cfp_fp.bin \\
          --verify-every 2000""")

EXPORT_DESCRIPTION = textwrap.dedent("""\
    Export a trained backbone (RUN/model.pt) to ONNX: input `input` N x 3 x 112 x 112 float32 RGB, output
    `embedding` N x D (raw, unnormalised; L2-normalise before comparing). The input must be normalised as in
    training: (x/255 - 0.5)/0.5, which is the (x - 127.5)/127.5 that insightface/ArcFace ONNX consumers feed,
    so the file drops into tools expecting an insightface recognition model (note: RGB channel order).""")


def register(subparsers: Any) -> None:
    """Add ``train`` and ``export`` to an argparse subparsers object (``func`` defaults are the handlers)."""
    p = subparsers.add_parser("train", help="train IResNet + AdaFace/ArcFace/CosFace on a face dataset",
                              description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", type=Path, metavar="CONFIG",
                   help="experiment YAML; its `train:` section sets the defaults (flags override it)")
    p.add_argument("-o", "--output", dest="run", type=Path, required=True, metavar="RUN",
                   help="run folder (created; resumed when it holds checkpoint.pt)")
    p.add_argument("--data", type=Path, metavar="PATH",
                   help="training set: folder-per-identity tree, a `generate` output, or a RecordIO folder")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs (paper: 30)")
    p.add_argument("--batch-size", type=int, metavar="N", help="global batch size across all processes (paper: 256)")
    p.add_argument("--lr", type=float, metavar="F", help="peak learning rate (paper: 0.1 for batch 256)")
    p.add_argument("--backbone", choices=["r18", "r34", "r50", "r100"], help="IResNet depth (paper: r50)")
    p.add_argument("--head", choices=["adaface", "arcface", "cosface"], help="margin head (paper: adaface)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (default fp32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    p.add_argument("--workers", type=int, metavar="N", help="DataLoader worker processes (train.data.workers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train setting by dotted key, e.g. --set train.warmup_epochs=1 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start afresh")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in RUN even if its checkpoint was made with different settings")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop after N >= 1 steps in total (a trial run; resumable)")
    p.add_argument("--verify", action="append", type=Path, metavar="BIN",
                   help="insightface verification .bin scored during training, named by its stem (repeatable; "
                   "train.verify_sets)")
    p.add_argument("--verify-every", type=int, metavar="N",
                   help="steps between verifications (train.verify_every; default: at each epoch end)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("export", help="export a trained backbone to ONNX", description=EXPORT_DESCRIPTION,
                              epilog="example:\n  digi2real export runs/d2r20k --onnx -o d2r20k_r50.onnx",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run", type=Path, metavar="RUN", help="training run folder holding model.pt")
    e.add_argument("--onnx", action="store_true", required=True, help="export to ONNX (the only format for now)")
    e.add_argument("-o", "--output", type=Path, metavar="FILE", help="output .onnx (default RUN/model.onnx)")
    e.set_defaults(func=run_export)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted overrides of the `train` section from --set, then the explicit flags (flags win)."""
    from digi2real.config import parse_override

    out: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        keys, value = parse_override(item)
        if keys and keys[0] == "train":
            keys = keys[1:]
        out[".".join(keys)] = value
    flags = {"data.path": getattr(args, "data", None), "epochs": args.epochs, "batch_size": args.batch_size,
             "lr": args.lr, "backbone": args.backbone, "head": args.head, "precision": args.precision,
             "device": args.device, "data.workers": getattr(args, "workers", None),
             "verify_every": getattr(args, "verify_every", None)}
    out.update({k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items() if v is not None})
    if getattr(args, "verify", None):
        out["verify_sets"] = [str(v) for v in args.verify]
    return out


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``digi2real train``."""
    from digi2real.config import TrainConfig, load_section
    from digi2real.errors import ConfigError

    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps {args.max_steps}: give at least 1 step (or leave it out to train to the end)")
    cfg = load_section(TrainConfig, args.config, "train", train_overrides(args))
    if cfg.data.path is None:
        raise ConfigError("no training data: pass --data PATH or set train.data.path in the config")
    from digi2real.dataset.imagefolder import open_training_set
    from digi2real.training.loop import check_run_folder, train

    check_run_folder(args.run, cfg)  # before the dataset is opened (a large one takes a while)
    dataset = open_training_set(cfg.data, cfg.seed)
    summary = train(cfg, dataset, args.run, progress=not args.quiet, resume=not args.no_resume,
                    max_steps=args.max_steps, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the main process alone reports
        print(json.dumps(summary.to_dict(), indent=2))
    return 0


def _export_target(args: argparse.Namespace, model_path: Path) -> Path:
    """The ONNX file to write: ``-o`` or RUN/model.onnx. Refused: a name not ending in .onnx (so no run file, such
    as model.pt or checkpoint.pt, is ever overwritten by an export), a folder, or the model file itself."""
    from digi2real.errors import ConfigError
    from digi2real.fileio import check_apart

    out: Path = args.output or (model_path.parent / "model.onnx")
    if out.is_dir():
        raise ConfigError(f"-o {out}: a folder is there; give a file name, e.g. -o {out / 'model.onnx'}")
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"-o {out}: an ONNX file name ends in .onnx (nothing is overwritten but an earlier "
                          "export); e.g. -o model.onnx")
    check_apart(out, [model_path])
    return out


def load_backbone_file(model_path: Path) -> Any:
    """The IResNet of a ``model.pt`` (a state dict in insightface's key names), loaded with ``weights_only=True`` (a
    pickle that would run code is refused, never executed); a one-line :class:`ModelError` for anything else."""
    import warnings

    import torch

    from digi2real.errors import Digi2RealError, ModelError
    from digi2real.evaluation.models import infer_iresnet  # one place knows how to read the layout
    from digi2real.training.iresnet import IResNet
    from digi2real.training.checkpoint import describe_load_error

    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged or hostile file
        raise ModelError(f"{model_path}: not a readable model file ({describe_load_error(exc)}); train again or take "
                         "model.pt from an intact copy of the run") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelError(f"{model_path}: not a state dict of named tensors (as `digi2real train` writes); give a "
                         "run's model.pt")
    try:
        with warnings.catch_warnings():  # a zero-width layer warns on stderr before the shapes are checked
            warnings.simplefilter("ignore")
            net = IResNet(**infer_iresnet(state, model_path))
            net.load_state_dict(state)
    except Digi2RealError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()[:160]
        raise ModelError(f"{model_path}: its tensors do not form the IResNet its keys describe ({last}); give a "
                         "run's model.pt") from None
    return net


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``digi2real export``: RUN/model.pt -> ONNX via :func:`digi2real.miniature.export_face_encoder`."""
    from digi2real.errors import ModelError
    from digi2real.miniature import export_face_encoder

    model_path = args.run / "model.pt" if args.run.is_dir() else args.run
    if not model_path.is_file():
        raise ModelError(f"{model_path}: no model.pt; train first (`digi2real train ... -o {args.run}`) or let the "
                         "run finish")
    out = _export_target(args, model_path)
    net = load_backbone_file(model_path)
    export_face_encoder(net.eval(), out)
    print(f"wrote {out} (input N x 3 x 112 x 112 RGB normalised (x/255-0.5)/0.5; output raw embeddings)")
    return 0
