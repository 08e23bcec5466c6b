"""The preflight of `digi2real run` (issue 11, section 4): every input checked before anything is made; `--dry-run`
lists every missing input with how to get it and writes nothing; a real run stops on the whole list, having created
nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from digi2real.config import DEFAULT_ARC2FACE, load_experiment
from digi2real.generation.arc2face import ARC2FACE_FILES, ARC2FACE_PATTERNS
from digi2real.layout import RunLayout
from digi2real.pipeline import STAGES, run_pipeline
from digi2real.preflight import (FETCH, MISSING, OK, WARNING, Hardware, PreflightError, _Hub, check_benchmarks,
                                 check_devices, check_model_dir, check_source, run_preflight)
from digi2real.sources.procedural import write_procedural_tree

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "digi2real-20k.yaml"
DEMO = ROOT / "configs" / "demo.yaml"
RUN_ALL = {s: "run" for s in STAGES}


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``root`` with its mode, mtime and bytes: what "writes nothing" is checked against."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (st.st_mode, st.st_mtime_ns, p.read_bytes() if p.is_file() else b"")
    return out


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "HF_HOME": str(cwd / "hf"), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "digi2real.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=environ)


class _Offline(_Hub):
    def unreachable(self) -> str | None:
        return "test: offline"


class _Online(_Hub):
    def unreachable(self) -> str | None:
        return None


@pytest.fixture
def bare(tmp_path) -> Path:
    """A working directory without data, with an empty hub cache (HF_HOME) and a file planted in it."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "notes.txt").write_text("a user's file\n")
    return tmp_path


EXPECTED = {  # each missing input of the recipe on a bare machine, and the words of its fix
    "source": "digi2real download digiface -o data/digiface",
    "encoder.model": f"hf download {DEFAULT_ARC2FACE} arcface.onnx",
    "arc2face.repo": f"hf download {DEFAULT_ARC2FACE} arc2face/config.json",
    "arc2face.base": "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 vae/config.json",
    "shift.real": "data/ffhq: not found; put real face photos there",
    "eval.data_root": "lfw.bin calfw.bin cplfw.bin agedb_30.bin cfp_fp.bin",
}


def test_dry_run_of_the_recipe_lists_every_missing_input_and_writes_nothing(bare):
    before = _tree(bare)
    done = _cli(["run", str(RECIPE), "--dry-run"], bare)
    assert done.returncode == 2, done.stderr[-2000:]
    assert _tree(bare) == before  # no runs/digi2real-20k/, nothing in the hub cache
    out, err = done.stdout, done.stderr
    for name, fix in EXPECTED.items():
        assert f"MISSING  {name}: " in out and fix in out, name
        assert f"  - {name}: " in err and fix in err, name
    for path in ("data/benchmarks/lfw.bin", "data/benchmarks/IJBC/meta/ijbc_face_tid_mid.txt",
                 "data/benchmarks/RFW/African_test.bin"):
        assert path in out  # each benchmark by file, with where it comes from
    assert "about 3.93 GB" in out and "about 0.26 GB" in out and "about 25 GB" in out  # download sizes
    assert "GPUs " in out and "disk: " in out and "free at " in out
    for stage in STAGES:
        assert f"\n  {stage:9s} run" in out
    assert "UNet evaluations: 20,000,000" in out and "400,000 images" in out and "46,890 steps" in out
    assert err.startswith("digi2real: error: ") and "the run would stop before starting" in err.splitlines()[0]
    assert "Traceback" not in err


def test_real_run_stops_on_the_whole_list_before_creating_anything(bare):
    before = _tree(bare)
    done = _cli(["run", str(RECIPE)], bare)
    assert done.returncode == 2, done.stderr[-2000:]
    assert _tree(bare) == before
    lines = done.stderr.splitlines()
    assert lines[0].startswith("digi2real: error: ") and "nothing was started or written" in lines[0]
    assert [line for line in lines[1:] if not line.startswith("  - ")] == []  # one line per missing input
    for name, fix in EXPECTED.items():
        assert any(line.startswith(f"  - {name}: ") and fix in line for line in lines), name
    assert "[embed]" not in done.stdout  # no stage started


def test_until_skips_the_checks_of_later_stages(bare):
    done = _cli(["run", str(RECIPE), "--dry-run", "--until", "select"], bare)
    assert done.returncode == 2
    assert "  - source: " in done.stderr and "encoder.model" in done.stderr
    for later in ("shift.real", "arc2face.repo", "eval.data_root", "train.precision"):
        assert later not in done.stderr


def test_demo_dry_run_is_ready_and_writes_nothing(tmp_path):
    cfg = load_experiment(DEMO, {"output_dir": str(tmp_path / "run")})
    said: list[str] = []
    assert run_pipeline(cfg, dry=True, say=said.append) == {}
    assert not (tmp_path / "run").exists()
    text = "\n".join(said)
    assert "MISSING" not in text and said[-1] == "ready: every input is there"
    assert "the miniature models trained and shipped with the package" in text and "random" not in text


def test_local_weights_are_found_and_generation_is_timed(tmp_path, mini_arc2face, mini_arcface):
    """With every input at hand (local weight directories, a DigiFace-like folder, real photos, a benchmark file)
    the dry run exits ready, counts the source, times generation on this machine, and writes nothing."""
    repo, base = mini_arc2face
    write_procedural_tree(tmp_path / "data" / "digiface", identities=5, images_per_identity=3)
    write_procedural_tree(tmp_path / "data" / "real", identities=2, images_per_identity=2)
    (tmp_path / "data" / "bench").mkdir()
    (tmp_path / "data" / "bench" / "lfw.bin").write_bytes(b"stand-in: the preflight checks presence only")
    overrides = {"output_dir": str(tmp_path / "run"), "source": {"kind": "digiface", "path": str(tmp_path / "data"
                                                                                              / "digiface")},
                 "encoder.model": str(mini_arcface), "encoder.provider": "cpu", "select.n": 3,
                 "plan.images_per_identity": 2, "plan.images_per_latent": 1, "arc2face.repo": str(repo),
                 "arc2face.base": str(base), "arc2face.device": "cpu", "arc2face.dtype": "float32",
                 "generate.size": 64, "generate.steps": 2, "generate.batch_size": 2, "shift.real": str(tmp_path / "data"
                                                                                                  / "real"),
                 "train.precision": "fp32", "train.device": "cpu", "eval.data_root": str(tmp_path / "data" / "bench"),
                 "eval.benchmarks": ["lfw", "rfw"], "eval.device": "cpu"}
    cfg = load_experiment(RECIPE, overrides)
    before = _tree(tmp_path)
    said: list[str] = []
    run_pipeline(cfg, dry=True, say=said.append)
    assert _tree(tmp_path) == before
    text = "\n".join(said)
    assert said[-1] == "ready: every input is there", text
    assert "DigiFace-1M folders, 5 identities, 15 images (15 to embed)" in text
    assert f"ok       arc2face.repo: {repo}: local directory" in text and "ok       encoder.model" in text
    assert "shift.real: " in text and "4 images (fewer than shift.images = 1000: all are used)" in text
    assert "ok       benchmark lfw" in text and "warning  benchmark rfw" in text
    assert "5 identities -> keep 3" in text
    assert "s per image on cpu (one step of a batch of 1" in text  # measured here, not a reference figure


def test_model_directory_and_hub_cache(tmp_path, mini_arc2face, monkeypatch):
    repo, _ = mini_arc2face
    broken = tmp_path / "Arc2Face"
    shutil.copytree(repo, broken)
    (broken / "encoder" / "pytorch_model.bin").unlink()
    check = check_model_dir("arc2face.repo", str(broken), DEFAULT_ARC2FACE, ARC2FACE_FILES, ARC2FACE_PATTERNS,
                            _Offline(), ("generate",))
    assert check.status == MISSING and "lacks encoder/model.safetensors" in check.detail  # (or pytorch_model.bin)
    assert f"--local-dir {broken}" in check.fix
    # The hub cache, read without downloading: a snapshot with every file, then one lacking the UNet weights.
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    snap = cache / "models--FoivosPar--Arc2Face" / "snapshots" / ("a" * 40)
    for rel in ("arc2face/config.json", "arc2face/diffusion_pytorch_model.safetensors", "encoder/config.json",
                "encoder/pytorch_model.bin"):
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).write_text("{}")
    (cache / "models--FoivosPar--Arc2Face" / "refs").mkdir()
    (cache / "models--FoivosPar--Arc2Face" / "refs" / "main").write_text("a" * 40)
    args = ("arc2face.repo", DEFAULT_ARC2FACE, DEFAULT_ARC2FACE, ARC2FACE_FILES, ARC2FACE_PATTERNS)
    assert check_model_dir(*args, _Offline(), ("generate",)).status == OK
    (snap / "arc2face" / "diffusion_pytorch_model.safetensors").unlink()
    offline = check_model_dir(*args, _Offline(), ("generate",))
    assert offline.status == MISSING and "lacks arc2face/diffusion_pytorch_model.safetensors" in offline.detail
    online = check_model_dir(*args, _Online(), ("generate",))
    assert online.status == FETCH and "about 3.93 GB" in online.fix  # fetched on first use: not blocking


def test_source_counts_and_fixes(tmp_path):
    tree = write_procedural_tree(tmp_path / "digi", identities=4, images_per_identity=6)
    cfg = load_experiment(RECIPE, {"source.path": str(tree), "embed.images_per_identity": 5})
    check, counts = check_source(cfg)
    assert check.status == OK and (counts.identities, counts.embed_images) == (4, 20)
    missing = load_experiment(RECIPE, {"source": {"kind": "folder", "path": str(tmp_path / "nowhere")}})
    check, _ = check_source(missing)
    assert check.status == MISSING and "<identity>/<image>" in check.fix
    (tmp_path / "empty").mkdir()
    empty = load_experiment(RECIPE, {"source": {"kind": "folder", "path": str(tmp_path / "empty")}})
    check, _ = check_source(empty)
    assert check.status == MISSING and "no identity folders" in check.detail  # the source's own one-line reason


def test_benchmarks_by_file(tmp_path):
    layout = RunLayout(tmp_path / "run")
    root = tmp_path / "bench"
    (root / "RFW").mkdir(parents=True)
    (root / "cfp_fp.bin").write_bytes(b"x")
    (root / "RFW" / "Asian_test.bin").write_bytes(b"x")
    cfg = load_experiment(RECIPE, {"eval.data_root": str(root)})
    checks = {c.name: c for c in check_benchmarks(cfg, layout)}
    assert checks["benchmark cfp_fp"].status == OK and checks["benchmark lfw"].status == WARNING
    assert "IJBB/meta/ijbb_template_pair_label.txt" in checks["benchmark ijbb"].detail
    assert "African_test.bin" in checks["benchmark rfw"].detail and "Asian" not in checks["benchmark rfw"].detail
    assert "eval.data_root" not in checks  # something to evaluate: eval skips the rest with warnings
    (root / "cfp_fp.bin").unlink()
    shutil.rmtree(root / "RFW")
    checks = {c.name: c for c in check_benchmarks(cfg, layout)}
    assert checks["eval.data_root"].status == MISSING and "--until train" in checks["eval.data_root"].fix


def test_settings_this_machine_cannot_run():
    hw = Hardware(gpus=(), cpus=2, torch="test", onnx_cuda=False)
    cfg = load_experiment(RECIPE, {"train.device": "cuda", "eval.precision": "fp16", "encoder.provider": "cuda"})
    assert {c.name for c in check_devices(load_experiment(RECIPE), hw, set(STAGES))} == {"train.precision"}
    names = {c.name for c in check_devices(cfg, hw, set(STAGES))}
    assert names == {"train.device", "eval.precision", "encoder.provider"}  # fp16 training is fine where cuda is
    assert {c.name for c in check_devices(cfg, hw, {"embed"})} == {"encoder.provider"}  # only the stages to run
    gpu = Hardware(gpus=("test GPU (80 GiB)",), cpus=2, torch="test", onnx_cuda=True)
    assert check_devices(cfg, gpu, set(STAGES)) == []


def test_disk_smaller_than_the_run(tmp_path, monkeypatch):
    import digi2real.preflight as preflight

    cfg = load_experiment(DEMO, {"output_dir": str(tmp_path / "a" / "b" / "run")})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    report = run_preflight(cfg, RunLayout(cfg.output_dir), RUN_ALL, "demo")
    (disk,) = [c for c in report.checks if c.name == "disk"]
    assert disk.status == MISSING and f"free at {tmp_path}" in disk.detail  # the nearest existing folder
    with pytest.raises(PreflightError, match="disk: "):
        run_pipeline(cfg, say=lambda s: None)
    assert not (tmp_path / "a").exists()


def test_done_stages_need_no_inputs(tmp_path):
    cfg = load_experiment(RECIPE, {"output_dir": str(tmp_path / "run")})
    statuses = {**{s: "skip" for s in STAGES}, "report": "run"}
    report = run_preflight(cfg, RunLayout(cfg.output_dir), statuses, "recipe")
    assert report.missing == []


def test_gpu_forecast_of_the_recipe_from_the_h200_figures():
    """Without the weights cached, a GPU machine's forecast of the recipe's generation and training comes from the
    figures measured on an H200 (5.52 images/s render + alignment; 5,700 images/s training): 400,000 images in about
    20 h on one, 2.5 h on 8; 30 epochs in about 0.6 h."""
    from digi2real.preflight import Counts, StageForecast, forecast_lines

    cfg = load_experiment(RECIPE)
    gpu = Hardware(gpus=("NVIDIA H200 (140 GiB)",), cpus=16, torch="test", onnx_cuda=False)
    f = StageForecast(Counts(planned=400_000), gpu, flop=12.6e9, params=0)
    text = "\n".join(forecast_lines(cfg, {"generate": "run", "train": "run"}, f))
    assert "about 20.1 h on one H200" in text and "2.5 h on 8" in text
    assert "36 min on one H200" in text or "35 min on one H200" in text
    f32 = load_experiment(RECIPE, {"train.precision": "fp32", "generate.steps": 50})
    text = "\n".join(forecast_lines(f32, {"generate": "run", "train": "run"}, f))
    assert "about 40.3 h on one H200" in text  # twice the steps
    assert "1.7 h on one H200" in text  # fp32 ran the step at 2,007 against 5,788 images/s
