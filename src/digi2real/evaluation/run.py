"""Evaluate one face model on the benchmarks of the paper (Tables 5-7) and compare result folders.

:func:`run_eval` runs every benchmark listed in ``cfg.benchmarks`` that exists under ``data_root``:

* verification sets ``<data_root>/<name>.bin`` (lfw, calfw, cplfw, agedb_30, cfp_fp, cfp_ff; insightface format);
* IJB-B / IJB-C 1:1 under ``<data_root>/IJBB`` and ``<data_root>/IJBC`` (insightface's release layout);
* RFW ``<data_root>/RFW/<Race>_test.bin`` (or ``<data_root>/<Race>_test.bin``).

A benchmark whose file is missing is skipped with a warning naming the expected path and listed under ``skipped``
in the results; anything else that goes wrong is an error. Flip-summed embeddings of the ``.bin`` sets are cached in
``out_dir/cache``, one file per set named by a key of the model file's hash, the ``.bin`` file and the settings that
change embeddings, so a re-run only re-scores (delete ``cache/`` to reclaim its space). Outputs (each written
atomically): ``results.json``, ``results.md``, ``results.csv``, ``curves.npz`` (the ROC points, for :func:`compare`)
and ``roc_<benchmark>.png``.

Every input is hostile until checked (DESIGN "Safety"): the output folder may not overlap an input, is proved writable
before any work and is locked against a second eval into it; a bad input stops the run with one line naming the file
and the fix, and a failed run leaves every file it found in the output folder as it was (it can only add cache files).
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.config import BENCHMARKS, VERIFICATION_SETS, EvalConfig
from digi2real.errors import Digi2RealError
from digi2real.evaluation.models import FaceModel, load_face_model
from digi2real.evaluation.plots import Curve, plot_roc, verification_roc
from digi2real.evaluation.rfw import RACES, evaluate_rfw
from digi2real.evaluation.tables import SCHEMA, csv_table, far_key, markdown_tables
from digi2real.fileio import (atomic_open, check_apart, clean_temporaries, exclusive_lock, read_json, safe_name,
                              sha256_file, sha256_json, temporary_prefix, write_json, write_text)

IJB_DIRS = {"ijbb": "IJBB", "ijbc": "IJBC"}
TITLES = {"lfw": "LFW", "calfw": "CALFW", "cplfw": "CPLFW", "agedb_30": "AgeDB-30", "cfp_fp": "CFP-FP",
          "cfp_ff": "CFP-FF", "ijbb": "IJB-B 1:1", "ijbc": "IJB-C 1:1", "rfw": "RFW"}
_DECODE_CHUNK = 1024  # images decoded at once: bounds memory on 12,000-image sets
_PAIRS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_LOCK = ".eval.lock"


def _stderr_warning(message: str) -> None:
    print(f"digi2real: warning: {message}", file=sys.stderr)


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * float(value)


def _read_image_file(path: Path) -> bytes:
    """An image file of a pairs set, read up to the image byte limit (a huge file is refused, not read whole)."""
    from digi2real.imageio import BYTES_ENV, max_image_bytes

    limit = max_image_bytes()
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise Digi2RealError(f"{path}: larger than the limit of {limit:,} bytes for one image; shrink it, or raise the "
                             f"limit with {BYTES_ENV}")
    return data


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

    def embed(self, images: np.ndarray, what: str) -> np.ndarray:
        """The model's flip-summed embeddings of ``images``; NaN or infinity is an error naming the model."""
        emb = self.model.embed(images)
        if not np.isfinite(emb).all():
            raise Digi2RealError(f"{self.model.path}: the model gives NaN or infinite embeddings on {what}; the model "
                                 "file is damaged (NaN weights?) or its precision overflows: try --precision fp32")
        return emb

    def _cached(self, cache: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached embeddings and labels when ``cache`` holds them for ``key`` and they are sound, else None."""
        if not cache.is_file():
            return None
        try:
            with np.load(cache, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                emb, issame = data["embeddings"], data["issame"]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None  # damaged or older cache: recompute and overwrite it
        sound = (emb.ndim == 2 and emb.dtype == np.float32 and issame.ndim == 1 and emb.shape[0] == 2 * issame.size
                 and bool(np.isfinite(emb).all()))
        return (emb, issame.astype(bool)) if sound else None

    @staticmethod
    def _read_set(path: Path) -> tuple[list[bytes], np.ndarray, list[str] | None]:
        """Encoded images, labels and (for a pairs file) the image file names of a verification set."""
        from digi2real.evaluation.bins import read_bin, read_pairs_folder

        if path.suffix == ".bin":
            images, issame = read_bin(path)
            return images, issame, None
        paths, issame = read_pairs_folder(path.parent, path)
        return [_read_image_file(p) for p in paths], issame, [str(p) for p in paths]

    def bin_embeddings(self, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Flip-summed embeddings (2N x D) and labels of a .bin set, from the cache when it matches."""
        from digi2real.evaluation.bins import decode_pairs, read_pairs_folder

        members = [] if path.suffix == ".bin" else read_pairs_folder(path.parent, path)[0]
        key = self._cache_key(path, members)
        # The key names the file: a run with another model or other data into the same folder adds a cache file and
        # never replaces one, so a run that fails half-way leaves every earlier file as it was.
        cache = self.cache_dir / f"{name}-{key[:20]}.npz"
        if (hit := self._cached(cache, key)) is not None:
            self.cache_use[name] = "reused"
            return hit
        images, issame, files = self._read_set(path)
        chunks = []
        from tqdm import tqdm

        for start in tqdm(range(0, len(images), _DECODE_CHUNK), desc=name, unit="chunk", disable=not self.progress):
            stop = start + _DECODE_CHUNK
            batch = decode_pairs(images[start:stop], 112, name=str(path), first=start,
                                 names=files[start:stop] if files else None)
            chunks.append(self.embed(batch, str(path)))
        emb = np.concatenate(chunks).astype(np.float32)
        with atomic_open(cache, "wb") as handle:
            np.savez(handle, embeddings=emb, issame=np.asarray(issame, bool), key=np.array(key))
        self.cache_use[name] = "computed"
        return emb, np.asarray(issame, bool)

    def score_bin(self, name: str, path: Path) -> dict[str, Any]:
        """Verification protocol on one .bin; the result in percent, with its ROC kept for plotting."""
        from digi2real.evaluation.verification import evaluate_verification

        emb, issame = self.bin_embeddings(name, path)
        if issame.size < self.cfg.folds:
            raise Digi2RealError(f"{path}: {issame.size} pairs cannot be split into {self.cfg.folds} folds; use "
                                 "--set eval.folds=N with N <= the number of pairs, or a larger benchmark")
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

        # The IJB feature cache knows neither the model nor where the crops came from: one cache folder per model key
        # and data folder (its meta files' sizes and times, the crop folder's time), so another model, --no-flip or
        # another copy of IJB evaluated into the same output folder never reuses stale features.
        meta = root / "meta"
        stamps = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in (sorted(meta.glob("*.txt")) if meta.is_dir() else [])]
        crops = root / "loose_crop"
        data = {"root": str(root.resolve()), "meta": stamps,
                "crops": crops.stat().st_mtime_ns if crops.is_dir() else None}
        cache = self.cache_dir / f"{bench}-{sha256_json({'model': self._model_key(), 'data': data})[:16]}"
        res = run_ijb(root, IJB_DIRS[bench], lambda batch: self.embed(batch, f"{root}/loose_crop"), self.cfg,
                      cache_dir=cache, progress=self.progress)
        self.curves[bench] = (np.asarray(res.fpr, np.float64), np.asarray(res.tpr, np.float64))
        return {far_key(far): _percent(tar) for far, tar in sorted(res.tar_at_far.items())}


def _skip(result: dict[str, Any], bench: str, expected: Path | str, warn: Callable[[str], None]) -> None:
    warn(f"{bench} skipped: {expected} not found")
    result["skipped"].append({"benchmark": bench, "expected": str(expected), "reason": "file not found"})


def _check_pairs(pairs: dict[str, Path]) -> None:
    """Names and files of the --pairs sets: a name becomes a cache file name and a results key, so it is one plain
    word that is not a built-in benchmark's; each file and the images it lists must exist (checked up front)."""
    from digi2real.evaluation.bins import read_pairs_folder

    reserved = set(BENCHMARKS) | {f"rfw_{race.lower()}" for race in RACES}
    for name, path in pairs.items():
        flag = f"--pairs {name}={path}"
        if not _PAIRS_NAME.match(name):
            raise Digi2RealError(f"{flag}: NAME must be letters, digits and _.+- (at most 64), starting with a letter "
                                 "or digit; rename it")
        safe_name(name, flag)  # the rule every name from data follows (the pattern above is stricter)
        if name.lower() in reserved:
            raise Digi2RealError(f"{flag}: {name!r} is the name of a built-in benchmark; choose another NAME")
        if not path.is_file():
            raise Digi2RealError(f"{path}: pairs file for {name!r} not found; expected lines 'image_a image_b 1|0' "
                                 "with image paths relative to the file's folder")
        read_pairs_folder(path.parent, path)


def _check_output(out_dir: Path, inputs: Sequence[Path | None]) -> None:
    """-o must be a folder (or not exist yet) apart from every input (DESIGN "Safety")."""
    if out_dir.exists() and not out_dir.is_dir():
        raise Digi2RealError(f"-o {out_dir}: is a file, not a folder; choose a folder for the results (it is created "
                             "if missing)")
    check_apart(out_dir, inputs, flag="-o")


def _prepare_output(out_dir: Path, what: str = "eval") -> None:
    """Create ``out_dir``, prove it writable before any work, and remove the temporaries a killed run left there."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir, prefix=temporary_prefix("write-check")):
            pass
    except OSError as exc:
        raise Digi2RealError(f"-o {out_dir}: cannot write there ({exc.strerror or exc}); choose a folder you can "
                             f"write to for the {what} results") from None
    cache = out_dir / "cache"
    owned = [out_dir, cache]
    if cache.is_dir() and not cache.is_symlink():
        owned += [d for d in cache.iterdir() if d.is_dir() and not d.is_symlink() and d.name.startswith(("ijb",))]
    clean_temporaries(owned)


def run_eval(model_path: str | Path, data_root: str | Path | None, out_dir: str | Path, cfg: EvalConfig,
             progress: bool = True, warn: Callable[[str], None] = _stderr_warning,
             pairs: dict[str, Path] | None = None) -> dict[str, Any]:
    """Evaluate ``model_path`` on ``cfg.benchmarks`` under ``data_root``; write the results into ``out_dir``.

    ``pairs`` adds verification sets kept as image files plus a pairs file (``name -> pairs file``; image paths are
    relative to the pairs file's folder), scored with the same protocol; with ``data_root`` None only those run.
    Returns the results dict (schema in :mod:`digi2real.evaluation.tables`). Raises :class:`Digi2RealError` for a bad
    input or output (checked before any work where it can be), when ``data_root`` does not exist, or when none of the
    requested benchmarks is there.
    """
    out_dir = Path(out_dir).expanduser()
    pairs = {name: Path(p).expanduser() for name, p in (pairs or {}).items()}
    if data_root is None and not pairs:
        raise Digi2RealError("nothing to evaluate: pass --data-root DIR (lfw.bin, IJBC/, RFW/ ...) or "
                             "--pairs NAME=FILE")
    data_root = Path(data_root).expanduser() if data_root is not None else None
    if data_root is not None and not data_root.is_dir():
        raise Digi2RealError(f"{data_root}: benchmark data directory not found (or not a folder); pass --data-root "
                             "DIR holding lfw.bin, IJBC/, RFW/ ...")
    model_path = Path(model_path).expanduser()
    _check_output(out_dir, [model_path, data_root, *(p.parent for p in pairs.values())])
    _check_pairs(pairs)
    if not pairs and data_root is not None and not _any_present(data_root, cfg.benchmarks):
        raise Digi2RealError(f"{data_root}: none of the requested benchmarks ({', '.join(cfg.benchmarks)}) was "
                             "found there; see `digi2real eval --help` for the expected layout")
    started = time.time()
    model = load_face_model(model_path, cfg)
    _prepare_output(out_dir)
    with exclusive_lock(out_dir / _LOCK, "another `digi2real eval` is writing into this folder; wait for it to "
                                         "finish or choose another -o"):
        ev = _Evaluation(model, sha256_file(model.path), out_dir, cfg, progress, warn)
        result = _evaluate(ev, model, data_root, cfg, pairs, warn)
        result["seconds"] = round(time.time() - started, 3)
        previous = _previous_plots(out_dir / "results.json")
        plots = _write_outputs(out_dir, [result], {k: {result["name"]: c} for k, c in ev.curves.items()}, "results")
        result["plots"] = sorted(p.name for p in plots)
        _save_curves(out_dir / "curves.npz", ev.curves)
        write_json(out_dir / "results.json", result)
        for stale in previous - set(result["plots"]):  # ROC plots of benchmarks this run did not score
            with contextlib.suppress(FileNotFoundError):
                (out_dir / stale).unlink()
    return result


def _evaluate(ev: _Evaluation, model: FaceModel, data_root: Path | None, cfg: EvalConfig, pairs: dict[str, Path],
              warn: Callable[[str], None]) -> dict[str, Any]:
    """Score every requested benchmark that is present; the results dict without timing and plots."""
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
    if not (result["verification"] or result["ijb"] or result["rfw"]):
        raise Digi2RealError(f"{data_root}: none of the requested benchmarks ({', '.join(cfg.benchmarks)}) was "
                             "found there; see `digi2real eval --help` for the expected layout")
    result["embeddings_cache"] = ev.cache_use
    return result


def _any_present(data_root: Path, benchmarks: Sequence[str]) -> bool:
    """Whether any requested benchmark's file or folder exists under ``data_root`` (checked before the model loads)."""
    from digi2real.evaluation.rfw import find_rfw_bins

    for bench in benchmarks:
        if ((bench in VERIFICATION_SETS and (data_root / f"{bench}.bin").is_file())
                or (bench in IJB_DIRS and (data_root / IJB_DIRS[bench]).is_dir())
                or (bench == "rfw" and any(find_rfw_bins(data_root).values()))):
            return True
    return False


def _previous_plots(path: Path) -> set[str]:
    """The ROC plots an earlier run recorded in ``path`` (results.json), if it is ours and readable."""
    try:
        old = read_json(path, fix="", keys={"plots": list})
    except Digi2RealError:
        return set()
    return {p for p in old["plots"] if isinstance(p, str) and re.fullmatch(r"roc_[A-Za-z0-9_.+-]+\.png", p)}


def _save_curves(path: Path, curves: dict[str, Curve]) -> None:
    arrays = {}
    for name, (fpr, tpr) in curves.items():
        arrays[f"{name}__fpr"], arrays[f"{name}__tpr"] = fpr, tpr
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _load_curves(path: Path) -> dict[str, Curve]:
    """The ROC curves saved by an eval run; a damaged file is one error naming it (compare cannot guess curves)."""
    if not path.is_file():
        return {}
    fix = f"re-run `digi2real eval` into {path.parent}, or delete {path.name} to compare without ROC plots"
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise Digi2RealError(f"{path}: damaged ({type(exc).__name__}: {str(exc)[:80]}); {fix}") from None
    names = sorted({k.rsplit("__", 1)[0] for k in arrays})
    curves = {}
    for n in names:
        fpr, tpr = arrays.get(f"{n}__fpr"), arrays.get(f"{n}__tpr")
        if (fpr is None or tpr is None or fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size == 0
                or not np.issubdtype(fpr.dtype, np.floating) or not np.issubdtype(tpr.dtype, np.floating)
                or not (np.isfinite(fpr).all() and np.isfinite(tpr).all())):
            raise Digi2RealError(f"{path}: the curve {n!r} is not two equally long arrays of finite rates; {fix}")
        curves[n] = (fpr.astype(np.float64), tpr.astype(np.float64))
    return curves


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
        if group and _PAIRS_NAME.match(bench):
            plots.append(plot_roc(out_dir / f"roc_{bench}.png", group, title))
    return plots


# ------------------------------------------------------------------------------------------------------- compare

_NUMBER = (int, float)


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value))


def _results_problem(res: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a results.json (None when it can be tabulated)."""
    if res.get("schema") != SCHEMA:
        return f"schema {str(res.get('schema'))[:40]!r}, expected {SCHEMA!r}"
    if not isinstance(res.get("name"), str) or not res["name"].strip():
        return "'name' missing or not text"
    verification, ijb, rfw, skipped = (res.get(k) for k in ("verification", "ijb", "rfw", "skipped"))
    if not isinstance(verification, dict) or not all(
            isinstance(k, str) and _PAIRS_NAME.match(k) and isinstance(v, dict)
            and _number_or_none(v.get("accuracy")) and _number_or_none(v.get("std"))
            and _number_or_none(v.get("tar_at_far_1e3")) and isinstance(v.get("pairs", 0), int)
            for k, v in verification.items()):
        return "'verification' is not a mapping of sets to numbers"
    if not isinstance(ijb, dict) or not all(
            isinstance(v, dict) and all(isinstance(f, str) and _number_or_none(x) for f, x in v.items())
            for v in ijb.values()):
        return "'ijb' is not a mapping of sets to TAR numbers"
    if rfw is not None and not (isinstance(rfw, dict) and isinstance(rfw.get("accuracy"), dict)
                                and all(_number_or_none(x) for x in rfw["accuracy"].values())
                                and _number_or_none(rfw.get("mean")) and _number_or_none(rfw.get("std"))):
        return "'rfw' is not null or a mapping with per-race accuracies"
    if not isinstance(skipped, list) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), str) and "\n" not in s[k] and "\r" not in s[k]
                                        for k in ("benchmark", "expected"))
            for s in skipped):
        return "'skipped' is not a list of {benchmark, expected}"
    return None


def _read_results(folder: Path) -> dict[str, Any]:
    """A results.json written by `digi2real eval`, checked to have the shape the tables read."""
    path = folder / "results.json"
    fix = f"pass folders written by `digi2real eval -o DIR`, or re-run that eval into {folder}"
    if not folder.is_dir():
        raise Digi2RealError(f"{folder}: not a folder; {fix}")
    res = read_json(path, fix=fix)
    problem = _results_problem(res)
    if problem:
        raise Digi2RealError(f"{path}: not a digi2real results file ({problem}); {fix}")
    return res


def _display_name(name: str) -> str:
    """A model name safe inside a Markdown table row and a CSV cell: one line, no column separators."""
    return " ".join(name.split()).replace("|", "/")[:120] or "model"


def compare(result_dirs: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Combine several ``run_eval`` output folders: ``compare.md``, ``compare.csv`` and overlaid ``roc_*.png``.

    Returns ``{"results": [...], "markdown": str, "csv": str, "plots": [paths]}``. Models with equal names are told
    apart by their folder name. Every folder is read and checked before anything is written.
    """
    out = Path(out).expanduser()
    dirs = [Path(d).expanduser() for d in result_dirs]
    if not dirs:
        raise Digi2RealError("compare needs at least one results folder")
    _check_output(out, dirs)
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise Digi2RealError("compare: a results folder is given twice; pass each folder once")
    results: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Curve]] = {}
    seen: set[str] = set()
    for d in dirs:
        res = _read_results(d)
        name = _display_name(res["name"])
        if name in seen:
            name = _display_name(f"{name} ({d.name})")
        base, k = name, 2
        while name in seen:  # two folders of the same name holding models of the same name
            name, k = f"{base} #{k}", k + 1
        seen.add(name)
        res["name"] = name
        results.append(res)
        for bench, curve in _load_curves(d / "curves.npz").items():
            curves.setdefault(bench, {})[name] = curve
    _prepare_output(out, "compare")
    plots = _write_outputs(out, results, curves, "compare")
    return {"results": results, "markdown": (out / "compare.md").read_text(), "csv": (out / "compare.csv").read_text(),
            "plots": [str(p) for p in plots]}
