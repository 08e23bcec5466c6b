"""Margin heads for face-recognition training (FACTS 6): AdaFace (the paper's loss), ArcFace and CosFace.

Every head holds a class-weight matrix ``weight`` (num_classes x embedding_dim) and maps raw, unnormalised backbone
embeddings plus integer labels to scaled logits (B x C); the training loop feeds them to ``F.cross_entropy``.

Common conventions (written here from the formulas, not from any upstream code):

- Both the embeddings and the class weights are L2-normalised inside ``forward``; the embedding is divided by its own
  norm with the gradient flowing through that division (FACTS 6). A floor of 1e-12 on the divisor only guards an
  all-zero embedding.
- The class weights start as N(0, 0.01^2) per entry. Only their directions matter (they are normalised in forward), and
  random Gaussian rows of dimension >= 64 are nearly orthogonal, so the initial cosines are near zero for every class.
- The cosine matrix is clamped to [-1 + eps, 1 - eps] before ``acos`` because the derivative of ``acos`` is infinite at
  +-1; the non-target logits are ``s`` times this clamped cosine.
- All of it runs in float32 with autocast disabled, whatever the caller's autocast context: margins of a few tenths on
  cosines, multiplied by s = 64, are destroyed by bf16/fp16 rounding (bf16 keeps ~3 significant digits).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class MarginHead(nn.Module, ABC):
    """Base class: a normalised class-weight matrix and the cosine between embeddings and classes.

    Subclasses implement :meth:`target_logit`, the margin-modified cosine of each sample's own class; the other classes
    keep their plain cosine. Everything is multiplied by ``s``.
    """

    def __init__(self, embedding_dim: int, num_classes: int, s: float, m: float, eps: float = 1e-3) -> None:
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"embedding_dim and num_classes must be positive, got {embedding_dim}, {num_classes}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.s = float(s)
        self.m = float(m)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, 0.0, 0.01)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, s={self.s}, m={self.m}"

    @abstractmethod
    def target_logit(self, cos_target: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Margin-modified cosine of the target class (before the scale ``s``); ``norms`` are the raw embedding norms,
        detached. Each head (AdaFace, ArcFace, CosFace) defines its own."""

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scaled logits (B x C, float32) for raw embeddings (B x D) and integer class labels (B,)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must be (B, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        # Disable autocast so the matmul and the trigonometry stay in float32 (see the module docstring).
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = embeddings.float()
            raw_norm = emb.norm(p=2, dim=1, keepdim=True)
            # Gradient flows through this division (FACTS 6: "divided by its raw norm").
            unit = emb / raw_norm.clamp_min(1e-12)
            w = F.normalize(self.weight.float(), dim=1)
            cosine = (unit @ w.t()).clamp(-1.0 + self.eps, 1.0 - self.eps)
            labels = labels.long().view(-1, 1)
            cos_target = cosine.gather(1, labels).squeeze(1)
            new_target = self.target_logit(cos_target, raw_norm.squeeze(1).detach())
            logits = cosine.scatter(1, labels, new_target.unsqueeze(1).to(cosine.dtype))
            return logits * self.s


class AdaFaceHead(MarginHead):
    """AdaFace (Kim et al., CVPR 2022; FACTS 6): a margin adapted to image quality, proxied by the embedding norm.

    With ``n`` the raw embedding norm (detached, clipped to [0.001, 100]) and ``mu``/``sigma`` EMAs of the batch mean
    and unbiased batch std of ``n``::

        z = clip(h * (n - mu) / (sigma + 1e-3), -1, 1)
        target = cos(clip(theta - m * z, eps, pi - eps)) - (m + m * z)
        other  = cos(theta)

    all multiplied by ``s``. The paper's (and Digi2Real's) values are m = 0.4, h = 0.333, s = 64 — the defaults here.
    The official AdaFace CLI defaults differ (m = 0.5, h = 0.0), so configurations copied from it must be corrected.

    Running statistics ``batch_mean`` (starts at 20) and ``batch_std`` (starts at 100) are buffers, so they are saved
    in ``state_dict`` and restored on resume. In training mode each forward first updates them with the current batch,
    ``stat <- t_alpha * batch_stat + (1 - t_alpha) * stat``, then uses the updated values for ``z`` (as the official
    implementation orders it); a batch of one sample has no unbiased std, so then only the mean is updated. In eval
    mode they are only read.
    """

    def __init__(self, embedding_dim: int, num_classes: int, m: float = 0.4, h: float = 0.333, s: float = 64.0,
                 t_alpha: float = 0.01, eps: float = 1e-3) -> None:
        super().__init__(embedding_dim, num_classes, s, m, eps)
        self.h = float(h)
        self.t_alpha = float(t_alpha)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, h={self.h}, t_alpha={self.t_alpha}"

    def target_logit(self, cos_target: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        n = norms.clamp(0.001, 100.0)
        if self.training:
            with torch.no_grad():
                a = self.t_alpha
                self.batch_mean.mul_(1.0 - a).add_(a * n.mean())
                if n.numel() > 1:  # torch.std(unbiased) of one value is NaN and would poison the EMA forever
                    self.batch_std.mul_(1.0 - a).add_(a * n.std(unbiased=True))
        z = (self.h * (n - self.batch_mean) / (self.batch_std + 1e-3)).clamp(-1.0, 1.0)
        theta = torch.acos(cos_target)
        # Angular part: theta - m z (a larger angle for low-quality samples, z < 0), kept inside (0, pi).
        theta_m = (theta - self.m * z).clamp(self.eps, math.pi - self.eps)
        # Additive part: - (m + m z), i.e. CosFace-like margin largest for high-quality samples.
        return torch.cos(theta_m) - (self.m + self.m * z)


class ArcFaceHead(MarginHead):
    """ArcFace (Deng et al., CVPR 2019; FACTS 6): target ``cos(theta + m)``, s = 64, m = 0.5.

    ``cos(theta + m)`` stops decreasing in theta once ``theta + m > pi``, which would reward pushing a sample further
    from its class. As in the usual non-"easy-margin" form, past that threshold (``theta > pi - m``) the target becomes
    ``cos(theta) - m * sin(m)``, a CosFace-like penalty that is continuous at the threshold and keeps decreasing.
    """

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 eps: float = 1e-3) -> None:
        super().__init__(embedding_dim, num_classes, s, m, eps)

    def target_logit(self, cos_target: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cos_target)
        with_margin = torch.cos(theta + self.m)
        fallback = cos_target - self.m * math.sin(self.m)
        return torch.where(theta + self.m <= math.pi, with_margin, fallback)


class CosFaceHead(MarginHead):
    """CosFace (Wang et al., CVPR 2018; FACTS 6): target ``cos(theta) - m``, s = 64, m = 0.4."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.4,
                 eps: float = 1e-3) -> None:
        super().__init__(embedding_dim, num_classes, s, m, eps)

    def target_logit(self, cos_target: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        return cos_target - self.m


HEADS: dict[str, Callable[..., MarginHead]] = {
    "adaface": AdaFaceHead,
    "arcface": ArcFaceHead,
    "cosface": CosFaceHead,
}


def build_head(name: str, embedding_dim: int, num_classes: int, **kwargs) -> MarginHead:
    """A margin head by registry name (``adaface``, ``arcface``, ``cosface``); ``kwargs`` go to its constructor."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name](embedding_dim, num_classes, **kwargs)
