"""`digi2real eval` / `compare` end to end on tiny fixtures, plus the RFW aggregation and the paper tables."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.config import EvalConfig
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.evaluation import commands
from digi2real.evaluation.bins import decode_pairs, read_bin, write_bin
from digi2real.evaluation.models import FaceModel, load_face_model
from digi2real.evaluation.rfw import RACES, rfw_summary
from digi2real.evaluation.tables import csv_table, markdown_tables
from digi2real.evaluation.verification import evaluate_verification
from digi2real.sources.procedural import (face_landmarks, identity_rng, image_rng, render_face, render_item,
                                          sample_identity, sample_nuisance)
from digi2real.training.iresnet import IResNet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _pairs_bin(path: Path, seed: int, pairs: int) -> None:
    """Pairs of procedural faces: same identity (images 0 and 1) for even i, two identities for odd i."""
    images, issame = [], []
    for i in range(pairs):
        same = i % 2 == 0
        images += [_png(render_item(seed, i, 0)), _png(render_item(seed, i if same else i + 1000, 1))]
        issame.append(same)
    write_bin(path, images, issame)


def _ijbc(root: Path, seed: int = 7) -> None:
    """IJB-C layout: loose crops (faces pasted into a larger canvas) with their 5 landmarks, templates and pairs."""
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    tid_mid, pts, templates = [], [], {}
    tid = 0
    for ident in range(4):
        face_id = sample_identity(identity_rng(seed, ident))
        for t in range(2):  # two templates per identity, each from two media of one image
            tid += 1
            templates[tid] = ident
            for m in range(2):
                k = t * 2 + m
                nuisance = sample_nuisance(image_rng(seed, ident, k))
                canvas = np.full((150, 140, 3), 90, np.uint8)
                dy, dx = 20 + k, 10 + 2 * k
                canvas[dy : dy + 112, dx : dx + 112] = render_face(face_id, nuisance, 112)
                name = f"{ident}_{k}.jpg"
                Image.fromarray(canvas).save(root / "loose_crop" / name, quality=95)
                marks = face_landmarks(face_id, nuisance, 112) + np.array([dx, dy])
                tid_mid.append(f"{name} {tid} {tid * 10 + m}")
                pts.append(f"{name} " + " ".join(f"{v:.3f}" for v in marks.reshape(-1)) + " 0.99")
    pairs = [f"{a} {b} {int(templates[a] == templates[b])}" for a in templates for b in templates if a < b]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(pts) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1), widths=(4, 8, 16, 32), embedding_dim=32).eval()  # tiny: the suite stays fast
    model_dir = base / "r-tiny"
    model_dir.mkdir()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, model_dir / "backbone.pth")
    data = base / "data"
    data.mkdir()
    _pairs_bin(data / "lfw.bin", seed=1, pairs=30)
    _pairs_bin(data / "cfp_fp.bin", seed=2, pairs=30)
    (data / "RFW").mkdir()
    for i, race in enumerate(RACES):
        _pairs_bin(data / "RFW" / f"{race}_test.bin", seed=10 + i, pairs=10)
    _ijbc(data / "IJBC")
    return {"model": model_dir / "backbone.pth", "data": data, "base": base}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digi2real")
    commands.register(parser.add_subparsers(dest="command"))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def first_run(fixtures, tmp_path_factory) -> dict:
    """One full `eval` (module scope: the slow part), its stdout/stderr captured by redirection."""
    import contextlib

    out = fixtures["base"] / "results"
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        rc = _run(["eval", str(fixtures["model"]), "--data-root", str(fixtures["data"]), "-o", str(out), "-q",
                   "--benchmarks", "lfw,cfp_fp,cplfw,ijbc,rfw", "--batch-size", "16", "--device", "cpu"])
    return {"rc": rc, "out": out, "stderr": err.getvalue(), "stdout": std.getvalue(),
            "json": json.loads((out / "results.json").read_text())}


def test_eval_results_json(first_run, fixtures) -> None:
    assert first_run["rc"] == 0
    res = first_run["json"]
    assert res["schema"] == "digi2real.eval/1"
    assert res["name"] == "r-tiny"
    assert res["model"]["kind"] == "iresnet" and res["model"]["layers"] == [1, 1, 1, 1]
    assert res["model"]["widths"] == [4, 8, 16, 32]
    assert set(res["verification"]) == {"lfw", "cfp_fp"}
    lfw = res["verification"]["lfw"]
    assert lfw["pairs"] == 30 and len(lfw["fold_accuracies"]) == 10
    assert 0.0 <= lfw["accuracy"] <= 100.0 and lfw["std"] >= 0.0
    # the stored number is the protocol's, in percent, on flip-summed embeddings of this very model
    model = load_face_model(fixtures["model"], EvalConfig(device="cpu"))
    images, issame = read_bin(fixtures["data"] / "lfw.bin")
    direct = evaluate_verification(model.embed(decode_pairs(images)), issame)
    assert lfw["accuracy"] == pytest.approx(100.0 * direct.accuracy)
    assert set(res["ijb"]["ijbc"]) >= {"1e-04", "1e-01"}
    assert all(0.0 <= v <= 100.0 for v in res["ijb"]["ijbc"].values())
    rfw = res["rfw"]
    assert set(rfw["accuracy"]) == set(RACES) and rfw["ddof"] == 0
    assert rfw["mean"] == pytest.approx(np.mean(list(rfw["accuracy"].values())))
    assert rfw["std"] == pytest.approx(np.std(list(rfw["accuracy"].values())))
    assert res["embeddings_cache"] == {"lfw": "computed", "cfp_fp": "computed", **{
        f"rfw_{r.lower()}": "computed" for r in RACES}}


def test_missing_benchmark_skipped_with_warning(first_run, fixtures) -> None:
    expected = str(fixtures["data"] / "cplfw.bin")
    assert first_run["json"]["skipped"] == [{"benchmark": "cplfw", "expected": expected, "reason": "file not found"}]
    assert "cplfw skipped" in first_run["stderr"] and expected in first_run["stderr"]


def test_tables_and_plots_written(first_run) -> None:
    out = first_run["out"]
    md = (out / "results.md").read_text()
    assert "| Model | LFW | CALFW | CPLFW | AgeDB30 | CFP-FP | IJB-B | IJB-C |" in md
    assert "| Digi2Real-20K (paper) | 98.58 | 87.22 | 82.65 | 84.72 | 87.49 | 70.14 | 75.80 |" in md
    assert "| DigiFace-1M (paper) | 91.93 | 75.80 | 73.13 | 71.12 | 78.89 | 43.23 | 49.53 |" in md
    assert "| Model | African | Asian | Caucasian | Indian | Mean | Std |" in md
    assert "| r-tiny |" in md and "cplfw" in md
    assert md.strip() in first_run["stdout"]
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("model,LFW,CALFW,CPLFW,AgeDB30,CFP-FP,IJB-B,IJB-C,RFW African")
    assert rows[1].startswith("r-tiny,") and rows[1].split(",")[3] == ""  # CPLFW not run: empty cell
    for bench in ("lfw", "cfp_fp", "ijbc", "rfw"):
        assert _is_png(out / f"roc_{bench}.png"), bench
    assert not (out / "roc_cplfw.png").exists()


def test_rerun_uses_cache(first_run, fixtures, monkeypatch, capsys) -> None:
    def no_model(self, images):  # a re-run must only re-score: any forward pass is a failure
        raise AssertionError("the model was run although the embeddings are cached")

    monkeypatch.setattr(FaceModel, "embed", no_model)
    rc = _run(["eval", str(fixtures["model"]), "--data-root", str(fixtures["data"]), "-o", str(first_run["out"]),
               "-q", "--benchmarks", "lfw,cfp_fp,ijbc,rfw", "--device", "cpu"])
    assert rc == 0
    res = json.loads((first_run["out"] / "results.json").read_text())
    assert set(res["embeddings_cache"].values()) == {"reused"}
    assert res["verification"]["lfw"] == first_run["json"]["verification"]["lfw"]
    assert res["rfw"]["accuracy"] == first_run["json"]["rfw"]["accuracy"]
    assert res["ijb"]["ijbc"] == first_run["json"]["ijb"]["ijbc"]


def test_compare_two_runs(first_run, fixtures, capsys) -> None:
    second = fixtures["base"] / "results-noflip"
    assert _run(["eval", str(fixtures["model"]), "--data-root", str(fixtures["data"]), "-o", str(second), "-q",
                 "--benchmarks", "lfw,rfw", "--no-flip", "--device", "cpu"]) == 0
    assert json.loads((second / "results.json").read_text())["settings"]["flip"] is False
    combined = fixtures["base"] / "compare"
    assert _run(["compare", str(first_run["out"]), str(second), "-o", str(combined)]) == 0
    md = (combined / "compare.md").read_text()
    assert "| r-tiny |" in md and "| r-tiny (results-noflip) |" in md and "(paper)" in md
    assert len((combined / "compare.csv").read_text().splitlines()) == 1 + 2 + 2  # header, 2 models, 2 paper rows
    assert _is_png(combined / "roc_lfw.png") and _is_png(combined / "roc_rfw.png")
    assert "r-tiny (results-noflip)" in capsys.readouterr().out


def test_cli_errors(fixtures, tmp_path) -> None:
    with pytest.raises(ConfigError, match="fp16"):
        _run(["eval", str(fixtures["model"]), "--data-root", str(fixtures["data"]), "-o", str(tmp_path),
              "--precision", "fp16", "--device", "cpu"])
    with pytest.raises(Digi2RealError, match="benchmark data directory not found"):
        _run(["eval", str(fixtures["model"]), "--data-root", str(tmp_path / "nope"), "-o", str(tmp_path)])
    with pytest.raises(Digi2RealError, match="none of the requested benchmarks"):
        _run(["eval", str(fixtures["model"]), "--data-root", str(fixtures["data"]), "-o", str(tmp_path / "o"), "-q",
              "--benchmarks", "agedb_30", "--device", "cpu"])
    assert not (tmp_path / "o").exists()  # refused before anything was made
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "m.pth", "--data-root", ".", "-o", "x", "--benchmarks", "lfw,mnist"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(Digi2RealError, match="results.json"):
        _run(["compare", str(tmp_path / "empty"), "-o", str(tmp_path / "c")])


def test_set_and_config_overrides(tmp_path) -> None:
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("eval:\n  batch_size: 7\n  folds: 5\n")
    args = _parser().parse_args(["eval", "m.pth", "--data-root", ".", "-o", "x", "--config", str(cfg_file),
                                 "--set", "eval.folds=4", "--no-flip", "--benchmarks", "lfw,rfw"])
    from digi2real.config import load_section

    cfg = load_section(EvalConfig, args.config, "eval", commands.overrides_from_args(args))
    assert (cfg.batch_size, cfg.folds, cfg.flip, cfg.benchmarks) == (7, 4, False, ["lfw", "rfw"])


def test_help_teaches_layout(capsys) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    for needle in ("backbone.pth", "model.pt", "lfw.bin", "IJBC/", "ijbc_template_pair_label.txt",
                   "African_test.bin", "weights_only", "examples:"):
        assert needle in text, needle


def test_rfw_summary_reproduces_paper_table7() -> None:
    s = rfw_summary({"African": 80.67, "Asian": 79.95, "Caucasian": 85.33, "Indian": 81.40})
    assert round(s["mean"], 2) == 81.84
    assert round(s["std"], 2) == 2.08 and s["ddof"] == 0  # the paper's std is the population one
    assert round(s["std_ddof1"], 2) == 2.40


def test_tables_layout_without_rfw() -> None:
    result = {"name": "mine", "verification": {"lfw": {"accuracy": 99.5}, "agedb_30": {"accuracy": 90.125}},
              "ijb": {"ijbb": {"1e-04": 60.0, "1e-05": 40.0}}, "rfw": None, "skipped": []}
    md = markdown_tables([result])
    assert "| mine | 99.50 | - | - | 90.12 | - | 60.00 | - |" in md or "| mine | 99.50 | - | - | 90.13 | - | 60.00 | - |" in md
    assert "RFW" not in md.split("Tables 5/6")[1]  # no RFW table when no model ran it
    assert "Digi2Real-20K (paper)" in md and "DigiFace-1M (paper)" in md
    assert "Digi2Real-20K (paper)" not in markdown_tables([result], paper=False)
    rows = csv_table([result]).splitlines()
    assert rows[1] == "mine,99.5000,,,90.1250,,60.0000,,,,,,,"


def test_folder_of_images_with_a_pairs_file(fixtures, tmp_path, capsys) -> None:
    """--pairs NAME=FILE scores image files listed in a pairs file exactly like the same pairs packed in a .bin."""
    images, issame = read_bin(fixtures["data"] / "lfw.bin")
    base, tmp_path = tmp_path, tmp_path / "set"  # the pairs set's folder is an input: results go beside it
    lines = []
    for i, same in enumerate(issame):
        for j in (0, 1):
            (tmp_path / "imgs" / f"{i}_{j}.png").parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "imgs" / f"{i}_{j}.png").write_bytes(images[2 * i + j])
        lines.append(f"imgs/{i}_0.png imgs/{i}_1.png {int(same)}")
    (tmp_path / "pairs.txt").write_text("# a custom set\n" + "\n".join(lines) + "\n")
    out = base / "res"
    rc = _run(["eval", str(fixtures["model"]), "--pairs", f"mine={tmp_path / 'pairs.txt'}", "-o", str(out), "-q",
               "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["verification"]) == {"mine"}
    model = load_face_model(fixtures["model"], EvalConfig(device="cpu"))
    direct = evaluate_verification(model.embed(decode_pairs(images)), issame)
    assert res["verification"]["mine"]["accuracy"] == pytest.approx(100.0 * direct.accuracy)
    assert "| r-tiny | mine |" in (out / "results.md").read_text()
    # an edited image invalidates the cache entry
    (tmp_path / "imgs" / "0_0.png").write_bytes(images[2])
    _run(["eval", str(fixtures["model"]), "--pairs", f"mine={tmp_path / 'pairs.txt'}", "-o", str(out), "-q",
          "--device", "cpu"])
    assert json.loads((out / "results.json").read_text())["embeddings_cache"] == {"mine": "computed"}
    with pytest.raises(Digi2RealError, match="expected NAME=FILE"):
        _run(["eval", str(fixtures["model"]), "--pairs", "nofile", "-o", str(out)])
    with pytest.raises(Digi2RealError, match="nothing to evaluate"):
        _run(["eval", str(fixtures["model"]), "-o", str(out)])


def _main_fails(argv: list[str], capsys) -> str:
    """`digi2real ...` must exit 2 with exactly one stderr line; returns it."""
    from digi2real.cli import main

    capsys.readouterr()
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("digi2real: error: "), (rc, err)
    return err[0]


@pytest.mark.parametrize("yaml_text, needles", [
    ("evall:\n  folds: 5\n", ["evall", "unknown key"]),  # a misspelt section silently gave the defaults
    ("eval:\n  fold: 5\n", ["eval.fold", "unknown key"]),
    ("eval:\n  ijb_far: [.nan, 2, -1]\n", ["eval.ijb_far", "finite"]),
    ("eval:\n  ijb_far: [2]\n", ["eval.ijb_far", "less than or equal to 1"]),
    ("eval:\n  folds: 5\n  folds: 6\n", ["folds"]),
])
def test_eval_config_mistakes_are_refused(fixtures, tmp_path, capsys, yaml_text, needles) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    line = _main_fails(["eval", str(fixtures["model"]), "--data-root", str(fixtures["data"]), "-o",
                        str(tmp_path / "out"), "--config", str(cfg), "-q"], capsys)
    assert str(cfg) in line or "eval." in line
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, needle", [("eval.ijb_far=[nan]", "finite"), ("eval.ijb_far=[-1]", "ijb_far"),
                                             ("eval.ijb_chunk_pairs=0", "ijb_chunk_pairs"),
                                             ("eval.folds=1", "folds"), ("eval.evall=3", "evall")])
def test_eval_set_mistakes_are_refused(fixtures, tmp_path, capsys, setting, needle) -> None:
    line = _main_fails(["eval", str(fixtures["model"]), "--data-root", str(fixtures["data"]), "-o",
                        str(tmp_path / "out"), "--set", setting, "-q"], capsys)
    assert needle in line
    assert not (tmp_path / "out").exists()


def test_eval_takes_data_root_from_the_config(fixtures, tmp_path, capsys) -> None:
    """`eval --config` reads eval.data_root as `run` does (it used to demand --data-root)."""
    from digi2real.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"eval:\n  data_root: {fixtures['data']}\n  benchmarks: [lfw]\n  device: cpu\n")
    assert main(["eval", str(fixtures["model"]), "-o", str(tmp_path / "out"), "--config", str(cfg), "-q"]) == 0
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())["verification"]) == {"lfw"}
