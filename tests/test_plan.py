"""The generation plan: determinism, sharding, and the SLERP latents it implies (paper section 3)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from digi2real.config import PlanConfig
from digi2real.errors import Digi2RealError
from digi2real.identity import angle, derive_seed, make_plan, plan_latents, prototypes, read_plan, write_plan
from digi2real.identity.store import read_store, write_store
from digi2real.sharding import Shard, parse_shard, shard_from_env


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(30)]
    emb, labels, paths = [], [], []
    for ident in ids:
        center = rng.normal(size=64)
        for k in range(5):
            emb.append(center + 0.7 * rng.normal(size=64))
            labels.append(ident)
            paths.append(f"{ident}/{k}.png")
    emb = np.asarray(emb, np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    write_store(tmp_path / "emb", emb, labels, paths, {"stage": "embed"})
    return read_store(tmp_path / "emb")


def test_plan_rows_and_grouping(store):
    cfg = PlanConfig(images_per_identity=20, images_per_latent=5, alpha=2.0, seed=7)
    ids = [str(i) for i in range(10)]
    plan = make_plan(store, ids, cfg)
    t = plan.table.to_pydict()
    assert len(plan) == 200
    assert t["key"][:3] == ["0/0", "0/1", "0/2"]
    for ident in ids:
        rows = [i for i, x in enumerate(t["identity"]) if x == ident]
        assert [t["image_index"][i] for i in rows] == list(range(20))
        assert [t["latent_index"][i] for i in rows] == [k // 5 for k in range(20)]
        # images of one latent share t and direction; the four latents point toward four different samples
        for j in range(4):
            group = [i for i in rows if t["latent_index"][i] == j]
            assert len({t["t"][i] for i in group}) == 1 and len({t["sample_row"][i] for i in group}) == 1
        assert len({t["sample_row"][i] for i in rows}) == 4
        assert all(store.identities[t["sample_row"][i]] == ident for i in rows)
    assert len(set(t["seed"])) == 200
    assert all(0.0 <= x <= 1.0 for x in t["t"])


def test_plan_is_identical_across_shard_counts_and_runs(store):
    cfg = PlanConfig(seed=3)
    ids = [str(i) for i in range(25)]
    whole = make_plan(store, ids, cfg).table
    assert make_plan(store, ids, cfg).table.equals(whole)
    for n in (2, 3, 7):
        parts = [make_plan(store, ids, cfg, Shard(i, n)).table for i in range(n)]
        joined = pa.concat_tables(parts).sort_by([("key", "ascending")])
        assert joined.equals(whole.sort_by([("key", "ascending")]))
        assert sum(p.num_rows for p in parts) == whole.num_rows
    # a shard's rows do not depend on the identities other shards hold
    assert make_plan(store, ids[:5], cfg).table.slice(0, 20).equals(whole.slice(0, 20))


def test_seed_depends_only_on_run_seed_identity_and_index(store):
    a = make_plan(store, ["1", "2"], PlanConfig(seed=0)).table.to_pydict()
    b = make_plan(store, ["2", "1"], PlanConfig(seed=0)).table.to_pydict()
    c = make_plan(store, ["1", "2"], PlanConfig(seed=1)).table.to_pydict()
    seeds_a = dict(zip(a["key"], a["seed"]))
    seeds_b = dict(zip(b["key"], b["seed"]))
    assert seeds_a == seeds_b
    assert not set(c["seed"]) & set(a["seed"])
    assert derive_seed(0, "1", 3, "image") == seeds_a["1/3"]


def test_latents_lie_at_fraction_t_between_prototype_and_sample(store):
    plan = make_plan(store, [str(i) for i in range(30)], PlanConfig(alpha=2.0))
    z = plan_latents(plan, store)
    protos = prototypes(store.embeddings, store.identities)
    index = {k: i for i, k in enumerate(protos.labels)}
    t = plan.table.to_pydict()
    mu = protos.vectors[[index[i] for i in t["identity"]]]
    e = store.embeddings[t["sample_row"]]
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    theta = angle(mu, e)
    np.testing.assert_allclose(angle(mu, z), np.asarray(t["t"]) * theta, atol=2e-3)
    # Beta(2, 2) fractions: mean about one half over 120 latents
    assert 0.4 < np.mean(t["t"][::5]) < 0.6


def test_plan_round_trip_and_errors(store, tmp_path):
    plan = make_plan(store, ["0", "1"], PlanConfig())
    write_plan(tmp_path / "plan.parquet", plan)
    back = read_plan(tmp_path / "plan.parquet")
    assert back.table.equals(plan.table)
    assert back.meta["settings"]["alpha"] == 2.0 and back.meta["embeddings_sha256"]
    with pytest.raises(Digi2RealError, match="not in the embeddings"):
        make_plan(store, ["0", "nope"], PlanConfig())
    with pytest.raises(Digi2RealError, match="plan not found"):
        read_plan(tmp_path / "missing.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    with pytest.raises(Digi2RealError, match="not a readable plan"):
        read_plan(tmp_path / "bad.parquet")


def test_shard_parsing_and_environment():
    assert parse_shard("2/8") == Shard(2, 8)
    for bad in ("8/8", "x", "1/0", "-1/2"):
        with pytest.raises(Digi2RealError):
            parse_shard(bad)
    assert shard_from_env(None, {"RANK": "1", "WORLD_SIZE": "4"}) == Shard(1, 4)
    assert shard_from_env(None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "5"}) == Shard(3, 5)
    assert shard_from_env("0/2", {"RANK": "1", "WORLD_SIZE": "4"}) == Shard(0, 2)
    assert shard_from_env(None, {}) == Shard()


def test_plan_refuses_unsafe_identity_names(tmp_path):
    emb = np.eye(4, 8, dtype=np.float32)
    for name in ("../../X", "..", "a/b", "a\\b"):
        write_store(tmp_path / "emb", emb, [name, name, "ok", "ok"], ["x.png"] * 4, {})
        with pytest.raises(Digi2RealError, match="index.parquet: .*rename it") as err:
            make_plan(read_store(tmp_path / "emb"), [name, "ok"], PlanConfig(images_per_identity=2))
        assert "\n" not in str(err.value)


def test_plan_records_its_embeddings_relative_to_itself(store, tmp_path, monkeypatch):
    """The embeddings path works from any working directory (issue 11: it was stored as typed)."""
    monkeypatch.chdir(tmp_path)
    relative = read_store("emb")  # the store of the fixture, opened by a relative path
    write_plan("runs/x/plan.parquet", make_plan(relative, ["0", "1"], PlanConfig()))
    monkeypatch.chdir(tmp_path / "runs")
    back = read_plan(tmp_path / "runs" / "x" / "plan.parquet")
    assert back.meta["embeddings"] == str(tmp_path / "emb")
    raw = json.loads(pq.read_schema(tmp_path / "runs" / "x" / "plan.parquet").metadata[b"digi2real"])
    assert raw["embeddings"] == "../../emb" and raw["embeddings_absolute"] == str(tmp_path / "emb")


def test_plan_output_never_replaces_an_input(store, tmp_path):
    plan = make_plan(store, ["0", "1"], PlanConfig(), inputs={"ids_file": str(tmp_path / "ids.csv")})
    (tmp_path / "ids.csv").write_text("identity\n0\n1\n")
    for target, match in ((tmp_path / "ids.csv", "is the input itself"),
                          (tmp_path / "emb" / "plan.parquet", "lies inside the input"),
                          (tmp_path, "is a folder|holds the input")):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with pytest.raises(Digi2RealError, match=match):
            write_plan(target, plan)
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
