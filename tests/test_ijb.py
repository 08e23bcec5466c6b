"""IJB 1:1 evaluation: meta reading, pooling (FACTS 9), pair scoring, TAR@FAR, end to end with a feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digi2real.config import EvalConfig
from digi2real.errors import Digi2RealError
from digi2real.evaluation.ijb import (evaluate_ijb, ijb_features, read_ijb_meta, run_ijb, score_pairs,
                                      template_features)
from digi2real.evaluation.metrics import roc_curve, tar_at_far
from digi2real.faces.template import ARCFACE_TEMPLATE, align_face
from digi2real.imageio import read_image


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_template_pooling_media_average_then_sum_with_faceness():
    f = np.array([[1, 0, 0], [3, 0, 0], [0, 2, 0], [0, 0, 5], [1, 1, 0]], dtype=np.float32)
    face = np.array([1.0, 0.5, 2.0, 1.0, 0.0])
    templates = np.array([7, 7, 7, 3, 3])
    medias = np.array([10, 10, 11, 12, 12])
    ids, tf = template_features(f, face, templates, medias, use_faceness=False)
    np.testing.assert_array_equal(ids, [3, 7])
    # Template 7: mean of media 10 ((1+3)/2 = 2 on x) + media 11 (2 on y) -> (2, 2, 0).
    np.testing.assert_allclose(tf[1], _unit([2, 2, 0]), atol=1e-6)
    np.testing.assert_allclose(tf[0], _unit([1, 1, 5]) * 2 / 2, atol=1e-6)  # (0,0,5)+(1,1,0) averaged = (.5,.5,2.5)
    ids, tf = template_features(f, face, templates, medias, use_faceness=True)
    # Faceness: media 10 -> mean(1*1, 3*0.5) = 1.25 on x; media 11 -> 4 on y.
    np.testing.assert_allclose(tf[1], _unit([1.25, 4, 0]), atol=1e-6)
    # Template 3: the image with faceness 0 contributes nothing, but still counts in its media's average.
    np.testing.assert_allclose(tf[0], _unit([0, 0, 1]), atol=1e-6)
    assert tf.dtype == np.float64


def test_template_pooling_matches_loop_reference():
    rng = np.random.default_rng(0)
    n, d = 600, 16
    f = rng.standard_normal((n, d)).astype(np.float32)
    face = rng.uniform(0.2, 1.0, n)
    templates = rng.integers(0, 40, n) * 5 + 100
    medias = rng.integers(0, 90, n)  # media ids shared across templates: must be grouped within a template only
    ids, tf = template_features(f, face, templates, medias, use_faceness=True, chunk_rows=97)
    for k, t in enumerate(ids):
        rows = np.flatnonzero(templates == t)
        acc = sum(np.mean(f[rows[medias[rows] == m]] * face[rows[medias[rows] == m], None], axis=0)
                  for m in np.unique(medias[rows]))
        np.testing.assert_allclose(tf[k], _unit(acc), atol=2e-6)


@pytest.mark.parametrize("chunk", [5, 64, 10_000_000])
def test_score_pairs_matches_brute_force(chunk):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((50, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ids = np.arange(50) * 3 + 1
    # Dense (enrolment x probe, shuffled) plus a few scattered pairs (gather path), both orientations.
    g, p = np.meshgrid(np.arange(6), np.arange(10, 50))
    a = np.concatenate([g.ravel(), rng.integers(0, 50, 30)])
    b = np.concatenate([p.ravel(), rng.integers(0, 50, 30)])
    perm = rng.permutation(len(a))
    for x, y in ((a[perm], b[perm]), (b, a)):
        got = score_pairs(feats, ids, ids[x], ids[y], chunk=chunk)
        np.testing.assert_allclose(got, np.sum(feats[x] * feats[y], axis=1), atol=1e-6)
    # Unsorted template ids are accepted; unknown ids are an error naming the problem.
    order = rng.permutation(50)
    np.testing.assert_allclose(score_pairs(feats[order], ids[order], ids[a], ids[b], chunk=chunk),
                               np.sum(feats[a] * feats[b], axis=1), atol=1e-6)
    with pytest.raises(Digi2RealError, match="template id"):
        score_pairs(feats, ids, np.array([1, 2]), np.array([4, 4]))
    assert score_pairs(feats, ids, np.array([], int), np.array([], int)).shape == (0,)


def test_evaluate_ijb_known_tars_and_faceness_effect():
    # Enrolment templates 1 (subject A), 2 (B); probes 3 (A), 4 (B), 5 (A). Each image is its own media.
    e = np.eye(3, dtype=np.float32)
    feats = np.stack([e[0], e[1], e[0], e[1], e[2], e[0], e[1]])
    templates = np.array([1, 2, 3, 4, 4, 5, 5])
    medias = np.arange(7)
    face = np.array([1.0, 1.0, 1.0, 1.0, 1e-3, 1e-2, 1.0])
    p1 = np.array([1, 1, 1, 2, 2, 2])
    p2 = np.array([3, 4, 5, 3, 4, 5])
    labels = np.array([1, 0, 1, 0, 1, 0])
    far = [0.0, 1 / 3, 1.0]
    # Without faceness: genuine 1, .707 (2,4), .707 (1,5); impostors 0, 0, .707 (2,5). ROC points (FPR, TPR):
    # (0, 0), (0, 1/3), (1/3, 1), (1, 1) -> TAR@0 = 1/3.
    res = evaluate_ijb(feats, face, templates, medias, p1, p2, labels, far_targets=far, use_faceness=False)
    assert res.tar_at_far == pytest.approx({0.0: 1 / 3, 1 / 3: 1.0, 1.0: 1.0})
    assert (res.pairs, res.genuine, res.templates, res.images) == (6, 3, 5, 7)
    # With faceness, template 4 ~ e1 and template 5 ~ e1: genuine 1, 0.9999995 (2,4), 0.01 (1,5); impostors 0, 0,
    # 0.99995 (2,5). ROC: (0,0) (0,1/3) (0,2/3) (1/3,2/3) (1/3,1) (1,1): TAR@0 = 2/3 (highest TAR at FAR 0).
    res = evaluate_ijb(feats, face, templates, medias, p1, p2, labels, far_targets=far, use_faceness=True)
    assert res.tar_at_far == pytest.approx({0.0: 2 / 3, 1 / 3: 1.0, 1.0: 1.0})
    np.testing.assert_allclose(res.fpr, [0, 0, 0, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(res.tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])


# --------------------------------------------------------------------------------------------- folder end to end


def _make_ijb(root: Path, name: str = "ijbc", n_images: int = 12, trailing_space: bool = False) -> Path:
    rng = np.random.default_rng(5)
    folder = root / name.upper()
    (folder / "loose_crop").mkdir(parents=True)
    (folder / "meta").mkdir()
    lines_pts, lines_tid = [], []
    for i in range(n_images):
        h, w = int(rng.integers(90, 140)), int(rng.integers(90, 140))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / "loose_crop" / f"{i + 1}.jpg", quality=95)
        scale = rng.uniform(0.6, 1.1)
        pts = ARCFACE_TEMPLATE * scale + rng.uniform(-5, 5, (5, 2)) + [w * 0.1, h * 0.1]
        score = rng.uniform(0.3, 1.0)
        end = " " if trailing_space else ""
        lines_pts.append(f"{i + 1}.jpg " + " ".join(f"{v:.3f}" for v in pts.ravel()) + f" {score:.5f}{end}")
        lines_tid.append(f"{i + 1}.jpg {i // 3 + 1} {i // 2 + 100}")  # 4 templates of 3 images, shared media
    (folder / "meta" / f"{name}_name_5pts_score.txt").write_text("\n".join(lines_pts) + "\n")
    # tid_mid listed in another order: rows are matched by image name.
    (folder / "meta" / f"{name}_face_tid_mid.txt").write_text("\n".join(lines_tid[::-1]) + "\n")
    pairs = [(1, 2, 0), (1, 3, 0), (1, 4, 1), (2, 3, 1), (2, 4, 0), (3, 4, 0)]
    (folder / "meta" / f"{name}_template_pair_label.txt").write_text(
        "\n".join(f"{a} {b} {c}" for a, b, c in pairs) + "\n")
    return folder


class FakeEmbed:
    """A fixed random projection of the crop; counts calls and records the batches."""

    def __init__(self) -> None:
        self.proj = np.random.default_rng(9).standard_normal((112 * 112 * 3, 6)).astype(np.float32)
        self.calls = 0
        self.seen: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.uint8 and batch.shape[1:] == (112, 112, 3)
        self.calls += 1
        self.seen.append(batch.copy())
        return batch.reshape(len(batch), -1).astype(np.float32) @ self.proj / 1e4


def test_read_meta_and_errors(tmp_path):
    folder = _make_ijb(tmp_path, "ijbb", trailing_space=True)
    meta = read_ijb_meta(tmp_path, "IJBB")
    assert meta.images.tolist() == [f"{i + 1}.jpg" for i in range(12)]
    assert meta.landmarks.shape == (12, 5, 2) and meta.faceness.shape == (12,)
    np.testing.assert_array_equal(meta.templates, np.arange(12) // 3 + 1)
    np.testing.assert_array_equal(meta.medias, np.arange(12) // 2 + 100)
    assert meta.labels.tolist() == [False, False, True, True, False, False]
    assert read_ijb_meta(folder, "ijbb").images.tolist() == meta.images.tolist()  # root may be IJBB itself
    (folder / "meta" / "ijbb_template_pair_label.txt").unlink()
    with pytest.raises(Digi2RealError, match="ijbb_template_pair_label.txt.*not found.*loose_crop"):
        read_ijb_meta(tmp_path, "ijbb")
    with pytest.raises(Digi2RealError, match="unknown IJB"):
        read_ijb_meta(tmp_path, "ijba")


def test_run_ijb_end_to_end_and_cache(tmp_path):
    _make_ijb(tmp_path)
    cfg = EvalConfig(batch_size=5, ijb_far=[0.25, 1.0], ijb_chunk_pairs=3)
    embed = FakeEmbed()
    res = run_ijb(tmp_path, "ijbc", embed, cfg, cache_dir=tmp_path / "cache", progress=False)
    assert embed.calls == 3 and (tmp_path / "cache" / "ijbc_features.npy").is_file()

    # Independent path: align each crop by hand, embed, pool and score by the FACTS 9 recipe.
    meta = read_ijb_meta(tmp_path, "ijbc")
    crops = np.stack([align_face(read_image(tmp_path / "IJBC" / "loose_crop" / img), lmk)
                      for img, lmk in zip(meta.images, meta.landmarks)])
    np.testing.assert_array_equal(np.concatenate(embed.seen), crops)
    feats = FakeEmbed()(crops) * meta.faceness[:, None]
    tfeat = {}
    for t in np.unique(meta.templates):
        rows = np.flatnonzero(meta.templates == t)
        tfeat[t] = _unit(sum(feats[rows[meta.medias[rows] == m]].mean(0) for m in np.unique(meta.medias[rows])))
    scores = np.array([tfeat[a] @ tfeat[b] for a, b in zip(meta.pair_t1, meta.pair_t2)])
    fpr, tpr, _ = roc_curve(meta.labels, scores)
    expected = tar_at_far(fpr, tpr, [0.25, 1.0])
    assert res.tar_at_far == pytest.approx(expected)
    assert (res.pairs, res.genuine, res.templates, res.images) == (6, 2, 4, 12)

    def must_not_run(batch):
        raise AssertionError("embed_fn called although the features are cached")

    again = run_ijb(tmp_path, "ijbc", must_not_run, cfg.model_copy(update={"ijb_faceness": False}),
                    cache_dir=tmp_path / "cache", progress=False)
    assert again.use_faceness is False and again.pairs == 6
    f2, face2 = ijb_features(tmp_path, "ijbc", must_not_run, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_allclose(f2, FakeEmbed()(crops), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(face2, meta.faceness)


def test_features_errors(tmp_path):
    folder = _make_ijb(tmp_path)
    with pytest.raises(Digi2RealError, match="returned shape"):
        ijb_features(tmp_path, "ijbc", lambda b: np.zeros((len(b) + 1, 4), np.float32), batch_size=4,
                     progress=False, workers=0)
    (folder / "loose_crop" / "5.jpg").unlink()
    with pytest.raises(Digi2RealError, match="5.jpg"):
        ijb_features(tmp_path, "ijbc", FakeEmbed(), batch_size=4, progress=False)


def test_score_pairs_large_ids_and_duplicates():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((6, 4)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ids = np.arange(6, dtype=np.int64) * 10**11 - 5  # beyond a lookup table: binary search path, negative id too
    a, b = np.array([0, 1, 5, 2]), np.array([3, 3, 4, 0])
    np.testing.assert_allclose(score_pairs(feats, ids, ids[a], ids[b]), np.sum(feats[a] * feats[b], 1), atol=1e-6)
    with pytest.raises(Digi2RealError, match="template id"):
        score_pairs(feats, ids, np.array([7]), ids[:1])
    with pytest.raises(ValueError, match="duplicates"):
        score_pairs(feats, np.array([1, 2, 3, 3, 5, 0]), np.array([1]), np.array([2]))



def _tied_protocol(seed: int = 3, dim: int = 512):
    """Image features, templates and pairs in which every score belongs to a group of exactly tied scores.

    50 enrolment templates exist twice and 30 probe templates three times (the same images, media and faceness under
    other template ids), every enrolment copy is paired with every probe copy, a third of the pairs are listed
    probe-first, and a few extra pairs are scattered: each (enrolment, probe) score must come out exactly equal six
    times, as insightface's per-pair ``np.sum(f1 * f2, -1)`` gives. Returns the protocol and each pair's tie group.
    """
    rng = np.random.default_rng(seed)
    n_enrol, n_probe, enrol_copies, probe_copies = 50, 30, 2, 3
    enrol = rng.standard_normal((n_enrol, 3, dim)).astype(np.float32)  # 3 images (2 media) per enrolment template
    probe = rng.standard_normal((n_probe, dim)).astype(np.float32)
    feats, templates, medias, face = [], [], [], []
    for c in range(enrol_copies):
        for g in range(n_enrol):
            feats.append(enrol[g])
            templates += [1 + c * n_enrol + g] * 3
            medias += [10 * g, 10 * g, 10 * g + 1]
            face += [0.9, 0.7, 0.8]
    for c in range(probe_copies):
        feats.append(probe)
        templates += (10_000 + c * n_probe + np.arange(n_probe)).tolist()
        medias += (500_000 + np.arange(n_probe)).tolist()
        face += [1.0] * n_probe
    e = np.arange(enrol_copies * n_enrol)
    p = np.arange(probe_copies * n_probe)
    eg, pg = (x.ravel() for x in np.meshgrid(e, p, indexing="ij"))
    p1, p2 = 1 + eg, 10_000 + pg
    group = (eg % n_enrol) * n_probe + pg % n_probe
    flip = rng.random(p1.size) < 1 / 3
    p1, p2 = np.where(flip, p2, p1), np.where(flip, p1, p2)
    order = rng.permutation(p1.size)
    labels = (group % 2 == 0)[order]
    return (np.concatenate(feats), np.asarray(face), np.asarray(templates), np.asarray(medias), p1[order], p2[order],
            labels, group[order])


def test_scores_and_tars_do_not_depend_on_chunking():
    """Issue 11: exactly tied scores were split, and scores changed, with the pair chunk (float64 GEMM blocks of
    other shapes round differently). Every score is now insightface's per-pair sum, whatever the chunk."""
    feats, face, templates, medias, p1, p2, labels, group = _tied_protocol()
    ids, tf = template_features(feats, face, templates, medias, use_faceness=True)
    far = [1e-3, 1e-2, 1e-1, 0.5]
    scores, results = {}, {}
    for chunk in (1, 7, 300, 4096, 65_536, 2_000_000):
        scores[chunk] = score_pairs(tf, ids, p1, p2, chunk=chunk)
        res = evaluate_ijb(feats, face, templates, medias, p1, p2, labels, far_targets=far, chunk=chunk)
        results[chunk] = (res.tar_at_far, res.fpr.tobytes(), res.tpr.tobytes(), res.roc_size)
    reference = scores[2_000_000]
    for workers in (1, 3):
        scores[f"{workers} workers"] = score_pairs(tf, ids, p1, p2, chunk=5000, workers=workers)
    for chunk, got in scores.items():
        assert got.tobytes() == reference.tobytes(), f"scores at chunk {chunk} differ from those at the default"
    for chunk, got in results.items():
        assert got == results[2_000_000], f"TARs or ROC at chunk {chunk} differ from the default's"
    # The ties stay ties: one distinct score per tie group (6 pairs each).
    lo = np.full(group.max() + 1, np.inf)
    hi = np.full(group.max() + 1, -np.inf)
    np.minimum.at(lo, group, reference)
    np.maximum.at(hi, group, reference)
    assert np.count_nonzero(lo != hi) == 0, f"{np.count_nonzero(lo != hi)} of {lo.size} tie groups split"
    # And each score is insightface's (eval_ijbc.py verification(): np.sum(feat1 * feat2, -1) on gathered rows).
    rows = np.searchsorted(ids, p1), np.searchsorted(ids, p2)
    insightface = np.sum(tf[rows[0]][:, None] * tf[rows[1]][:, None], -1).ravel()
    assert reference.tobytes() == insightface.tobytes()


@pytest.mark.parametrize("dim, dtype", [(512, np.float64), (7, np.float64), (130, np.float32), (1, np.float64)])
def test_score_pairs_is_insightface_sum_bit_for_bit(dim, dtype):
    """Each score equals insightface's np.sum(feat1 * feat2, -1) exactly, at any batch size and feature width."""
    rng = np.random.default_rng(dim)
    feats = rng.standard_normal((40, dim)).astype(dtype)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ids = np.arange(40) * 7
    a, b = rng.integers(0, 40, 500), rng.integers(0, 40, 500)
    expected = np.sum(feats[a][:, None] * feats[b][:, None], -1).ravel()
    for chunk in (1, 2 * dim * 3, 10**9):
        got = score_pairs(feats, ids, ids[a], ids[b], chunk=chunk)
        assert got.dtype == dtype and got.tobytes() == expected.tobytes(), chunk
