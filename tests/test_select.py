"""Prototypes and the similarity-based identity selection (paper Table 4)."""

from __future__ import annotations

import numpy as np
import pytest

from digi2real.identity import max_similarity, prototypes, select_distinct, select_greedy


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototype_is_the_renormalised_mean_of_normalised_embeddings():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 8)) * rng.uniform(0.5, 3, size=(7, 1))  # unnormalised on purpose
    labels = ["b", "a", "b", "c", "a", "b", "c"]
    protos = prototypes(emb, labels)
    assert protos.labels == ["b", "a", "c"]  # first-appearance order
    assert list(protos.counts) == [3, 2, 2]
    expected_b = _unit(_unit(emb[[0, 2, 5]]).mean(0))
    np.testing.assert_allclose(protos.vectors[0], expected_b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(protos.vectors, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("n,block", [(1, 4), (2, 1), (257, 64), (300, 1000)])
def test_blocked_max_similarity_matches_brute_force(n, block):
    rng = np.random.default_rng(n)
    p = _unit(rng.normal(size=(n, 32))).astype(np.float32)
    best, nearest = max_similarity(p, block)
    if n == 1:
        assert best[0] == -np.inf and nearest[0] == -1
        return
    sims = p @ p.T
    np.fill_diagonal(sims, -np.inf)
    np.testing.assert_allclose(best, sims.max(1), atol=1e-5)
    assert np.all(sims[np.arange(n), nearest] >= sims.max(1) - 1e-5)


def _world_with_twins(rng, n_unique=40, n_twins=10, dim=64):
    """n_unique random identities; the first n_twins each get a near-duplicate (cosine ~0.99) appended at the end."""
    base = _unit(rng.normal(size=(n_unique, dim)))
    twins = _unit(base[:n_twins] + 0.1 * _unit(rng.normal(size=(n_twins, dim))))
    return np.vstack([base, twins]).astype(np.float32)


def test_select_distinct_drops_near_duplicates_first():
    rng = np.random.default_rng(1)
    p = _world_with_twins(rng)
    keep = select_distinct(p, n=30, block_size=16)
    # the 20 identities involved in a twin pair are the most similar to another, so the 30 kept are exactly the
    # 30 identities without a twin
    assert sorted(keep.tolist()) == list(range(10, 40))
    best, _ = max_similarity(p)
    assert np.all(np.diff(best[keep]) >= 0)  # least similar first
    assert len(select_distinct(p, n=None)) == len(p)


def test_greedy_keeps_one_of_each_twin_pair_and_respects_the_threshold():
    rng = np.random.default_rng(2)
    p = _world_with_twins(rng)
    keep = select_greedy(p, threshold=0.9, block_size=7)
    sims = p[keep] @ p[keep].T
    np.fill_diagonal(sims, -1)
    assert sims.max() < 0.9
    assert len(keep) == 40  # every unique identity survives, exactly one of each twin pair
    pairs = {(i, 40 + i) for i in range(10)}
    for a, b in pairs:
        assert (a in keep) != (b in keep)
    # agrees with the obvious sequential walk
    expected = []
    for i in range(len(p)):
        if all(p[i] @ p[j] < 0.9 for j in expected):
            expected.append(i)
    assert keep.tolist() == expected
    assert select_greedy(p, threshold=0.9, n=5).tolist() == expected[:5]
