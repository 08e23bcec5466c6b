"""`digi2real audit` end to end (issue 14): real-style procedural people embedded by the shipped miniature ArcFace,
a `.bin` benchmark holding a person planted in the audited set, twins planted as two identities, the FAR calibration
checked by hand, stored vectors read from a generated dataset, and refused inputs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digi2real.evaluation.bins import write_bin
from digi2real.imageio import write_image
from digi2real.miniature import shipped_models
from digi2real.sources.domains import REAL_TEST, REAL_TRAIN
from digi2real.sources.procedural import render_item

SEED = 0
BENCH_PEOPLE = 30  # held-out real-style people in the .bin
PLANTED = REAL_TEST.first + 7  # one of them, also in the audited set (other photos of them)
TWIN = REAL_TRAIN.first + 95_100  # one person filed as two identities of the audited set


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _face(person: int, k: int) -> np.ndarray:
    return render_item(SEED, person, k, style="real")


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "digi2real.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def model() -> str:
    return str(shipped_models()[0] / "arcface.onnx")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit")
    # the benchmark: 30 people x 4 photos, genuine pairs (0, 1), (1, 2), (2, 3) of each (joining the four into one
    # identity), 400 listed non-match pairs
    rng = np.random.default_rng(0)
    blobs, issame = [], []
    people = [REAL_TEST.first + i for i in range(BENCH_PEOPLE)]
    for p in people:
        for a, b in ((0, 1), (1, 2), (2, 3)):
            blobs += [_png(_face(p, a)), _png(_face(p, b))]
            issame.append(True)
    for _ in range(400):
        i, j = rng.choice(BENCH_PEOPLE, 2, replace=False)
        blobs += [_png(_face(people[i], int(rng.integers(4)))), _png(_face(people[j], int(rng.integers(4))))]
        issame.append(False)
    write_bin(root / "bench.bin", blobs, issame)
    # real photos, each of its own person: 160 people, 12,720 impostor pairs (the calibration)
    for i in range(160):
        write_image(root / "photos" / f"{i}.png", _face(REAL_TRAIN.first + 96_000 + i, 0))
    # the audited set: 12 people, the planted benchmark person (photos 10-13, none of them in the .bin), and the
    # twins: one person's photos 0-3 and 4-7 filed as two identities
    data = root / "dataset"
    for i in range(12):
        for k in range(4):
            write_image(data / f"person{i:02d}" / f"{k}.png", _face(REAL_TRAIN.first + 95_000 + i, k))
    for k in range(4):
        write_image(data / "planted" / f"{k}.png", _face(PLANTED, 10 + k))
        write_image(data / "twin_a" / f"{k}.png", _face(TWIN, k))
        write_image(data / "twin_b" / f"{k}.png", _face(TWIN, 4 + k))
    return {"bin": root / "bench.bin", "photos": root / "photos", "dataset": data, "root": root}


@pytest.fixture(scope="module")
def audited(sets, model) -> dict:
    out = sets["root"] / "out"
    done = _cli("audit", str(sets["dataset"]), "--against", str(sets["bin"]), str(sets["photos"]), "--model", model,
                "-o", str(out), "--cache", str(sets["root"] / "cache"), "-q")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "match threshold: cosine" in done.stdout
    return json.loads((out / "audit.json").read_text())


def test_the_planted_benchmark_person_is_found_and_only_them(audited):
    d = audited["datasets"][0]
    assert d["identities"] == 15 and d["images"] == 60
    bench = d["contamination"]["bench"]
    assert [m["identity"] for m in bench["matches"]] == ["planted"]
    match = bench["matches"][0]
    threshold = audited["threshold"]["value"]
    assert match["prototype_cosine"] > threshold + 0.1  # clearly, not by a hair
    # and the benchmark identity it names is the planted person: the eighth group of the .bin's images
    assert match["reference_identity"] == "bench:7"
    assert d["contamination"]["photos"]["matches"] == []


def test_planted_twins_are_the_only_duplicates(audited):
    dups = audited["datasets"][0]["distinctness"]["duplicates"]
    assert [sorted([p["identity_a"], p["identity_b"]]) for p in dups] == [["twin_a", "twin_b"]]


def _photo_cosines(sets, model) -> np.ndarray:
    from digi2real.config import EncoderConfig
    from digi2real.faces.arcface import ArcFaceEncoder
    from digi2real.imageio import read_image

    enc = ArcFaceEncoder.load(EncoderConfig(model=model, embedding_dim=_dim(model)))
    v = enc(np.stack([read_image(sets["photos"] / f"{i}.png") for i in range(160)])).astype(np.float64)
    return v @ v.T


def test_threshold_is_the_hand_computed_far_quantile_of_the_photos(audited, sets, model):
    """Calibrated on the reference giving the most impostor scores (160 single-photo people; the .bin gives its
    listed pairs): by default each person's cosine to their nearest other person (a search), sorted descending,
    the score at index floor(1e-4 x 160) = 0, flagged as limited (fewer than 1/FAR scores)."""
    t = audited["threshold"]
    assert t["calibrated_on"] == "photos" and t["calibration"] == "search" and t["far"] == 1e-4
    cos = _photo_cosines(sets, model)
    np.fill_diagonal(cos, -np.inf)
    nearest = np.sort(cos.max(axis=1))[::-1]
    assert t["impostors"] == 160 and t["limited"] and abs(t["value"] - nearest[0]) < 1e-5


def test_pairs_calibration_is_the_hand_computed_quantile_of_all_pairs(sets, model):
    """--calibration pairs --far 1e-3: the 12,720 pairs of different photos, sorted descending, index
    floor(1e-3 x 12,720) = 12; a pair exactly at the value is not a match (strictly above)."""
    out = sets["root"] / "out-pairs"
    done = _cli("audit", str(sets["dataset"]), "--against", str(sets["photos"]), "--model", model, "-o", str(out),
                "--cache", str(sets["root"] / "cache"), "--calibration", "pairs", "--far", "1e-3", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    t = json.loads((out / "audit.json").read_text())["threshold"]
    cos = _photo_cosines(sets, model)[np.triu_indices(160, 1)]
    expected = np.sort(cos)[::-1][int(np.floor(1e-3 * len(cos)))]
    assert t["calibration"] == "pairs" and t["impostors"] == 12_720 and not t["limited"]
    assert abs(t["value"] - expected) < 1e-5
    assert int((cos > t["value"] + 1e-6).sum()) <= 12  # at most FAR x n impostor pairs above it


def _dim(model: str) -> int:
    from digi2real.audit.run import _onnx_dim

    return _onnx_dim(model)


def test_outputs_and_the_cache(audited, sets, model):
    out = sets["root"] / "out"
    md = (out / "audit.md").read_text()
    assert "| dataset |" in md and "planted" in md
    page = (out / "audit.html").read_text()
    assert page.count("data:image/png;base64") >= 4  # the matched and duplicate pairs, side by side
    assert "twin_a" in page and "bench:7" in page
    # every identity with its most similar reference identity and other identity, as CSV
    import csv

    nearest = list(csv.DictReader((out / "nearest-dataset-in-bench.csv").open()))
    assert len(nearest) == 15 and [r["identity"] for r in nearest if r["above_threshold"] == "1"] == ["planted"]
    planted = next(r for r in nearest if r["identity"] == "planted")
    assert planted["nearest_reference_identity"] == "bench:7" and planted["reference_image"].endswith("(pair 21)")
    distinct = {r["identity"]: r for r in csv.DictReader((out / "distinct-dataset.csv").open())}
    assert distinct["twin_a"]["nearest_other_identity"] == "twin_b" and distinct["twin_a"]["above_threshold"] == "1"
    # a second audit embeds nothing: every chunk comes from the cache, and the numbers are the same
    again = _cli("audit", str(sets["dataset"]), "--against", str(sets["bin"]), str(sets["photos"]), "--model", model,
                 "-o", str(sets["root"] / "out2"), "--cache", str(sets["root"] / "cache"), "-q")
    assert again.returncode == 0, again.stderr[-2000:]
    second = json.loads((sets["root"] / "out2" / "audit.json").read_text())
    for ref in second["references"]:
        assert ref["note"].endswith(" 1 of 1 chunks from the cache"), ref["note"]
    assert second["threshold"] == audited["threshold"] and second["datasets"][0]["contamination"] == \
        audited["datasets"][0]["contamination"]


def _fake_generated(root: Path, vectors: np.ndarray, identities: list[str], model_sha: str, encoder: str,
                    store: bool = True) -> Path:
    """A generated dataset as `generate` leaves it, made directly: record, manifest rows, kept vectors."""
    from digi2real.generation.vectors import VectorRows, _write, shard_path

    (root / "manifest").mkdir(parents=True)
    (root / "generation.json").write_text(json.dumps({"encoder": {"model": encoder}}))
    rows, keys = [], []
    for i, ident in enumerate(identities):
        key = f"{ident}/{i}"
        keys.append(key)
        rows.append({"key": key, "identity": ident, "final": True, "status": "ok", "attempt": 0,
                     "path": f"{key}.png"})
        write_image(root / "images" / f"{key}.png", np.full((112, 112, 3), 100, np.uint8))
    (root / "manifest" / "shard-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if store:
        n = len(keys)
        _write(shard_path(root, "shard-00000-of-00001.jsonl"),
               VectorRows(keys, np.zeros(n, np.int32), vectors.astype(np.float32),
                          np.full((n, 5, 2), np.nan, np.float32), np.full(n, 100, np.float32),
                          np.zeros(n, np.float32), model_sha))
    return root


def test_stored_vectors_are_read_and_another_model_is_refused(tmp_path, sets, model, mini_arc2face):
    """A generated dataset brings its own vectors (nothing embedded); a REF embedded by another ArcFace, or a
    --model other than the dataset's, is refused with one line naming both models."""
    from digi2real.fileio import sha256_file

    rng = np.random.default_rng(1)
    dim = _dim(model)
    v = rng.normal(size=(6, dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    gen = _fake_generated(tmp_path / "gen", v, ["a", "a", "b", "b", "c", "c"], sha256_file(model), model)
    ok = _cli("audit", str(gen), "--against", str(sets["photos"]), "-o", str(tmp_path / "o1"),
              "--cache", str(sets["root"] / "cache"), "-q")
    assert ok.returncode == 0, ok.stderr[-2000:]
    result = json.loads((tmp_path / "o1" / "audit.json").read_text())
    assert result["datasets"][0]["note"].startswith("vectors stored by generate")
    assert result["embedding"]["model"] == model

    other = str(mini_arc2face[0] / "arcface.onnx")
    bad = _cli("audit", str(gen), "--against", str(sets["photos"]), "--model", other, "-o", str(tmp_path / "o2"),
               "--cache", str(tmp_path / "c2"), "-q")
    assert bad.returncode == 2
    line = bad.stderr.strip()
    assert "\n" not in line and str(gen) in line and "arcface.onnx" in line and "--model" in line
    assert sha256_file(model)[:12] in line and sha256_file(other)[:12] in line
    assert not (tmp_path / "o2" / "audit.json").exists()


def test_a_dataset_without_stored_vectors_says_how_to_embed_it(tmp_path, sets, model):
    gen = _fake_generated(tmp_path / "old", np.zeros((2, 8)), ["a", "b"], "x", model, store=False)
    bad = _cli("audit", str(gen), "--against", str(sets["photos"]), "-o", str(tmp_path / "o"), "-q")
    assert bad.returncode == 2
    assert "no stored embeddings" in bad.stderr and "--embed-images" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_bad_references_are_refused_in_one_line(tmp_path, sets, model):
    missing = _cli("audit", str(sets["dataset"]), "--against", str(tmp_path / "nope.bin"), "--model", model,
                   "-o", str(tmp_path / "o"), "-q")
    assert missing.returncode == 2 and "nope.bin" in missing.stderr and missing.stderr.strip().count("\n") == 0
    (tmp_path / "evil.bin").write_bytes(b"\x80\x04cos\nsystem\n.")
    evil = _cli("audit", str(sets["dataset"]), "--against", str(tmp_path / "evil.bin"), "--model", model,
                "-o", str(tmp_path / "o"), "-q")
    assert evil.returncode == 2 and "evil.bin" in evil.stderr and evil.stderr.strip().count("\n") == 0
    inside = _cli("audit", str(sets["dataset"]), "--model", model, "-o", str(sets["dataset"] / "audit"), "-q")
    assert inside.returncode == 2 and "-o" in inside.stderr
    cache = _cli("audit", str(sets["dataset"]), "--model", model, "-o", str(tmp_path / "o"), "--cache",
                 str(sets["dataset"] / "cache"), "-q")
    assert cache.returncode == 2 and "--cache" in cache.stderr and not (sets["dataset"] / "cache").exists()


def test_damaged_kept_vectors_are_refused_and_left_as_they_are(tmp_path, capsys, model):
    """A kept-vectors file that is not ours (random bytes, a truncated copy): one line naming it, nothing changed."""
    from digi2real.fileio import sha256_file

    from hostile import refused

    v = np.eye(4, _dim(model))
    gen = _fake_generated(tmp_path / "gen", v, ["a", "a", "b", "b"], sha256_file(model), model)
    shard = gen / "embeddings" / "shard-00000-of-00001.safetensors"
    good = shard.read_bytes()
    for damage in (good[: len(good) // 2], np.random.default_rng(0).bytes(3000)):
        shard.write_bytes(damage)
        line = refused(capsys, ["audit", gen, "-o", tmp_path / "out", "-q"], gen)
        assert str(shard) in line and "generate" in line
    assert not (tmp_path / "out").exists()


def test_recordio_and_ijb_references(tmp_path, sets, model):
    """The audited set packed as RecordIO is found in full (every identity matches its own packed copy, JPEG and
    all); an IJB folder is aligned with its landmarks, its templates are its identities and its non-match template
    pairs its impostors."""
    from test_ijb import _make_ijb

    packed = tmp_path / "packed"
    done = _cli("pack", str(sets["dataset"]), "-o", str(packed), "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    ijb = _make_ijb(tmp_path / "ijb")
    out = tmp_path / "out"
    done = _cli("audit", str(sets["dataset"]), "--against", str(packed), str(ijb), "--model", model, "-o", str(out),
                "--cache", str(tmp_path / "cache"), "--threshold", "0.8", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "audit.json").read_text())
    refs = {r["name"]: r for r in result["references"]}
    assert refs["packed"]["kind"] == "recordio" and refs["packed"]["identities"] == 15
    assert refs["IJBC"]["kind"] == "ijb" and refs["IJBC"]["identities"] == 4 and refs["IJBC"]["impostor_scores"] == 4
    own = result["datasets"][0]["contamination"]["packed"]
    assert own["matched_identities"] == 15
    pairs = {(m["identity"], m["reference_identity"]) for m in own["matches"]}
    assert {(f"person{i:02d}", f"person{i:02d}") for i in range(12)} | {("planted", "planted")} <= pairs
    assert min(m["prototype_cosine"] for m in own["matches"] if m["identity"] == m["reference_identity"]) > 0.98
    assert result["threshold"]["source"] == "fixed cosine, not calibrated"


def test_several_sets_give_one_comparison_table(tmp_path, sets, model):
    """`audit A B --against REF`: a row per set in the JSON, the Markdown table and the HTML, each searched in REF."""
    out = tmp_path / "out"
    done = _cli("audit", str(sets["dataset"]), str(sets["photos"]), "--against", str(sets["bin"]), "--model", model,
                "-o", str(out), "--cache", str(sets["root"] / "cache"), "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "audit.json").read_text())
    assert [(d["name"], d["identities"]) for d in result["datasets"]] == [("dataset", 15), ("photos", 160)]
    assert all(set(d["contamination"]) == {"bench"} for d in result["datasets"])
    rows = [ln for ln in (out / "audit.md").read_text().splitlines() if ln.startswith(("| dataset | 15 |",
                                                                                     "| photos | 160 |"))]
    assert len(rows) == 2
    page = (out / "audit.html").read_text()
    assert "<h3>dataset</h3>" in page and "<h3>photos</h3>" in page


def test_embed_images_audits_a_dataset_without_kept_vectors(tmp_path, sets, model):
    gen = _fake_generated(tmp_path / "old", np.zeros((4, 8)), ["a", "a", "b", "b"], "x", model, store=False)
    done = _cli("audit", str(gen), "--embed-images", "--model", model, "-o", str(tmp_path / "o"),
                "--cache", str(tmp_path / "c"), "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    d = json.loads((tmp_path / "o" / "audit.json").read_text())["datasets"][0]
    assert (d["kind"], d["identities"], d["images"]) == ("generated", 2, 4) and d["note"].startswith("embedded with")


def test_photographs_are_aligned_with_mtcnn_and_faceless_ones_left_out(tmp_path, sets, model, astronaut, grace):
    """A reference of photographs (not 112 x 112): each is detected and aligned by MTCNN, as the shift stage takes
    real faces, so its vector is the aligned face's; an image without a face is left out and counted."""
    import csv

    from digi2real.config import AlignConfig, EncoderConfig
    from digi2real.faces.arcface import ArcFaceEncoder
    from digi2real.faces.detect import detect_and_align
    from digi2real.imageio import read_image

    photos = tmp_path / "photos"
    write_image(photos / "astronaut" / "0.png", astronaut)
    write_image(photos / "hopper" / "0.png", grace)
    write_image(photos / "wall" / "0.png", np.full((200, 160, 3), 128, np.uint8))  # no face
    out = tmp_path / "out"
    done = _cli("audit", str(sets["dataset"]), "--against", str(photos), "--model", model, "-o", str(out),
                "--cache", str(tmp_path / "cache"), "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    ref = json.loads((out / "audit.json").read_text())["references"][0]
    assert (ref["identities"], ref["images"]) == (2, 2)
    assert ref["note"].endswith("1 photographs without a face found left out")
    # each reference vector is its MTCNN-aligned face's: the planted identity's nearest reference identity and
    # cosine in the CSV are those computed here from the aligned crops
    enc = ArcFaceEncoder.load(EncoderConfig(model=model, embedding_dim=_dim(model)))
    faces = {name: enc(detect_and_align([img], cfg=AlignConfig(input="photo"))[0].crop[None])[0]
             for name, img in (("astronaut", astronaut), ("hopper", grace))}
    planted = enc(np.stack([read_image(sets["dataset"] / "planted" / f"{k}.png") for k in range(4)]))
    proto = planted.mean(axis=0) / np.linalg.norm(planted.mean(axis=0))
    cosines = {name: float(proto @ v) for name, v in faces.items()}
    row = next(r for r in csv.DictReader((out / "nearest-dataset-in-photos.csv").open()) if r["identity"] == "planted")
    assert row["nearest_reference_identity"] == max(cosines, key=cosines.get)
    assert float(row["prototype_cosine"]) == pytest.approx(max(cosines.values()), abs=1e-4)


def test_a_manifest_path_leading_outside_the_dataset_is_refused(tmp_path, capsys, model):
    """The report shows the dataset's images: a manifest row naming a file outside images/ is refused, never read."""
    from digi2real.fileio import sha256_file

    from hostile import refused

    v = np.eye(2, _dim(model))
    gen = _fake_generated(tmp_path / "gen", v, ["a", "b"], sha256_file(model), model)
    manifest = gen / "manifest" / "shard-00000-of-00001.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1]["path"] = "../../secret.png"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = refused(capsys, ["audit", gen, "-o", tmp_path / "out", "-q"], gen)
    assert "../../secret.png" in line and "not a safe relative path" in line
