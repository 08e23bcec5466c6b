"""`digi2real run` on the built-in miniature: end to end, re-runs that do no work, a changed setting that re-runs
only its stage and those after it, and a kill mid-generation that resumes to the same dataset (issue 7)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digi2real.config import load_experiment
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.layout import RunLayout
from digi2real.pipeline import STAGES, fingerprints, run_pipeline, select_stages

from conftest import kill_when_rows

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SMALL = """\
extends: {demo}
name: pipeline-test
output_dir: {out}
source: {{identities: 14}}
select: {{n: 6}}
plan: {{images_per_identity: 4, images_per_latent: 2}}
generate: {{batch_size: 8, steps: 4}}
train: {{epochs: 1, batch_size: 12, log_every: 2}}
report: {{identities: 3, samples: 4, pairs: 200, training_identities: 100}}
"""


def _config(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SMALL.format(demo=DEMO, out=tmp / name))
    return path


def _images(run: Path) -> dict[str, bytes]:
    root = run / "dataset" / "images"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg_path = _config(tmp, "run1")
    outcome = run_pipeline(load_experiment(cfg_path), progress=False, say=lambda s: None)
    return cfg_path, outcome


def test_end_to_end(first_run):
    cfg_path, outcome = first_run
    assert outcome == {stage: "ran" for stage in STAGES}
    layout = RunLayout(load_experiment(cfg_path).output_dir)
    assert len(_images(layout.root)) == 24
    assert (layout.dataset / "card.md").is_file() and (layout.packed / "train.rec").is_file()
    assert (layout.train / "model.pt").is_file()
    results = json.loads((layout.eval / "results.json").read_text())
    assert "procedural" in json.dumps(results)
    assert layout.report.is_file() and layout.report.stat().st_size > 10_000
    state = json.loads(layout.state.read_text())["stages"]
    assert all(state[s]["complete"] for s in STAGES)
    assert layout.shift.is_file()  # the demo's real side: real-style photographs
    # the audit ran on the kept vectors against the shift's real photos and the held-out benchmark people, and its
    # section is in the report
    audit = json.loads((layout.audit / "audit.json").read_text())
    assert [r["name"] for r in audit["references"]] == ["real", "procedural"]
    assert audit["datasets"][0]["images"] == 24 and audit["datasets"][0]["note"].startswith("vectors stored")
    assert audit["threshold"]["calibrated_on"] == "real" and audit["threshold"]["far"] == 1e-4
    page = layout.report.read_text()
    assert "9. Audit" in page and "Contamination" in page and "audit stage has not run" not in page


def test_rerun_does_no_work(first_run):
    cfg_path, _ = first_run
    run = load_experiment(cfg_path).output_dir
    before = {p: p.stat().st_mtime_ns for p in (run / "dataset" / "images").rglob("*.png")}
    said: list[str] = []
    outcome = run_pipeline(load_experiment(cfg_path), progress=False, say=said.append)
    assert outcome == {stage: "skipped" for stage in STAGES}
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_changed_generation_setting_reruns_generation_and_after_only(first_run, tmp_path):
    cfg_path, _ = first_run
    src = load_experiment(cfg_path).output_dir
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    cfg = load_experiment(cfg_path, {"output_dir": str(dst), "generate.steps": 3})
    outcome = run_pipeline(cfg, progress=False, say=lambda s: None)
    assert outcome == {"embed": "skipped", "select": "skipped", "plan": "skipped", "shift": "skipped",
                       "generate": "ran", "audit": "ran", "pack": "ran", "train": "ran", "eval": "ran",
                       "report": "ran"}
    stale = list((dst / "stale").iterdir())
    assert sorted(p.name.split("-")[0] for p in stale) == ["audit", "eval", "generate", "pack", "report", "train"]
    new_rows = [json.loads(line) for f in (dst / "dataset" / "manifest").glob("*.jsonl") for line in f.open()]
    assert len(new_rows) == 24
    assert _images(dst) != _images(src)  # 3 steps instead of 4: other pixels, none of the old files mixed in
    assert json.loads((dst / "dataset" / "generation.json").read_text())["settings"]["generate"]["steps"] == 3


def test_fingerprints_flow_downstream():
    base = load_experiment(DEMO)
    a = fingerprints(base)
    b = fingerprints(load_experiment(DEMO, {"plan.alpha": 1.0}))
    assert [s for s in STAGES if a[s] != b[s]] == ["plan", "generate", "audit", "pack", "train", "eval", "report"]
    c = fingerprints(load_experiment(DEMO, {"train.epochs": 2}))
    assert [s for s in STAGES if a[s] != c[s]] == ["train", "eval", "report"]


def test_stage_selection_and_bad_names():
    assert select_stages("generate", "train") == ["generate", "audit", "pack", "train"]
    with pytest.raises(Digi2RealError, match="not a stage"):
        select_stages("generation", None)
    with pytest.raises(Digi2RealError, match="comes after"):
        select_stages("eval", "plan")


def test_from_a_stage_whose_inputs_are_missing(tmp_path):
    cfg = load_experiment(_config(tmp_path, "fresh"))
    with pytest.raises(Digi2RealError, match="needs"):
        run_pipeline(cfg, start="generate", progress=False, say=lambda s: None)


def test_ablation_overlays_load():
    configs = sorted((DEMO.parent / "ablations").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        cfg = load_experiment(path)
        assert cfg.name == path.stem and cfg.generate.steps == 25
    assert load_experiment(DEMO.parent / "ablations" / "t2-alpha-1.yaml").plan.alpha == 1.0


def test_extends_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_experiment(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "c.yaml")


def test_killed_run_resumes_to_the_same_dataset(first_run, tmp_path):
    cfg_path, _ = first_run
    reference = _images(load_experiment(cfg_path).output_dir)
    cfg = _config(tmp_path, "killed")
    cmd = [sys.executable, "-m", "digi2real.cli", "run", str(cfg), "-q"]
    manifest = tmp_path / "killed" / "dataset" / "manifest" / "shard-00000-of-00001.jsonl"
    kill_when_rows(cmd, manifest, 8)
    assert manifest.read_text().count("\n") < 24
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[embed] up to date, skipped" in done.stdout and "[generate] resuming" in done.stdout
    assert _images(tmp_path / "killed") == reference


def test_torchrun_two_processes_make_the_same_dataset(first_run, tmp_path):
    """`torchrun -m digi2real.cli run` with 2 processes: rank 0 runs the single-process stages, both generate their
    shard (the same images as one process) and train together with DDP (gloo on CPU)."""
    cfg_path, _ = first_run
    reference = _images(load_experiment(cfg_path).output_dir)
    cfg = _config(tmp_path, "ddp")
    import torch

    # CPU kernels round differently with another thread count (torchrun's default is 1 per process): same as here.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "digi2real.cli", "run", str(cfg), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-2500:]
    run = tmp_path / "ddp"
    assert sorted(p.name for p in (run / "dataset" / "manifest").glob("*.jsonl")) == [
        "shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    assert _images(run) == reference
    start = json.loads((run / "train" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["world"] == 2
    assert (run / "report.html").is_file()
    state = json.loads((run / "pipeline.json").read_text())["stages"]
    assert all(state[s]["complete"] for s in STAGES)
    # Launched again, every rank follows rank 0's decision: nothing to do.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == len(STAGES), again.stderr[-1500:]


# ------------------------------------------------------------------------------------------------ issue 11


@pytest.mark.parametrize("content", [b"not json {", b"[1, 2]", b'{"stages": 5}', b'{"stages": {"embed": [1]}}',
                                     b'{"stages": {"embed": {"complete": "yes"}}}', b"\xff\xfe\x00binary"])
def test_corrupt_pipeline_json_is_one_line(tmp_path, capsys, content):
    from digi2real.cli import main

    cfg = _config(tmp_path, "corrupt")
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "pipeline.json").write_bytes(content)
    for args in (["run", str(cfg), "-q"], ["run", str(cfg), "--dry-run"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pipeline.json: corrupt" in err[0] and "delete it to redo every stage" in err[0]
        assert sorted(p.name for p in run.iterdir()) == ["pipeline.json"]  # nothing else made
        assert (run / "pipeline.json").read_bytes() == content


def test_slurm_rank_without_rank_0_gives_up(tmp_path):
    """Issue 11: `SLURM_PROCID=1 SLURM_NTASKS=2 digi2real run` alone waited forever, printing nothing."""
    cfg = _config(tmp_path, "alone")
    env = {**os.environ, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242"}
    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "digi2real.cli", "run", str(cfg), "-q", "--start-timeout", "2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "[rank 1] waiting for rank 0 to start this launch" in done.stdout
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "pipeline.json: rank 0 of this launch did not start within 2 s" in err[0], err
    assert not (tmp_path / "alone").exists()  # the waiting rank writes nothing


def _fake_rank_0(path: Path, session: str, stop, interval: float, exit_error: str | None = None):
    """A rank 0 seen only through its heartbeat: it beats until ``stop`` is set, then falls silent (killed) or writes
    its exit record."""
    import threading

    from digi2real.fileio import write_json

    def run() -> None:
        beat = 0
        while not stop.is_set():
            write_json(path, {"session": session, "beat": beat, "state": "running", "pid": 1, "host": "h"})
            beat += 1
            stop.wait(interval)
        if exit_error is not None:
            write_json(path, {"session": session, "beat": beat, "state": "exited", "error": exit_error})
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("exit_error", [None, "boom: something failed"])
def test_waiting_rank_gives_up_when_rank_0_dies(tmp_path, monkeypatch, exit_error):
    """A rank > 0 whose rank 0 started and then died (no heartbeat for --wait-timeout) or exited with an error gives
    up with one line naming pipeline.json and what it waited for."""
    import threading

    from digi2real.pipeline import process_rank

    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_experiment(_config(tmp_path, "dies"))
    layout = RunLayout(cfg.output_dir)
    _, _, session = process_rank()
    stop = threading.Event()
    thread = _fake_rank_0(layout.heartbeat(0), session, stop, interval=0.2, exit_error=exit_error)
    said: list[str] = []
    stopped_at: list[float] = []

    def say(text: str) -> None:
        said.append(text)
        if "miniature models" in text and not stop.is_set():  # rank 1 follows it: now rank 0 dies
            stopped_at.append(time.monotonic())
            stop.set()

    with pytest.raises(Digi2RealError) as info:
        run_pipeline(cfg, progress=False, say=say, start_timeout=60, wait_timeout=2)
    stop.set()
    thread.join()
    message = str(info.value)
    assert message.startswith(f"{layout.state}: ") and "\n" not in message
    assert "rank 0 to build the miniature models" in message
    if exit_error is None:
        assert "rank 0 gave no sign of life for 2 s" in message and "--wait-timeout" in message
    else:
        assert f"rank 0 exited ({exit_error})" in message
    assert stopped_at and time.monotonic() - stopped_at[0] < 10


def test_rank_0_gives_up_on_a_shard_that_never_starts(tmp_path):
    from digi2real.liveness import Waiter, Watch

    watch = Watch(tmp_path / "heartbeats" / "rank-1.json", "s#0")
    said: list[str] = []
    waiter = Waiter({"rank 1": watch}, "rank 0", tmp_path / "dataset" / "manifest", 1.0, 60.0, said.append)
    with pytest.raises(Digi2RealError, match=r"manifest: rank 1 of this launch did not start within 1 s"):
        waiter.until(lambda: None, "the other 1 processes' shards", poll=0.1)
    assert said and "waiting for the other 1 processes' shards" in said[0]


def _dead_pid() -> tuple[int, str]:
    """The pid of a process that has exited, and the temporary-name prefix it used for pipeline.json."""
    done = subprocess.run([sys.executable, "-c", "import os; from digi2real.fileio import temporary_prefix as t; "
                           "print(t('X'))"], capture_output=True, text=True, check=True)
    prefix = done.stdout.strip()
    return int(prefix.split("~")[2]), prefix


def test_run_cleans_temporaries_a_killed_run_left(first_run, tmp_path):
    """Issue 11, section 3: `.pipeline.json.*.tmp` and friends left by a SIGKILL disappear on the next run; a live
    writer's temporary and a dry run leave everything as it is."""
    cfg_path, _ = first_run
    run = tmp_path / "copy"
    shutil.copytree(load_experiment(cfg_path).output_dir, run)
    _, dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import os, sys, time; from digi2real.fileio import "
                             "temporary_prefix as t; print(t('X'), flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        alive = live.stdout.readline().strip()
        names = ["pipeline.json", "config.yaml", "ids.csv", "plan.parquet", "shift.safetensors", "report.html"]
        stale = [run / (dead.replace(".X.", f".{n}.", 1) + "abcd.tmp") for n in names]
        kept = run / (alive.replace(".X.", ".pipeline.json.", 1) + "efgh.tmp")
        for p in [*stale, kept]:
            p.write_text("half-written")
        cfg = load_experiment(cfg_path, {"output_dir": str(run)})
        run_pipeline(cfg, dry=True, say=lambda s: None)
        assert all(p.exists() for p in stale)  # a dry run writes and deletes nothing
        said: list[str] = []
        outcome = run_pipeline(cfg, progress=False, say=said.append)
        assert outcome == {stage: "skipped" for stage in STAGES}
        assert not any(p.exists() for p in stale) and kept.exists()
        assert any(f"removed {len(stale)} temporary file(s)" in s for s in said)
    finally:
        live.kill()
        live.wait()
