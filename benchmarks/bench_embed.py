"""Embedding throughput: our `embed` stage end to end against the bare onnxruntime session, side by side.

A real-size IResNet100 with random weights (compute does not depend on weight values) is exported to ONNX. The
baseline runs the bare InferenceSession on tensors decoded and preprocessed beforehand; ours runs `embed_source` on a
folder of 112 x 112 PNGs (listing + decoding + preprocessing + the same session + writing the artifact). Target:
ours >= 80% of the baseline rate. Prints a table and writes benchmarks/results/embed.json.

    python benchmarks/bench_embed.py [--images 256] [--batch 64] [--arch r100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from digi2real.config import EmbedConfig, EncoderConfig
from digi2real.faces.arcface import ArcFaceEncoder
from digi2real.identity.embed import embed_source
from digi2real.miniature import export_face_encoder
from digi2real.sources.folder import FolderSource
from digi2real.sources.procedural import write_procedural_tree
from digi2real.training.iresnet import build_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--arch", default="r100")
    ap.add_argument("--repeats", type=int, default=2, help="alternating baseline/ours rounds; the best of each counts")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "embed.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = export_face_encoder(build_backbone(args.arch).eval(), tmp / f"{args.arch}.onnx")
        print(f"exported random {args.arch} to ONNX ({model.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
        ids = max(1, args.images // 8)
        write_procedural_tree(tmp / "src", ids, 8, seed=0)
        encoder = ArcFaceEncoder.load(EncoderConfig(model=str(model), batch_size=args.batch, provider="cpu"))

        source = FolderSource(tmp / "src")
        items = source.list_items(None)[: args.images]
        pre = [encoder.preprocess(np.stack([source.load(i) for i in items[s : s + args.batch]]))
               for s in range(0, len(items), args.batch)]
        encoder.run(pre[0])  # warm-up: first-run allocations are not throughput

        base_rates, our_rates = [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            for x in pre:
                encoder.run(x)
            base_rates.append(len(items) / (time.perf_counter() - t))

            out = tmp / f"emb{r}"
            t = time.perf_counter()
            summary = embed_source(FolderSource(tmp / "src"), encoder, out, EmbedConfig(images_per_identity=None,
                                   chunk_size=2048, workers=2), progress=False)
            our_rates.append(summary.embedded / (time.perf_counter() - t))

    base, ours = max(base_rates), max(our_rates)
    result = {
        "benchmark": "embed",
        "arch": args.arch,
        "batch": args.batch,
        "images": len(items),
        "baseline_bare_session_img_per_s": round(base, 2),
        "ours_end_to_end_img_per_s": round(ours, 2),
        "ratio": round(ours / base, 3),
        "target_ratio": 0.8,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    print(f"\n{'':32s}{'img/s':>10s}{'ratio':>8s}")
    print(f"{'bare onnxruntime (baseline)':32s}{base:10.2f}{1.0:8.2f}")
    print(f"{'digi2real embed, end to end':32s}{ours:10.2f}{ours / base:8.2f}")
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
