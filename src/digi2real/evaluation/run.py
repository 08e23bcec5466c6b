"""Evaluate one face model on the benchmarks of the paper (Tables 5-7) and compare result folders.

:func:`run_eval` runs every benchmark listed in ``cfg.benchmarks`` that exists under ``data_root``:

* verification sets ``<data_root>/<name>.bin`` (lfw, calfw, cplfw, agedb_30, cfp_fp, cfp_ff; insightface format);
* IJB-B / IJB-C 1:1 under ``<data_root>/IJBB`` and ``<data_root>/IJBC`` (insightface's release layout);
* RFW ``<data_root>/RFW/<Race>_test.bin`` (or ``<data_root>/<Race>_test.bin``).

A benchmark whose file is missing is skipped with a warning naming the expected path and listed under ``skipped``
in the results; anything else that goes wrong is an error. Flip-summed embeddings of the ``.bin`` sets are cached in
``out_dir/cache`` keyed by the model file's hash, the ``.bin`` file and the settings that change embeddings, so a
re-run only re-scores. Outputs (each written atomically): ``results.json``, ``results.md``, ``results.csv``,
``curves.npz`` (the ROC points, for :func:`compare`) and ``roc_<benchmark>.png``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.config import VERIFICATION_SETS, EvalConfig
from digi2real.errors import Digi2RealError
from digi2real.evaluation.models import FaceModel, load_face_model
from digi2real.evaluation.plots import Curve, plot_roc, verification_roc
from digi2real.evaluation.rfw import evaluate_rfw
from digi2real.evaluation.tables import SCHEMA, csv_table, far_key, markdown_tables
from digi2real.fileio import atomic_open, sha256_file, sha256_json, write_json, write_text

IJB_DIRS = {"ijbb": "IJBB", "ijbc": "IJBC"}
TITLES = {"lfw": "LFW", "calfw": "CALFW", "cplfw": "CPLFW", "agedb_30": "AgeDB-30", "cfp_fp": "CFP-FP",
          "cfp_ff": "CFP-FF", "ijbb": "IJB-B 1:1", "ijbc": "IJB-C 1:1", "rfw": "RFW"}
_DECODE_CHUNK = 1024  # images decoded at once: bounds memory on 12,000-image sets


def _stderr_warning(message: str) -> None:
    print(f"digi2real: warning: {message}", file=sys.stderr)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * float(value)


class _Evaluation:
    """State of one run_eval call (model, cache, curves); kept in an object so no module-level state is needed."""

    def __init__(self, model: FaceModel, model_sha: str, out_dir: Path, cfg: EvalConfig, progress: bool,
                 warn: Callable[[str], None]) -> None:
        self.model, self.model_sha, self.cfg = model, model_sha, cfg
        self.out_dir, self.cache_dir = out_dir, out_dir / "cache"
        self.progress, self.warn = progress, warn
        self.curves: dict[str, Curve] = {}
        self.cache_use: dict[str, str] = {}

    def _model_key(self) -> str:
        """What changes the embeddings on the model side: its bytes, its kind, the flip sum and the precision."""
        return sha256_json({"model": self.model_sha, "kind": self.model.kind, "flip": self.cfg.flip,
                            "precision": self.cfg.precision})

    def _cache_key(self, path: Path, members: Sequence[Path] = ()) -> str:
        # ... and on the data side the file itself (path, size, modification time), and for a pairs file the images
        # it lists, so an edited or replaced image is never served from the cache.
        stamps = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (path, *members)]
        return sha256_json({"model": self._model_key(), "files": stamps})

    @staticmethod
    def _read_set(path: Path) -> tuple[list[bytes], np.ndarray, list[Path]]:
        """Encoded images and labels of a verification set: an insightface .bin, or a pairs file of image paths."""
        from digi2real.evaluation.bins import read_bin, read_pairs_folder

        if path.suffix == ".bin":
            images, issame = read_bin(path)
            return images, issame, []
        paths, issame = read_pairs_folder(path.parent, path)
        return [p.read_bytes() for p in paths], issame, paths

    def bin_embeddings(self, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Flip-summed embeddings (2N x D) and labels of a .bin set, from the cache when it matches."""
        from digi2real.evaluation.bins import decode_pairs, read_pairs_folder

        cache = self.cache_dir / f"{name}.npz"
        members = [] if path.suffix == ".bin" else read_pairs_folder(path.parent, path)[0]
        key = self._cache_key(path, members)
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as data:
                    if str(data["key"]) == key:
                        self.cache_use[name] = "reused"
                        return data["embeddings"], data["issame"].astype(bool)
            except (OSError, KeyError, ValueError):
                pass  # unreadable or older cache: recompute and overwrite it
        images, issame, _ = self._read_set(path)
        chunks = []
        from tqdm import tqdm

        for start in tqdm(range(0, len(images), _DECODE_CHUNK), desc=name, unit="chunk", disable=not self.progress):
            batch = decode_pairs(images[start : start + _DECODE_CHUNK], 112, name=str(path))
            chunks.append(self.model.embed(batch))
        emb = np.concatenate(chunks).astype(np.float32)
        with atomic_open(cache, "wb") as handle:
            np.savez(handle, embeddings=emb, issame=np.asarray(issame, bool), key=np.array(key))
        self.cache_use[name] = "computed"
        return emb, np.asarray(issame, bool)

    def score_bin(self, name: str, path: Path) -> dict[str, Any]:
        """Verification protocol on one .bin; the result in percent, with its ROC kept for plotting."""
        from digi2real.evaluation.verification import evaluate_verification

        emb, issame = self.bin_embeddings(name, path)
        res = evaluate_verification(emb, issame, folds=self.cfg.folds)
        if issame.any() and not issame.all():
            self.curves[name] = verification_roc(emb, issame)
        return {"accuracy": _percent(res.accuracy), "std": _percent(res.std),
                "tar_at_far_1e3": _percent(res.tar_at_far_1e3), "pairs": int(res.pairs),
                "fold_accuracies": [_percent(a) for a in res.fold_accuracies],
                "best_thresholds": [float(t) for t in res.best_thresholds], "file": str(path)}

    def ijb(self, bench: str, root: Path) -> dict[str, float]:
        """IJB-B/C 1:1 TAR at each cfg.ijb_far, in percent (keys from :func:`far_key`)."""
        from digi2real.evaluation.ijb import run_ijb

        # The IJB feature cache does not know the model: one cache folder per model key, so a re-run with another
        # model (or --no-flip) into the same output folder can never reuse stale features.
        cache = self.cache_dir / f"{bench}-{self._model_key()[:16]}"
        res = run_ijb(root, IJB_DIRS[bench], self.model.embed, self.cfg, cache_dir=cache, progress=self.progress)
        self.curves[bench] = (np.asarray(res.fpr, np.float64), np.asarray(res.tpr, np.float64))
        return {far_key(far): _percent(tar) for far, tar in sorted(res.tar_at_far.items())}


def _skip(result: dict[str, Any], bench: str, expected: Path | str, warn: Callable[[str], None]) -> None:
    warn(f"{bench} skipped: {expected} not found")
    result["skipped"].append({"benchmark": bench, "expected": str(expected), "reason": "file not found"})


def run_eval(model_path: str | Path, data_root: str | Path | None, out_dir: str | Path, cfg: EvalConfig,
             progress: bool = True, warn: Callable[[str], None] = _stderr_warning,
             pairs: dict[str, Path] | None = None) -> dict[str, Any]:
    """Evaluate ``model_path`` on ``cfg.benchmarks`` under ``data_root``; write the results into ``out_dir``.

    ``pairs`` adds verification sets kept as image files plus a pairs file (``name -> pairs file``; image paths are
    relative to the pairs file's folder), scored with the same protocol; with ``data_root`` None only those run.
    Returns the results dict (schema in :mod:`digi2real.evaluation.tables`). Raises :class:`Digi2RealError` when
    ``data_root`` does not exist or when none of the requested benchmarks is there.
    """
    out_dir = Path(out_dir).expanduser()
    pairs = {name: Path(p).expanduser() for name, p in (pairs or {}).items()}
    for name, path in pairs.items():
        if not path.is_file():
            raise Digi2RealError(f"{path}: pairs file for {name!r} not found; expected lines 'image_a image_b 1|0' "
                                 "with image paths relative to the file's folder")
    if data_root is None and not pairs:
        raise Digi2RealError("nothing to evaluate: pass --data-root DIR (lfw.bin, IJBC/, RFW/ ...) or --pairs NAME=FILE")
    data_root = Path(data_root).expanduser() if data_root is not None else None
    if data_root is not None and not data_root.is_dir():
        raise Digi2RealError(f"{data_root}: benchmark data directory not found; pass --data-root DIR holding "
                             "lfw.bin, IJBC/, RFW/ ...")
    started = time.time()
    model = load_face_model(model_path, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = _Evaluation(model, sha256_file(model.path), out_dir, cfg, progress, warn)
    result: dict[str, Any] = {
        "schema": SCHEMA, "name": model.name, "model": {**model.describe(), "sha256": ev.model_sha},
        "settings": cfg.model_dump(mode="json"), "data_root": str(data_root) if data_root else None,
        "verification": {}, "ijb": {}, "rfw": None, "skipped": [],
    }
    for name, path in pairs.items():
        result["verification"][name] = ev.score_bin(name, path)
    for bench in dict.fromkeys(cfg.benchmarks) if data_root is not None else ():  # de-duplicated, order kept
        if bench in VERIFICATION_SETS:
            path = data_root / f"{bench}.bin"
            if path.is_file():
                result["verification"][bench] = ev.score_bin(bench, path)
            else:
                _skip(result, bench, path, warn)
        elif bench in IJB_DIRS:
            root = data_root / IJB_DIRS[bench]
            if root.is_dir():
                result["ijb"][bench] = ev.ijb(bench, root)
            else:
                _skip(result, bench, root, warn)
        elif bench == "rfw":
            rfw, skipped = evaluate_rfw(data_root, ev.score_bin, warn)
            result["rfw"] = rfw
            result["skipped"] += skipped
    ran = result["verification"] or result["ijb"] or result["rfw"]
    if not ran:
        raise Digi2RealError(f"{data_root}: none of the requested benchmarks ({', '.join(cfg.benchmarks)}) was "
                             "found there; see `digi2real eval --help` for the expected layout")
    result["embeddings_cache"] = ev.cache_use
    result["seconds"] = round(time.time() - started, 3)
    _write_outputs(out_dir, [result], {k: {result["name"]: c} for k, c in ev.curves.items()}, "results")
    _save_curves(out_dir / "curves.npz", ev.curves)
    write_json(out_dir / "results.json", result)
    return result


def _save_curves(path: Path, curves: dict[str, Curve]) -> None:
    arrays = {}
    for name, (fpr, tpr) in curves.items():
        arrays[f"{name}__fpr"], arrays[f"{name}__tpr"] = fpr, tpr
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _load_curves(path: Path) -> dict[str, Curve]:
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        names = sorted({k.rsplit("__", 1)[0] for k in data.files})
        return {n: (data[f"{n}__fpr"], data[f"{n}__tpr"]) for n in names}


def _plot_groups(curves: dict[str, dict[str, Curve]]) -> dict[str, tuple[str, dict[str, Curve]]]:
    """Benchmark -> (title, label -> curve); the four RFW races share one figure, labelled by race (and model)."""
    groups: dict[str, tuple[str, dict[str, Curve]]] = {}
    several = len({label for by_model in curves.values() for label in by_model}) > 1
    for bench, by_model in curves.items():
        if bench.startswith("rfw_"):
            race = bench.removeprefix("rfw_").capitalize()
            target = groups.setdefault("rfw", ("RFW (per race)", {}))[1]
            for label, curve in by_model.items():
                target[f"{label} {race}" if several else race] = curve
        else:
            groups[bench] = (TITLES.get(bench, bench), dict(by_model))
    return groups


def _write_outputs(out_dir: Path, results: list[dict[str, Any]], curves: dict[str, dict[str, Curve]],
                   stem: str) -> list[Path]:
    """Markdown + CSV tables and one ROC PNG per benchmark."""
    names = ", ".join(r.get("name", "?") for r in results)
    write_text(out_dir / f"{stem}.md", f"# Evaluation: {names}\n\n" + markdown_tables(results))
    write_text(out_dir / f"{stem}.csv", csv_table(results))
    plots = []
    for bench, (title, group) in _plot_groups(curves).items():
        if group:
            plots.append(plot_roc(out_dir / f"roc_{bench}.png", group, title))
    return plots


def compare(result_dirs: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Combine several ``run_eval`` output folders: ``compare.md``, ``compare.csv`` and overlaid ``roc_*.png``.

    Returns ``{"results": [...], "markdown": str, "csv": str, "plots": [paths]}``. Models with equal names are told
    apart by their folder name.
    """
    out = Path(out).expanduser()
    results: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Curve]] = {}
    seen: set[str] = set()
    for d in map(Path, result_dirs):
        path = d / "results.json"
        if not path.is_file():
            raise Digi2RealError(f"{path}: not found; pass folders written by `digi2real eval -o DIR`")
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise Digi2RealError(f"{path}: not a readable results file ({exc})") from None
        if not isinstance(res, dict) or res.get("schema") != SCHEMA:
            raise Digi2RealError(f"{path}: not a digi2real results file (schema {SCHEMA} expected)")
        name = str(res.get("name", d.name))
        if name in seen:
            name = f"{name} ({d.name})"
        seen.add(name)
        res["name"] = name
        results.append(res)
        for bench, curve in _load_curves(d / "curves.npz").items():
            curves.setdefault(bench, {})[name] = curve
    if not results:
        raise Digi2RealError("compare needs at least one results folder")
    out.mkdir(parents=True, exist_ok=True)
    plots = _write_outputs(out, results, curves, "compare")
    return {"results": results, "markdown": (out / "compare.md").read_text(), "csv": (out / "compare.csv").read_text(),
            "plots": [str(p) for p in plots]}
