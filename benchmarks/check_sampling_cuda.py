"""Device check of fast sampling (issue 12, item 2): what the CPU tests cannot show, in about 3 minutes on one GPU.

On the real-size SD1.5 architecture with random weights (``bench_generate.build_model``), float16 by default:

* memory: peak activation bytes of one guided UNet step and of one VAE decode at 1 and ``--batch`` images, per image,
  against :func:`digi2real.generation.arc2face.per_image_bytes`; what ``auto_batch_size`` picks from the free memory;
* speed of one guided UNet step per image: eager NCHW, eager channels_last, and after ``optimize`` (compiled);
  ``optimize``'s record (compile state, warm-up seconds);
* pixels: the compiled model renders the same images twice and after a second, cache-free compilation (resume), and
  how far they are from eager NCHW (max uint8 difference: settings that change pixels).

    python3 benchmarks/check_sampling_cuda.py [--batch 32] [--size 512] [--steps 4] [--dtype fp16] [--no-recompile]
        [--json PATH] [--quick]

``--quick`` runs tiny models on whatever device is there (a CPU smoke run: optimize applies nothing there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import DTYPES, build_model, sync, with_dtype  # noqa: E402


def peak_bytes(device: torch.device, fn) -> int:
    """Peak allocated bytes above what was allocated before ``fn`` (0 on the CPU)."""
    if device.type != "cuda":
        fn()
        return 0
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def step_ms(model, batch: int, size: int, repeat: int = 3) -> float:
    """Milliseconds per image of one guided UNet step at ``batch`` (after one untimed call)."""
    cond = model.encode(np.eye(batch, 512, dtype=np.float32))
    x = model.initial_noise(list(range(batch)), size).to(model.device)
    t = model.make_scheduler(25).timesteps[0]
    with torch.no_grad():
        model.unet_eps(x, t, cond, 3.0)
        sync(model.device)
        start = time.perf_counter()
        for _ in range(repeat):
            model.unet_eps(x, t, cond, 3.0)
        sync(model.device)
    return 1000 * (time.perf_counter() - start) / repeat / batch


def memory(model, batch: int, size: int) -> dict:
    from digi2real.generation.arc2face import UNET_ELEMENTS_PER_PIXEL, VAE_ELEMENTS_PER_PIXEL

    out = {}
    item = model.dtype.itemsize
    for b in sorted({1, batch}):
        cond = model.encode(np.eye(b, 512, dtype=np.float32))
        x = model.initial_noise(list(range(b)), size).to(model.device)
        t = model.make_scheduler(25).timesteps[0]
        with torch.no_grad():
            unet = peak_bytes(model.device, lambda: model.unet_eps(x, t, cond, 3.0))
            vae = peak_bytes(model.device, lambda: model.decode(x))
        out[f"batch_{b}"] = {"unet_step_MiB_per_image": round(unet / b / 2**20, 1),
                             "vae_decode_MiB_per_image": round(vae / b / 2**20, 1)}
    out["model_MiB_per_image"] = {"unet_step": round(2 * UNET_ELEMENTS_PER_PIXEL * size * size * item / 2**20, 1),
                                  "vae_decode": round(VAE_ELEMENTS_PER_PIXEL * size * size * item / 2**20, 1)}
    if model.device.type == "cuda":
        out["free_GiB"] = round(torch.cuda.mem_get_info(model.device)[0] / 2**30, 1)
    out["auto_batch_size"] = model.auto_batch_size(size, 3.0)
    return out


def images(model, batch: int, size: int, steps: int) -> np.ndarray:
    e = np.random.default_rng(0).normal(size=(batch, 512)).astype(np.float32)
    return model.generate(e, list(range(1000, 1000 + batch)), steps=steps, size=size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the pixel comparisons")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--no-recompile", action="store_true", help="skip the second, cache-free compilation")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, size = (2, 64) if args.quick else (args.batch, args.size)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    model = with_dtype(build_model(device, args.quick), dtype)
    result: dict = {"device": str(device), "torch": torch.__version__, "batch": batch, "size": size,
                    "dtype": str(dtype)}
    result["memory"] = memory(model, batch, size)
    result["step_ms_per_image"] = {"eager_nchw": round(step_ms(model, batch, size), 2)}
    eager = images(model, batch, size, args.steps)
    model.optimize(compile=False, channels_last=True, batch=batch, size=size, steps=args.steps)
    result["step_ms_per_image"]["eager_channels_last"] = round(step_ms(model, batch, size), 2)
    layout = images(model, batch, size, args.steps)
    result["optimize"] = model.optimize(compile=True, channels_last=True, batch=batch, size=size, steps=args.steps)
    result["step_ms_per_image"]["optimized"] = round(step_ms(model, batch, size), 2)
    fast = images(model, batch, size, args.steps)
    pixels = {"optimized_twice_identical": bool(np.array_equal(fast, images(model, batch, size, args.steps))),
              "max_diff_channels_last_vs_nchw": int(np.abs(layout.astype(int) - eager).max()),
              "max_diff_optimized_vs_nchw": int(np.abs(fast.astype(int) - eager).max())}
    if not args.no_recompile and model.optimization.get("compiled_batch"):
        import torch._inductor.config as inductor

        torch._dynamo.reset()
        with inductor.patch(force_disable_caches=True):
            result["optimize_again"] = model.optimize(compile=True, channels_last=True, batch=batch, size=size,
                                                      steps=args.steps)
        pixels["recompiled_identical"] = bool(np.array_equal(fast, images(model, batch, size, args.steps)))
    result["pixels"] = pixels
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
