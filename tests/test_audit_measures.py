"""The audit's arithmetic (issue 14, ``digi2real.audit.measures``): what a user of `digi2real audit` checks. A real
identity planted in a generated set is found and nothing else; planted duplicate identities are found; the FAR
threshold is the hand-computed quantile; every blocked search equals brute force; the benchmark's quick mode runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from digi2real.audit import measures as M
from digi2real.errors import Digi2RealError

ROOT = Path(__file__).resolve().parents[1]
D = 128  # impostor prototype cosines 0 +- 0.09, genuine image cosines about 0.6: ArcFace-like
NOISE = 0.8


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def views(centres: np.ndarray, images: int, rng: np.random.Generator) -> np.ndarray:
    """``images`` noisy unit views of each centre (rows grouped by centre)."""
    x = np.repeat(centres, images, axis=0)
    return unit(x + NOISE * rng.standard_normal(x.shape) / np.sqrt(x.shape[1]))


def face_set(name: str, centres: np.ndarray, images: int, rng: np.random.Generator) -> M.Embedded:
    m = len(centres)
    return M.Embedded(name, views(centres, images, rng), np.repeat(np.arange(m), images),
                      [f"{name}{i}" for i in range(m)])


@pytest.fixture(scope="module")
def reference():
    """A real-like reference: 10,000 identities x 2 images (enough identities to resolve FAR 1e-4), its centres,
    and its threshold at FAR 1e-4 of a search (each identity's nearest other identity)."""
    rng = np.random.default_rng(1)
    centres = unit(rng.standard_normal((10_000, D)))
    ref = face_set("ref", centres, 2, rng)
    threshold = M.far_threshold(M.nearest_impostor_scores(ref.prototypes), 1e-4, what="nearest-identity cosines")
    return ref, centres, threshold


# ------------------------------------------------------------------------------------------------------ the issue


def test_a_planted_real_identity_is_found_and_only_it(reference):
    ref, ref_centres, threshold = reference
    assert not threshold.limited and threshold.impostors == 10_000  # FAR 1e-4 is measurable on 10,000 searches
    rng = np.random.default_rng(2)
    centres = unit(rng.standard_normal((201, D)))
    centres[137] = ref_centres[4242]  # dataset identity 137 is other photos of reference identity 4242
    data = face_set("gen", centres, 5, rng)
    report = M.contamination(data, ref, threshold)
    assert [(x.identity, x.reference_identity) for x in report.matches] == [("gen137", "ref4242")]
    assert report.matched_identities == 1
    match = report.matches[0]
    assert match.prototype_cosine > threshold.value > report.nearest_cosine[np.arange(201) != 137].max()
    # the pair of images shown side by side belongs to the two identities, and is the best of their 5 x 2 images
    assert data.labels[match.row] == 137 and ref.labels[match.reference_row] == 4242
    mine, theirs = data.vectors[data.labels == 137], ref.vectors[ref.labels == 4242]
    assert match.image_cosine == pytest.approx(float((mine @ theirs.T).max()), abs=1e-6)
    assert match.image_cosine == pytest.approx(float(data.vectors[match.row] @ ref.vectors[match.reference_row]),
                                               abs=1e-6)
    out = json.loads(json.dumps(report.to_dict()))
    assert out["matched_identities"] == 1 and out["matches"][0]["reference_identity"] == "ref4242"
    assert out["nearest_prototype_cosine"]["count"] == 201 and out["threshold"]["far"] == 0.0001


def test_planted_duplicate_identities_are_found_and_nothing_else(reference):
    _, _, threshold = reference
    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((300, D)))
    planted = [(12, 250), (40, 41), (99, 180)]
    for a, b in planted:
        centres[b] = centres[a]  # two identities of the set that are one person
    data = face_set("gen", centres, 4, rng)
    report = M.distinctness(data, threshold)
    assert report.duplicate_pairs == 3
    assert [(x.identity_a, x.identity_b) for x in sorted(report.duplicates, key=lambda x: x.identity_a)] == [
        ("gen12", "gen250"), ("gen40", "gen41"), ("gen99", "gen180")]
    cosines = [x.prototype_cosine for x in report.duplicates]
    assert cosines == sorted(cosines, reverse=True)
    for x in report.duplicates:
        assert data.identities[data.labels[x.row_a]] == x.identity_a
        assert data.identities[data.labels[x.row_b]] == x.identity_b
    # each identity's max cosine to any other (Table 4's criterion) equals the brute-force one
    gram = data.prototypes @ data.prototypes.T
    np.fill_diagonal(gram, -np.inf)
    np.testing.assert_allclose(report.max_cosine, gram.max(axis=1), atol=1e-6)
    assert (report.nearest == gram.argmax(axis=1)).all()
    out = json.loads(json.dumps(report.to_dict()))
    assert sum(out["histogram"]["counts"]) == 300 and len(out["histogram"]["edges"]) == 21
    assert out["identities_above"] == 6 and out["duplicates_listed"] == 3


def test_far_threshold_is_the_hand_computed_quantile():
    scores = np.random.default_rng(4).permutation(np.arange(10_000) / 10_000)
    t = M.far_threshold(scores, 1e-4)
    # sorted descending: 0.9999, 0.9998, ...; floor(1e-4 * 10,000) = 1 -> 0.9998
    assert t.value == 0.9998 and t.impostors == 10_000 and not t.limited and t.far == 1e-4
    assert (scores > t.value).sum() == 1  # at most FAR x n impostors accepted; the one at the value is not a match
    assert M.far_threshold(scores, 0.01).value == 0.99 - 0.0001  # sorted[100]
    hundred = np.arange(100) / 100  # 0.29 x 100 is 28.999999999999996 in binary, 29 in the definition
    assert M.far_threshold(hundred, 0.29).value == 0.99 - 0.29 and (hundred > 0.70).sum() == 29
    few = M.far_threshold(scores[:9_999], 1e-4)
    assert few.limited and few.value == scores[:9_999].max() and "1/9,999" in few.source
    fixed = M.fixed_threshold(0.4)
    assert (fixed.value, fixed.far, fixed.impostors, fixed.source) == (0.4, None, 0, "fixed cosine, not calibrated")


@pytest.mark.parametrize("far", [0, 1, -0.1, float("nan"), "0.001", None])
def test_far_outside_zero_one_is_refused(far):
    with pytest.raises(Digi2RealError, match="between 0 and 1"):
        M.far_threshold(np.zeros(10), far)


def test_no_impostor_scores_is_refused():
    with pytest.raises(Digi2RealError, match="no impostor pairs to calibrate"):
        M.far_threshold(np.empty(0), 1e-4)


# ------------------------------------------------------------------------------------------------------ searches


def brute_nearest(q: np.ndarray, t: np.ndarray, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    s = q @ t.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    k = min(k, len(t) - exclude_self)
    idx = np.array([np.lexsort((np.arange(len(t)), -row))[:k] for row in s]).reshape(len(q), k)
    return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("seed", range(6))
def test_nearest_equals_brute_force_with_ties_blocks_and_large_k(seed):
    rng = np.random.default_rng(seed)
    # quarter-integer entries: every product is exact in float32, so tied scores are exactly tied in any block
    q = (rng.integers(-2, 3, (int(rng.integers(1, 40)), 4)) * 0.25).astype(np.float32)
    t = (rng.integers(-2, 3, (int(rng.integers(1, 50)), 4)) * 0.25).astype(np.float32)
    for k in (1, 3, 60):
        for block in (1, 3, 7, 4096):
            s, i = M.nearest(q, t, k, block=block)
            bs, bi = brute_nearest(q, t, k, False)
            assert i.shape == (len(q), min(k, len(t))) and (i == bi).all() and (s == bs).all()
            s, i = M.nearest(t, t, k, exclude_self=True, block=block)
            bs, bi = brute_nearest(t, t, k, True)
            assert (i == bi).all() and (s == bs).all()
            assert not (i == np.arange(len(t))[:, None]).any()


def test_nearest_skips_the_named_row_and_the_torch_path_agrees():
    rng = np.random.default_rng(7)
    t = unit(rng.standard_normal((500, 32)))
    sample = np.array([3, 77, 499])
    s, i = M.nearest(t[sample], t, 4, exclude=sample, block=64)
    bs, bi = brute_nearest(t, t, 4, True)
    assert (i == bi[sample]).all()
    np.testing.assert_allclose(s, bs[sample], atol=1e-6)
    q = unit(rng.standard_normal((300, 32)))
    s1, i1 = M.nearest(q, t, 10, block=128)
    s2, i2 = M._nearest_torch(q, t, 10, None, 128, "cpu")  # the GPU code path, run by torch on the CPU
    assert (i1 == i2).all()
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    s3, i3 = M._nearest_torch(t, t, 4, np.arange(500), 128, "cpu")
    assert (i3 == bi).all()
    np.testing.assert_allclose(M._Table(t, "cpu").scores(q[:5], 10, 20), q[:5] @ t[10:20].T, atol=1e-6)


def test_device_cuda_without_a_gpu_is_refused_and_auto_falls_back():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(Digi2RealError, match="no CUDA GPU"):
        M.nearest(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 1, device="cuda")
    s, i = M.nearest(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), 1, device="auto")
    assert (i[:, 0] == [0, 1, 2]).all()


def exact_units(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit rows whose cosines are exact in float32 (four entries of +-0.5 among 8), so ties are exact."""
    x = np.zeros((n, 8), np.float32)
    for row in x:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


@pytest.mark.parametrize("per_product", [M.SCORES_PER_PRODUCT, 7])  # 7: every product split, candidate by candidate
def test_image_max_pairs_equals_brute_force(per_product, monkeypatch):
    monkeypatch.setattr(M, "SCORES_PER_PRODUCT", per_product)
    rng = np.random.default_rng(8)
    la, lb = rng.integers(0, 6, 40), rng.integers(0, 9, 50)  # rows of an identity are not adjacent
    la[:6], lb[:9] = np.arange(6), np.arange(9)  # every identity has an image
    a = M.Embedded("a", exact_units(rng, 40), la, [f"a{i}" for i in range(6)])
    b = M.Embedded("b", exact_units(rng, 50), lb, [f"b{i}" for i in range(9)])
    pairs = np.array([(i, j) for i in (5, 0, 3) for j in (8, 1, 2, 1)] + [(2, 2)])
    score, a_row, b_row = M.image_max_pairs(a, b, pairs)
    for (i, j), s, ra, rb in zip(pairs, score, a_row, b_row):
        rows_a, rows_b = np.flatnonzero(la == i), np.flatnonzero(lb == j)
        sims = a.vectors[rows_a] @ b.vectors[rows_b].T
        best = np.unravel_index(sims.argmax(), sims.shape)  # ties: the lower a row, then the lower b row
        assert (s, ra, rb) == (sims.max(), rows_a[best[0]], rows_b[best[1]])
    assert M.image_max_pairs(a, b, np.empty((0, 2), np.int64))[0].shape == (0,)


# ------------------------------------------------------------------------------------------------------ scores


def test_impostor_scores_all_pairs_listed_pairs_and_a_reproducible_sample():
    rng = np.random.default_rng(9)
    p = unit(rng.standard_normal((30, 64)))
    iu = np.triu_indices(30, 1)
    np.testing.assert_allclose(M.impostor_scores(p), (p @ p.T)[iu], atol=1e-6)  # all 435 pairs, in order
    listed = np.array([[0, 1], [5, 2], [29, 3]])
    np.testing.assert_allclose(M.impostor_scores(p, listed), [p[0] @ p[1], p[5] @ p[2], p[29] @ p[3]], atol=1e-6)
    big = unit(rng.standard_normal((3000, 64)))  # 4.5 M pairs: sampled
    first = M.impostor_scores(big, max_pairs=10_000, seed=5)
    assert len(first) == 10_000 and first.max() < 0.9  # never a prototype with itself (cosine 1)
    assert np.array_equal(first, M.impostor_scores(big, max_pairs=10_000, seed=5))
    assert not np.array_equal(first, M.impostor_scores(big, max_pairs=10_000, seed=6))


def test_consistency_d_prime_and_per_identity_means_by_hand():
    def on(plane: int, deg: float) -> list[float]:
        v = [0.0] * 4
        v[2 * plane], v[2 * plane + 1] = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        return v

    # identity 0: three images at 0, 60 and 90 degrees in one plane; identity 1: two at 0 and 45 degrees in another,
    # orthogonal plane, so every impostor cosine is 0
    vectors = np.array([on(0, 0), on(1, 0), on(0, 60), on(1, 45), on(0, 90)], np.float32)
    data = M.Embedded("tiny", vectors, np.array([0, 1, 0, 1, 0]), ["x", "y"])
    c = M.consistency(data, max_impostor_pairs=50)
    genuine = [0.5, 0.0, math.cos(math.radians(30)), math.cos(math.radians(45))]
    assert sorted(c.genuine.tolist()) == pytest.approx(sorted(genuine), abs=1e-6)
    assert len(c.impostor) == 6 and np.abs(c.impostor).max() < 1e-6  # all 3 x 2 pairs: 10 pairs in all < 50
    mu, var = np.mean(genuine), np.var(genuine)
    assert c.d_prime == pytest.approx(mu / math.sqrt(var / 2), rel=1e-5)
    assert c.pairwise.tolist() == pytest.approx([(0.5 + 0 + math.cos(math.radians(30))) / 3, genuine[3]], abs=1e-6)
    s0 = vectors[[0, 2, 4]].sum(axis=0)
    assert c.to_prototype[0] == pytest.approx(float(np.linalg.norm(s0)) / 3, abs=1e-6)
    assert [w["identity"] for w in c.worst()] == ["x", "y"]
    out = json.loads(json.dumps(c.to_dict()))
    assert out["genuine_pairs"] == out["genuine_pairs_total"] == 4 and not out["genuine_sampled"]


def test_consistency_samples_genuine_pairs_when_there_are_too_many():
    rng = np.random.default_rng(10)
    data = face_set("s", unit(rng.standard_normal((50, 32))), 10, rng)  # 2,250 genuine pairs
    c = M.consistency(data, max_genuine_pairs=1000, max_impostor_pairs=2000, seed=3)
    again = M.consistency(data, max_genuine_pairs=1000, max_impostor_pairs=2000, seed=3)
    assert len(c.genuine) == 1000 and c.genuine_total == 2250 and np.array_equal(c.genuine, again.genuine)
    assert c.genuine.mean() > 0.4 > 0.1 > abs(c.impostor.mean()) and c.d_prime > 3


def test_variation_by_hand_and_crop_stats():
    base = np.full((5, 2), 50.0)
    landmarks = np.stack([base, base + [2, 0], base, base, base + [[3, 4]] * 5 * np.array([[1], [0], [0], [0], [0]])])
    # identity 0: images 0 and 1, every landmark 1 px from its mean -> spread 1; identity 1: image 2 alone;
    # identity 2: images 3 and 4, one landmark 5 px apart (2.5 from the mean), four still -> sqrt(2.5^2 / 5)
    data = M.Embedded("v", unit(np.eye(5, 8)), np.array([0, 0, 1, 2, 2]), ["a", "b", "c"],
                      landmarks=landmarks.astype(np.float32), brightness=np.array([100, 110, 50, 7, 7], np.float32),
                      contrast=np.array([40, 40, 10, 20, 30], np.float32))
    v = M.variation(data)
    assert v.landmark_spread[0] == pytest.approx(1.0) and math.isnan(v.landmark_spread[1])
    assert v.landmark_spread[2] == pytest.approx(math.sqrt(2.5 ** 2 / 5))
    assert v.brightness_std[[0, 2]].tolist() == pytest.approx([5.0, 0.0])
    assert v.contrast_std[[0, 2]].tolist() == pytest.approx([0.0, 5.0])
    out = v.to_dict()
    assert out["landmark_spread_px"]["count"] == 2  # the one-image identity has no spread
    assert M.variation(M.Embedded("none", unit(np.eye(2, 8)), np.array([0, 0]), ["a"])).to_dict()[
        "landmark_spread_px"] is None
    crops = np.zeros((2, 4, 4, 3), np.uint8)
    crops[0] = (200, 100, 50)
    crops[1, :2] = 255  # half white, half black
    brightness, contrast = M.crop_stats(crops)
    assert brightness.tolist() == pytest.approx([0.299 * 200 + 0.587 * 100 + 0.114 * 50, 127.5], abs=1e-3)
    assert contrast.tolist() == pytest.approx([0.0, 127.5], abs=1e-3)


def test_frechet_distance_matches_the_formula_and_survives_few_rows():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(11)
    a = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    b = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 0.5
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    want = diff @ diff + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real)
    assert M.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    mu, cov = M._moments(a.astype(np.float32), chunk=7)  # accumulated in blocks of rows
    np.testing.assert_allclose(cov, np.cov(a.astype(np.float32), rowvar=False), rtol=1e-5, atol=1e-6)
    assert abs(M.frechet_distance(a, a)) < 1e-8
    assert M.frechet_distance(a, a + 3.0) == pytest.approx(9.0 * 6, rel=1e-8)  # a shift moves only the means
    few = M.frechet_distance(rng.standard_normal((10, 64)), rng.standard_normal((12, 64)))  # rank-deficient
    assert math.isfinite(few) and few > 0


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, message", [
    (dict(vectors=np.ones((4, 8), np.int64)), "vectors must be"),
    (dict(vectors=np.ones((4, 8), np.float32)), "norm"),
    (dict(labels=np.array([0, 1, 2, 3])), "labels must be identity indices"),
    (dict(labels=np.array([0, 0, 0, 0])), "identity 'b' has no image"),
    (dict(landmarks=np.zeros((4, 68, 2), np.float32)), "landmarks must be"),
    (dict(impostor_pairs=np.array([[0, 0]])), "impostor_pairs"),
    (dict(brightness=np.array([1.0, np.nan, 1, 1], np.float32)), "NaN"),
    (dict(vectors=np.where(np.eye(4, 8) > 0, np.nan, 0).astype(np.float32)), "row 0 holds NaN"),
])
def test_bad_embeddings_are_refused_in_one_line_naming_the_set(change, message):
    good = dict(name="gen-42", vectors=unit(np.eye(4, 8)), labels=np.array([0, 0, 1, 1]), identities=["a", "b"])
    with pytest.raises(Digi2RealError, match=message) as err:
        M.Embedded(**{**good, **change})
    assert "'gen-42'" in str(err.value) and "\n" not in str(err.value)
    half = M.Embedded(**{**good, "vectors": unit(np.eye(4, 8)).astype(np.float16)})  # stored float16 is fine
    assert half.vectors.dtype == np.float32


def test_sets_of_different_dimensions_are_refused_naming_both():
    a = M.Embedded("digi", unit(np.eye(2, 8)), np.array([0, 1]), ["a", "b"])
    b = M.Embedded("lfw", unit(np.eye(2, 16)), np.array([0, 1]), ["a", "b"])
    with pytest.raises(Digi2RealError, match="'digi' has 8-d embeddings but 'lfw' has 16-d"):
        M.contamination(a, b, M.fixed_threshold(0.5))


# ------------------------------------------------------------------------------------------------------ benchmark


def test_bench_audit_quick_runs_every_part_and_writes_its_json(tmp_path):
    out = tmp_path / "audit.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_audit.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and "targets_met" not in result  # a quick run is never compared with targets
    runs = [r["run"] for r in result["rows"]]
    assert runs == ["baseline: full image rows", "blocked audit (same size)", "blocked audit (full size)"]
    for row in result["rows"]:
        assert row["seconds"] > 0 and row["peak_rss_gb"] > 0
    steps = result["rows"][2]["steps"]
    assert set(steps) == {"load", "prototypes", "threshold_pairs", "threshold_search", "contamination",
                          "distinctness", "consistency", "variation", "frechet"}
    planted = result["planted"]
    assert planted["leaked_found"] == planted["leaked"] == 10 and planted["duplicates_found"] == 5
    assert result["agreement_with_baseline"]["nearest_reference_planted"] == 1.0


def test_small_sets_use_every_impostor_pair_exactly():
    """With fewer image pairs than max_impostor_pairs, the impostor scores are all of them (no sampling): d' is
    the hand-computed one over every pair of images of different identities."""
    rng = np.random.default_rng(7)
    data = face_set("s", unit(rng.standard_normal((6, D))), 3, rng)
    c = M.consistency(data, max_impostor_pairs=1000)
    iu, ju = np.triu_indices(18, 1)
    gram = data.vectors.astype(np.float64) @ data.vectors.T.astype(np.float64)
    same = data.labels[iu] == data.labels[ju]
    genuine, impostor = gram[iu, ju][same], gram[iu, ju][~same]
    assert not c.impostor_sampled and len(c.impostor) == len(impostor) == 135
    np.testing.assert_allclose(np.sort(c.impostor), np.sort(impostor), atol=1e-6)
    expected = abs(genuine.mean() - impostor.mean()) / np.sqrt((genuine.var() + impostor.var()) / 2)
    assert c.d_prime == pytest.approx(expected, rel=1e-5)
    assert c.to_dict()["impostor_sampled"] is False
    assert M.consistency(data, max_impostor_pairs=100).impostor_sampled  # 153 pairs in all > 100: sampled
