"""The ArcFace vectors of a generated dataset, kept with it (issue 14): what `digi2real audit` reads, so a 400K-image
dataset is audited without embedding it again.

`generate` already embeds every aligned crop with ArcFace for its identity-consistency gate (paper Sec. 3.3's
re-embedding check). Those vectors are kept: each finished attempt of a work unit writes one small part file
(``embeddings/parts/unit-<unit>-a<attempt>.safetensors``, atomically, *before* its manifest rows are appended, as
images are), and when a shard's run ends its parts are merged into that shard's file
(``embeddings/shard-<i>-of-<n>.safetensors``, rewritten atomically, then the merged parts removed). A kill leaves
parts behind; the next run of the shard merges them. Work units do not depend on the shard count, and the vectors of
an image are computed from the same batch in every run, so 1 or N shards, killed or not, store the same bytes for the
same image.

Each file holds, row-aligned (float32 so the vectors are exactly the gate's):
``vectors`` [n, d] (unit rows), ``attempts`` int32 [n], ``landmarks`` [n, 5, 2] (the five detected landmarks mapped
into the 112 x 112 aligned crop; NaN when the input was taken as aligned and nothing was detected), ``brightness`` and
``contrast`` [n] (grey-level mean and standard deviation of the written crop); metadata (one entry, ``digi2real``,
JSON): the manifest ``keys``, the ArcFace file's SHA-256, the dimension and the format. The same vectors make the same
bytes (a kill and resume, or a rerun, leaves a shard file byte-identical). :func:`read_vectors` returns the vector of every accepted image of the
dataset (each manifest row that is final and ok, matched by key and attempt), in (identity, image index) order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digi2real.errors import Digi2RealError
from digi2real.fileio import atomic_path

VECTORS_DIR = "embeddings"
PARTS_DIR = "parts"
FORMAT = "digi2real-vectors/1"
META_KEY = "digi2real"  # the file's one metadata entry: JSON of format, keys, model_sha256, dim
LANDMARKS = 5
#: The ArcFace crop the landmarks are expressed in (FACTS 3).
CROP = 112

_PART = re.compile(r"^unit-(\d{7,})-a(\d+)\.safetensors$")


def vectors_dir(dataset: Path) -> Path:
    return dataset / VECTORS_DIR


def part_path(dataset: Path, unit: int, attempt: int) -> Path:
    return dataset / VECTORS_DIR / PARTS_DIR / f"unit-{unit:07d}-a{attempt}.safetensors"


def shard_path(dataset: Path, shard_name: str) -> Path:
    """``shard_name`` is the shard's manifest name (``shard-00000-of-00001.jsonl``)."""
    return dataset / VECTORS_DIR / shard_name.replace(".jsonl", ".safetensors")


@dataclass
class VectorRows:
    """Row-aligned vectors of some images, keyed like the manifest."""

    keys: list[str]
    attempts: np.ndarray  # int32 [n]
    vectors: np.ndarray  # float32 [n, d]
    landmarks: np.ndarray  # float32 [n, 5, 2]
    brightness: np.ndarray  # float32 [n]
    contrast: np.ndarray  # float32 [n]
    model_sha256: str

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray | list[int]) -> "VectorRows":
        index = np.asarray(index, dtype=np.int64)
        return VectorRows([self.keys[i] for i in index], self.attempts[index], self.vectors[index],
                          self.landmarks[index], self.brightness[index], self.contrast[index], self.model_sha256)

    @staticmethod
    def concat(parts: list["VectorRows"], dim: int, model_sha256: str) -> "VectorRows":
        if not parts:
            return VectorRows([], np.zeros(0, np.int32), np.zeros((0, dim), np.float32),
                              np.zeros((0, LANDMARKS, 2), np.float32), np.zeros(0, np.float32),
                              np.zeros(0, np.float32), model_sha256)
        return VectorRows([k for p in parts for k in p.keys], np.concatenate([p.attempts for p in parts]),
                          np.concatenate([p.vectors for p in parts]), np.concatenate([p.landmarks for p in parts]),
                          np.concatenate([p.brightness for p in parts]), np.concatenate([p.contrast for p in parts]),
                          model_sha256)


# ------------------------------------------------------------------------------------------------------ measuring


def aligned_landmarks(landmarks: list | None, attempt: str | None) -> np.ndarray:
    """The five detected landmarks in the 112 x 112 crop the same similarity alignment makes (FACTS 3): the template
    plus what the similarity could not fit, i.e. the face's pose and expression. NaN when nothing was detected
    (``align.input: aligned`` takes the template as the landmarks, which carries no information)."""
    from digi2real.faces.template import alignment_matrix, transform_points

    if landmarks is None or attempt == "aligned":
        return np.full((LANDMARKS, 2), np.nan, np.float32)
    lm = np.asarray(landmarks, np.float64)
    return transform_points(lm, alignment_matrix(lm, CROP)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------ files


def _write(path: Path, rows: VectorRows) -> None:
    from safetensors.numpy import save_file

    tensors = {"vectors": np.ascontiguousarray(rows.vectors, np.float32),
               "attempts": np.ascontiguousarray(rows.attempts, np.int32),
               "landmarks": np.ascontiguousarray(rows.landmarks, np.float32),
               "brightness": np.ascontiguousarray(rows.brightness, np.float32),
               "contrast": np.ascontiguousarray(rows.contrast, np.float32)}
    # one metadata entry: safetensors writes several in an order that changes from process to process, and the same
    # vectors must make the same bytes
    meta = {META_KEY: json.dumps({"format": FORMAT, "keys": rows.keys, "model_sha256": rows.model_sha256,
                                  "dim": int(rows.vectors.shape[1])}, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


_FIX = ("delete it and run the same `digi2real generate` again: images whose vectors are missing are then "
        "re-rendered by their work units")


ARRAYS = ("vectors", "attempts", "landmarks", "brightness", "contrast")
#: Rows read from a file at once when filling the whole dataset's arrays (bounded extra memory at 400K images).
READ_ROWS = 65_536


def _open_checked(f, path: Path) -> tuple[list[str], dict, int]:
    """The keys, metadata and dimension of an open vectors file, checked."""
    try:
        meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise Digi2RealError(f"{path}: not a digi2real vectors file (format {found!r}); {_FIX}")
    keys = meta.get("keys")
    n = len(keys) if isinstance(keys, list) else -1
    shapes = {name: tuple(f.get_slice(name).get_shape()) for name in ARRAYS}
    v = shapes["vectors"]
    if f.get_slice("vectors").get_dtype() != "F32":
        raise Digi2RealError(f"{path}: damaged vectors file (vectors of type {f.get_slice('vectors').get_dtype()}, "
                             f"not float32); {_FIX}")
    if (n < 0 or not all(isinstance(k, str) for k in keys) or len(v) != 2 or v[0] != n
            or shapes["attempts"] != (n,) or shapes["landmarks"] != (n, LANDMARKS, 2)
            or shapes["brightness"] != (n,) or shapes["contrast"] != (n,)):
        raise Digi2RealError(f"{path}: damaged vectors file (its arrays do not match its {max(n, 0)} keys); {_FIX}")
    return keys, meta, int(v[1])


def _unreadable(path: Path, exc: Exception) -> Digi2RealError:
    why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return Digi2RealError(f"{path}: unreadable vectors file ({why}); {_FIX}")


def read_file(path: Path) -> VectorRows:
    """One part or shard file, checked: refused with one line naming it when it is not ours or is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            keys, meta, _ = _open_checked(f, path)
            arrays = {name: f.get_tensor(name) for name in ARRAYS}
    except Digi2RealError:
        raise
    except Exception as exc:  # safetensors raises its own errors for a truncated or foreign file
        raise _unreadable(path, exc) from None
    return VectorRows(keys, arrays["attempts"], arrays["vectors"], arrays["landmarks"], arrays["brightness"],
                      arrays["contrast"], str(meta.get("model_sha256", "")))


def write_part(dataset: Path, unit: int, attempt: int, rows: VectorRows) -> None:
    """The vectors of one finished attempt, written before its manifest rows."""
    if len(rows):
        _write(part_path(dataset, unit, attempt), rows)


def _parts(dataset: Path) -> list[tuple[int, int, Path]]:
    folder = dataset / VECTORS_DIR / PARTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _PART.match(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def _wanted(rows: list[dict]) -> dict[str, int]:
    """key -> attempt of every accepted image (final ok manifest rows)."""
    return {r["key"]: r["attempt"] for r in rows if r.get("final") and r.get("status") == "ok"}


def _select(rows: VectorRows, wanted: dict[str, int], seen: set[str]) -> list[int]:
    keep = []
    for i, (k, a) in enumerate(zip(rows.keys, rows.attempts.tolist())):
        if k not in seen and wanted.get(k) == a:
            keep.append(i)
            seen.add(k)
    return keep


def merge_shard(dataset: Path, shard_name: str, owns, manifest_rows: list[dict], model_sha256: str,
                dim: int) -> int:
    """Merge the parts of the units this shard owns (``owns(unit)``) into its file, keeping only accepted images'
    vectors (each key once), then remove those parts. Returns how many vectors the shard file holds."""
    wanted = _wanted(manifest_rows)
    target = shard_path(dataset, shard_name)
    pieces: list[VectorRows] = []
    seen: set[str] = set()
    if target.exists():
        old = read_file(target)
        pieces.append(old.take(_select(old, wanted, seen)))
    merged = [(u, a, p) for u, a, p in _parts(dataset) if owns(u)]
    for _, _, p in merged:
        part = read_file(p)
        pieces.append(part.take(_select(part, wanted, seen)))
    if not merged and target.exists():
        return len(pieces[0])
    rows = VectorRows.concat(pieces, dim, model_sha256)
    order = sorted(range(len(rows)), key=lambda i: _sort_key(rows.keys[i]))
    rows = rows.take(order)
    _write(target, rows)
    for _, _, p in merged:  # only once the shard file holds them
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    with contextlib.suppress(OSError):  # left while another shard still has parts (or a temporary) in it
        (dataset / VECTORS_DIR / PARTS_DIR).rmdir()
    return len(rows)


def _sort_key(key: str) -> tuple[str, int]:
    ident, _, index = key.rpartition("/")
    return ident, int(index) if index.isdigit() else -1


@dataclass
class StoredVectors:
    """Every accepted image of a dataset with its vector, in (identity, image index) order."""

    rows: VectorRows
    identities: list[str]  # per row
    paths: list[str]  # per row: the image's path under images/


def has_vectors(dataset: Path) -> bool:
    return (dataset / VECTORS_DIR).is_dir()


def read_vectors(dataset: Path, manifest_rows: list[dict]) -> StoredVectors:
    """The stored vector of every accepted image of ``dataset`` (from its shard files and any parts a killed run
    left), in (identity, image index) order, refused with one line when one is missing or two files disagree on the
    model. The arrays are allocated once and filled file by file, :data:`READ_ROWS` rows at a time, so reading
    400K vectors needs little more than the 0.8 GB they occupy."""
    from safetensors import safe_open

    folder = dataset / VECTORS_DIR
    if not folder.is_dir():
        raise Digi2RealError(f"{dataset}: no stored embeddings ({VECTORS_DIR}/ is missing: made before digi2real "
                             "kept them); audit its images instead with `digi2real audit DATASET --embed-images "
                             "--model ARCFACE.onnx` (embedded once, then cached)")
    wanted = _wanted(manifest_rows)
    files = sorted(folder.glob("shard-*.safetensors")) + [p for _, _, p in _parts(dataset)]
    plan: list[tuple[Path, np.ndarray, list[str]]] = []  # file, its rows kept, their keys
    seen: set[str] = set()
    models: set[str] = set()
    dims: set[int] = set()
    for p in files:
        try:
            with safe_open(str(p), "np") as f:
                keys, meta, dim = _open_checked(f, p)
                attempts = f.get_tensor("attempts")
        except Digi2RealError:
            raise
        except Exception as exc:
            raise _unreadable(p, exc) from None
        if keys:
            models.add(str(meta.get("model_sha256", "")))
            dims.add(dim)
        keep = [i for i, (k, a) in enumerate(zip(keys, attempts.tolist())) if k not in seen and wanted.get(k) == a]
        seen.update(keys[i] for i in keep)
        plan.append((p, np.asarray(keep, np.int64), [keys[i] for i in keep]))
    if len(models) > 1 or len(dims) > 1:
        raise Digi2RealError(f"{folder}: vectors from {len(models)} ArcFace models ({', '.join(sorted(models))[:100]}) "
                             "in one dataset; a dataset is embedded by one model: regenerate it into a new folder")
    missing = [k for k in wanted if k not in seen]
    if missing:
        raise Digi2RealError(f"{folder}: {len(missing)} accepted images have no stored vector (e.g. {missing[0]!r}); "
                             "run the same `digi2real generate` again to finish the dataset, or audit its images "
                             "with --embed-images")
    all_keys = sorted((k for _, _, ks in plan for k in ks), key=_sort_key)
    position = {k: i for i, k in enumerate(all_keys)}
    n, dim = len(all_keys), next(iter(dims), 0)
    out = VectorRows(all_keys, np.empty(n, np.int32), np.empty((n, dim), np.float32),
                     np.empty((n, LANDMARKS, 2), np.float32), np.empty(n, np.float32), np.empty(n, np.float32),
                     next(iter(models), ""))
    for p, keep, keys in plan:
        if not len(keep):
            continue
        target = np.array([position[k] for k in keys], np.int64)
        try:
            with safe_open(str(p), "np") as f:
                for start in range(0, len(keep), READ_ROWS):
                    rows, dest = keep[start:start + READ_ROWS], target[start:start + READ_ROWS]
                    lo, hi = int(rows.min()), int(rows.max()) + 1
                    for name in ARRAYS:
                        block = f.get_slice(name)[lo:hi]
                        getattr(out, name)[dest] = block[rows - lo]
        except Exception as exc:  # noqa: BLE001 - a file damaged after it was listed
            raise _unreadable(p, exc) from None
    by_key = {r["key"]: r for r in manifest_rows if r.get("final") and r.get("status") == "ok"}
    return StoredVectors(out, [by_key[k]["identity"] for k in all_keys], [by_key[k]["path"] for k in all_keys])
