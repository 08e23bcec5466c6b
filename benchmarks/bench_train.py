"""Training step time by memory layout: NCHW (baseline) vs channels_last, fp32, on this machine (issue 11).

One SGD step as the loop runs it (forward, margin-head loss, backward, gradient clip, update) on random 112 x 112
images, for:

* ``r50``: the paper's IResNet50 + AdaFace, 512-d, 2,000 classes (section 4; FACTS 6), batch 64 by default;
* ``mini8``: the tests' miniature, widths (8, 8, 16, 16), one block per stage, stem stride 2, 32-d: its 8 -> 16
  channel 1x1 stride-2 downsample is the convolution whose channels_last CPU backward corrupts memory in torch
  2.11-2.13;
* ``mini16``: a miniature with widths (16, 32, 64, 128) (the suite's learning test), which does not hit that bug.

Every measurement runs in its own subprocess (``--worker``), so a native crash in channels_last is reported
("crashed (SIGSEGV)") instead of ending the benchmark; the two layouts of a net alternate (NCHW, channels_last, NCHW,
...) so both see the same machine load. Prints a table (channels_last as a ratio of the NCHW baseline's time) and
writes ``benchmarks/results/train_layout.json`` with the CPU model and flags.

    .venv/bin/python benchmarks/bench_train.py [--nets r50,mini8,mini16] [--batch 64] [--repeats 1]

``--data-loading`` instead measures the DataLoader alone (images/s, RecordIO and image folder, no model) and writes
``benchmarks/results/train.json``'s ``data_loading_images_per_s``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
LAYOUTS = ("nchw", "channels_last")
#: net -> (TrainConfig fields, classes, timed steps, warm-up steps): r50 steps take tens of seconds on 2 CPU cores.
NETS: dict[str, tuple[dict[str, Any], int, int, int]] = {
    "r50": ({}, 2000, 2, 1),
    "mini8": ({"widths": (8, 8, 16, 16), "depths": (1, 1, 1, 1), "stem_stride": 2, "embedding_dim": 32}, 100, 10, 2),
    "mini16": ({"widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "stem_stride": 2, "embedding_dim": 512}, 100,
               10, 2),
}


# ------------------------------------------------------------------------------------------------ one measurement
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds per step of one net in one layout (runs inside the subprocess)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from digi2real.config import TrainConfig
    from digi2real.training.data import normalize
    from digi2real.training.loop import build_backbone_from, build_head_from, param_groups

    fields, classes, steps, warmup = NETS[spec["net"]]
    steps, warmup = spec.get("steps") or steps, spec.get("warmup", warmup)
    torch.manual_seed(0)
    cfg = TrainConfig(**fields)
    net = torch.nn.ModuleDict({"b": build_backbone_from(cfg), "h": build_head_from(cfg, classes)})
    channels_last = spec["layout"] == "channels_last"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(net, 5e-4, True), lr=0.01, momentum=0.9)
    images = torch.randint(0, 256, (spec["batch"], 112, 112, 3), dtype=torch.uint8)
    labels = torch.randint(0, classes, (spec["batch"],))
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        x = normalize(images)  # a channels_last view, as the loader's batches are
        x = x if channels_last else x.contiguous()
        loss = F.cross_entropy(net["h"](net["b"](x), labels).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"s_per_step": float(np.median(times)), "steps": steps, "warmup": warmup, "loss": float(loss),
            "threads": torch.get_num_threads()}


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter; a crash or a hang is a result, not an exception."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": f"no result within {timeout:.0f} s"}
    if proc.returncode < 0:
        return {"outcome": f"crashed ({signal.Signals(-proc.returncode).name})"}
    if proc.returncode != 0:
        return {"outcome": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    return {"outcome": "ran", **json.loads(proc.stdout.strip().splitlines()[-1])}


# ------------------------------------------------------------------------------------------------------ machine
def machine() -> dict[str, Any]:
    """CPU model and the instruction-set flags that decide oneDNN's kernels, torch and oneDNN versions."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "machine": platform.machine()}
    onednn = re.search(r"(?:oneDNN|MKL-DNN) v([\d.]+)", torch.__config__.show())
    info["onednn"] = onednn[1] if onednn else None
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    info["cpu_model"] = fields.get("Model name", platform.processor()).strip()
    info["cpus"] = fields.get("CPU(s)", "").strip()
    info["flags"] = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return info


# --------------------------------------------------------------------------------------------------- data loading
def data_loading(batch: int, images: int, workers: int) -> dict[str, float]:
    """Images/s through the training DataLoader (flip, uint8 collate), no model: RecordIO and an image folder."""
    from PIL import Image

    from digi2real.config import DataConfig
    from digi2real.dataset.imagefolder import open_training_set
    from digi2real.dataset.recordio import InsightFaceRecordDataset, write_insightface_rec
    from digi2real.sources.procedural import write_procedural_tree
    from digi2real.training.data import make_loader

    def rate(dataset: Any, w: int) -> float:
        t, n = time.perf_counter(), 0
        for batch_images, _ in make_loader(dataset, global_batch=batch, seed=0, epoch=0, workers=w):
            n += len(batch_images)
        return n / (time.perf_counter() - t)

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids, per = images // 10, 10
        tree = write_procedural_tree(Path(tmp) / "tree", ids, per, seed=0)

        def samples():
            for i in range(ids):
                for k in range(per):
                    buf = io.BytesIO()
                    Image.open(tree / str(i) / f"{k}.png").convert("RGB").save(buf, format="JPEG", quality=95)
                    yield buf.getvalue(), i

        write_insightface_rec(Path(tmp) / "rec", samples(), ids)
        sets = {"recordio": InsightFaceRecordDataset(Path(tmp) / "rec"),
                "image_folder": open_training_set(DataConfig(path=tree), 0)}
        for name, dataset in sets.items():
            for w in sorted({0, workers}):
                out[f"{name}_workers{w}"] = rate(dataset, w)
                print(f"data loading {name:12s} workers={w}: {out[f'{name}_workers{w}']:8.0f} img/s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------- main
def layout_table(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for net in args.nets.split(","):
        runs: dict[str, list[dict[str, Any]]] = {layout: [] for layout in LAYOUTS}
        for _ in range(args.repeats):
            for layout in LAYOUTS:  # alternating, so both layouts see the same load on a shared machine
                spec = {"net": net, "layout": layout, "batch": args.batch, "steps": args.steps}
                r = measure(spec, args.timeout)
                runs[layout].append(r)
                shown = f"{r['s_per_step']:.3f} s/step" if r["outcome"] == "ran" else r["outcome"]
                print(f"{net:7s} {layout:14s} batch {args.batch}: {shown}", flush=True)
        row: dict[str, Any] = {"batch": args.batch, "runs": runs}
        for layout in LAYOUTS:
            times = [r["s_per_step"] for r in runs[layout] if r["outcome"] == "ran"]
            row[layout] = statistics.median(times) if times else None
            row[f"{layout}_outcome"] = "ran" if len(times) == args.repeats else \
                next(r["outcome"] for r in runs[layout] if r["outcome"] != "ran")
        if row["nchw"] and row["channels_last"]:
            row["channels_last_speedup_vs_nchw"] = row["nchw"] / row["channels_last"]
        rows[net] = row
    return rows


def print_table(rows: dict[str, Any], info: dict[str, Any]) -> None:
    print(f"\n{info['cpu_model']} ({info['cpus']} CPUs; {' '.join(info['flags'])}); torch {info['torch']}, "
          f"oneDNN {info['onednn']}\n")
    print("| net | batch | NCHW s/step (baseline) | channels_last s/step | channels_last vs NCHW |")
    print("|---|---:|---:|---:|---:|")
    for net, r in rows.items():
        cl = f"{r['channels_last']:.3f}" if r["channels_last"] else r["channels_last_outcome"]
        nchw = f"{r['nchw']:.3f}" if r["nchw"] else r["nchw_outcome"]
        ratio = f"{r['channels_last_speedup_vs_nchw']:.2f}x" if "channels_last_speedup_vs_nchw" in r else "-"
        print(f"| {net} | {r['batch']} | {nchw} | {cl} | {ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="r50,mini8,mini16", help="comma-separated: " + ", ".join(NETS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=0, help="timed steps per measurement (0: the net's default)")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per layout, alternating")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a measurement counts as hung")
    ap.add_argument("--data-loading", action="store_true", help="measure the DataLoader alone instead")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    info = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.data_loading:
        path = RESULTS / "train.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}
        previous["data_loading_images_per_s"] = data_loading(args.batch, args.images, args.workers)
        previous["data_loading_machine"] = info
        path.write_text(json.dumps(previous, indent=2) + "\n")
        print(f"wrote {path}")
        return
    t0 = time.time()
    rows = layout_table(args)
    print_table(rows, info)
    path = RESULTS / "train_layout.json"
    path.write_text(json.dumps({"what": "fp32 training step, NCHW (baseline) vs channels_last, each in its own "
                                "subprocess", "machine": info, "nets": rows, "seconds": time.time() - t0},
                               indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
