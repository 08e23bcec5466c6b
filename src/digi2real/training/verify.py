"""Verification while training (``train.verify_sets``): insightface ``.bin`` sets read once when training starts, then
the backbone scored with the evaluation code's protocol (flip-summed embeddings, 10 folds), never changing the
training trajectory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from digi2real.errors import ConfigError, Digi2RealError
from digi2real.training.data import model_input

VERIFY_FOLDS = 10  # insightface's protocol


@dataclass
class VerifySet:
    """One verification benchmark: ``images`` (2N x 112 x 112 x 3 uint8, pair i = rows 2i, 2i+1; ``None`` where it
    was only checked, not decoded) and ``issame`` (N booleans)."""

    name: str
    path: Path
    images: np.ndarray | None
    issame: np.ndarray


def load_verify_sets(paths: list[Path] | tuple[Path, ...], decode: bool = True) -> list[VerifySet]:
    """Read (and with ``decode``, decode) the ``.bin`` files of ``train.verify_sets``, each named by its stem.

    Raises a one-line :class:`Digi2RealError` naming the file for a missing, unreadable or damaged file, an image that
    does not decode, fewer pairs than the 10 folds need, or two files with the same stem.
    """
    from digi2real.evaluation.bins import decode_pairs, read_bin

    sets: list[VerifySet] = []
    seen: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        name = path.stem
        if name in seen:
            raise ConfigError(f"train.verify_sets: {seen[name]} and {path} are both named {name!r} (sets are named by "
                              "their file stem); rename one")
        seen[name] = path
        try:
            images, issame = read_bin(path)
            if len(issame) < VERIFY_FOLDS:
                raise Digi2RealError(f"{path}: {len(issame)} pairs; the {VERIFY_FOLDS}-fold protocol needs at least "
                                     f"{VERIFY_FOLDS}")
            decoded = decode_pairs(images, 112, name=str(path)) if decode else None
        except Digi2RealError as exc:
            raise Digi2RealError(f"train.verify_sets: {exc}") from None
        sets.append(VerifySet(name, path, decoded, np.asarray(issame, dtype=bool)))
    return sets


def verify_backbone(backbone: nn.Module, sets: list[VerifySet], device: torch.device, embedding_dim: int,
                    batch_size: int, channels_last: bool = True,
                    amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Score ``backbone`` on each set: flip-summed embeddings and insightface's 10-fold protocol.

    Returns ``{name: VerificationResult}``. The backbone is put in eval mode for the forward passes and given back in
    the mode it had; no random number is drawn (the caller may still guard the RNG states).
    """
    from digi2real.evaluation.models import FaceModel
    from digi2real.evaluation.verification import evaluate_verification

    def forward(images: np.ndarray) -> np.ndarray:
        x = model_input(torch.from_numpy(images), device, channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                    enabled=amp_dtype is not None):
            return backbone(x).float().cpu().numpy()

    was_training = backbone.training
    backbone.eval()
    try:
        results = {}
        for vs in sets:
            if vs.images is None:
                raise ValueError(f"verification set {vs.name} was not decoded")
            model = FaceModel(vs.path, "iresnet", embedding_dim, batch_size, True, device.type,
                              {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32"), forward)
            results[vs.name] = evaluate_verification(model.embed(vs.images), vs.issame, folds=VERIFY_FOLDS)
        return results
    finally:
        backbone.train(was_training)
