"""Miniature stand-ins for the real models, in the real formats: the trained ones the package ships, and randomly
initialised ones built on the fly.

The demo and the tests cannot download Arc2Face or its ``arcface.onnx``. The package ships miniatures of the same
classes *trained* on the built-in renderer's "real"-style faces (``tools/train_miniature.py``; :func:`shipped_models`):
a small IResNet ArcFace and an Arc2Face stack whose generated faces keep the conditioning identity. The random builders
below make networks of the same kinds for tests of the machinery alone; their embeddings carry no identity.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from digi2real.fileio import atomic_path


#: Where the trained miniature models ship: ``Arc2Face/`` (arc2face/, encoder/, arcface.onnx) and ``sd15/`` (vae/,
#: tokenizer/, scheduler/), the hub layout the loaders read; ``record.json`` says how they were trained.
SHIPPED = Path(__file__).parent / "assets" / "miniature"


def shipped_models() -> tuple[Path, Path]:
    """The trained miniature Arc2Face repository and SD1.5 base folders shipped in the package (their ArcFace is
    ``<repo>/arcface.onnx``); a one-line :class:`~digi2real.errors.ModelError` when the package lacks them."""
    from digi2real.errors import ModelError

    repo, base = SHIPPED / "Arc2Face", SHIPPED / "sd15"
    needed = [repo / "arc2face" / "config.json", repo / "encoder" / "config.json", repo / "arcface.onnx",
              base / "vae" / "config.json", base / "tokenizer" / "vocab.json"]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise ModelError(f"{missing[0]}: the shipped miniature models are missing from this installation; reinstall "
                         "digi2real, or in a clone run `python tools/train_miniature.py`")
    return repo, base


class _Normalise(nn.Module):
    """(x - 127.5) / 127.5 inside the graph, as some insightface exports do (their first nodes are Sub and Mul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 127.5) * (1.0 / 127.5)


class MiniArcFace(nn.Module):
    """A four-stage strided CNN with global pooling and a linear embedding head."""

    def __init__(self, width: int = 16, dim: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(4):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.PReLU(c_out)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * 7 * 7, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def export_face_encoder(model: nn.Module, path: str | Path, normalize_inside: bool = False,
                        input_size: int = 112) -> Path:
    """Export a face embedding network to ONNX with a dynamic batch axis (input ``input``, output ``embedding``)."""
    model = nn.Sequential(_Normalise(), model) if normalize_inside else model
    model.eval()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, input_size, input_size),),
            str(tmp),
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def build_scaled_iresnet(arch: str, path: str | Path, seed: int = 0, **kwargs) -> Path:
    """A random IResNet (``training.iresnet.build_backbone(arch, **kwargs)``) scaled as a trained network is, exported
    to ONNX at ``path``: variance-keeping convolutions (N(0, 1/fan_in)), BatchNorm statistics and scales near 1,
    residual branches entering at 0.2. Its embeddings are finite and depend on the input (with the training
    initialisation and fresh statistics, 100 layers overflow to NaN), so embeddings from two runtimes can be compared
    and the real-size ArcFace's compute measured."""
    import math

    from digi2real.training.iresnet import build_backbone

    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        net = build_backbone(arch, **kwargs)
        for name, m in net.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, math.sqrt(1 / m.weight[0].numel()))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if m.weight.requires_grad:  # the embedding's BatchNorm1d keeps its scale at 1
                    nn.init.normal_(m.weight, 0.2 if name.endswith("bn3") else 1.0, 0.05)
                    nn.init.normal_(m.bias, 0, 0.05)
    return export_face_encoder(net.eval(), path)


def build_mini_arcface(path: str | Path, seed: int = 0, normalize_inside: bool = False, width: int = 16,
                       dim: int = 512) -> Path:
    """Write a randomly initialised MiniArcFace (seeded, so the same file every time) as ONNX at ``path``."""
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        model = MiniArcFace(width, dim)
    return export_face_encoder(model, path, normalize_inside=normalize_inside)


# ------------------------------------------------------------------------------------------------ mini Arc2Face

#: The SD1.5 scheduler config (the base repo's scheduler/scheduler_config.json); Arc2Face builds DPM-Solver++ from it.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
_MINI_WORDS = ("photo", "of", "a", "id", "person")
_MINI_HIDDEN = 576  # > 512, so the zero-padding of the ArcFace vector is exercised as with the real 768


def _write_mini_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer with a hand-written vocabulary: single letters plus the merges of the prompt's words."""
    import json
    import string

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase + string.digits:
            vocab[c + suffix] = len(vocab)
    merges: list[str] = []
    for word in _MINI_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # The files the SD1.5 repo's tokenizer/ holds (no tokenizer.json there), so loading takes the same path.
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}, indent=2))


def build_mini_arc2face(root: str | Path, seed: int = 0, size: int = 64) -> tuple[Path, Path]:
    """Randomly initialised Arc2Face and SD1.5 stand-ins of the real classes, saved in the hub layout.

    ``root/Arc2Face`` holds ``arc2face/`` (UNet2DConditionModel), ``encoder/`` (CLIPTextModel config and a
    ``pytorch_model.bin`` whose keys carry the legacy ``text_model.`` prefix, as on the hub) and ``arcface.onnx``;
    ``root/sd15`` holds ``vae/``, ``tokenizer/`` and ``scheduler/``. Returns the two directories. Their images are
    noise-like: they carry no faces, so real detector thresholds reject them (see the miniature's config).
    """
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    repo, base = root / "Arc2Face", root / "sd15"
    _write_mini_tokenizer(base / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    (base / "scheduler").mkdir(parents=True, exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_cfg = CLIPTextConfig(
            vocab_size=len(tok), hidden_size=_MINI_HIDDEN, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos,
        )
        encoder = CLIPTextModel(text_cfg)
        unet = UNet2DConditionModel(
            sample_size=size // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=_MINI_HIDDEN,
            attention_head_dim=8, norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=size,
            block_out_channels=(32, 32, 32, 32), norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
    unet.save_pretrained(repo / "arc2face")
    vae.save_pretrained(base / "vae")
    (repo / "encoder").mkdir(parents=True, exist_ok=True)
    text_cfg.architectures = ["CLIPTextModel"]
    text_cfg.save_pretrained(repo / "encoder")
    legacy = {f"text_model.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    torch.save(legacy, repo / "encoder" / "pytorch_model.bin")
    build_mini_arcface(repo / "arcface.onnx", seed=seed)
    return repo, base


def write_procedural_pairs(folder: str | Path, identities: int = 40, images: int = 4, seed: int = 1000,
                           pairs: int = 300, style: str = "rendered", first_identity: int = 0) -> Path:
    """A verification set of procedural identities (aligned 112 x 112 PNGs) with a pairs file, for miniature runs.

    ``folder/<identity>/<k>.png`` and ``folder/pairs.txt`` (lines ``a.png b.png 1|0``: half genuine pairs, half
    impostors, alternating as in LFW's folds), all from ``seed``: choose a seed the training source does not use,
    so the identities are unseen, or (``first_identity``) a range nobody trains on (sources/domains.REAL_TEST).
    ``style``: how they are drawn (rendered or real). Returns the pairs file.
    """
    import numpy as np

    from digi2real.imageio import write_image
    from digi2real.sources.procedural import render_item

    folder = Path(folder)
    for i in range(identities):
        for k in range(images):
            path = folder / f"{i:04d}" / f"{k}.png"
            if not path.is_file():
                write_image(path, render_item(seed, first_identity + i, k, style=style))
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(pairs):
        if n % 2 == 0:
            i = int(rng.integers(identities))
            a, b = rng.choice(images, 2, replace=False)
            lines.append(f"{i:04d}/{a}.png {i:04d}/{b}.png 1")
        else:
            i, j = rng.choice(identities, 2, replace=False)
            lines.append(f"{i:04d}/{rng.integers(images)}.png {j:04d}/{rng.integers(images)}.png 0")
    out = folder / "pairs.txt"
    from digi2real.fileio import write_text

    write_text(out, "\n".join(lines) + "\n")
    return out
