"""`digi2real align`: detect and align every photo under a folder, resumably, with a JSONL report.

``src`` is a flat folder of photos or a folder-per-identity tree (any depth). The tree is mirrored into ``dst``:
``src/a/b.jpg`` becomes ``dst/a/b.png`` (or ``.jpg``), an aligned ``size x size`` ArcFace crop. Every image gets one
row in ``dst/align_report.jsonl``, appended and flushed as soon as the image is done:

``{"src": "a/b.jpg", "dst": "a/b.png", "status": "ok", "reason": null, "box": [x1, y1, x2, y2],
"landmarks": [[x, y] x 5], "score": 0.999, "attempt": "direct", "faces": 1, "width": 640, "height": 480}``

(paths relative to ``src`` and ``dst``; ``dst`` is null unless ``status`` is ``ok``). Re-running the same command
skips every image that already has a row (and, for ``ok`` rows, its output file), so an interrupted run continues
where it stopped; a half-written last row from a crash is dropped. The settings used are kept in
``dst/align_settings.json``, and resuming with different crop or detector settings is refused.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from digi2real.errors import ConfigError, Digi2RealError
from digi2real.fileio import check_apart, clean_temporaries, read_json, write_json
from digi2real.imageio import IMAGE_SUFFIXES, read_image, write_image
from digi2real.sources.base import natural_key

if TYPE_CHECKING:  # pragma: no cover
    from digi2real.config import AlignConfig
    from digi2real.faces.mtcnn import MTCNN

REPORT_NAME = "align_report.jsonl"
SETTINGS_NAME = "align_settings.json"


@dataclass
class AlignSummary:
    """Outcome of :func:`align_folder`. Counts cover every image under ``src`` (this run and earlier ones)."""

    src: str
    dst: str
    report: str
    total: int
    skipped: int  # already done by an earlier run
    processed: int  # done by this run
    ok: int = 0
    no_face: int = 0
    bad_image: int = 0
    error: int = 0
    padded: int = 0  # of the ok ones, found only on the padded canvas
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)  # the first few failed rows, for the summary

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable summary."""
        rate = f", {self.processed / self.seconds:.1f} img/s" if self.seconds > 0 and self.processed else ""
        out = [
            f"aligned {self.ok} of {self.total} images into {self.dst} "
            f"({self.processed} this run in {self.seconds:.1f} s{rate}, {self.skipped} already done)",
            f"  ok {self.ok} (padded retry {self.padded}), no_face {self.no_face}, bad_image {self.bad_image}, "
            f"error {self.error}",
            f"  report: {self.report}",
        ]
        for row in self.failures:
            out.append(f"  {row['status']}: {row.get('reason') or row['src']}")
        return out


# --------------------------------------------------------------------------------------------------------------------
# Listing and the report
# --------------------------------------------------------------------------------------------------------------------


def list_images(src: Path, exclude: Path | None = None) -> list[str]:
    """Image files under ``src`` (relative POSIX paths), in natural order, skipping hidden entries and ``exclude``."""
    out: list[str] = []
    exclude_res = exclude.resolve() if exclude is not None else None
    for root, dirs, files in os.walk(src):
        root_path = Path(root)
        dirs[:] = sorted(
            (d for d in dirs if not d.startswith(".")
             and (exclude_res is None or (root_path / d).resolve() != exclude_res)),
            key=natural_key,
        )
        for name in sorted(files, key=natural_key):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                out.append((root_path / name).relative_to(src).as_posix())
    # natural order of the whole relative path: folder by folder
    out.sort(key=lambda p: tuple(natural_key(part) for part in p.split("/")))
    return out


def output_names(rel_paths: list[str], fmt: str) -> dict[str, str]:
    """Output path (relative to dst) for each input: the same path with the suffix replaced by ``.png``/``.jpg``.

    Two inputs that would land on the same output (``a.jpg`` and ``a.png``) keep their old suffix in the name
    (``a.jpg.png``, ``a.png.png``) so neither overwrites the other.
    """
    suffix = "." + fmt
    plain = {p: str(Path(p).with_suffix(suffix).as_posix()) for p in rel_paths}
    counts = Counter(plain.values())
    return {p: (out if counts[out] == 1 else p + suffix) for p, out in plain.items()}


def read_report(path: Path) -> dict[str, dict]:
    """Latest row per source path from a report; a half-written final line (crash mid-write) is ignored.

    A malformed line anywhere else is an error naming the line (the file was edited or damaged by hand).
    """
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    last = len(lines) - 1
    for number, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict) or "src" not in row or "status" not in row:
                raise ValueError("not a report row")
        except ValueError as exc:
            if number == last:  # the unterminated tail of an interrupted write
                break
            raise Digi2RealError(f"{path}: line {number + 1} is not a valid report row ({exc}); fix or delete the "
                                 "line, or delete the report to redo every image") from None
        rows[row["src"]] = row
    return rows


def _open_report(path: Path):
    """Open the report for appending, first cutting off an unterminated last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        with open(path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                handle.seek(cut)
                handle.truncate()
    return open(path, "a", encoding="utf-8")


def _settings(cfg: "AlignConfig") -> dict:
    from digi2real.faces.mtcnn import WEIGHTS_SHA256

    d = cfg.detector
    return {
        "size": cfg.size,
        "format": cfg.format,
        "detector": {
            "model": "mtcnn",
            "weights_sha256": WEIGHTS_SHA256,
            "thresholds": list(d.thresholds),
            "factor": d.factor,
            "min_face_size": d.min_face_size,
            "pick": d.pick,
            "pad_retry": d.pad_retry,
        },
        # recorded only when set, so folders and datasets made before the setting existed still resume
        **({"input": cfg.input} if cfg.input != "photo" else {}),
    }


def _check_settings(dst: Path, settings: dict, src: Path) -> None:
    """Start an output folder, or resume one made with the same settings. A folder that already holds crops but whose
    settings file is missing or damaged is refused: nothing could tell its crops from new ones of another size."""
    path = dst / SETTINGS_NAME
    started = (dst / REPORT_NAME).is_file() and (dst / REPORT_NAME).stat().st_size > 0
    if path.is_file() or started:
        old = read_json(path, keys={"settings": dict},
                        fix=f"it records how the crops in {dst} were made: restore it, or align into a new output "
                        "folder")
        if old["settings"] != settings:
            from digi2real.config import settings_diff

            changed = "; ".join(f"{k} was {a!r}, now {b!r}" for k, a, b in settings_diff(old["settings"], settings))
            raise ConfigError(f"{dst}: this folder was aligned with other settings ({changed}); resuming would mix "
                              "two kinds of crops: use a new output folder, or delete this one to start over")
        return
    write_json(path, {"settings": settings, "src": str(src.resolve()), "report": REPORT_NAME})


# --------------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------------


def _read(src: Path, rel: str) -> Any:
    try:
        return read_image(src / rel)
    except Digi2RealError as exc:
        return exc


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def align_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    cfg: "AlignConfig | None" = None,
    progress: bool = True,
    detector: "MTCNN | None" = None,
    *,
    redo_failed: bool = False,
    limit: int | None = None,
) -> AlignSummary:
    """Align every image under ``src`` into ``dst`` (see the module docstring); returns an :class:`AlignSummary`.

    ``cfg``: crop size/format and detector settings (defaults: 112 px PNG, MTCNN 0.6/0.7/0.7). ``detector``: reuse a
    loaded :class:`~digi2real.faces.mtcnn.MTCNN` (its own thresholds apply). ``redo_failed``: also redo images whose
    earlier row is ``no_face`` or ``bad_image`` (``error`` rows are always redone). ``limit``: process at most this
    many new images (for trials). Raises :class:`~digi2real.errors.Digi2RealError` for a missing ``src``, an empty
    one, or a ``dst`` made with other settings; never for one bad image.
    """
    from tqdm import tqdm

    from digi2real.config import AlignConfig
    from digi2real.faces.detect import BAD_IMAGE, ERROR, NO_FACE, OK, detect_and_align

    cfg = cfg or AlignConfig()
    src_path = Path(src)
    dst_path = Path(dst)
    if not src_path.is_dir():
        raise Digi2RealError(f"{src_path}: source folder not found (expected a folder of photos or of identity "
                             "folders)")
    if dst_path.exists() and not dst_path.is_dir():
        raise Digi2RealError(f"{dst_path}: output path exists and is not a folder")
    check_apart(dst_path, [src_path])  # `align photos -o photos` would replace the photos by their crops
    rels = list_images(src_path)
    if not rels:
        raise Digi2RealError(f"{src_path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files, in "
                             "sub-folders too)")
    outs = output_names(rels, cfg.format)
    dst_path.mkdir(parents=True, exist_ok=True)
    _check_settings(dst_path, _settings(cfg), src_path)
    clean_temporaries([dst_path], recursive=True)
    report_path = dst_path / REPORT_NAME
    rows = read_report(report_path)

    def done(rel: str) -> bool:
        row = rows.get(rel)
        if row is None or row["status"] == ERROR:
            return False
        if row["status"] == OK:
            return (dst_path / outs[rel]).is_file()
        return not redo_failed

    todo = [r for r in rels if not done(r)]
    skipped = len(rels) - len(todo)
    if limit is not None:
        todo = todo[:max(0, int(limit))]
    if todo and detector is None:
        from digi2real.faces.mtcnn import MTCNN

        detector = MTCNN.from_package(cfg.detector)
    batch = max(1, cfg.detector.batch_size)
    started = time.perf_counter()
    counts: Counter[str] = Counter()
    bar = tqdm(total=len(rels), initial=skipped, unit="img", desc="align", disable=not progress or not todo,
               dynamic_ncols=True, smoothing=0.1)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="align-read")
    try:
        with _open_report(report_path) as report:
            chunks = list(_chunks(todo, batch))
            pending: list[Future] | None = [pool.submit(_read, src_path, r) for r in chunks[0]] if chunks else None
            for k, chunk in enumerate(chunks):
                images = [f.result() for f in pending or []]
                # read the next chunk while this one is detected
                pending = [pool.submit(_read, src_path, r) for r in chunks[k + 1]] if k + 1 < len(chunks) else None
                results = detect_and_align(images, detector, cfg, names=[str(src_path / r) for r in chunk])
                for rel, res in zip(chunk, results):
                    row = {"src": rel, "dst": None}
                    if res.status == OK:
                        try:
                            write_image(dst_path / outs[rel], res.crop)
                            row["dst"] = outs[rel]
                        except OSError as exc:
                            raise Digi2RealError(f"{dst_path / outs[rel]}: cannot write the aligned crop "
                                                 f"({exc.strerror or exc}); check free space and permissions") from None
                    row.update(res.to_dict())
                    report.write(json.dumps(row) + "\n")
                    report.flush()
                    rows[rel] = row
                    counts[res.status] += 1
                bar.set_postfix(ok=counts[OK], no_face=counts[NO_FACE], bad=counts[BAD_IMAGE], refresh=False)
                bar.update(len(chunk))
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
    final = Counter()
    padded = 0
    failures = []
    for rel in rels:
        row = rows.get(rel)
        if row is None:
            continue
        final[row["status"]] += 1
        padded += int(row["status"] == OK and row.get("attempt") == "padded")
        if row["status"] != OK and len(failures) < 5:
            failures.append({"src": rel, "status": row["status"], "reason": row.get("reason")})
    return AlignSummary(
        src=str(src_path), dst=str(dst_path), report=str(report_path), total=len(rels), skipped=skipped,
        processed=sum(counts.values()), ok=final[OK], no_face=final[NO_FACE], bad_image=final[BAD_IMAGE],
        error=final[ERROR], padded=padded, seconds=time.perf_counter() - started, failures=failures,
    )
