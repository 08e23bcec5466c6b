"""The Fréchet distance between two Gaussians, shared by the realism shift's gap numbers (Arc2Face conditionings,
paper Figure 3) and the audit's realism gap (ArcFace embeddings, issue 14)."""

from __future__ import annotations

import numpy as np


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (tiny negatives clipped)."""
    sym = 0.5 * (matrix + matrix.T)
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance between Gaussians: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``, in float64.

    ``tr((S1 S2)^(1/2))`` is computed as ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))``: the same eigenvalues, but of a symmetric
    PSD matrix, so eigen-decompositions suffice, round-off cannot produce complex values, and covariances of fewer
    rows than dimensions (rank-deficient) give a finite answer."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    root1 = sqrt_psd(np.asarray(cov1, np.float64))
    middle = root1 @ np.asarray(cov2, np.float64) @ root1
    values = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    cross = float(np.sqrt(np.clip(values, 0.0, None)).sum())
    value = float(diff @ diff) + float(np.trace(cov1) + np.trace(cov2)) - 2.0 * cross
    return max(value, 0.0)
