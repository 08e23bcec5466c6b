"""The embeddings artifact (DESIGN "Artifacts"): what `embed` writes and `select`/`plan` read.

A directory with
- ``embeddings.safetensors``: ``embeddings``, float32 N x D, L2-normalised rows;
- ``index.parquet``: one row per embedding: ``identity`` (string), ``path`` (relative to the source root);
- ``meta.json``: encoder file hash, source description, counts, settings; written last, so its presence means the
  artifact is complete;
- ``failures.jsonl``: images that could not be embedded, each with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file

from digi2real.errors import Digi2RealError
from digi2real.fileio import atomic_path, sha256_file, write_json

EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "index.parquet"
META_FILE = "meta.json"
FAILURES_FILE = "failures.jsonl"


@dataclass
class EmbeddingStore:
    """Embeddings with their identities and paths, row-aligned."""

    embeddings: np.ndarray  # N x D float32, unit rows
    identities: list[str]
    paths: list[str]
    meta: dict = field(default_factory=dict)
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.identities)

    def identity_rows(self) -> dict[str, np.ndarray]:
        """Row indices of each identity, in first-appearance order (the source's order)."""
        groups: dict[str, list[int]] = {}
        for row, ident in enumerate(self.identities):
            groups.setdefault(ident, []).append(row)
        return {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}

    def fingerprint(self) -> str:
        """Content hash of the embeddings file, recorded by downstream artifacts to detect stale inputs."""
        if self.root is None:
            raise ValueError("fingerprint needs a store read from disk")
        return self.meta.get("embeddings_sha256") or sha256_file(self.root / EMBEDDINGS_FILE)


def write_store(out_dir: Path, embeddings: np.ndarray, identities: list[str], paths: list[str], meta: dict) -> None:
    """Write the artifact atomically, file by file, with ``meta.json`` last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    with atomic_path(out_dir / EMBEDDINGS_FILE) as tmp:
        save_file({"embeddings": embeddings}, str(tmp))
    table = pa.table({"identity": pa.array(identities, pa.string()), "path": pa.array(paths, pa.string())})
    with atomic_path(out_dir / INDEX_FILE) as tmp:
        pq.write_table(table, tmp)
    meta = dict(meta, count=len(identities), identities=len(set(identities)), dim=int(embeddings.shape[1]),
                embeddings_sha256=sha256_file(out_dir / EMBEDDINGS_FILE))
    write_json(out_dir / META_FILE, meta)


def read_store(path: str | Path) -> EmbeddingStore:
    """Read an embeddings directory, refusing an incomplete or inconsistent one with a clear message."""
    root = Path(path)
    if not root.is_dir():
        raise Digi2RealError(f"{root}: embeddings directory not found; create it with `digi2real embed SOURCE -o {root}`")
    if not (root / META_FILE).is_file():
        raise Digi2RealError(
            f"{root}: embeddings are incomplete (no {META_FILE}); re-run `digi2real embed` with -o {root} to finish them"
        )
    try:
        meta = json.loads((root / META_FILE).read_text())
        emb = load_file(str(root / EMBEDDINGS_FILE))["embeddings"]
        table = pq.read_table(root / INDEX_FILE)
    except (OSError, ValueError, KeyError, json.JSONDecodeError, pa.ArrowException) as exc:
        raise Digi2RealError(f"{root}: embeddings artifact is unreadable ({exc}); delete it and re-run `digi2real embed`") from None
    if not isinstance(meta, dict):
        raise Digi2RealError(f"{root / META_FILE}: corrupt (not a JSON object); delete {root} and re-run `digi2real embed`")
    if "identity" not in table.column_names or "path" not in table.column_names:
        raise Digi2RealError(f"{root / INDEX_FILE}: lacks the identity/path columns; delete {root} and re-run "
                             "`digi2real embed`")
    identities = table.column("identity").to_pylist()
    paths = table.column("path").to_pylist()
    if emb.ndim != 2 or emb.shape[0] != len(identities):
        raise Digi2RealError(
            f"{root}: {EMBEDDINGS_FILE} has {emb.shape[0]} rows but {INDEX_FILE} has {len(identities)}; re-run embed"
        )
    if any(not isinstance(i, str) or not i for i in identities):
        raise Digi2RealError(f"{root / INDEX_FILE}: an identity is empty or not text; re-run `digi2real embed`")
    check_finite(emb, identities, root / EMBEDDINGS_FILE)
    return EmbeddingStore(emb.astype(np.float32, copy=False), identities, paths, meta, root)


def check_finite(embeddings: np.ndarray, identities: list[str], where: Path | str) -> None:
    """Refuse embeddings with NaN/infinite values or zero rows: a NaN cosine ranks every identity as -inf in `select`
    and poisons every prototype it is averaged into (DESIGN "Safety": finite-number checks for embeddings)."""
    if embeddings.dtype.kind != "f":
        raise Digi2RealError(f"{where}: embeddings are {embeddings.dtype}, not floating point; re-run `digi2real embed`")
    bad = ~np.isfinite(embeddings).all(axis=1)
    bad |= ~bad & (np.abs(np.nan_to_num(embeddings)).sum(axis=1) == 0)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise Digi2RealError(f"{where}: {len(rows)} of {len(embeddings)} embeddings are not finite or are zero (first: "
                             f"row {rows[0]}, identity {identities[rows[0]]!r}); re-embed them with `digi2real embed "
                             "--overwrite`, or remove those rows")
