"""MTCNN detection + alignment speed on 512 x 512 images: our single-image path (the baseline) against our batched
path (batch 8 and 32), side by side in one process, plus peak memory at batch 32.

Images: 32 variants of scikit-image's astronaut (rotated, shifted, scaled, flipped, brightness changed; seed 0), so
every image yields different candidates. Each mode runs `detect_and_align` (detect, pick, align to 112 x 112) over all
32 images: single = one call per image; batched = one call per chunk of B with `DetectorConfig.batch_size = B`.
Rounds alternate the modes, so a busy machine slows all of them alike; the best round and the median are reported.
Peak RSS is measured in a fresh subprocess per mode (VmHWM) together with the RSS after loading the detector.

Reference (quoted from the issue, measured on this machine type with facenet-pytorch 2.6.0's MTCNN): 58 ms per image
single, 67 ms per image in a batch of 8. Targets: single <= 55 ms/img; batched no slower per image than single.

    python benchmarks/bench_mtcnn.py [--rounds 5] [--images 32] [--device cpu]

Prints a table and writes benchmarks/results/mtcnn.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REFERENCE = {"facenet_pytorch_single_ms": 58.0, "facenet_pytorch_batch8_ms": 67.0,
             "source": "issue 3, facenet-pytorch 2.6.0 MTCNN measured on this machine type"}
TARGET_SINGLE_MS = 55.0


def make_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` 512 x 512 variants of the astronaut photo (one face each, different pose in the frame)."""
    import skimage.data
    from PIL import Image, ImageEnhance

    base = Image.fromarray(skimage.data.astronaut())
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else base
        angle = float(rng.uniform(-20, 20))
        scale = float(rng.uniform(0.8, 1.2))
        dx, dy = (float(v) for v in rng.uniform(-40, 40, 2))
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy))
        side = int(512 * scale)
        img = img.resize((side, side), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (512, 512))
        canvas.paste(img, ((512 - side) // 2, (512 - side) // 2))
        canvas = ImageEnhance.Brightness(canvas).enhance(float(rng.uniform(0.7, 1.3)))
        out.append(np.asarray(canvas))
    return out


def run_mode(detector, cfg, images: list[np.ndarray], batch: int, workers: int | None = None) -> tuple[float, int]:
    """Seconds to detect and align all images in chunks of ``batch`` (1 = the single-image path); faces found.

    ``workers``: the detector's CPU worker threads (None: torch's thread count, the default; 1: plain torch
    intra-op threading, as facenet-pytorch runs).
    """
    from digi2real.faces.detect import detect_and_align

    detector.batch_size = batch
    detector.cpu_workers = workers
    found = 0
    t = time.perf_counter()
    for start in range(0, len(images), batch):
        found += sum(r.ok for r in detect_and_align(images[start:start + batch], detector, cfg))
    return time.perf_counter() - t, found


def _memory_child(batch: int, images: int, device: str, workers: int | None) -> None:
    from digi2real.config import AlignConfig
    from digi2real.faces.mtcnn import MTCNN

    imgs = make_images(images)
    cfg = AlignConfig()
    det = MTCNN.from_package(cfg.detector, device=device)
    run_mode(det, cfg, imgs[:1], 1, workers)  # load everything once
    before = _status_mb("VmRSS")
    run_mode(det, cfg, imgs, batch, workers)
    print(json.dumps({"rss_after_load_mb": before, "peak_rss_mb": _status_mb("VmHWM")}))


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc; ru_maxrss would include the parent's size at fork."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory(batch: int, images: int, device: str, workers: int | None) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", str(batch), "--images", str(images), "--device", device]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of every mode")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes to time; 1 is the single-image baseline")
    ap.add_argument("--no-plain", action="store_true",
                    help="skip the extra single-image row with plain torch threading (cpu_workers=1)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mtcnn.json")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        _memory_child(args.memory_child, args.images, args.device, args.workers)
        return

    import torch

    from digi2real.config import AlignConfig
    from digi2real.faces.mtcnn import MTCNN

    images = make_images(args.images)
    cfg = AlignConfig()
    det = MTCNN.from_package(cfg.detector, device=args.device)
    # (name, batch, cpu workers); the first is the baseline the others are compared with
    modes = [("single" if b == 1 else f"batch {b}", b, None) for b in (int(v) for v in args.batches.split(","))]
    if args.device == "cpu" and not args.no_plain:
        modes.append(("single, plain threads", 1, 1))
    for _, b, wk in modes:  # warm-up: first calls allocate and build kernels
        run_mode(det, cfg, images[: max(b, 2)], b, wk)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {m[0]: [] for m in modes}
    found: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, b, wk in modes:
            sec, found[name] = run_mode(det, cfg, images, b, wk)
            times[name].append(sec * 1000.0 / len(images))
    load_after = os.getloadavg()
    memory = {name: peak_memory(b, args.images, args.device, wk) for name, b, wk in modes}

    base = min(times[modes[0][0]])
    rows = []
    for name, b, wk in modes:
        best, med = min(times[name]), float(np.median(times[name]))
        rows.append({
            "mode": name, "batch": b, "cpu_workers": wk if wk is not None else "default",
            "ms_per_image_best": round(best, 2), "ms_per_image_median": round(med, 2),
            "images_per_s_best": round(1000.0 / best, 2), "speedup_vs_single": round(base / best, 3),
            "faces_found": found[name], "images": len(images),
            "peak_rss_mb": round(memory[name]["peak_rss_mb"], 1),
            "rss_after_load_mb": round(memory[name]["rss_after_load_mb"], 1),
        })
    batched = [r for r in rows if r["batch"] > 1]
    result = {
        "benchmark": "mtcnn detect+align, 512x512 astronaut variants",
        "device": args.device, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in load_after],
        "rounds": args.rounds, "rows": rows,
        "reference": REFERENCE, "target_single_ms": TARGET_SINGLE_MS,
        "single_meets_target": bool(base <= TARGET_SINGLE_MS),
        "batched_not_slower": bool(all(r["ms_per_image_best"] <= base for r in batched)),
    }
    print(f"MTCNN detect + align, {len(images)} images 512x512, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load avg {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'mode':<22} {'ms/img best':>11} {'median':>7} {'img/s':>6} {'vs single':>9} {'faces':>6} "
          f"{'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['mode']:<22} {r['ms_per_image_best']:>11.1f} {r['ms_per_image_median']:>7.1f} "
              f"{r['images_per_s_best']:>6.1f} {r['speedup_vs_single']:>8.2f}x {r['faces_found']:>3}/{r['images']:<2} "
              f"{r['peak_rss_mb']:>11.0f}")
    print(f"reference (quoted, facenet-pytorch 2.6.0 on this machine type): single {REFERENCE['facenet_pytorch_single_ms']}"
          f" ms/img, batch 8 {REFERENCE['facenet_pytorch_batch8_ms']} ms/img; target single <= {TARGET_SINGLE_MS} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
