"""Verification on insightface .bin sets during training (issue 6): log lines at the scheduled steps, the best accuracy
kept in the checkpoint, no effect on the training trajectory (an interrupted + resumed run with verification equals an
uninterrupted run without it), fail-fast on a missing or damaged .bin, and the --verify / --verify-every flags."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.config import TrainConfig
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.evaluation.bins import read_bin, write_bin
from digi2real.sources.procedural import render_item
from digi2real.training.loop import load_verify_sets, train

from conftest import ArraySet, tiny_train_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**kw) -> TrainConfig:
    return tiny_train_cfg(**{"batch_size": 16, "augment": "flip", **kw})


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_bin(path: Path, n_pairs: int = 12, identities: int = 6, seed: int = 9) -> Path:
    """A small insightface-style .bin of procedural faces never seen in training: even pairs are the same identity,
    odd pairs two different ones; PNG and JPEG bytes alternate, as real .bin files hold JPEG (and some PNG)."""
    rng = np.random.default_rng(3)
    blobs, same = [], []
    for p in range(n_pairs):
        i = p % identities
        if p % 2 == 0:
            k1, k2 = (int(k) for k in rng.choice(8, 2, replace=False))
            a, b = render_item(seed, i, k1), render_item(seed, i, k2)
        else:
            j = (i + 1 + int(rng.integers(identities - 1))) % identities
            a, b = render_item(seed, i, int(rng.integers(8))), render_item(seed, j, int(rng.integers(8)))
        fmt = "PNG" if p % 4 < 2 else "JPEG"
        blobs += [_encode(a, fmt), _encode(b, fmt)]
        same.append(p % 2 == 0)
    write_bin(path, blobs, same)
    return path


@pytest.fixture(scope="module")
def small_set() -> ArraySet:
    return ArraySet(16, 3)  # 48 images: 3 steps of 16 per epoch, 6 steps in 2 epochs


@pytest.fixture(scope="module")
def lfw_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bin(tmp_path_factory.mktemp("bins") / "tinylfw.bin")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _verify_lines(run: Path) -> list[dict]:
    return [r for r in _log(run) if r.get("event") == "verify"]


# ------------------------------------------------------------------------------------------------------ loading
def test_bin_round_trip_and_loader(lfw_bin: Path) -> None:
    images, issame = read_bin(lfw_bin)
    assert len(images) == 24 and issame.tolist() == [p % 2 == 0 for p in range(12)]
    (vs,) = load_verify_sets([lfw_bin])
    assert vs.name == "tinylfw" and vs.images is not None and vs.images.shape == (24, 112, 112, 3)
    (checked,) = load_verify_sets([lfw_bin], decode=False)  # what the non-main DDP processes do
    assert checked.images is None and checked.issame.tolist() == vs.issame.tolist()


# ---------------------------------------------------------------------------------- schedule, trajectory, resume
def test_verification_schedule_and_trajectory(tmp_path: Path, small_set: ArraySet, lfw_bin: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    ref = train(tiny_cfg(), small_set, tmp_path / "ref", progress=False)  # no verification
    assert ref.finished and len(ref.losses) == 6 and not _verify_lines(tmp_path / "ref")

    # default schedule: at each epoch end (steps 3 and 6); the losses are exactly those of the run without it
    ep = train(tiny_cfg(verify_sets=[lfw_bin]), small_set, tmp_path / "ep", progress=True)
    assert ep.losses == ref.losses
    lines = _verify_lines(tmp_path / "ep")
    assert [(r["step"], r["epoch"]) for r in lines] == [(3, 0), (6, 1)]
    for r in lines:
        assert 0.0 <= r["tinylfw_acc"] <= 1.0 and 0.0 <= r["tinylfw_std"] <= 0.5
        assert 0.0 <= r["tinylfw_best_threshold"] < 4.0
    assert lines[1]["tinylfw_best_acc"] == max(r["tinylfw_acc"] for r in lines)
    best = ep.verify_best["tinylfw"]
    assert best["acc"] == lines[1]["tinylfw_best_acc"] and best["step"] in (3, 6)
    assert ep.to_dict()["verify_best"]["tinylfw"]["acc"] == best["acc"]
    assert torch.load(tmp_path / "ep" / "checkpoint.pt", weights_only=False)["verify_best"] == ep.verify_best
    err = capsys.readouterr().err
    assert "step 3/6 verify: tinylfw" in err and "training on cpu in nchw: 1 process, global batch 16" in err
    # the backbone went back to training mode after verifying: the model file equals the reference's
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ep" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # every 4 steps (and at the last step), interrupted mid-epoch after step 5 and resumed: the same trajectory
    cfg = tiny_cfg(verify_sets=[lfw_bin], verify_every=4)
    part1 = train(cfg, small_set, tmp_path / "res", progress=False, max_steps=5)
    assert not part1.finished and [r["step"] for r in part1.verifications] == [4]
    part2 = train(cfg, small_set, tmp_path / "res", progress=False)
    assert part2.finished and part2.resumed_from_step == 5
    assert part1.losses + part2.losses == ref.losses
    steps = [r["step"] for r in _verify_lines(tmp_path / "res")]
    assert steps == [4, 6]
    # verification is deterministic: the final weights score as in the epoch-end run
    final = _verify_lines(tmp_path / "res")[-1]
    assert final["tinylfw_acc"] == pytest.approx(lines[-1]["tinylfw_acc"], abs=1e-9)
    # the best accuracy survives the resume (checkpoint) and covers the steps before it
    accs = {r["step"]: r["tinylfw_acc"] for r in _verify_lines(tmp_path / "res")}
    assert part2.verify_best["tinylfw"]["acc"] == pytest.approx(max(accs.values()))


def test_verify_sets_do_not_block_resume(tmp_path: Path, small_set: ArraySet, lfw_bin: Path) -> None:
    """verify_sets / verify_every change nothing that is computed: adding them to a resumed run is allowed."""
    train(tiny_cfg(epochs=1), small_set, tmp_path / "r", progress=False, max_steps=1)
    s = train(tiny_cfg(epochs=1, verify_sets=[lfw_bin], verify_every=2), small_set, tmp_path / "r", progress=False)
    assert s.resumed_from_step == 1 and s.finished and [r["step"] for r in s.verifications] == [2, 3]


# ---------------------------------------------------------------------------------------------------- fail fast
def test_missing_or_damaged_bin_fails_before_training(tmp_path: Path, small_set: ArraySet, lfw_bin: Path) -> None:
    calls = []
    missing = tmp_path / "nowhere" / "lfw.bin"
    with pytest.raises(Digi2RealError, match=r"verify_sets: .*nowhere.lfw\.bin: benchmark file not found") as exc:
        train(tiny_cfg(verify_sets=[lfw_bin, missing]), small_set, tmp_path / "m", progress=False,
              on_step=lambda s, loss: calls.append(s))
    assert "\n" not in str(exc.value) and not calls and not (tmp_path / "m").exists()

    corrupt = tmp_path / "cfp_fp.bin"
    corrupt.write_bytes(b"\x80\x04not a pickle at all" * 10)
    with pytest.raises(Digi2RealError, match=r"cfp_fp\.bin: not a readable benchmark") as exc:
        train(tiny_cfg(verify_sets=[corrupt]), small_set, tmp_path / "c", progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "c").exists()

    images, issame = read_bin(lfw_bin)
    bad_image = tmp_path / "badimg.bin"
    write_bin(bad_image, images[:3] + [b"\xff\xd8 truncated jpeg"] + images[4:], issame)
    with pytest.raises(Digi2RealError, match=r"badimg\.bin(\[3\]|: image 3 )"):
        train(tiny_cfg(verify_sets=[bad_image]), small_set, tmp_path / "b", progress=False)

    few = tmp_path / "few.bin"
    write_bin(few, images[:8], issame[:4])
    with pytest.raises(Digi2RealError, match=r"few\.bin: 4 pairs; the 10-fold protocol needs at least 10"):
        train(tiny_cfg(verify_sets=[few]), small_set, tmp_path / "f", progress=False)

    twin = tmp_path / "other"
    twin.mkdir()
    (twin / "tinylfw.bin").write_bytes(lfw_bin.read_bytes())
    with pytest.raises(ConfigError, match="both named 'tinylfw'"):
        train(tiny_cfg(verify_sets=[lfw_bin, twin / "tinylfw.bin"]), small_set, tmp_path / "t", progress=False)


def test_verify_every_must_be_positive() -> None:
    with pytest.raises(Exception, match="verify_every"):
        tiny_cfg(verify_every=0)


# --------------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    from digi2real.training.commands import register

    parser = argparse.ArgumentParser(prog="digi2real")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_verify_flags(tmp_path: Path, small_set: ArraySet, lfw_bin: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    fake = types.ModuleType("digi2real.dataset.imagefolder")
    fake.open_training_set = lambda cfg, seed: small_set  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "digi2real.dataset.imagefolder", fake)
    other = make_bin(tmp_path / "other_set.bin", n_pairs=10, identities=5, seed=21)
    run = tmp_path / "run"
    base = ["train", "-o", str(run), "--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", "-q", "--set", "train.widths=[8,8,16,16]", "--set", "train.depths=[1,1,1,1]",
            "--set", "stem_stride=2", "--set", "train.embedding_dim=32"]
    args = _parser().parse_args(base + ["--verify", str(lfw_bin), "--verify", str(other), "--verify-every", "2"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["verify_best"]) == {"tinylfw", "other_set"}
    lines = _verify_lines(run)
    assert [r["step"] for r in lines] == [2, 3]
    assert all({"tinylfw_acc", "other_set_acc", "other_set_std", "other_set_best_threshold"} <= set(r)
               for r in lines)
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["verify_every"] == 2 and [Path(p).name for p in saved["verify_sets"]] == ["tinylfw.bin",
                                                                                           "other_set.bin"]

    from digi2real.cli import main

    code = main(base[:2] + [str(tmp_path / "run2")] + base[3:] + ["--verify", str(tmp_path / "x.bin")])
    err = capsys.readouterr().err
    assert code == 2 and "x.bin: benchmark file not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run2").exists()
