"""`digi2real report` (issue 7): a self-contained HTML page of a run directory, built here from real stage outputs on
miniature models (embed, select, plan, shift, generate, eval), a partial run, and a directory that is not a run."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from digi2real.config import (AlignConfig, DetectorConfig, EmbedConfig, EncoderConfig, EvalConfig, ExperimentConfig,
                              GenerateConfig, PlanConfig, ReportConfig, SelectConfig, ShiftConfig, SourceConfig)
from digi2real.errors import Digi2RealError
from digi2real.evaluation.run import run_eval
from digi2real.evaluation.tables import PAPER_MAIN
from digi2real.faces.arcface import ArcFaceEncoder
from digi2real.faces.mtcnn import MTCNN
from digi2real.generation.runner import FaceChecker, generate_dataset, prepare_job
from digi2real.generation.shift import compute_shift, features_path, write_shift
from digi2real.identity.embed import embed_source
from digi2real.identity.plan import make_plan, write_plan
from digi2real.identity.select import select_identities, write_selection
from digi2real.identity.store import read_store
from digi2real.report import build_report
from digi2real.report import commands
from digi2real.report.build import SECTIONS, sample_pairs
from digi2real.report.figures import pca_2d
from digi2real.sources.procedural import ProceduralSource, render_item
from digi2real.training.iresnet import IResNet

ANY_FACE = DetectorConfig(thresholds=(0.0, 0.0, 0.0))  # the miniature draws no faces: accept whatever MTCNN finds
IDENTITIES, SAMPLES = 3, 3  # report.identities, report.samples
SRC_PER_ID = 3


# ------------------------------------------------------------------------------------------------ page parsing


class Page(HTMLParser):
    """What the tests look at: section headings, images and links (by section), tables (rows of cell text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.section: str | None = None
        self.h2: list[str] = []
        self.images: list[tuple[str | None, dict]] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.tables: list[tuple[str | None, str, list[list[str]]]] = []
        self.notes: dict[str | None, list[str]] = {}
        self._text: list[str] | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._note: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for key in ("src", "href"):
            if a.get(key):
                self.urls.append(a[key])
        if tag == "section":
            self.section = a.get("id")
        elif tag == "h2":
            self._text = []
        elif tag == "img":
            self.images.append((self.section, a))
        elif tag == "table":
            self.tables.append((self.section, a.get("class") or "", []))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "p" and a.get("class") == "na":
            self._note = []

    def handle_endtag(self, tag):
        if tag == "h2" and self._text is not None:
            self.h2.append("".join(self._text).strip())
            self._text = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1][2].append(self._row)
            self._row = None
        elif tag == "p" and self._note is not None:
            self.notes.setdefault(self.section, []).append("".join(self._note))
            self._note = None

    def handle_data(self, data):
        for buf in (self._text, self._cell, self._note):
            if buf is not None:
                buf.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def check_self_contained(page: Page) -> None:
    """Every image is an inline PNG that PIL decodes; nothing refers to the network; no script or stylesheet link."""
    assert page.images
    for _, attrs in page.images:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG"
            im.verify()
    assert not any(u.lower().startswith(("http://", "https://", "//")) for u in page.urls)
    assert all(u.startswith(("data:", "#")) for u in page.urls)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags


def images_in(page: Page, section: str, cls: str) -> int:
    return sum(1 for s, a in page.images if s == section and a.get("class") == cls)


# ------------------------------------------------------------------------------------------------ run fixtures


def _config(root: Path, shift: bool) -> ExperimentConfig:
    return ExperimentConfig(
        name="report-test", output_dir=root,
        source=SourceConfig(kind="procedural", identities=6, images_per_identity=SRC_PER_ID, seed=0),
        encoder=EncoderConfig(model="models/arcface.onnx", provider="cpu"),  # relative: under the run directory
        select=SelectConfig(n=IDENTITIES), plan=PlanConfig(images_per_identity=4, images_per_latent=2),
        align=AlignConfig(detector=ANY_FACE),
        shift=ShiftConfig(real=Path("real-faces") if shift else None, images=20),
        generate=GenerateConfig(steps=2, size=64, batch_size=8, shift_weight=1.0),
        report=ReportConfig(identities=IDENTITIES, samples=SAMPLES, pairs=200, seed=0),
    )


def _start_run(root: Path, arcface: Path, shift: bool) -> ExperimentConfig:
    """config.yaml, models/, embeddings/, ids.csv and plan.parquet: the first stages, run for real."""
    cfg = _config(root, shift)
    (root / "models").mkdir(parents=True)
    shutil.copy(arcface, root / "models" / "arcface.onnx")
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    encoder = ArcFaceEncoder.load(EncoderConfig(model=str(root / "models" / "arcface.onnx")))
    embed_source(ProceduralSource(6, SRC_PER_ID, seed=0), encoder, root / "embeddings", EmbedConfig(), progress=False)
    store = read_store(root / "embeddings")
    selection = select_identities(store, cfg.select)
    write_selection(root / "ids.csv", selection)
    write_plan(root / "plan.parquet", make_plan(store, list(selection.identities), cfg.plan))
    return cfg


def _pairs_set(folder: Path, pairs: int = 20) -> Path:
    """A procedural verification set as image files plus a pairs file (the miniature runs' benchmarks/)."""
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(pairs):
        same = i % 2 == 0
        for j, (ident, k) in enumerate(((i, 0), (i if same else i + 500, 1))):
            Image.fromarray(render_item(3, ident, k)).save(folder / "img" / f"{i}_{j}.png")
        lines.append(f"img/{i}_0.png img/{i}_1.png {int(same)}")
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    return folder / "pairs.txt"


def _train_log(path: Path) -> None:
    """A train_log.jsonl as the training loop writes it: start, windowed train records, verifications."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = [{"event": "start", "epoch": 0, "step": 0, "device": "cpu", "world": 1, "batch_size": 32,
             "per_process_batch": 32, "num_images": 16, "num_classes": 4, "resumed_from_step": 0}]
    for step in range(2, 21, 2):
        recs.append({"event": "train", "epoch": step // 10, "step": step, "loss": 20.0 / step, "acc": step / 25,
                     "lr": 0.1 * (1 - step / 20) + 1e-4, "images_per_s": 50.0 + step, "eta_s": 1.0,
                     "epoch_end": step % 10 == 0, "time": 1.0 + step})
        if step % 10 == 0:
            recs.append({"event": "verify", "epoch": step // 10, "step": step, "lfw_acc": 0.5 + step / 100,
                         "lfw_std": 0.01, "lfw_best_threshold": 1.2, "lfw_best_acc": 0.5 + step / 100,
                         "lfw_best_step": step, "seconds": 0.3, "time": 2.0 + step})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"event": "train", "step": 2')  # cut last line


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, mini_arc2face, mini_generator) -> Path:
    repo, _ = mini_arc2face
    root = tmp_path_factory.mktemp("report") / "run"
    cfg = _start_run(root, repo / "arcface.onnx", shift=True)
    encoder = ArcFaceEncoder.load(EncoderConfig(model=str(root / "models" / "arcface.onnx")))
    store = read_store(root / "embeddings")
    # shift: real side = other procedural faces, synthetic side = the run's own embeddings
    real = encoder(np.stack([render_item(7, i, 0) for i in range(12)]))
    shift = compute_shift(mini_generator, real, store.embeddings, batch_size=16)
    write_shift(root / "shift.safetensors", shift)
    np.savez(features_path(root / "shift.safetensors"), **shift.features)
    # generate: the runner on the miniature Arc2Face, with the shift
    align = AlignConfig(detector=ANY_FACE)
    checker = FaceChecker(MTCNN.from_package(align.detector, device="cpu"), encoder, align, None, "conditioning")
    job, _ = prepare_job(root / "plan.parquet", None, model=mini_generator, checker=checker, cfg=cfg.generate,
                         align=align, shift=shift, shift_path=root / "shift.safetensors", embeddings=None,
                         encoder_hash=encoder.file_hash())
    summary = generate_dataset(job, root / "dataset", progress=False, shift_path=root / "shift.safetensors")
    assert summary.written == IDENTITIES * 4
    _train_log(root / "train" / "train_log.jsonl")
    # eval: the real run_eval on a tiny IResNet and a procedural pairs set
    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1), widths=(4, 8, 16, 32), embedding_dim=32).eval()
    (root / "train" / "model.pt").parent.mkdir(exist_ok=True)
    torch.save(net.state_dict(), root / "train" / "model.pt")
    pairs = _pairs_set(root / "benchmarks")
    result = run_eval(root / "train" / "model.pt", None, root / "eval", EvalConfig(device="cpu", batch_size=16),
                      progress=False, warn=lambda m: None, pairs={"procedural": pairs})
    assert (root / "eval" / "results.json").is_file() and result["verification"]["procedural"]
    (root / "pipeline.json").write_text(json.dumps({"stages": {  # as digi2real.pipeline's RunState writes it
        "train": {"fingerprint": "ef" * 32, "complete": False, "started": "2026-01-01T10:00:12Z"},
        "embed": {"fingerprint": "ab" * 32, "complete": True, "started": "2026-01-01T10:00:00Z", "seconds": 1.5,
                  "finished": "2026-01-01T10:00:02Z"},
        "generate": {"fingerprint": "cd" * 32, "complete": True, "started": "2026-01-01T10:00:02Z",
                     "seconds": 9.25, "finished": "2026-01-01T10:00:12Z"}}}))
    return root


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, mini_arc2face) -> Path:
    """embed + select + plan only: no shift configured, nothing generated, trained or evaluated."""
    root = tmp_path_factory.mktemp("report") / "partial"
    _start_run(root, mini_arc2face[0] / "arcface.onnx", shift=False)
    (root / "eval").mkdir()
    (root / "eval" / "results.json").write_text("{ not json")  # a damaged artifact is a note, not a crash
    return root


# ------------------------------------------------------------------------------------------------ tests


def test_full_run_report(full_run):
    path = build_report(full_run)
    assert path == full_run / "report.html" and path.is_file()
    assert path.stat().st_size < 3_000_000
    page = parse(path)
    assert page.h2 == [title for _, title in SECTIONS]
    check_self_contained(page)

    # 2: the grid shows report.identities identities, each with its embedded images and report.samples crops
    assert images_in(page, "samples", "gen") == IDENTITIES * SAMPLES
    assert images_in(page, "samples", "src") == IDENTITIES * SRC_PER_ID
    # 3, 4, 5, 6: every figure is there, nothing is "not available"
    assert images_in(page, "realism", "plot") == 1
    assert images_in(page, "similarity", "plot") == 1
    assert images_in(page, "acceptance", "plot") == 1
    assert images_in(page, "training", "plot") == 1
    for section in ("samples", "realism", "similarity", "acceptance", "training", "benchmarks"):
        assert section not in page.notes, (section, page.notes.get(section))
    gap = next(rows for s, _, rows in page.tables if s == "realism")
    assert [r[0] for r in gap[1:]] == ["mean-conditioning distance (Frobenius)",
                                       "Frechet distance of token-pooled conditionings"]
    assert float(gap[1][2]) < float(gap[1][1])  # the shift brings the means together
    sim = next(rows for s, _, rows in page.tables if s == "similarity" and rows[0][0] == "set")
    assert [r[0] for r in sim[1:]] == ["source embeddings", "generated crops"]
    assert int(sim[1][1]) == 200 and int(sim[1][3]) == 200 and int(sim[2][1]) == 200
    acc = dict(r[:2] for r in next(rows for s, _, rows in page.tables if s == "acceptance"))
    assert acc["planned"] == "12" and acc["ok"] == "12" and acc["acceptance rate"] == "100.0%"
    stages = next(rows for s, _, rows in page.tables if s == "settings")
    assert stages[0] == ["stage", "status", "timings", "fingerprint"]
    assert [r[:2] for r in stages[1:]] == [["embed", "complete"], ["generate", "complete"], ["train", "incomplete"]]
    assert stages[2][2] == "9.2 s; started 2026-01-01T10:00:02Z; finished 2026-01-01T10:00:12Z"
    assert stages[2][3] == "cdcdcdcdcdcd..."
    verify = next(rows for s, _, rows in page.tables if s == "training" and rows[0][0] == "verification set")
    assert verify[1][0] == "lfw" and float(verify[1][1]) == pytest.approx(70.0)

    # 7: the run's row above the paper's rows, the pairs set, the ROC plot
    result = json.loads((full_run / "eval" / "results.json").read_text())
    main = next(rows for s, c, rows in page.tables if s == "benchmarks" and "main" in c)
    assert [r[0] for r in main] == ["Model", "report-test (this run)", *PAPER_MAIN]
    assert main[0][1:] == ["LFW", "CALFW", "CPLFW", "AgeDB30", "CFP-FP", "IJB-B", "IJB-C"]
    assert main[1][1:] == ["-"] * 7  # only a pairs set was evaluated
    assert main[2][1:] == [f"{v:.2f}" for v in PAPER_MAIN["Digi2Real-20K (paper)"]]
    other = next(rows for s, c, rows in page.tables if s == "benchmarks" and "other" in c)
    assert other[1][0] == "procedural"
    assert float(other[1][1]) == pytest.approx(result["verification"]["procedural"]["accuracy"], abs=0.006)
    assert images_in(page, "benchmarks", "plot") == len(list((full_run / "eval").glob("roc_*.png"))) >= 1


def test_partial_run_renders_with_notes(partial_run, tmp_path):
    out = build_report(partial_run, tmp_path / "sub" / "page.html")
    assert out == tmp_path / "sub" / "page.html" and not (partial_run / "report.html").exists()
    page = parse(out)
    assert page.h2 == [title for _, title in SECTIONS]
    check_self_contained(page)
    assert images_in(page, "samples", "src") == IDENTITIES * SRC_PER_ID
    assert images_in(page, "samples", "gen") == 0
    assert "shift.real is null" in page.notes["realism"][0]
    assert "generate stage has not run" in page.notes["acceptance"][0]
    assert "train stage has not run" in page.notes["training"][0]
    assert "results.json is unreadable" in page.notes["benchmarks"][0]
    paper = next(rows for s, c, rows in page.tables if s == "benchmarks")
    assert [r[0] for r in paper[1:]] == list(PAPER_MAIN)  # the paper's rows still show what a run is measured by
    assert any("generated crops" in n for n in page.notes["similarity"])
    assert images_in(page, "similarity", "plot") == 1  # the source histogram still renders
    assert "pipeline.json" in page.notes["settings"][0]


def test_not_a_run_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(Digi2RealError) as err:
            build_report(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert "config.yaml" in str(pytest.raises(Digi2RealError, build_report, tmp_path / "empty").value)


def test_cli(partial_run, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="digi2real")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(partial_run), "-o", str(tmp_path / "r.html")])
    assert args.func(args) == 0
    assert (tmp_path / "r.html").is_file() and str(tmp_path / "r.html") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--help"])
    assert "not available" in capsys.readouterr().out


def test_sample_pairs_and_pca():
    labels = np.repeat(np.arange(5), [1, 2, 3, 4, 5])
    g, i = sample_pairs(labels, 300, np.random.default_rng(0))
    assert g.shape == (300, 2) and i.shape == (300, 2)
    assert np.all(labels[g[:, 0]] == labels[g[:, 1]]) and np.all(g[:, 0] != g[:, 1])
    assert np.all(labels[i[:, 0]] != labels[i[:, 1]]) and 0 not in labels[g[:, 0]]
    g2, _ = sample_pairs(labels, 300, np.random.default_rng(0))
    assert np.array_equal(g, g2)
    assert sample_pairs(np.zeros(4, int), 10, np.random.default_rng(0))[1].shape == (0, 2)
    pts = np.random.default_rng(1).normal(size=(50, 6)) * np.array([10, 3, 0.1, 0.1, 0.1, 0.1])
    coords, frac = pca_2d(pts)
    assert coords.shape == (50, 2) and frac[0] > frac[1] > 0 and frac.sum() <= 1
    assert np.allclose(coords.mean(axis=0), 0, atol=1e-9)


def test_screenshot_is_not_blank(full_run, tmp_path):
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH for a headless screenshot")
    page = build_report(full_run, tmp_path / "shot.html")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1200,1600", page.as_uri()], check=True, timeout=120, capture_output=True)
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("L"), np.float64)
    assert arr.std() > 5  # text, tables and plots, not a uniform page


# ------------------------------------------------------------------------------------------------ not copying (issue 13)


FAKE_POOL = {"first": 500, "identities": 3, "images": 4, "size": 64, "style": "real", "seed": 11}


@pytest.fixture
def fake_shipped(tmp_path, monkeypatch) -> Path:
    """A shipped-models folder whose record.json describes a 3-identity training pool."""
    import digi2real.miniature

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "record.json").write_text(json.dumps({"recipe": {}, "pool": FAKE_POOL}))
    monkeypatch.setattr(digi2real.miniature, "SHIPPED", shipped)
    return shipped


@pytest.fixture
def miniature_run(full_run, tmp_path, fake_shipped) -> Path:
    """The full run, copied, with `miniature: true` in its config (its encoder stays the run's models/arcface.onnx)."""
    root = tmp_path / "mini-run"
    shutil.copytree(full_run, root)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["miniature"] = True
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


def _copying_table(page: Page, cls: str) -> dict[str, list[str]]:
    rows = next(rows for s, c, rows in page.tables if s == "copying" and cls in c)
    assert rows[0] == ["cosine (run's ArcFace)", "n", "mean", "5%", "median", "95%", "max"]
    return {r[0]: r[1:] for r in rows[1:]}


def test_not_copying_section_for_a_miniature_run(miniature_run, tmp_path):
    page = parse(build_report(miniature_run, tmp_path / "page.html"))
    assert "copying" not in page.notes, page.notes.get("copying")
    check_self_contained(page)
    images = _copying_table(page, "images")
    assert list(images) == ["generated image -> nearest training image", "generated image -> its conditioning identity",
                            "reference: two images of one training person",
                            "reference: training image -> nearest image of another training person"]
    assert [v[0] for v in images.values()] == ["12", "12", str(3 * 6), "12"]  # crops; 3 people x C(4, 2); pool
    identities = _copying_table(page, "identities")
    assert [v[0] for v in identities.values()] == ["3", "3", "3", "3"]
    assert all(-1 <= float(x) <= 1 for v in [*images.values(), *identities.values()] for x in v[1:])
    assert images_in(page, "copying", "plot") == 1
    # section 2's crops each beside their nearest training image, then the report.samples closest ones
    gen = [a for s, a in page.images if s == "copying" and a["class"] == "gen"]
    near = [a for s, a in page.images if s == "copying" and a["class"] == "nearest"]
    assert len(gen) == len(near) == IDENTITIES * SAMPLES + SAMPLES
    # the nearest training image, checked by brute force: every pool image re-rendered and embedded here
    encoder = ArcFaceEncoder.load(EncoderConfig(model=str(miniature_run / "models" / "arcface.onnx")))
    pool = encoder(np.stack([render_item(11, 500 + i, k, size=112, style="real") for i in range(3) for k in range(4)]))
    for g, n in zip(gen[:4], near[:4]):
        crop = np.asarray(Image.open(miniature_run / "dataset" / "images" / g["title"].split(" ", 1)[1])
                          .convert("RGB").resize((112, 112), Image.BILINEAR))
        sims = pool @ encoder(crop[None])[0]
        best = int(sims.argmax())
        assert n["title"] == (f"nearest training image: person {500 + best // 4} image {best % 4}, "
                              f"cosine {sims[best]:.4f}")
    assert (miniature_run / "models" / "generator_train_embeddings.npz").is_file()
    text = (tmp_path / "page.html").read_text()
    assert "Verdict: " in text[text.index('<section id="copying">'):text.index('<section id="acceptance">')]


def test_not_copying_cache_reused_and_recomputed(miniature_run, tmp_path, monkeypatch):
    from digi2real.fileio import sha256_file
    from digi2real.miniature import build_mini_arcface
    from digi2real.report import copying

    embedded: list[str] = []
    real = copying.embed_pool
    monkeypatch.setattr(copying, "embed_pool", lambda pool, enc: embedded.append(enc.file_hash()) or real(pool, enc))
    cache = miniature_run / "models" / "generator_train_embeddings.npz"
    build_report(miniature_run, tmp_path / "1.html")
    first = (cache.stat().st_ino, cache.read_bytes())
    page = parse(build_report(miniature_run, tmp_path / "2.html"))
    assert "copying" not in page.notes and len(embedded) == 1  # the second build reused the cache ...
    assert (cache.stat().st_ino, cache.read_bytes()) == first  # ... and left it as it was
    assert "reused from generator_train_embeddings.npz" in (tmp_path / "2.html").read_text()

    build_mini_arcface(miniature_run / "models" / "arcface.onnx", seed=1)  # another encoder: recomputed
    build_report(miniature_run, tmp_path / "3.html")
    new_sha = sha256_file(miniature_run / "models" / "arcface.onnx")
    assert len(embedded) == 2 and embedded[1] == new_sha != embedded[0]
    with np.load(cache) as data:
        assert str(data["encoder_sha256"]) == new_sha and data["embeddings"].shape == (12, 512)
        assert not np.array_equal(data["embeddings"], np.load(io.BytesIO(first[1]))["embeddings"])

    cache.write_bytes(b"not an npz")  # a damaged cache is recomputed, not an error
    page = parse(build_report(miniature_run, tmp_path / "4.html"))
    assert "copying" not in page.notes and len(embedded) == 3
    with np.load(cache) as data:
        assert data["embeddings"].shape == (12, 512)
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]


def test_not_copying_needs_the_training_set(partial_run, miniature_run, fake_shipped, tmp_path):
    page = parse(build_report(partial_run, tmp_path / "plain.html"))  # a run on the public Arc2Face
    [note] = page.notes["copying"]
    assert "training set" in note and "public Arc2Face does not publish" in note and "miniature: true" in note
    (fake_shipped / "record.json").unlink()  # shipped models without their training record
    page = parse(build_report(miniature_run, tmp_path / "no-record.html"))
    [note] = page.notes["copying"]
    assert str(fake_shipped / "record.json") in note and "train_miniature.py" in note and "\n" not in note
    assert not (miniature_run / "models" / "generator_train_embeddings.npz").exists()


def test_copy_measures_see_a_copy():
    from digi2real.report.build import _copying_verdict
    from digi2real.report.copying import judge, nearest, normalise, prototypes, reference

    rng = np.random.default_rng(0)
    person = np.repeat(np.arange(3), 4)  # 3 people x 4 images: a person's images share a direction
    train = normalise(rng.normal(size=(3, 16))[person] + 0.3 * rng.normal(size=(12, 16)))
    idx, cos = nearest(train[[5, 10]], train)
    assert idx.tolist() == [5, 10] and np.allclose(cos, 1)  # a copied image is its own nearest, at cosine 1
    ref = reference(train, 4, seed=0)
    sims = train @ train.T
    assert len(ref.same_person) == 18 and np.allclose(np.sort(ref.same_person),
                                                      np.sort(sims[np.triu(person[:, None] == person, 1)]))
    brute = np.where(person[:, None] == person, -np.inf, sims).max(axis=1)
    assert np.allclose(np.sort(ref.other_person), np.sort(brute))
    names, protos = prototypes(train[4:8], np.array(["copy"] * 4))  # a generated identity = training person 1
    pidx, pcos = nearest(protos, ref.prototypes)
    assert names.tolist() == ["copy"] and pidx.tolist() == [1] and np.allclose(pcos, 1)

    copied = judge(cos, ref.other_person, ref.same_person)
    assert copied.decidable and copied.copying and copied.reaching == 2 and copied.copy == np.median(ref.same_person)
    text = _copying_verdict(cos, np.zeros(2), pcos, ref, 4.0)
    assert 'class="bad"' in text and "generated images and identities sit nearer the copy level" in text
    new = judge(ref.other_person, ref.other_person, ref.same_person)  # new faces sit at the new-face level
    assert new.decidable and not new.copying
    far = _copying_verdict(ref.other_person, np.ones(12), ref.nearest_identity, ref, 4.0)
    assert 'class="ok"' in far and "no sign of copying" in far
    blind = reference(normalise(rng.normal(size=(12, 16))), 4, seed=0)  # an encoder blind to these people
    assert not judge(np.ones(2), blind.other_person, blind.same_person).decidable


def test_a_miniature_run_shows_the_miniature_study(miniature_run, fake_shipped, tmp_path):
    """The paper's comparison in miniature, as the shipped models' study measured it, in the benchmarks section of a
    demo run's report; a line saying how to make it when the package lacks it."""
    (fake_shipped / "study.json").write_text(json.dumps({"seeds": [0, 1], "summary": {
        "rendered source (DigiFace row)": {"accuracy": [85.67, 88.67], "mean_accuracy": 87.17,
                                           "mean_tar_at_far_1e3": 37.0}}}))
    text = build_report(miniature_run, tmp_path / "page.html").read_text()
    section = text[text.index('<section id="benchmarks">'):]
    assert "The paper&#x27;s comparison in miniature" in section or "The paper's comparison in miniature" in section
    assert "rendered source (DigiFace row)" in section and "85.67, 88.67" in section and "87.17" in section
    (fake_shipped / "study.json").unlink()
    text = build_report(miniature_run, tmp_path / "page2.html").read_text()
    assert "bench_miniature_study.py" in text[text.index('<section id="benchmarks">'):]
