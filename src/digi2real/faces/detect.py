"""From images to aligned face crops: input checks, face picking, the padded-canvas retry, one record per image.

:func:`detect_and_align` is what every stage calls (generation, real photos for the realism shift, ``digi2real
align``). It never raises because of one image: an unusable image becomes a ``bad_image`` record and an image without a
face a ``no_face`` record, each with a reason a person can act on, while the rest of the batch is aligned.

The record (:class:`FaceResult`) holds the chosen face's box, five landmarks and score in the input image's pixels,
which attempt found it (``direct`` or ``padded``), how many faces that attempt found, and the aligned crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from digi2real.errors import BadImageError
from digi2real.faces.template import align_face, template_for

if TYPE_CHECKING:  # pragma: no cover
    from digi2real.config import AlignConfig, DetectorConfig
    from digi2real.faces.mtcnn import MTCNN, Detections

OK = "ok"
NO_FACE = "no_face"
BAD_IMAGE = "bad_image"
ERROR = "error"  # the detector itself failed on this image (not the image's fault); retried on resume
STATUSES = (OK, NO_FACE, BAD_IMAGE, ERROR)
MIN_SIDE = 8  # smaller arrays cannot hold a face (same floor as digi2real.imageio)


@dataclass
class FaceResult:
    """What happened to one image.

    ``status``: ``ok`` (a face was found and aligned), ``no_face``, ``bad_image`` (unusable input) or ``error`` (the
    detector failed; ``reason`` says how). ``box`` is ``[x1, y1, x2, y2]``, ``landmarks`` five ``[x, y]`` (eyes,
    nose, mouth corners), both in the input image's pixels; ``score`` is the detector's face probability;
    ``attempt`` is ``direct`` or ``padded`` (found only on the padded canvas); ``faces`` counts the faces found by
    that attempt; ``crop`` is the aligned ``size x size x 3`` uint8 crop (not serialised).
    """

    status: str
    reason: str | None = None
    box: list[float] | None = None
    landmarks: list[list[float]] | None = None
    score: float | None = None
    attempt: str | None = None
    faces: int = 0
    width: int | None = None
    height: int | None = None
    crop: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict:
        """JSON-ready fields (no crop); coordinates rounded to 0.01 px, score to 1e-6."""
        return {
            "status": self.status,
            "reason": self.reason,
            "box": None if self.box is None else [round(float(v), 2) for v in self.box],
            "landmarks": None if self.landmarks is None else [[round(float(v), 2) for v in p] for p in self.landmarks],
            "score": None if self.score is None else round(float(self.score), 6),
            "attempt": self.attempt,
            "faces": self.faces,
            "width": self.width,
            "height": self.height,
        }


# --------------------------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------------------------


def to_rgb(image: Any, name: str = "image") -> np.ndarray:
    """Any reasonable image array as RGB uint8 ``H x W x 3``; :class:`BadImageError` (naming ``name``) otherwise.

    Accepts numpy arrays and PIL images: grayscale (``H x W`` or ``H x W x 1``), gray + alpha, RGB, RGBA (alpha
    composited on black, as :mod:`digi2real.imageio` does), 8-bit, 16-bit/32-bit integers (scaled from 0..65535
    when any value exceeds 255), bool, and floats (0..1 when the maximum is at most 1, else 0..255).
    """
    if image is None:
        raise BadImageError(f"{name}: no image (None)")
    if hasattr(image, "mode") and hasattr(image, "getbands") and not isinstance(image, np.ndarray):  # a PIL image
        if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"):
            # palette, CMYK, YCbCr, ...: let PIL produce colours (keeping transparency, composited below)
            transparent = image.mode in ("PA", "RGBa", "La") or "transparency" in getattr(image, "info", {})
            image = image.convert("RGBA" if transparent else "RGB")
        image = np.asarray(image)
    if type(image).__module__.startswith("torch"):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[2] not in (1, 2, 3, 4):
            image = np.moveaxis(image, 0, 2)
    arr = np.asarray(image)
    if arr.dtype == object or arr.size == 0:
        raise BadImageError(f"{name}: not an image array (shape {arr.shape}, dtype {arr.dtype})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)):
        raise BadImageError(f"{name}: unsupported image layout {arr.shape}; expected H x W (gray), H x W x 3 (RGB) "
                            "or H x W x 4 (RGBA)")
    if min(arr.shape[:2]) < MIN_SIDE:
        raise BadImageError(f"{name}: image is {arr.shape[1]}x{arr.shape[0]} px, too small for a face "
                            f"(< {MIN_SIDE} px)")
    data = _to_uint8(arr, name)
    if data.ndim == 2:
        return np.ascontiguousarray(np.repeat(data[..., None], 3, axis=2))
    channels = data.shape[2]
    if channels == 3:
        return np.ascontiguousarray(data)
    color = np.repeat(data[..., :1], 3, axis=2) if channels == 2 else data[..., :3]
    alpha = data[..., -1:].astype(np.float32) / 255.0
    return np.ascontiguousarray(np.clip(color.astype(np.float32) * alpha + 0.5, 0, 255).astype(np.uint8))


def _to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top = 65535.0 if int(arr.max()) > 255 else 255.0
        if int(arr.min()) < 0:
            raise BadImageError(f"{name}: negative pixel values in a {arr.dtype} image; expected 0..255 or 0..65535")
        return np.clip(arr.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise BadImageError(f"{name}: image contains NaN or infinite values")
        scale = 255.0 if float(arr.max()) <= 1.0 else 1.0
        return np.clip(arr.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)
    raise BadImageError(f"{name}: unsupported pixel type {arr.dtype}")


# --------------------------------------------------------------------------------------------------------------------
# Picking
# --------------------------------------------------------------------------------------------------------------------


def pick_face(det: "Detections", how: str = "largest", image_size: tuple[int, int] | None = None) -> int:
    """Index of the face to keep among ``det``: ``largest`` box area, most ``confident`` score, or most ``central``
    (box centre nearest the image centre; ``image_size`` is ``(width, height)``). Ties go to the higher score."""
    if len(det) == 0:
        raise ValueError("pick_face: no faces to pick from")
    boxes = det.boxes.astype(np.float64)
    scores = det.scores.astype(np.float64)
    if how == "largest":
        key = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    elif how == "confident":
        key = scores
    elif how == "central":
        if image_size is None:
            raise ValueError("pick_face: 'central' needs image_size=(width, height)")
        cx = 0.5 * (boxes[:, 0] + boxes[:, 2]) - image_size[0] / 2.0
        cy = 0.5 * (boxes[:, 1] + boxes[:, 3]) - image_size[1] / 2.0
        key = -np.hypot(cx, cy)
    else:
        raise ValueError(f"pick_face: unknown rule {how!r}; choose largest, confident or central")
    order = np.lexsort((-scores, -key))  # primary: key descending; then score descending
    return int(order[0])


# --------------------------------------------------------------------------------------------------------------------
# Detection with retries, alignment
# --------------------------------------------------------------------------------------------------------------------


def _detect_many(detector: "MTCNN", arrays: list[np.ndarray]) -> list["Detections | BaseException"]:
    """Detect on a list of images; if a batched pass fails, fall back to one image at a time (errors per image)."""
    if not arrays:
        return []
    try:
        return list(detector.detect(arrays))
    except Exception:  # noqa: BLE001 - isolate the failing image below
        out: list[Detections | BaseException] = []
        for arr in arrays:
            try:
                out.append(detector.detect(arr))
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out


def _pad_canvas(arr: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    pad = max(1, int(round(fraction * max(arr.shape[0], arr.shape[1]))))
    return np.pad(arr, ((pad, pad), (pad, pad), (0, 0))), pad


def _settings_text(dcfg: "DetectorConfig") -> str:
    t = "/".join(f"{v:g}" for v in dcfg.thresholds)
    return f"MTCNN thresholds {t}, min face {dcfg.min_face_size} px"


def _already_aligned(arrays: dict[int, np.ndarray], results: list, cfg: "AlignConfig", keep_crops: bool,
                     labels: Sequence[str]) -> list[FaceResult]:
    """``align.input: aligned``: each image is an ArcFace-aligned square crop already, so its landmarks are the
    template's at its size and the crop is the same similarity alignment (a pure scaling) to ``cfg.size``."""
    for i, arr in arrays.items():
        h, w = arr.shape[:2]
        lm = template_for(w).astype(np.float64) if h == w else None
        if lm is None:
            results[i] = FaceResult(BAD_IMAGE, width=w, height=h, reason=f"{labels[i]} is {w}x{h}: align.input "
                                    "'aligned' takes square crops; use align.input 'photo' to detect the face")
            continue
        results[i] = FaceResult(OK, box=[0.0, 0.0, float(w), float(h)], landmarks=lm.tolist(), score=None,
                                attempt="aligned", faces=1, width=w, height=h,
                                crop=align_face(arr, lm, cfg.size) if keep_crops else None)
    return [r if r is not None else FaceResult(ERROR, reason="internal: image was not processed") for r in results]


def detect_and_align(
    images: Sequence[Any],
    detector: "MTCNN | None" = None,
    cfg: "AlignConfig | None" = None,
    *,
    names: Sequence[str] | None = None,
    keep_crops: bool = True,
) -> list[FaceResult]:
    """Detect, pick and align the face in each image; one :class:`FaceResult` per image, in order. Never raises for
    one image.

    ``images``: arrays (any layout :func:`to_rgb` accepts; same-size images are detected together) or exceptions
    (an image that failed to load: it becomes a ``bad_image`` record with the exception's message). ``detector``:
    an :class:`~digi2real.faces.mtcnn.MTCNN` (default: the packaged one built from ``cfg.detector``). ``cfg``:
    crop size and detector settings (:class:`~digi2real.config.AlignConfig`); the detector's thresholds, pyramid and
    minimum face size are the detector's own. ``names`` label images in reasons.
    """
    from digi2real.config import AlignConfig

    cfg = cfg or AlignConfig()
    dcfg = cfg.detector
    if detector is None:
        from digi2real.faces.mtcnn import MTCNN

        detector = MTCNN.from_package(dcfg)
    n = len(images)
    labels = list(names) if names is not None else [f"image {i}" for i in range(n)]
    results: list[FaceResult | None] = [None] * n
    arrays: dict[int, np.ndarray] = {}
    min_face = detector.min_face_size
    for i, img in enumerate(images):
        if isinstance(img, BaseException):
            results[i] = FaceResult(BAD_IMAGE, reason=str(img) or type(img).__name__)
            continue
        try:
            arr = to_rgb(img, labels[i])
        except BadImageError as exc:
            results[i] = FaceResult(BAD_IMAGE, reason=str(exc))
            continue
        h, w = arr.shape[:2]
        if min(h, w) < min_face:
            results[i] = FaceResult(
                BAD_IMAGE, width=w, height=h,
                reason=f"{labels[i]}: image is {w}x{h} px, smaller than the smallest face searched for "
                f"({min_face} px); lower min_face_size (--min-face-size) or use larger images")
            continue
        arrays[i] = arr

    if cfg.input == "aligned":
        return _already_aligned(arrays, results, cfg, keep_crops, labels)
    found: dict[int, tuple[Detections, str]] = {}
    order = list(arrays)
    for i, det in zip(order, _detect_many(detector, [arrays[i] for i in order])):
        if isinstance(det, BaseException):
            h, w = arrays[i].shape[:2]
            results[i] = FaceResult(ERROR, reason=f"{labels[i]}: detector failed: {type(det).__name__}: {det}",
                                    width=w, height=h)
        elif len(det):
            found[i] = (det, "direct")
    retry = [i for i in order if i not in found and results[i] is None]
    if retry and dcfg.pad_retry > 0:
        padded = [_pad_canvas(arrays[i], dcfg.pad_retry) for i in retry]
        dets = _detect_many(detector, [p[0] for p in padded])
        for i, (_, pad), det in zip(retry, padded, dets):
            if not isinstance(det, BaseException) and len(det):
                found[i] = (det.shifted(-pad, -pad), "padded")

    for i in order:
        if results[i] is not None:
            continue
        arr = arrays[i]
        h, w = arr.shape[:2]
        if i not in found:
            tried = f"; also tried a canvas padded by {dcfg.pad_retry:.0%}" if dcfg.pad_retry > 0 else ""
            results[i] = FaceResult(NO_FACE, width=w, height=h,
                                    reason=f"{labels[i]}: no face found ({_settings_text(dcfg)}{tried})")
            continue
        det, attempt = found[i]
        j = pick_face(det, dcfg.pick, (w, h))
        lm = det.landmarks[j].astype(np.float64)
        try:
            crop = align_face(arr, lm, cfg.size) if keep_crops else None
        except ValueError as exc:  # degenerate landmarks
            results[i] = FaceResult(NO_FACE, width=w, height=h, reason=f"{labels[i]}: face found but not alignable "
                                    f"({exc})")
            continue
        results[i] = FaceResult(
            OK, box=det.boxes[j].astype(np.float64).tolist(), landmarks=lm.tolist(), score=float(det.scores[j]),
            attempt=attempt, faces=len(det), width=w, height=h, crop=crop,
        )
    return [r if r is not None else FaceResult(ERROR, reason="internal: image was not processed") for r in results]
