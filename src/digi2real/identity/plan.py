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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import digi2real
from digi2real.config import PlanConfig
from digi2real.errors import Digi2RealError
from digi2real.fileio import atomic_path
from digi2real.identity.select import prototypes
from digi2real.identity.sphere import sample_t, slerp
from digi2real.identity.store import EmbeddingStore
from digi2real.sharding import Shard

PLAN_META_KEY = b"digi2real"

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
    """Parquet with the settings and input hashes in the file's key-value metadata; written atomically."""
    table = plan.table.replace_schema_metadata({PLAN_META_KEY: json.dumps(plan.meta, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise Digi2RealError(f"{path}: plan not found; create it with `digi2real plan EMBEDDINGS --ids ids.csv -o {path}`")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise Digi2RealError(f"{path}: not a readable plan ({exc}); re-create it with `digi2real plan`") from None
    if not set(PLAN_SCHEMA.names) <= set(table.column_names):
        raise Digi2RealError(f"{path}: not a digi2real plan (columns {table.column_names}); re-create it with `digi2real plan`")
    meta = json.loads((table.schema.metadata or {}).get(PLAN_META_KEY, b"{}"))
    return Plan(table.select(PLAN_SCHEMA.names), meta)


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
    mu = protos.vectors[[index[i] for i in ids]]
    e = store.embeddings[plan.table.column("sample_row").to_numpy()]
    t = plan.table.column("t").to_numpy()
    return slerp(mu, e, t).astype(np.float32)
