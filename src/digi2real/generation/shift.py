"""The CLIP-space realism shift (paper section 3, "realism shift"; FACTS 1).

Arc2Face turns an ArcFace identity embedding ``e`` into the UNet's cross-attention conditioning ``C(e)``
(``77 x hidden``, FACTS 2). Rendered identities (DigiFace) and real faces (FFHQ) land in different regions of that
space; the paper moves every generated image's conditioning by the gap between the two::

    Delta = mean_{x in real} C(ArcFace(x)) - mean_{x in synthetic} C(ArcFace(x))

and samples from ``C(e) + lambda * Delta`` (lambda = 1, no re-normalisation; the paper's figure uses 1000 FFHQ and
1000 DigiFace images). This module collects the identity embeddings of both sides (image folders or ``digi2real
embed`` directories), computes ``Delta``, measures how much of the gap it closes, and stores it as a safetensors file
with its provenance.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from digi2real.errors import BadImageError, Digi2RealError
from digi2real.fileio import atomic_path, check_apart
from digi2real.frechet import frechet_distance
from digi2real.imageio import IMAGE_SUFFIXES, read_image

if TYPE_CHECKING:  # pragma: no cover
    from digi2real.config import AlignConfig, ShiftConfig
    from digi2real.faces.arcface import ArcFaceEncoder
    from digi2real.faces.mtcnn import MTCNN
    from digi2real.generation.arc2face import Arc2Face

TOKENS = 77  # CLIP prompt length: the conditioning is 77 x hidden
CROP = 112  # ArcFace input side: a 112 x 112 image is taken as an already-aligned crop (DigiFace, aligned folders)
DELTA_KEY = "delta"
JSON_KEYS = "digi2real.json_keys"  # metadata entry listing the keys whose values are JSON-encoded
KIND_KEY = "digi2real.kind"
KIND = "realism_shift"
READ_BATCH = 64  # images read (and detected) at once
MAX_EXAMPLES = 5  # failures quoted in a collection report
_FIX = "re-create it with `digi2real shift`"


@dataclass
class RealismShift:
    """``delta``: the paper's ``Delta`` (``77 x hidden``, float32, CPU); ``meta``: how and from what it was made."""

    delta: torch.Tensor
    meta: dict = field(default_factory=dict)
    #: The token-averaged conditionings of the two sides (``real``, ``synthetic``: N x hidden), kept in memory after
    #: :func:`compute_shift` and saved beside the shift by :func:`make_shift` for plots (the paper's Figure 3).
    features: dict[str, np.ndarray] | None = field(default=None, repr=False)


def features_path(shift_path: Path) -> Path:
    """Where :func:`make_shift` keeps the per-face conditioning features: ``shift.features.npz`` beside the shift."""
    return Path(shift_path).with_suffix(".features.npz")


# ------------------------------------------------------------------------------------------------ collecting inputs


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def sample_files(folder: Path, n: int, seed: int) -> list[Path]:
    """Every image under ``folder`` (recursive, sorted, hidden files and folders skipped); when there are more than
    ``n``, a random subset of ``n`` drawn with ``seed`` (returned sorted). The paper uses 1000 images per side."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Digi2RealError(f"{folder}: image folder not found; pass a folder of face images or an embeddings "
                             "directory made by `digi2real embed`")
    if n <= 0:
        raise Digi2RealError(f"{folder}: asked for {n} images; the number of images per side must be positive")
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and _visible(p, folder) and p.is_file())
    if not files:
        raise Digi2RealError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)}); pass a folder of face images")
    if len(files) <= n:
        return files
    rows = np.random.default_rng(seed).choice(len(files), size=n, replace=False)
    return [files[i] for i in sorted(rows.tolist())]


def is_embeddings_dir(source: Path) -> bool:
    """True when ``source`` is an embeddings directory written by ``digi2real embed``."""
    from digi2real.identity.store import EMBEDDINGS_FILE

    return Path(source).is_dir() and (Path(source) / EMBEDDINGS_FILE).is_file()


def _report(source: Path, kind: str, used: int, reasons: Counter, examples: list[str], **extra: Any) -> dict:
    return {"source": str(source), "kind": kind, "used": int(used), "skipped": int(sum(reasons.values())),
            "reasons": dict(sorted(reasons.items())), "examples": examples[:MAX_EXAMPLES], **extra}


def _store_embeddings(source: Path, n: int, seed: int, encoder: "ArcFaceEncoder | None") -> tuple[np.ndarray, dict]:
    """``n`` rows drawn with ``seed`` (all when fewer) from an embeddings directory, in row order."""
    from digi2real.identity.store import read_store

    store = read_store(source)
    if len(store) == 0:
        raise Digi2RealError(f"{source}: the embeddings directory holds no embeddings; re-run `digi2real embed` on "
                             "a folder with usable images")
    enc_meta = store.meta.get("encoder")
    made_with = enc_meta.get("sha256") if isinstance(enc_meta, dict) else None
    if made_with and encoder is not None and made_with != encoder.file_hash():
        raise Digi2RealError(f"{source}: embeddings were made with another ArcFace model (sha256 {made_with[:12]}...); "
                             f"re-run `digi2real embed` with {encoder.model_path}, or pass that model with --encoder")
    rows = np.arange(len(store))
    if len(store) > n:
        rows = np.sort(np.random.default_rng(seed).choice(len(store), size=n, replace=False))
    emb = np.ascontiguousarray(store.embeddings[rows], dtype=np.float32)
    return emb, _report(source, "embeddings", len(rows), Counter(), [], available=len(store),
                        encoder_sha256=made_with)


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _crops_of(files: Sequence[Path], align_cfg: "AlignConfig", get_detector: Any,
              reasons: Counter, examples: list[str]) -> list[np.ndarray]:
    """Aligned 112 x 112 crops of a batch of files: 112 x 112 images as they are, others through MTCNN; failures are
    counted in ``reasons`` (by status) and quoted in ``examples``."""
    from digi2real.faces.detect import BAD_IMAGE, detect_and_align

    crops: list[np.ndarray] = []
    to_detect: list[np.ndarray] = []
    names: list[str] = []
    for path in files:
        try:
            image = read_image(path)
        except BadImageError as exc:
            reasons[BAD_IMAGE] += 1
            examples.append(str(exc))
            continue
        if image.shape[:2] == (CROP, CROP):
            crops.append(image)
        else:
            to_detect.append(image)
            names.append(str(path))
    if to_detect:
        for result in detect_and_align(to_detect, get_detector(), align_cfg, names=names):
            if result.ok and result.crop is not None:
                crops.append(result.crop)
            else:
                reasons[result.status] += 1
                examples.append(result.reason or f"{result.status}")
    return crops


def identity_embeddings(source: Path, n: int, seed: int, encoder: "ArcFaceEncoder", align_cfg: "AlignConfig",
                        detector: "MTCNN | None" = None, progress: bool = True) -> tuple[np.ndarray, dict]:
    """ArcFace embeddings (``N x 512``, unit rows) of one side of the realism shift, and a collection report.

    ``source`` is an embeddings directory (``n`` rows drawn with ``seed``) or an image folder (``n`` files drawn by
    :func:`sample_files`). A 112 x 112 image is taken as an already-aligned crop (DigiFace, aligned folders); any other
    size is detected and aligned with MTCNN (FACTS 1: detect, crop, align to 112 x 112). Unreadable images and images
    without a face are skipped and counted. The report: ``source``, ``kind``, ``used``, ``skipped``, ``reasons``
    (status -> count) and ``examples`` (the first failures).
    """
    source = Path(source)
    if is_embeddings_dir(source):
        return _store_embeddings(source, n, seed, encoder)
    files = sample_files(source, n, seed)
    if align_cfg.size != CROP:  # ArcFace takes 112 x 112 crops whatever the align stage writes
        align_cfg = align_cfg.model_copy(update={"size": CROP})
    cache: dict[str, Any] = {"detector": detector}

    def get_detector() -> "MTCNN":
        if cache["detector"] is None:
            from digi2real.faces.mtcnn import MTCNN

            cache["detector"] = MTCNN.from_package(align_cfg.detector)
        return cache["detector"]

    from tqdm.auto import tqdm

    reasons: Counter = Counter()
    examples: list[str] = []
    parts: list[np.ndarray] = []
    with tqdm(total=len(files), unit="img", desc=f"shift: {source.name}", disable=not progress) as bar:
        for chunk in _chunks(files, READ_BATCH):
            crops = _crops_of(chunk, align_cfg, get_detector, reasons, examples)
            if crops:
                parts.append(encoder(np.stack(crops)))
            bar.update(len(chunk))
    if not parts:
        first = examples[0] if examples else "no usable image"
        raise Digi2RealError(f"{source}: none of the {len(files)} images gave a face (e.g. {first}); pass face "
                             "photos or 112 x 112 aligned crops")
    emb = np.concatenate(parts).astype(np.float32, copy=False)
    return emb, _report(source, "images", len(emb), reasons, examples, available=len(files))


# ------------------------------------------------------------------------------------------------------ statistics


def conditioning_stats(model: "Arc2Face", embeddings: np.ndarray | torch.Tensor,
                       batch_size: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """Mean conditioning ``mean_i C(e_i)`` (``77 x hidden``, float64, CPU) and the token-pooled features
    (``N x hidden`` float64: each ``C(e_i)`` averaged over its 77 tokens), encoded ``batch_size`` rows at a time."""
    n = len(embeddings)
    if n == 0:
        raise ValueError("conditioning_stats needs at least one identity embedding")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total: torch.Tensor | None = None
    pooled = np.empty((n, model.hidden_size), np.float64)
    for start in range(0, n, batch_size):
        cond = model.encode(embeddings[start:start + batch_size]).detach().to("cpu", torch.float64)
        part = cond.sum(dim=0)
        total = part if total is None else total + part
        pooled[start:start + len(cond)] = cond.mean(dim=1).numpy()
    assert total is not None
    return total / n, pooled


def _covariance(feats: np.ndarray) -> np.ndarray:
    if len(feats) < 2:
        return np.zeros((feats.shape[1], feats.shape[1]))
    return np.atleast_2d(np.cov(feats, rowvar=False))


def feature_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature rows."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return frechet_distance(a.mean(axis=0), _covariance(a), b.mean(axis=0), _covariance(b))


def realism_gap(real_mean: torch.Tensor, syn_mean: torch.Tensor, real_feats: np.ndarray, syn_feats: np.ndarray,
                delta: torch.Tensor, weight: float = 1.0) -> dict:
    """How far apart the two sides are before and after the synthetic side is moved by ``weight * delta``.

    ``mean_distance``: Frobenius norm of the difference of the mean conditionings; ``frechet``: Fréchet distance of
    Gaussians fitted to the token-pooled features (adding ``delta`` to every conditioning moves each pooled feature by
    ``delta.mean(0)`` and leaves the covariance as it is)."""
    rm, sm = real_mean.detach().cpu().double(), syn_mean.detach().cpu().double()
    d = delta.detach().cpu().double()
    shifted_feats = np.asarray(syn_feats, np.float64) + weight * d.mean(dim=0).numpy()
    return {
        "weight": float(weight),
        "before": {"mean_distance": float(torch.linalg.norm(rm - sm)),
                   "frechet": feature_frechet(real_feats, syn_feats)},
        "after": {"mean_distance": float(torch.linalg.norm(rm - (sm + weight * d))),
                  "frechet": feature_frechet(real_feats, shifted_feats)},
    }


def compute_shift(model: "Arc2Face", real_embeddings: np.ndarray | torch.Tensor,
                  synthetic_embeddings: np.ndarray | torch.Tensor, batch_size: int = 64,
                  weight: float = 1.0) -> RealismShift:
    """Paper section 3 (realism shift): ``Delta = mean C(real) - mean C(synthetic)``, no re-normalisation.

    ``meta`` records the counts, the hidden size, the ID encoder's SHA-256 (the only model ``Delta`` depends on), the
    Arc2Face repo and revision, the gap before/after adding ``weight * Delta``, the creation time and the version."""
    from digi2real import __version__

    if len(real_embeddings) == 0 or len(synthetic_embeddings) == 0:
        raise Digi2RealError("the realism shift needs embeddings on both sides (real and synthetic); got "
                             f"{len(real_embeddings)} real and {len(synthetic_embeddings)} synthetic")
    real_mean, real_feats = conditioning_stats(model, real_embeddings, batch_size)
    syn_mean, syn_feats = conditioning_stats(model, synthetic_embeddings, batch_size)
    delta = (real_mean - syn_mean).to(torch.float32).contiguous()
    info = model.info or {}
    meta = {
        "kind": KIND,
        "n_real": int(len(real_embeddings)),
        "n_synthetic": int(len(synthetic_embeddings)),
        "hidden": int(model.hidden_size),
        "encoder_sha256": model.encoder_sha256(),
        "arc2face_repo": info.get("repo"),
        "arc2face_revision": info.get("revision"),
        "gap": realism_gap(real_mean, syn_mean, real_feats, syn_feats, delta.double(), weight),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "digi2real_version": __version__,
    }
    return RealismShift(delta, meta, {"real": real_feats.astype(np.float32), "synthetic": syn_feats.astype(np.float32)})


# ---------------------------------------------------------------------------------------------------------- storage


def _encode_meta(meta: dict) -> dict[str, str]:
    """safetensors metadata holds strings only: strings stay as they are, everything else is JSON-encoded and its key
    listed under ``digi2real.json_keys`` so that reading restores it exactly."""
    out: dict[str, str] = {}
    json_keys: list[str] = []
    for key, value in meta.items():
        if isinstance(value, str):
            out[str(key)] = value
        else:
            out[str(key)] = json.dumps(value, sort_keys=True, default=str)
            json_keys.append(str(key))
    out[JSON_KEYS] = json.dumps(json_keys)
    out[KIND_KEY] = KIND
    return out


def _decode_meta(raw: dict[str, str] | None) -> dict:
    raw = dict(raw or {})
    json_keys = set(json.loads(raw.pop(JSON_KEYS, "[]")))
    raw.pop(KIND_KEY, None)
    return {k: (json.loads(v) if k in json_keys else v) for k, v in raw.items()}


def write_shift(path: Path, shift: RealismShift) -> None:
    """Write the shift atomically as safetensors: tensor ``delta`` (float32) plus the meta as string metadata."""
    from safetensors.torch import save_file

    delta = shift.delta.detach().to("cpu", torch.float32).contiguous()
    with atomic_path(Path(path)) as tmp:
        save_file({DELTA_KEY: delta}, str(tmp), metadata=_encode_meta(shift.meta))


def read_shift(path: Path, hidden: int | None = None) -> RealismShift:
    """Read a shift written by :func:`write_shift` (safetensors only, never pickles); ``hidden``, when given, is the
    generator's encoder width that ``delta`` (``77 x hidden``) must match."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise Digi2RealError(f"{path}: realism shift file not found; {_FIX}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            raw_meta = handle.metadata()
            delta = handle.get_tensor(DELTA_KEY) if DELTA_KEY in keys else None
    except Exception as exc:  # safetensors raises its own error types for foreign or damaged files
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise Digi2RealError(f"{path}: not a safetensors realism shift ({first}); {_FIX}") from None
    if delta is None:
        raise Digi2RealError(f"{path}: no {DELTA_KEY!r} tensor in the file (found {keys[:5]}); {_FIX}")
    want = f"{TOKENS} x {hidden}" if hidden is not None else f"{TOKENS} x hidden"
    if delta.ndim != 2 or delta.shape[0] != TOKENS or (hidden is not None and delta.shape[1] != hidden):
        raise Digi2RealError(f"{path}: delta has shape {tuple(delta.shape)}, expected {want} (made with another "
                             f"encoder?); {_FIX} and this generator")
    if not torch.isfinite(delta).all():
        raise Digi2RealError(f"{path}: delta holds NaN or infinite values; {_FIX}")
    try:
        meta = _decode_meta(raw_meta)
    except (ValueError, TypeError) as exc:
        raise Digi2RealError(f"{path}: unreadable metadata ({exc}); {_FIX}") from None
    return RealismShift(delta.to(torch.float32).contiguous(), meta)


# ------------------------------------------------------------------------------------------------------------ stage


def check_shift_paths(real: Path, synthetic: Path, output: Path) -> None:
    """Refuse, before anything loads, a side that is not a folder and an output that overlaps an input or is a
    folder (DESIGN "Safety": the shift and its features file never land in, or replace, an input)."""
    for flag, side in (("--real", real), ("--synthetic", synthetic)):
        if not Path(side).is_dir():
            raise Digi2RealError(f"{flag} {side}: folder not found; pass a folder of face images or an embeddings "
                                 "directory made by `digi2real embed`")
    output = Path(output)
    for target in (output, features_path(output)):
        check_apart(target, [real, synthetic])
        if target.is_dir():
            raise Digi2RealError(f"-o {output}: {target} is a folder; name the file to write, e.g. "
                                 f"{output / 'shift.safetensors'}")


def make_shift(real: Path, synthetic: Path, output: Path, model: "Arc2Face", encoder: "ArcFaceEncoder",
               cfg: "ShiftConfig", align_cfg: "AlignConfig", detector: "MTCNN | None" = None,
               progress: bool = True) -> RealismShift:
    """The ``shift`` stage: embeddings of ``cfg.images`` real and synthetic images (seed ``cfg.seed``), ``Delta``,
    its provenance (both sides' collection reports, the ArcFace file hash), written to ``output``."""
    check_shift_paths(Path(real), Path(synthetic), Path(output))
    real_emb, real_report = identity_embeddings(Path(real), cfg.images, cfg.seed, encoder, align_cfg, detector,
                                                progress)
    syn_emb, syn_report = identity_embeddings(Path(synthetic), cfg.images, cfg.seed, encoder, align_cfg, detector,
                                              progress)
    shift = compute_shift(model, real_emb, syn_emb, batch_size=cfg.batch_size)
    shift.meta.update({
        "real": real_report,
        "synthetic": syn_report,
        "arcface_sha256": encoder.file_hash(),
        "settings": {"images": cfg.images, "seed": cfg.seed, "batch_size": cfg.batch_size},
    })
    write_shift(Path(output), shift)
    if shift.features is not None:
        with atomic_path(features_path(Path(output))) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **shift.features)
    return shift


def _side_line(name: str, report: Any) -> str | None:
    if not isinstance(report, dict):
        return None
    line = f"{name}: {report.get('used', '?')} {report.get('kind', '')} from {report.get('source', '?')}"
    reasons = report.get("reasons") or {}
    if report.get("skipped"):
        detail = ", ".join(f"{k} {v}" for k, v in reasons.items())
        line += f", {report['skipped']} skipped ({detail})"
    return line


def format_gap(meta: dict) -> list[str]:
    """Human-readable lines for the CLI: what each side contributed and the gap before and after the shift."""
    lines = [text for text in (_side_line("real", meta.get("real")), _side_line("synthetic", meta.get("synthetic")))
             if text]
    gap = meta.get("gap")
    if isinstance(gap, dict) and "before" in gap and "after" in gap:
        w = gap.get("weight", 1.0)
        b, a = gap["before"], gap["after"]
        lines.append(f"mean-conditioning distance (Frobenius): {b['mean_distance']:.4f} -> {a['mean_distance']:.4f} "
                     f"(weight {w:g})")
        lines.append(f"Frechet distance of token-pooled conditionings: {b['frechet']:.4f} -> {a['frechet']:.4f}")
    else:
        lines.append("no gap measurement recorded")
    return lines
