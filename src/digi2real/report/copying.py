"""Is the trained miniature generator copying its training images? (issue 13; the report's "Not copying" section)

The paper relies on Arc2Face not memorising its training set ("their ablation studies demonstrate that their approach
does not memorize the training data", paper Sec. 3). The public Arc2Face does not publish that set (an upscaled
WebFace42M, fine-tuned on FFHQ and CelebA-HQ), so the check is possible only for the miniature generator trained here
(``tools/train_miniature.py``), whose training images are described exactly by the shipped ``record.json`` ("pool"):
image ``k`` of the real-style person ``first + i`` is ``render_item(seed, first + i, k, size, style)``.

The training images are re-rendered at 112 x 112 (the renderer draws the same face at any size, framed as an
ArcFace-aligned crop) and embedded with the run's ArcFace once per run folder (:func:`training_embeddings`, cached
beside the run's models, keyed by the pool and the encoder file's SHA-256). Everything else here is arithmetic on unit
vectors: nearest training image of a generated image, identity prototypes (normalised mean embedding, as the paper's
identity prototypes), and the training set's own reference cosines that say what a copy would look like.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from digi2real.errors import Digi2RealError

#: The training record the miniature models ship with (``digi2real.miniature.SHIPPED / RECORD``).
RECORD = "record.json"
#: The cache of the training images' embeddings, in the run's ``models/`` folder.
CACHE = "generator_train_embeddings.npz"
#: Raised when what the cache holds or how it is keyed changes, so older caches are recomputed, never misread.
CACHE_VERSION = 1
EMBED_SIZE = 112  # ArcFace's aligned crop (FACTS 3)
RENDER_CHUNK = 256  # images rendered then embedded together: bounded memory, full encoder batches
#: A larger pool in record.json is a damaged record (the shipped one holds 15,000 images; a million would take hours).
POOL_LIMIT = 1_000_000
#: Training images whose nearest image of another training person is the "new face" reference (sampled, seeded).
OTHER_PERSON_SAMPLE = 1000
#: Pairs of training identities summarised for the "two training identities" reference (all of them when fewer).
IDENTITY_PAIR_SAMPLE = 200_000

NOT_MINIATURE = ("this check needs the generator's training images, and the public Arc2Face does not publish its "
                 "training set (an upscaled WebFace42M, fine-tuned on FFHQ and CelebA-HQ; paper Sec. 3); runs with "
                 "`miniature: true` are checked against the images the shipped miniature generator was trained on")
_FIX = ("the shipped miniature models must come with the record tools/train_miniature.py writes; reinstall digi2real, "
        "or in a clone run `python tools/train_miniature.py`")


# ------------------------------------------------------------------------------------------------------ the pool


@dataclass(frozen=True)
class Pool:
    """The generator's training images, as record.json's "pool" states them. Row ``r`` of the embeddings is image
    ``r % images`` of person ``first + r // images``."""

    first: int
    identities: int
    images: int
    size: int
    style: str
    seed: int

    def __len__(self) -> int:
        return self.identities * self.images

    def item(self, row: int) -> tuple[int, int]:
        """(person, image index) of embedding row ``row``."""
        i, k = divmod(int(row), self.images)
        return self.first + i, k

    def render(self, row: int, size: int = EMBED_SIZE) -> np.ndarray:
        """The training image of row ``row``, drawn at ``size`` (the generator saw it at :attr:`size`)."""
        from digi2real.sources.procedural import render_item

        person, k = self.item(row)
        return render_item(self.seed, person, k, size=size, style=self.style)

    def describe(self) -> str:
        return (f"{self.identities:,} {self.style}-style people ({self.first} to {self.first + self.identities - 1}) "
                f"x {self.images} images, {self.size} px, seed {self.seed}")


def read_pool(shipped: Path) -> Pool:
    """The "pool" of ``shipped/record.json``; a one-line :class:`Digi2RealError` when it is missing or malformed."""
    from digi2real.fileio import read_json
    from digi2real.sources.procedural import STYLES

    path = Path(shipped) / RECORD
    record = read_json(path, fix=_FIX, keys={"pool": dict})
    pool = record["pool"]
    values = {}
    for key, low in (("first", 0), ("identities", 1), ("images", 1), ("size", 1), ("seed", 0)):
        value = pool.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise Digi2RealError(f"{path}: pool.{key} must be a whole number >= {low}, got {value!r}; {_FIX}")
        values[key] = value
    if pool.get("style") not in STYLES:
        raise Digi2RealError(f"{path}: pool.style must be one of {', '.join(STYLES)}, got {pool.get('style')!r}; "
                             f"{_FIX}")
    if values["identities"] * values["images"] > POOL_LIMIT:
        raise Digi2RealError(f"{path}: the pool holds {values['identities'] * values['images']:,} images, more than "
                             f"the {POOL_LIMIT:,} any shipped miniature was trained on; {_FIX}")
    return Pool(style=pool["style"], **values)


# ------------------------------------------------------------------------------------------------------ embeddings


@dataclass(frozen=True)
class TrainingEmbeddings:
    """The pool's embeddings (``len(pool) x D`` unit rows), how long computing them took, and whether this build
    reused them from the cache."""

    pool: Pool
    embeddings: np.ndarray
    seconds: float
    reused: bool
    path: Path


def cache_key(pool: Pool, encoder_sha256: str) -> str:
    from digi2real.fileio import sha256_json

    return sha256_json({"version": CACHE_VERSION, "pool": asdict(pool), "encoder_sha256": encoder_sha256,
                        "input": EMBED_SIZE})


def embed_pool(pool: Pool, encoder) -> np.ndarray:
    """Render every training image at 112 x 112 and embed it with ``encoder`` (an ArcFaceEncoder); unit rows in
    pool order. 15,000 images (the shipped pool's size) with the shipped ArcFace took 81 s on 2 CPU cores shared with
    a training job (about 4 ms to render and 2 ms to embed each); reading them back from the cache takes 0.1 s."""
    out = np.empty((len(pool), encoder.embedding_dim), np.float32)
    for start in range(0, len(pool), RENDER_CHUNK):
        rows = range(start, min(len(pool), start + RENDER_CHUNK))
        out[start:start + len(rows)] = encoder(np.stack([pool.render(r) for r in rows]))
    return out


def _read_cache(path: Path, key: str, shape: tuple[int, int]) -> tuple[np.ndarray, float] | None:
    """The cached embeddings when ``path`` holds them for ``key`` (else None: missing, stale or damaged)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            emb = np.asarray(data["embeddings"], np.float32)
            seconds = float(data["seconds"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if emb.shape != shape or not np.isfinite(emb).all():
        return None
    return emb, seconds


def _write_cache(path: Path, key: str, pool: Pool, encoder_sha256: str, emb: np.ndarray, seconds: float) -> None:
    import json

    from digi2real.fileio import atomic_open, clean_temporaries

    clean_temporaries([path.parent])  # a build killed while writing left its temporary here
    with atomic_open(path, "wb") as handle:
        np.savez(handle, key=np.array(key), pool=np.array(json.dumps(asdict(pool), sort_keys=True)),
                 encoder_sha256=np.array(encoder_sha256), seconds=np.array(seconds), embeddings=emb)


def training_embeddings(pool: Pool, encoder, cache: Path) -> TrainingEmbeddings:
    """The pool's embeddings with ``encoder``: read from ``cache`` when it was made for this pool and this encoder
    file, else computed (:func:`embed_pool`) and written there atomically."""
    sha = encoder.file_hash()
    key = cache_key(pool, sha)
    cached = _read_cache(cache, key, (len(pool), encoder.embedding_dim))
    if cached is not None:
        return TrainingEmbeddings(pool, cached[0], cached[1], True, cache)
    started = time.perf_counter()
    emb = embed_pool(pool, encoder)
    seconds = time.perf_counter() - started
    _write_cache(cache, key, pool, sha, emb, seconds)
    return TrainingEmbeddings(pool, emb, seconds, False, cache)


# ------------------------------------------------------------------------------------------------------ measures


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest(queries: np.ndarray, table: np.ndarray, exclude: np.ndarray | None = None,
            labels: np.ndarray | None = None, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each unit row of ``queries``, the row of ``table`` with the largest cosine, and that cosine. With
    ``exclude`` (a label per query) and ``labels`` (a label per table row), rows sharing the query's label are
    skipped (a query with no other row gets index -1 and cosine NaN)."""
    idx = np.empty(len(queries), np.int64)
    cos = np.empty(len(queries), np.float64)
    for start in range(0, len(queries), chunk):
        sims = np.asarray(queries[start:start + chunk], np.float32) @ np.asarray(table, np.float32).T
        if exclude is not None and labels is not None:
            sims[np.asarray(exclude[start:start + chunk])[:, None] == np.asarray(labels)[None, :]] = -np.inf
        best = sims.argmax(axis=1) if sims.shape[1] else np.zeros(len(sims), np.int64)
        value = sims[np.arange(len(sims)), best] if sims.shape[1] else np.full(len(sims), -np.inf)
        ok = np.isfinite(value)
        idx[start:start + len(sims)] = np.where(ok, best, -1)
        cos[start:start + len(sims)] = np.where(ok, value, np.nan)
    return idx, cos


def prototypes(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels in first-seen order, their prototypes: the normalised mean of their embeddings)."""
    labels = np.asarray(labels)
    names, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    sums = np.zeros((len(names), emb.shape[1]), np.float64)
    np.add.at(sums, inverse.reshape(-1), np.asarray(emb, np.float64))
    order = np.argsort(first)
    return names[order], normalise(sums[order])


@dataclass(frozen=True)
class Reference:
    """What the training set itself says a copy, and a new face, look like (cosines of the run's ArcFace)."""

    same_person: np.ndarray  # two images of one training person (every pair)
    other_person: np.ndarray  # a training image to its nearest image of another training person (a sample)
    same_identity: np.ndarray  # the prototypes of two disjoint halves of one training person's images
    nearest_identity: np.ndarray  # a training identity's prototype to its nearest other training identity's
    identity_pairs: np.ndarray  # two training identities' prototypes (all pairs, or a sample)
    prototypes: np.ndarray  # the training identities' prototypes (identities x D)


def reference(train: np.ndarray, images: int, seed: int) -> Reference:
    """The training set's reference cosines (see :class:`Reference`); ``train`` holds ``images`` rows per person."""
    rng = np.random.default_rng([seed, 13])
    per = np.asarray(train, np.float32).reshape(-1, images, train.shape[1])
    n = len(per)
    protos = normalise(per.mean(axis=1))
    same = np.zeros(0)
    halves = np.zeros(0)
    if images >= 2:
        gram = np.einsum("nkd,njd->nkj", per, per)
        a, b = np.triu_indices(images, 1)
        same = gram[:, a, b].reshape(-1).astype(np.float64)
        h = images // 2
        halves = np.einsum("nd,nd->n", normalise(per[:, :h].mean(axis=1)),
                           normalise(per[:, h:].mean(axis=1))).astype(np.float64)
    person = np.repeat(np.arange(n), images)
    sample = rng.choice(len(train), size=min(OTHER_PERSON_SAMPLE, len(train)), replace=False)
    _, other = nearest(train[sample], train, exclude=person[sample], labels=person)
    _, nearest_id = nearest(protos, protos, exclude=np.arange(n), labels=np.arange(n))
    pairs = n * (n - 1) // 2
    if pairs <= IDENTITY_PAIR_SAMPLE:
        i, j = np.triu_indices(n, 1)
    else:
        i = rng.integers(n, size=IDENTITY_PAIR_SAMPLE)
        j = (i + rng.integers(1, n, size=IDENTITY_PAIR_SAMPLE)) % n  # never i itself
    return Reference(same, other[np.isfinite(other)], halves, nearest_id[np.isfinite(nearest_id)],
                     _pair_cosines(protos, i, j), protos)


def _pair_cosines(rows: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Cosines of the unit rows ``i[n]`` and ``j[n]``, a chunk at a time (200,000 pairs of 512-d rows gathered at once
    would take 800 MB)."""
    out = np.empty(len(i), np.float64)
    for start in range(0, len(i), chunk):
        a, b = rows[i[start:start + chunk]], rows[j[start:start + chunk]]
        out[start:start + len(a)] = np.einsum("nd,nd->n", a, b)
    return out


def quantiles(values: np.ndarray) -> list:
    """[count, mean, 5%, median, 95%, max] of ``values`` (None for an empty set), the tables' columns."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return [0, None, None, None, None, None]
    q05, q50, q95 = np.quantile(v, [0.05, 0.5, 0.95])
    return [len(v), float(v.mean()), float(q05), float(q50), float(q95), float(v.max())]


def median(values: np.ndarray) -> float | None:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


@dataclass(frozen=True)
class Judgement:
    """Where a generated set sits between two levels the training set gives: the new-face level (median cosine of a
    training face to its nearest *other* person) and the copy level (median cosine of two images, or two halves, of
    one person). A set nearer the copy level than the new-face level looks copied."""

    measured: float | None  # the generated set's median
    new: float | None
    copy: float | None
    reaching: int  # generated values at or above the copy level
    total: int
    reference_rate: float | None  # share of the new-face reference at or above the copy level

    @property
    def decidable(self) -> bool:
        """The two levels separate (an encoder that does not tell these people apart gives copy <= new)."""
        return None not in (self.measured, self.new, self.copy) and self.copy > self.new

    @property
    def copying(self) -> bool:
        return self.decidable and self.measured >= 0.5 * (self.new + self.copy)


def judge(generated: np.ndarray, new_reference: np.ndarray, copy_reference: np.ndarray) -> Judgement:
    copy = median(copy_reference)
    new = np.asarray(new_reference, np.float64)
    gen = np.asarray(generated, np.float64)
    gen = gen[np.isfinite(gen)]
    rate = float((new >= copy).mean()) if copy is not None and len(new) else None
    return Judgement(median(gen), median(new), copy, int((gen >= copy).sum()) if copy is not None else 0, len(gen),
                     rate)
