"""`digi2real audit DATASET ... [--against REF ...]`: does a face set contain someone real, are its identities
distinct, consistent and varied, and how far is it from real faces (issue 14).

The steps, in order (:func:`audit`):

1. every set as ArcFace vectors grouped in identities (:mod:`digi2real.audit.sets`; one model for all of them, a set
   embedded by another model or of another dimension refused);
2. the match threshold (:func:`match_threshold`): the cosine that a fraction ``far`` of the impostor prototype pairs
   of a real reference exceed, or a stated fixed cosine when no real reference is given;
3. per dataset: contamination by each reference (nearest identity by prototype, best image pair among the nearest
   identities, the matches above the threshold), distinctness (the paper's Table 4 criterion, each identity's
   highest cosine to another, measured after generation, and the duplicate pairs), consistency (genuine and impostor
   cosines, d'), variation (landmark, brightness and contrast spread) and the realism gap (Fréchet distance between
   the ArcFace embedding distributions of the dataset and each real reference);
4. ``audit.json``, ``audit.md`` and ``audit.html`` (with the matched image pairs side by side) in the output folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import digi2real
from digi2real.audit import measures as M
from digi2real.audit.sets import AuditSet, Model, generated_model, is_generated, open_set
from digi2real.config import AlignConfig, AuditConfig, EncoderConfig
from digi2real.errors import Digi2RealError

AUDIT_FILE = "audit.json"
MARKDOWN_FILE = "audit.md"
HTML_FILE = "audit.html"
SECTION_FILE = "section.html"  # the HTML section alone, for the run report


@dataclass
class Inputs:
    datasets: list[AuditSet]
    refs: list[AuditSet]
    model: Model


# ------------------------------------------------------------------------------------------------------ model


def _load_encoder(spec: str, cfg_device: str, base: EncoderConfig | None = None):
    """``spec`` loaded with the encoder settings of ``base`` (the experiment's ``encoder:``: batch size,
    normalisation), its own output size, on the CPU when ``audit.device`` says so."""
    from digi2real.faces.arcface import ArcFaceEncoder

    base = base or EncoderConfig()
    update: dict[str, Any] = {"model": spec, "embedding_dim": _onnx_dim(spec)}
    if cfg_device == "cpu":
        update["provider"] = "cpu"
    return ArcFaceEncoder.load(base.model_copy(update=update))


def _onnx_dim(spec: str) -> int:
    """The model's own output size (the audit takes any ArcFace; the encoder refuses one of another size)."""
    import onnx

    from digi2real.faces.arcface import resolve_model_file

    path = resolve_model_file(spec)
    try:
        out = onnx.load(str(path), load_external_data=False).graph.output[0]
        dim = out.type.tensor_type.shape.dim[-1].dim_value
    except Exception:  # noqa: BLE001 - the encoder's own load names a file that is not a model
        return 512
    return int(dim) if dim else 512


def resolve_model(datasets: list[Path], model: str | None) -> str | None:
    """The ArcFace the audit embeds with: ``model``, else the one the first generated dataset recorded."""
    if model:
        return model
    for d in datasets:
        if is_generated(d):
            recorded = generated_model(d)
            if recorded:
                return recorded
    return None


def check_models(sets: list[AuditSet], given: Model | None = None) -> None:
    """One embedding for every set: a set embedded by another model than the first set (or than ``given``, the
    model the user named), or of another dimension, is refused with one line naming both."""
    first_path, first = (f"--model {given.name}", given) if given is not None else (str(sets[0].path), sets[0].model)
    for s in sets:
        if s.model.sha256 != first.sha256 or s.model.dim != first.dim:
            raise Digi2RealError(
                f"{s.path}: embedded by {s.model.describe()}, but {first_path} is {first.describe()}; an audit "
                "compares sets of one embedding: pass --model with the dataset's ArcFace, or --embed-images to "
                "embed the generated set again with --model")


def open_inputs(datasets: list[Path], refs: list[Path], cfg: AuditConfig, *, model: str | None, cache: Path,
                embed_images: bool = False, progress: bool = True, encoder_cfg: EncoderConfig | None = None,
                align_cfg: AlignConfig | None = None) -> Inputs:
    spec = resolve_model(datasets, model)
    encoder = _load_encoder(spec, cfg.device, encoder_cfg) if spec else None
    described = Model(encoder.file_hash(), str(spec), encoder.embedding_dim) if encoder else None
    opened: list[AuditSet] = []
    names: set[str] = set()
    for i, path in enumerate([*datasets, *refs]):
        name = _unique(Path(path), names)
        s = open_set(path, encoder=encoder, model=described, cache=cache, name=name,
                     embed_generated=embed_images and i < len(datasets), align=align_cfg, progress=progress)
        if described is not None and s.model.sha256 == described.sha256:
            s.model = described  # the same file: say it by the name the user gave
        opened.append(s)
    check_models(opened, described)
    return Inputs(opened[:len(datasets)], opened[len(datasets):], described or opened[0].model)


def _unique(path: Path, names: set[str]) -> str:
    base = path.stem if path.is_file() else path.name
    if path.is_file() and path.suffix != ".bin":  # a pairs list: its folder says which benchmark it is
        base = path.parent.name or base
    name, n = base or "set", 2
    while name in names:
        name, n = f"{base}-{n}", n + 1
    names.add(name)
    return name


# ------------------------------------------------------------------------------------------------------ threshold


def calibration_kind(s: AuditSet, cfg: AuditConfig) -> str:
    """'listed' (a .bin or pairs list: its non-match pairs are the only known impostors), else cfg.calibration."""
    return "listed" if s.embedded.impostor_pairs is not None else cfg.calibration


def impostor_count(s: AuditSet, cfg: AuditConfig) -> int:
    """How many impostor scores the reference gives to calibrate on."""
    m = len(s.embedded.identities)
    kind = calibration_kind(s, cfg)
    if kind == "listed":
        return len(s.embedded.impostor_pairs)
    if kind == "search":
        return m if m > 1 else 0
    return min(m * (m - 1) // 2, cfg.impostor_pairs)


def impostors(s: AuditSet, cfg: AuditConfig) -> tuple[np.ndarray, str]:
    """The reference's impostor scores and what they are (:func:`match_threshold`)."""
    device = None if cfg.device == "cpu" else cfg.device
    protos = s.embedded.prototypes
    kind = calibration_kind(s, cfg)
    if kind == "search":
        return M.nearest_impostor_scores(protos, seed=cfg.seed, device=device), "nearest-identity cosines (a search)"
    scores = M.impostor_scores(protos, s.embedded.impostor_pairs, max_pairs=cfg.impostor_pairs, seed=cfg.seed)
    return scores, ("listed non-match pairs" if kind == "listed" else "impostor identity pairs")


def match_threshold(refs: list[AuditSet], cfg: AuditConfig) -> tuple[M.Threshold, str | None, str, dict]:
    """The cosine above which two identities are called one person.

    ``cfg.threshold`` when set. Else each real reference's threshold at ``cfg.far`` on its impostor scores (with
    ``calibration: search`` each of its identities' cosine to its nearest other identity, so that a search wrongly
    matches about a fraction FAR of the identities searched; with ``pairs``, and always for a .bin or pairs list
    (its listed non-match pairs), single identity pairs, FAR per pair), and the highest of them is used: on none of
    the references do more than FAR of the impostor scores exceed it. ``cfg.calibrate`` names one reference
    instead. Without a real reference, ``cfg.fixed_threshold``, stated as fixed.

    Returns the threshold, the reference it came from, the kind of scores, and every reference's threshold."""
    if cfg.threshold is not None:
        return M.fixed_threshold(cfg.threshold), None, "fixed", {}
    real = [r for r in refs if r.real and impostor_count(r, cfg) > 0]
    if cfg.calibrate is not None:
        named = [r for r in refs if r.name == cfg.calibrate]
        if not named:
            raise Digi2RealError(f"audit.calibrate {cfg.calibrate!r}: no reference of that name; references are "
                                 f"{', '.join(r.name for r in refs) or 'none'}")
        real = named
    if not real:
        return M.fixed_threshold(cfg.fixed_threshold), None, "fixed", {}
    each = {}
    for r in real:
        scores, what = impostors(r, cfg)
        each[r.name] = M.far_threshold(scores, cfg.far, what=what)
    name = max(each, key=lambda n: each[n].value)
    kind = calibration_kind(next(r for r in real if r.name == name), cfg)
    return each[name], name, kind, {n: t.to_dict() for n, t in each.items()}


# ------------------------------------------------------------------------------------------------------ audit


def _realism(d: AuditSet, refs: list[AuditSet]) -> dict[str, Any]:
    """Fréchet distance between the ArcFace embeddings of the dataset's images and of each real reference's."""
    return {r.name: round(float(M.frechet_distance(d.embedded.vectors, r.embedded.vectors)), 6)
            for r in refs if r.real and len(r.embedded.vectors) > 1}


def audit_one(d: AuditSet, refs: list[AuditSet], threshold: M.Threshold, cfg: AuditConfig,
              calibration: str) -> dict[str, Any]:
    from digi2real.audit.report import LISTED, contamination_dict

    device = None if cfg.device == "cpu" else cfg.device
    contamination = {r.name: M.contamination(d.embedded, r.embedded, threshold, k=cfg.neighbours, device=device)
                     for r in refs if r.path.resolve() != d.path.resolve()}
    distinct = M.distinctness(d.embedded, threshold, device=device)
    consistency = M.consistency(d.embedded, max_impostor_pairs=cfg.impostor_pairs, seed=cfg.seed)
    variation = M.variation(d.embedded)
    return {
        "name": d.name, "path": str(d.path), "kind": d.kind, "real": d.real, "note": d.note,
        "identities": len(d.embedded.identities), "images": int(len(d.embedded.vectors)),
        "contamination": {k: contamination_dict(v, calibration) for k, v in contamination.items()},
        "distinctness": distinct.to_dict(LISTED), "consistency": consistency.to_dict(), "variation": variation.to_dict(),
        "frechet": _realism(d, refs),
        "_objects": {"contamination": contamination, "distinctness": distinct},
    }


def audit(datasets: list[Path], refs: list[Path], out_dir: Path, cfg: AuditConfig, *, model: str | None = None,
          cache: Path | None = None, embed_images: bool = False, progress: bool = True,
          encoder_cfg: EncoderConfig | None = None, align_cfg: AlignConfig | None = None,
          say=print) -> dict[str, Any]:
    """Audit ``datasets`` against ``refs``; write audit.json, audit.md, audit.html and the CSVs into ``out_dir``.
    ``model`` embeds the sets without kept vectors (default: the one the first generated dataset recorded), with
    ``encoder_cfg``'s batch size and normalisation; photographs are aligned with ``align_cfg``'s MTCNN settings."""
    from digi2real.audit.report import write_outputs

    start = time.perf_counter()
    out_dir = Path(out_dir)
    cache = Path(cache) if cache is not None else out_dir / "cache"
    inputs = open_inputs(datasets, refs, cfg, model=model, cache=cache, embed_images=embed_images,
                         progress=progress, encoder_cfg=encoder_cfg, align_cfg=align_cfg)
    threshold, calibrated_on, kind, each = match_threshold(inputs.refs, cfg)
    results = [audit_one(d, inputs.refs, threshold, cfg, kind) for d in inputs.datasets]
    summary: dict[str, Any] = {
        "digi2real_version": digi2real.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "embedding": {"model": inputs.model.name, "sha256": inputs.model.sha256, "dim": inputs.model.dim,
                      "what": "ArcFace vectors (L2-normalised) of the aligned 112 x 112 crops"},
        "threshold": {**threshold.to_dict(), "calibrated_on": calibrated_on, "calibration": kind,
                      "per_reference": each},
        "settings": cfg.model_dump(mode="json"),
        "references": [{"name": r.name, "path": str(r.path), "kind": r.kind, "real": r.real, "note": r.note,
                        "identities": len(r.embedded.identities), "images": int(len(r.embedded.vectors)),
                        "impostor_scores": impostor_count(r, cfg)} for r in inputs.refs],
        "datasets": results,
    }
    summary["seconds"] = round(time.perf_counter() - start, 3)
    write_outputs(out_dir, summary, inputs, cfg.shown)
    for d in summary["datasets"]:
        d.pop("_objects", None)
    for line in summary_lines(summary):
        say(line)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    t = summary["threshold"]
    lines = [f"match threshold: cosine {t['value']:.4f} ({t['source']})"]
    for d in summary["datasets"]:
        found = ", ".join(f"{name} {c['matched_identities']}" + _chance_text(c["expected_false_matches"])
                          for name, c in d["contamination"].items()) or "no reference given"
        dp = d["consistency"]["d_prime"]
        lines.append(f"{d['name']}: {d['identities']} identities, {d['images']} images; identities matching a "
                     f"reference: {found}; duplicate pairs: {d['distinctness']['duplicate_pairs']}; "
                     f"d' {'-' if dp is None else f'{dp:.2f}'}")
    return lines


def _chance_text(chance: float | None) -> str:
    return "" if chance is None else f" ({chance:.2g} by chance)"
