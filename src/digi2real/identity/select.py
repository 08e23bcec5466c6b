"""`select`: identity prototypes and the paper's filtering of near-duplicate identities (paper section 4.1, Table 4).

DigiFace draws identities from random attribute combinations, so some look alike; training on them as different
classes hurt IJB-B/C in the paper (Table 3). The paper sorts identities by their similarity to the others and keeps
the least similar (Table 4); the natural reading, used here, is each prototype's maximum cosine to any other prototype.
A greedy variant keeps an identity only if it is below a threshold to everything kept so far.

Similarities are computed in row blocks of the upper triangle, so 110K identities need a few hundred MB, not 48 GB.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

import digi2real
from digi2real.config import SelectConfig
from digi2real.errors import Digi2RealError
from digi2real.fileio import atomic_open, write_json
from digi2real.identity.sphere import l2_normalize
from digi2real.identity.store import EmbeddingStore


class Prototypes(NamedTuple):
    """Per-identity prototypes: ``labels[i]`` has unit vector ``vectors[i]`` averaged from ``counts[i]`` embeddings."""

    labels: list
    vectors: np.ndarray
    counts: np.ndarray


def prototypes(embeddings: np.ndarray, labels) -> Prototypes:
    """Class prototypes: the mean of each identity's L2-normalised embeddings, re-normalised (paper section 3).

    ``labels`` is a sequence aligned with the rows of ``embeddings``; identities keep their first-appearance order.
    """
    embeddings = np.asarray(embeddings)
    labels = list(labels)
    if len(labels) != len(embeddings):
        raise ValueError(f"{len(labels)} labels for {len(embeddings)} embeddings")
    order: dict = {}
    codes = np.fromiter((order.setdefault(lab, len(order)) for lab in labels), dtype=np.int64, count=len(labels))
    sums = np.zeros((len(order), embeddings.shape[1]), np.float64)
    # In row chunks, so 550K x 512 embeddings never need a normalised full copy; within a chunk each run of equal
    # labels (an identity's images are usually adjacent) is summed by reduceat, and only the run sums are scattered.
    for start in range(0, len(codes), 65536):
        x = l2_normalize(embeddings[start : start + 65536].astype(np.float32, copy=False))
        c = codes[start : start + 65536]
        runs = np.concatenate([[0], np.flatnonzero(np.diff(c)) + 1])
        np.add.at(sums, c[runs], np.add.reduceat(x, runs, axis=0, dtype=np.float64))
    counts = np.bincount(codes, minlength=len(order))
    return Prototypes(list(order), l2_normalize(sums).astype(np.float32), counts)


def max_similarity(vectors: np.ndarray, block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each unit vector, its largest cosine to any other vector and the index of that nearest one.

    Walks the upper triangle of the Gram matrix in row blocks: each block's products update both the block's rows and
    (by symmetry) the later rows' columns, so every pair is computed once and memory stays at block_size x N.
    """
    p = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(p)
    best = np.full(n, -np.inf, np.float32)
    nearest = np.full(n, -1, np.int64)
    if n < 2:
        return best, nearest
    for i0 in range(0, n, block_size):
        i1 = min(n, i0 + block_size)
        b = i1 - i0
        sims = p[i0:i1] @ p[i0:].T  # b x (n - i0): this block against itself and every later row
        sims[np.arange(b), np.arange(b)] = -np.inf
        row_arg = sims.argmax(axis=1)
        row_max = sims[np.arange(b), row_arg]
        better = row_max > best[i0:i1]
        best[i0:i1] = np.where(better, row_max, best[i0:i1])
        nearest[i0:i1] = np.where(better, row_arg + i0, nearest[i0:i1])
        if i1 < n:
            later = sims[:, b:]
            col_arg = later.argmax(axis=0)
            col_max = later[col_arg, np.arange(n - i1)]
            better = col_max > best[i1:]
            best[i1:] = np.where(better, col_max, best[i1:])
            nearest[i1:] = np.where(better, col_arg + i0, nearest[i1:])
    return best, nearest


def select_distinct(prototypes: np.ndarray, n: int | None, block_size: int = 1024) -> np.ndarray:
    """Indices of the ``n`` prototypes least similar to any other, least similar first (paper Table 4).

    Sort key: each prototype's maximum cosine to any other prototype; ties keep the original order.
    """
    best, _ = max_similarity(prototypes, block_size)
    order = np.argsort(best, kind="stable")
    return order if n is None else order[:n]


def select_greedy(prototypes: np.ndarray, threshold: float, n: int | None = None, order: np.ndarray | None = None,
                  block_size: int = 1024) -> np.ndarray:
    """Walk prototypes in ``order`` and keep each one whose cosine to every kept prototype is below ``threshold``.

    Candidates are screened a block at a time against everything kept (one matrix product), and only the survivors
    are resolved one by one within the block, so the walk over 110K identities stays vectorised.
    """
    p = np.ascontiguousarray(prototypes, dtype=np.float32)
    order = np.arange(len(p)) if order is None else np.asarray(order)
    limit = len(p) if n is None else n
    kept = np.empty((min(limit, len(p)), p.shape[1]), np.float32)
    kept_idx: list[int] = []
    for start in range(0, len(order), block_size):
        cand = order[start : start + block_size]
        vecs = p[cand]
        alive = np.ones(len(cand), bool)
        if kept_idx:
            alive &= (vecs @ kept[: len(kept_idx)].T).max(axis=1) < threshold
        within = vecs @ vecs.T
        for k in range(len(cand)):
            if not alive[k]:
                continue
            kept[len(kept_idx)] = vecs[k]
            kept_idx.append(int(cand[k]))
            if len(kept_idx) >= limit:
                return np.asarray(kept_idx, np.int64)
            alive[k + 1 :] &= within[k, k + 1 :] < threshold
    return np.asarray(kept_idx, np.int64)


@dataclass
class Selection:
    """The selected identities, least similar first, with the statistics written to ``ids.csv``."""

    identities: list[str]
    max_similarity: np.ndarray
    nearest: list[str]
    images: np.ndarray
    meta: dict


def select_identities(store: EmbeddingStore, cfg: SelectConfig) -> Selection:
    """Prototypes of every identity in ``store``, then the configured selection (least_similar or greedy)."""
    started = time.perf_counter()
    protos = prototypes(store.embeddings, store.identities)
    eligible = np.flatnonzero(protos.counts >= cfg.min_images)
    if len(eligible) == 0:
        raise Digi2RealError(f"no identity has select.min_images={cfg.min_images} embedded images")
    vectors = protos.vectors if len(eligible) == len(protos.labels) else protos.vectors[eligible]
    labels = [protos.labels[i] for i in eligible]
    best, nearest = max_similarity(vectors, cfg.block_size)
    order = np.argsort(best, kind="stable")
    if cfg.method == "least_similar":
        chosen = order if cfg.n is None else order[: cfg.n]
    elif cfg.method == "first":  # no similarity filtering: the paper's unfiltered sets (Tables 1-3)
        everyone = np.arange(len(labels))
        chosen = everyone if cfg.n is None else everyone[: cfg.n]
    else:
        assert cfg.threshold is not None
        chosen = select_greedy(vectors, cfg.threshold, cfg.n, order=order, block_size=cfg.block_size)
    if cfg.n is not None and len(chosen) < cfg.n:
        note = f"only {len(chosen)} identities available" if cfg.method != "greedy" else (
            f"only {len(chosen)} identities pass select.threshold={cfg.threshold}")
    else:
        note = ""
    meta = {
        "stage": "select",
        "digi2real_version": digi2real.__version__,
        "method": cfg.method,
        "n": cfg.n,
        "threshold": cfg.threshold,
        "min_images": cfg.min_images,
        "eligible": int(len(eligible)),
        "selected": int(len(chosen)),
        "note": note,
        "embeddings": str(store.root) if store.root else None,
        "embeddings_sha256": store.meta.get("embeddings_sha256"),
        "max_similarity_all": _quantiles(best),
        "max_similarity_selected": _quantiles(best[chosen]),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return Selection(
        identities=[labels[i] for i in chosen],
        max_similarity=best[chosen],
        nearest=[labels[j] if j >= 0 else "" for j in nearest[chosen]],
        images=protos.counts[eligible][chosen],
        meta=meta,
    )


def _quantiles(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return {}
    q = np.quantile(x, [0.0, 0.5, 0.95, 1.0])
    return {"min": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "max": float(q[3])}


def meta_path_for(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.name + ".json")


def write_selection(path: str | Path, selection: Selection) -> None:
    """Write ``ids.csv`` (rank, identity, max_similarity, nearest_identity, images) and ``ids.csv.json`` (settings)."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "identity", "max_similarity", "nearest_identity", "images"])
    for rank, (ident, sim, near, count) in enumerate(
        zip(selection.identities, selection.max_similarity, selection.nearest, selection.images)
    ):
        writer.writerow([rank, ident, f"{float(sim):.6f}", near, int(count)])
    with atomic_open(path, "w") as handle:
        handle.write(buf.getvalue())
    write_json(meta_path_for(path), selection.meta)


def read_selection(path: str | Path) -> list[str]:
    """Identity ids from an ``ids.csv`` written by `select`, or any CSV with an ``identity`` column, or one id a line."""
    path = Path(path)
    if not path.is_file():
        raise Digi2RealError(f"{path}: identity list not found; create it with `digi2real select EMBEDDINGS -o {path}`")
    try:
        if path.stat().st_size > 1 << 30:
            raise Digi2RealError(f"{path}: over 1 GiB is not an identity list; pass the ids.csv written by `select`")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise Digi2RealError(f"{path}: not a text file (not UTF-8); pass the ids.csv written by `digi2real select`") from None
    if "\x00" in text:
        raise Digi2RealError(f"{path}: holds NUL bytes, not an identity list; pass the ids.csv written by `select`")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise Digi2RealError(f"{path}: the identity list is empty")
    rows = list(csv.reader(lines))
    header = [h.strip() for h in rows[0]]
    if "identity" in header:
        col = header.index("identity")
        ids = [r[col].strip() for r in rows[1:] if len(r) > col]
    else:
        ids = [r[0].strip() for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise Digi2RealError(f"{path}: identity {dup!r} is listed twice; each identity may appear once")
    return ids
