"""The realism shift (paper section 3): Delta = mean C(real) - mean C(synthetic), its gap measures and its file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.config import AlignConfig, EncoderConfig, ShiftConfig
from digi2real.errors import Digi2RealError
from digi2real.faces.arcface import ArcFaceEncoder
from digi2real.generation.arc2face import apply_shift
from digi2real.generation.shift import (
    RealismShift,
    compute_shift,
    conditioning_stats,
    feature_frechet,
    format_gap,
    frechet_distance,
    identity_embeddings,
    make_shift,
    read_shift,
    realism_gap,
    sample_files,
    write_shift,
)
from digi2real.identity.store import write_store


def unit_rows(n: int, seed: int, dim: int = 512) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def encoder(mini_arcface):
    return ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface), batch_size=4))


@pytest.fixture(scope="module")
def sets():
    return unit_rows(5, seed=1), unit_rows(7, seed=2)


@pytest.fixture(scope="module")
def shift(mini_generator, sets):
    return compute_shift(mini_generator, *sets, batch_size=3)


# ------------------------------------------------------------------------------------------------------------ Delta


def test_delta_is_the_difference_of_the_mean_conditionings(mini_generator, sets, shift):
    real, syn = sets
    want = (mini_generator.encode(real).double().mean(0) - mini_generator.encode(syn).double().mean(0)).float()
    assert shift.delta.shape == (77, mini_generator.hidden_size)
    assert shift.delta.dtype == torch.float32 and shift.delta.device.type == "cpu"
    assert torch.allclose(shift.delta, want, rtol=0, atol=1e-5)
    assert shift.delta.abs().max() > 1e-3  # the two random sets really differ
    meta = shift.meta
    assert (meta["n_real"], meta["n_synthetic"], meta["hidden"]) == (5, 7, mini_generator.hidden_size)
    assert meta["encoder_sha256"] == mini_generator.encoder_sha256() and len(meta["encoder_sha256"]) == 64
    assert meta["arc2face_repo"] == mini_generator.info["repo"]
    assert meta["created"].endswith("+00:00") and meta["digi2real_version"]


def test_conditioning_stats_do_not_depend_on_batching(mini_generator, sets):
    real = sets[0]
    mean1, feats1 = conditioning_stats(mini_generator, real, batch_size=1)
    mean5, feats5 = conditioning_stats(mini_generator, real, batch_size=5)
    cond = mini_generator.encode(real).double()
    assert mean1.dtype == torch.float64 and mean1.shape == (77, mini_generator.hidden_size)
    assert feats1.shape == (5, mini_generator.hidden_size) and feats1.dtype == np.float64
    assert torch.allclose(mean1, mean5, atol=1e-6) and np.allclose(feats1, feats5, atol=1e-6)
    np.testing.assert_allclose(feats5, cond.mean(1).numpy(), atol=1e-6)


def test_weight_zero_leaves_the_conditioning_bit_identical(mini_generator, sets, shift):
    cond = mini_generator.encode(sets[0][:2])
    assert torch.equal(apply_shift(cond, shift.delta, 0.0), cond)
    assert torch.equal(apply_shift(cond, shift.delta, 1.0), cond + shift.delta)


def test_the_shift_closes_the_gap(shift):
    gap = shift.meta["gap"]
    assert gap["weight"] == 1.0
    assert gap["before"]["mean_distance"] > 1e-2
    assert gap["after"]["mean_distance"] < 1e-4 * gap["before"]["mean_distance"] + 1e-5
    assert gap["after"]["frechet"] < gap["before"]["frechet"]


def test_realism_gap_with_weight_zero_changes_nothing(mini_generator, sets):
    rm, rf = conditioning_stats(mini_generator, sets[0])
    sm, sf = conditioning_stats(mini_generator, sets[1])
    gap = realism_gap(rm, sm, rf, sf, rm - sm, weight=0.0)
    assert gap["after"] == pytest.approx(gap["before"])
    assert gap["before"]["mean_distance"] == pytest.approx(float(torch.linalg.norm(rm - sm)))
    half = realism_gap(rm, sm, rf, sf, rm - sm, weight=0.5)
    assert half["after"]["mean_distance"] == pytest.approx(0.5 * half["before"]["mean_distance"])


# -------------------------------------------------------------------------------------------------------- Fréchet


def test_frechet_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((40, 6))
    assert feature_frechet(feats, feats) == pytest.approx(0.0, abs=1e-8)
    low_rank = np.random.default_rng(1).standard_normal((4, 30))  # fewer rows than dimensions: singular covariance
    assert feature_frechet(low_rank, low_rank) == pytest.approx(0.0, abs=1e-7)


def test_frechet_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_frechet_matches_the_eigenvalues_of_the_covariance_product():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    c1, c2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.standard_normal(4), rng.standard_normal(4)
    cross = np.sqrt(np.linalg.eigvals(c1 @ c2).real.clip(0)).sum()  # tr sqrt(S1 S2): S1 S2 has real, >= 0 spectrum
    want = float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-9)


# -------------------------------------------------------------------------------------------------------- the file


def test_write_read_round_trip_keeps_delta_and_meta(tmp_path, shift, mini_generator):
    shift.meta["note"] = "123"  # a string that looks like JSON stays a string
    path = tmp_path / "sub" / "shift.safetensors"
    write_shift(path, shift)
    back = read_shift(path, hidden=mini_generator.hidden_size)
    assert torch.equal(back.delta, shift.delta) and back.delta.dtype == torch.float32
    assert back.meta == shift.meta
    assert not [p for p in path.parent.iterdir() if p.name != "shift.safetensors"]  # no temporary left behind
    del shift.meta["note"]


def test_read_shift_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(Digi2RealError, match="not found.*digi2real shift") as missing:
        read_shift(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in str(missing.value)

    fake = tmp_path / "pickled.safetensors"
    fake.write_bytes(pickle.dumps({"delta": np.zeros((77, 8), np.float32)}))
    with pytest.raises(Digi2RealError, match="pickled.safetensors: not a safetensors.*digi2real shift"):
        read_shift(fake)

    wrong = tmp_path / "wrong.safetensors"
    write_shift(wrong, RealismShift(torch.zeros(10, 8), {}))
    with pytest.raises(Digi2RealError, match=r"wrong.safetensors: delta has shape \(10, 8\), expected 77 x hidden"):
        read_shift(wrong)
    other = tmp_path / "other.safetensors"
    write_shift(other, RealismShift(torch.zeros(77, 8), {}))
    assert read_shift(other).delta.shape == (77, 8)
    with pytest.raises(Digi2RealError, match="expected 77 x 16"):
        read_shift(other, hidden=16)

    from safetensors.torch import save_file

    nodelta = tmp_path / "nodelta.safetensors"
    save_file({"something": torch.zeros(2)}, str(nodelta))
    with pytest.raises(Digi2RealError, match="no 'delta' tensor"):
        read_shift(nodelta)
    assert "\n" not in str(missing.value)


# ------------------------------------------------------------------------------------------------ collecting inputs


def test_sample_files_is_seeded_sorted_and_skips_hidden(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(12):
        sub = tmp_path / f"id{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i}.png").write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "a.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    everything = sample_files(tmp_path, 100, seed=0)
    assert len(everything) == 12 and everything == sorted(everything)
    assert all(not p.name.startswith(".") and ".cache" not in p.parts for p in everything)
    a, b = sample_files(tmp_path, 5, seed=3), sample_files(tmp_path, 5, seed=3)
    assert a == b and len(a) == 5 and a == sorted(a) and set(a) <= set(everything)
    assert any(sample_files(tmp_path, 5, seed=s) != a for s in range(4, 10))

    with pytest.raises(Digi2RealError, match="no images found"):
        sample_files(empty, 5, 0)
    with pytest.raises(Digi2RealError, match="nope: image folder not found"):
        sample_files(tmp_path / "nope", 5, 0)


def test_identity_embeddings_from_a_folder_counts_what_it_skips(tmp_path, encoder, detector, astronaut):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(tmp_path / f"crop{i}.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(tmp_path / "noise.png")  # no face
    Image.fromarray(astronaut).save(tmp_path / "photo.png")  # a real face: detected and aligned

    emb, report = identity_embeddings(tmp_path, 100, 0, encoder, AlignConfig(), detector=detector, progress=False)
    assert emb.shape == (4, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert report["kind"] == "images" and report["source"] == str(tmp_path)
    assert (report["used"], report["skipped"]) == (4, 2)
    assert report["reasons"] == {"bad_image": 1, "no_face": 1}
    assert len(report["examples"]) == 2 and any("corrupt.jpg" in e for e in report["examples"])
    # the 112 x 112 crops are embedded as they are, without detection
    direct = encoder(crops)
    assert any(np.allclose(direct[0], row, atol=1e-5) for row in emb)


def test_identity_embeddings_without_any_face_is_an_error(tmp_path, encoder, detector):
    (tmp_path / "broken.png").write_bytes(b"")
    with pytest.raises(Digi2RealError, match="none of the 1 images gave a face"):
        identity_embeddings(tmp_path, 10, 0, encoder, AlignConfig(), detector=detector, progress=False)


def test_identity_embeddings_from_an_embeddings_directory(tmp_path, encoder):
    rows = unit_rows(20, seed=4)
    store = tmp_path / "emb"
    write_store(store, rows, [str(i // 5) for i in range(20)], [f"{i // 5}/{i % 5}.png" for i in range(20)], {})
    emb, report = identity_embeddings(store, 6, 1, encoder, AlignConfig(), progress=False)
    again, _ = identity_embeddings(store, 6, 1, encoder, AlignConfig(), progress=False)
    assert emb.shape == (6, 512) and np.array_equal(emb, again)
    assert all(any(np.array_equal(e, r) for r in rows) for e in emb)
    assert (report["kind"], report["used"], report["skipped"], report["available"]) == ("embeddings", 6, 0, 20)
    everything, _ = identity_embeddings(store, 50, 1, encoder, AlignConfig(), progress=False)
    assert np.array_equal(everything, rows)

    other = tmp_path / "other"
    write_store(other, rows, ["a"] * 20, ["x.png"] * 20, {"encoder": {"sha256": "0" * 64}})
    with pytest.raises(Digi2RealError, match="another ArcFace model"):
        identity_embeddings(other, 5, 0, encoder, AlignConfig(), progress=False)


# ------------------------------------------------------------------------------------------------------------ stage


def test_make_shift_writes_a_readable_shift_with_its_provenance(tmp_path, mini_generator, encoder):
    real, syn = tmp_path / "real", tmp_path / "syn"
    write_store(real, unit_rows(8, seed=5), ["r"] * 8, ["r.png"] * 8, {})
    write_store(syn, unit_rows(9, seed=6), ["s"] * 9, ["s.png"] * 9, {})
    out = tmp_path / "shift.safetensors"
    made = make_shift(real, syn, out, mini_generator, encoder, ShiftConfig(images=6, seed=0, batch_size=4),
                      AlignConfig(), progress=False)
    back = read_shift(out, hidden=mini_generator.hidden_size)
    assert torch.equal(back.delta, made.delta)
    assert back.meta["n_real"] == 6 and back.meta["n_synthetic"] == 6
    assert back.meta["real"]["source"] == str(real) and back.meta["synthetic"]["used"] == 6
    assert back.meta["arcface_sha256"] == encoder.file_hash()
    assert back.meta["settings"] == {"images": 6, "seed": 0, "batch_size": 4}
    lines = format_gap(back.meta)
    assert any(line.startswith("real: 6 embeddings") for line in lines)
    assert any("Frobenius" in line and "->" in line for line in lines)
    assert any("Frechet" in line for line in lines)
