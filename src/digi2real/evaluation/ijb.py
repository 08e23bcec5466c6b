"""IJB-B / IJB-C 1:1 verification, following insightface's ``recognition/_evaluation_/ijb/eval_ijbc.py`` (FACTS 9).

Pipeline: read the three meta files, align every loose crop with its five given landmarks (:func:`align_face`, the
one alignment of the project), embed it (the caller's ``embed_fn`` does the flip-sum), optionally weight the feature by
its faceness score, pool images into templates (average within a media id, sum over media, L2-normalise), score the
template pairs by cosine, and read TAR at each FAR from the ROC by insightface's nearest-point rule.

Everything after the embedding is vectorised: pooling is one weighted scatter-add (no loop over templates), scoring
is insightface's per-pair sum of products in batches over threads (bit-identical to insightface, whatever the batch),
and the ROC is one value sort (:mod:`digi2real.evaluation.metrics`). Features are cached so a re-run with other
settings only re-scores.
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.config import EvalConfig
from digi2real.errors import Digi2RealError
from digi2real.evaluation.metrics import roc_curve, tar_at_far
from digi2real.faces.template import align_face
from digi2real.fileio import atomic_open
from digi2real.imageio import read_image

#: ``embed_fn(batch)``: ``N x 112 x 112 x 3`` uint8 RGB aligned crops -> ``N x D`` features (flip-sum included).
EmbedFn = Callable[[np.ndarray], np.ndarray]

IJB_NAMES = ("ijbb", "ijbc")
CROP_SIZE = 112
#: Pairs are scored tile by tile, a tile pairing this many templates of one side with as many of the other.
LOCALITY_ROWS = 64
#: Bytes of gathered rows per scoring batch: small enough for the gathers, products and sums to stay in a core's
#: L2 cache (measured at IJB-C scale on 2 cores: 128 pairs of 512-d float64 per batch took 10.8 s, 2,000 took 16.3 s).
BATCH_BYTES = 1 << 20
#: Threads scoring pairs (numpy releases the GIL in the gathers, products and sums); never changes a score.
SCORE_WORKERS = min(4, os.cpu_count() or 1)
_RESTORE = "restore the file from the IJB release (insightface's IJB_release layout)"
_LAYOUT = ("<root>/{NAME}/loose_crop/*.jpg and <root>/{NAME}/meta/{name}_face_tid_mid.txt, "
           "{name}_template_pair_label.txt, {name}_name_5pts_score.txt (insightface's IJB release layout)")


@dataclass(frozen=True)
class IJBMeta:
    """The protocol of one IJB set, row-aligned with the landmark file (FACTS 9).

    ``images``, ``landmarks`` (N x 5 x 2, x/y) and ``faceness`` come from ``<name>_name_5pts_score.txt``;
    ``templates`` and ``medias`` from ``<name>_face_tid_mid.txt`` (matched by image name); ``pair_t1``, ``pair_t2``
    and ``labels`` (bool, True = same subject) from ``<name>_template_pair_label.txt``.
    """

    name: str
    folder: Path
    images: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    labels: np.ndarray


@dataclass
class IJBResult:
    """Outcome of one IJB 1:1 evaluation.

    ``tar_at_far`` maps each target FAR to the TAR read by insightface's rule; ``fpr`` / ``tpr`` are the ROC,
    downsampled to at most about ``roc_points`` points (log-spaced in FPR, plus every point a TAR was read at) for
    plotting; ``roc_size`` is the length of the full ROC.
    """

    name: str
    tar_at_far: dict[float, float]
    fpr: np.ndarray
    tpr: np.ndarray
    pairs: int
    genuine: int
    templates: int
    images: int
    use_faceness: bool
    roc_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the ROC arrays as lists)."""
        return {
            "name": self.name,
            "tar_at_far": {f"{k:g}": v for k, v in self.tar_at_far.items()},
            "pairs": self.pairs,
            "genuine": self.genuine,
            "templates": self.templates,
            "images": self.images,
            "use_faceness": self.use_faceness,
            "roc_size": self.roc_size,
            "roc": {"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist()},
            **self.extra,
        }


# ----------------------------------------------------------------------------------------------------- meta files


def _check_name(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in IJB_NAMES:
        raise Digi2RealError(f"unknown IJB set {name!r}; expected one of {', '.join(IJB_NAMES)}")
    return key


def ijb_folder(root: str | os.PathLike[str], name: str) -> Path:
    """``<root>/IJBB`` or ``<root>/IJBC``; ``root`` may also be that folder itself."""
    key = _check_name(name)
    root = Path(root)
    if root.name.upper() == key.upper() and (root / "meta").is_dir():
        return root
    return root / key.upper()


def _layout(name: str) -> str:
    return _LAYOUT.format(NAME=name.upper(), name=name)


def _read_columns(path: Path, name: str, n_cols: int, text_cols: int) -> list[np.ndarray]:
    """Read a space-separated table without header fast (pyarrow.csv; np.loadtxt needs minutes on 15 M lines).

    The first ``text_cols`` columns are strings, the rest numbers; a trailing space on the lines (an empty last
    column) is tolerated. Returns one numpy array per column.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not path.is_file():
        raise Digi2RealError(f"{path}: IJB meta file not found; expected {_layout(name)}")
    types = {f"f{i}": pa.string() for i in range(text_cols)}
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(autogenerate_column_names=True, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=" ", ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types=types),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Digi2RealError(f"{path}: cannot be parsed as a space-separated table ({first[:120]}); expected "
                             f"{n_cols} columns per line: {_RESTORE}") from None
    columns = [table.column(i) for i in range(table.num_columns)]
    while len(columns) > n_cols and columns[-1].null_count == len(columns[-1]):
        columns.pop()  # trailing delimiter on every line
    if len(columns) != n_cols:
        raise Digi2RealError(f"{path}: {len(columns)} columns per line, expected {n_cols}; is this the right file? "
                             f"{_RESTORE}")
    out: list[np.ndarray] = []
    for i, col in enumerate(columns):
        if col.null_count:
            raise Digi2RealError(f"{path}: column {i + 1} has {col.null_count} empty or NaN values; {_RESTORE}")
        if i < text_cols:
            out.append(np.asarray(col.to_pylist(), dtype=object))
        else:
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                raise Digi2RealError(f"{path}: column {i + 1} is not numeric ({col.type}); {_RESTORE}")
            out.append(col.to_numpy())
    return out


def read_ijb_meta(root: str | os.PathLike[str], name: str) -> IJBMeta:
    """Read the three meta files of IJB-B or IJB-C (FACTS 9) into an :class:`IJBMeta`.

    insightface pairs the rows of ``*_face_tid_mid.txt`` and ``*_name_5pts_score.txt`` by position; here they are
    matched by image name (the same when the files are in the released order), and a mismatch is an error.
    """
    key = _check_name(name)
    folder = ijb_folder(root, key)
    meta = folder / "meta"
    tid_file = meta / f"{key}_face_tid_mid.txt"
    pair_file = meta / f"{key}_template_pair_label.txt"
    pts_file = meta / f"{key}_name_5pts_score.txt"
    tid_img, tid, mid = _read_columns(tid_file, key, 3, 1)
    t1, t2, lab = _read_columns(pair_file, key, 3, 0)
    cols = _read_columns(pts_file, key, 12, 1)
    images = cols[0]
    landmarks = np.stack(cols[1:11], axis=1).astype(np.float64).reshape(-1, 5, 2)
    faceness = cols[11].astype(np.float64)
    # NaN landmarks would align to garbage and NaN scores would make every TAR meaningless: refuse them here.
    bad = ~np.isfinite(landmarks).all(axis=(1, 2)) | ~np.isfinite(faceness)
    if bad.any():
        raise Digi2RealError(f"{pts_file}: {int(bad.sum())} line(s) with a non-finite landmark or score, e.g. "
                             f"{images[bad][0]!r}; restore the file from the IJB release")
    tid, mid = _integers(tid, tid_file, 2), _integers(mid, tid_file, 3)
    t1, t2 = _integers(t1, pair_file, 1), _integers(t2, pair_file, 2)

    if len(tid_img) != len(images) or not np.array_equal(tid_img, images):
        position = {img: i for i, img in enumerate(tid_img.tolist())}
        if len(position) != len(tid_img):
            raise Digi2RealError(f"{tid_file}: an image is listed twice; restore the file from the IJB release")
        idx = np.fromiter((position.get(img, -1) for img in images.tolist()), dtype=np.int64, count=len(images))
        if len(tid_img) != len(images) or (idx < 0).any():
            missing = images[idx < 0][:3].tolist() if (idx < 0).any() else []
            raise Digi2RealError(
                f"{meta}: {key}_face_tid_mid.txt lists {len(tid_img)} images and {key}_name_5pts_score.txt "
                f"{len(images)}; they must list the same images (missing from tid_mid: {missing}); restore both "
                "from the IJB release")
        tid, mid = tid[idx], mid[idx]

    labels_int = lab.astype(np.int64)
    if not np.all((labels_int == 0) | (labels_int == 1)) or not np.array_equal(labels_int, lab):
        raise Digi2RealError(f"{pair_file}: labels must be 0 or 1; restore the file from the IJB release")
    # A pair naming a template without images would only fail after hours of feature extraction: check it now.
    unknown = ~np.isin(np.concatenate([t1, t2]), tid)
    if unknown.any():
        raise Digi2RealError(f"{pair_file}: {int(unknown.sum())} pair entries name templates that have no images in "
                             f"{tid_file.name}, e.g. {np.concatenate([t1, t2])[unknown][0]}; the two files do not "
                             "belong together: restore them from the same IJB release")
    return IJBMeta(name=key, folder=folder, images=images, landmarks=landmarks, faceness=faceness,
                   templates=tid, medias=mid, pair_t1=t1, pair_t2=t2, labels=labels_int.astype(bool))


def _integers(column: np.ndarray, path: Path, number: int) -> np.ndarray:
    """A column of ids as int64; fractional or non-finite values are an error (a cast would silently truncate)."""
    if np.issubdtype(column.dtype, np.integer):
        return column.astype(np.int64)
    as_int = np.nan_to_num(column, nan=0.5).astype(np.int64)
    if not np.isfinite(column).all() or not np.array_equal(as_int, column):
        raise Digi2RealError(f"{path}: column {number} must hold whole numbers (template / media ids); restore the "
                             "file from the IJB release")
    return as_int


# ------------------------------------------------------------------------------------------------------- features


def _load_batch(folder: Path, images: Sequence[str], landmarks: np.ndarray) -> np.ndarray:
    """Read and align a batch of loose crops (runs in a worker thread: PIL decoding releases the GIL)."""
    out = np.empty((len(images), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for i, (img, pts) in enumerate(zip(images, landmarks)):
        out[i] = align_face(read_image(folder / "loose_crop" / img), pts, size=CROP_SIZE)
    return out


def _batches(meta: IJBMeta, start: int, batch_size: int, workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """Aligned batches in order; up to ``2 * workers`` are prepared ahead while the model runs on the current one.

    The look-ahead is bounded so memory stays at a few batches whatever the speed of the model.
    """
    starts = range(start, len(meta.images), batch_size)
    if workers <= 0:
        for s in starts:
            yield s, _load_batch(meta.folder, meta.images[s:s + batch_size], meta.landmarks[s:s + batch_size])
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ijb-load") as pool:
        pending: collections.deque[tuple[int, Future[np.ndarray]]] = collections.deque()
        it = iter(starts)
        try:
            for s in it:
                pending.append((s, pool.submit(_load_batch, meta.folder, meta.images[s:s + batch_size],
                                               meta.landmarks[s:s + batch_size])))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                s, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(_load_batch, meta.folder, meta.images[nxt:nxt + batch_size],
                                                     meta.landmarks[nxt:nxt + batch_size])))
                yield s, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def _cache_path(cache_dir: str | os.PathLike[str], name: str) -> Path:
    return Path(cache_dir) / f"{name}_features.npy"


def _load_cache(path: Path, meta: IJBMeta) -> tuple[np.ndarray, np.ndarray] | None:
    """Features and faceness from the cached ``N x (D + 1)`` array if it belongs to this protocol, else ``None``.

    Read in row slices into the final ``N x D`` array, so the peak memory is the features once (IJB-C: ~1 GB), not
    the cache plus a copy.
    """
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            if len(shape) != 2 or fortran or dtype != np.float32 or shape[0] != len(meta.images) or shape[1] < 2:
                raise ValueError(f"shape {shape}, dtype {dtype}")
            n, width = shape
            feats = np.empty((n, width - 1), dtype=np.float32)
            face = np.empty(n, dtype=np.float32)
            rows = max(1, (1 << 24) // (4 * width))
            buf = np.empty((rows, width), dtype=np.float32)
            for s in range(0, n, rows):
                m = min(rows, n - s)
                if handle.readinto(memoryview(buf[:m]).cast("B")) != m * width * 4:
                    raise ValueError("file is truncated")
                feats[s:s + m] = buf[:m, :-1]
                face[s:s + m] = buf[:m, -1]
    except (OSError, ValueError) as exc:
        warnings.warn(f"{path}: feature cache unusable for {meta.folder} ({exc}); recomputing", stacklevel=3)
        return None
    if not np.isfinite(feats).all():
        warnings.warn(f"{path}: feature cache holds NaN or infinity; recomputing", stacklevel=3)
        return None
    if not np.allclose(face, meta.faceness, rtol=1e-6, atol=1e-6):
        warnings.warn(f"{path}: feature cache was made with other faceness scores than {meta.folder}; recomputing",
                      stacklevel=3)
        return None
    return feats, meta.faceness.copy()


def ijb_features(root: str | os.PathLike[str], name: str, embed_fn: EmbedFn, batch_size: int = 128,
                 progress: bool = True, cache_dir: str | os.PathLike[str] | None = None, *, workers: int = 2,
                 meta: IJBMeta | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (``N x D`` float32) and faceness scores (``N`` float64) of every IJB image, in landmark-file order.

    Each ``loose_crop/<image>`` is aligned with its five given landmarks by :func:`align_face` (FACTS 3, 9) and
    batches of ``batch_size`` aligned ``112 x 112 x 3`` uint8 RGB crops are passed to ``embed_fn``, which returns the
    ``N x D`` features (the flip-sum is the caller's: insightface's feature is embedding(image) + embedding(flip)).
    Decoding and alignment run in ``workers`` threads ahead of the model. With ``cache_dir`` the result is stored as
    ``<cache_dir>/<name>_features.npy`` (``N x (D + 1)``, faceness last; written atomically) and reused when it
    matches the protocol, so ``embed_fn`` is not called again. The cache does not know the model: use one
    ``cache_dir`` per model.
    """
    key = _check_name(name)
    meta = meta if meta is not None else read_ijb_meta(root, key)
    cache = _cache_path(cache_dir, key) if cache_dir is not None else None
    if cache is not None and (cached := _load_cache(cache, meta)) is not None:
        return cached
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    crops = meta.folder / "loose_crop"
    if not crops.is_dir():
        raise Digi2RealError(f"{crops}: folder of IJB loose crops not found; expected {_layout(key)}")
    # Every crop is checked before the first is embedded: a missing one would otherwise stop the run hours in.
    missing = [img for img in meta.images.tolist() if not (crops / img).is_file()]
    if missing:
        raise Digi2RealError(f"{crops}: {len(missing)} image(s) listed in {key}_name_5pts_score.txt are missing (or "
                             f"not regular files), e.g. {missing[0]!r}; restore them from the IJB release")

    from tqdm.auto import tqdm

    n = len(meta.images)
    feats: np.ndarray | None = None
    with tqdm(total=n, unit="img", desc=f"{key} features", disable=not progress, dynamic_ncols=True) as bar:
        for s, batch in _batches(meta, 0, batch_size, workers):
            out = np.asarray(embed_fn(batch))
            if out.ndim != 2 or out.shape[0] != len(batch):
                raise Digi2RealError(f"embed_fn returned shape {out.shape} for a batch of {len(batch)} images; "
                                     f"expected {len(batch)} x D")
            if feats is None:
                feats = np.empty((n, out.shape[1] + 1), dtype=np.float32)
            elif out.shape[1] != feats.shape[1] - 1:
                raise Digi2RealError(f"embed_fn returned {out.shape[1]}-d features after {feats.shape[1] - 1}-d ones")
            if not np.isfinite(out).all():
                raise Digi2RealError(f"{crops}: the model gives NaN or infinite features for images {s}.."
                                     f"{s + len(batch) - 1}; check the model file (NaN weights?) or its precision")
            feats[s:s + len(batch), :-1] = out
            bar.update(len(batch))
    if feats is None:
        raise Digi2RealError(f"{meta.folder}: the landmark file lists no images")
    feats[:, -1] = meta.faceness
    if cache is not None:
        with atomic_open(cache, "wb") as handle:
            np.save(handle, feats)
    return np.ascontiguousarray(feats[:, :-1]), meta.faceness.copy()


# -------------------------------------------------------------------------------------------- pooling and scoring


def template_features(features: np.ndarray, faceness: np.ndarray | None, templates: np.ndarray, medias: np.ndarray,
                      use_faceness: bool = True, chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Pool image features into L2-normalised template features (FACTS 9; insightface ``image2template_feature``).

    With ``use_faceness`` each image feature is first multiplied by its faceness score. Within a template, images
    sharing a media id are averaged; the media averages are summed and the sum is L2-normalised (a zero sum stays
    zero, as sklearn's ``normalize``). Returns ``(template_ids, T x D float64)`` with ids sorted ascending: float64
    as in insightface (its float32 features become float64 when multiplied by the faceness scores), which keeps the
    pair scores, and so the TARs, identical to insightface's rather than within float32 rounding of them.

    Averaging within media then summing over media equals one weighted sum of images with weight
    ``faceness / (images of that template and media)``, so the pooling is one scatter-add over images, in
    ``chunk_rows`` slices (float64 accumulation, like insightface's float64 arithmetic after the faceness product).
    """
    import torch

    feats = np.asarray(features)
    n = feats.shape[0]
    templates = np.asarray(templates).ravel()
    medias = np.asarray(medias).ravel()
    if feats.ndim != 2 or templates.shape != (n,) or medias.shape != (n,):
        raise ValueError(f"features {feats.shape}, templates {templates.shape} and medias {medias.shape} must "
                         "describe the same images")
    template_ids, t_inv = np.unique(templates, return_inverse=True)
    media_ids, m_inv = np.unique(medias, return_inverse=True)
    group = t_inv.astype(np.int64) * len(media_ids) + m_inv
    _, g_inv, g_count = np.unique(group, return_inverse=True, return_counts=True)
    weight = 1.0 / g_count[g_inv].astype(np.float64)
    if use_faceness:
        if faceness is None:
            raise ValueError("use_faceness needs the faceness scores")
        face = np.asarray(faceness, dtype=np.float64).ravel()
        if face.shape != (n,):
            raise ValueError(f"faceness {face.shape} does not match {n} images")
        weight = weight * face

    # torch's index_add_ is a fast scatter-add (numpy's add.at is ~4x slower); the tensors share numpy's memory.
    pooled = np.zeros((len(template_ids), feats.shape[1]), dtype=np.float64)
    acc = torch.from_numpy(pooled)
    index = torch.from_numpy(t_inv.astype(np.int64))
    # One reused buffer: fresh 64 MB allocations per slice cost more in page faults than the arithmetic.
    buf = np.empty((min(chunk_rows, max(n, 1)), feats.shape[1]), dtype=np.float64)
    buf_t = torch.from_numpy(buf)
    for s in range(0, n, chunk_rows):
        m = min(chunk_rows, n - s)
        np.multiply(feats[s:s + m], weight[s:s + m, None], out=buf[:m])
        acc.index_add_(0, index[s:s + m], buf_t[:m])
    norms = np.sqrt(np.einsum("ij,ij->i", pooled, pooled))
    pooled /= np.where(norms > 0, norms, 1.0)[:, None]
    return template_ids, pooled


def _template_rows(template_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Row of each wanted template id in ``template_ids`` (sorted); unknown ids are an error."""
    if len(template_ids) and 0 <= template_ids[0] and template_ids[-1] < 10_000_000:
        # A lookup array (O(1) per pair) beats a binary search over 15 M pairs; IJB ids are small integers.
        lut = np.full(int(template_ids[-1]) + 1, -1, dtype=np.int32)
        lut[template_ids] = np.arange(len(template_ids), dtype=np.int32)
        ok = (wanted >= 0) & (wanted <= template_ids[-1])
        rows = np.where(ok, lut[np.where(ok, wanted, 0)], -1)
    else:
        rows = np.full(wanted.shape, -1, dtype=np.int64)
        if len(template_ids):
            pos = np.searchsorted(template_ids, wanted).clip(0, len(template_ids) - 1)
            rows = np.where(template_ids[pos] == wanted, pos, -1)
    if (rows < 0).any():
        bad = np.unique(wanted[rows < 0])
        raise Digi2RealError(f"{len(bad)} template id(s) in the pair list ({what}) have no images, e.g. "
                             f"{bad[:5].tolist()}; the pair file and face_tid_mid file do not match")
    return rows.astype(np.int32)


def _score_batch(feats: np.ndarray, r1: np.ndarray, r2: np.ndarray, out: np.ndarray, batch: int) -> None:
    """insightface's score of each pair ``(r1[i], r2[i])`` into ``out[i]``: ``np.sum(f1 * f2, -1)``, one pair at a
    time in effect (numpy's pairwise sum over one row's products), computed ``batch`` pairs at a time."""
    dim = feats.shape[1]
    first = np.empty((min(batch, len(r1)), dim), dtype=feats.dtype)
    second = np.empty_like(first)
    for s in range(0, len(r1), batch):
        e = min(s + batch, len(r1))
        a, b = first[:e - s], second[:e - s]
        np.take(feats, r1[s:e], axis=0, out=a, mode="clip")  # rows are valid; "raise" with out= copies twice
        np.take(feats, r2[s:e], axis=0, out=b, mode="clip")
        np.multiply(a, b, out=a)
        np.add.reduce(a, axis=1, out=out[s:e])


def score_pairs(template_feats: np.ndarray, template_ids: np.ndarray, p1: np.ndarray, p2: np.ndarray,
                chunk: int = 2_000_000, workers: int | None = None) -> np.ndarray:
    """Cosine score of each template pair ``(p1[i], p2[i])`` (ids), in the features' float dtype (insightface
    ``verification``).

    ``template_feats`` must be L2-normalised (as :func:`template_features` returns). Each score is computed exactly
    as insightface's ``eval_ijbc.py`` does, ``np.sum(feat1 * feat2, -1)`` on the pair's two rows: the elementwise
    products, then numpy's pairwise sum of that one row. So a score depends on its two templates only, bit for bit:
    not on ``chunk``, on the pair order, on which side is listed first, or on ``workers``; templates with equal
    features score exact ties, as in insightface. (Blocks of pairs scored by one matrix product were about 5x faster
    at IJB-C scale, 2.1 s against 10.5 s for 15.7 M pairs on 2 CPU cores, but a float64 GEMM rounds an entry
    differently with the block's shape and the entry's place in it, so scores changed, and tied scores split, with
    the chunk size: issue 11.)

    ``chunk`` bounds the feature values gathered at once per worker (``chunk // (2 * D)`` pairs, at least one, and
    at most :data:`BATCH_BYTES` of rows); ``workers`` threads (default up to 4) score separate ranges of pairs.
    Pairs are visited tile by tile (blocks of templates of each side) so the rows they gather stay in cache; the order
    never changes a value.
    """
    feats = np.asarray(template_feats)
    # Scores keep the precision of the features: float64 from template_features (as insightface), else float32.
    feats = np.ascontiguousarray(feats, dtype=feats.dtype if feats.dtype in (np.float32, np.float64) else np.float64)
    ids = np.asarray(template_ids)
    if feats.ndim != 2 or feats.shape[0] != len(ids):
        raise ValueError(f"template_feats {feats.shape} and template_ids ({len(ids)}) do not match")
    if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
        order = np.argsort(ids, kind="stable")
        ids, feats = ids[order], feats[order]
        if np.any(ids[1:] == ids[:-1]):
            raise ValueError("template_ids contains duplicates")
    p1 = np.asarray(p1).ravel()
    p2 = np.asarray(p2).ravel()
    if p1.shape != p2.shape:
        raise ValueError(f"p1 ({p1.size}) and p2 ({p2.size}) must have the same length")
    scores = np.empty(p1.size, dtype=feats.dtype)
    if p1.size == 0:
        return scores
    r1 = _template_rows(ids, p1, "first column")
    r2 = _template_rows(ids, p2, "second column")
    # Visit the pairs tile by tile (LOCALITY_ROWS x LOCALITY_ROWS templates): consecutive pairs then share the rows
    # they gather, which stay in cache. Small integer keys: numpy's stable argsort is a radix sort for 16-bit types.
    col_tiles = int(r2.max()) // LOCALITY_ROWS + 1
    tile = (r1 // LOCALITY_ROWS).astype(np.int64) * col_tiles + r2 // LOCALITY_ROWS
    order = None
    if np.any(tile[1:] < tile[:-1]):
        order = np.argsort(tile.astype(np.int16 if int(tile.max()) < 2**15 else np.int64), kind="stable")
        r1, r2 = r1[order], r2[order]
    del tile
    out = scores if order is None else np.empty_like(scores)
    pair_bytes = 2 * max(feats.shape[1], 1) * feats.itemsize
    batch = max(1, min(int(chunk) // (2 * max(feats.shape[1], 1)), BATCH_BYTES // pair_bytes))
    n_workers = max(1, min(workers if workers is not None else SCORE_WORKERS, -(-p1.size // (16 * batch))))
    if n_workers == 1:
        _score_batch(feats, r1, r2, out, batch)
    else:
        bounds = np.linspace(0, p1.size, n_workers + 1).astype(np.int64)
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="ijb-score") as pool:
            jobs = [pool.submit(_score_batch, feats, r1[a:b], r2[a:b], out[a:b], batch)
                    for a, b in zip(bounds[:-1], bounds[1:])]
            for job in jobs:
                job.result()
    if order is not None:
        scores[order] = out
    return scores


def _downsample_roc(fpr: np.ndarray, tpr: np.ndarray, keep: Sequence[int], points: int) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """At most ~``points`` ROC points, log-spaced in FPR, always with the first, last and ``keep`` indices."""
    if len(fpr) <= points:
        return fpr.copy(), tpr.copy()
    positive = fpr[fpr > 0]
    low = np.log10(positive.min()) if positive.size else -8.0
    grid = np.logspace(low, 0.0, points)
    idx = np.searchsorted(fpr, grid).clip(0, len(fpr) - 1)
    idx = np.unique(np.concatenate([idx, [0, len(fpr) - 1], np.asarray(keep, dtype=np.int64)]))
    return fpr[idx], tpr[idx]


def evaluate_ijb(features: np.ndarray, faceness: np.ndarray | None, templates: np.ndarray, medias: np.ndarray,
                 p1: np.ndarray, p2: np.ndarray, labels: np.ndarray,
                 far_targets: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), use_faceness: bool = True,
                 chunk: int = 2_000_000, name: str = "ijb", roc_points: int = 2000) -> IJBResult:
    """IJB 1:1 verification from image features (FACTS 9; insightface ``eval_ijbc.py``).

    Pools the images into templates (:func:`template_features`), scores the pairs (:func:`score_pairs`), builds the
    ROC exactly as ``sklearn.metrics.roc_curve`` (:func:`~digi2real.evaluation.metrics.roc_curve`) and reads the TAR
    at each FAR with insightface's nearest-point rule, ties on FAR going to the highest TAR
    (:func:`~digi2real.evaluation.metrics.tar_at_far`).
    """
    labels = np.asarray(labels).ravel()
    if labels.shape != np.asarray(p1).ravel().shape:
        raise ValueError(f"labels ({labels.size}) and pairs ({np.asarray(p1).size}) must have the same length")
    template_ids, tfeats = template_features(features, faceness, templates, medias, use_faceness=use_faceness)
    scores = score_pairs(tfeats, template_ids, p1, p2, chunk=chunk)
    fpr, tpr, _ = roc_curve(labels, scores)
    tars = tar_at_far(fpr, tpr, far_targets)
    rev = fpr[::-1]
    keep = [len(fpr) - 1 - int(np.argmin(np.abs(rev - t))) for t in far_targets]
    small_fpr, small_tpr = _downsample_roc(fpr, tpr, keep, roc_points)
    return IJBResult(name=name, tar_at_far=tars, fpr=small_fpr, tpr=small_tpr, pairs=int(labels.size),
                     genuine=int(np.count_nonzero(labels)), templates=int(len(template_ids)),
                     images=int(np.asarray(features).shape[0]), use_faceness=bool(use_faceness), roc_size=len(fpr))


def run_ijb(root: str | os.PathLike[str], name: str, embed_fn: EmbedFn, cfg: EvalConfig,
            cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> IJBResult:
    """Whole IJB-B or IJB-C 1:1 evaluation under ``root`` (FACTS 9) with ``cfg.batch_size``, ``cfg.ijb_faceness``,
    ``cfg.ijb_far`` and ``cfg.ijb_chunk_pairs``; features are cached in ``cache_dir`` (see :func:`ijb_features`)."""
    key = _check_name(name)
    meta = read_ijb_meta(root, key)
    feats, face = ijb_features(root, key, embed_fn, batch_size=cfg.batch_size, progress=progress,
                               cache_dir=cache_dir, meta=meta)
    return evaluate_ijb(feats, face, meta.templates, meta.medias, meta.pair_t1, meta.pair_t2, meta.labels,
                        far_targets=cfg.ijb_far, use_faceness=cfg.ijb_faceness, chunk=cfg.ijb_chunk_pairs, name=key)
