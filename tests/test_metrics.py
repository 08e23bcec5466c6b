"""roc_curve against an independent loop implementation of sklearn's definition; insightface's TAR@FAR rule."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from digi2real.evaluation.metrics import roc_curve, tar_at_far


def reference_roc(labels, scores):
    """sklearn.metrics.roc_curve (defaults) written as a loop over distinct thresholds, highest first."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores)
    fps, tps, thr = [], [], []
    for value in sorted(set(scores.tolist()), reverse=True):
        above = scores >= value
        tps.append(int(np.sum(above & labels)))
        fps.append(int(np.sum(above & ~labels)))
        thr.append(value)
    if len(fps) > 2:  # drop_intermediate: keep the ends and every point where either count changes its step
        keep = [0] + [i for i in range(1, len(fps) - 1)
                      if fps[i + 1] - 2 * fps[i] + fps[i - 1] != 0 or tps[i + 1] - 2 * tps[i] + tps[i - 1] != 0]
        keep.append(len(fps) - 1)
        fps, tps, thr = [fps[i] for i in keep], [tps[i] for i in keep], [thr[i] for i in keep]
    fps, tps = np.array([0] + fps, float), np.array([0] + tps, float)
    return fps / fps[-1], tps / tps[-1], np.array([np.inf] + thr)


def _cases():
    rng = np.random.default_rng(7)
    for trial in range(120):
        n = int(rng.integers(2, 80))
        if trial % 3 == 0:
            scores = rng.standard_normal(n).astype(np.float32)  # no ties
        else:
            scores = rng.integers(0, int(rng.integers(1, 8)), n) * 0.5  # heavy ties
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        labels[0], labels[1] = True, False
        yield labels, scores


def test_roc_matches_reference_with_ties_and_drop_intermediate():
    for labels, scores in _cases():
        got = roc_curve(labels, scores)
        want = reference_roc(labels, scores)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_roc_matches_sklearn_when_available():
    sk = pytest.importorskip("sklearn.metrics")
    for labels, scores in _cases():
        for g, w in zip(roc_curve(labels, scores), sk.roc_curve(labels, scores)):
            np.testing.assert_array_equal(g, w)


def test_roc_hand_example():
    # Thresholds 0.9 (1 tp, 1 fp), 0.5 (2, 1), 0.1 (2, 2); no collinear middle point to drop.
    fpr, tpr, thr = roc_curve([1, 0, 1, 0], [0.9, 0.9, 0.5, 0.1])
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_array_equal(fpr, [0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1, 1])
    # Equal steps are collinear and dropped: 4 distinct scores, all negatives after all positives.
    fpr, tpr, thr = roc_curve([1, 1, 0, 0], [4.0, 3.0, 2.0, 1.0])
    np.testing.assert_array_equal(thr, [np.inf, 4.0, 3.0, 1.0])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(fpr, [0, 0, 0, 1])


def test_roc_int_labels_and_errors():
    a = roc_curve(np.array([1, 0, 1]), [0.3, 0.2, 0.1])
    b = roc_curve(np.array([True, False, True]), [0.3, 0.2, 0.1])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="finite"):
        roc_curve([1, 0], [np.nan, 0.1])
    with pytest.raises(ValueError, match="same length"):
        roc_curve([1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        roc_curve([2, 0], [0.1, 0.2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fpr, tpr, _ = roc_curve([1, 1], [0.1, 0.2])
    assert np.isnan(fpr).all() and not np.isnan(tpr).any() and caught


def test_tar_at_far_nearest_with_ties_takes_highest_tar():
    fpr = np.array([0.0, 0.1, 0.1, 0.1, 0.2, 1.0])
    tpr = np.array([0.0, 0.3, 0.4, 0.5, 0.6, 1.0])
    got = tar_at_far(fpr, tpr, [0.1, 0.13, 0.0, 1.0, 5.0])
    assert got == {0.1: 0.5, 0.13: 0.5, 0.0: 0.0, 1.0: 1.0, 5.0: 1.0}
    # Equidistant FARs (exact binary fractions): the reversed array meets the larger FAR first.
    assert tar_at_far([0.0, 0.25, 0.75, 1.0], [0.0, 0.2, 0.7, 1.0], [0.5]) == {0.5: 0.7}
    assert list(tar_at_far(fpr, tpr, [1e-4, 1e-6])) == [1e-4, 1e-6]


def test_tar_at_far_on_roc_agrees_with_direct_count():
    rng = np.random.default_rng(3)
    labels = rng.random(20000) < 0.05
    scores = rng.standard_normal(20000) + 2.0 * labels
    fpr, tpr, thr = roc_curve(labels, scores)
    tars = tar_at_far(fpr, tpr, [1e-3, 1e-2])
    for target, tar in tars.items():
        rev = fpr[::-1]
        idx = len(fpr) - 1 - int(np.argmin(np.abs(rev - target)))
        t = thr[idx]
        assert tar == np.mean(scores[labels] >= t)
