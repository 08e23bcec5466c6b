"""The audit's arithmetic on stored embeddings (issue 14): nearest identities, thresholds, and the four measures.

Everything here is numpy on unit vectors (ArcFace embeddings, L2-normalised, so cosine = dot product). An identity is
represented by its prototype, the L2-normalised mean of its images' embeddings (paper Sec. 3, "class prototype
vector"); the paper's identity filter sorts identities by "their cosine similarities with other identities" (Sec. 4.1,
Table 4), which :func:`distinctness` measures after generation.

Scale (issue 14): 20,000 identities x 20 images against a 100,000-identity reference in minutes on 2 CPU cores. Every
similarity matrix is computed in blocks (never the full queries x table matrix) with a running top-k merged per
block; image-level comparisons are restricted to the k nearest identities by prototype; pooled statistics use seeded
samples where the full set of pairs would not fit. Products optionally run in torch on a GPU (``device="cuda"``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator
from functools import cached_property
from typing import Any, NoReturn

import numpy as np

from digi2real.errors import Digi2RealError
from digi2real.frechet import frechet_distance as gaussian_frechet

#: Quantiles reported for every distribution (name, q).
QUANTILES = (("min", 0.0), ("p1", 0.01), ("p5", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75),
             ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
#: Query and table rows per block of products: 4096 x 4096 float32 scores are 64 MB (numpy), 16384^2 1 GB (GPU).
BLOCK_CPU = 4096
BLOCK_GPU = 16384
#: Rows gathered at once for row-wise dot products and sums: 16384 x 512 float32 is 32 MB.
CHUNK = 16384
#: Scores in one product of an identity's images with its candidates' images (64 MB of float32).
SCORES_PER_PRODUCT = 1 << 24
#: Duplicate pairs kept (highest first) by :func:`distinctness`; the count above the threshold is always exact.
MAX_LISTED_PAIRS = 100_000
#: Within-identity image pairs pooled by :func:`consistency` before it samples them instead.
MAX_GENUINE_PAIRS = 5_000_000
#: Unit rows: ArcFace rows stored as float16 are unit to ~1e-3; anything further off was not normalised.
UNIT_TOLERANCE = 1e-2


# ------------------------------------------------------------------------------------------------------ the data


@dataclass(eq=False)
class Embedded:
    """One face set's embeddings: rows are images, grouped in identities."""

    name: str
    vectors: np.ndarray  # float32 [n, d], unit rows (ArcFace, L2-normalised)
    labels: np.ndarray  # int64 [n], identity index 0..m-1 of each row; every identity has >= 1 row
    identities: list[str]  # m names
    #: int64 [p, 2] pairs of identity indices known to be different people (a .bin benchmark's listed non-match
    #: pairs); None = any two identities are different people
    impostor_pairs: np.ndarray | None = None
    landmarks: np.ndarray | None = None  # float32 [n, 5, 2] five landmarks in the 112 x 112 aligned crop (pixels)
    brightness: np.ndarray | None = None  # float32 [n] mean grey level of the crop (0..255), see crop_stats
    contrast: np.ndarray | None = None  # float32 [n] std of the crop's grey level

    def __post_init__(self) -> None:
        self.identities = list(self.identities)
        self.vectors = self._floats(self.vectors, "vectors", 2, finite=False)  # _check_unit, a chunk at a time
        n, m = len(self.vectors), len(self.identities)
        if n == 0 or self.vectors.shape[1] == 0:
            self._refuse(f"holds no embeddings (vectors {self.vectors.shape})", "embed the set's images first")
        self._check_unit()
        self.labels = self._ints(self.labels, "labels", (n,))
        if m == 0 or self.labels.min() < 0 or self.labels.max() >= m:
            self._refuse(f"labels must be identity indices 0..{m - 1} (there are {m} identity names)",
                         "pass one name per identity and each row's index into them")
        empty = np.flatnonzero(np.bincount(self.labels, minlength=m) == 0)
        if len(empty):
            self._refuse(f"identity {self.identities[empty[0]]!r} has no image ({len(empty)} identities have none)",
                         "drop identities without embedded images")
        if self.impostor_pairs is not None:
            pairs = self._ints(self.impostor_pairs, "impostor_pairs", (-1, 2))
            if len(pairs) and (pairs.min() < 0 or pairs.max() >= m or (pairs[:, 0] == pairs[:, 1]).any()):
                self._refuse("impostor_pairs must pair two different identity indices 0..m-1",
                             "list each non-match pair as two identity indices")
            self.impostor_pairs = pairs
        if self.landmarks is not None:
            self.landmarks = self._floats(self.landmarks, "landmarks", 3, (n, 5, 2))
        for key in ("brightness", "contrast"):
            if getattr(self, key) is not None:
                setattr(self, key, self._floats(getattr(self, key), key, 1, (n,)))

    def _refuse(self, what: str, fix: str) -> NoReturn:
        raise Digi2RealError(f"face set {self.name!r}: {what}; {fix}")

    def _floats(self, x: Any, key: str, ndim: int, shape: tuple[int, ...] | None = None,
                finite: bool = True) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.ndim != ndim or (shape is not None and x.shape != shape):
            want = "x".join(map(str, shape)) if shape else f"{ndim}-d"
            self._refuse(f"{key} must be a {want} float array, got {x.dtype} {x.shape}",
                         "store float32 embeddings and measurements, one row per image")
        x = np.ascontiguousarray(x, np.float32)
        if finite and not np.isfinite(x).all():
            self._refuse(f"{key} holds NaN or infinite values", "re-embed or re-measure the images")
        return x

    def _ints(self, x: Any, key: str, shape: tuple[int, ...]) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 1 and len(x) == 0 and len(shape) == 2:
            x = x.reshape(0, 2)
        ok = x.dtype.kind in "iu" and x.ndim == len(shape) and all(w in (-1, s) for w, s in zip(shape, x.shape))
        if not ok:
            want = "x".join("p" if s == -1 else str(s) for s in shape)
            self._refuse(f"{key} must be a {want} integer array, got {x.dtype} {x.shape}",
                         "pass int64 identity indices")
        return np.ascontiguousarray(x, np.int64)

    def _check_unit(self) -> None:
        for start in range(0, len(self.vectors), CHUNK):
            rows = self.vectors[start:start + CHUNK]
            norms = np.sqrt(np.einsum("nd,nd->n", rows, rows))
            bad = np.flatnonzero(~(np.abs(norms - 1.0) <= UNIT_TOLERANCE))  # NaN compares False: bad too
            if len(bad) and not np.isfinite(norms[bad[0]]):
                self._refuse(f"vectors row {start + bad[0]} holds NaN or infinite values", "re-embed the images")
            if len(bad):
                self._refuse(f"vectors row {start + bad[0]} has norm {norms[bad[0]]:.4g}, not 1",
                             "L2-normalise the embeddings (the audit compares them by cosine = dot product)")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @cached_property
    def prototypes(self) -> np.ndarray:
        """float32 [m, d]: each identity's prototype (:func:`prototypes`)."""
        return _unit(_sums(self.vectors, self.groups))

    @cached_property
    def groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, start, count): ``order[start[i]:start[i] + count[i]]`` are identity i's rows, in row order."""
        return _groups(self.labels, len(self.identities))


def _same_dim(a: Embedded, b: Embedded) -> None:
    if a.dim != b.dim:
        raise Digi2RealError(f"face set {a.name!r} has {a.dim}-d embeddings but {b.name!r} has {b.dim}-d; embed "
                             "both sets with the same model")


# ------------------------------------------------------------------------------------------------------ prototypes


def _groups(labels: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, start, count): ``order[start[i]:start[i] + count[i]]`` are identity i's rows, in row order."""
    order = np.argsort(labels, kind="stable")
    count = np.bincount(labels, minlength=m)
    return order, (np.cumsum(count) - count).astype(np.int64), count


def _by_count(groups: tuple[np.ndarray, np.ndarray, np.ndarray], least: int = 1,
              chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (identities [g], rows [g, c]): identities with the same image count c (>= ``least``) stacked, about
    ``chunk`` rows at a time, so per-identity work is one batched numpy call (a reshaped sum over 20 images is 9x
    faster than ``np.add.reduceat`` over rows, measured on 200,000 x 512)."""
    order, start, count = groups
    for c in np.unique(count[count >= least]):
        idents = np.flatnonzero(count == c)
        step = max(1, chunk // int(c))
        for g in range(0, len(idents), step):
            sel = idents[g:g + step]
            yield sel, order[start[sel][:, None] + np.arange(c)[None, :]]


def _sums(vectors: np.ndarray, groups: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """float64 [m, d] sums of each identity's rows (gathered a chunk at a time: 400,000 x 512 rows never need a
    sorted or float64 full copy)."""
    sums = np.zeros((len(groups[2]), vectors.shape[1]), np.float64)
    for idents, rows in _by_count(groups):
        sums[idents] = vectors[rows].sum(axis=1, dtype=np.float64)
    return sums


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def prototypes(vectors: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """float32 [m, d]: identity prototypes, the L2-normalised mean of each identity's unit embeddings (paper Sec. 3,
    the "class prototype vector"; the mean's norm does not matter once normalised, so this normalises the sum)."""
    labels = np.asarray(labels, np.int64)
    return _unit(_sums(np.asarray(vectors, np.float32), _groups(labels, m)))


# ------------------------------------------------------------------------------------------------------ devices


def resolve_device(device: str | None) -> str | None:
    """The torch device to run products on, or None for numpy. ``"auto"`` is cuda when torch sees a GPU (torch is
    imported only then, and its absence means numpy); ``"cuda"``/``"cuda:N"`` must be usable."""
    if device in (None, "cpu", "numpy"):
        return None
    if device == "auto" or str(device).startswith("cuda"):
        try:
            import torch
        except ImportError:
            torch = None
        usable = torch is not None and torch.cuda.is_available()
        if device == "auto":
            return "cuda" if usable else None
        if not usable:
            why = "torch is not installed" if torch is None else "torch sees no CUDA GPU here"
            raise Digi2RealError(f"device {device!r}: {why}; use device cpu (or auto)")
        return str(device)
    raise Digi2RealError(f"device {device!r} is not one of cpu, auto, cuda, cuda:N")


class _Table:
    """Rows to compare against, on the device that computes the products: numpy, or a torch device (the table
    uploaded once, each block of queries as it comes)."""

    def __init__(self, table: np.ndarray, device: str | None) -> None:
        self.rows = np.ascontiguousarray(table, np.float32)
        self.device = device
        if device is not None:
            import torch

            self._torch = torch
            self._on_device = torch.from_numpy(self.rows).to(device)

    def scores(self, queries: np.ndarray, t0: int, t1: int) -> np.ndarray:
        """float32 [len(queries), t1 - t0]: cosines of the queries with table rows t0..t1-1."""
        if self.device is None:
            return queries @ self.rows[t0:t1].T
        q = self._torch.from_numpy(np.ascontiguousarray(queries, np.float32)).to(self.device)
        return (q @ self._on_device[t0:t1].T).cpu().numpy()


# ------------------------------------------------------------------------------------------------------ nearest


def _where(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the True entries of a 2-d mask, row-major: ``np.nonzero`` on a 4096 x 4096 mask takes 16
    times longer than ``np.flatnonzero`` and a divmod (measured, numpy 2.4), and the audit scans hundreds of them."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _block_top(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, columns) [r, k]: each row's k largest scores, ties to the lower column, columns ascending."""
    r, c = s.shape
    if k >= c:
        return s, np.broadcast_to(np.arange(c), (r, c))
    kth = np.partition(s, c - k, axis=1)[:, c - k, None]
    keep = s >= kth
    for row in np.flatnonzero(np.count_nonzero(keep, axis=1) > k):  # ties at the k-th score: lowest columns win
        above = np.flatnonzero(s[row] > kth[row])
        tied = np.flatnonzero(s[row] == kth[row])[:k - len(above)]
        keep[row] = False
        keep[row, above] = keep[row, tied] = True
    cols = _where(keep)[1].reshape(r, k)
    return np.take_along_axis(s, cols, 1), cols


def _merge(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of two candidate lists per row, best first. Exact ties keep the lower index because every index of
    ``i1`` is below every index of ``i2`` and each list holds its ties in index order (the sort is stable)."""
    s = np.concatenate([s1, s2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _new_candidates(s: np.ndarray, floor: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The scores of a block that beat each row's current k-th best (strictly: an equal score from a later block has
    a higher index and loses), padded per row with -inf; None when too many do and a block top-k is cheaper."""
    rows, cols = _where(s > floor[:, None])
    if len(rows) == 0:
        return np.empty((len(s), 0), np.float32), np.empty((len(s), 0), np.int64)
    counts = np.bincount(rows, minlength=len(s))
    width = int(counts.max())
    if width > 4 * k:
        return None
    pos = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    # padding: -inf sorts after the k real candidates every row already holds, so it is never selected
    vals = np.full((len(s), width), -np.inf, np.float32)
    idx = np.full((len(s), width), -1, np.int64)
    vals[rows, pos] = s[rows, cols]
    idx[rows, pos] = cols
    return vals, idx


def _exclusions(exclude: np.ndarray | None, q0: int, q1: int, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
    """(block rows, block columns) of the table rows the queries q0..q1-1 must not return, within t0..t1-1."""
    if exclude is None:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    ex = exclude[q0:q1]
    rows = np.flatnonzero((ex >= t0) & (ex < t1))
    return rows, ex[rows] - t0


def nearest(queries: np.ndarray, table: np.ndarray, k: int, *, exclude_self: bool = False,
            exclude: np.ndarray | None = None, block: int | None = None,
            device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 [q, k], index int64 [q, k]): the k rows of ``table`` most similar to each query (cosine = dot
    product of unit rows), best first, ties broken by the lower index.

    Computed in blocks of ``block`` queries x ``block`` table rows, never the full q x t matrix: each block keeps only
    the scores above each query's running k-th best (or, when many are, its own top-k via ``np.partition``) and
    merges them into the running top-k. ``exclude_self`` (queries is table): row i never returns itself; ``exclude``
    (int64 [q], -1 for none) names one table row per query to skip. ``k`` larger than the table is clipped.
    ``device`` "cuda"/"auto" runs the products and the top-k in torch on the GPU: the same neighbours up to float
    rounding (the order of exactly tied scores is torch's).
    """
    queries = np.ascontiguousarray(queries, np.float32)
    table = np.ascontiguousarray(table, np.float32)
    if queries.ndim != 2 or table.ndim != 2 or queries.shape[1] != table.shape[1]:
        raise Digi2RealError(f"nearest: queries {queries.shape} and table {table.shape} must be 2-d with equal widths")
    if k < 1:
        raise Digi2RealError(f"nearest: k must be >= 1, got {k}")
    if exclude_self:
        if len(queries) != len(table):
            raise Digi2RealError("nearest: exclude_self needs the queries to be the table")
        exclude = np.arange(len(queries), dtype=np.int64)
    elif exclude is not None:
        exclude = np.asarray(exclude, np.int64).reshape(len(queries))
    skips = exclude is not None and bool((exclude >= 0).any())
    k = min(k, len(table) - int(skips))
    if k <= 0 or len(queries) == 0:
        return np.empty((len(queries), max(k, 0)), np.float32), np.empty((len(queries), max(k, 0)), np.int64)
    device = resolve_device(device)
    if device is not None:
        return _nearest_torch(queries, table, k, exclude, block or BLOCK_GPU, device)
    block = block or BLOCK_CPU
    out_s = np.empty((len(queries), k), np.float32)
    out_i = np.empty((len(queries), k), np.int64)
    for q0 in range(0, len(queries), block):
        q1 = min(len(queries), q0 + block)
        best_s = np.empty((q1 - q0, 0), np.float32)
        best_i = np.empty((q1 - q0, 0), np.int64)
        for t0 in range(0, len(table), block):
            t1 = min(len(table), t0 + block)
            s = queries[q0:q1] @ table[t0:t1].T
            s[_exclusions(exclude, q0, q1, t0, t1)] = -np.inf
            new = _new_candidates(s, best_s[:, -1], k) if best_s.shape[1] == k else None
            if new is None:
                new = _block_top(s, k)
            best_s, best_i = _merge(best_s, best_i, new[0], new[1] + t0, k)
        out_s[q0:q1], out_i[q0:q1] = best_s, best_i
    return out_s, out_i


def _nearest_torch(queries: np.ndarray, table: np.ndarray, k: int, exclude: np.ndarray | None, block: int,
                   device: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest` with torch products and ``torch.topk`` per block on ``device``."""
    import torch

    t = torch.from_numpy(table).to(device)
    out_s = np.empty((len(queries), k), np.float32)
    out_i = np.empty((len(queries), k), np.int64)
    for q0 in range(0, len(queries), block):
        q1 = min(len(queries), q0 + block)
        q = torch.from_numpy(queries[q0:q1]).to(device)
        best_s = torch.empty((q1 - q0, 0), dtype=torch.float32, device=device)
        best_i = torch.empty((q1 - q0, 0), dtype=torch.int64, device=device)
        for t0 in range(0, len(table), block):
            t1 = min(len(table), t0 + block)
            s = q @ t[t0:t1].T
            rows, cols = _exclusions(exclude, q0, q1, t0, t1)
            if len(rows):
                s[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = -math.inf
            top = torch.topk(s, min(k, t1 - t0), dim=1)
            cat_s = torch.cat([best_s, top.values], 1)
            cat_i = torch.cat([best_i, top.indices + t0], 1)
            merged = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1)
            best_s, best_i = merged.values, torch.gather(cat_i, 1, merged.indices)
        out_s[q0:q1], out_i[q0:q1] = best_s.cpu().numpy(), best_i.cpu().numpy()
    return out_s, out_i


class _Above:
    """The pairs i < j of a Gram matrix's blocks whose cosine is strictly above a value: all of them counted, the
    ``keep`` highest kept (bounded memory for a set of near-copies, where every pair would be listed)."""

    def __init__(self, value: float, keep: int) -> None:
        self.value, self.keep, self.total = value, keep, 0
        self.pairs = [np.empty((0, 2), np.int64)]
        self.cos = [np.empty(0, np.float32)]

    def add(self, s: np.ndarray, i0: int, j0: int, rows: np.ndarray) -> None:
        """The pairs of block ``s`` (rows from i0, columns from j0) above the value; only ``rows`` can have any."""
        r, c = _where(s[rows] > self.value)
        r = rows[r]
        upper = c + j0 > r + i0
        if upper.any():
            self.pairs.append(np.stack([r[upper] + i0, c[upper] + j0], 1))
            self.cos.append(s[r[upper], c[upper]])
            self.total += int(upper.sum())
            if sum(map(len, self.cos)) > 2 * self.keep:
                pairs, cos = self.highest()
                self.pairs, self.cos = [pairs], [cos]

    def highest(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept pairs, by cosine descending, then by (i, j)."""
        pairs, cos = np.concatenate(self.pairs), np.concatenate(self.cos)
        order = np.lexsort((pairs[:, 1], pairs[:, 0], -cos))[:self.keep]
        return pairs[order], cos[order]


def _max_other(protos: np.ndarray, above: float | None = None, *, device: str | None = None,
               block: int | None = None) -> tuple[np.ndarray, np.ndarray, _Above | None]:
    """(max, argmax, pairs): each row's largest cosine to any other row and that row's index (ties: the lower
    index; NaN and -1 with a single row), walking the upper triangle of the Gram matrix in square blocks, every pair
    computed once (as ``identity.select.max_similarity``); with ``above``, the pairs i < j whose cosine is strictly
    greater (:class:`_Above`)."""
    device = resolve_device(device)
    block = block or (BLOCK_GPU if device else BLOCK_CPU)
    m = len(protos)
    table = _Table(protos, device)
    best = np.full(m, -np.inf, np.float32)
    arg = np.full(m, -1, np.int64)
    found = None if above is None else _Above(above, MAX_LISTED_PAIRS)
    for i0 in range(0, m, block):
        i1 = min(m, i0 + block)
        for j0 in range(i0, m, block):
            j1 = min(m, j0 + block)
            s = table.scores(table.rows[i0:i1], j0, j1)
            if j0 == i0:
                s[np.arange(i1 - i0), np.arange(i1 - i0)] = -np.inf
            # Candidates reach each row in increasing index order, so a strict improvement keeps the lower index.
            r = s.argmax(axis=1)
            row_max = s[np.arange(len(r)), r]
            _update(best, arg, i0, row_max, r + j0)  # rows against columns
            col_max, c = _column_max(s)
            _update(best, arg, j0, col_max, c + i0)  # and, by symmetry, columns against rows
            if found is not None and (row_max > above).any():
                found.add(s, i0, j0, np.flatnonzero(row_max > above))
    return np.where(arg >= 0, best, np.nan).astype(np.float32), arg, found


def _column_max(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's max and its first row. ``argmax(axis=0)`` walks a C-ordered block column by column, three times
    slower on 4096 x 4096 than finding the rows that hold each column's max (measured, numpy 2)."""
    value = s.max(axis=0)
    rows, cols = _where(s == value)
    _, first = np.unique(cols, return_index=True)
    return value, rows[first]


def _update(best: np.ndarray, arg: np.ndarray, start: int, value: np.ndarray, index: np.ndarray) -> None:
    """Raise best[start:...] (and its index) where ``value`` is strictly greater."""
    window = slice(start, start + len(value))
    better = value > best[window]
    best[window] = np.where(better, value, best[window])
    arg[window] = np.where(better, index, arg[window])


# ------------------------------------------------------------------------------------------------------ thresholds


def _pair_dots(rows: np.ndarray, i: np.ndarray, j: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """float32 cosines of rows[i[n]] and (other or rows)[j[n]], a chunk at a time (2,000,000 gathered 512-d pairs at
    once would take 8 GB)."""
    other = rows if other is None else other
    out = np.empty(len(i), np.float32)
    for start in range(0, len(i), CHUNK):
        a, b = rows[i[start:start + CHUNK]], other[j[start:start + CHUNK]]
        out[start:start + len(a)] = np.einsum("nd,nd->n", a, b)
    return out


def _distinct_pairs(m: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` ordered pairs (i, j), i != j, uniform over the m (m - 1) of them."""
    i = rng.integers(m, size=count)
    return i, (i + rng.integers(1, m, size=count)) % m


def impostor_scores(protos: np.ndarray, impostor_pairs: np.ndarray | None = None, *, max_pairs: int = 2_000_000,
                    seed: int = 0) -> np.ndarray:
    """float32 [p]: cosines between prototypes of different identities, the impostor distribution of single pairs
    (as a verification FAR, FACTS 9: the share of impostor pairs accepted).

    The listed ``impostor_pairs`` (a benchmark's non-match pairs) when given; otherwise every pair i < j when
    m (m - 1) / 2 <= ``max_pairs`` (row blocks of the Gram matrix's upper triangle, in ``np.triu_indices`` order), else
    ``max_pairs`` pairs drawn uniformly with replacement (numpy Generator seeded with ``seed``, i != j).
    """
    protos = np.ascontiguousarray(protos, np.float32)
    m = len(protos)
    if impostor_pairs is not None:
        pairs = np.asarray(impostor_pairs, np.int64).reshape(-1, 2)
        return _pair_dots(protos, pairs[:, 0], pairs[:, 1])
    if m * (m - 1) // 2 <= max_pairs:
        parts = []
        rows_per_block = max(1, CHUNK * 64 // max(m, 1))  # about a million scores per block
        for i0 in range(0, m - 1, rows_per_block):
            i1 = min(m - 1, i0 + rows_per_block)
            s = protos[i0:i1] @ protos[i0:].T
            parts.append(s[np.arange(i1 - i0)[:, None] < np.arange(m - i0)[None, :]])
        return np.concatenate(parts).astype(np.float32) if parts else np.empty(0, np.float32)
    i, j = _distinct_pairs(m, max_pairs, np.random.default_rng(seed))
    return _pair_dots(protos, i, j)


def nearest_impostor_scores(protos: np.ndarray, *, queries: int = 20_000, seed: int = 0,
                            device: str | None = None) -> np.ndarray:
    """float32 [q]: each identity's cosine to its nearest other identity of the same set (the paper's Table 4
    criterion, measured on a set of different people): the impostor distribution of a search, on which a threshold
    bounds the share of identities that a search of the whole set would wrongly match (a false-positive
    identification rate) rather than the share of single pairs.

    Every identity when m <= ``queries`` (upper-triangle blocks); else ``queries`` identities drawn without
    replacement (seeded) and searched against all the others, which keeps a 100,000-identity reference to the cost
    of one 20,000-identity search. Only for a set whose identities are all different people: a ``.bin``
    benchmark's only known impostors are its listed pairs (:func:`impostor_scores`).
    """
    protos = np.ascontiguousarray(protos, np.float32)
    m = len(protos)
    if m < 2:
        return np.empty(0, np.float32)
    if m <= queries:
        return _max_other(protos, device=device)[0]
    sample = np.sort(np.random.default_rng(seed).choice(m, size=queries, replace=False))
    return nearest(protos[sample], protos, 1, exclude=sample, device=device)[0][:, 0]


@dataclass(frozen=True)
class Threshold:
    """A cosine above which two faces are called one person, and where it came from."""

    value: float
    far: float | None  # the false-accept rate it was calibrated at; None for a fixed cosine
    impostors: int  # impostor scores it was calibrated on
    source: str
    limited: bool  # fewer impostor scores than 1 / far: value is the highest one, the smallest measurable FAR 1/n

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


def _number(x: Any) -> float:
    """``x`` as a float, NaN when it is not a real number (so range checks refuse it)."""
    try:
        return float(x) if not isinstance(x, (str, bytes, bool)) else math.nan
    except (TypeError, ValueError):
        return math.nan


def far_threshold(scores: np.ndarray, far: float, *, what: str = "impostor pairs") -> Threshold:
    """The cosine threshold at false-accept rate ``far`` on impostor ``scores`` (``what`` names them in ``source``).

    Definition: sort the impostor scores in descending order, ``value = sorted[floor(far * n)]``; a pair is a match
    when its cosine is strictly greater than ``value``, so at most a fraction ``far`` of the impostor pairs are
    matches. ``limited`` when ``n < 1 / far``: then value is the highest impostor score and the smallest measurable
    FAR is 1/n.
    """
    if not 0.0 < _number(far) < 1.0:
        raise Digi2RealError(f"audit FAR must be between 0 and 1 (exclusive), got {far!r}; e.g. 1e-4")
    far = float(far)
    s = np.asarray(scores, np.float64).reshape(-1)
    if len(s) == 0:
        raise Digi2RealError(f"no {what} to calibrate the FAR {far:g} threshold on; give a reference set with two or "
                             "more identities, or a fixed cosine threshold")
    if not np.isfinite(s).all():
        raise Digi2RealError(f"the {what} hold NaN or infinite cosines; re-embed the reference set")
    n = len(s)
    # floor(far * n) with a rounding guard: 1e-4 * 10,000 is 1 in decimal and must not floor to 0 in binary.
    rank = min(n - 1, math.floor(far * n + 1e-9))
    value = float(-np.partition(-s, rank)[rank])
    limited = n < 1.0 / far
    source = f"calibrated at FAR {far:g} on {n:,} {what}"
    if limited:
        source += (f"; only {n:,} of them, fewer than 1/FAR, so the threshold is the highest impostor cosine and "
                   f"the smallest measurable FAR is 1/{n:,} = {1.0 / n:.2g}")
    return Threshold(value, float(far), n, source, bool(limited))


def fixed_threshold(value: float) -> Threshold:
    """A stated cosine threshold when no real reference set calibrates one (issue 14)."""
    if not -1.0 <= _number(value) <= 1.0:
        raise Digi2RealError(f"a fixed cosine threshold must lie in [-1, 1], got {value!r}")
    return Threshold(float(value), None, 0, "fixed cosine, not calibrated", False)


# ------------------------------------------------------------------------------------------------------ image pairs


def _ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The concatenation of range(start[i], start[i] + count[i])."""
    total = int(count.sum())
    offsets = np.repeat(start - (np.cumsum(count) - count), count)
    return np.arange(total, dtype=np.int64) + offsets


def image_max_pairs(a: Embedded, b: Embedded, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score float32 [p], a_row int64 [p], b_row int64 [p]): for each (identity of a, identity of b) pair, the most
    similar pair of their images (the issue's image-level "max pair" cosine) and its rows; ties go to the lower a
    row, then the lower b row.

    Pairs are grouped by a-identity, so each a-identity's images multiply all its candidates' images in one product
    (200,000 pairs of 20 x 20 images: 20,000 products of 20 x 200), split when one would exceed
    :data:`SCORES_PER_PRODUCT` (identities with thousands of images).
    """
    _same_dim(a, b)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs[:, 0].max() >= len(a.identities)
                       or pairs[:, 1].max() >= len(b.identities)):
        raise Digi2RealError(f"image_max_pairs: identity pairs out of range for {a.name!r} x {b.name!r}")
    out = (np.empty(len(pairs), np.float32), np.empty(len(pairs), np.int64), np.empty(len(pairs), np.int64))
    if len(pairs) == 0:
        return out
    a_order, a_start, a_count = a.groups
    by_a = np.argsort(pairs[:, 0], kind="stable")
    firsts = np.concatenate([[0], np.flatnonzero(np.diff(pairs[by_a, 0])) + 1, [len(pairs)]])
    for g0, g1 in zip(firsts[:-1], firsts[1:]):
        which = by_a[g0:g1]
        ident = pairs[which[0], 0]
        rows_a = a_order[a_start[ident]:a_start[ident] + a_count[ident]]
        lens = b.groups[2][pairs[which, 1]]
        piece = (np.cumsum(lens) - lens) // max(1, SCORES_PER_PRODUCT // len(rows_a))
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(piece)) + 1, [len(which)]])
        for p0, p1 in zip(cuts[:-1], cuts[1:]):
            _best_image_pairs(a.vectors, rows_a, b, pairs[which[p0:p1], 1], which[p0:p1], out)
    return out


def _best_image_pairs(vectors: np.ndarray, rows_a: np.ndarray, b: Embedded, cands: np.ndarray, where: np.ndarray,
                      out: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """One a-identity's images (``rows_a``) against its candidate identities of b: the best image pair of each,
    written to ``out`` at ``where``."""
    b_order, b_start, b_count = b.groups
    lens = b_count[cands]
    rows_b = b_order[_ranges(b_start[cands], lens)]
    s = vectors[rows_a] @ b.vectors[rows_b].T  # [images of a, images of all candidates]
    seg_max = np.maximum.reduceat(s, np.cumsum(lens) - lens, axis=1)  # [images of a, candidates]
    best_a = seg_max.argmax(axis=0)  # the first a row reaching each candidate's maximum
    top = seg_max[best_a, np.arange(len(cands))]
    col_owner = np.repeat(np.arange(len(cands)), lens)
    hits = np.flatnonzero(s[best_a[col_owner], np.arange(len(rows_b))] == top[col_owner])
    _, first = np.unique(col_owner[hits], return_index=True)  # the first b column reaching it, per candidate
    out[0][where], out[1][where], out[2][where] = top, rows_a[best_a], rows_b[hits[first]]


# ------------------------------------------------------------------------------------------------------ summaries


def _round(x: Any) -> Any:
    if x is None:
        return None
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def _jsonable(value: Any) -> Any:
    """Lists, dicts, ints, strings and floats rounded to 6 decimals (NaN -> None); no numpy types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _round(value)
    return value


def summary(values: np.ndarray) -> dict:
    """count, mean, std and the :data:`QUANTILES` of the finite ``values`` (None each when there are none)."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"count": 0, "mean": None, "std": None, **{name: None for name, _ in QUANTILES}}
    q = np.quantile(v, [p for _, p in QUANTILES])
    return {"count": int(len(v)), "mean": _round(v.mean()), "std": _round(v.std()),
            **{name: _round(x) for (name, _), x in zip(QUANTILES, q)}}


def histogram(values: np.ndarray, bins: int = 20, low: float = -1.0, high: float = 1.0) -> dict:
    """Counts of the finite ``values`` in ``bins`` equal bins over [low, high] (the last bin closed)."""
    v = np.asarray(values, np.float64)
    counts, edges = np.histogram(v[np.isfinite(v)], bins=bins, range=(low, high))
    return {"edges": [_round(e) for e in edges], "counts": [int(c) for c in counts]}


# ------------------------------------------------------------------------------------------------------ contamination


@dataclass(frozen=True)
class Match:
    """Two identities (one of each set) that the threshold calls one person, with their closest images."""

    identity: str
    reference_identity: str
    prototype_cosine: float
    image_cosine: float  # the most similar pair of their images
    row: int  # that pair's image row in the dataset
    reference_row: int  # and in the reference


@dataclass(eq=False)
class Contamination:
    """Is anyone of the dataset in the reference? Per dataset identity, its nearest reference identities."""

    dataset: str
    reference: str
    threshold: Threshold
    k: int
    reference_identities: int
    nearest: np.ndarray  # int64 [m] nearest reference identity by prototype
    nearest_cosine: np.ndarray  # float32 [m] its prototype cosine
    image_cosine: np.ndarray  # float32 [m] best image pair among the k nearest reference identities
    image_reference: np.ndarray  # int64 [m] the reference identity of that pair
    image_rows: np.ndarray  # int64 [m, 2] (dataset row, reference row) of that pair
    matches: list[Match] = field(default_factory=list)

    @property
    def matched_identities(self) -> int:
        """Dataset identities whose nearest reference prototype is above the threshold."""
        return int((self.nearest_cosine > self.threshold.value).sum())

    def to_dict(self, max_matches: int | None = None) -> dict:
        listed = self.matches if max_matches is None else self.matches[:max_matches]
        return _jsonable({
            "dataset": self.dataset, "reference": self.reference, "identities": len(self.nearest),
            "reference_identities": self.reference_identities, "k": self.k, "threshold": self.threshold.to_dict(),
            "matched_identities": self.matched_identities, "match_pairs": len(self.matches),
            "nearest_prototype_cosine": summary(self.nearest_cosine),
            "image_max_cosine": summary(self.image_cosine),
            "matches": [asdict(x) for x in listed], "matches_listed": len(listed),
        })


def contamination(dataset: Embedded, ref: Embedded, threshold: Threshold, k: int = 10,
                  device: str | None = None) -> Contamination:
    """Leakage/contamination (issue 14): for every dataset identity, its nearest reference identity by prototype
    cosine (identity level) and the most similar image pair (image level, the "max pair") among its ``k`` nearest
    reference identities.

    The image-level search is restricted to the k nearest identities by prototype, which is what keeps 20,000 x
    100,000 identities to minutes (every image pair would be 400,000 x 500,000 products). Matches: one row per
    (dataset identity, reference identity) pair among the k nearest whose prototype cosine is strictly above
    ``threshold.value``, sorted by that cosine descending; a dataset identity is matched when its nearest one is.
    """
    _same_dim(dataset, ref)
    scores, index = nearest(dataset.prototypes, ref.prototypes, k, device=device)
    m, kk = scores.shape
    mine = np.repeat(np.arange(m), kk)
    img, a_row, b_row = image_max_pairs(dataset, ref, np.stack([mine, index.reshape(-1)], 1))
    img, a_row, b_row = img.reshape(m, kk), a_row.reshape(m, kk), b_row.reshape(m, kk)
    best = img.argmax(axis=1)
    pick = (np.arange(m), best)
    hit_i, hit_j = np.nonzero(scores > threshold.value)
    order = np.lexsort((index[hit_i, hit_j], hit_i, -scores[hit_i, hit_j]))
    matches = [Match(dataset.identities[i], ref.identities[index[i, j]], float(scores[i, j]), float(img[i, j]),
                     int(a_row[i, j]), int(b_row[i, j])) for i, j in zip(hit_i[order], hit_j[order])]
    return Contamination(dataset.name, ref.name, threshold, kk, len(ref.identities), index[:, 0].copy(),
                         scores[:, 0].copy(), img[pick], index[pick], np.stack([a_row[pick], b_row[pick]], 1),
                         matches)


# ------------------------------------------------------------------------------------------------------ distinctness


@dataclass(frozen=True)
class Duplicate:
    """Two identities of one set that the threshold calls one person."""

    identity_a: str
    identity_b: str
    prototype_cosine: float
    image_cosine: float
    row_a: int
    row_b: int


@dataclass(eq=False)
class Distinctness:
    """Are the dataset's identities different people? Each identity's max cosine to any other (paper Table 4)."""

    dataset: str
    threshold: Threshold
    max_cosine: np.ndarray  # float32 [m] max prototype cosine to any other identity (NaN with one identity)
    nearest: np.ndarray  # int64 [m] that identity (-1 with one identity)
    duplicate_pairs: int  # pairs i < j above the threshold (all of them)
    duplicates: list[Duplicate] = field(default_factory=list)  # the highest of them (at most MAX_LISTED_PAIRS)

    def to_dict(self, max_pairs: int | None = None) -> dict:
        listed = self.duplicates if max_pairs is None else self.duplicates[:max_pairs]
        return _jsonable({
            "dataset": self.dataset, "identities": len(self.max_cosine), "threshold": self.threshold.to_dict(),
            "max_cosine": summary(self.max_cosine), "histogram": histogram(self.max_cosine),
            "identities_above": int((self.max_cosine > self.threshold.value).sum()),
            "duplicate_pairs": self.duplicate_pairs, "duplicates": [asdict(x) for x in listed],
            "duplicates_listed": len(listed),
        })


def distinctness(dataset: Embedded, threshold: Threshold, device: str | None = None) -> Distinctness:
    """Distinctness (issue 14; the paper's Table 4 criterion measured after generation): each identity's largest
    prototype cosine to any other identity, and the duplicate pairs (i < j, each pair once, prototype cosine strictly
    above ``threshold.value``) with their most similar image pair, sorted by cosine descending. Upper-triangle
    blocks of the prototypes' Gram matrix, every pair computed once."""
    best, arg, found = _max_other(dataset.prototypes, threshold.value, device=device)
    assert found is not None  # asked for the pairs above the threshold
    pairs, cos = found.highest()
    img, row_a, row_b = image_max_pairs(dataset, dataset, pairs)
    names = dataset.identities
    dups = [Duplicate(names[i], names[j], float(c), float(s), int(ra), int(rb))
            for (i, j), c, s, ra, rb in zip(pairs.tolist(), cos, img, row_a, row_b)]
    return Distinctness(dataset.name, threshold, best, arg, found.total, dups)


# ------------------------------------------------------------------------------------------------------ consistency


@dataclass(eq=False)
class Consistency:
    """Are an identity's images one person? Genuine cosines per identity and pooled, against impostor cosines."""

    dataset: str
    images: np.ndarray  # int64 [m] images per identity
    to_prototype: np.ndarray  # float32 [m] mean cosine of an identity's images to its prototype
    pairwise: np.ndarray  # float32 [m] mean cosine of its image pairs (NaN with one image)
    genuine: np.ndarray  # float32 pooled within-identity image-pair cosines (all pairs, or a sample)
    impostor: np.ndarray  # float32 image-pair cosines of different identities (all of them, or a sample)
    genuine_total: int  # within-identity pairs in the set (genuine holds all of them, or a sample)
    d_prime: float | None  # |mu_g - mu_i| / sqrt((var_g + var_i) / 2); None without both kinds of pairs
    identities: list[str] = field(default_factory=list)
    impostor_sampled: bool = True  # False: ``impostor`` holds every image pair of different identities

    def worst(self, n: int = 10) -> list[dict]:
        """The n identities with the lowest mean pairwise genuine cosine (those with two or more images)."""
        order = [i for i in np.argsort(self.pairwise, kind="stable") if np.isfinite(self.pairwise[i])][:n]
        return [{"identity": self.identities[i], "images": int(self.images[i]),
                 "pairwise": _round(self.pairwise[i]), "to_prototype": _round(self.to_prototype[i])} for i in order]

    def to_dict(self) -> dict:
        return _jsonable({
            "dataset": self.dataset, "identities": len(self.images), "images": int(self.images.sum()),
            "genuine_pairs": len(self.genuine), "genuine_pairs_total": self.genuine_total,
            "genuine_sampled": len(self.genuine) < self.genuine_total, "impostor_pairs": len(self.impostor),
            "impostor_sampled": self.impostor_sampled,
            "genuine": summary(self.genuine), "impostor": summary(self.impostor), "d_prime": self.d_prime,
            "to_prototype": summary(self.to_prototype), "pairwise": summary(self.pairwise), "worst": self.worst(),
        })


def _genuine_pairs(dataset: Embedded, limit: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Every within-identity image-pair cosine (i < j), or ``limit`` of them drawn uniformly when there are more.
    All pairs: identities with the same image count are stacked and multiplied as one batch ([g, c, d] @ [g, d, c])."""
    order, start, count = dataset.groups
    per = count * (count - 1) // 2
    total = int(per.sum())
    if total > limit:
        ident = rng.choice(len(count), size=limit, p=per / total)  # uniform over pairs
        c = count[ident]
        i = rng.integers(c)
        j = (i + rng.integers(1, c)) % c
        rows = order[start[ident] + i], order[start[ident] + j]
        return _pair_dots(dataset.vectors, rows[0], rows[1]), total
    parts = []
    for _, rows in _by_count(dataset.groups, least=2):
        x = dataset.vectors[rows]  # [g, c, d]
        iu, ju = np.triu_indices(rows.shape[1], 1)
        parts.append((x @ x.transpose(0, 2, 1))[:, iu, ju].reshape(-1))
    return (np.concatenate(parts) if parts else np.empty(0, np.float32)), total


def _impostor_images(dataset: Embedded, count: int, rng: np.random.Generator) -> np.ndarray:
    """Cosines of image pairs of different identities: all of them (i < j) when the set has at most ``count`` image
    pairs in all, so small sets get exact figures; else ``count`` pairs drawn uniformly among them (pairs of one
    identity are redrawn)."""
    n = len(dataset.labels)
    if len(dataset.identities) < 2 or count <= 0:
        return np.empty(0, np.float32)
    if n * (n - 1) // 2 <= count:
        iu, ju = np.triu_indices(n, 1)
        other = dataset.labels[iu] != dataset.labels[ju]
        return _pair_dots(dataset.vectors, iu[other], ju[other])
    i = np.empty(0, np.int64)
    j = np.empty(0, np.int64)
    while len(i) < count:
        a, b = _distinct_pairs(n, 2 * (count - len(i)), rng)
        other = dataset.labels[a] != dataset.labels[b]
        i, j = np.concatenate([i, a[other]]), np.concatenate([j, b[other]])
    return _pair_dots(dataset.vectors, i[:count], j[:count])


def d_prime(genuine: np.ndarray, impostor: np.ndarray) -> float | None:
    """Decidability d' = |mu_g - mu_i| / sqrt((var_g + var_i) / 2) (Daugman), population variances."""
    g, i = np.asarray(genuine, np.float64), np.asarray(impostor, np.float64)
    if len(g) == 0 or len(i) == 0:
        return None
    spread = math.sqrt((g.var() + i.var()) / 2.0)
    return float(abs(g.mean() - i.mean()) / spread) if spread > 0 else None


def consistency(dataset: Embedded, *, max_impostor_pairs: int = 1_000_000, seed: int = 0,
                max_genuine_pairs: int = MAX_GENUINE_PAIRS) -> Consistency:
    """Consistency (issue 14): per identity, the mean cosine of its images to its prototype (which includes them)
    and the mean cosine of its image pairs; pooled, every within-identity image pair i < j (a uniform seeded sample of
    ``max_genuine_pairs`` when there are more) against every image pair of different identities (``max_impostor_pairs``
    seeded pairs when the set has more image pairs than that in all), and their d'. Per identity both means come from the identity's sum s of c unit rows: to the
    prototype ||s|| / c, pairwise (||s||^2 - sum ||v||^2) / (c (c - 1))."""
    rng = np.random.default_rng(seed)
    m = len(dataset.identities)
    sums = _sums(dataset.vectors, dataset.groups)
    count = np.bincount(dataset.labels, minlength=m)
    sq = np.bincount(dataset.labels, weights=np.einsum("nd,nd->n", dataset.vectors, dataset.vectors), minlength=m)
    norm2 = np.einsum("md,md->m", sums, sums)
    to_proto = (np.sqrt(norm2) / count).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        pairwise = np.where(count >= 2, (norm2 - sq) / (count * (count - 1.0)), np.nan).astype(np.float32)
    genuine, total = _genuine_pairs(dataset, max_genuine_pairs, rng)
    impostor = _impostor_images(dataset, max_impostor_pairs, rng)
    n = len(dataset.labels)
    return Consistency(dataset.name, count, to_proto, pairwise, genuine, impostor, total, d_prime(genuine, impostor),
                       dataset.identities, impostor_sampled=n * (n - 1) // 2 > max_impostor_pairs)


# ------------------------------------------------------------------------------------------------------ variation


@dataclass(eq=False)
class Variation:
    """How varied are an identity's images? Per identity (NaN with one image; None when the set lacks the
    measurement)."""

    dataset: str
    landmark_spread: np.ndarray | None  # float32 [m] RMS landmark distance (px, 112 x 112 crop) from the mean
    brightness_std: np.ndarray | None  # float32 [m] std of the crops' mean grey level
    contrast_std: np.ndarray | None  # float32 [m] std of the crops' grey-level std

    def to_dict(self) -> dict:
        def part(x: np.ndarray | None) -> dict | None:
            return None if x is None else summary(x)

        return _jsonable({"dataset": self.dataset, "landmark_spread_px": part(self.landmark_spread),
                          "brightness_std": part(self.brightness_std), "contrast_std": part(self.contrast_std)})


def _within_std(values: np.ndarray, labels: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per identity, the population std of ``values`` [n, ...] over its images (summed over trailing axes: the RMS
    distance of the rows from their identity mean); NaN for identities with one image."""
    m = len(count)
    flat = np.asarray(values, np.float64).reshape(len(labels), -1)
    sums = np.zeros((m, flat.shape[1]))
    np.add.at(sums, labels, flat)
    centred = flat - (sums / count[:, None])[labels]
    per = np.bincount(labels, weights=np.einsum("nk,nk->n", centred, centred), minlength=m)
    return np.where(count >= 2, np.sqrt(per / count), np.nan).astype(np.float32)


def variation(dataset: Embedded) -> Variation:
    """Variation without an extra model (issue 14), per identity:

    - landmark spread: sqrt(mean over the identity's images and the five landmarks of the squared distance, in
      pixels of the 112 x 112 aligned crop, of each landmark from the identity's mean position of that landmark), a
      pose/expression proxy (alignment removes the similarity transform, so what is left moves with pose and
      expression);
    - brightness std, contrast std: population std within the identity of the crops' mean and std grey level.
    """
    count = np.bincount(dataset.labels, minlength=len(dataset.identities))
    spread = None
    if dataset.landmarks is not None:
        # _within_std sums the squared distance over the 10 coordinates; the RMS is per landmark, hence / 5
        spread = (_within_std(dataset.landmarks, dataset.labels, count) / np.sqrt(5.0)).astype(np.float32)
    bright = None if dataset.brightness is None else _within_std(dataset.brightness, dataset.labels, count)
    contrast = None if dataset.contrast is None else _within_std(dataset.contrast, dataset.labels, count)
    return Variation(dataset.name, spread, bright, contrast)


def crop_stats(crops: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(brightness float32 [n], contrast float32 [n]) of uint8 RGB crops [n, h, w, 3]: the mean and the population
    std of the grey level 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601 luma)."""
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[3] != 3:
        raise Digi2RealError(f"crop_stats needs uint8 RGB crops [n, h, w, 3], got {crops.dtype} {crops.shape}")
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    mean = np.empty(len(crops), np.float32)
    std = np.empty(len(crops), np.float32)
    for start in range(0, len(crops), chunk):
        grey = crops[start:start + chunk].astype(np.float32) @ weights  # [c, h, w]
        flat = grey.reshape(len(grey), -1).astype(np.float64)
        mean[start:start + len(grey)] = flat.mean(axis=1)
        std[start:start + len(grey)] = flat.std(axis=1)
    return mean, std


# ------------------------------------------------------------------------------------------------------ realism gap


def _moments(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and covariance (n - 1 denominator, as np.cov) of the rows, accumulated over blocks of rows
    centred on the mean (two passes: no float64 copy of all rows, 16 MB at a time; blocks of 4096 rows make
    OpenBLAS's X^T X twice as fast as 16384 on 2 cores, measured)."""
    n = len(x)
    mean = np.zeros(x.shape[1])
    for start in range(0, n, chunk):
        mean += x[start:start + chunk].sum(axis=0, dtype=np.float64)
    mean /= n
    cov = np.zeros((x.shape[1], x.shape[1]))
    for start in range(0, n, chunk):
        c = x[start:start + chunk].astype(np.float64) - mean
        cov += c.T @ c
    return mean, cov / (n - 1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two sets of embeddings (issue 14's realism gap; FID's formula, on the rows of
    ``a`` and ``b`` rather than Inception features): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in
    float64. Tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of the symmetric
    sqrt(S_a) S_b sqrt(S_a) (same spectrum), negative rounding clipped to 0, so covariances of fewer rows than
    dimensions (rank-deficient) give a finite answer."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise Digi2RealError(f"frechet_distance needs two sets of >= 2 rows of equal width, got {a.shape} and "
                             f"{b.shape}")
    mu_a, s_a = _moments(a)
    mu_b, s_b = _moments(b)
    return gaussian_frechet(mu_a, s_a, mu_b, s_b)
