"""Geometry on the unit hypersphere of identity embeddings (paper section 3, "Generating Intra-class Variations").

The paper varies an identity by walking from its prototype ``mu`` toward one of its sample embeddings ``e`` along the
great circle (SLERP, eqs. 3-4) by a fraction ``t`` drawn from Beta(alpha, alpha) (eq. 5). Every function here accepts
numpy arrays or torch tensors and keeps the caller's type, so the generator can run it on the GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any  # numpy.ndarray or torch.Tensor


def _is_torch(x: Any) -> bool:
    # Checked by module name so numpy callers (select, plan on 110K identities) never pay for importing torch.
    return type(x).__module__.startswith("torch") and type(x).__name__ == "Tensor"


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """Project vectors (last axis) onto the unit sphere."""
    if _is_torch(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    x = np.asarray(x)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def slerp(mu: Array, e: Array, t: Array | float) -> Array:
    """Spherical linear interpolation from ``mu`` toward ``e`` by the fraction ``t`` (paper eqs. 3 and 4).

    ``slerp = [sin((1 - t) theta) mu + sin(t theta) e] / sin(theta)`` where ``theta = arccos(mu . e)`` is the angle
    between them (eq. 4; computed in an equivalent, numerically stable form).
    ``mu`` and ``e`` are unit vectors on the last axis (batched with broadcasting); ``t`` is a scalar or broadcasts
    against the batch shape. The result has unit norm and makes the angle ``t * theta`` with ``mu``.

    Degenerate cases, where ``sin(theta)`` is ~0 and the formula divides by zero:
    - ``e`` coincides with ``mu``: the path is a point; ``mu`` is returned (FACTS 1).
    - ``e`` is antipodal to ``mu``: every great circle joins them, so the path is undefined; ``mu`` is returned
      rather than an arbitrary direction, so the output stays finite and deterministic.
    """
    use_torch = _is_torch(mu) or _is_torch(e) or _is_torch(t)
    if use_torch:
        import torch

        ref = mu if _is_torch(mu) else e if _is_torch(e) else t
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        mu = torch.as_tensor(mu, dtype=dtype, device=ref.device)
        e = torch.as_tensor(e, dtype=dtype, device=ref.device)
        t = torch.as_tensor(t, dtype=dtype, device=ref.device)
        lib = torch
    else:
        mu, e = np.asarray(mu), np.asarray(e)
        dtype = np.result_type(mu.dtype, e.dtype, np.float32)
        mu, e, t = mu.astype(dtype, copy=False), e.astype(dtype, copy=False), np.asarray(t, dtype=dtype)
        lib = np
        torch = None

    # theta = arccos(mu . e) (eq. 4), evaluated as 2 atan2(|mu - e|, |mu + e|): the same angle for unit vectors, but
    # accurate near 0 and pi, where arccos loses half the digits and the division by sin(theta) amplifies the loss.
    if use_torch:
        theta = 2.0 * torch.atan2(torch.linalg.vector_norm(mu - e, dim=-1), torch.linalg.vector_norm(mu + e, dim=-1))
    else:
        theta = 2.0 * np.arctan2(np.linalg.norm(mu - e, axis=-1), np.linalg.norm(mu + e, axis=-1))
    sin_theta = lib.sin(theta)
    # Below this, sin(theta) carries no information in the dtype's precision: treat as coincident or antipodal.
    tiny = 1e-6 if mu.dtype in (np.float64, getattr(torch, "float64", np.float64)) else 1e-4
    degenerate = sin_theta < tiny
    safe_sin = lib.where(degenerate, lib.ones_like(sin_theta), sin_theta)
    w_mu = lib.sin((1.0 - t) * theta) / safe_sin
    w_e = lib.sin(t * theta) / safe_sin
    w_mu = lib.where(degenerate, lib.ones_like(w_mu), w_mu)
    w_e = lib.where(degenerate, lib.zeros_like(w_e), w_e)
    return w_mu[..., None] * mu + w_e[..., None] * e


def sample_t(rng: np.random.Generator, alpha: float, size: int | tuple[int, ...] | None = None) -> Any:
    """Interpolation fractions ``t ~ Beta(alpha, alpha)`` (paper eq. 5); alpha = 1 is uniform on [0, 1]."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return rng.beta(alpha, alpha, size=size)


def angle(a: Array, b: Array) -> Array:
    """Angle (radians) between unit vectors on the last axis: arccos(a . b), as 2 atan2(|a - b|, |a + b|)."""
    if _is_torch(a):
        import torch

        return 2.0 * torch.atan2(torch.linalg.vector_norm(a - b, dim=-1), torch.linalg.vector_norm(a + b, dim=-1))
    a, b = np.asarray(a), np.asarray(b)
    return 2.0 * np.arctan2(np.linalg.norm(a - b, axis=-1), np.linalg.norm(a + b, axis=-1))
