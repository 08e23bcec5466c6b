"""The report's plots as PNG bytes (matplotlib, Agg: no display needed).

Each function builds a :class:`matplotlib.figure.Figure` directly (never pyplot, so no figure is registered in a global
list), renders it at a modest dpi into memory and clears it before returning.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

DPI = 80
REAL, SYNTHETIC, SHIFTED = "#2b5d9b", "#d9822b", "#2e8b57"
GENUINE, IMPOSTOR = "#2e8b57", "#a4262c"


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        fig.clear()
    return buf.getvalue()


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components (SVD of the centred matrix).

    Returns (N x 2 coordinates, explained-variance fraction of the two components). Fewer than two informative
    directions give zero columns rather than an error."""
    x = np.asarray(points, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    coords = np.zeros((len(x), 2))
    coords[:, :k] = x @ vt[:k].T
    var = s ** 2
    frac = np.zeros(2)
    if var.sum() > 0:
        frac[:k] = var[:k] / var.sum()
    # A deterministic sign: the component's largest loading is positive (SVD signs are arbitrary).
    for j in range(k):
        if vt[j, np.argmax(np.abs(vt[j]))] < 0:
            coords[:, j] = -coords[:, j]
    return coords, frac


def realism_map(real: np.ndarray, synthetic: np.ndarray, shift: np.ndarray, weight: float) -> bytes:
    """Figure 3 of the paper as a PCA map: real vs synthetic conditionings (left), real vs synthetic + weight * shift
    (right). The PCA is fitted on all three sets together, so both panels share one projection and one scale."""
    shifted = synthetic + weight * shift[None, :]
    coords, frac = pca_2d(np.concatenate([real, synthetic, shifted]))
    nr, ns = len(real), len(synthetic)
    parts = {"real": coords[:nr], "synthetic": coords[nr:nr + ns], "shifted": coords[nr + ns:]}
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    pad = 0.05 * np.maximum(hi - lo, 1e-9)
    fig = _figure(10.0, 4.4)
    size = 9 if len(coords) < 2000 else 4
    panels = (("before the shift", "synthetic", SYNTHETIC, "synthetic"),
              (f"after the shift (weight {weight:g})", "shifted", SHIFTED, "synthetic + shift"))
    for i, (title, key, colour, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(parts["real"][:, 0], parts["real"][:, 1], s=size, c=REAL, alpha=0.55, label="real", linewidths=0)
        ax.scatter(parts[key][:, 0], parts[key][:, 1], s=size, c=colour, alpha=0.55, label=label, linewidths=0)
        for pts, col in ((parts["real"], REAL), (parts[key], colour)):
            c = pts.mean(axis=0)
            ax.scatter([c[0]], [c[1]], s=120, marker="X", c=col, edgecolors="black", linewidths=0.8)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xlabel(f"PC1 ({100 * frac[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * frac[1]:.1f}%)")
        ax.set_title(title)
        ax.grid(True, alpha=0.25)
        ax.legend(loc="best", fontsize=8, markerscale=2)
    return _png(fig)


def similarity_histograms(panels: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """One panel per name: genuine vs impostor cosine similarity histograms (densities, shared bins)."""
    n = max(len(panels), 1)
    fig = _figure(5.0 * n, 3.6)
    for i, (name, (genuine, impostor)) in enumerate(panels.items()):
        ax = fig.add_subplot(1, n, i + 1)
        values = np.concatenate([genuine, impostor]) if len(genuine) + len(impostor) else np.zeros(1)
        lo, hi = float(values.min()), float(values.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.05, hi + 0.05
        bins = np.linspace(lo, hi, 51)
        if len(genuine):
            ax.hist(genuine, bins=bins, density=True, alpha=0.55, color=GENUINE, label=f"genuine ({len(genuine)})")
        if len(impostor):
            ax.hist(impostor, bins=bins, density=True, alpha=0.55, color=IMPOSTOR,
                    label=f"impostor ({len(impostor)})")
        ax.set_xlabel("cosine similarity (ArcFace)")
        ax.set_ylabel("density")
        ax.set_title(name)
        ax.grid(True, alpha=0.25)
        ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def value_histograms(panels: Sequence[tuple[str, Mapping[str, np.ndarray], float | None]], xlabel: str = "") -> bytes:
    """Panels of overlaid histograms: (title, {label: values}, optional vertical line such as a gate threshold)."""
    n = max(len(panels), 1)
    fig = _figure(4.4 * n, 3.4)
    colours = (GENUINE, IMPOSTOR, REAL, SYNTHETIC)
    for i, (title, groups, line) in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        values = [np.asarray(v, np.float64) for v in groups.values() if len(v)]
        if values:
            allv = np.concatenate(values)
            lo, hi = float(allv.min()), float(allv.max())
            if line is not None:
                lo, hi = min(lo, line), max(hi, line)
            if hi - lo < 1e-6:
                lo, hi = lo - 0.05, hi + 0.05
            bins = np.linspace(lo, hi, 41)
            for j, (label, v) in enumerate(groups.items()):
                if len(v):
                    ax.hist(np.asarray(v, np.float64), bins=bins, alpha=0.6, color=colours[j % len(colours)],
                            label=f"{label} ({len(v)})")
        if line is not None:
            ax.axvline(line, color="black", linestyle="--", linewidth=1.2, label=f"gate {line:g}")
        ax.set_title(title)
        ax.set_xlabel(xlabel or title)
        ax.set_ylabel("images")
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def cosine_distributions(panels: Sequence[tuple[str, Mapping[str, np.ndarray]]]) -> bytes:
    """Panels of overlaid cosine histograms as densities (sets of very different sizes compare by shape), each panel's
    sets on shared bins; a set of fewer than 20 values is drawn as ticks instead of bars (along the axis under the
    histograms, or one row per set in a panel without any)."""
    n = max(len(panels), 1)
    fig = _figure(5.6 * n, 3.8)
    colours = (SYNTHETIC, SHIFTED, REAL, IMPOSTOR, "#6b4c9a")
    for i, (title, groups) in enumerate(panels):
        ax = fig.add_subplot(1, n, i + 1)
        sets = {k: np.asarray(v, np.float64)[np.isfinite(np.asarray(v, np.float64))] for k, v in groups.items()}
        values = [v for v in sets.values() if len(v)]
        allv = np.concatenate(values) if values else np.zeros(1)
        lo, hi = float(allv.min()), float(allv.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.05, hi + 0.05
        bins = np.linspace(lo, hi, 41)
        bars = any(len(v) >= 20 for v in sets.values())
        for j, (label, v) in enumerate(sets.items()):
            colour = colours[j % len(colours)]
            if len(v) >= 20:
                ax.hist(v, bins=bins, density=True, alpha=0.5, color=colour, label=f"{label} ({len(v)})")
            elif len(v):
                ax.plot(v, np.full_like(v, 0.0 if bars else -j), "|", markersize=14, markeredgewidth=2,
                        color=colour, label=f"{label} ({len(v)})")
        ax.set_title(title)
        ax.set_xlabel("cosine similarity (ArcFace)")
        if bars:
            ax.set_ylabel("density")
        else:
            ax.set_yticks([])
            ax.set_ylim(-len(sets) + 0.3, 0.5 + 0.6 * len(sets))  # room above the rows for the legend
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=7)
    return _png(fig)


def curves(panels: Sequence[tuple[str, Mapping[str, tuple[np.ndarray, np.ndarray]], bool]]) -> bytes:
    """Line plots against the training step: (title, {label: (steps, values)}, log y axis) per panel, 2 per row."""
    n = max(len(panels), 1)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig = _figure(5.2 * cols, 3.2 * rows)
    for i, (title, series, log_y) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, linewidth=1.3, label=label)
        if log_y and all(np.all(np.asarray(y) > 0) for _, y in series.values()):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.25)
        if len(series) > 1 or title.startswith("verification"):  # name the verification sets
            ax.legend(fontsize=8)
    return _png(fig)
