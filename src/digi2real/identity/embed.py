"""`embed`: ArcFace embeddings of the source images (paper section 3: five images per identity are embedded).

Resumable: the images are cut into fixed parts; each finished part is written atomically to ``<out>/parts/``; a
re-run with the same inputs and settings skips the finished parts, and the final artifact (see ``store.py``) is
assembled only when every part exists. Unusable images (corrupt, empty, not 112 x 112) are skipped and reported in
``failures.jsonl`` rather than stopping the run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

import digi2real
from digi2real.config import EmbedConfig, settings_diff
from digi2real.errors import BadImageError, Digi2RealError
from digi2real.faces.arcface import INPUT_SIZE, ArcFaceEncoder
from digi2real.fileio import atomic_open, atomic_path, clean_temporaries, read_json, sha256_json, write_json
from digi2real.identity.store import FAILURES_FILE, META_FILE, write_store
from digi2real.sources.base import ImageSource, SourceItem

PARTS_DIR = "parts"
RUN_FILE = "run.json"


@dataclass
class EmbedSummary:
    out_dir: Path
    embedded: int
    failed: int
    identities: int
    resumed_parts: int
    seconds: float
    already_complete: bool = False


def _load_checked(source: ImageSource, item: SourceItem) -> tuple[np.ndarray | None, str | None]:
    """Decode one image; return (image, None) or (None, reason). Never raises for a bad file."""
    try:
        img = source.load(item)
    except BadImageError as exc:
        return None, str(exc)
    if img.shape != (INPUT_SIZE, INPUT_SIZE, 3):
        return None, (
            f"{item.path}: image is {img.shape[1]}x{img.shape[0]}, not an aligned {INPUT_SIZE}x{INPUT_SIZE} crop; "
            "align photos first with `digi2real align`"
        )
    return img, None


def _batches(decoded: Iterator[tuple[np.ndarray | None, str | None]], rows: range, batch_size: int
             ) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
    """Group decoded images into encoder batches, passing failures through with their row numbers."""
    images: list[np.ndarray] = []
    ok_rows: list[int] = []
    failed: list[tuple[int, str]] = []
    for row, (img, reason) in zip(rows, decoded):
        if img is None:
            failed.append((row, reason or "unreadable"))
            continue
        images.append(img)
        ok_rows.append(row)
        if len(images) == batch_size:
            yield ok_rows, np.stack(images), failed
            images, ok_rows, failed = [], [], []
    if images or failed:
        yield ok_rows, (np.stack(images) if images else None), failed


def _part_path(out_dir: Path, index: int) -> Path:
    return out_dir / PARTS_DIR / f"part-{index:06d}.safetensors"


def _write_part(path: Path, rows: list[int], vectors: list[np.ndarray], failures: list[tuple[int, str]], dim: int) -> None:
    emb = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    with atomic_path(path) as tmp:
        save_file(
            {"embeddings": np.ascontiguousarray(emb, np.float32), "rows": np.asarray(rows, np.int64)},
            str(tmp),
            metadata={"failures": json.dumps(failures)},
        )


def _read_part(path: Path, lo: int, hi: int, dim: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """A finished part, checked: its rows lie in [lo, hi), one finite unit vector each. Raises ValueError when the
    file is damaged (a disk error, or an edit): the caller redoes the part."""
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "np") as handle:
            failures = [tuple(f) for f in json.loads((handle.metadata() or {}).get("failures", "[]"))]
        emb, rows = tensors["embeddings"], tensors["rows"]
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"unreadable ({str(exc)[:80]})") from None
    if emb.ndim != 2 or emb.shape != (len(rows), dim) or (len(rows) and (rows.min() < lo or rows.max() >= hi)):
        raise ValueError("its rows do not match the part")
    if not np.isfinite(emb).all() or any(len(f) != 2 or not lo <= int(f[0]) < hi for f in failures):
        raise ValueError("non-finite embeddings or bad failure rows")
    return emb, rows, failures


def _part_usable(path: Path, lo: int, hi: int, dim: int) -> bool:
    """Whether a part left by an earlier run can be kept; a damaged one is deleted so that it is redone."""
    if not path.is_file():
        return False
    try:
        _read_part(path, lo, hi, dim)
        return True
    except ValueError:
        path.unlink(missing_ok=True)
        return False


def run_fingerprint(source: ImageSource, encoder: ArcFaceEncoder, cfg: EmbedConfig, items: list[SourceItem]) -> dict:
    """Everything that determines the output; a resumed run must match it exactly. ``content_sha256`` covers what
    the listed images hold (sizes and times, or zip CRCs), so images replaced under the same names are noticed."""
    return {
        "source": source.describe(),
        "content_sha256": source.content_fingerprint(items),
        "items": len(items),
        "encoder_sha256": encoder.file_hash(),
        "encoder_input": {"mean": encoder.mean, "std": encoder.std},
        "images_per_identity": cfg.images_per_identity,
        "chunk_size": cfg.chunk_size,
    }


def _previous_run(out_dir: Path) -> dict | None:
    """The inputs record of what ``out_dir`` holds (a finished artifact's meta.json, or an unfinished run's
    parts/run.json), or None for a new folder."""
    meta_path, run_path = out_dir / META_FILE, out_dir / PARTS_DIR / RUN_FILE
    fix = f"delete it, or pass --overwrite to replace the embeddings in {out_dir}"
    for path in (meta_path, run_path):
        if path.is_file():
            return read_json(path, fix=fix, keys={"inputs_sha256": str})
    return None


def embed_source(source: ImageSource, encoder: ArcFaceEncoder, out_dir: str | Path, cfg: EmbedConfig,
                 progress: bool = True, overwrite: bool = False) -> EmbedSummary:
    """Embed the first ``cfg.images_per_identity`` images of every identity and write the embeddings artifact."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    if out_dir.exists() and not out_dir.is_dir():
        raise Digi2RealError(f"{out_dir}: exists and is not a folder; choose another -o for the embeddings")
    clean_temporaries([out_dir, out_dir / PARTS_DIR])
    items = source.list_items(cfg.images_per_identity)
    if not items:
        raise Digi2RealError(f"{source.describe().get('path', source.kind)}: the source has no images to embed")
    inputs = run_fingerprint(source, encoder, cfg, items)
    key = sha256_json(inputs)

    try:
        previous = _previous_run(out_dir)
    except Digi2RealError:
        if not overwrite:
            raise
        previous = {"inputs_sha256": "unreadable"}  # --overwrite replaces what we wrote, readable or not
    existing = previous.get("inputs_sha256") if previous else None
    if existing is not None and existing != key:
        if not overwrite:
            changed = "; ".join(f"{k}: was {a!r}, now {b!r}"[:160] for k, a, b in
                                settings_diff(previous.get("inputs") or {}, inputs)[:3]) or "unknown inputs"
            raise Digi2RealError(f"{out_dir}: holds embeddings made from other inputs or settings ({changed}); "
                                 "choose another -o, or pass --overwrite to replace them")
        for name in (META_FILE, FAILURES_FILE, "embeddings.safetensors", "index.parquet"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
    elif existing == key and (out_dir / META_FILE).is_file():
        meta = previous or {}
        return EmbedSummary(out_dir, int(meta.get("count", 0)), int(meta.get("failed", 0)),
                            int(meta.get("identities", 0)), 0, time.perf_counter() - started, already_complete=True)

    (out_dir / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    write_json(out_dir / PARTS_DIR / RUN_FILE, {"inputs_sha256": key, "inputs": inputs, "items": len(items)})

    n_parts = (len(items) + cfg.chunk_size - 1) // cfg.chunk_size
    bounds = [(i * cfg.chunk_size, min(len(items), (i + 1) * cfg.chunk_size)) for i in range(n_parts)]
    todo = [i for i in range(n_parts)
            if not _part_usable(_part_path(out_dir, i), *bounds[i], encoder.embedding_dim)]
    resumed = n_parts - len(todo)
    done_items = sum(min(cfg.chunk_size, len(items) - i * cfg.chunk_size) for i in range(n_parts) if i not in set(todo))

    bar = tqdm(total=len(items), initial=done_items, unit="img", desc="embed", disable=not progress, smoothing=0.1)
    workers = max(1, cfg.workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part in todo:
            lo, hi = part * cfg.chunk_size, min(len(items), (part + 1) * cfg.chunk_size)
            if cfg.workers > 0:
                # Decoding runs ahead in threads while onnxruntime (which releases the GIL) embeds the previous batch.
                decoded = pool.map(lambda it: _load_checked(source, it), items[lo:hi])
            else:
                decoded = (_load_checked(source, it) for it in items[lo:hi])
            rows: list[int] = []
            vectors: list[np.ndarray] = []
            failures: list[tuple[int, str]] = []
            for ok_rows, batch, failed in _batches(iter(decoded), range(lo, hi), encoder.batch_size):
                bar.update(len(ok_rows) + len(failed))
                if batch is not None:
                    vec = encoder(batch)
                    finite = np.isfinite(vec).all(axis=1)
                    # A NaN embedding (a degenerate image, a broken model) is a failure of that image, not a vector.
                    failed = failed + [(r, f"{items[r].path}: the encoder returned a non-finite embedding")
                                       for r, ok in zip(ok_rows, finite) if not ok]
                    vectors.append(vec[finite])
                    rows.extend(r for r, ok in zip(ok_rows, finite) if ok)
                failures.extend(failed)
            _write_part(_part_path(out_dir, part), rows, vectors, failures, encoder.embedding_dim)
    bar.close()
    return _assemble(out_dir, items, n_parts, inputs, key, encoder, resumed, started)


def _assemble(out_dir: Path, items: list[SourceItem], n_parts: int, inputs: dict, key: str,
              encoder: ArcFaceEncoder, resumed: int, started: float) -> EmbedSummary:
    """Join the parts into the final artifact, then remove them."""
    all_rows: list[np.ndarray] = []
    all_vectors: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    for part in range(n_parts):
        lo, hi = part * inputs["chunk_size"], min(len(items), (part + 1) * inputs["chunk_size"])
        try:
            emb, rows, failed = _read_part(_part_path(out_dir, part), lo, hi, encoder.embedding_dim)
        except ValueError as exc:
            _part_path(out_dir, part).unlink(missing_ok=True)
            raise Digi2RealError(f"{_part_path(out_dir, part)}: {exc}; it was removed: run the same command again "
                                 "to redo that part") from None
        all_vectors.append(emb)
        all_rows.append(rows)
        failures.extend(failed)
    rows = np.concatenate(all_rows) if all_rows else np.zeros(0, np.int64)
    if len(rows) == 0:
        raise Digi2RealError(
            f"every image failed ({len(failures)}), first: {failures[0][1] if failures else '?'}; see the reasons above"
        )
    embeddings = np.concatenate(all_vectors)
    with atomic_open(out_dir / FAILURES_FILE, "w") as handle:
        for row, reason in failures:
            item = items[row]
            handle.write(json.dumps({"identity": item.identity, "path": item.path, "reason": reason}) + "\n")
    identities = [items[r].identity for r in rows]
    meta = {
        "stage": "embed",
        "digi2real_version": digi2real.__version__,
        "inputs_sha256": key,
        "source": inputs["source"],
        "inputs": inputs,
        "encoder": {"file": str(encoder.model_path), "sha256": inputs["encoder_sha256"],
                    "input_mean": encoder.mean, "input_std": encoder.std},
        "images_per_identity": inputs["images_per_identity"],
        "failed": len(failures),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_store(out_dir, embeddings, identities, [items[r].path for r in rows], meta)
    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
    return EmbedSummary(out_dir, len(rows), len(failures), len(set(identities)), resumed,
                        time.perf_counter() - started)
