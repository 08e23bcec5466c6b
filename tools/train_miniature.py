"""Train the miniature Arc2Face stack that ships with digi2real (issue 13), from a seed, on the CPU or a GPU.

The paper's models cannot be downloaded here, so the demo runs on miniatures of the same classes, trained here on the
built-in renderer's "real"-style faces (``sources/procedural.py``, ``style="real"``; identities of
``sources/domains.REAL_TRAIN`` only), the way the originals were trained:

1. **ArcFace** (:func:`train_arcface`): a small IResNet with an additive angular margin head (``digi2real train``'s own
   loop), exported to ONNX in ArcFace's input convention (N x 3 x 112 x 112 RGB, ``(x - 127.5) / 127.5``, 512-d out).
2. **VAE** (:func:`train_vae`): a diffusers ``AutoencoderKL`` (64 x 64 RGB <-> 8 x 8 x 4 latents: SD1.5's factor 8), reconstruction
   loss plus a small KL term; its ``scaling_factor`` set so the latents have unit variance, as SD1.5's 0.18215 does.
3. **Arc2Face** (:func:`train_generator`): a ``UNet2DConditionModel`` conditioned through a CLIP text encoder as
   Arc2Face was (its paper, section 3): the prompt "photo of a id person" with the ``id`` token's embedding replaced by
   the image's own ArcFace embedding (L2-normalised, zero-padded to the encoder's width), the epsilon-prediction
   denoising loss on the SD1.5 noise schedule, and condition dropout (the empty prompt instead, 10%) so that
   classifier-free guidance works; an exponential moving average of the UNet's weights is what ships. The encoder is
   kept at its seeded initialisation by default (see :func:`train_generator`; ``--train-encoder`` trains it too).

Everything is written in the hub layout the loaders read (``Arc2Face/{arc2face,encoder,arcface.onnx}``,
``sd15/{vae,tokenizer,scheduler}``), phase by phase: a finished phase is skipped when the tool runs again.

    .venv/bin/python tools/train_miniature.py [--out src/digi2real/assets/miniature] [--seed 0] [--device auto]
        [--quick]

``--quick`` trains each phase for a few steps (a smoke run, a minute). See the README of the output folder for the
figures of the shipped run (run time on this machine, identity metrics).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "digi2real" / "assets" / "miniature"
HIDDEN = 576  # the ID encoder's width: > 512, so the ArcFace vector is zero-padded as with the real 768
SIZE = 64  # generated image side


@dataclass
class Recipe:
    """Sizes and lengths of each phase (the shipped models: the defaults; ``--quick``: :meth:`quick`)."""

    seed: int = 0
    # ArcFace: identities x images of REAL_TRAIN, epochs
    arcface_identities: int = 500
    arcface_images: int = 8
    arcface_epochs: int = 6
    # VAE and generator: identities x images of REAL_TRAIN (a larger, disjoint-purpose draw of the same range)
    pool_identities: int = 3000
    pool_images: int = 5
    vae_steps: int = 1000
    vae_batch: int = 16
    generator_steps: int = 3500
    generator_batch: int = 64
    lr: float = 3e-4
    cond_dropout: float = 0.1
    ema: float = 0.999
    train_encoder: bool = False

    @classmethod
    def quick(cls, seed: int) -> "Recipe":
        return cls(seed=seed, arcface_identities=40, arcface_images=4, arcface_epochs=1, pool_identities=40,
                   pool_images=2, vae_steps=5, vae_batch=8, generator_steps=5, generator_batch=8)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def render_set(first: int, identities: int, per: int, size: int, style: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``identities`` x ``per`` renders (N x size x size x 3 uint8) and their identity labels 0..identities-1."""
    from digi2real.sources.procedural import render_item

    images = np.stack([render_item(seed, first + i, k, size=size, style=style)
                       for i in range(identities) for k in range(per)])
    return images, np.repeat(np.arange(identities, dtype=np.int64), per)


class ArraySet:
    """The TrainingSet ``train`` reads: images and labels in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels
        self.num_classes = int(labels.max()) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


# ------------------------------------------------------------------------------------------------------ 1. ArcFace


def train_arcface(recipe: Recipe, work: Path, onnx_path: Path, device: str) -> dict:
    """A small IResNet + ArcFace margin head on REAL_TRAIN identities, exported to ONNX (ArcFace's convention)."""
    from digi2real.config import DataConfig, TrainConfig
    from digi2real.miniature import export_face_encoder
    from digi2real.sources.domains import REAL_TRAIN
    from digi2real.training.commands import load_backbone_file
    from digi2real.training.loop import train

    images, labels = render_set(REAL_TRAIN.first, recipe.arcface_identities, recipe.arcface_images, 112, "real",
                                recipe.seed)
    cfg = TrainConfig(backbone="r18", widths=(16, 32, 64, 128), depths=(1, 1, 1, 1), stem_stride=2,
                      embedding_dim=512, head="arcface", scale=32.0, epochs=recipe.arcface_epochs, batch_size=64,
                      lr=0.1, warmup_epochs=0.5, device=device, precision="fp32", log_every=20, augment="flip",
                      seed=recipe.seed, data=DataConfig(workers=0))
    t = time.perf_counter()
    summary = train(cfg, ArraySet(images, labels), work / "arcface-run", progress=True)
    net = load_backbone_file(work / "arcface-run" / "model.pt")
    export_face_encoder(net.eval(), onnx_path)
    return {"images": len(images), "identities": recipe.arcface_identities, "epochs": recipe.arcface_epochs,
            "final_loss": summary.final_loss if hasattr(summary, "final_loss") else None,
            "seconds": time.perf_counter() - t, "onnx_bytes": onnx_path.stat().st_size}


# ------------------------------------------------------------------------------------------------------ 2. VAE


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=SIZE,
                         block_out_channels=(32, 32, 64, 64), norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(recipe: Recipe, pool: np.ndarray, out_dir: Path, device: torch.device) -> dict:
    """Reconstruction (MSE + L1) plus 1e-6 x KL, Adam; then scaling_factor = 1 / std of the latents' means."""
    torch.manual_seed(recipe.seed)
    vae = build_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(recipe.seed)
    t = time.perf_counter()
    for step in range(1, recipe.vae_steps + 1):
        x = to_unit(pool[rng.integers(0, len(pool), recipe.vae_batch)]).to(device)
        if rng.random() < 0.5:
            x = x.flip(3)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == recipe.vae_steps:
            for g in opt.param_groups:  # cosine decay to 10% over the run
                g["lr"] = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / recipe.vae_steps)))
            say(f"vae step {step}/{recipe.vae_steps}: loss {loss.item():.4f} "
                f"({(time.perf_counter() - t) / step:.2f} s/step)")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(to_unit(pool[i:i + 256]).to(device)).latent_dist.mean
                           for i in range(0, min(len(pool), 4096), 256)])
        psnr_batch = to_unit(pool[:256]).to(device)
        rec = vae.decode(vae.encode(psnr_batch).latent_dist.mean).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec, psnr_batch)))
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.to("cpu").save_pretrained(out_dir)
    return {"steps": recipe.vae_steps, "scaling_factor": scaling, "psnr_db": psnr,
            "seconds": time.perf_counter() - t}


# ------------------------------------------------------------------------------------------------------ 3. Arc2Face


def build_generator(tokenizer):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=512,
                              num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                              hidden_act="quick_gelu", bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                              eos_token_id=eos, pad_token_id=eos)
    text_cfg.architectures = ["CLIPTextModel"]
    encoder = CLIPTextModel(text_cfg)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=32)
    return encoder, unet


def condition(encoder, prompt_ids: torch.Tensor, position: int, id_embeddings: torch.Tensor,
              drop: torch.Tensor, empty_ids: torch.Tensor) -> torch.Tensor:
    """Arc2Face's conditioning with gradients: the prompt with its ``id`` token replaced by each padded ArcFace
    vector; rows where ``drop`` is set get the empty prompt's encoding instead (condition dropout)."""
    from digi2real.generation.arc2face import pad_identity, replaced_token_row

    rows = pad_identity(id_embeddings, HIDDEN)
    with replaced_token_row(encoder.get_input_embeddings(), position, rows):
        cond = encoder(input_ids=prompt_ids.expand(len(rows), -1)).last_hidden_state
    if drop.any():
        empty = encoder(input_ids=empty_ids).last_hidden_state.expand(len(rows), -1, -1)
        cond = torch.where(drop[:, None, None], empty, cond)
    return cond


def train_generator(recipe: Recipe, latents: torch.Tensor, embeddings: torch.Tensor, tokenizer, scheduler_config: dict,
                    device: torch.device) -> tuple:
    """The UNet trained on Arc2Face's conditioning (the ``id`` token row replaced by the image's ArcFace vector,
    condition dropout to the empty prompt, the epsilon loss); returns (ID encoder, EMA UNet, figures).

    Unlike Arc2Face, the ID encoder stays at its seeded initialisation (``recipe.train_encoder`` False): on 2 CPU
    cores its forward and backward over 77 tokens cost twice the UNet's step, and a frozen encoder lets every
    image's conditioning be computed once. The ``id`` row still reaches every later token through its attention,
    and the UNet's cross-attention learns to read it."""
    import copy

    from diffusers import DDPMScheduler

    from digi2real.generation.arc2face import EMPTY_PROMPT, id_token_position

    torch.manual_seed(recipe.seed)
    encoder, unet = build_generator(tokenizer)
    encoder, unet = encoder.to(device).eval().requires_grad_(recipe.train_encoder), unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_schedule = DDPMScheduler.from_config(scheduler_config)
    ids, position = id_token_position(tokenizer)
    prompt_ids = torch.tensor([ids], device=device)
    empty_ids = tokenizer(EMPTY_PROMPT, padding="max_length", max_length=tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(device)
    if not recipe.train_encoder:
        with torch.no_grad():
            fixed = torch.cat([condition(encoder, prompt_ids, position, embeddings[i:i + 256].to(device),
                                         torch.zeros(len(embeddings[i:i + 256]), dtype=torch.bool), empty_ids)
                               .to(torch.float16).cpu() for i in range(0, len(embeddings), 256)])
            empty = encoder(input_ids=empty_ids).last_hidden_state
    params = list(unet.parameters()) + (list(encoder.parameters()) if recipe.train_encoder else [])
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-2)
    rng = np.random.default_rng(recipe.seed + 1)
    alphas = noise_schedule.alphas_cumprod.to(device)
    t0, losses = time.perf_counter(), []
    for step in range(1, recipe.generator_steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(latents), recipe.generator_batch))
        x0 = latents[idx].to(device)
        if rng.random() < 0.5:  # a mirrored face keeps its identity (ArcFace embeds it the same, nearly)
            x0 = x0.flip(3)
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(x0),), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        drop = torch.from_numpy(rng.random(len(x0)) < recipe.cond_dropout).to(device)
        if recipe.train_encoder:
            cond = condition(encoder, prompt_ids, position, embeddings[idx].to(device), drop, empty_ids)
        else:
            cond = torch.where(drop[:, None, None], empty, fixed[idx].to(device, torch.float32))
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = recipe.lr * min(1.0, step / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step /
                                                                                 recipe.generator_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        decay = min(recipe.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == recipe.generator_steps:
            rate = (time.perf_counter() - t0) / step
            say(f"generator step {step}/{recipe.generator_steps}: loss {np.mean(losses[-100:]):.4f} "
                f"({rate:.2f} s/step, ETA {(recipe.generator_steps - step) * rate / 60:.0f} min)")
    figures = {"steps": recipe.generator_steps, "final_loss": float(np.mean(losses[-200:])),
               "encoder": "trained" if recipe.train_encoder else "seeded initialisation (frozen)",
               "seconds": time.perf_counter() - t0}
    return encoder.eval(), ema, figures


def save_generator(encoder, unet, repo: Path) -> None:
    """``repo/arc2face`` (UNet, safetensors) and ``repo/encoder`` (config + ``pytorch_model.bin`` with the hub's
    legacy ``text_model.`` key prefix), as Arc2Face's hub repository holds them; stored in float16 (the package's
    size budget), loaded in the run's precision as the hub's weights are."""
    unet.to("cpu", torch.float16).save_pretrained(repo / "arc2face")
    (repo / "encoder").mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(repo / "encoder")
    legacy = {f"text_model.{k}": v.detach().cpu().to(torch.float16).contiguous()
              for k, v in encoder.state_dict().items()}
    torch.save(legacy, repo / "encoder" / "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------------ 4. checks


def identity_metrics(own: np.ndarray, other: np.ndarray) -> dict:
    """Median cosines to the image's own conditioning identity and to the others, and d' between the two."""
    d = (own.mean() - other.mean()) / math.sqrt((own.var() + other.var()) / 2)
    return {"median_own": float(np.median(own)), "median_other": float(np.median(other)), "d_prime": float(d)}


def check_generator(out: Path, style: str, first: int, identities: int, per: int, seed: int, steps: int = 25,
                    guidance: float = 3.0) -> dict:
    """Generate ``per`` images of each of ``identities`` held-out identities (conditioned on the ArcFace embedding of
    one ``style`` render each), re-embed them and measure how well the identity is kept (issue 13's targets: median
    own >= 0.5, other <= 0.2, d' >= 2). The 64 px images are resized to 112: the renderer's framing is ArcFace's."""
    from PIL import Image

    from digi2real.generation.arc2face import Arc2Face

    model = Arc2Face.from_pretrained(out / "Arc2Face", out / "sd15", device="cpu")
    refs, _ = render_set(first, identities, 1, 112, style, seed)
    cond = embed_crops(out / "Arc2Face" / "arcface.onnx", refs)
    cond /= np.linalg.norm(cond, axis=1, keepdims=True)
    rows = np.repeat(cond, per, axis=0)
    images = np.concatenate([model.generate(rows[i:i + 32], list(range(i, min(i + 32, len(rows)))), steps=steps,
                                            guidance=guidance, size=SIZE) for i in range(0, len(rows), 32)])
    crops = np.stack([np.asarray(Image.fromarray(im).resize((112, 112), Image.BICUBIC)) for im in images])
    emb = embed_crops(out / "Arc2Face" / "arcface.onnx", crops)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ cond.T
    owner = np.repeat(np.arange(identities), per)
    own = sims[np.arange(len(sims)), owner]
    other = sims[owner[:, None] != np.arange(identities)[None, :]]
    return {"style": style, "identities": identities, "per_identity": per, "steps": steps, "guidance": guidance,
            **identity_metrics(own, other)}


# ------------------------------------------------------------------------------------------------------ main


def pool_identities(recipe: Recipe) -> dict:
    """The generator's training images: which real-style people (after the ArcFace's), how many, how drawn; written
    into the shipped record.json so that anyone can re-render them (the report's nearest-training-image check)."""
    from digi2real.sources.domains import REAL_TRAIN

    return {"first": REAL_TRAIN.first + recipe.arcface_identities, "identities": recipe.pool_identities,
            "images": recipe.pool_images, "size": SIZE, "style": "real", "seed": recipe.seed}


def embed_crops(onnx_path: Path, crops: np.ndarray) -> np.ndarray:
    from digi2real.config import EncoderConfig
    from digi2real.faces.arcface import ArcFaceEncoder

    encoder = ArcFaceEncoder.load(EncoderConfig(model=str(onnx_path), provider="cpu", batch_size=256))
    return np.concatenate([encoder(crops[i:i + 1024]) for i in range(0, len(crops), 1024)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (hub layout); default the package's")
    ap.add_argument("--work", type=Path, default=ROOT / "miniature-work", help="intermediate files (resumable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="a few steps per phase: a smoke run")
    ap.add_argument("--generator-steps", type=int, help="override the generator's steps")
    ap.add_argument("--train-encoder", action="store_true", help="also train the ID encoder (Arc2Face's way; 3x the "
                    "step time on a CPU)")
    args = ap.parse_args()

    from transformers import CLIPTokenizer

    from digi2real.miniature import SD15_SCHEDULER_CONFIG, _write_mini_tokenizer
    from digi2real.sources.domains import REAL_TRAIN

    recipe = Recipe.quick(args.seed) if args.quick else Recipe(seed=args.seed)
    if args.generator_steps:
        recipe.generator_steps = args.generator_steps
    recipe.train_encoder = args.train_encoder
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    repo, base, work = args.out / "Arc2Face", args.out / "sd15", args.work
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"recipe": asdict(recipe), "device": str(device), "torch": torch.__version__,
                   "threads": torch.get_num_threads()})
    started = time.perf_counter()

    onnx_path = repo / "arcface.onnx"
    if not onnx_path.is_file():
        say("1. ArcFace: training on real-style identities")
        repo.mkdir(parents=True, exist_ok=True)
        record["arcface"] = train_arcface(recipe, work, onnx_path, device.type)
        record_path.write_text(json.dumps(record, indent=2))
    _write_mini_tokenizer(base / "tokenizer")
    (base / "scheduler").mkdir(parents=True, exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))

    pool_file = work / "pool.npz"
    if pool_file.is_file():
        data = np.load(pool_file)
        pool, embeddings = data["images"], data["embeddings"]
    else:
        say(f"rendering the pool: {recipe.pool_identities} identities x {recipe.pool_images} images")
        first = pool_identities(recipe)["first"]
        pool, _ = render_set(first, recipe.pool_identities, recipe.pool_images, SIZE, "real", recipe.seed)
        crops, _ = render_set(first, recipe.pool_identities, recipe.pool_images, 112, "real", recipe.seed)
        embeddings = embed_crops(onnx_path, crops)
        np.savez(pool_file, images=pool, embeddings=embeddings)

    if not (base / "vae" / "config.json").is_file():
        say("2. VAE")
        record["vae"] = train_vae(recipe, pool, base / "vae", device)
        record_path.write_text(json.dumps(record, indent=2))
        say(f"VAE: PSNR {record['vae']['psnr_db']:.1f} dB, scaling factor {record['vae']['scaling_factor']:.4f}")

    if not (repo / "arc2face" / "config.json").is_file():
        from diffusers import AutoencoderKL

        say("3. Arc2Face: UNet + ID encoder")
        vae = AutoencoderKL.from_pretrained(base / "vae").to(device).eval()
        with torch.no_grad():
            latents = torch.cat([vae.encode(to_unit(pool[i:i + 256]).to(device)).latent_dist.mean.cpu()
                                 for i in range(0, len(pool), 256)]) * vae.config.scaling_factor
        tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
        encoder, unet, record["generator"] = train_generator(
            recipe, latents, torch.from_numpy(embeddings), tokenizer, SD15_SCHEDULER_CONFIG, device)
        save_generator(encoder, unet, repo)
        record_path.write_text(json.dumps(record, indent=2))
    from digi2real.sources.domains import REAL_TEST, RENDERED_SOURCE

    n = 8 if args.quick else 40
    record["checks"] = [check_generator(args.out, "real", REAL_TEST.first, n, 4, args.seed),
                        check_generator(args.out, "rendered", RENDERED_SOURCE.first, n, 4, args.seed)]
    for c in record["checks"]:
        say(f"identity kept ({c['style']} identities): median cosine own {c['median_own']:.3f}, other "
            f"{c['median_other']:.3f}, d' {c['d_prime']:.2f}")
    record["total_seconds"] = record.get("total_seconds", 0) + time.perf_counter() - started
    record["pool"] = pool_identities(recipe)
    record["arcface_identities"] = {"first": REAL_TRAIN.first, "identities": recipe.arcface_identities,
                                    "images": recipe.arcface_images, "size": 112, "style": "real",
                                    "seed": recipe.seed}
    record_path.write_text(json.dumps(record, indent=2))
    (args.out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    say(f"done: {args.out} ({size / 1e6:.1f} MB); record {record_path}")
    if args.quick and args.out != DEFAULT_OUT:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
