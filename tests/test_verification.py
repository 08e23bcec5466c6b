"""The 10-fold verification protocol (FACTS 8) against a plain loop re-statement of insightface's calculate_roc."""

from __future__ import annotations

import numpy as np
import pytest

from digi2real.errors import Digi2RealError
from digi2real.evaluation.verification import (
    evaluate_verification,
    fold_bounds,
    thresholds,
    verification_scores,
)


def _reference(dist: np.ndarray, same: np.ndarray, folds: int = 10) -> tuple[list[float], list[float]]:
    """Straightforward protocol: explicit fold sizes, a loop over every threshold, first maximum kept."""
    n = len(dist)
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    starts = [sum(sizes[:f]) for f in range(folds)]
    thr_list = list(np.arange(0, 4, 0.01))  # insightface's exact float values
    accs, chosen = [], []
    for f in range(folds):
        test = list(range(starts[f], starts[f] + sizes[f]))
        test_set = set(test)
        train = [i for i in range(n) if i not in test_set]
        best_acc, best_t = -1.0, None
        for t in thr_list:
            correct = sum(1 for i in train if (dist[i] < t) == same[i])
            acc = correct / len(train)
            if acc > best_acc:  # strict: the first (smallest) threshold wins ties
                best_acc, best_t = acc, t
        chosen.append(float(best_t))
        accs.append(sum(1 for i in test if (dist[i] < best_t) == same[i]) / len(test))
    return accs, chosen


def _embeddings_for(dist: np.ndarray, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Unit embeddings whose pair squared distances are ``dist`` (pairs in a 2-D plane of a random basis)."""
    rng = np.random.default_rng(seed)
    # Squared chord distance between unit vectors at angle a is 2 - 2 cos a.
    angle = np.arccos(np.clip(1 - dist / 2, -1, 1))
    emb = np.zeros((2 * len(dist), dim))
    for i, a in enumerate(angle):
        q, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
        emb[2 * i] = q[:, 0]
        emb[2 * i + 1] = np.cos(a) * q[:, 0] + np.sin(a) * q[:, 1]
    return emb


def _check(emb: np.ndarray, same: np.ndarray, folds: int = 10) -> None:
    dist = verification_scores(emb)
    ref_acc, ref_thr = _reference(dist, same, folds)
    res = evaluate_verification(emb, same, folds=folds)
    assert res.fold_accuracies == pytest.approx(ref_acc, abs=0, rel=0)
    assert res.best_thresholds == pytest.approx(ref_thr, abs=0, rel=0)
    assert res.accuracy == pytest.approx(float(np.mean(ref_acc)), abs=1e-15)
    assert res.std == pytest.approx(float(np.std(ref_acc)), abs=1e-15)
    assert res.pairs == len(same)


def test_fold_bounds_match_kfold_sizes() -> None:
    assert fold_bounds(23, 10) == [(0, 3), (3, 6), (6, 9), (9, 11), (11, 13), (13, 15), (15, 17), (17, 19), (19, 21),
                                   (21, 23)]
    b = fold_bounds(6007, 10)
    assert [s - a for a, s in b] == [601] * 7 + [600] * 3 and b[-1][1] == 6007
    with pytest.raises(Digi2RealError, match="folds"):
        fold_bounds(5, 10)
    with pytest.raises(Digi2RealError, match="at least 2"):
        fold_bounds(100, 1)


def test_thresholds_are_insightfaces() -> None:
    t = thresholds()
    assert t.shape == (400,) and t[0] == 0 and t[-1] == np.arange(0, 4, 0.01)[-1]
    assert np.array_equal(t, np.arange(0, 4, 0.01))


def test_verification_scores_are_squared_distances_of_normalised_rows() -> None:
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((6, 5)) * 3
    d = verification_scores(emb)
    u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    expect = [float(np.sum((u[2 * i] - u[2 * i + 1]) ** 2)) for i in range(3)]
    assert d == pytest.approx(expect, rel=1e-12)
    assert verification_scores(np.array([[1.0, 0], [-2.0, 0]]))[0] == pytest.approx(4.0)
    assert ((d >= 0) & (d <= 4)).all()


def test_random_distances_match_reference_odd_size() -> None:
    rng = np.random.default_rng(2)
    n = 157
    same = rng.random(n) < 0.5
    dist = np.where(same, rng.uniform(0.3, 1.6, n), rng.uniform(1.0, 2.4, n))
    _check(_embeddings_for(dist, seed=3), same)


def test_ties_between_thresholds_take_the_smallest() -> None:
    # Distances on a coarse grid leave long runs of thresholds with equal training accuracy.
    rng = np.random.default_rng(4)
    n = 60
    same = rng.random(n) < 0.5
    dist = np.where(same, 0.5, 1.5) + rng.choice([-0.25, 0.0, 0.25], n)
    dist = np.round(dist, 1) + 0.003  # off the 0.01 grid so float noise cannot decide ties
    res = evaluate_verification(_embeddings_for(dist, seed=5), same)
    _check(_embeddings_for(dist, seed=5), same)
    assert all(0.0 <= t < 4.0 for t in res.best_thresholds)
    # A perfectly separable case: every threshold in (max same, min different] is best; the smallest is chosen.
    dist2 = np.array([0.205] * 10 + [1.0] * 10)
    same2 = np.array([True] * 10 + [False] * 10)
    order = np.random.default_rng(6).permutation(20)
    res2 = evaluate_verification(_embeddings_for(dist2[order], seed=7), same2[order])
    assert set(res2.best_thresholds) == {float(np.arange(0, 4, 0.01)[21])}  # 0.21: first threshold above 0.205
    assert res2.accuracy == 1.0 and res2.std == 0.0


def test_perfect_embeddings_score_one() -> None:
    rng = np.random.default_rng(8)
    n = 120
    ids = rng.standard_normal((2 * n, 64))
    same = np.arange(n) % 2 == 0
    emb = np.empty((2 * n, 64))
    emb[0::2] = ids[:n]
    emb[1::2] = np.where(same[:, None], ids[:n] + 1e-3 * rng.standard_normal((n, 64)), ids[n:])
    res = evaluate_verification(emb, same)
    assert res.accuracy == 1.0 and res.std == 0.0
    assert res.tar_at_far_1e3 == pytest.approx(1.0)
    _check(emb, same)


def test_random_embeddings_near_chance() -> None:
    rng = np.random.default_rng(9)
    n = 2000
    emb = rng.standard_normal((2 * n, 32))
    same = rng.random(n) < 0.5
    res = evaluate_verification(emb, same)
    assert 0.45 < res.accuracy < 0.56
    assert res.tar_at_far_1e3 is not None and 0.0 <= res.tar_at_far_1e3 < 0.05


@pytest.mark.parametrize("n", [23, 6007])
def test_odd_fold_sizes_match_reference(n: int) -> None:
    rng = np.random.default_rng(n)
    same = rng.random(n) < 0.5
    dist = np.clip(np.where(same, rng.normal(0.9, 0.3, n), rng.normal(1.5, 0.3, n)), 0, 4)
    if n > 1000:
        # The loop reference is quadratic-ish in Python; compare on the distances directly via tiny embeddings.
        emb = np.zeros((2 * n, 2))
        angle = np.arccos(1 - dist / 2)
        emb[0::2, 0] = 1.0
        emb[1::2, 0] = np.cos(angle)
        emb[1::2, 1] = np.sin(angle)
    else:
        emb = _embeddings_for(dist, seed=n)
    dist_used = verification_scores(emb)
    res = evaluate_verification(emb, same)
    ref_acc, ref_thr = _reference_fast_loops(dist_used, same) if n > 1000 else _reference(dist_used, same)
    assert list(res.fold_accuracies) == ref_acc
    assert list(res.best_thresholds) == ref_thr


def _reference_fast_loops(dist: np.ndarray, same: np.ndarray, folds: int = 10) -> tuple[list[float], list[float]]:
    """Same loops as :func:`_reference`, with numpy doing the per-threshold count (insightface's calculate_accuracy)."""
    n = len(dist)
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    starts = np.cumsum([0] + sizes)
    accs, chosen = [], []
    thr = np.arange(0, 4, 0.01)
    for f in range(folds):
        mask = np.zeros(n, bool)
        mask[starts[f]:starts[f + 1]] = True
        train_acc = np.zeros(len(thr))
        for k, t in enumerate(thr):
            pred = dist[~mask] < t
            train_acc[k] = np.sum(pred == same[~mask]) / (~mask).sum()
        best = int(np.argmax(train_acc))
        chosen.append(float(thr[best]))
        accs.append(float(np.sum((dist[mask] < thr[best]) == same[mask])) / mask.sum())
    return accs, chosen


@pytest.mark.parametrize("label", [True, False])
def test_single_class_labels(label: bool) -> None:
    rng = np.random.default_rng(10)
    n = 50
    emb = rng.standard_normal((2 * n, 16))
    same = np.full(n, label)
    res = evaluate_verification(emb, same)
    _check(emb, same)
    assert res.tar_at_far_1e3 is None
    if not label:
        # All different: threshold 0 rejects every pair, on every fold.
        assert set(res.best_thresholds) == {0.0} and res.accuracy == 1.0
    else:
        # All same: the chosen threshold is the first one above the largest training distance.
        assert res.accuracy > 0.9


def test_population_std() -> None:
    rng = np.random.default_rng(11)
    n = 100
    same = rng.random(n) < 0.5
    dist = np.where(same, rng.uniform(0.5, 1.5, n), rng.uniform(1.0, 2.0, n))
    res = evaluate_verification(_embeddings_for(dist, seed=12), same)
    acc = np.array(res.fold_accuracies)
    assert len(acc) == 10
    pop = float(np.sqrt(np.mean((acc - acc.mean()) ** 2)))
    assert res.std == pytest.approx(pop, abs=1e-15)
    assert acc.std(ddof=1) != pytest.approx(res.std)  # would differ if ddof 1 were used
    assert res.accuracy == pytest.approx(float(acc.mean()))
    d = res.to_dict()
    assert d["fold_accuracies"] == list(res.fold_accuracies) and d["pairs"] == n


def test_other_fold_counts() -> None:
    rng = np.random.default_rng(13)
    n = 41
    same = rng.random(n) < 0.5
    dist = np.where(same, rng.uniform(0.3, 1.5, n), rng.uniform(1.0, 2.2, n))
    _check(_embeddings_for(dist, seed=14), same, folds=4)


def test_bad_inputs() -> None:
    with pytest.raises(Digi2RealError, match="2N x D"):
        evaluate_verification(np.zeros((5, 3)), [True, False])
    with pytest.raises(Digi2RealError, match="labels"):
        evaluate_verification(np.ones((20, 3)), [True] * 9)
    with pytest.raises(Digi2RealError, match="NaN"):
        emb = np.ones((20, 3))
        emb[3, 1] = np.nan
        evaluate_verification(emb, [True] * 10)
    with pytest.raises(Digi2RealError, match="folds"):
        evaluate_verification(np.ones((10, 3)), [True] * 5)
