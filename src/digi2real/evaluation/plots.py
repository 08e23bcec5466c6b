"""ROC plots as PNG (matplotlib, Agg backend: no display needed), one benchmark per figure, models overlaid.

IJB curves are TAR against FAR on a log FAR axis (the region the paper reports, FAR 1e-6..1). Verification-set
curves are the ROC of ``-distance`` (higher = more likely the same person) from :func:`metrics.roc_curve`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from digi2real.fileio import atomic_path

Curve = tuple[np.ndarray, np.ndarray]  # (fpr, tpr)


def verification_roc(embeddings: np.ndarray, issame: np.ndarray) -> Curve:
    """ROC of a verification set from its 2N flip-summed embeddings (score = -squared L2 of normalised pairs)."""
    from digi2real.evaluation.metrics import roc_curve
    from digi2real.evaluation.verification import verification_scores

    fpr, tpr, _ = roc_curve(np.asarray(issame, bool), -verification_scores(embeddings))
    return np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)


def plot_roc(path: str | Path, curves: Mapping[str, Curve], title: str, log_far: bool = True) -> Path:
    """Write one ROC figure with a curve per label; written atomically (PNG). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless servers have no display; Agg renders straight to files
    from matplotlib.figure import Figure

    # A Figure object, not pyplot: no global figure registry to leak between calls.
    fig = Figure(figsize=(5.5, 4.5), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    floor = 1.0  # smallest positive FAR drawn: the log axis starts there, not decades before any data
    for label, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr, np.float64)
        tpr = np.asarray(tpr, np.float64)
        if log_far:
            keep = fpr > 0  # log axis: the (0, tpr) start of the ROC cannot be drawn
            fpr, tpr = fpr[keep], tpr[keep]
            if fpr.size:
                floor = min(floor, float(fpr.min()))
        ax.plot(fpr, tpr * 100.0, label=label, linewidth=1.4)
    if log_far:
        ax.set_xscale("log")
        ax.set_xlim(max(floor if floor < 1.0 else 1e-6, 1e-7), 1.0)
    else:
        ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 100.5)
    ax.set_xlabel("False accept rate (FAR)")
    ax.set_ylabel("True accept rate (TAR, %)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
