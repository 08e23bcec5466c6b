"""The generation runner on the miniature Arc2Face: determinism, shard and resume equivalence, the identity gate,
the manifest, the card and `regenerate` (issue 4); consecutive work units, balanced shards, the threaded engine kept
byte-identical to the in-line one, failures and interrupts that resume, `batch_size: auto` (issue 12)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digi2real.config import AlignConfig, DetectorConfig, EmbedConfig, EncoderConfig, GateConfig, GenerateConfig
from digi2real.config import PlanConfig, SelectConfig
from digi2real.dataset.imagefolder import ImageFolderDataset
from digi2real.errors import ConfigError, Digi2RealError
from digi2real.faces.arcface import ArcFaceEncoder
from digi2real.faces.mtcnn import MTCNN
from digi2real.generation.runner import (
    FaceChecker,
    ManifestWriter,
    attempt_seed,
    generate_dataset,
    prepare_job,
    read_rows,
    regenerate,
    shard_images,
    work_units,
)
from digi2real.generation.shift import RealismShift
from digi2real.identity.embed import embed_source
from digi2real.identity.plan import make_plan, write_plan
from digi2real.identity.select import select_identities, write_selection
from digi2real.identity.store import read_store
from digi2real.sharding import Shard
from digi2real.sources.procedural import ProceduralSource

from conftest import kill_when_rows

ANY_FACE = DetectorConfig(thresholds=(0.0, 0.0, 0.0))  # the miniature draws no faces: accept whatever MTCNN finds


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory, mini_arc2face) -> Path:
    """embed -> select -> plan on procedural identities with the miniature's ArcFace: 5 identities x 4 images."""
    repo, _ = mini_arc2face
    root = tmp_path_factory.mktemp("gen")
    encoder = ArcFaceEncoder.load(EncoderConfig(model=str(repo / "arcface.onnx")))
    embed_source(ProceduralSource(8, 5, seed=0), encoder, root / "emb", EmbedConfig(), progress=False)
    store = read_store(root / "emb")
    selection = select_identities(store, SelectConfig(n=5))
    write_selection(root / "ids.csv", selection)
    plan = make_plan(store, list(selection.identities), PlanConfig(images_per_identity=4, images_per_latent=2))
    write_plan(root / "plan.parquet", plan)
    return root / "plan.parquet"


@pytest.fixture(scope="module")
def encoder(mini_arc2face) -> ArcFaceEncoder:
    return ArcFaceEncoder.load(EncoderConfig(model=str(mini_arc2face[0] / "arcface.onnx")))


def _job(plan_file, model, encoder, detector_cfg=ANY_FACE, shift=None, **gen):
    # batch 6 on 5 identities x 4 images: units of rows 0-5, 6-11, 12-17, 18-19, so identities span units (and shards)
    settings = {"steps": 2, "size": 64, "batch_size": 6, **gen}
    cfg = GenerateConfig(**settings)
    align = AlignConfig(detector=detector_cfg)
    checker = FaceChecker(MTCNN.from_package(align.detector, device="cpu"), encoder, align,
                          cfg.gate.min_similarity, cfg.gate.against)
    shift_path = None
    if shift is not None:
        from digi2real.generation.shift import write_shift

        shift_path = plan_file.parent / "shift.safetensors"
        write_shift(shift_path, shift)
    job, _ = prepare_job(plan_file, None, model=model, checker=checker, cfg=cfg, align=align, shift=shift,
                         shift_path=shift_path, embeddings=None, encoder_hash=encoder.file_hash())
    return job, shift_path


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "images").rglob("*")) if p.is_file()}


def _vector_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "embeddings").glob("shard-*.safetensors"))}


def _vectors(root: Path) -> dict[str, tuple[bytes, ...]]:
    """The stored ArcFace vector (and variation measures) of every accepted image, as bytes, by key."""
    from digi2real.generation.vectors import read_vectors

    v = read_vectors(root, read_rows(root)).rows
    return {k: (v.vectors[i].tobytes(), v.landmarks[i].tobytes(), v.brightness[i].tobytes(),
                v.contrast[i].tobytes(), int(v.attempts[i])) for i, k in enumerate(v.keys)}


def _rows(root: Path) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "shard"} for r in read_rows(root)),
                  key=lambda r: (r["key"], r["attempt"]))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, plan_file, mini_generator, encoder) -> Path:
    out = tmp_path_factory.mktemp("ref") / "dataset"
    # two finishing threads here (the CPU default is in line): every other run below is compared with this one
    job, _ = _job(plan_file, mini_generator, encoder, workers=2)
    summary = generate_dataset(job, out, progress=False)
    assert summary.written == 20 and summary.rejected == 0
    return out


def test_dataset_layout_manifest_and_card(reference, encoder):
    files = _files(reference)
    assert len(files) == 20 and all(name.endswith(".png") for name in files)
    ds = ImageFolderDataset(reference)
    assert len(ds) == 20 and ds.num_classes == 5
    image, _ = ds[0]
    assert image.shape == (112, 112, 3)
    rows = _rows(reference)
    assert len(rows) == 20 and all(r["status"] == "ok" and r["final"] for r in rows)
    row = rows[0]
    for field in ("key", "identity", "seed", "t", "sample_path", "attempt_seed", "detection", "id_similarity",
                  "proto_similarity", "unit", "batch", "shift_weight"):
        assert field in row
    assert len(row["detection"]["landmarks"]) == 5 and -1 <= row["id_similarity"] <= 1
    # the gate's vectors are kept, one per accepted image, in one file for the one shard: each is the ArcFace vector
    # of the written crop (embedding the image file again gives it back)
    from digi2real.generation.vectors import read_vectors
    from digi2real.imageio import read_image

    assert sorted(p.name for p in (reference / "embeddings").iterdir()) == ["shard-00000-of-00001.safetensors"]
    stored = read_vectors(reference, read_rows(reference))
    assert len(stored.rows) == 20 and stored.rows.vectors.shape == (20, encoder.embedding_dim)
    assert stored.rows.model_sha256 == json.loads((reference / "generation.json").read_text())[
        "settings"]["arcface_sha256"]
    assert stored.paths[0] == f"{stored.rows.keys[0]}.png" and stored.identities[0] == stored.rows.keys[0].split("/")[0]
    again = encoder(np.stack([read_image(reference / "images" / p) for p in stored.paths]))
    assert np.abs(again - stored.rows.vectors).max() < 1e-5
    assert np.isfinite(stored.rows.landmarks).all() and (stored.rows.brightness > 0).all()
    record = json.loads((reference / "generation.json").read_text())
    assert record["planned_images"] == 20 and record["settings"]["generate"]["steps"] == 2
    assert record["settings"]["units"] == "consecutive-v2" and record["settings"]["generate"]["batch_size"] == 6
    assert "workers" not in record["settings"]["generate"]  # never changes pixels: not compared on resume
    # where each model ran: in generation.json (the run that started it), the shard's run record, and the card
    assert "cpu" in record["engine"]["models"]["arc2face"]
    assert "CPUExecutionProvider" in record["engine"]["models"]["arcface"]
    assert record["engine"]["models"]["mtcnn"] == "torch cpu" and record["engine"]["engine"]["workers"] == 2
    assert isinstance(record["engine"]["optimize"], dict)
    run = json.loads((reference / "manifest" / "shard-00000-of-00001.run.json").read_text())
    assert run["shard"] == "0/1" and run["models"] == record["engine"]["models"] and run["batch"] == 6
    card = (reference / "card.md").read_text()
    assert "complete: 20 of 20 planned images finished" in card and "20 accepted" in card
    assert "6 images per work unit (consecutive-v2)" in card
    assert f"where the models ran (shard 0/1): Arc2Face {run['models']['arc2face']}; ArcFace identity check " in card


def test_same_seed_same_images(tmp_path, reference, plan_file, mini_generator, encoder):
    job, _ = _job(plan_file, mini_generator, encoder)
    summary = generate_dataset(job, tmp_path / "again", progress=False)
    assert _files(tmp_path / "again") == _files(reference)
    assert _rows(tmp_path / "again") == _rows(reference)
    assert _vector_files(tmp_path / "again") == _vector_files(reference)  # the kept vectors' file, byte for byte
    lines = summary.lines()
    assert lines[1].startswith("models: Arc2Face cpu") and "batch 6 (set), finished in line" in lines[1]
    assert f"ArcFace vectors kept: 20 in {tmp_path / 'again' / 'embeddings'} (for `digi2real audit`)" in lines


def test_three_shards_make_the_same_dataset(tmp_path, reference, plan_file, mini_generator, encoder):
    out = tmp_path / "sharded"
    for i in (2, 0, 1):
        job, _ = _job(plan_file, mini_generator, encoder)
        generate_dataset(job, out, shard=Shard(i, 3), progress=False)
    assert sorted(p.name for p in (out / "manifest").iterdir()) == sorted(
        [f"shard-0000{i}-of-00003.jsonl" for i in range(3)] + [f"shard-0000{i}-of-00003.run.json" for i in range(3)])
    assert _files(out) == _files(reference)
    assert _rows(out) == _rows(reference)
    assert _vectors(out) == _vectors(reference)  # the stored vectors too, byte for byte, in three files
    assert len(list((out / "embeddings").glob("shard-*.safetensors"))) == 3
    assert not (out / "embeddings" / "parts").exists() or not list((out / "embeddings" / "parts").iterdir())
    # the second and the fifth identity span two units owned by two shards, which both wrote into their folders
    shards_of = {}
    for r in read_rows(out):
        shards_of.setdefault(r["identity"], set()).add(r["shard"])
    assert sum(len(s) > 1 for s in shards_of.values()) == 2


def test_work_units_are_consecutive_full_batches_whatever_the_identities():
    units = [u.tolist() for u in work_units(17, 6)]
    assert units == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]]
    assert [u.tolist() for u in work_units(4, 1)] == [[0], [1], [2], [3]]
    assert work_units(0, 8) == []


@pytest.mark.parametrize("per_identity, batch", [
    ([20] * 64, 16),  # the paper's shape, the issue's measurement: [256, 64, 256, 64, ...] with whole identities
    ([72] * 40, 32),
    ([5] * 300, 8),
    ([1] * 2000, 16),
    ([3, 41, 7, 19, 1, 64, 2, 33] * 40, 16),  # uneven identities
    ([20] * 1000, 32),
])
def test_shards_are_balanced_for_any_plan_shape(per_identity, batch):
    """Issue 12: the largest of 8 shards holds at most 1.10 x the mean; every unit is a full batch but the last."""
    units = work_units(sum(per_identity), batch)
    assert all(len(u) == batch for u in units[:-1]) and 0 < len(units[-1]) <= batch
    loads = shard_images(units, 8)
    assert sum(loads) == sum(per_identity)
    assert max(loads) / (sum(loads) / 8) <= 1.10, loads
    assert max(loads) - min(loads) <= batch  # at most one unit apart


def test_the_issues_measurement_of_whole_identity_units():
    """Before issue 12 a 20-image identity with batch 16 made units of 16 and 4 images: 8 shards got
    [256, 64, 256, 64, ...] on 64 identities, the figure `generate --dry-run --shard i/8` printed."""
    old_units = [np.arange(n) for _ in range(64) for n in (16, 4)]
    assert shard_images(old_units, 8) == [256, 64] * 4


def test_attempt_seeds():
    assert attempt_seed(123, 0) == 123
    assert attempt_seed(123, 1) == attempt_seed(123, 1) != attempt_seed(123, 2)
    assert 0 <= attempt_seed(2**63 - 1, 5) < 2**63


def test_shift_weight_zero_gives_the_unshifted_images(tmp_path, reference, plan_file, mini_generator, encoder):
    delta = torch.randn(77, mini_generator.hidden_size, generator=torch.Generator().manual_seed(0))
    shift = RealismShift(delta, {"kind": "test"})
    job, path = _job(plan_file, mini_generator, encoder, shift=shift, shift_weight=0.0)
    generate_dataset(job, tmp_path / "w0", progress=False, shift_path=path)
    assert _files(tmp_path / "w0") == _files(reference)
    job, path = _job(plan_file, mini_generator, encoder, shift=shift, shift_weight=1.0)
    generate_dataset(job, tmp_path / "w1", progress=False, shift_path=path)
    shifted = _files(tmp_path / "w1")
    assert shifted.keys() == _files(reference).keys() and shifted != _files(reference)
    assert {r["shift_weight"] for r in read_rows(tmp_path / "w1")} == {1.0}


def test_gate_rejects_and_retries(tmp_path, reference, plan_file, mini_generator, encoder):
    sims = sorted(r["id_similarity"] for r in read_rows(reference))
    threshold = sims[len(sims) // 2]  # about half the first attempts fall below it
    job, _ = _job(plan_file, mini_generator, encoder, gate=GateConfig(min_similarity=threshold, max_retries=2),
                  keep_raw=True)
    summary = generate_dataset(job, tmp_path / "gated", progress=False)
    rows = read_rows(tmp_path / "gated")
    first = [r for r in rows if r["attempt"] == 0]
    low = [r for r in first if r["status"] == "low_similarity"]
    assert len(first) == 20 and low
    assert all(r["id_similarity"] < threshold and not r["final"] and r["path"] is None for r in low)
    retried = {r["key"] for r in rows if r["attempt"] > 0}
    assert retried == {r["key"] for r in low}
    for r in rows:
        if r["attempt"] > 0:
            assert r["attempt_seed"] == attempt_seed(r["seed"], r["attempt"])
    finals = {r["key"]: r for r in rows if r["final"]}
    assert len(finals) == 20
    ok = [r for r in finals.values() if r["status"] == "ok"]
    assert all(r["id_similarity"] >= threshold for r in ok)
    assert summary.written == len(ok) and summary.rejected == 20 - len(ok)
    assert len(ImageFolderDataset(tmp_path / "gated")) == len(ok)
    assert len(_files(tmp_path / "gated")) == len(ok)
    from digi2real.imageio import read_image

    raws = sorted((tmp_path / "gated" / "raw").rglob("*.png"))  # keep_raw: the full generated image of each ok one
    assert len(raws) == len(ok) and all(read_image(p).shape == (64, 64, 3) for p in raws)
    assert all(r["raw_path"] and (tmp_path / "gated" / r["raw_path"]).is_file() for r in ok)
    card = (tmp_path / "gated" / "card.md").read_text()
    assert f"{len(ok)} accepted" in card and "low_similarity" in card
    # First attempts are the reference run's images: the gate only adds work for the rejected ones.
    ref = _files(reference)
    for r in ok:
        if r["attempt"] == 0:
            assert (tmp_path / "gated" / "images" / r["path"]).read_bytes() == ref[f"images/{r['path']}"]
    # In line (workers 0: each batch checked and written before the next is rendered) or overlapped on threads,
    # retries included: the same files and rows.
    job, _ = _job(plan_file, mini_generator, encoder, gate=GateConfig(min_similarity=threshold, max_retries=2),
                  keep_raw=True, workers=0, queue=1)
    generate_dataset(job, tmp_path / "in-line", progress=False)
    assert _files(tmp_path / "in-line") == _files(tmp_path / "gated")
    assert _rows(tmp_path / "in-line") == _rows(tmp_path / "gated")


def test_no_face_is_rejected_after_retries(tmp_path, plan_file, mini_generator, encoder):
    """With real detector thresholds the miniature's noise images hold no face: every image is retried, then
    recorded as rejected, and nothing is written."""
    job, _ = _job(plan_file, mini_generator, encoder, detector_cfg=DetectorConfig(), gate=GateConfig(max_retries=1))
    summary = generate_dataset(job, tmp_path / "noface", progress=False)
    rows = read_rows(tmp_path / "noface")
    finals = [r for r in rows if r["final"]]
    assert len(finals) == 20 and summary.written == sum(r["status"] == "ok" for r in finals)
    rejected = [r for r in finals if r["status"] != "ok"]
    assert len(rejected) >= 15 and all(r["status"] == "no_face" and r["attempt"] == 1 for r in rejected)
    assert all("no face found" in r["reason"] for r in rejected)


def test_resume_with_other_settings_is_refused(tmp_path, reference, plan_file, mini_generator, encoder):
    job, _ = _job(plan_file, mini_generator, encoder, steps=3)
    with pytest.raises(ConfigError, match="generate.steps was 2, now 3"):
        generate_dataset(job, reference, progress=False)
    job, _ = _job(plan_file, mini_generator, encoder, batch_size=8)  # the batch fixes the units: it changes pixels
    with pytest.raises(ConfigError, match="generate.batch_size was 6, now 8"):
        generate_dataset(job, reference, progress=False)
    job, _ = _job(plan_file, mini_generator, encoder, compile=True, channels_last=False)  # kernels: last bits
    with pytest.raises(ConfigError, match="generate.channels_last was 'auto', now False; generate.compile was "
                                          "'auto', now True"):
        generate_dataset(job, reference, progress=False)


def test_resume_with_other_workers_or_queue_is_allowed(tmp_path, reference, plan_file, mini_generator, encoder):
    """``workers`` and ``queue`` only spread the finishing work over threads: a resume may change them."""
    out = tmp_path / "dataset"
    shutil.copytree(reference, out)
    job, _ = _job(plan_file, mini_generator, encoder, workers=0, queue=5)
    summary = generate_dataset(job, out, progress=False)
    assert summary.already_done == 20 and summary.written == 0
    assert json.loads((out / "manifest" / "shard-00000-of-00001.run.json").read_text())["engine"] == {
        "workers": 0, "queue": 5}
    assert _files(out) == _files(reference)


def test_batch_size_auto_keeps_the_batch_of_the_dataset_it_resumes(tmp_path, reference, plan_file, mini_generator,
                                                                   encoder):
    """``batch_size: auto`` resolves from the machine (8 on this CPU), but a dataset started with another batch is
    resumed with its own: read when the job is prepared, or, when the dataset appeared meanwhile (another shard
    started it), when generation starts."""
    out = tmp_path / "dataset"
    shutil.copytree(reference, out)
    rows = (out / "manifest" / "shard-00000-of-00001.jsonl").read_text().splitlines(keepends=True)
    kept = [r for r in rows if json.loads(r)["unit"] != 1]  # unit 1's images are lost: they must be made again
    (out / "manifest" / "shard-00000-of-00001.jsonl").write_text("".join(kept))
    fresh, _ = _job(plan_file, mini_generator, encoder, batch_size="auto")
    assert (fresh.batch, fresh.batch_source) == (8, "auto")
    summary = generate_dataset(fresh, out, progress=False)  # prepared before the dataset existed: joins it
    assert (fresh.batch, fresh.batch_source) == (6, "recorded") and summary.written == 6
    assert _files(out) == _files(reference) and _rows(out) == _rows(reference)
    cfg = GenerateConfig(steps=2, size=64, batch_size="auto")
    job, _ = prepare_job(plan_file, out, model=mini_generator, checker=None, cfg=cfg, align=AlignConfig(),
                         shift=None, shift_path=None, embeddings=None, encoder_hash=encoder.file_hash())
    assert (job.batch, job.batch_source) == (6, "recorded")


def test_shards_starting_together_agree_on_the_batch(tmp_path, reference, plan_file, mini_generator, encoder,
                                                     monkeypatch):
    """Two shards launched together both find no dataset; the first to create ``generation.json`` wins (a hard link
    never replaces a file) and the other, whose ``batch_size: auto`` resolved to another batch on its machine, joins
    the dataset with the winner's batch instead of being refused or mixing batches."""
    import digi2real.generation.runner as runner
    from digi2real.generation.manifest import create_record

    out = tmp_path / "dataset"
    first, _ = _job(plan_file, mini_generator, encoder)  # batch 6, like the reference
    loser, _ = _job(plan_file, mini_generator, encoder, batch_size="auto")  # 8 on this CPU
    assert loser.batch == 8

    def race(out_dir, record):
        assert create_record(out_dir, {**record, "settings": first.settings})  # the other shard, a moment earlier
        return create_record(out_dir, record)

    monkeypatch.setattr(runner, "create_record", race)
    generate_dataset(loser, out, progress=False)
    assert (loser.batch, loser.batch_source) == (6, "recorded")
    assert _files(out) == _files(reference) and _rows(out) == _rows(reference)
    assert json.loads((out / "generation.json").read_text())["settings"] == first.settings


def _fail_at(monkeypatch, calls: int, exc: BaseException) -> None:
    """The runner's image writer raises ``exc`` at its ``calls``-th call (on a worker thread)."""
    import digi2real.generation.runner as runner

    real, count = runner.write_image, [0]

    def failing(path, image):
        count[0] += 1
        if count[0] == calls:
            raise exc
        return real(path, image)

    monkeypatch.setattr(runner, "write_image", failing)


def _consistent(out: Path) -> None:
    """Every image a manifest row names is there and whole; no temporary is left."""
    from digi2real.imageio import read_image

    for r in read_rows(out):
        if r["path"]:
            assert read_image(out / "images" / r["path"]).shape == (112, 112, 3)
    assert not list(out.rglob(".*.tmp"))


def test_a_failure_on_a_worker_stops_the_run_and_it_resumes_to_the_same_dataset(tmp_path, reference, plan_file,
                                                                               mini_generator, encoder, monkeypatch):
    out = tmp_path / "dataset"
    job, _ = _job(plan_file, mini_generator, encoder)
    _fail_at(monkeypatch, 8, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left on device"):
        generate_dataset(job, out, progress=False)
    assert 0 < len(read_rows(out)) < 20
    _consistent(out)
    monkeypatch.undo()
    job, _ = _job(plan_file, mini_generator, encoder)
    summary = generate_dataset(job, out, progress=False)
    assert summary.already_done == len(read_rows(out)) - summary.written
    assert _files(out) == _files(reference) and _rows(out) == _rows(reference)
    assert _vectors(out) == _vectors(reference) and _vector_files(out) == _vector_files(reference)


def test_ctrl_c_keeps_the_finished_work_and_it_resumes_to_the_same_dataset(tmp_path, reference, plan_file,
                                                                          mini_generator, encoder, monkeypatch):
    """Ctrl-C while the third batch renders, the first two being checked and written by the two workers: those two
    are finished, the interrupt stops the run, and the next run makes only the rest."""
    import threading

    out = tmp_path / "dataset"
    job, _ = _job(plan_file, mini_generator, encoder, workers=2)
    real_render, real_check, calls, checking = job.render, job.check, [0], threading.Semaphore(0)

    def check(rendered):
        checking.release()
        return real_check(rendered)

    def interrupted(task):
        calls[0] += 1
        if calls[0] == 3:
            assert checking.acquire(timeout=120) and checking.acquire(timeout=120)  # both held by the workers
            raise KeyboardInterrupt
        return real_render(task)

    monkeypatch.setattr(job, "check", check)
    monkeypatch.setattr(job, "render", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(job, out, progress=False)
    assert len(read_rows(out)) == 12  # the two units rendered before the interrupt were finished and kept
    _consistent(out)
    assert len(_vectors(out)) == 12  # their vectors are kept too (in parts, merged by the next run)
    job, _ = _job(plan_file, mini_generator, encoder)
    summary = generate_dataset(job, out, progress=False)
    assert (summary.already_done, summary.written) == (12, 8)
    assert _files(out) == _files(reference) and _rows(out) == _rows(reference)
    assert _vectors(out) == _vectors(reference) and _vector_files(out) == _vector_files(reference)


def test_dry_run_makes_nothing(tmp_path, plan_file, mini_generator, encoder):
    job, _ = _job(plan_file, mini_generator, encoder)
    lines = generate_dataset(job, tmp_path / "dry", dry_run=True)
    text = "\n".join(lines)
    assert "to make: 20" in text and "UNet evaluations: 80" in text and "s per image" in text
    assert "20 images in 4 work units of 6 (batch set)" in text and "images per shard" not in text
    lines = generate_dataset(job, tmp_path / "dry", shard=Shard(1, 3), dry_run=True)
    assert "this shard (1/3): 6 in 1 units; to make: 6" in lines[0]
    assert lines[1] == "images per shard (3 shards): [8, 6, 6]; largest / mean = 1.20"
    assert not (tmp_path / "dry").exists()


def test_manifest_writer_lock_and_torn_tail(tmp_path):
    path = tmp_path / "manifest" / "shard-00000-of-00001.jsonl"
    path.parent.mkdir()
    path.write_text('{"key": "a/0", "final": true, "status": "ok", "attempt": 0}\n{"key": "a/1", "fin')
    writer = ManifestWriter(path)
    try:
        assert path.read_text().endswith("}\n")
        with pytest.raises(Digi2RealError, match="another process"):
            ManifestWriter(path)
        writer.append([{"key": "a/1", "final": True, "status": "ok", "attempt": 0}])
    finally:
        writer.close()
    assert [r["key"] for r in read_rows(tmp_path)] == ["a/0", "a/1"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "digi2real.cli", *args]


def _run(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args[0]}: {done.stderr[-2000:]}"
    return done


def test_cli_pipeline_killed_run_resumes_to_the_identical_dataset(tmp_path, mini_arc2face, mini_generator, encoder):
    """embed -> select -> plan -> shift -> generate from the CLI; SIGKILL mid-run and start again: the same files
    and rows as an uninterrupted run; `regenerate` reproduces an image exactly."""
    from digi2real.generation.shift import read_shift
    from digi2real.imageio import read_image, write_image

    repo, base = mini_arc2face
    onnx = str(repo / "arcface.onnx")
    _run("embed", "--set", "source.kind=procedural", "--set", "source.identities=8", "--encoder", onnx,
         "-o", str(tmp_path / "emb"), "-q")
    _run("select", str(tmp_path / "emb"), "-n", "5", "-o", str(tmp_path / "ids.csv"), "-q")
    _run("plan", str(tmp_path / "emb"), "--ids", str(tmp_path / "ids.csv"), "--images", "4", "--per-latent", "2",
         "-o", str(tmp_path / "plan.parquet"))
    rng = np.random.default_rng(0)
    for i in range(6):  # stand-ins for aligned real faces (112 x 112 images are taken as aligned crops)
        write_image(tmp_path / "real" / f"{i}.png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    models = ["--arc2face", str(repo), "--base", str(base), "--encoder", onnx, "--device", "cpu"]
    shift_out = _run("shift", "--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "emb"),
                     "-o", str(tmp_path / "shift.safetensors"), *models, "-q")
    assert "realism shift" in shift_out.stdout
    shift = read_shift(tmp_path / "shift.safetensors", hidden=mini_generator.hidden_size)

    plan_file = tmp_path / "plan.parquet"
    job, _ = _job(plan_file, mini_generator, encoder, shift=None, steps=4, batch_size=4)
    job.delta = shift.delta
    job.settings["shift_sha256"] = "in-process reference"
    generate_dataset(job, tmp_path / "whole", progress=False)

    out = tmp_path / "killed"
    cmd = _cli("generate", str(plan_file), "-o", str(out), "--shift", str(tmp_path / "shift.safetensors"),
               *models, "--steps", "4", "--size", "64", "--batch-size", "4",
               "--set", "align.detector.thresholds=[0,0,0]", "-q")
    manifest = out / "manifest" / "shard-00000-of-00001.jsonl"
    kill_when_rows(cmd, manifest, 4)
    assert 4 <= manifest.read_text().count("\n") < 20
    for image in (out / "images").rglob("*.png"):  # whatever is visible is whole
        assert read_image(image).shape == (112, 112, 3)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already done" in done.stdout
    assert _files(out) == _files(tmp_path / "whole")
    assert _rows(out) == _rows(tmp_path / "whole")
    assert _vectors(out) == _vectors(tmp_path / "whole")  # SIGKILLed and resumed: the same stored vectors
    assert _vector_files(out) == _vector_files(tmp_path / "whole")  # and the same file, byte for byte
    assert {r["shift_weight"] for r in read_rows(out)} == {1.0}
    assert not list(out.rglob(".*.tmp"))
    assert "complete: 20 of 20" in (out / "card.md").read_text()

    key = _rows(out)[-1]["key"]
    again = subprocess.run(_cli("regenerate", str(out), key, "-q"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "identical to" in again.stdout, again.stdout + again.stderr[-1500:]


def test_regenerate_in_process_matches_the_file(reference, plan_file, mini_generator, encoder):
    from digi2real.imageio import read_image

    job, _ = _job(plan_file, mini_generator, encoder)
    for key in ("%s/3" % read_rows(reference)[0]["identity"], read_rows(reference)[-1]["key"]):
        crop, event = regenerate(job, key)
        ident, k = key.rsplit("/", 1)
        assert np.array_equal(crop, read_image(reference / "images" / ident / f"{k}.png"))
        assert event.final and event.attempt == 0
    with pytest.raises(Digi2RealError, match="not a key"):
        regenerate(job, "nobody/0")


def test_out_of_memory_halves_the_batch(mini_generator, monkeypatch):
    """A batch that runs out of memory is split in halves until it fits; each image keeps its own seed."""
    from digi2real.generation.runner import render

    cfg = GenerateConfig(steps=2, size=64, batch_size=4)
    emb = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    seeds = [1, 2, 3, 4]
    whole, _, batches = render(mini_generator, emb, seeds, cfg, None)
    assert batches == [4]
    real_denoise = mini_generator.denoise

    def small_memory(cond, noise, steps, guidance):
        if len(noise) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_denoise(cond, noise, steps, guidance)

    monkeypatch.setattr(mini_generator, "denoise", small_memory)
    split, finite, batches = render(mini_generator, emb, seeds, cfg, None)
    assert batches == [1, 1, 1, 1] and finite.all()
    singles = np.concatenate([mini_generator.generate(emb[i : i + 1], [s], steps=2, size=64)
                              for i, s in enumerate(seeds)])
    assert np.array_equal(split, singles)
    assert np.abs(split.astype(int) - whole).max() <= 2  # the same images up to batched rounding
    monkeypatch.setattr(mini_generator, "denoise", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not retried
        render(mini_generator, emb, seeds, cfg, None)
