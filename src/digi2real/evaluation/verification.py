"""Pair verification accuracy in insightface's 10-fold protocol (FACTS 8; insightface ``eval/verification.py``).

Protocol, exactly as insightface's ``calculate_roc``:

* embeddings (the caller has already summed each image's and its flip's) are L2-normalised; the distance of pair i
  (rows 2i, 2i+1) is the squared L2 distance, 0..4;
* thresholds are ``np.arange(0, 4, 0.01)`` (0, 0.01, ..., 3.99); a pair is predicted "same" when ``dist < threshold``;
* pairs are split into ``folds`` contiguous folds without shuffling, as sklearn ``KFold(shuffle=False)`` does (the
  first ``n % folds`` folds hold one extra pair);
* per fold, every threshold's accuracy is measured on the other folds; the best threshold (the smallest one on ties,
  like ``np.argmax``) is applied to the held-out fold;
* the result is the mean and the population std (ddof 0) of the fold accuracies.

Speed: insightface re-scores all 400 thresholds on the training folds in a Python loop (about a second for 6000
pairs). Here each fold's correct-prediction counts for all thresholds come from two ``searchsorted`` calls on that
fold's sorted distances, and a fold's training counts are the total minus its own, so the whole protocol is a few
small array operations.

Distances are computed and compared in float64 (insightface compares float32 distances with float64 thresholds);
the two can differ only for a distance that lies within float32 rounding of a multiple of 0.01.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from digi2real.errors import Digi2RealError

__all__ = ["THRESHOLDS_STEP", "VerificationResult", "evaluate_verification", "fold_bounds", "thresholds",
           "verification_scores"]

THRESHOLDS_STEP = 0.01
FAR_TARGET = 1e-3


def thresholds() -> np.ndarray:
    """insightface's distance thresholds: ``np.arange(0, 4, 0.01)``, 400 float64 values (a fresh array per call)."""
    return np.arange(0, 4, THRESHOLDS_STEP)


def fold_bounds(n: int, folds: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each contiguous fold, sized like sklearn ``KFold(n_splits=folds, shuffle=False)``."""
    if folds < 2:
        raise Digi2RealError(f"folds = {folds}; the verification protocol needs at least 2 folds (insightface: 10)")
    if n < folds:
        raise Digi2RealError(f"{n} pairs cannot be split into {folds} folds; use fewer folds or more pairs")
    base, extra = divmod(n, folds)
    bounds = []
    start = 0
    for f in range(folds):
        stop = start + base + (1 if f < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of :func:`evaluate_verification` (insightface protocol, FACTS 8).

    ``accuracy`` is the mean of ``fold_accuracies`` and ``std`` their population std (ddof 0), as insightface
    reports them; ``best_thresholds`` is the distance threshold chosen on each fold's training part;
    ``tar_at_far_1e3`` is the true accept rate at a false accept rate of 1e-3 over all pairs (``None`` when the
    labels are all one class, so no ROC exists); ``pairs`` is the number of pairs.
    """

    accuracy: float
    std: float
    fold_accuracies: tuple[float, ...]
    best_thresholds: tuple[float, ...]
    tar_at_far_1e3: float | None
    pairs: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["fold_accuracies"] = list(self.fold_accuracies)
        d["best_thresholds"] = list(self.best_thresholds)
        return d


def verification_scores(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance (0..4) of each pair of L2-normalised embeddings.

    ``embeddings`` is 2N x D with pair i in rows 2i and 2i+1 (flip-summed already by the caller). A zero row stays
    zero, as sklearn ``normalize`` leaves it. Returns N float64 distances.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] % 2 != 0 or emb.shape[0] == 0:
        raise Digi2RealError(f"embeddings have shape {emb.shape}; expected 2N x D with pair i in rows 2i, 2i+1")
    if not np.isfinite(emb).all():
        raise Digi2RealError("embeddings contain NaN or infinity; check the model and its input preprocessing")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    norms[norms == 0] = 1.0  # sklearn's normalize divides a zero vector by 1, leaving it zero
    emb = emb / norms
    diff = emb[0::2] - emb[1::2]
    return np.einsum("ij,ij->i", diff, diff)


def _fold_correct_counts(dist: np.ndarray, same: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Correct predictions of one fold for every threshold: same pairs with d < t plus different pairs with d >= t."""
    d_same = np.sort(dist[same])
    d_diff = np.sort(dist[~same])
    # side="left" counts elements strictly below t, matching insightface's ``dist < threshold``.
    same_below = np.searchsorted(d_same, thr, side="left")
    diff_at_or_above = d_diff.size - np.searchsorted(d_diff, thr, side="left")
    return same_below + diff_at_or_above


def _tar_at_far(dist: np.ndarray, same: np.ndarray) -> float | None:
    if same.all() or not same.any():
        return None  # no ROC: one of the two rates has no pairs to count
    # Imported here so this module stays usable while metrics.py is developed separately.
    from digi2real.evaluation.metrics import roc_curve, tar_at_far

    fpr, tpr, _ = roc_curve(same, -dist)  # higher score = more likely the same identity
    return float(tar_at_far(fpr, tpr, [FAR_TARGET])[FAR_TARGET])


def evaluate_verification(
    embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray, folds: int = 10
) -> VerificationResult:
    """Verification accuracy of 2N embeddings and N labels in insightface's k-fold protocol (module docstring)."""
    dist = verification_scores(embeddings)
    same = np.asarray(issame)
    if same.ndim != 1 or same.size != dist.size:
        raise Digi2RealError(f"{same.size} labels for {dist.size} pairs; issame must hold exactly one label per pair")
    same = same.astype(bool)
    thr = thresholds()
    bounds = fold_bounds(dist.size, folds)

    # counts[f, k]: correct predictions in fold f at threshold k. A fold's training counts = total - its own.
    counts = np.stack([_fold_correct_counts(dist[a:b], same[a:b], thr) for a, b in bounds])
    total = counts.sum(axis=0)
    fold_acc: list[float] = []
    best_thr: list[float] = []
    for f, (a, b) in enumerate(bounds):
        # Accuracy on the training folds is train_count / constant, so the argmax of the counts is the argmax of the
        # accuracies; np.argmax returns the first (smallest threshold) on ties, as insightface's does.
        best = int(np.argmax(total - counts[f]))
        best_thr.append(float(thr[best]))
        fold_acc.append(float(counts[f, best]) / (b - a))
    acc = np.asarray(fold_acc)
    return VerificationResult(
        accuracy=float(acc.mean()),
        std=float(acc.std(ddof=0)),
        fold_accuracies=tuple(fold_acc),
        best_thresholds=tuple(best_thr),
        tar_at_far_1e3=_tar_at_far(dist, same),
        pairs=int(dist.size),
    )
