"""`generate`, `regenerate`, `shift` and `plan` given hostile or careless input (issue 11, sections 2 and 3).

Every refusal is checked as a user sees it: exit status 2, one stderr line naming the file or setting and the fix,
and every input and earlier output byte-identical afterwards (nothing created, nothing lost). The commands run in
process through ``digi2real.cli.main`` on the miniature models, so each case costs a fraction of a second.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from digi2real.cli import main
from digi2real.config import PlanConfig
from digi2real.fileio import temporary_prefix
from digi2real.generation.shift import RealismShift, write_shift
from digi2real.identity.plan import PLAN_SCHEMA, Plan, make_plan, write_plan
from digi2real.identity.store import read_store, write_store
from digi2real.imageio import write_image

IDENTITIES = ("a", "b")
SAMPLES = 3
FAST = ["--steps", "1", "--size", "64", "-q", "--set", "align.detector.thresholds=[0,0,0]"]


def _unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, 512)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _store(folder: Path, identities: tuple[str, ...] = IDENTITIES, seed: int = 0) -> Path:
    labels = [i for i in identities for _ in range(SAMPLES)]
    paths = [f"{i}/{k}.png" for i in identities for k in range(SAMPLES)]
    write_store(folder, _unit_rows(len(labels), seed), labels, paths, {"stage": "embed"})
    return folder


def _models(mini_arc2face) -> list[str]:
    repo, base = mini_arc2face
    return ["--arc2face", str(repo), "--base", str(base), "--encoder", str(repo / "arcface.onnx"), "--device", "cpu"]


def _run(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``roots``: any change, creation or removal shows."""
    seen: dict[str, bytes | None] = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            seen[str(path)] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return seen


def _refused(capsys, roots: list[Path], args: list, match: str) -> str:
    """Run the CLI; assert exit 2, one stderr line matching ``match``, and nothing under ``roots`` changed."""
    before = _snapshot(*roots)
    code, _, err = _run(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("digi2real: error: "), err[-2000:]
    assert re.search(match, lines[0]), lines[0]
    assert _snapshot(*roots) == before
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory, mini_arc2face, mini_generator) -> Path:
    """An embeddings store, ids.csv, a plan (2 identities x 2 images), a realism shift, and a finished dataset."""
    root = tmp_path_factory.mktemp("made")
    _store(root / "emb")
    (root / "ids.csv").write_text("identity\na\nb\n")
    assert main(["plan", str(root / "emb"), "--ids", str(root / "ids.csv"), "--images", "2", "--per-latent", "1",
                 "-o", str(root / "plan.parquet")]) == 0
    delta = torch.randn(77, mini_generator.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.01
    write_shift(root / "shift.safetensors", RealismShift(delta, {"kind": "test"}))
    assert main(["generate", str(root / "plan.parquet"), "-o", str(root / "dataset"), "--shift",
                 str(root / "shift.safetensors"), *_models(mini_arc2face), *FAST]) == 0
    assert len(list((root / "dataset" / "images").rglob("*.png"))) == 4
    return root


def _generate(made: Path, mini_arc2face, output: Path, *extra) -> list:
    return ["generate", made / "plan.parquet", "-o", output, "--shift", made / "shift.safetensors",
            *_models(mini_arc2face), *FAST, *extra]


# ------------------------------------------------------------------------------------- paths built from data


def _hostile_plan(folder: Path, name: str) -> Path:
    """A plan written by hand whose identity is ``name`` (`plan` itself refuses such names)."""
    emb = _store(folder / "emb", identities=(name,))
    rows = {"key": [f"{name}/{k}" for k in range(2)], "identity": [name] * 2, "image_index": [0, 1],
            "latent_index": [0, 1], "sample_row": [0, 1], "sample_path": ["x.png"] * 2, "t": [0.5, 0.5],
            "seed": [1, 2]}
    meta = {"embeddings": str(emb), "embeddings_sha256": read_store(emb).meta["embeddings_sha256"]}
    write_plan(folder / "plan.parquet", Plan(pa.table(rows, schema=PLAN_SCHEMA), meta))
    return folder / "plan.parquet"


@pytest.mark.parametrize("name", ["../../X", "..", "a\\b", "a\nb"])
def test_identity_name_leading_outside_is_refused_before_anything_is_written(tmp_path, capsys, mini_arc2face,
                                                                           name):
    work = tmp_path / "work"
    plan = _hostile_plan(work, name)
    out = work / "runs" / "dataset"
    _refused(capsys, [tmp_path], ["generate", plan, "-o", out, *_models(mini_arc2face), *FAST],
             rf"{re.escape(str(plan))}: .*rename it")
    assert not out.exists() and not list(tmp_path.rglob("*.png"))


def test_plan_refuses_an_identity_name_that_is_not_one_folder(tmp_path, capsys):
    emb = _store(tmp_path / "emb", identities=("../../X", "b"))
    (tmp_path / "ids.csv").write_text("identity\n../../X\nb\n")
    _refused(capsys, [tmp_path], ["plan", emb, "--ids", tmp_path / "ids.csv", "-o", tmp_path / "plan.parquet"],
             r"index.parquet: identity name '../../X' contains '/'.*rename it")


# ------------------------------------------------------------------------------------------ generate: outputs


@pytest.mark.parametrize("where", ["embeddings", "inside embeddings", "plan file", "plan folder", "shift file"])
def test_generate_output_overlapping_an_input_is_refused(capsys, made, mini_arc2face, where):
    out = {"embeddings": made / "emb", "inside embeddings": made / "emb" / "dataset",
           "plan file": made / "plan.parquet", "plan folder": made, "shift file": made / "shift.safetensors"}[where]
    _refused(capsys, [made], _generate(made, mini_arc2face, out), r"-o .*: the output (is the input itself|lies "
             r"inside the input|holds the input).*choose an output folder outside it")


def test_generate_output_naming_a_file_or_a_foreign_folder_is_refused(tmp_path, capsys, made, mini_arc2face):
    (tmp_path / "notes.txt").write_text("mine")
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, tmp_path / "notes.txt"),
             r"notes.txt: is a file, not a dataset folder; choose a new folder")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "card.md").write_text("my own card")
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, tmp_path / "photos"),
             r"photos: an existing folder that is not a digi2real dataset \(it holds 'card.md', and no "
             r"generation.json\); choose a new")


def test_generate_into_a_read_only_folder_is_one_line(tmp_path, capsys, made, mini_arc2face, monkeypatch):
    """The tests run as root, where permissions do not bite: the file system's refusal is simulated at the one
    place every file is created (a temporary beside it), as a read-only mount refuses it."""
    out = tmp_path / "readonly"
    out.mkdir()
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(out):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, out),
             r"readonly: Read-only file system; the file system is read-only; choose an output folder")


# ------------------------------------------------------------------------------------------- generate: inputs


def _plan_variant(made: Path, folder: Path, kind: str) -> Path:
    """The module's plan, damaged in one way."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.parquet"
    table = pq.read_table(made / "plan.parquet")
    column = table.schema.get_field_index
    if kind == "garbage":
        path.write_bytes(b"PAR1 this is not parquet PAR1")
        return path
    if kind == "no seed column":
        table = table.drop_columns(["seed"])
    elif kind == "negative seed":
        table = table.set_column(column("seed"), "seed", pa.array([-1] * table.num_rows, pa.int64()))
    elif kind == "key not identity/index":
        keys = table.column("key").to_pylist()
        keys[1] = "a/../../b"
        table = table.set_column(column("key"), "key", pa.array(keys))
    elif kind == "sample row beyond the store":
        table = table.set_column(column("sample_row"), "sample_row", pa.array([10**6] * table.num_rows, pa.int64()))
    elif kind == "metadata not JSON":
        table = table.replace_schema_metadata({b"digi2real": b"\xff\x00 not json"})
    elif kind == "no rows":
        table = table.slice(0, 0)
    elif kind == "text seeds":
        table = table.set_column(column("seed"), "seed", pa.array(["x"] * table.num_rows))
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("kind, match", [
    ("garbage", r"not a readable plan .*re-create it with `digi2real plan`"),
    ("no seed column", r"not a digi2real plan \(no column seed\)"),
    ("negative seed", r"row 0 has seed -1, not in \[0, "),
    ("key not identity/index", r"row 1 has key 'a/../../b', not '<identity>/<image_index>'"),
    ("sample row beyond the store", r"does not match these embeddings; pass the embeddings the plan was made from"),
    ("metadata not JSON", r"its metadata is not JSON; re-create it"),
    ("no rows", r"the plan holds no rows"),
    ("text seeds", r"a column has the wrong type"),
])
def test_generate_refuses_a_damaged_plan(tmp_path, capsys, made, mini_arc2face, kind, match):
    plan = _plan_variant(made, tmp_path / "in", kind)
    args = ["generate", plan, "-o", tmp_path / "out", "--embeddings", made / "emb", *_models(mini_arc2face), *FAST]
    _refused(capsys, [tmp_path, made], args, match)


@pytest.mark.parametrize("kind, match", [
    ("garbage", r"bad.safetensors: not a safetensors realism shift .*digi2real shift"),
    ("nan", r"bad.safetensors: delta holds NaN or infinite values"),
    ("wrong tokens", r"bad.safetensors: delta has shape \(10, 8\), expected 77 x hidden"),
    ("wrong width", r"bad.safetensors: the shift has shape \(77, 8\), this Arc2Face's conditioning is 77 x \d+"),
])
def test_generate_refuses_a_damaged_shift(tmp_path, capsys, made, mini_arc2face, mini_generator, kind, match):
    bad = tmp_path / "bad.safetensors"
    if kind == "garbage":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    else:
        nan = torch.zeros(77, mini_generator.hidden_size)
        nan[3, 5] = float("nan")
        delta = {"nan": nan, "wrong tokens": torch.zeros(10, 8),
                 "wrong width": torch.zeros(77, 8)}[kind]
        write_shift(bad, RealismShift(delta, {}))
    args = ["generate", made / "plan.parquet", "-o", tmp_path / "out", "--shift", bad, *_models(mini_arc2face), *FAST]
    _refused(capsys, [tmp_path, made], args, match)


@pytest.mark.parametrize("flags, match", [
    (["--shift-weight", "nan"], r"shift_weight.*finite"),
    (["--batch-size", "0"], r"batch_size"),
    (["--steps", "0"], r"steps"),
    (["--shard", "x"], r"--shard 'x': expected INDEX/COUNT"),
    (["--shard", "3/2"], r"--shard '3/2': need 0 <= INDEX < COUNT"),
    (["--shard", "0/0"], r"--shard '0/0': need 0 <= INDEX < COUNT"),
    (["--dtype", "fp16"], r"float16 needs CUDA"),
])
def test_generate_refuses_bad_settings_before_writing(tmp_path, capsys, made, mini_arc2face, flags, match):
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, tmp_path / "out", *flags), match)


def test_generate_names_embeddings_that_are_missing(tmp_path, capsys, made, mini_arc2face):
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, tmp_path / "out", "--embeddings",
                                                 tmp_path / "nowhere"),
             r"--embeddings .*nowhere: directory not found; pass the embeddings directory the plan was made from")


# --------------------------------------------------------------------------- state files of an earlier dataset


@pytest.mark.parametrize("content, match", [
    (b"[1, 2]", r"generation.json: corrupt \(a JSON list, not an object\); it records how this dataset was made"),
    (b'{"settings": 3}', r"generation.json: corrupt \('settings' missing or of the wrong type\)"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", r"generation.json: corrupt \(.*\); it records how this dataset was made"),
])
def test_corrupt_generation_json_is_one_line(tmp_path, capsys, made, mini_arc2face, content, match):
    dataset = tmp_path / "dataset"
    shutil.copytree(made / "dataset", dataset)
    (dataset / "generation.json").write_bytes(content)
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, dataset), match)
    _refused(capsys, [tmp_path, made], ["regenerate", dataset, "a/0", "-q"], match)


@pytest.mark.parametrize("line, match", [
    (b"[1, 2]", r"shard-00000-of-00001.jsonl:1: not a manifest row \(a JSON list, not an object\)"),
    (b'{"key": "a/0"}', r"shard-00000-of-00001.jsonl:1: not a manifest row \('final' missing"),
    (b'{"key": "a/0", "final": true, "status": "ok", "attempt": 0, "detection": 5}',
     r"not a manifest row \('detection' of the wrong type\)"),
    (b"\xff\xfe\x00binary", r"shard-00000-of-00001.jsonl: not text"),
])
def test_corrupt_manifest_row_is_one_line(tmp_path, capsys, made, mini_arc2face, line, match):
    from digi2real.dataset.card import write_card
    from digi2real.errors import Digi2RealError

    dataset = tmp_path / "dataset"
    shutil.copytree(made / "dataset", dataset)
    manifest = dataset / "manifest" / "shard-00000-of-00001.jsonl"
    manifest.write_bytes(line + b"\n" + manifest.read_bytes())
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, dataset), match)
    with pytest.raises(Digi2RealError, match=match):
        write_card(dataset)


# ------------------------------------------------------------------------------------------------- regenerate


def test_regenerate_refusals(tmp_path, capsys, made):
    dataset = made / "dataset"
    roots = [tmp_path, made]
    _refused(capsys, roots, ["regenerate", dataset, "nobody/0", "-q"],
             r"'nobody/0' is not a key of the plan .*plan.parquet; keys look like 'a/0'")
    _refused(capsys, roots, ["regenerate", dataset, "../a/0", "-q"], r"not a key of the plan")
    _refused(capsys, roots, ["regenerate", tmp_path, "a/0", "-q"],
             r"generation.json: not found; is .* a dataset written by `digi2real generate`\?")
    stored = dataset / "images" / "a" / "0.png"
    _refused(capsys, roots, ["regenerate", dataset, "a/0", "-o", stored, "-q"],
             r"-o .*0.png: the output lies inside the input .*dataset")
    _refused(capsys, roots, ["regenerate", dataset, "a/0", "-o", tmp_path, "-q"], r"-o .*: is a folder; name the image")


def test_regenerate_with_its_plan_gone_says_so(tmp_path, capsys, made):
    dataset = tmp_path / "dataset"
    shutil.copytree(made / "dataset", dataset)
    record = json.loads((dataset / "generation.json").read_text())
    record["plan"] = str(tmp_path / "moved" / "plan.parquet")
    (dataset / "generation.json").write_text(json.dumps(record))
    _refused(capsys, [tmp_path, made], ["regenerate", dataset, "a/0", "-q"],
             r"generation.json: records the plan .*moved/plan.parquet, which is not there any more; restore it")


# ------------------------------------------------------------------------------------------------------ shift


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_shift_skips_and_counts_a_decompression_bomb(tmp_path, capsys, made, mini_arc2face):
    real = tmp_path / "real"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(real / f"{i}.png", rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    _png_declaring(real / "bomb.png", 30000, 30000)
    code, out, err = _run(capsys, "shift", "--real", real, "--synthetic", made / "emb", "-o",
                          tmp_path / "shift.safetensors", *_models(mini_arc2face), "-q")
    assert code == 0, err[-2000:]
    assert "real: 3 images" in out and "1 skipped (bad_image 1)" in out
    only_bombs = tmp_path / "bombs"
    _png_declaring(only_bombs / "a.png", 30000, 30000)
    _png_declaring(only_bombs / "b.png", 20000, 40000)
    _refused(capsys, [tmp_path, made], ["shift", "--real", only_bombs, "--synthetic", made / "emb", "-o",
                                        tmp_path / "other.safetensors", *_models(mini_arc2face), "-q"],
             r"bombs: none of the 2 images gave a face \(e.g. .*a.png: the image declares .* pixels")


def test_shift_refuses_outputs_on_its_inputs_and_missing_sides(tmp_path, capsys, made, mini_arc2face):
    real = tmp_path / "real"
    write_image(real / "0.png", np.zeros((112, 112, 3), np.uint8))
    roots = [tmp_path, made]
    models = _models(mini_arc2face)
    syn = made / "emb"
    _refused(capsys, roots, ["shift", "--real", real, "--synthetic", syn, "-o", real / "shift.safetensors", *models],
             r"-o .*shift.safetensors: the output lies inside the input .*real")
    _refused(capsys, roots, ["shift", "--real", real, "--synthetic", syn, "-o", syn, *models],
             r"the output is the input itself")
    _refused(capsys, roots, ["shift", "--real", real, "--synthetic", syn, "-o", tmp_path, *models],
             r"the output holds the input")
    (tmp_path / "out").mkdir()
    _refused(capsys, roots, ["shift", "--real", real, "--synthetic", syn, "-o", tmp_path / "out", *models],
             r"-o .*out: .*out is a folder; name the file to write")
    _refused(capsys, roots, ["shift", "--real", tmp_path / "nowhere", "--synthetic", syn, "-o",
                             tmp_path / "s.safetensors", *models], r"--real .*nowhere: folder not found")


# ------------------------------------------------------------------------------- temporaries of killed writers


def test_generate_removes_dead_writers_temporaries_and_keeps_live_ones(tmp_path, capsys, made, mini_arc2face):
    """A SIGKILL between writing a temporary and renaming it leaves ``.generation.json.*.tmp`` / ``.card.md.*.tmp``
    in the dataset root (or an image's in its identity folder): the next run removes those, and never the
    temporaries of a process that is still writing (another shard)."""
    dataset = tmp_path / "dataset"
    shutil.copytree(made / "dataset", dataset)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        def planted(folder: Path, name: str, pid: int) -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / (temporary_prefix(name).replace(f"~{os.getpid()}~", f"~{pid}~") + "x1y2.tmp")
            path.write_bytes(b"half written")
            return path

        gone = [planted(dataset, "generation.json", dead.pid), planted(dataset, "card.md", dead.pid),
                planted(dataset / "images" / "a", "1.png", dead.pid), planted(dataset / "raw" / "b", "0.png", dead.pid)]
        kept = [planted(dataset, "card.md", live.pid), planted(dataset / "images" / "b", "1.png", live.pid)]
        code, out, err = _run(capsys, *_generate(made, mini_arc2face, dataset))
        assert code == 0, err[-2000:]
        assert "4 of this shard's 4 were already done" in out
        assert not [p for p in gone if p.exists()]
        assert all(p.read_bytes() == b"half written" for p in kept)
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------------- the plan's embeddings path


def test_generate_finds_the_plans_embeddings_from_another_directory(tmp_path, capsys, mini_arc2face, monkeypatch):
    """`plan` run with relative paths in one folder, `generate` in another: the plan's embeddings are found relative
    to the plan file; when they are truly gone, the error names --embeddings."""
    _store(tmp_path / "emb")
    (tmp_path / "ids.csv").write_text("identity\na\nb\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "plan", "emb", "--ids", "ids.csv", "--images", "2", "--per-latent", "1",
                        "-o", "runs/x/plan.parquet")
    assert code == 0, err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = tmp_path / "runs" / "x" / "plan.parquet"
    code, out, err = _run(capsys, "generate", plan, "-o", "dataset", "--dry-run", *_models(mini_arc2face), *FAST)
    assert code == 0, err[-2000:]
    assert "to make: 4" in out and not (elsewhere / "dataset").exists()
    (tmp_path / "emb").rename(tmp_path / "emb-moved")
    _refused(capsys, [tmp_path], ["generate", plan, "-o", "dataset", "--dry-run", *_models(mini_arc2face), *FAST],
             r"emb: the embeddings directory recorded in the plan .*plan.parquet is not there; pass its current "
             r"location with --embeddings DIR")
    code, out, err = _run(capsys, "generate", plan, "-o", "dataset", "--dry-run", "--embeddings",
                          tmp_path / "emb-moved", *_models(mini_arc2face), *FAST)
    assert code == 0 and "to make: 4" in out, err[-2000:]


def test_a_plan_made_with_an_absolute_path_can_move(tmp_path, capsys, mini_arc2face):
    emb = _store(tmp_path / "emb")
    plan = make_plan(read_store(emb), list(IDENTITIES), PlanConfig(images_per_identity=2, images_per_latent=1))
    write_plan(tmp_path / "a" / "plan.parquet", plan)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "plan.parquet").rename(tmp_path / "b" / "plan.parquet")
    code, out, err = _run(capsys, "generate", tmp_path / "b" / "plan.parquet", "-o", tmp_path / "ds", "--dry-run",
                          *_models(mini_arc2face), *FAST)
    assert code == 0 and "to make: 4" in out, err[-2000:]


# ------------------------------------------------------------------------------------------ issue 12: the engine


def test_a_dataset_cut_into_the_old_work_units_is_refused(tmp_path, capsys, made, mini_arc2face):
    """A dataset started before issue 12 (whole identities packed per batch, no ``units`` in its settings) would be
    finished in other batches, so with other pixels: `generate` and `regenerate` refuse it in one line."""
    dataset = tmp_path / "dataset"
    shutil.copytree(made / "dataset", dataset)
    record = json.loads((dataset / "generation.json").read_text())
    del record["settings"]["units"]
    (dataset / "generation.json").write_text(json.dumps(record))
    old = (r"dataset: this dataset was started by an earlier digi2real with other work units \(whole identities "
           r"packed per batch; now consecutive-v2\), so its images cannot be computed again the same way; ")
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, dataset),
             old + "finish it with that version, or generate into a new output folder")
    _refused(capsys, [tmp_path, made], ["regenerate", dataset, "a/0", "-q"], old + "recompute it with that version")


def test_a_write_failing_on_a_worker_is_one_line_and_the_run_resumes(tmp_path, capsys, made, mini_arc2face,
                                                                     monkeypatch):
    """The disk fills while a worker thread writes an image: one line, exit 2, nothing half-written visible; the
    same command afterwards finishes the dataset, identical to an uninterrupted run."""
    import digi2real.generation.runner as runner

    out = tmp_path / "dataset"
    real, calls = runner.write_image, [0]

    def full_disk(path, image):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, image)

    monkeypatch.setattr(runner, "write_image", full_disk)
    code, _, err = _run(capsys, *_generate(made, mini_arc2face, out))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert re.match(r"digi2real: error: .*dataset/images/b/0.png: No space left on device; the disk is full", lines[0])
    assert not list(out.rglob(".*.tmp"))
    monkeypatch.undo()
    code, out_text, err = _run(capsys, *_generate(made, mini_arc2face, out))
    assert code == 0, err[-2000:]
    assert {p: b for p, b in _snapshot(out / "images").items()} == {
        p.replace(str(made / "dataset"), str(out)): b for p, b in _snapshot(made / "dataset" / "images").items()}


def test_dry_run_shows_each_shards_images(tmp_path, capsys, made, mini_arc2face):
    code, out, err = _run(capsys, *_generate(made, mini_arc2face, tmp_path / "ds", "--dry-run", "--batch-size", "1",
                                             "--shard", "0/3"))
    assert code == 0, err[-2000:]
    assert "plan: 4 images in 4 work units of 1 (batch set); this shard (0/3): 2 in 2 units; to make: 2" in out
    assert "images per shard (3 shards): [2, 1, 1]; largest / mean = 1.50" in out
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("content, match", [
    (b"{not json", r"shard-00001-of-00002.run.json: corrupt \(.*\); delete it: the next run of that shard writes it"),
    (b'{"shard": "1/2", "models": []}', r"run.json: corrupt \('models' missing or of the wrong type\); delete it"),
])
def test_a_damaged_run_record_is_one_line(tmp_path, capsys, made, mini_arc2face, content, match):
    """Another shard's run record (where its models ran, for the card), damaged: refused in one line before anything
    is written, by `generate` and by the card."""
    from digi2real.dataset.card import write_card
    from digi2real.errors import Digi2RealError

    dataset = tmp_path / "dataset"
    shutil.copytree(made / "dataset", dataset)
    (dataset / "manifest" / "shard-00001-of-00002.run.json").write_bytes(content)
    _refused(capsys, [tmp_path, made], _generate(made, mini_arc2face, dataset), match)
    with pytest.raises(Digi2RealError, match=match):
        write_card(dataset)
