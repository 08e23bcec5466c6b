"""Face geometry and face models.

- :mod:`.template`: the ArcFace 5-point template and :func:`align_face`, the one alignment used everywhere.
- :mod:`.mtcnn`: the MTCNN detector (P-Net, R-Net, O-Net, cascade) with the packaged, checksum-verified weights.
- :mod:`.detect`: :func:`detect_and_align` (face picking, padded-canvas retry, one :class:`FaceResult` per image).
- :mod:`.align_stage`: :func:`align_folder`, the resumable ``digi2real align`` stage; :mod:`.commands`: its CLI.
- :mod:`.arcface`: the ArcFace identity encoder (onnxruntime).

Names are imported lazily, so ``import digi2real.faces.arcface`` does not load torch or the detector.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ARCFACE_TEMPLATE": "template",
    "template_for": "template",
    "estimate_similarity": "template",
    "warp_affine": "template",
    "align_face": "template",
    "alignment_matrix": "template",
    "transform_points": "template",
    "MTCNN": "mtcnn",
    "Detections": "mtcnn",
    "FaceResult": "detect",
    "detect_and_align": "detect",
    "pick_face": "detect",
    "to_rgb": "detect",
    "align_folder": "align_stage",
    "AlignSummary": "align_stage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
