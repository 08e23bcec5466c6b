"""Device check of the identity check on the GPU (issue 12, item 3): what the CPU tests cannot show, in about a minute.

On a real-size IResNet100 ArcFace ONNX with random, well-scaled weights (as tests/test_onnx_torch.py builds it: the
bench_embed network with its initial weights overflows to NaN, which would leave nothing to compare):

* where ``ArcFaceEncoder.load`` puts the encoder with ``encoder.provider: auto`` (and the load time);
* agreement with onnxruntime on the CPU over ``--images`` faces: max |difference| of the L2-normalised embeddings,
  for the route chosen and, for the torch route, with the TF32 split turned off (what cuDNN's TF32 default alone does);
* throughput (images/s, batch ``--batch``, after a warm-up) of the chosen route, of the torch route without the split,
  and of onnxruntime on the CPU for scale;
* the same embeddings when two threads call the encoder at once.

    python3 benchmarks/check_arcface_cuda.py [--images 256] [--batch 64] [--json PATH] [--quick] [--route torch]

``--quick`` uses a small IResNet18 and 16 images on whatever device is there; with ``--route torch`` on a machine
without a GPU it is a CPU smoke run of every part of the script.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from digi2real.config import EncoderConfig
from digi2real.faces.arcface import ArcFaceEncoder
from digi2real.miniature import build_scaled_iresnet




def rate(encoder: ArcFaceEncoder, faces: np.ndarray, repeats: int = 3) -> float:
    encoder(faces[: encoder.batch_size])  # warm-up: cuDNN's algorithm choice, allocations
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        encoder(faces)
        best = min(best, time.perf_counter() - t)
    return len(faces) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--route", choices=["auto", "torch"], default="auto",
                    help="torch: force the converted graph (on the CPU where there is no GPU)")
    args = ap.parse_args()
    images = 16 if args.quick else args.images
    result: dict = {"check": "arcface_cuda", "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
        result["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32

    with tempfile.TemporaryDirectory() as tmp:
        arch, kw = ("r18", {"widths": (16, 32, 64, 128)}) if args.quick else ("r100", {})
        t = time.perf_counter()
        path = build_scaled_iresnet(arch, Path(tmp) / f"{arch}.onnx", **kw)
        result.update(arch=arch, export_s=round(time.perf_counter() - t, 1))
        faces = np.random.default_rng(0).integers(0, 256, size=(images, 112, 112, 3), dtype=np.uint8)

        cfg = EncoderConfig(model=str(path), batch_size=args.batch)
        t = time.perf_counter()
        chosen = ArcFaceEncoder.load(cfg, route=None if args.route == "auto" else "torch")
        result.update(where=chosen.where, provider=chosen.provider, load_s=round(time.perf_counter() - t, 2))
        cpu = ArcFaceEncoder.load(cfg.model_copy(update={"provider": "cpu"}))
        want = cpu(faces)
        result["max_abs_diff_vs_cpu"] = float(np.abs(chosen(faces) - want).max())
        result["img_per_s"] = {"chosen": round(rate(chosen, faces), 1), "onnxruntime_cpu": round(rate(cpu, faces, 1), 1)}

        if chosen.provider == "torch" and getattr(chosen.backend, "graph", None) is not None:
            graph = chosen.backend.graph
            split = graph.exact_fp32
            graph.exact_fp32 = False  # the plain float32 graph, as cuDNN's TF32 default computes it
            result["without_tf32_split"] = {"max_abs_diff_vs_cpu": float(np.abs(chosen(faces) - want).max()),
                                            "img_per_s": round(rate(chosen, faces), 1)}
            graph.exact_fp32 = split

        serial = [chosen(faces[i::2]) for i in range(2)]
        parallel: dict[int, np.ndarray] = {}
        threads = [threading.Thread(target=lambda i=i: parallel.__setitem__(i, chosen(faces[i::2]))) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        result["threads_equal_serial"] = all(np.array_equal(parallel[i], serial[i]) for i in range(2))

    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
