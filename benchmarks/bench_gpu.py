"""The recipe at GPU scale, side by side in one run (issue 12): generation the official way vs our whole `generate`
stage, the stage's parts alone, and training images/s window by window.

Real-size architectures with random weights (compute does not depend on the weight values): the SD1.5 UNet and VAE and
a CLIP ViT-L ID encoder (``bench_generate.build_model``), an IResNet100 ArcFace exported to ONNX with well-scaled random
weights (``miniature.build_scaled_iresnet``: finite, input-dependent embeddings), the packaged MTCNN, IResNet50 +
AdaFace for training.

* **official way** (the baseline): Arc2Face's demo as it runs, a diffusers ``StableDiffusionPipeline`` over the same
  modules in the same precision, one call per identity with ``num_images_per_prompt=4``, ``--steps`` steps, guidance 3,
  then MTCNN alignment of the four images;
* **ours, the whole stage**: ``generate`` end to end on a plan of ``--identities`` x 4 images (render, detect, align,
  the identity check by the ArcFace, PNG writes, manifest rows, card), through ``runner.prepare_job`` /
  ``generate_dataset`` with the engine's settings (batch ``auto`` or ``--batch``, compile, channels_last, workers); the
  model's warm-up (``Arc2Face.optimize``) is timed apart and not counted;
* **parts alone** at the stage's batch: the guided UNet steps, the VAE decode, the alignment, the identity check and the
  PNG encoding + write, per image; ``stage / (UNet + VAE)`` is the engine's overhead (target <= 1.10);
* **training**: ``loop.train`` on an in-memory set of random faces (IResNet50 + AdaFace, fp16 on CUDA, batch 256,
  ``log_every`` 10, several epochs so that boundaries fall inside the run): images/s of every 10-step window, the
  steady rate (median window) and the slowest window's share of it (target >= 90%).

Targets on one H200 (issue 12): stage >= 11 images/s at 25 steps and 512 px, >= 3x the official way, stage/(UNet+VAE)
<= 1.10; training >= 8,000 images/s steady, every window >= 90% of it. ``--quick`` runs tiny models on whatever device
is there (a CPU smoke run of every part, seconds to a minute): its figures are not the targets'.

    python3 benchmarks/bench_gpu.py [--identities 16] [--steps 25] [--size 512] [--batch auto] [--train-steps 30]
        [--train-epochs 6] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import build_model, clock, machine, official_pipeline, timed_render, with_dtype  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_gpu.json"
IMAGES_PER_IDENTITY = 4  # the official demo's num_images_per_prompt


# ------------------------------------------------------------------------------------------------------ inputs


def random_identities(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 512)).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def write_plan_inputs(root: Path, emb: np.ndarray, per_identity: int) -> Path:
    """An embeddings store of ``len(emb)`` identities (5 samples each, near their prototype) and the plan of
    ``per_identity`` images per identity, as `embed`, `select` and `plan` write them."""
    from digi2real.config import PlanConfig
    from digi2real.identity.plan import make_plan, write_plan
    from digi2real.identity.store import read_store, write_store

    rng = np.random.default_rng(1)
    rows = np.repeat(emb, 5, axis=0) + 0.1 * rng.standard_normal((len(emb) * 5, emb.shape[1])).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    names = [f"id{i:05d}" for i in range(len(emb))]
    idents = [n for n in names for _ in range(5)]
    write_store(root / "embeddings", rows, idents, [f"{n}/{k}.png" for n in names for k in range(5)],
                {"source": {"kind": "benchmark"}})
    plan = make_plan(read_store(root / "embeddings"), names,
                     PlanConfig(images_per_identity=per_identity, images_per_latent=min(5, per_identity)))
    write_plan(root / "plan.parquet", plan)
    return root / "plan.parquet"


# ------------------------------------------------------------------------------------------------------ generation


def official_way(pipe, model, emb: np.ndarray, steps: int, size: int, align) -> dict:
    """The demo's loop: one pipeline call per identity (4 images), then MTCNN on them."""
    gen = al = 0.0
    for i, e in enumerate(emb):
        t = clock(model.device)
        out = pipe(prompt_embeds=model.encode(e[None]), negative_prompt=None, num_inference_steps=steps,
                   guidance_scale=3.0, num_images_per_prompt=IMAGES_PER_IDENTITY, height=size, width=size,
                   generator=torch.Generator("cpu").manual_seed(1000 + i), output_type="np").images
        gen += clock(model.device) - t
        t = time.perf_counter()
        align([(np.asarray(img) * 255).round().astype(np.uint8) for img in out])
        al += time.perf_counter() - t
    n = len(emb) * IMAGES_PER_IDENTITY
    return {"images": n, "seconds": gen + al, "images_per_s": n / (gen + al), "generation_s": gen, "align_s": al}


def whole_stage(model, encoder, detector, plan_path: Path, out: Path, gen_cfg, align_cfg) -> dict:
    """`generate` end to end through the runner (render, align, identity check, writes, manifest, card)."""
    from digi2real.generation.runner import FaceChecker, generate_dataset, prepare_job

    checker = FaceChecker(detector, encoder, align_cfg)
    job, _ = prepare_job(plan_path, out, model=model, checker=checker, cfg=gen_cfg, align=align_cfg, shift=None,
                         shift_path=None, embeddings=None, encoder_hash="benchmark")
    batch = len(job.units[0])
    t = time.perf_counter()
    record = model.optimize(compile=gen_cfg.compile, channels_last=gen_cfg.channels_last, batch=batch,
                            size=gen_cfg.size, steps=gen_cfg.steps, guidance=gen_cfg.guidance) \
        if hasattr(model, "optimize") else {}
    warm = time.perf_counter() - t
    t = clock(model.device)
    summary = generate_dataset(job, out, progress=False)
    seconds = clock(model.device) - t
    n = len(job.plan)
    return {"images": n, "written": summary.written, "batch": batch, "seconds": seconds, "images_per_s": n / seconds,
            "warmup_s": warm, "optimize": record, "where": {"arc2face": getattr(model, "where", str(model.device)),
                                                            "arcface": getattr(encoder, "where", "?"),
                                                            "mtcnn": str(detector.device)}}


def parts_alone(model, encoder, emb: np.ndarray, batch: int, steps: int, size: int, align, tmp: Path) -> dict:
    """Seconds per image of each part of one batch of the stage, each on its own."""
    from digi2real.imageio import write_image

    e = emb[:batch]
    images, unet, vae = timed_render(model, e, list(range(len(e))), steps, size)
    t0 = time.perf_counter()
    faces = align(list(images))
    aligned = time.perf_counter() - t0
    crops = np.stack([f.crop if f.ok else np.zeros((112, 112, 3), np.uint8) for f in faces])
    t0 = time.perf_counter()
    encoder(crops)
    check = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, c in enumerate(crops):
        write_image(tmp / f"part-{i}.png", c)
    write = time.perf_counter() - t0
    n = len(e)
    return {"unet": unet / n, "vae_decode": vae / n, "align": aligned / n, "identity_check": check / n,
            "png_write": write / n}


# ------------------------------------------------------------------------------------------------------ training


class RandomFaces:
    """``n`` random 112 x 112 faces in memory, ``classes`` labels: data loading is not what is measured."""

    def __init__(self, n: int, classes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
        self.labels = rng.integers(0, classes, n).astype(np.int64)
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def training_windows(out: Path, quick: bool, steps_per_epoch: int, epochs: int, device: torch.device) -> dict:
    """``loop.train`` for ``epochs`` x ``steps_per_epoch`` steps; every 10-step window's images/s from its log."""
    from digi2real.config import TrainConfig
    from digi2real.training.loop import LOG, train

    cuda = device.type == "cuda"
    batch = 256 if not quick else 16
    kw = dict(backbone="r50", head="adaface", precision="fp16" if cuda else "fp32") if not quick else dict(
        backbone="r18", widths=(16, 16, 32, 32), depths=(1, 1, 1, 1), stem_stride=2, head="cosface", scale=32.0)
    cfg = TrainConfig(**kw, epochs=epochs, batch_size=batch, lr=0.01, log_every=10, device=device.type, seed=0)
    cfg.data.workers = 4 if cuda else 0
    data = RandomFaces(batch * steps_per_epoch, classes=1000 if not quick else 50)
    t = time.perf_counter()
    summary = train(cfg, data, out, progress=False)
    wall = time.perf_counter() - t
    events = [json.loads(x) for x in (out / LOG).read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    windows = [e for e in events if e["event"] == "train"]
    rates = [w["images_per_s"] for w in windows[1:]]  # the first window holds start-up (compile is timed apart)
    steady = statistics.median(rates) if rates else float("nan")
    worst = min(rates) if rates else float("nan")
    return {"steps": summary.steps_done, "batch": batch, "wall_s": wall, "compiled": start.get("compiled"),
            "compile_s": start.get("compile_s"), "layout": start.get("layout"),
            "windows_images_per_s": [round(r, 1) for r in rates],
            "epoch_boundary_windows": [i for i, w in enumerate(windows[1:]) if w.get("epoch_end")],
            "steady_images_per_s": steady, "slowest_window_share": worst / steady if rates else float("nan")}


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=16, help="identities per path (4 images each)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", default="auto", help="the stage's batch (auto: from free memory)")
    ap.add_argument("--workers", default="auto", help="the stage's finishing threads (auto: 2 on CUDA, 0 on the CPU)")
    ap.add_argument("--dtype", default=None, help="fp16 (CUDA default), bf16 or fp32 (CPU default)")
    ap.add_argument("--train-steps", type=int, default=30, help="training steps per epoch")
    ap.add_argument("--train-epochs", type=int, default=6)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: official, stage, parts, train")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="tiny models on any device: a smoke run of every part")
    args = ap.parse_args()

    from diffusers.utils import logging as dlogging

    from digi2real.config import AlignConfig, DetectorConfig, EncoderConfig, GateConfig, GenerateConfig
    from digi2real.faces.arcface import ArcFaceEncoder
    from digi2real.faces.detect import detect_and_align
    from digi2real.faces.mtcnn import MTCNN
    from digi2real.miniature import build_scaled_iresnet

    dlogging.set_verbosity_error()
    skip = {s for s in args.skip.split(",") if s}
    if args.quick:
        args.size, args.steps, args.identities = min(args.size, 128), min(args.steps, 2), min(args.identities, 2)
        args.train_steps, args.train_epochs = min(args.train_steps, 10), min(args.train_epochs, 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    result: dict = {"benchmark": "gpu", "machine": machine(), "device": str(device), "quick": args.quick,
                    "settings": {"identities": args.identities, "images_per_identity": IMAGES_PER_IDENTITY,
                                 "steps": args.steps, "size": args.size, "dtype": str(dtype).replace("torch.", ""),
                                 "batch": args.batch, "workers": args.workers}}
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu."))
    t0 = time.perf_counter()
    model = with_dtype(build_model(device, args.quick), dtype)
    onnx = build_scaled_iresnet("r18" if args.quick else "r100", tmp / "arcface.onnx",
                          **({"widths": (16, 16, 32, 32)} if args.quick else {}))
    encoder = ArcFaceEncoder.load(EncoderConfig(model=str(onnx), batch_size=64))
    # Random weights draw no faces. P-Net keeps its threshold (so as many candidates go on as in a real image; at 0
    # every window would, 10x the work) while R-Net and O-Net accept, and no image is retried: every image goes
    # through detection, alignment, the identity check and the write as a real face does (rejections would make the
    # stage cheaper per try and costlier per image than a real run).
    align_cfg = AlignConfig(detector=DetectorConfig(thresholds=(0.6, 0.0, 0.0)))
    detector = MTCNN.from_package(align_cfg.detector, device=device)
    print(f"models built on {device} in {time.perf_counter() - t0:.0f} s; ArcFace: {getattr(encoder, 'where', '?')}")

    def align(images: list[np.ndarray]) -> list:
        return detect_and_align(images, detector, align_cfg)

    emb = random_identities(args.identities)
    workers = args.workers if args.workers == "auto" else int(args.workers)
    gen_cfg = GenerateConfig(steps=args.steps, size=args.size, guidance=3.0, workers=workers,
                             gate=GateConfig(max_retries=0),
                             batch_size=args.batch if args.batch == "auto" else int(args.batch))
    if "official" not in skip:
        pipe = official_pipeline(model)
        official_way(pipe, model, emb[:1], 1, 64 if args.quick else args.size, align)  # warm-up, not counted
        result["official"] = official_way(pipe, model, emb, args.steps, args.size, align)
        print(f"official way: {result['official']['images_per_s']:.2f} images/s")
    if "stage" not in skip:
        plan = write_plan_inputs(tmp / "inputs", emb, IMAGES_PER_IDENTITY)
        result["stage"] = whole_stage(model, encoder, detector, plan, tmp / "dataset", gen_cfg, align_cfg)
        print(f"whole generate stage: {result['stage']['images_per_s']:.2f} images/s (batch {result['stage']['batch']},"
              f" warm-up {result['stage']['warmup_s']:.1f} s not counted)")
    if "parts" not in skip:
        batch = result.get("stage", {}).get("batch") or (8 if args.batch == "auto" else int(args.batch))
        batch = min(batch, len(emb))
        parts = parts_alone(model, encoder, np.repeat(emb, max(1, -(-batch // len(emb))), axis=0), batch,
                            args.steps, args.size, align, tmp)
        result["parts_s_per_image"] = parts | {"unet_plus_vae": parts["unet"] + parts["vae_decode"]}
        print("parts alone, s per image: " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))
    if "stage" in result and "parts_s_per_image" in result:
        result["stage_over_unet_vae"] = (1 / result["stage"]["images_per_s"]) / result["parts_s_per_image"][
            "unet_plus_vae"]
    if "official" in result and "stage" in result:
        result["stage_vs_official"] = result["stage"]["images_per_s"] / result["official"]["images_per_s"]
    if "train" not in skip:
        result["train"] = training_windows(tmp / "train", args.quick, args.train_steps, args.train_epochs, device)
        tr = result["train"]
        print(f"training: steady {tr['steady_images_per_s']:.0f} images/s, slowest window "
              f"{tr['slowest_window_share']:.0%} of it (compiled: {tr['compiled']}, layout {tr['layout']})")

    targets = {"stage_images_per_s": 11.0, "stage_vs_official": 3.0, "stage_over_unet_vae": 1.10,
               "train_steady_images_per_s": 8000.0, "train_slowest_window_share": 0.90}
    result["targets_h200"] = targets
    if not args.quick and torch.cuda.is_available() and "H200" in torch.cuda.get_device_name(0):
        result["targets_met"] = {
            "stage_images_per_s": result.get("stage", {}).get("images_per_s", 0) >= 11.0,
            "stage_vs_official": result.get("stage_vs_official", 0) >= 3.0,
            "stage_over_unet_vae": result.get("stage_over_unet_vae", 9) <= 1.10,
            "train_steady": result.get("train", {}).get("steady_images_per_s", 0) >= 8000.0,
            "train_windows": result.get("train", {}).get("slowest_window_share", 0) >= 0.90,
        }
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=2, default=str)[:3000])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
