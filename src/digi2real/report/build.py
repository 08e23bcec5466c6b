"""`digi2real report`: one self-contained HTML page describing a run directory (DESIGN "report", issue 7).

Sections, each built from whatever artifacts the run holds (a stage that has not run, or a step that is not
configured, gives a short "not available: <why>" note, never an error):

1. settings: the resolved ``config.yaml``, ``pipeline.json`` stage status and timings, the artifacts on disk;
2. identity samples: for ``report.identities`` identities of the plan, their embedded source images beside
   ``report.samples`` generated aligned crops;
3. realism map (the paper's Figure 3): PCA of the token-pooled Arc2Face conditionings of real and synthetic faces,
   before and after adding ``generate.shift_weight * Delta``, plus the gap numbers stored with the shift;
4. identity similarity: genuine vs impostor ArcFace cosine, for the source embeddings and for generated crops
   (embedded here with the run's encoder), ``report.pairs`` pairs each, drawn with ``report.seed``;
5. not copying (miniature runs): the nearest training image of each generated image and the closest training identity
   of each generated identity, beside the training set's own reference cosines (:mod:`digi2real.report.copying`);
6. generation gate and acceptance: the dataset card's statistics, rejection reasons, similarity distributions;
7. training curves from ``train/train_log.jsonl``;
8. benchmarks: ``eval/results.json`` in the paper's tables beside the paper's rows, and the ROC plots;
9. audit: the audit stage's section (``audit/section.html``): contamination by the benchmarks and real faces,
   duplicates, consistency, variation and the realism gap (:mod:`digi2real.audit`).
"""

from __future__ import annotations


import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.errors import Digi2RealError
from digi2real.layout import RunLayout
from digi2real.report import figures
from digi2real.report import html as H

#: At most this many generated crops are embedded for the similarity histograms (pairs are drawn among them).
GENERATED_IMAGE_CAP = 1000
#: At most this many source images are shown per identity.
SOURCE_IMAGES_SHOWN = 8
TILE = 112  # side of the thumbnails in the sample grids

SECTIONS: tuple[tuple[str, str], ...] = (
    ("settings", "1. Settings"),
    ("samples", "2. Identity samples"),
    ("realism", "3. Realism map (paper Figure 3)"),
    ("similarity", "4. Identity similarity"),
    ("copying", "5. Not copying"),
    ("acceptance", "6. Generation gate and acceptance"),
    ("training", "7. Training curves"),
    ("benchmarks", "8. Benchmarks"),
    ("audit", "9. Audit: leakage, duplicates, consistency, realism gap"),
)


class NotAvailable(Exception):
    """Raised inside a section when what it shows does not exist yet; its message becomes the page's note."""


# ------------------------------------------------------------------------------------------------------ run context


@dataclass
class Run:
    """The run directory and its artifacts, each read at most once (a failure to read is remembered as the reason)."""

    layout: RunLayout
    cfg: Any  # ExperimentConfig
    _cache: dict[str, Any] = field(default_factory=dict)
    _crops: dict[str, np.ndarray | None] = field(default_factory=dict)  # crop path -> embedding (None: unreadable)

    def _get(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = (load(), None)
            except NotAvailable as exc:
                self._cache[key] = (None, str(exc))
            except Digi2RealError as exc:
                self._cache[key] = (None, str(exc))
        value, why = self._cache[key]
        if why is not None:
            raise NotAvailable(why)
        return value

    def store(self):
        def load():
            from digi2real.identity.store import read_store

            if not self.layout.embeddings.is_dir():
                raise NotAvailable(f"the embed stage has not run ({self.layout.embeddings} does not exist)")
            return read_store(self.layout.embeddings)
        return self._get("store", load)

    def plan(self):
        def load():
            from digi2real.identity.plan import read_plan

            if not self.layout.plan.is_file():
                raise NotAvailable(f"the plan stage has not run ({self.layout.plan} does not exist)")
            return read_plan(self.layout.plan)
        return self._get("plan", load)

    def selection(self) -> list[str]:
        def load():
            from digi2real.identity.select import read_selection

            if not self.layout.ids.is_file():
                raise NotAvailable(f"the select stage has not run ({self.layout.ids} does not exist)")
            return read_selection(self.layout.ids)
        return self._get("selection", load)

    def rows(self) -> list[dict]:
        def load():
            from digi2real.generation.manifest import MANIFEST_DIR, read_rows

            if not (self.layout.dataset / MANIFEST_DIR).is_dir():
                raise NotAvailable(f"the generate stage has not run ({self.layout.dataset / MANIFEST_DIR} does not "
                                   "exist)")
            rows = read_rows(self.layout.dataset)
            if not rows:
                raise NotAvailable(f"{self.layout.dataset}: the manifest holds no rows yet")
            return rows
        return self._get("rows", load)

    def generation_record(self) -> dict:
        def load():
            from digi2real.generation.manifest import SETTINGS_FILE

            path = self.layout.dataset / SETTINGS_FILE
            if not path.is_file():
                return {}
            try:
                return json.loads(path.read_text())
            except ValueError:
                return {}
        return self._get("generation", load)

    def source(self):
        def load():
            from digi2real.sources import open_source

            try:
                return open_source(self.cfg.source)
            except Digi2RealError as exc:
                raise NotAvailable(f"the source cannot be opened ({exc})") from None
        return self._get("source", load)

    def encoder(self):
        def load():
            from digi2real.faces.arcface import ArcFaceEncoder

            spec = resolve_encoder(self.cfg.encoder.model, self.layout)
            enc_cfg = self.cfg.encoder.model_copy(update={"model": spec})
            try:
                return ArcFaceEncoder.load(enc_cfg)
            except Digi2RealError as exc:
                raise NotAvailable(f"the run's ArcFace encoder cannot be loaded ({exc})") from None
        return self._get("encoder", load)

    def crop_embeddings(self, rows: list[dict]) -> tuple[np.ndarray, list[dict]]:
        """The run encoder's embeddings of accepted crops (manifest rows), each crop embedded once per report
        whichever sections show it; rows whose image cannot be read are left out. Returns (embeddings, their rows)."""
        from PIL import Image

        from digi2real.generation.manifest import IMAGES_DIR
        from digi2real.imageio import read_image

        todo = list(dict.fromkeys(r["path"] for r in rows if r["path"] not in self._crops))
        if todo:
            encoder = self.encoder()
            crops, read = [], []
            for path in todo:
                try:
                    rgb = read_image(self.layout.dataset / IMAGES_DIR / path)
                except Digi2RealError:
                    self._crops[path] = None
                    continue
                if rgb.shape[:2] != (112, 112):
                    rgb = np.asarray(Image.fromarray(rgb).resize((112, 112), Image.BILINEAR))
                crops.append(rgb)
                read.append(path)
            if crops:
                self._crops.update(zip(read, encoder(np.stack(crops))))
        kept = [r for r in rows if self._crops.get(r["path"]) is not None]
        if not kept:
            return np.zeros((0, 0), np.float32), []
        return np.stack([self._crops[r["path"]] for r in kept]), kept

    def close(self) -> None:
        value, _ = self._cache.get("source", (None, None))
        if value is not None:
            value.close()


def resolve_encoder(spec: str, layout: RunLayout) -> str:
    """The encoder file named by the run's config: as written, else relative to the run directory, else under its
    ``models/`` folder (miniature runs keep their models there); a hub spec is passed on unchanged."""
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    candidates = [layout.root / path, layout.models / path, layout.models / path.name,
                  layout.models / "Arc2Face" / path.name]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    return spec


def load_run(run_dir: Path):
    """The run's resolved config; a directory without ``config.yaml`` is not a run directory."""
    from digi2real.config import load_experiment

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if not run_dir.is_dir():
        raise Digi2RealError(f"{run_dir}: run directory not found; pass the output_dir of a `digi2real run`")
    if not layout.config.is_file():
        raise Digi2RealError(f"{run_dir}: not a run directory (no config.yaml); pass the output_dir of a "
                             "`digi2real run`, which holds config.yaml, pipeline.json and the stages' artifacts")
    return layout, load_experiment(layout.config)


# ------------------------------------------------------------------------------------------------------ 1. settings


#: The stages in pipeline order (pipeline.json is written with sorted keys); unknown names follow, as written.
STAGE_ORDER = ("embed", "select", "plan", "shift", "generate", "pack", "train", "eval", "report")


def _stage_table(state: dict) -> str:
    """``pipeline.json`` (``{"stages": {name: {fingerprint, complete, started, seconds, finished}}}``) as a table:
    one row per stage in pipeline order with its status, timings and fingerprint."""
    stages = state.get("stages") if isinstance(state.get("stages"), dict) else {
        k: v for k, v in state.items() if isinstance(v, dict)}
    if not stages:
        return H.not_available("pipeline.json records no stage")
    rank = {name: i for i, name in enumerate(STAGE_ORDER)}
    names = sorted(stages, key=lambda n: (rank.get(n, len(rank)), list(stages).index(n)))
    rows = []
    for name in names:
        info = stages[name]
        if not isinstance(info, dict):
            rows.append([name, str(info), "", ""])
            continue
        if "complete" in info:
            status = "complete" if info.get("complete") else "incomplete"
        else:
            status = str(info.get("status", "?"))
        timing_parts = []
        if isinstance(info.get("seconds"), (int, float)):
            timing_parts.append(f"{float(info['seconds']):.1f} s")
        for key in ("started", "finished"):
            if info.get(key):
                timing_parts.append(f"{key} {info[key]}")
        timings = info.get("timings")
        if isinstance(timings, dict):
            timing_parts += [f"{k} {H.fmt(v, 1)}" for k, v in timings.items()]
        elif timings is not None:
            timing_parts.append(str(timings))
        fp = info.get("fingerprint")
        fp_text = (fp[:12] + "...") if isinstance(fp, str) and len(fp) > 12 else ("" if fp is None else str(fp))
        rows.append([name, status, "; ".join(timing_parts), fp_text])
    return H.table(["stage", "status", "timings", "fingerprint"], rows)


SIZE_WALK_CAP = 20_000  # files looked at when sizing a directory (a full dataset holds hundreds of thousands)


def _size_text(path: Path) -> str:
    """Size of a file, or of a directory's files (a lower bound, marked '>=', past :data:`SIZE_WALK_CAP` files)."""
    if path.is_file():
        return _human_bytes(path.stat().st_size)
    total = files = 0
    for p in path.rglob("*"):
        if p.is_file():
            total += p.stat().st_size
            files += 1
            if files >= SIZE_WALK_CAP:
                return f">= {_human_bytes(total)} (more than {SIZE_WALK_CAP:,} files)"
    return f"{_human_bytes(total)} ({files:,} files)"


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def section_settings(run: Run) -> str:
    import yaml

    layout = run.layout
    out = [H.para(f"Run directory: {layout.root.resolve()}", "meta")]
    out.append("<h3>Stages (pipeline.json)</h3>")
    if layout.state.is_file():
        try:
            state = json.loads(layout.state.read_text())
            out.append(_stage_table(state) if isinstance(state, dict) else H.not_available("pipeline.json is not a "
                                                                                            "mapping"))
        except ValueError as exc:
            out.append(H.not_available(f"pipeline.json is unreadable ({exc})"))
    else:
        out.append(H.not_available(f"no {layout.state.name} (the stages were not run by `digi2real run`)"))
    out.append("<h3>Artifacts</h3>")
    artifacts = [("config.yaml", layout.config), ("pipeline.json", layout.state), ("embeddings/", layout.embeddings),
                 ("ids.csv", layout.ids), ("plan.parquet", layout.plan), ("shift.safetensors", layout.shift),
                 ("dataset/", layout.dataset), ("packed/", layout.packed), ("train/", layout.train),
                 ("eval/", layout.eval), ("benchmarks/", layout.benchmarks)]
    rows = [[name, "present" if path.exists() else "missing", _size_text(path) if path.exists() else ""]
            for name, path in artifacts]
    out.append(H.table(["artifact", "state", "size"], rows))
    out.append("<h3>Resolved configuration</h3>")
    text = yaml.safe_dump(run.cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None, width=110)
    out.append(H.pre(text))
    return "".join(out)


# ------------------------------------------------------------------------------------------------------ 2. samples


def _report_identities(run: Run, n: int) -> tuple[list[str], str]:
    """The first ``n`` identities of the plan (else of ids.csv, else of the embeddings) and where they came from."""
    try:
        plan = run.plan()
        ids = list(dict.fromkeys(plan.table.column("identity").to_pylist()))
        return ids[:n], "the plan"
    except NotAvailable:
        pass
    try:
        return run.selection()[:n], "ids.csv (no plan yet)"
    except NotAvailable:
        pass
    store = run.store()
    return list(store.identity_rows())[:n], "the embeddings (no selection yet)"


def _ok_rows_by_identity(run: Run) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    final: dict[str, dict] = {}
    for r in run.rows():
        if r.get("final"):
            final[r["key"]] = r
    for r in final.values():
        if r.get("status") == "ok" and r.get("path"):
            out.setdefault(r["identity"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: int(r.get("image_index", 0)))
    return out


def _tile(rgb: np.ndarray, caption: str, cls: str, title: str) -> str:
    data = H.array_png(rgb, TILE)
    return f'<figure class="tile">{H.img(data, title, cls, title)}<figcaption>{H.esc(caption)}</figcaption></figure>'


def section_samples(run: Run) -> str:
    from digi2real.generation.manifest import IMAGES_DIR
    from digi2real.imageio import read_image
    from digi2real.sources.base import SourceItem

    rcfg = run.cfg.report
    identities, origin = _report_identities(run, rcfg.identities)
    if not identities:
        raise NotAvailable("no identity to show")
    try:
        store = run.store()
        rows_of = store.identity_rows()
    except NotAvailable as exc:
        store, rows_of, store_why = None, {}, str(exc)
    else:
        store_why = ""
    try:
        source = run.source()
        source_why = ""
    except NotAvailable as exc:
        source, source_why = None, str(exc)
    try:
        generated = _ok_rows_by_identity(run)
        gen_why = ""
    except NotAvailable as exc:
        generated, gen_why = {}, str(exc)

    out = [H.para(f"{len(identities)} identities from {origin}: the source images that were embedded (left) and up "
                  f"to {rcfg.samples} accepted generated crops (right, with their ArcFace cosine to the conditioning "
                  "embedding).", "caption")]
    if gen_why:
        out.append(H.not_available(f"generated images: {gen_why}"))
    for ident in identities:
        left = ['<div class="side strip"><h4>source</h4>']
        if store is None:
            left.append(H.not_available(store_why))
        elif source is None:
            left.append(H.not_available(source_why))
        else:
            shown = 0
            for row in rows_of.get(ident, np.zeros(0, np.int64))[:SOURCE_IMAGES_SHOWN]:
                path = store.paths[int(row)]
                try:
                    rgb = source.load(SourceItem(ident, path))
                except Digi2RealError as exc:
                    left.append(H.not_available(str(exc)))
                    continue
                left.append(_tile(rgb, Path(path).name, "src", f"source {path}"))
                shown += 1
            if shown == 0 and ident not in rows_of:
                left.append(H.not_available("identity not in the embeddings"))
        left.append("</div>")
        right = ['<div class="side strip"><h4>generated</h4>']
        mine = generated.get(ident, [])[:rcfg.samples]
        for r in mine:
            try:
                rgb = read_image(run.layout.dataset / IMAGES_DIR / r["path"])
            except Digi2RealError as exc:
                right.append(H.not_available(str(exc)))
                continue
            sim = r.get("id_similarity")
            cap = f"#{r.get('image_index')}" + (f" {sim:.2f}" if isinstance(sim, (int, float)) else "")
            right.append(_tile(rgb, cap, "gen", f"generated {r['path']}"))
        if not mine and not gen_why:
            right.append(H.not_available("no accepted image of this identity"))
        right.append("</div>")
        if gen_why:
            right = []  # said once above the grid
        n_gen = len(generated.get(ident, []))
        label = (f'<div class="label">{H.esc(ident)}<span>{len(rows_of.get(ident, []))} embedded, '
                 f"{n_gen} generated</span></div>")
        out.append(f'<div class="ident">{label}{"".join(left)}{"".join(right)}</div>')
    return "".join(out)


# ------------------------------------------------------------------------------------------------------ 3. realism


def section_realism(run: Run) -> str:
    from digi2real.generation.shift import features_path, format_gap, read_shift

    layout = run.layout
    if not layout.shift.is_file():
        if run.cfg.shift.real is None:
            raise NotAvailable("no realism shift is configured (shift.real is null), so there is no Figure 3 for "
                               "this run")
        raise NotAvailable(f"the shift stage has not run ({layout.shift} does not exist)")
    try:
        shift = read_shift(layout.shift)
    except Digi2RealError as exc:
        raise NotAvailable(str(exc)) from None
    weight = float(run.cfg.generate.shift_weight)
    out = [H.para("Each point is one face: its ArcFace embedding turned into the Arc2Face conditioning (77 tokens x "
                  "hidden) and averaged over the tokens. The PCA is fitted on the real, synthetic and shifted points "
                  "together, so both panels share the same axes. The paper plots a t-SNE of 1000 FFHQ and 1000 "
                  "DigiFace images; the shift Delta = mean C(real) - mean C(synthetic) moves the synthetic cloud "
                  "onto the real one.", "caption")]
    feats = features_path(layout.shift)
    if feats.is_file():
        try:
            with np.load(feats, allow_pickle=False) as data:
                real, syn = np.asarray(data["real"], np.float64), np.asarray(data["synthetic"], np.float64)
        except (OSError, ValueError, KeyError) as exc:
            out.append(H.not_available(f"{feats} is unreadable ({exc})"))
        else:
            delta_pooled = shift.delta.double().mean(dim=0).numpy()
            if real.ndim != 2 or syn.ndim != 2 or not real.shape[1] == syn.shape[1] == delta_pooled.shape[0]:
                out.append(H.not_available(f"{feats}: feature shapes {real.shape}, {syn.shape} do not match the "
                                           f"shift ({tuple(shift.delta.shape)})"))
            else:
                png = figures.realism_map(real, syn, delta_pooled, weight)
                out.append(H.figure(png, "realism map", f"{len(real)} real, {len(syn)} synthetic faces; shift "
                                    f"weight {weight:g} (generate.shift_weight)"))
    else:
        out.append(H.not_available(f"no per-face features beside the shift ({feats.name}); re-create the shift with "
                                   "`digi2real shift` to get the map"))
    gap = shift.meta.get("gap")
    if isinstance(gap, dict) and isinstance(gap.get("before"), dict) and isinstance(gap.get("after"), dict):
        b, a = gap["before"], gap["after"]
        rows = [["mean-conditioning distance (Frobenius)", b.get("mean_distance"), a.get("mean_distance")],
                ["Frechet distance of token-pooled conditionings", b.get("frechet"), a.get("frechet")]]
        w = gap.get("weight", 1.0)
        out.append(f"<h3>Realism gap (measured with weight {H.esc(f'{w:g}' if isinstance(w, (int, float)) else w)})"
                   "</h3>")
        out.append(H.table(["measure", "before", "after"], rows))
    else:
        out.append(H.not_available("the shift records no gap measurement"))
    lines = format_gap(shift.meta)
    extra = [f"delta: {tuple(shift.delta.shape)}, norm {float(shift.delta.norm()):.4f}"]
    for key in ("n_real", "n_synthetic", "created", "arc2face_repo"):
        if key in shift.meta:
            extra.append(f"{key}: {shift.meta[key]}")
    out.append(H.pre("\n".join(lines + extra)))
    return "".join(out)


# ------------------------------------------------------------------------------------------------------ 4. similarity


def sample_pairs(labels: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` genuine pairs (two different rows of one label) and ``n`` impostor pairs (rows of two labels).

    A genuine pair's first row is drawn uniformly among rows whose label has at least two rows, its second uniformly
    among the other rows of that label; an impostor pair is two uniform rows, the second redrawn while the labels
    agree. Vectorised (a store of half a million rows takes milliseconds). Returns two ``k x 2`` row-index arrays,
    empty when no such pair exists."""
    labels = np.asarray(labels)
    empty = np.zeros((0, 2), np.int64)
    if len(labels) == 0 or n <= 0:
        return empty, empty
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")  # rows grouped by label
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.empty(len(labels), np.int64)  # where each row sits inside its label's group
    position[order] = np.arange(len(labels)) - np.repeat(starts, counts)
    genuine = empty
    eligible = np.flatnonzero(counts[inverse] >= 2)
    if len(eligible):
        a = rng.choice(eligible, size=n)
        g = inverse[a]
        other = rng.integers(0, counts[g] - 1)  # one of the count - 1 other members ...
        other = other + (other >= position[a])  # ... skipping the first row itself
        genuine = np.stack([a, order[starts[g] + other]], axis=1).astype(np.int64)
    impostor = empty
    if len(counts) >= 2:
        a = rng.integers(len(labels), size=n)
        b = rng.integers(len(labels), size=n)
        same = inverse[a] == inverse[b]
        while same.any():
            b[same] = rng.integers(len(labels), size=int(same.sum()))
            same = inverse[a] == inverse[b]
        impostor = np.stack([a, b], axis=1).astype(np.int64)
    return genuine, impostor


def pair_cosines(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    if len(pairs) == 0:
        return np.zeros(0)
    e = np.asarray(emb, np.float64)
    return np.einsum("ij,ij->i", e[pairs[:, 0]], e[pairs[:, 1]])


def _separation_row(name: str, genuine: np.ndarray, impostor: np.ndarray) -> list:
    def ms(v: np.ndarray) -> str:
        return f"{v.mean():.3f} +- {v.std():.3f}" if len(v) else "-"
    dprime = None
    if len(genuine) and len(impostor):
        pooled = np.sqrt(0.5 * (genuine.var() + impostor.var()))
        dprime = float(abs(genuine.mean() - impostor.mean()) / pooled) if pooled > 0 else None
    return [name, len(genuine), ms(genuine), len(impostor), ms(impostor), dprime]


def _generated_embeddings(run: Run, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """ArcFace embeddings of up to :data:`GENERATED_IMAGE_CAP` accepted crops: whole identities in a seeded random
    order, so that every embedded crop has genuine partners. Returns (embeddings, identity labels, manifest rows)."""
    by_ident = _ok_rows_by_identity(run)
    if not by_ident:
        raise NotAvailable("the dataset holds no accepted image")
    run.encoder()
    order = list(by_ident)
    rng.shuffle(order)
    chosen: list[dict] = []
    for ident in order:
        if len(chosen) >= GENERATED_IMAGE_CAP:
            break
        chosen += by_ident[ident][:GENERATED_IMAGE_CAP - len(chosen)]
    emb, kept = run.crop_embeddings(chosen)
    if not kept:
        raise NotAvailable("none of the accepted images could be read")
    return emb, np.asarray([r["identity"] for r in kept]), kept


def section_similarity(run: Run) -> str:
    rcfg = run.cfg.report
    panels: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    notes: list[str] = []
    table_rows = []
    try:
        store = run.store()
        rng = np.random.default_rng([rcfg.seed, 1])
        labels = np.asarray(store.identities)
        g, i = sample_pairs(labels, rcfg.pairs, rng)
        gs, im = pair_cosines(store.embeddings, g), pair_cosines(store.embeddings, i)
        name = f"source embeddings ({len(store)} images, {len(set(store.identities))} identities)"
        panels[name] = (gs, im)
        table_rows.append(_separation_row("source embeddings", gs, im))
    except NotAvailable as exc:
        notes.append(H.not_available(f"source embeddings: {exc}"))
    try:
        rng = np.random.default_rng([rcfg.seed, 2])
        emb, labels, _ = _generated_embeddings(run, rng)
        g, i = sample_pairs(labels, rcfg.pairs, rng)
        gs, im = pair_cosines(emb, g), pair_cosines(emb, i)
        panels[f"generated crops ({len(emb)} images, {len(set(labels.tolist()))} identities)"] = (gs, im)
        table_rows.append(_separation_row("generated crops", gs, im))
    except NotAvailable as exc:
        notes.append(H.not_available(f"generated crops: {exc}"))
    if not panels:
        return "".join(notes)
    out = [H.para(f"Cosine similarity of ArcFace embeddings: genuine pairs (two images of one identity) vs impostor "
                  f"pairs (two identities), up to {rcfg.pairs} of each (report.pairs), seed {rcfg.seed}. Generated "
                  f"crops are embedded here with the run's encoder ({Path(str(run.cfg.encoder.model)).name}), at most "
                  f"{GENERATED_IMAGE_CAP} of them. A larger d' means identities are better separated.", "caption")]
    out.append(H.figure(figures.similarity_histograms(panels), "similarity histograms"))
    out.append(H.table(["set", "genuine pairs", "genuine mean +- std", "impostor pairs", "impostor mean +- std",
                        "d'"], table_rows))
    out += notes
    return "".join(out)


# ------------------------------------------------------------------------------------------------------ 5. not copying


def _shown_rows(run: Run) -> list[dict]:
    """The accepted crops section 2 shows (``report.samples`` of each of its ``report.identities`` identities); when
    it shows none, up to that many crops of the first generated identities."""
    rcfg = run.cfg.report
    by_ident = _ok_rows_by_identity(run)
    try:
        identities, _ = _report_identities(run, rcfg.identities)
    except NotAvailable:
        identities = []
    shown = [r for ident in identities for r in by_ident.get(ident, [])[:rcfg.samples]]
    return shown or [r for ident in list(by_ident)[:rcfg.identities] for r in by_ident[ident][:rcfg.samples]]


def _conditioning_cosines(rows: list[dict]) -> np.ndarray:
    """Each crop's cosine to its conditioning embedding, as the generate stage measured it with the run's encoder."""
    return np.asarray([r["id_similarity"] if isinstance(r.get("id_similarity"), (int, float)) else np.nan
                       for r in rows], np.float64)


def _pair_tiles(run: Run, rows: list[dict], emb: np.ndarray, train) -> str:
    """Each generated crop beside its nearest training image (re-rendered), with the cosines."""
    from digi2real.generation.manifest import IMAGES_DIR
    from digi2real.imageio import read_image
    from digi2real.report.copying import nearest

    idx, cos = nearest(emb, train.embeddings)
    out = []
    for r, i, c in zip(rows, idx, cos):
        person, k = train.pool.item(i)
        sim = r.get("id_similarity")
        cap = f"#{r.get('image_index')}" + (f" cond {sim:.2f}" if isinstance(sim, (int, float)) else "")
        gen = _tile(read_image(run.layout.dataset / IMAGES_DIR / r["path"]), cap, "gen", f"generated {r['path']}")
        near = _tile(train.pool.render(i), f"{person}/{k} cos {c:.2f}", "nearest",
                     f"nearest training image: person {person} image {k}, cosine {c:.4f}")
        out.append(f'<div class="pair">{gen}{near}</div>')
    return "".join(out)


def _copying_grid(run: Run, rows: list[dict], train) -> str:
    """Section 2's crops, one line per identity, each beside its nearest training image."""
    emb, rows = run.crop_embeddings(rows)
    out = []
    for ident in dict.fromkeys(r["identity"] for r in rows):
        mine = [j for j, r in enumerate(rows) if r["identity"] == ident]
        label = f'<div class="label">{H.esc(ident)}<span>{len(mine)} shown</span></div>'
        tiles = _pair_tiles(run, [rows[j] for j in mine], emb[mine], train)
        out.append(f'<div class="ident">{label}<div class="side strip">{tiles}</div></div>')
    return "".join(out)


def _conditioning_words(near: float | None, cond: float | None) -> str:
    """What the conditioning cosine says beside the nearest-training one: whom the generated faces resemble more."""
    if near is None or cond is None:
        return "."
    if cond > near:
        return (", higher than their nearest training image's: the generated faces resemble the person they are given "
                "more than anyone the generator was trained on.")
    return (", not higher than their nearest training image's: by these numbers alone the generated faces resemble a "
            "training person at least as much as the person they are given.")


def _placement(j, what: str) -> str:
    f = H.fmt
    if not j.decidable:
        return (f"the levels do not separate (copy level {f(j.copy)}, new-{what} level {f(j.new)}), so this does not "
                "tell")
    nearer = ("the copy level than the new-" + what) if j.copying else ("the new-" + what + " level than the copy")
    rate = "-" if j.reference_rate is None else f"{100 * j.reference_rate:.1f}%"
    return (f"nearer {nearer} level; {j.reaching} of {j.total} reach the copy level {f(j.copy)}, as do {rate} of "
            f"the new-{what} reference")


def _copying_verdict(near: np.ndarray, cond: np.ndarray, id_cos: np.ndarray, ref, crops_per_identity: float) -> str:
    """The numbers in words: the copy and new-face levels the training set gives (:class:`copying.Judgement`), where
    the generated images and identities sit between them, and a verdict."""
    from digi2real.report.copying import judge, median

    f = H.fmt
    images = judge(near, ref.other_person, ref.same_person)
    idents = judge(id_cos, ref.nearest_identity, ref.same_identity)
    pairs = float(ref.identity_pairs.mean()) if len(ref.identity_pairs) else None
    out = [H.para(f"What a copy would look like (the copy level): two photographs of one training person have a "
                  f"median cosine of {f(images.copy)}, so a generated image copied from a training image would be "
                  f"about that close to it, or closer. What a new face looks like (the new-face level): a training "
                  f"image's nearest image of another training person is at a median {f(images.new)}. For identities "
                  f"(prototypes: the normalised mean of a person's embeddings), the copy level is the cosine of the "
                  f"prototypes of two halves of one training person's images (median {f(idents.copy)}), the "
                  f"new-identity level a training identity's closest other training identity (median "
                  f"{f(idents.new)}); two training identities are at {f(pairs)} on average."),
           H.para(f"Images: the nearest training image of the {len(near)} generated images is at a median cosine of "
                  f"{f(images.measured)} (max {f(float(near.max()) if len(near) else None)}): "
                  f"{_placement(images, 'face')}. Their own conditioning identity is at a median {f(median(cond))}"
                  + _conditioning_words(images.measured, median(cond))),
           H.para(f"Identities: the closest training identity of the {len(id_cos)} generated identities "
                  f"({crops_per_identity:.1f} crops each on average) is at a median {f(idents.measured)} (max "
                  f"{f(float(id_cos.max()) if len(id_cos) else None)}): {_placement(idents, 'identity')}.")]
    if images.copying or idents.copying:
        which = " and ".join(w for w, j in (("images", images), ("identities", idents)) if j.copying)
        cls, verdict = "bad", (f"Verdict: the generated {which} sit nearer the copy level than the new-face level: the "
                               "generator may be copying its training set; inspect the closest ones below.")
    elif images.decidable and idents.decidable:
        cls, verdict = "ok", ("Verdict: no sign of copying by this measure: the generated images and identities sit "
                              "nearer the new-face level than the copy level.")
    else:
        cls, verdict = "", ("Verdict: cannot be judged: with this encoder the training set's copy and new-face levels "
                            "do not separate (or the pool holds one image per person).")
    out.append(f'<p class="{cls}">{H.esc(verdict)}</p>' if cls else H.para(verdict))
    return "".join(out)


def _copying_tables(near: np.ndarray, cond: np.ndarray, id_cos: np.ndarray, ref) -> str:
    from digi2real.report.copying import quantiles

    headers = ["cosine (run's ArcFace)", "n", "mean", "5%", "median", "95%", "max"]
    images = [["generated image -> nearest training image", *quantiles(near)],
              ["generated image -> its conditioning identity", *quantiles(cond)],
              ["reference: two images of one training person", *quantiles(ref.same_person)],
              ["reference: training image -> nearest image of another training person", *quantiles(ref.other_person)]]
    identities = [["generated identity -> closest training identity", *quantiles(id_cos)],
                  ["reference: two halves of one training person's images", *quantiles(ref.same_identity)],
                  ["reference: training identity -> closest other training identity",
                   *quantiles(ref.nearest_identity)],
                  ["reference: two training identities", *quantiles(ref.identity_pairs)]]
    return ("<h3>Images</h3>" + H.table(headers, images, cls="copying images")
            + "<h3>Identities (prototypes)</h3>" + H.table(headers, identities, cls="copying identities"))


def section_copying(run: Run) -> str:
    import digi2real.miniature as miniature
    from digi2real.report import copying as C

    if not run.cfg.miniature:
        raise NotAvailable(C.NOT_MINIATURE)
    pool = C.read_pool(miniature.SHIPPED)
    rcfg = run.cfg.report
    if rcfg.training_identities is not None and rcfg.training_identities < pool.identities:
        pool = replace(pool, identities=rcfg.training_identities)
    emb, labels, rows = _generated_embeddings(run, np.random.default_rng([rcfg.seed, 2]))  # section 4's crops
    encoder = run.encoder()
    train = C.training_embeddings(pool, encoder, run.layout.models / C.CACHE)
    ref = C.reference(train.embeddings, pool.images, rcfg.seed)
    _, near = C.nearest(emb, train.embeddings)
    cond = _conditioning_cosines(rows)
    names, protos = C.prototypes(emb, labels)
    id_idx, id_cos = C.nearest(protos, ref.prototypes)
    how = (f"reused from {train.path.name} in the run's models folder (computed once in {train.seconds:.1f} s)"
           if train.reused else f"computed in {train.seconds:.1f} s and cached in {train.path}")
    out = [H.para(f"The miniature generator was trained on {pool.describe()} (the shipped record.json's pool). "
                  f"They are re-rendered at 112 px and embedded with the run's encoder ({encoder.model_path.name}, "
                  f"sha256 {encoder.file_hash()[:12]}...): {how}. Generated: {len(rows)} accepted crops of "
                  f"{len(names)} identities (section 4's, at most {GENERATED_IMAGE_CAP}).", "caption"),
           _copying_verdict(near, cond, id_cos, ref, len(rows) / max(len(names), 1)),
           _copying_tables(near, cond, id_cos, ref)]
    panels = [("images", {"generated -> nearest training image": near, "generated -> own conditioning": cond,
                          "two images of one training person": ref.same_person,
                          "training -> nearest other person": ref.other_person}),
              ("identities (prototypes)", {"generated -> closest training identity": id_cos,
                                           "two halves of one training person": ref.same_identity,
                                           "training -> closest other identity": ref.nearest_identity,
                                           "two training identities": ref.identity_pairs})]
    out.append(H.figure(figures.cosine_distributions(panels), "not copying distributions",
                        "Densities; each panel's sets share its bins."))
    out.append("<h3>Nearest training image of each generated image shown in section 2</h3>")
    out.append(_copying_grid(run, _shown_rows(run), train))
    closest = np.argsort(-near, kind="stable")[:rcfg.samples]
    out.append(f"<h3>The {len(closest)} generated images closest to a training image</h3>")
    out.append(f'<div class="strip">{_pair_tiles(run, [rows[j] for j in closest], emb[closest], train)}</div>')
    order = np.argsort(-id_cos, kind="stable")[:20]
    crops_of = dict(zip(*np.unique(labels, return_counts=True)))
    out.append(H.details(f"the {len(order)} generated identities closest to a training identity", H.table(
        ["generated identity", "crops", "closest training person", "cosine"],
        [[str(names[j]), int(crops_of[names[j]]), pool.first + int(id_idx[j]), float(id_cos[j])] for j in order],
        cls="copying closest")))
    return "".join(out)


# ------------------------------------------------------------------------------------------------------ 6. acceptance


def section_acceptance(run: Run) -> str:
    from digi2real.dataset.card import card_stats

    rows = run.rows()
    record = run.generation_record()
    planned = record.get("planned_images")
    if planned is None:
        try:
            planned = len(run.plan())
        except NotAvailable:
            planned = len({r["key"] for r in rows})
    stats = card_stats(rows, int(planned))
    gate = ((record.get("settings") or {}).get("generate") or {}).get("gate") or {}
    out = []
    if gate:
        if gate.get("min_similarity") is None:
            text = "Identity gate: off (generate.gate.min_similarity is null); only images without a face (or NaN) "
        else:
            text = (f"Identity gate: reject an ArcFace cosine to the {gate.get('against')} below "
                    f"{gate.get('min_similarity')}; rejected images ")
        out.append(H.para(text + f"are retried with up to {gate.get('max_retries')} new seeds.", "caption"))
    scalar = [[k.replace("_", " "), v] for k, v in stats.items() if not isinstance(v, dict)]
    rate = stats.get("acceptance_rate")
    scalar = [[k, f"{100 * rate:.1f}%" if k == "acceptance rate" and rate is not None else v] for k, v in scalar]
    out.append(H.table(["statistic", "value (quantiles: min / 5% / median / 95% / max)"], scalar))
    reasons = sorted(set(stats["rejected"]) | set(stats["rejected_attempts"]))
    out.append("<h3>Rejections</h3>")
    if reasons:
        out.append(H.table(["reason", "images rejected after all retries", "rejected attempts"],
                           [[r, stats["rejected"].get(r, 0), stats["rejected_attempts"].get(r, 0)] for r in reasons]))
        examples = [r.get("reason") for r in rows if r.get("status") != "ok" and r.get("reason")][:5]
        if examples:
            out.append(H.details("example reasons", H.pre("\n".join(str(e) for e in examples))))
    else:
        out.append(H.para("No attempt was rejected."))
    attempts = stats.get("attempts_of_accepted") or {}
    if attempts:
        out.append(H.table(["attempt of accepted image (0 = first seed)", "images"],
                           [[int(k), v] for k, v in sorted(attempts.items())]))
    final: dict[str, dict] = {}
    for r in rows:
        if r.get("final"):
            final[r["key"]] = r
    accepted = [r for r in final.values() if r.get("status") == "ok"]
    rejected_attempts = [r for r in rows if r.get("status") != "ok"]

    def values(rs: list[dict], key: str) -> np.ndarray:
        return np.asarray([r[key] for r in rs if isinstance(r.get(key), (int, float))], np.float64)

    det = np.asarray([r["detection"]["score"] for r in accepted
                      if isinstance(r.get("detection"), dict) and isinstance(r["detection"].get("score"),
                                                                             (int, float))], np.float64)
    threshold = gate.get("min_similarity")
    panels = [("ArcFace cosine to the conditioning", {"accepted": values(accepted, "id_similarity"),
                                                     "rejected attempts": values(rejected_attempts, "id_similarity")},
               threshold if gate.get("against", "conditioning") == "conditioning" else None),
              ("ArcFace cosine to the prototype", {"accepted": values(accepted, "proto_similarity"),
                                                  "rejected attempts": values(rejected_attempts, "proto_similarity")},
               threshold if gate.get("against") == "prototype" else None),
              ("MTCNN detection score", {"accepted": det}, None)]
    if any(len(v) for _, groups, _ in panels for v in groups.values()):
        out.append(H.figure(figures.value_histograms(panels), "acceptance distributions",
                            "Distributions over the final accepted images and over every rejected attempt."))
    card = run.layout.dataset / "card.md"
    if card.is_file():
        out.append(H.details("dataset card (card.md)", H.pre(card.read_text(encoding="utf-8", errors="replace"))))
    return "".join(out)


# ------------------------------------------------------------------------------------------------------ 7. training


def read_train_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(rec, dict):
            records.append(rec)
    return records


def section_training(run: Run) -> str:
    from digi2real.training.loop import LOG, MODEL

    path = run.layout.train / LOG
    if not path.is_file():
        raise NotAvailable(f"the train stage has not run ({path} does not exist)")
    records = read_train_log(path)
    train = [r for r in records if r.get("event", "train") == "train" and "step" in r and "loss" in r]
    verify = [r for r in records if r.get("event") == "verify" and "step" in r]
    start = [r for r in records if r.get("event") == "start"]
    if not train and not verify:
        raise NotAvailable(f"{path} holds no training record yet")
    out = []
    if start:
        s = start[-1]
        keys = ("device", "world", "batch_size", "per_process_batch", "num_images", "num_classes",
                "resumed_from_step")
        out.append(H.table(["setting", "value"], [[k.replace("_", " "), s.get(k)] for k in keys if k in s]))
    panels = []
    if train:
        steps = np.asarray([r["step"] for r in train], np.float64)

        def col(key: str) -> np.ndarray:
            return np.asarray([float(r.get(key, np.nan)) for r in train], np.float64)
        panels.append(("loss", {"loss": (steps, col("loss"))}, False))
        panels.append(("training accuracy", {"acc": (steps, col("acc"))}, False))
        panels.append(("learning rate", {"lr": (steps, col("lr"))}, False))
        if any("images_per_s" in r for r in train):
            panels.append(("throughput (images/s)", {"images/s": (steps, col("images_per_s"))}, False))
    if verify:
        names = sorted({k[:-4] for r in verify for k in r if k.endswith("_acc") and not k.endswith("_best_acc")})
        series = {}
        for name in names:
            pts = [(r["step"], 100 * float(r[f"{name}_acc"])) for r in verify if f"{name}_acc" in r]
            series[name] = (np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts]))
        if series:
            panels.append(("verification accuracy (%)", series, False))
    out.append(H.figure(figures.curves(panels), "training curves", f"{len(train)} training log lines, "
                        f"{len(verify)} verifications, from {path.name}"))
    if train:
        last = train[-1]
        out.append(H.table(["last record", "value"], [[k, last.get(k)] for k in
                                                      ("epoch", "step", "loss", "acc", "lr", "images_per_s")
                                                      if k in last]))
    if verify:
        last = verify[-1]
        names = sorted({k[:-4] for k in last if k.endswith("_acc") and not k.endswith("_best_acc")})
        out.append(H.table(["verification set", "last accuracy (%)", "best accuracy (%)", "best at step"],
                           [[n, 100 * float(last[f"{n}_acc"]),
                             100 * float(last.get(f"{n}_best_acc", last[f"{n}_acc"])),
                             last.get(f"{n}_best_step", last["step"])] for n in names]))
    model = run.layout.train / MODEL
    out.append(H.para(f"model: {model.name} ({_human_bytes(model.stat().st_size)})" if model.is_file() else
                      "model: not written yet (training has not finished)", "meta"))
    return "".join(out)


# ------------------------------------------------------------------------------------------------------ 8. benchmarks


def benchmark_tables(result: dict, name: str) -> str:
    """The paper's Tables 5/6 (and 7 when RFW ran) with this run's row, labelled ``name``, above the paper's rows;
    percentages with two decimals as in the paper."""
    from digi2real.evaluation.tables import MAIN_COLUMNS, PAPER_MAIN, PAPER_RFW, RFW_COLUMNS, main_row, rfw_row

    out = ["<h3>Verification accuracy (%) and IJB TAR@FAR=1e-4 (%) (paper Tables 5/6)</h3>"]
    headers = ["Model"] + [h for h, _, _ in MAIN_COLUMNS]
    rows = [[name] + main_row(result)] + [[n] + list(v) for n, v in PAPER_MAIN.items()]
    out.append(H.table(headers, rows, ["ours"] + ["paper"] * len(PAPER_MAIN), cls="bench main",
                       digits=2))
    ours_rfw = rfw_row(result)
    if ours_rfw is not None:
        out.append("<h3>RFW accuracy (%) (paper Table 7; std is the population std)</h3>")
        rows = [[name] + ours_rfw] + [[n] + list(v) for n, v in PAPER_RFW.items()]
        out.append(H.table(["Model", *RFW_COLUMNS], rows, ["ours"] + ["paper"] * len(PAPER_RFW),
                           cls="bench rfw", digits=2))
    main_sets = {key for _, section, key in MAIN_COLUMNS if section == "verification"}
    other = [(n, b) for n, b in (result.get("verification") or {}).items() if n not in main_sets]
    if other:
        out.append("<h3>Other verification sets (same 10-fold protocol)</h3>")
        out.append(H.table(["Set", "Accuracy (%)", "Std (%)", "TAR@FAR=1e-3 (%)", "Pairs"],
                           [[n, b.get("accuracy"), b.get("std"), b.get("tar_at_far_1e3"), b.get("pairs")]
                            for n, b in other], cls="bench other", digits=2))
    skipped = result.get("skipped") or []
    if skipped:
        out.append(H.details(f"{len(skipped)} benchmark(s) skipped (file not found)",
                             H.pre("\n".join(f"{s.get('benchmark')}: expected {s.get('expected')}"
                                             for s in skipped))))
    return "".join(out)


def _paper_only(why: str) -> str:
    """The note, then the paper's reference rows alone, so the page still shows what the run is measured against."""
    from digi2real.evaluation.tables import MAIN_COLUMNS, PAPER_MAIN

    rows = [[n] + list(v) for n, v in PAPER_MAIN.items()]
    return (H.not_available(why) + "<h3>The paper's numbers (Tables 5/6)</h3>"
            + H.table(["Model"] + [h for h, _, _ in MAIN_COLUMNS], rows, ["paper"] * len(rows), cls="bench paper",
                      digits=2))


#: The miniature study's summary, shipped beside the models it measured (see :func:`_miniature_study`).
STUDY_FILE = "study.json"


def section_benchmarks(run: Run) -> str:
    path = run.layout.eval / "results.json"
    if not path.is_file():
        return _paper_only(f"the eval stage has not run ({path} does not exist)")
    try:
        result = json.loads(path.read_text())
    except ValueError as exc:
        return _paper_only(f"{path} is unreadable ({exc})")
    if isinstance(result, list):
        result = result[0] if result else {}
    if not isinstance(result, dict):
        return _paper_only(f"{path} does not hold a results object")
    model = result.get("model") or {}
    out = [H.para(f"Row '{run.cfg.name} (this run)': model {result.get('name', '?')} ({model.get('kind', '?')}, "
                  f"{model.get('path', '?')}); benchmark data {result.get('data_root') or 'none (pairs sets only)'}. "
                  "Rows in italics are the paper's (IResNet50 + AdaFace); '-' marks a benchmark not run.", "caption"),
           benchmark_tables(result, f"{run.cfg.name} (this run)")]
    rocs = sorted(run.layout.eval.glob("roc_*.png"))
    if rocs:
        out.append("<h3>ROC curves</h3>")
        for roc in rocs:
            try:
                data = H.as_png(roc.read_bytes())
            except (OSError, ValueError) as exc:
                out.append(H.not_available(f"{roc.name} is unreadable ({exc})"))
                continue
            out.append(H.figure(data, roc.stem, roc.name))
    else:
        out.append(H.not_available("no ROC plot in eval/"))
    if run.cfg.miniature:
        out.append(_miniature_study())
    return "".join(out)


def _miniature_study() -> str:
    """The paper's comparison in miniature as the shipped models' study measured it (the package's
    assets/miniature/study.json, written by benchmarks/bench_miniature_study.py), for a demo run's reader."""
    import digi2real.miniature as miniature

    path = miniature.SHIPPED / STUDY_FILE
    try:
        study = json.loads(path.read_text())
        rows = [[name, ", ".join(f"{a:.2f}" for a in r["accuracy"]), r["mean_accuracy"], r["mean_tar_at_far_1e3"]]
                for name, r in study["summary"].items()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return H.not_available(f"the miniature study: {path} is missing or unreadable ({exc}); run "
                               "benchmarks/bench_miniature_study.py")
    seeds = ", ".join(str(x) for x in study.get("seeds", []))
    return ("<h3>The paper's comparison in miniature</h3>"
            + H.para("Measured once for the shipped models by benchmarks/bench_miniature_study.py (not by this run): "
                     "the demo's recipe with one change per row, 600 training images each, evaluated on the demo's "
                     f"held-out real-style pairs; seeds {seeds}. BENCHMARKS.md says why generated data does not beat "
                     "the rendered images here.", "caption")
            + H.table(["training data", "accuracy % per seed", "mean accuracy %", "mean TAR@FAR=1e-3 %"], rows,
                      digits=2))


# ------------------------------------------------------------------------------------------------------ the page


def section_audit(run: Run) -> str:
    """The audit stage's own section (``audit/section.html``, :mod:`digi2real.audit.report`), as it wrote it."""
    from digi2real.audit.run import SECTION_FILE

    path = run.layout.audit / SECTION_FILE
    if not path.is_file():
        why = ("audit.enabled is false" if not run.cfg.audit.enabled else
               f"the audit stage has not run ({path} does not exist)")
        raise NotAvailable(why)
    return path.read_text(encoding="utf-8")


BUILDERS: dict[str, Callable[[Run], str]] = {
    "settings": section_settings,
    "samples": section_samples,
    "realism": section_realism,
    "similarity": section_similarity,
    "copying": section_copying,
    "acceptance": section_acceptance,
    "training": section_training,
    "benchmarks": section_benchmarks,
    "audit": section_audit,
}


def render_report(run_dir: Path) -> str:
    """The page's HTML for ``run_dir`` (see the module doc); raises only for a directory that is not a run."""
    layout, cfg = load_run(Path(run_dir))
    run = Run(layout, cfg)
    started = time.perf_counter()
    parts = []
    try:
        for anchor, title in SECTIONS:
            try:
                body = BUILDERS[anchor](run)
            except NotAvailable as exc:
                body = H.not_available(str(exc))
            except Digi2RealError as exc:
                body = H.not_available(str(exc))
            except Exception as exc:  # noqa: BLE001 - one damaged artifact must not cost the whole page
                body = H.not_available(f"this section failed ({type(exc).__name__}: {exc})")
            parts.append(H.section(anchor, title, body))
    finally:
        run.close()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    subtitle = (f"digi2real run report: {layout.root.resolve()}; made {when} in {time.perf_counter() - started:.1f} s. "
                "Self-contained: every image is inside this file.")
    return H.page(f"{cfg.name}: Digi2Real run", subtitle, SECTIONS, parts)


def build_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN/report.html``) atomically; returns its path."""
    from digi2real.fileio import write_text

    run_dir = Path(run_dir)
    text = render_report(run_dir)
    target = Path(out) if out is not None else RunLayout(run_dir).report
    write_text(target, text)
    return target
