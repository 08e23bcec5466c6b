"""Training loop: it really learns (verification on unseen procedural identities), resumes exactly, stops cleanly on
divergence, refuses a changed config, and its model loads for evaluation and exports to ONNX (FACTS 6)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from digi2real.config import DataConfig, EvalConfig, TrainConfig
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.evaluation.models import load_face_model
from digi2real.evaluation.verification import evaluate_verification
from digi2real.sources.procedural import render_item
from digi2real.training import loop
from digi2real.training.data import ResumableSampler, make_loader, normalize
from digi2real.training.loop import train

from conftest import ArraySet


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(widths=(8, 8, 16, 16), depths=(1, 1, 1, 1), stem_stride=2, embedding_dim=32, head="adaface",
                batch_size=32, epochs=2, lr=0.05, warmup_epochs=0.5, device="cpu", log_every=2, dropout=0.1,
                augment="flip+photometric+lowres", data=DataConfig(workers=0))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def small_set() -> ArraySet:
    return ArraySet(40, 4)  # 160 images: 5 steps of 32 per epoch


# ------------------------------------------------------------------------------------------------------- data
def test_normalize_matches_facts6() -> None:
    x = torch.tensor([[[[0, 127, 255]]]], dtype=torch.uint8).expand(2, 4, 4, 3).contiguous()
    y = normalize(x)
    assert y.shape == (2, 3, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0, 127, 255]) / 255.0 * 2 - 1, atol=1e-6)


def test_sampler_shards_and_resumes() -> None:
    full = list(ResumableSampler(100, 8, seed=3, epoch=1))
    assert len(full) == 96 and len({k[0] for k in full}) == 96
    assert [k[0] for k in full] != [k[0] for k in ResumableSampler(100, 8, seed=3, epoch=2)]
    shards = [list(ResumableSampler(100, 8, seed=3, epoch=1, rank=r, world=2)) for r in range(2)]
    for b in range(12):  # each global batch is split between the two ranks
        assert sorted(shards[0][b * 4:(b + 1) * 4] + shards[1][b * 4:(b + 1) * 4]) == sorted(full[b * 8:(b + 1) * 8])
    assert list(ResumableSampler(100, 8, seed=3, epoch=1, start_step=5)) == full[40:]


def test_augmentation_independent_of_worker_count(small_set: ArraySet) -> None:
    def batches(workers: int) -> list[torch.Tensor]:
        return [b[0] for b in make_loader(small_set, global_batch=32, seed=1, epoch=0, workers=workers,
                                          augment_mode="flip+photometric+lowres")]
    a, b = batches(0), batches(2)
    assert len(a) == 5 and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------ it learns
def _pairs(seed: int, identities: int, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    imgs, same = [], []
    for p in range(n_pairs):
        i = p % identities
        if p % 2 == 0:
            k1, k2 = rng.choice(10, 2, replace=False)
            imgs += [render_item(seed, i, int(k1)), render_item(seed, i, int(k2))]
        else:
            j = (i + 1 + int(rng.integers(identities - 1))) % identities
            imgs += [render_item(seed, i, int(rng.integers(10))), render_item(seed, j, int(rng.integers(10)))]
        same.append(p % 2 == 0)
    return np.stack(imgs), np.array(same)


def test_training_learns_unseen_identities(tmp_path: Path) -> None:
    data = ArraySet(300, 10, seed=0)
    cfg = TrainConfig(widths=(16, 32, 64, 128), depths=(1, 1, 1, 1), stem_stride=2, head="cosface", scale=32.0,
                      batch_size=64, epochs=5, lr=0.1, warmup_epochs=0.5, device="cpu", log_every=20,
                      data=DataConfig(workers=0))
    summary = train(cfg, data, tmp_path / "run", progress=False)
    assert summary.finished and summary.steps_done == 5 * (3000 // 64)
    assert np.mean(summary.losses[-10:]) < 0.6 * np.mean(summary.losses[:10])
    pairs, same = _pairs(seed=7, identities=100, n_pairs=300)  # 100 identities never seen in training
    model = load_face_model(tmp_path / "run", EvalConfig(device="cpu", batch_size=128))
    acc = evaluate_verification(model.embed(pairs), same).accuracy
    raw = pairs.reshape(len(pairs), -1).astype(np.float32)
    raw_acc = evaluate_verification(raw - raw.mean(1, keepdims=True), same).accuracy
    print(f"verification on unseen identities: {acc:.3f} (raw pixels {raw_acc:.3f})")
    assert acc >= 0.85 and acc > raw_acc + 0.1
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert len(log) >= 5 and {"epoch", "step", "loss", "acc", "lr", "images_per_s", "eta_s"} <= set(
        __import__("json").loads(log[-1]))


# --------------------------------------------------------------------------------------------------- resume
def test_resume_reproduces_uninterrupted_run(tmp_path: Path, small_set: ArraySet) -> None:
    cfg = tiny_cfg()
    ref = train(cfg, small_set, tmp_path / "a", progress=False)
    assert ref.finished and len(ref.losses) == 10

    def sigterm_at_3(step: int, loss: float) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, small_set, tmp_path / "b", progress=False, on_step=sigterm_at_3)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 3
    part2 = train(cfg, small_set, tmp_path / "b", progress=False, max_steps=7)
    assert not part2.finished and part2.resumed_from_step == 3
    part3 = train(cfg, small_set, tmp_path / "b", progress=False)
    assert part3.finished and part3.resumed_from_step == 7
    # the interrupted call's 3 losses are not returned (it raised); the resumed ones must continue the trajectory
    resumed = part2.losses + part3.losses
    assert len(resumed) == 7
    np.testing.assert_allclose(resumed, ref.losses[3:], rtol=1e-6, atol=1e-6)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_config_mismatch_refused(tmp_path: Path, small_set: ArraySet) -> None:
    train(tiny_cfg(epochs=1), small_set, tmp_path / "r", progress=False, max_steps=2)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        train(tiny_cfg(epochs=1, lr=0.2), small_set, tmp_path / "r", progress=False)
    # log_every and workers do not change what is computed: resuming with them changed is allowed
    s = train(tiny_cfg(epochs=1, log_every=1), small_set, tmp_path / "r", progress=False)
    assert s.resumed_from_step == 2 and s.finished
    s = train(tiny_cfg(epochs=1, lr=0.2), small_set, tmp_path / "r", progress=False, overwrite=True)
    assert s.resumed_from_step == 0 and s.finished


# ---------------------------------------------------------------------------------------------------- NaN guard
def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path: Path, small_set: ArraySet,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_ce = torch.nn.functional.cross_entropy

    def poisoned(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = real_ce(logits, y)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(loop, "F", types.SimpleNamespace(cross_entropy=poisoned))
    with pytest.raises(Digi2RealError, match=r"step 7 .*last finite loss \d"):
        train(tiny_cfg(), small_set, tmp_path / "n", progress=False)
    ckpt = torch.load(tmp_path / "n" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["backbone"].values()
                                     if v.is_floating_point())
    assert not (tmp_path / "n" / "model.pt").exists()
    assert not [p for p in (tmp_path / "n").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ CLI, load, export
def _parser() -> argparse.ArgumentParser:
    from digi2real.training.commands import register

    parser = argparse.ArgumentParser(prog="digi2real")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_train_then_load_and_export_onnx(tmp_path: Path, small_set: ArraySet,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("digi2real.dataset.imagefolder")
    seen = {}

    def open_training_set(cfg: DataConfig, seed: int) -> ArraySet:
        seen["path"], seen["seed"] = cfg.path, seed
        return small_set

    fake.open_training_set = open_training_set  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "digi2real.dataset.imagefolder", fake)
    run = tmp_path / "run"
    args = _parser().parse_args([
        "train", "-o", str(run), "--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "32",
        "--head", "arcface", "--device", "cpu", "-q", "--set", "train.widths=[8,8,16,16]",
        "--set", "train.depths=[1,1,1,1]", "--set", "stem_stride=2", "--set", "train.embedding_dim=32"])
    assert args.func(args) == 0
    assert seen["path"] == tmp_path / "data" and (run / "model.pt").is_file()
    assert __import__("json").loads((run / "train_config.json").read_text())["head"] == "arcface"

    model = load_face_model(run, EvalConfig(device="cpu", flip=False))
    assert model.embedding_dim == 32
    from digi2real.training.iresnet import IResNet

    net = IResNet((1, 1, 1, 1), widths=(8, 8, 16, 16), embedding_dim=32, stem_stride=2)
    net.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    net.eval()
    batch = small_set.images[:6]
    with torch.no_grad():
        ref = net(normalize(torch.from_numpy(batch)).contiguous()).numpy()
    np.testing.assert_allclose(model.embed(batch), ref, rtol=1e-4, atol=1e-4)

    onnx_path = tmp_path / "m.onnx"
    args = _parser().parse_args(["export", str(run), "--onnx", "-o", str(onnx_path)])
    assert args.func(args) == 0
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = ((batch.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)  # what ArcFace-style consumers feed
    (got,) = sess.run(None, {"input": np.ascontiguousarray(x)})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert math.isfinite(float(got.sum()))


def test_cli_train_without_data_is_a_clear_error(tmp_path: Path) -> None:
    args = _parser().parse_args(["train", "-o", str(tmp_path / "r")])
    with pytest.raises(ConfigError, match="--data"):
        args.func(args)


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path, small_set: ArraySet) -> None:
    """A checkpoint.pt holding a pickle that runs code on load is refused with one line, never executed."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "run"
    out.mkdir()
    with open(out / "checkpoint.pt", "wb") as fh:
        pickle.dump({"step": Exploit()}, fh, protocol=2)
    with pytest.raises(Digi2RealError, match="not a readable digi2real checkpoint"):
        train(tiny_cfg(epochs=1), small_set, out, progress=False)
    assert not marker.exists()
