"""Generation throughput: our Arc2Face path (`runner.render` + batch alignment) against the official demo's way.

Real-size SD1.5 architecture with random weights, built in memory (compute does not depend on the weight values): the
UNet (860 M parameters), the VAE, a CLIP ViT-L text encoder as the ID encoder, the miniature hand-written CLIP
tokenizer and the SD1.5 scheduler config, assembled into an :class:`Arc2Face` directly.

* baseline, "official demo way": a diffusers ``StableDiffusionPipeline`` over the same modules (DPM-Solver++,
  fp32), called once per identity with that identity's ``prompt_embeds`` (encoded one at a time) and
  ``negative_prompt=None``, so the pipeline re-encodes the empty prompt every call; then MTCNN alignment of the image;
* ours: ``runner.render`` on batches of ``--batch`` identities (the unconditional branch encoded once per model, both
  guidance branches in one UNet call), then ``detect_and_align`` on the batch;
* parts measured alone, at our batch size: the UNet calls (``--steps`` guided calls), the VAE decode and the
  alignment of one batch, divided per image.

Same seeds and embeddings on both paths, so the images are compared pixel for pixel. Targets (issue 4): ours >= 3x
faster per image than the baseline; ours per image / sum of its parts <= 1.10. On CUDA the models run in fp16 as well
and images/s at 25 steps is measured. The defaults take about 15 minutes on a loaded 2-core CPU (each path generates
the 4 images, and the parts again); ``--quick`` is a 15-second smoke run on tiny models.

    .venv/bin/python benchmarks/bench_generate.py [--images 4] [--steps 2] [--size 512] [--batch 4]
        [--dtype fp32,bf16] [--extra-images 1] [--device auto] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "bench_generate.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------------ models


def build_model(device: torch.device, quick: bool, seed: int = 0):
    """An :class:`Arc2Face` with the real SD1.5 architecture (``quick``: a few-million-parameter one), fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from digi2real.generation.arc2face import Arc2Face, id_token_position
    from digi2real.miniature import SD15_SCHEDULER_CONFIG, _write_mini_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_mini_tokenizer(Path(tmp) / "tokenizer")
        tok = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
    eos, bos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
    if quick:
        unet_kw = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, attention_head_dim=8)
        vae_kw = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)
        text_kw = dict(hidden_size=768, intermediate_size=256, num_hidden_layers=2, num_attention_heads=12)
    else:
        unet_kw = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8)
        vae_kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
        text_kw = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), **unet_kw,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **vae_kw,
    )
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos, **text_kw,
    ))
    model = Arc2Face(unet.to(device).eval(), encoder.to(device).eval(), vae.to(device).eval(), tok,
                     dict(SD15_SCHEDULER_CONFIG), device, torch.float32, {"repo": "random", "base": "random"})
    ids, pos = id_token_position(tok)
    model._prompt_ids, model._id_position = torch.tensor([ids], device=device), pos
    return model


def with_dtype(model, dtype: torch.dtype):
    """The same model with its UNet and VAE copied to ``dtype`` (the ID encoder stays float32, as when loading)."""
    from digi2real.generation.arc2face import Arc2Face

    if dtype == model.dtype:
        return model
    out = Arc2Face(copy.deepcopy(model.unet).to(dtype), model.text_encoder, copy.deepcopy(model.vae).to(dtype),
                   model.tokenizer, model.scheduler_config, model.device, dtype, dict(model.info))
    out._prompt_ids, out._id_position = model._prompt_ids, model._id_position
    return out


def official_pipeline(model):
    """A diffusers StableDiffusionPipeline over the model's modules, built as Arc2Face's official demo builds it."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def baseline_call(pipe, model, emb: np.ndarray, seed: int, steps: int, size: int) -> np.ndarray:
    """One identity, one image: the official demo's call (the empty prompt re-encoded inside), uint8 out."""
    pe = model.encode(emb[None])
    out = pipe(prompt_embeds=pe, negative_prompt=None, num_inference_steps=steps, guidance_scale=3.0,
               num_images_per_prompt=1, height=size, width=size,
               generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="np").images
    return (np.asarray(out[0]) * 255).round().astype(np.uint8)


def timed_render(model, emb: np.ndarray, seeds: list[int], steps: int, size: int) -> tuple[np.ndarray, float, float]:
    """One batch rendered as the runner does, timing its guided UNet calls and its VAE decode apart: (images, UNet
    seconds, VAE seconds)."""
    device = model.device
    with torch.no_grad():
        cond = model.encode(emb)
        scheduler = model.make_scheduler(steps)
        latents = model.initial_noise(seeds, size).to(device) * scheduler.init_noise_sigma
        unet = 0.0
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            t0 = clock(device)
            eps = model.unet_eps(x, t, cond, 3.0)
            unet += clock(device) - t0
            latents = scheduler.step(eps, t, latents).prev_sample
        t0 = clock(device)
        images, _ = model.decode(latents)
        vae = clock(device) - t0
    return images, unet, vae


def parts_alone(model, emb: np.ndarray, seeds: list[int], steps: int, size: int, align) -> dict:
    """Seconds of each part of one batch measured on its own: the guided UNet calls, the VAE decode, alignment."""
    images, unet, vae = timed_render(model, emb, seeds, steps, size)
    t0 = time.perf_counter()
    align(list(images))
    return {"unet": unet, "vae_decode": vae, "align": time.perf_counter() - t0}


def diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 4), "identical": bool(d.max() == 0)}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    import diffusers
    import transformers

    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "avx512": "avx512f" in flags, "amx": "amx_bf16" in flags, "torch": torch.__version__,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="images (identities) per path")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps (per-step cost is what scales)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="images per call for ours")
    ap.add_argument("--dtype", default=None,
                    help="comma list of our dtypes (fp32, bf16, fp16); default fp32 on CPU, fp32,fp16 on CUDA")
    ap.add_argument("--extra-images", type=int, default=None,
                    help="images for each non-fp32 dtype row (default: --images); bf16 is slow on AVX2-only CPUs")
    ap.add_argument("--batch1-images", type=int, default=1,
                    help="images also run by ours one per call (the same-images check; 0: skip)")
    ap.add_argument("--full-steps", type=int, default=25, help="steps of the images/s figure (CUDA only)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, 128 px, 2 images")
    args = ap.parse_args()

    from diffusers.utils import logging as dlogging

    from digi2real.config import AlignConfig, GenerateConfig
    from digi2real.faces.detect import detect_and_align
    from digi2real.faces.mtcnn import MTCNN
    from digi2real.generation.runner import render

    dlogging.set_verbosity_error()
    if args.quick:
        args.size, args.images = min(args.size, 128), min(args.images, 2)
        args.batch = min(args.batch, 2)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtypes = (args.dtype or ("fp32,fp16" if device.type == "cuda" else "fp32")).split(",")
    if "fp32" not in dtypes:
        dtypes.insert(0, "fp32")
    if "fp16" in dtypes and device.type != "cuda":
        raise SystemExit("fp16 needs CUDA; use fp32 or bf16 on a CPU")
    extra_images = args.extra_images or args.images
    n, bsz, size, steps = args.images, args.batch, args.size, args.steps

    t0 = time.perf_counter()
    model = build_model(device, args.quick)
    params = sum(p.numel() for p in model.unet.parameters()) / 1e6
    print(f"built random {'quick' if args.quick else 'SD1.5'} Arc2Face (UNet {params:.0f} M params) on {device} "
          f"in {time.perf_counter() - t0:.0f} s")
    pipe = official_pipeline(model)
    detector = MTCNN.from_package(device=device)
    align_cfg = AlignConfig()

    def align(images: list[np.ndarray]) -> list:
        return detect_and_align(images, detector, align_cfg)

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((max(n, extra_images), 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    seeds = [1000 + i for i in range(len(emb))]

    def cfg(batch: int, st: int = steps) -> GenerateConfig:
        return GenerateConfig(steps=st, size=size, guidance=3.0, batch_size=batch)

    # Warm-up: one small untimed call of each path (first-call allocations and lazy inits are not throughput).
    baseline_call(pipe, model, emb[0], 1, 1, 64)
    render(model, emb[:bsz], seeds[:bsz], cfg(bsz, 1).model_copy(update={"size": 64}), None)
    align([np.zeros((size, size, 3), np.uint8)])

    # Baseline and ours alternate batch by batch, so outside load on the shared CPU hits both alike.
    times = {"base_gen": 0.0, "base_align": 0.0, "ours_gen": 0.0, "ours_align": 0.0}
    parts = {"unet": 0.0, "vae_decode": 0.0, "align": 0.0}
    base_imgs, our_imgs = [], []
    found = {"baseline": 0, "ours": 0}
    for s in range(0, n, bsz):
        idx = list(range(s, min(n, s + bsz)))
        for i in idx:
            t = clock(device)
            img = baseline_call(pipe, model, emb[i], seeds[i], steps, size)
            times["base_gen"] += clock(device) - t
            t = time.perf_counter()
            found["baseline"] += sum(f.ok for f in align([img]))
            times["base_align"] += time.perf_counter() - t
            base_imgs.append(img)
        t = clock(device)
        imgs, finite, _ = render(model, emb[idx], [seeds[i] for i in idx], cfg(len(idx)), None)
        times["ours_gen"] += clock(device) - t
        t = time.perf_counter()
        found["ours"] += sum(f.ok for f in align(list(imgs)))
        times["ours_align"] += time.perf_counter() - t
        our_imgs.extend(imgs)
        for k, v in parts_alone(model, emb[idx], [seeds[i] for i in idx], steps, size, align).items():
            parts[k] += v
        print(f"  images {idx[0]}-{idx[-1]}: baseline {times['base_gen']:.1f} s, ours {times['ours_gen']:.1f} s "
              f"(generation, cumulative)")
    base_imgs, our_imgs = np.stack(base_imgs), np.stack(our_imgs)
    same = {f"ours fp32 batch {bsz} vs baseline": diff(our_imgs, base_imgs)}

    rows: dict[str, dict] = {}

    def row(name: str, gen: float, al: float, count: int) -> None:
        rows[name] = {"images": count, "gen_s_per_image": gen / count, "s_per_image": (gen + al) / count}

    row("baseline: official demo way, fp32, 1 identity/call", times["base_gen"], times["base_align"], n)
    row(f"ours fp32 batch {bsz}", times["ours_gen"], times["ours_align"], n)

    if args.batch1_images:
        m, g, a, imgs = min(args.batch1_images, n), 0.0, 0.0, []
        for i in range(m):
            t = clock(device)
            img = render(model, emb[i : i + 1], seeds[i : i + 1], cfg(1), None)[0]
            g += clock(device) - t
            t = time.perf_counter()
            align(list(img))
            a += time.perf_counter() - t
            imgs.append(img[0])
        row("ours fp32 batch 1", g, a, m)
        same["ours fp32 batch 1 vs baseline"] = diff(np.stack(imgs), base_imgs[:m])

    for name in dtypes:
        if name == "fp32":
            continue
        dmodel = with_dtype(model, DTYPES[name])
        m = extra_images
        b = min(bsz, m)
        render(dmodel, emb[:b], seeds[:b], cfg(b, 1).model_copy(update={"size": 64}), None)  # warm-up
        g, a, imgs = 0.0, 0.0, []
        for s in range(0, m, b):
            idx = list(range(s, min(m, s + b)))
            t = clock(device)
            out = render(dmodel, emb[idx], [seeds[i] for i in idx], cfg(len(idx)), None)[0]
            g += clock(device) - t
            t = time.perf_counter()
            align(list(out))
            a += time.perf_counter() - t
            imgs.extend(out)
        row(f"ours {name} batch {b}", g, a, m)
        if m <= n:
            same[f"ours {name} batch {b} vs baseline fp32"] = diff(np.stack(imgs), base_imgs[:m])
        if device.type == "cuda" and name == "fp16":
            t = clock(device)
            for s in range(0, n, bsz):
                idx = list(range(s, min(n, s + bsz)))
                out = render(dmodel, emb[idx], [seeds[i] for i in idx], cfg(len(idx), args.full_steps), None)[0]
                align(list(out))
            rows[f"ours fp16 batch {bsz}, {args.full_steps} steps"] = {
                "images": n, "images_per_s_with_alignment": n / (clock(device) - t)}
        del dmodel

    base = rows["baseline: official demo way, fp32, 1 identity/call"]
    for r in rows.values():
        if "s_per_image" in r:
            r["speedup_gen"] = base["gen_s_per_image"] / r["gen_s_per_image"]
            r["speedup"] = base["s_per_image"] / r["s_per_image"]
    per = {k: v / n for k, v in parts.items()}
    ours = rows[f"ours fp32 batch {bsz}"]
    ratio_b = ours["s_per_image"] / sum(per.values())

    print(f"\n{'':52s}{'gen s/img':>10s}{'+align':>9s}{'speedup':>9s}")
    for name, r in rows.items():
        if "s_per_image" in r:
            print(f"{name:52s}{r['gen_s_per_image']:10.2f}{r['s_per_image']:9.2f}{r['speedup']:8.2f}x"
                  + ("" if r["images"] == n else f"  ({r['images']} image(s))"))
        else:
            print(f"{name:52s}{r['images_per_s_with_alignment']:10.3f} images/s")
    print(f"{'parts alone at batch ' + str(bsz) + ': UNet calls':52s}{per['unet']:10.2f}")
    print(f"{'  VAE decode':52s}{per['vae_decode']:10.2f}")
    print(f"{'  alignment':52s}{per['align']:10.3f}")
    print(f"{'  sum':52s}{sum(per.values()):10.2f}")
    print(f"ratio (b): ours / sum of parts = {ratio_b:.3f} (target <= 1.10); "
          f"speedup (a) = {ours['speedup']:.2f}x (target >= 3)")
    print(f"faces found by MTCNN: baseline {found['baseline']}/{n}, ours {found['ours']}/{n} (random weights: no faces)")
    for k, v in same.items():
        print(f"same images, {k}: max |diff| {v['max_abs']} levels, mean {v['mean_abs']}")

    result = {
        "benchmark": "generate",
        "machine": machine(),
        "device": str(device),
        "settings": {"images": n, "steps": steps, "size": size, "batch": bsz, "guidance": 3.0, "dtypes": dtypes,
                     "extra_images": extra_images, "quick": args.quick, "unet_params_m": round(params, 1)},
        "rows": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                 for k, v in rows.items()},
        "parts_s_per_image": {k: round(v, 4) for k, v in per.items()} | {"sum": round(sum(per.values()), 4)},
        "ratio_b_ours_over_parts": round(ratio_b, 4),
        "target_ratio_b": 1.10,
        "speedup_a": round(ours["speedup"], 4),
        "speedup_a_generation_only": round(ours["speedup_gen"], 4),
        "target_speedup_a": 3.0,
        "same_images": same,
        "faces_found": found,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
