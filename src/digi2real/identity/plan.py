"""`plan`: one row per image to generate (paper section 3, "Generating Intra-class Variations" and "Dataset Generation").

For each selected identity the paper makes ``images_per_identity`` images from latents on the unit sphere: each
latent is the SLERP point from the identity's prototype toward one of its sample embeddings (eqs. 3-4) at a fraction
``t ~ Beta(alpha, alpha)`` (eq. 5), and several images (the paper: five) are generated from each latent.

Every random choice derives from (run seed, identity, index) through a hash, never from a global stream, so a plan
made whole or in any number of shards is the same row for row, and one image can be regenerated alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import digi2real
from digi2real.config import PlanConfig
from digi2real.errors import Digi2RealError
from digi2real.fileio import atomic_path, check_apart, safe_name
from digi2real.identity.select import prototypes
from digi2real.identity.sphere import sample_t, slerp
from digi2real.identity.store import EmbeddingStore
from digi2real.sharding import Shard

PLAN_META_KEY = b"digi2real"
#: ``meta["embeddings_relative_to"]``: the recorded ``embeddings`` path is relative to the plan file's folder (plans
#: written before it recorded the path as typed, relative to the working directory of `plan`).
RELATIVE_TO_PLAN = "plan_folder"
MAX_SEED = 2**63 - 1
_FIX = "re-create it with `digi2real plan`"

PLAN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # "<identity>/<image_index>": the image's name in the dataset
        ("identity", pa.string()),
        ("image_index", pa.int32()),
        ("latent_index", pa.int32()),  # images sharing a latent share the SLERP point
        ("sample_row", pa.int64()),  # row in the embeddings artifact of the SLERP direction e
        ("sample_path", pa.string()),  # the source image whose embedding is e
        ("t", pa.float64()),  # SLERP fraction toward e, ~ Beta(alpha, alpha)
        ("seed", pa.int64()),  # the image's own seed (diffusion noise), from (run seed, identity, image index)
    ]
)


def derive_seed(run_seed: int, identity: str, index: int, purpose: str) -> int:
    """A 63-bit seed that depends only on (run seed, identity, index, purpose): stable across machines and shardings."""
    text = f"digi2real|{purpose}|{run_seed}|{identity}|{index}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def direction_order(run_seed: int, identity: str, n_samples: int) -> np.ndarray:
    """The order in which an identity's samples serve as SLERP directions: a seeded permutation, so consecutive
    latents point toward different samples (with 5 samples and 4 latents, four distinct directions)."""
    rng = np.random.default_rng(derive_seed(run_seed, identity, 0, "directions"))
    return rng.permutation(n_samples)


def latent_t(run_seed: int, identity: str, latent_index: int, alpha: float) -> float:
    """The SLERP fraction of one latent, ``t ~ Beta(alpha, alpha)`` (paper eq. 5), from its own derived stream."""
    rng = np.random.default_rng(derive_seed(run_seed, identity, latent_index, "latent"))
    return float(sample_t(rng, alpha))


@dataclass
class Plan:
    table: pa.Table
    meta: dict

    def __len__(self) -> int:
        return self.table.num_rows


def make_plan(store: EmbeddingStore, identities: list[str], cfg: PlanConfig, shard: Shard = Shard(),
              inputs: dict | None = None) -> Plan:
    """Rows for every image of every identity (or of this shard's identities: position modulo shard count)."""
    rows_of = store.identity_rows()
    missing = [i for i in identities if i not in rows_of]
    if missing:
        raise Digi2RealError(
            f"identity {missing[0]!r} (and {len(missing) - 1} more) is in the identity list but not in the embeddings "
            f"{store.root}; select identities from the same embeddings"
        )
    where = str(store.root / "index.parquet") if store.root else "the embeddings"
    for ident in identities:  # each becomes a folder name in the dataset: refused here, before any plan exists
        safe_name(ident, where)
    n_latents = math.ceil(cfg.images_per_identity / cfg.images_per_latent)
    cols: dict[str, list] = {name: [] for name in PLAN_SCHEMA.names}
    for position, ident in enumerate(identities):
        if not shard.owns(position):
            continue
        rows = rows_of[ident]
        order = direction_order(cfg.seed, ident, len(rows))
        ts = [latent_t(cfg.seed, ident, j, cfg.alpha) for j in range(n_latents)]
        for k in range(cfg.images_per_identity):
            j = k // cfg.images_per_latent
            sample_row = int(rows[order[j % len(rows)]])
            cols["key"].append(f"{ident}/{k}")
            cols["identity"].append(ident)
            cols["image_index"].append(k)
            cols["latent_index"].append(j)
            cols["sample_row"].append(sample_row)
            cols["sample_path"].append(store.paths[sample_row])
            cols["t"].append(ts[j])
            cols["seed"].append(derive_seed(cfg.seed, ident, k, "image"))
    table = pa.table(cols, schema=PLAN_SCHEMA)
    meta = {
        "stage": "plan",
        "digi2real_version": digi2real.__version__,
        "settings": cfg.model_dump(),
        "embeddings": str(store.root) if store.root else None,
        "embeddings_sha256": store.meta.get("embeddings_sha256"),
        "identities": len(identities),
        "shard": str(shard),
        "rows": table.num_rows,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(inputs or {}),
    }
    return Plan(table, meta)


def write_plan(path: str | Path, plan: Plan) -> None:
    """Parquet with the settings and input hashes in the file's key-value metadata; written atomically.

    The embeddings path is recorded relative to the plan file's folder (and absolute, as a fallback for a plan moved
    alone), so `generate` finds it from any working directory."""
    path = Path(path)
    if path.is_dir():
        raise Digi2RealError(f"-o {path}: is a folder; name the plan file to write, e.g. {path / 'plan.parquet'}")
    meta = dict(plan.meta)
    check_apart(path, [meta.get("embeddings"), meta.get("ids_file")])
    if meta.get("embeddings"):
        folder = path.expanduser().absolute().parent
        target = Path(meta["embeddings"]).expanduser().absolute()
        meta["embeddings"] = os.path.relpath(target, folder)
        meta["embeddings_absolute"] = os.path.normpath(target)
        meta["embeddings_relative_to"] = RELATIVE_TO_PLAN
    table = plan.table.replace_schema_metadata({PLAN_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _plan_meta(path: Path, raw: bytes | None) -> dict:
    """The plan's metadata, with ``embeddings`` made usable from any working directory (see :func:`write_plan`)."""
    try:
        meta = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise Digi2RealError(f"{path}: its metadata is not JSON; {_FIX}") from None
    if not isinstance(meta, dict):
        raise Digi2RealError(f"{path}: its metadata is a JSON {type(meta).__name__}, not an object; {_FIX}")
    recorded = meta.get("embeddings")
    if recorded is not None and not isinstance(recorded, str):
        raise Digi2RealError(f"{path}: its recorded embeddings path is not a string; {_FIX}")
    if recorded and meta.get("embeddings_relative_to") == RELATIVE_TO_PLAN:
        beside = Path(os.path.normpath(path.expanduser().absolute().parent / recorded))
        absolute = meta.get("embeddings_absolute")
        if not beside.is_dir() and isinstance(absolute, str) and Path(absolute).is_dir():
            beside = Path(absolute)  # the plan was moved without its embeddings
        meta["embeddings"] = str(beside)
    return meta


def read_plan(path: str | Path) -> Plan:
    """Read and check a plan: a hand-made or damaged one is refused with one line before any work starts."""
    path = Path(path)
    if not path.is_file():
        raise Digi2RealError(f"{path}: plan not found; create it with "
                             f"`digi2real plan EMBEDDINGS --ids ids.csv -o {path}`")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise Digi2RealError(f"{path}: not a readable plan ({first}); {_FIX}") from None
    if not set(PLAN_SCHEMA.names) <= set(table.column_names):
        missing = sorted(set(PLAN_SCHEMA.names) - set(table.column_names))
        raise Digi2RealError(f"{path}: not a digi2real plan (no column {', '.join(missing)}); {_FIX}")
    meta = _plan_meta(path, (table.schema.metadata or {}).get(PLAN_META_KEY))
    try:
        table = table.select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise Digi2RealError(f"{path}: a column has the wrong type ({first}); {_FIX}") from None
    plan = Plan(table, meta)
    check_plan(plan, path)
    return plan


def check_plan(plan: Plan, path: Path) -> None:
    """Every value the runner turns into a file name, a seed or an index is what `plan` writes: no nulls, safe
    identity names, keys ``<identity>/<image_index>`` (unique), non-negative indices, seeds of 63 bits, t in [0, 1]."""
    table = plan.table
    for name in PLAN_SCHEMA.names:
        if table.column(name).null_count:
            raise Digi2RealError(f"{path}: column {name!r} has empty values; {_FIX}")
    identities = table.column("identity").to_pylist()
    for ident in dict.fromkeys(identities):
        safe_name(ident, str(path))
    index = table.column("image_index").to_numpy()
    for name, low, high in (("image_index", 0, None), ("latent_index", 0, None), ("sample_row", 0, None),
                            ("seed", 0, MAX_SEED), ("t", 0.0, 1.0)):
        values = table.column(name).to_numpy()
        bad = ~np.isfinite(values) if values.dtype.kind == "f" else np.zeros(len(values), bool)
        bad |= values < low if high is None else ~((values >= low) & (values <= high))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise Digi2RealError(f"{path}: row {row} has {name} {values[row].item()!r}, not {allowed}; {_FIX}")
    keys = table.column("key").to_pylist()
    for row, (key, ident, k) in enumerate(zip(keys, identities, index.tolist())):
        if key != f"{ident}/{k}":
            raise Digi2RealError(f"{path}: row {row} has key {key[:80]!r}, not '<identity>/<image_index>' "
                                 f"({str(ident)[:40]}/{k}); {_FIX}")
    if len(set(keys)) != len(keys):
        raise Digi2RealError(f"{path}: a key appears twice (two rows would write the same image); {_FIX}")


def plan_latents(plan: Plan, store: EmbeddingStore) -> np.ndarray:
    """The identity embedding of every plan row: SLERP from the identity's prototype toward its sample (eqs. 3-4).

    Refuses a store other than the one the plan was made from, since its rows would point at other images.
    """
    expected = plan.meta.get("embeddings_sha256")
    if expected and store.meta.get("embeddings_sha256") and expected != store.meta["embeddings_sha256"]:
        raise Digi2RealError(
            f"{store.root}: these embeddings are not the ones the plan was made from; pass the plan's embeddings "
            f"({plan.meta.get('embeddings')})"
        )
    protos = prototypes(store.embeddings, store.identities)
    index = {label: i for i, label in enumerate(protos.labels)}
    ids = plan.table.column("identity").to_pylist()
    sample_rows = plan.table.column("sample_row").to_numpy()
    for row, (ident, sample) in enumerate(zip(ids, sample_rows.tolist())):
        if ident not in index or sample >= len(store) or store.identities[sample] != ident:
            raise Digi2RealError(
                f"{store.root}: plan row {row} ({ident[:40]!r}, sample row {sample}) does not match these embeddings; "
                f"pass the embeddings the plan was made from ({plan.meta.get('embeddings')}) with --embeddings, or "
                "re-create the plan from these"
            )
    mu = protos.vectors[[index[i] for i in ids]]
    e = store.embeddings[sample_rows]
    t = plan.table.column("t").to_numpy()
    return slerp(mu, e, t).astype(np.float32)
