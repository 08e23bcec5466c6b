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

``--windows`` (issue 12) instead runs ``digi2real train`` itself (a subprocess per run) on a procedural image folder
for a few short epochs with ``log_every`` 10 and reads images/s of every logged window from ``train_log.jsonl``: the
windows that follow an epoch boundary show any stall there (before issue 12 the DataLoader and its workers were built
anew each epoch). ``--baseline-rev REV`` runs the same command with the project's ``src`` of git revision REV too,
alternating, side by side. Prints a table and writes ``benchmarks/results/train_windows.json``:

    .venv/bin/python benchmarks/bench_train.py --windows --baseline-rev 43501f2 [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
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


# ------------------------------------------------------------------------------------------- windows (issue 12)
#: The net of the windows run: the suite's learning-test miniature (widths >= 16 train safely on any CPU).
WINDOW_NET = ["--set", "train.widths=[16,32,64,128]", "--set", "train.depths=[1,1,1,1]", "--set",
              "train.stem_stride=2", "--set", "train.embedding_dim=64", "--head", "cosface", "--set", "train.scale=32"]


def source_tree(rev: str, into: Path) -> Path:
    """The project's ``src`` folder as of git revision ``rev`` (``git archive``; the checkout is not touched)."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def windows_run(src: Path, tree: Path, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One ``digi2real train`` (the code in ``src``) into ``run``: its logged windows and wall time."""
    cmd = [sys.executable, "-m", "digi2real.cli", "train", "-o", str(run), "--data", str(tree), "--device", "cpu",
           "--epochs", str(args.epochs), "--batch-size", str(args.batch), "--workers", str(args.workers), "-q",
           "--set", "train.log_every=10", *WINDOW_NET]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"outcome": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    start = log[0]
    windows, previous, boundary = [], start["step"], False
    for r in (r for r in log if r["event"] == "train"):
        windows.append({"steps": [previous + 1, r["step"]], "images_per_s": r["images_per_s"],
                        "after_epoch_boundary": boundary, "first": previous == start["step"]})
        previous, boundary = r["step"], r["epoch_end"]
    summary = json.loads(proc.stdout)  # the command's summary: images/s over all its steps
    return {"outcome": "ran", "wall_s": wall, "run_images_per_s": summary["images_per_second"], "windows": windows,
            "steps_per_epoch": start["steps_per_epoch"]}


def window_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Steady rate (median of the windows neither first nor after an epoch boundary) and the slowest window as a
    share of it, first window (start-up: workers, first batches) left out."""
    ws = [w for w in result["windows"] if not w["first"]]
    steady = statistics.median(w["images_per_s"] for w in ws if not w["after_epoch_boundary"])
    boundary = [w["images_per_s"] for w in ws if w["after_epoch_boundary"]]
    return {"steady_images_per_s": steady, "slowest_window_vs_steady": min(w["images_per_s"] for w in ws) / steady,
            "after_boundary_vs_steady": [b / steady for b in boundary]}


def windows_bench(args: argparse.Namespace) -> dict[str, Any]:
    from digi2real.sources.procedural import write_procedural_tree

    here = Path(__file__).resolve().parents[1] / "src"
    with tempfile.TemporaryDirectory() as tmp:
        tree = write_procedural_tree(Path(tmp) / "faces", args.identities, args.per_identity, seed=0)
        versions = {"after": here}
        if args.baseline_rev:
            (Path(tmp) / "base").mkdir()
            versions = {"before": source_tree(args.baseline_rev, Path(tmp) / "base"), "after": here}
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in versions}
        for i in range(args.repeats):
            for name, src in versions.items():  # alternating, so both see the same machine load
                r = windows_run(src, tree, Path(tmp) / f"{name}{i}", args)
                if r["outcome"] == "ran":
                    r.update(window_summary(r))
                runs[name].append(r)
                print(f"{name:6s} run {i + 1}: " + (f"steady {r['steady_images_per_s']:.0f} img/s, slowest window "
                      f"{r['slowest_window_vs_steady']:.0%} of it, whole run {r['run_images_per_s']:.0f} img/s, "
                      f"wall {r['wall_s']:.1f} s"
                      if r["outcome"] == "ran" else r["outcome"]), flush=True)
    return {"versions": {k: str(v) for k, v in versions.items()}, "baseline_rev": args.baseline_rev, "runs": runs,
            "images": args.identities * args.per_identity, "batch": args.batch, "epochs": args.epochs,
            "workers": args.workers, "threads": args.threads}


def print_windows(result: dict[str, Any]) -> None:
    """Every window of the last run of each version, side by side (images/s and share of that run's steady rate)."""
    last = {name: runs[-1] for name, runs in result["runs"].items() if runs[-1]["outcome"] == "ran"}
    names = list(last)
    print("\n| steps | after an epoch boundary | " + " | ".join(f"{n} img/s (vs steady)" for n in names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for i, w in enumerate(next(iter(last.values()))["windows"]):
        cells = [f"{last[n]['windows'][i]['images_per_s']:.0f} "
                 f"({last[n]['windows'][i]['images_per_s'] / last[n]['steady_images_per_s']:.0%})" for n in names]
        label = "first (start-up)" if w["first"] else ("yes" if w["after_epoch_boundary"] else "")
        print(f"| {w['steps'][0]}-{w['steps'][1]} | {label} | " + " | ".join(cells) + " |")
    for name, runs in result["runs"].items():
        ok = [r for r in runs if r["outcome"] == "ran"]
        print(f"{name}: steady " + ", ".join(f"{r['steady_images_per_s']:.0f}" for r in ok) + " img/s; slowest "
              "window " + ", ".join(f"{r['slowest_window_vs_steady']:.0%}" for r in ok) + " of steady; whole run "
              + ", ".join(f"{r['run_images_per_s']:.0f}" for r in ok) + " img/s; wall "
              + ", ".join(f"{r['wall_s']:.1f}" for r in ok) + " s")


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
    ap.add_argument("--batch", type=int, help="batch size (default 64; --windows: 24, so that 600 images make 25 "
                    "steps an epoch and boundaries fall inside the 10-step windows)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per measurement (0: the net's default)")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per layout, alternating")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a measurement counts as hung")
    ap.add_argument("--data-loading", action="store_true", help="measure the DataLoader alone instead")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--windows", action="store_true", help="images/s of every 10-step window of `digi2real train`")
    ap.add_argument("--baseline-rev", help="--windows: also run the src of this git revision, side by side")
    ap.add_argument("--epochs", type=int, default=4, help="--windows: epochs")
    ap.add_argument("--threads", type=int, default=1, help="--windows: torch threads of the training process (on "
                    "this shared 2-core VM, 2 threads ran 5x slower than 1 when other processes were busy)")
    ap.add_argument("--identities", type=int, default=60, help="--windows: procedural identities")
    ap.add_argument("--per-identity", type=int, default=10, help="--windows: images per identity")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    info = machine()
    args.batch = args.batch or (24 if args.windows else 64)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.windows:
        result = windows_bench(args)
        print_windows(result)
        path = RESULTS / "train_windows.json"
        path.write_text(json.dumps({"what": "images/s of every logged window (log_every 10) of `digi2real train` "
                                    "on the CPU", "machine": info, **result}, indent=2) + "\n")
        print(f"wrote {path}")
        return
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
