"""Training loop: it really learns (verification on unseen procedural identities), resumes exactly, stops cleanly on
divergence, refuses a changed config, and its model loads for evaluation and exports to ONNX (FACTS 6)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
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

from conftest import ArraySet, tiny_train_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


tiny_cfg = tiny_train_cfg


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


# ------------------------------------------------------------------------------------------- layout (issue 11)
def test_layout_recorded_and_resume_free(tmp_path: Path, small_set: ArraySet,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """channels_last asked on the CPU: NCHW is used and said once (stderr, the start line, the checkpoint); the
    setting is not part of what a resume compares (checkpoints of the old default ``true`` resume under ``auto``),
    and the resumed run continues the trajectory exactly."""
    ref = train(tiny_cfg(epochs=1), small_set, tmp_path / "ref", progress=False)
    part1 = train(tiny_cfg(epochs=1, channels_last=True), small_set, tmp_path / "r", progress=False, max_steps=3)
    err = capsys.readouterr().err
    assert err.count("digi2real: note: train.channels_last is true, but training on cpu runs in NCHW") == 1
    assert part1.layout == "nchw" and len(err.strip().splitlines()) == 1
    start = json.loads((tmp_path / "r" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["layout"] == "nchw" and "fewer than 16 input channels" in start["layout_note"]
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["layout"] == "nchw" and ckpt["config_compare"].get("channels_last") is None
    ckpt["config_compare"]["channels_last"] = True  # a checkpoint written before the setting was resume-free
    torch.save(ckpt, tmp_path / "r" / "checkpoint.pt")
    part2 = train(tiny_cfg(epochs=1), small_set, tmp_path / "r", progress=True)  # auto: no note
    assert part2.resumed_from_step == 3 and part2.finished
    assert part1.losses + part2.losses == ref.losses
    err = capsys.readouterr().err
    assert "note:" not in err and "training on cpu in nchw: 1 process" in err and "resuming at step 3" in err


# ------------------------------------------------------------------------------------------ run-folder lock
def test_run_folder_is_locked_while_training(tmp_path: Path, small_set: ArraySet) -> None:
    from digi2real.fileio import exclusive_lock

    run = tmp_path / "run"
    seen: list[str] = []

    def try_lock(step: int, loss: float) -> None:  # a second trainer arriving in the middle of the run
        try:
            with exclusive_lock(run / loop.LOCK, "busy"):
                seen.append("free")
        except Digi2RealError as exc:
            seen.append(str(exc))

    train(tiny_cfg(epochs=1), small_set, run, progress=False, on_step=try_lock)
    assert seen == [f"{run}: busy"] * 5
    with exclusive_lock(run / loop.LOCK, "busy"):  # released when train returns
        pass


def test_second_train_into_the_same_run_exits_2(tmp_path: Path, finished_run: Path, faces: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Another process holds RUN's lock: `digi2real train` into RUN says so in one line, exit 2, and leaves RUN and
    the data byte-identical (before the lock both ran and interleaved the log)."""
    from digi2real.fileio import exclusive_lock

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "model.pt").unlink()  # an unfinished run that the second command would resume
    before = _files(tmp_path, faces)
    with exclusive_lock(run / loop.LOCK, "held by the test"):
        code, err = _cli(capsys, ["train", "-o", str(run), "--data", str(faces), *MINI, "--epochs", "2"])
    assert code == 2 and len(err.splitlines()) == 1
    assert "another digi2real train process is training in this run folder" in err and str(run) in err
    assert _files(tmp_path, faces) == before


# ------------------------------------------------------------------------------------------ configs (issue 11)
def test_cli_train_merges_extends(tmp_path: Path, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`digi2real train overlay.yaml` with `extends: base.yaml` trains the merged config, as `run` would."""
    (tmp_path / "base.yaml").write_text(
        "train:\n  backbone: r18\n  epochs: 1\n  widths: [8, 8, 16, 16]\n  depths: [1, 1, 1, 1]\n  stem_stride: 2\n"
        "  embedding_dim: 32\n  batch_size: 16\n  device: cpu\n  lr: 0.02\n  data:\n    workers: 0\n")
    (tmp_path / "overlay.yaml").write_text("extends: base.yaml\ntrain:\n  head: cosface\n  scale: 16\n")
    run = tmp_path / "run"
    code, err = _cli(capsys, ["train", str(tmp_path / "overlay.yaml"), "-o", str(run), "--data", str(faces), "-q"])
    assert code == 0, err
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["backbone"], saved["epochs"], saved["widths"], saved["lr"]) == ("r18", 1, [8, 8, 16, 16], 0.02)
    assert (saved["head"], saved["scale"]) == ("cosface", 16.0) and (run / "model.pt").is_file()


def test_cli_train_refuses_a_misspelt_section(tmp_path: Path, faces: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("trian:\n  epochs: 1\n")
    code, err = _cli(capsys, ["train", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "run"), "--data", str(faces)])
    assert code == 2 and len(err.splitlines()) == 1 and "trian: unknown key" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- hostile input (issue 11)
MINI = ["--epochs", "1", "--batch-size", "16", "--device", "cpu", "-q", "--set", "train.widths=[8,8,16,16]",
        "--set", "train.depths=[1,1,1,1]", "--set", "train.stem_stride=2", "--set", "train.embedding_dim=32",
        "--set", "train.data.workers=0"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder-per-identity tree of 32 procedural PNGs (8 identities): 2 steps of 16."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data") / "faces"
    for i in range(8):
        (root / f"id{i}").mkdir(parents=True)
        for k in range(4):
            Image.fromarray(render_item(2, i, k)).save(root / f"id{i}" / f"{k}.png", compress_level=1)
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, faces: Path) -> Path:
    """A finished `digi2real train ... MINI` run (checkpoint.pt, model.pt, log, config)."""
    from digi2real.cli import main

    run = tmp_path_factory.mktemp("runs") / "done"
    assert main(["train", "-o", str(run), "--data", str(faces), *MINI]) == 0
    return run


def _files(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    from digi2real.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def _tamper_checkpoint(path: Path) -> None:
    """Right keys and settings, a tensor of the wrong shape: what a damaged or hand-edited checkpoint looks like."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["backbone"]["conv1.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(ckpt, path)


def _code_running_pickle(path: Path) -> None:
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'pwned'}",))

    with open(path, "wb") as fh:
        pickle.dump({"step": Exploit()}, fh, protocol=2)


# (name, setup(tmp, run, faces) -> argv, expected fragment of the one error line)
TRAIN_CASES = {
    "data missing": (lambda t, r, f: ["--data", str(t / "nowhere")], "does not exist"),
    "data is a file": (lambda t, r, f: ["--data", str(_write(t / "a.txt", b"x"))], "is not a folder"),
    "data is an empty folder": (lambda t, r, f: ["--data", str(_mkdir(t / "empty"))], "empty training set"),
    "-o names an existing file": (lambda t, r, f: ["-o", str(_write(t / "notes.txt", b"keep me"))],
                                  "a file is there, not a run folder"),
    "-o under a file": (lambda t, r, f: ["-o", str(_write(t / "notes.txt", b"keep me") / "run")], "Not a directory"),
    "-o is the data": (lambda t, r, f: ["-o", str(f)], "the output is the input itself"),
    "-o inside the data": (lambda t, r, f: ["-o", str(f / "id0")], "lies inside the input"),
    "-o holds the data": (lambda t, r, f: ["-o", str(f.parent)], "holds the input"),
    "--max-steps -1": (lambda t, r, f: ["--max-steps", "-1"], "--max-steps -1: give at least 1 step"),
    "--max-steps 0": (lambda t, r, f: ["--max-steps", "0"], "--max-steps 0: give at least 1 step"),
    "width 0": (lambda t, r, f: ["--set", "train.widths=[0,8,16,16]"], "train.widths.0: Input should be greater than 0"),
    "depth 0": (lambda t, r, f: ["--set", "train.depths=[0,1,1,1]"], "train.depths.0: Input should be greater than 0"),
    "--verify corrupt": (lambda t, r, f: ["--verify", str(_write(t / "lfw.bin", b"\x80\x04junk" * 9))],
                         "lfw.bin: not a readable benchmark"),
    "checkpoint junk": (lambda t, r, f: _write(r / "checkpoint.pt", b"\x00junk" * 50) and [],
                        "not a readable digi2real checkpoint"),
    "checkpoint truncated": (lambda t, r, f: _write(r / "checkpoint.pt", (r / "checkpoint.pt").read_bytes()[:4000])
                             and [], "not a complete torch file"),
    "checkpoint of another shape": (lambda t, r, f: torch.save([1, 2], r / "checkpoint.pt") or [],
                                    "not a digi2real checkpoint (a list"),
    "checkpoint without keys": (lambda t, r, f: torch.save({"step": 1}, r / "checkpoint.pt") or [],
                                "'backbone' missing"),
    "checkpoint tensors damaged": (lambda t, r, f: _tamper_checkpoint(r / "checkpoint.pt") or [],
                                   "damaged checkpoint (its backbone does not fit"),
    "checkpoint runs code": (lambda t, r, f: _code_running_pickle(r / "checkpoint.pt") or [],
                             "could run code when loaded: refused"),
    "checkpoint is a folder": (lambda t, r, f: _swap_for_folder(r / "checkpoint.pt") or [],
                               "checkpoint.pt: not a regular file"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _swap_for_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_hostile_input(case: str, tmp_path: Path, faces: Path, finished_run: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """Each case: exit 2, one stderr line naming the problem, nothing that existed changed, no code run."""
    setup, expected = TRAIN_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "model.pt").unlink()  # unfinished: the command would resume it
    extra = setup(tmp_path, run, faces)
    argv = ["train", "-o", str(run), "--data", str(faces), *MINI, *extra]  # later flags win
    before = _files(tmp_path, faces)
    code, err = _cli(capsys, argv)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("digi2real: error: "), err
    assert expected in err, err
    assert _files(tmp_path, faces) == before
    assert not (tmp_path / "pwned").exists() and not (run / "pwned").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_into_a_read_only_folder(tmp_path: Path, faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = _mkdir(tmp_path / "ro")
    ro.chmod(0o555)
    try:
        for run in (ro, ro / "run"):
            code, err = _cli(capsys, ["train", "-o", str(run), "--data", str(faces), *MINI])
            assert code == 2 and len(err.splitlines()) == 1 and "Permission denied" in err, err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


EXPORT_CASES = {
    "no model.pt": (lambda t, r: (r / "model.pt").unlink() or [], "no model.pt; train first"),
    "model.pt truncated": (lambda t, r: _write(r / "model.pt", (r / "model.pt").read_bytes()[:3000]) and [],
                           "not a readable model file (not a complete torch file"),
    "model.pt junk": (lambda t, r: _write(r / "model.pt", b"hello\n") and [], "not a readable model file"),
    "model.pt runs code": (lambda t, r: _code_running_pickle(r / "model.pt") or [],
                           "could run code when loaded: refused"),
    "model.pt not a state dict": (lambda t, r: torch.save([1, 2], r / "model.pt") or [],
                                  "not a state dict of named tensors"),
    "model.pt foreign keys": (lambda t, r: torch.save({"a": torch.zeros(2)}, r / "model.pt") or [],
                              "keys are not an insightface IResNet"),
    "model.pt bad tensor": (lambda t, r: _edit_model(r / "model.pt", "fc.weight", torch.zeros(5)) or [],
                            "fc.weight (not 2-D)"),
    "model.pt bad shape": (lambda t, r: _edit_model(r / "model.pt", "layer1.0.bn1.weight", torch.zeros(3)) or [],
                           "its tensors do not form the IResNet"),
    "-o the model itself": (lambda t, r: ["-o", str(r / "model.pt")], "ends in .onnx"),
    "-o the checkpoint": (lambda t, r: ["-o", str(r / "checkpoint.pt")], "ends in .onnx"),
    "-o the log": (lambda t, r: ["-o", str(r / "train_log.jsonl")], "ends in .onnx"),
    "-o a folder": (lambda t, r: ["-o", str(r)], "a folder is there"),
    "-o under a file": (lambda t, r: ["-o", str(_write(t / "notes.txt", b"keep") / "x.onnx")],
                        "notes.txt: File exists"),
}


def _edit_model(path: Path, key: str, value: torch.Tensor) -> None:
    state = torch.load(path, weights_only=True)
    state[key] = value
    torch.save(state, path)


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_hostile_input(case: str, tmp_path: Path, finished_run: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    setup, expected = EXPORT_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    extra = setup(tmp_path, run)
    before = _files(tmp_path)
    code, err = _cli(capsys, ["export", str(run), "--onnx", *extra])
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("digi2real: error: "), err
    assert expected in err, err
    assert _files(tmp_path) == before and not (run / "pwned").exists()


def test_export_of_a_model_file_named_onnx_onto_itself(tmp_path: Path, finished_run: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model = shutil.copy(finished_run / "model.pt", tmp_path / "model.onnx")
    before = _files(tmp_path)
    code, err = _cli(capsys, ["export", str(model), "--onnx", "-o", str(model)])
    assert code == 2 and "the output is the input itself" in err and len(err.splitlines()) == 1
    assert _files(tmp_path) == before
