"""The dataset card (``card.md``) of a generated dataset: how it was made, what came out, and under which terms.

Everything in it is computed from ``generation.json`` and the manifests, so it can be rewritten at any time and
always describes what is on disk (a card written while other shards still run says how much is finished).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from digi2real.errors import Digi2RealError
from digi2real.fileio import write_text

DIGIFACE_TERMS = (
    "The identities come from DigiFace-1M (Microsoft), released under the Research Use of Data Agreement v1.0: "
    "**non-commercial research use only**. Every image in this dataset was generated from those identities and is "
    "under the same terms: do not use it, or models trained on it, commercially."
)


def _final_rows(rows: list[dict]) -> dict[str, dict]:
    """The last final row of each key (a resumed run never writes two, but a card must not double-count)."""
    out: dict[str, dict] = {}
    for r in rows:
        if r.get("final"):
            out[r["key"]] = r
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _identity(row: dict) -> str:
    """A row's identity (rows always have it; a hand-written one may hold only its key ``<identity>/<k>``)."""
    return row["identity"] if isinstance(row.get("identity"), str) else row["key"].rsplit("/", 1)[0]


def _quantiles(values: list[float]) -> str:
    values = [v for v in values if _number(v)]
    if not values:
        return "n/a"
    q = np.quantile(np.asarray(values, np.float64), [0.0, 0.05, 0.5, 0.95, 1.0])
    return " / ".join(f"{v:.3f}" for v in q)


def card_stats(rows: list[dict], planned: int) -> dict:
    """Counts and acceptance statistics of a dataset's manifest rows."""
    final = _final_rows(rows)
    ok = [r for r in final.values() if r["status"] == "ok"]
    rejected = Counter(r["status"] for r in final.values() if r["status"] != "ok")
    attempt_reasons = Counter(r["status"] for r in rows if r["status"] != "ok")
    attempts_needed = Counter(r["attempt"] for r in ok)
    per_identity = Counter(_identity(r) for r in ok)
    return {
        "planned": planned,
        "finished": len(final),
        "ok": len(ok),
        "rejected": dict(sorted(rejected.items())),
        "rejected_attempts": dict(sorted(attempt_reasons.items())),
        "attempts_of_accepted": {int(k): v for k, v in sorted(attempts_needed.items())},
        "identities_with_images": len(per_identity),
        "images_per_identity": _quantiles([float(v) for v in per_identity.values()]),
        "id_similarity": _quantiles([r["id_similarity"] for r in ok if r.get("id_similarity") is not None]),
        "proto_similarity": _quantiles([r["proto_similarity"] for r in ok if r.get("proto_similarity") is not None]),
        "detector_score": _quantiles([r["detection"].get("score") for r in ok if isinstance(r.get("detection"), dict)]),
        "acceptance_rate": (len(ok) / len(final)) if final else None,
    }


def _source_kind(record: dict) -> str:
    embeddings = record.get("embeddings")
    if isinstance(embeddings, str) and embeddings:
        meta = Path(embeddings) / "meta.json"
        if meta.is_file():
            try:
                return str(json.loads(meta.read_text()).get("source", {}).get("kind", "unknown"))[:80]
            except (OSError, ValueError, AttributeError):
                return "unknown"
    return "unknown"


def placement_lines(record: dict, runs: list[dict]) -> list[str]:
    """Where the models ran (issue 12): one line per distinct placement, with the shards that ran there. From each
    shard's run record, else from what ``generation.json`` holds of the run that started the dataset."""
    found = runs or ([{"shard": "?", **record["engine"]}] if isinstance(record.get("engine"), dict) else [])
    groups: dict[tuple[str, str, str], list[str]] = {}
    for run in found:
        models = run.get("models") if isinstance(run.get("models"), dict) else {}
        where = tuple(str(models.get(k, "not recorded")) for k in ("arc2face", "arcface", "mtcnn"))
        groups.setdefault(where, []).append(str(run.get("shard", "?")))  # type: ignore[arg-type]
    if not groups:
        return ["- where the models ran: not recorded (made before digi2real recorded it)"]
    lines = []
    for (generator, checker, detector), shards in groups.items():
        named = ", ".join(shards[:8]) + (f" and {len(shards) - 8} more" if len(shards) > 8 else "")
        lines.append(f"- where the models ran (shard {named}): Arc2Face {generator}; ArcFace identity check "
                     f"{checker}; MTCNN {detector}")
    return lines


def render_card(record: dict, rows: list[dict], name: str, runs: list[dict] | None = None) -> str:
    """The card's Markdown (with a YAML header for dataset hubs). ``runs``: each shard's run record."""
    s = record["settings"]
    g, a = s["generate"], s["align"]
    plan = record.get("plan_meta", {}).get("settings", {})
    stats = card_stats(rows, int(record.get("planned_images", 0)))
    kind = _source_kind(record)
    digiface = kind.startswith("digiface") or kind == "unknown"
    complete = stats["finished"] == stats["planned"]
    gate = g["gate"]
    gate_text = ("off" if gate["min_similarity"] is None else
                 f"cosine to the {gate['against']} >= {gate['min_similarity']}")
    rejected = ", ".join(f"{k}: {v}" for k, v in stats["rejected"].items()) or "none"
    attempts = ", ".join(f"{k}: {v}" for k, v in stats["rejected_attempts"].items()) or "none"
    accepted_after = ", ".join(f"attempt {k}: {v}" for k, v in stats["attempts_of_accepted"].items()) or "none"
    rate = "n/a" if stats["acceptance_rate"] is None else f"{stats['acceptance_rate']:.1%}"
    licence = "other" if digiface else "unknown"
    lines = [
        "---",
        f"license: {licence}",
        "task_categories: [image-classification]",
        "tags: [face-recognition, synthetic, digi2real, arc2face]",
        f"pretty_name: {name}",
        "---",
        "",
        f"# {name}",
        "",
        "Synthetic face-recognition training set made with digi2real (the Digi2Real method): rendered identities "
        "embedded with ArcFace, varied by SLERP on the unit sphere, shifted toward real-image statistics in the "
        "Arc2Face conditioning space, rendered by Arc2Face, aligned with MTCNN to 112 x 112 ArcFace crops.",
        "",
        "## Contents",
        "",
        f"- status: {'complete' if complete else 'INCOMPLETE'}: {stats['finished']} of {stats['planned']} planned "
        "images finished",
        f"- images: {stats['ok']} accepted, in `images/<identity>/<k>.{g['format']}`",
        f"- identities: {stats['identities_with_images']} with at least one image (of {record.get('identities')} "
        "planned); accepted images per identity, min / 5% / median / 95% / max: "
        f"{stats['images_per_identity']}",
        f"- rejected after all retries: {rejected}",
        "",
        "## How it was made",
        "",
        f"- identity source: {kind}; plan: {plan.get('images_per_identity')} images per identity, "
        f"{plan.get('images_per_latent')} per SLERP latent, t ~ Beta({plan.get('alpha')}, {plan.get('alpha')}), "
        f"seed {plan.get('seed')}",
        f"- generator: Arc2Face `{s['arc2face']['repo']}` (revision {s['arc2face']['revision'] or 'local files'}) "
        f"with the VAE of `{s['arc2face']['base']}`; DPM-Solver++ {g['steps']} steps, guidance {g['guidance']}, "
        f"{g['size']} x {g['size']}, {s['dtype']} on {s['device']}, {g['batch_size']} images per work unit "
        f"({s.get('units', 'whole identities per unit')})",
        *placement_lines(record, runs or []),
        f"- realism shift: {'none' if s['shift_sha256'] is None else 'weight ' + str(g['shift_weight'])}"
        + (f" (file sha256 {s['shift_sha256'][:12]}...)" if s["shift_sha256"] else ""),
        f"- alignment: MTCNN thresholds {a['detector']['thresholds']}, min face {a['detector']['min_face_size']} px, "
        f"{a['size']} x {a['size']} crops on the ArcFace 5-point template",
        f"- identity encoder (ArcFace ONNX) sha256: {s['arcface_sha256'][:12]}...",
        f"- inputs: plan sha256 {s['plan_sha256'][:12]}..., embeddings sha256 {s['embeddings_sha256'][:12]}...",
        "",
        "## Acceptance",
        "",
        f"- identity gate: {gate_text}; up to {gate['max_retries']} retries with new seeds per image",
        f"- acceptance rate (accepted / finished): {rate}; accepted at {accepted_after}",
        f"- rejected attempts by reason: {attempts}",
        "- ArcFace cosine of accepted crops, min / 5% / median / 95% / max:",
        f"  - to their conditioning embedding: {stats['id_similarity']}",
        f"  - to their identity prototype: {stats['proto_similarity']}",
        f"- MTCNN face score of accepted crops: {stats['detector_score']}",
        "",
        "## Provenance and regeneration",
        "",
        "Every attempt at every image has a row in `manifest/*.jsonl`: its plan row (identity, latent, SLERP sample "
        "and t), its noise seed, the detection (box, five landmarks, score), its identity similarities and its "
        "status. `generation.json` holds the settings and the hashes of the inputs. Any image can be recomputed "
        "exactly on the same hardware with `digi2real regenerate DATASET KEY`.",
        "",
        "## Licence and intended use",
        "",
    ]
    if digiface:
        lines.append(DIGIFACE_TERMS)
    else:
        lines.append(f"The identities come from a `{kind}` source; its terms apply to this data.")
    lines += [
        "",
        "Models used: Arc2Face (UNet and ID encoder; MIT licence on its hub page), the Stable Diffusion 1.5 VAE "
        "(CreativeML OpenRAIL-M), an ArcFace identity encoder, MTCNN (MIT). Intended use: research on face "
        "recognition trained on synthetic data. The identities are synthetic, but the generator learned from real "
        "faces: do not use the data to identify people. Demographic balance is not controlled; measure it (e.g. RFW) "
        "before drawing conclusions.",
        "",
    ]
    return "\n".join(lines)


def write_card(dataset: Path, name: str | None = None) -> Path:
    """Write ``dataset/card.md`` from its ``generation.json`` and manifests (atomically)."""
    from digi2real.generation.manifest import (CARD_FILE, RECORD_FIX, SETTINGS_FILE, read_record, read_rows,
                                               read_run_records)

    record = read_record(dataset, "card")
    rows = read_rows(dataset)
    runs = read_run_records(dataset)
    try:
        text = render_card(record, rows, name or dataset.resolve().name, runs)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        # Only a hand-edited generation.json gets here: ours always holds every setting the card quotes.
        raise Digi2RealError(f"{dataset / SETTINGS_FILE}: corrupt ({type(exc).__name__}: {str(exc)[:80]}); "
                             f"{RECORD_FIX}") from None
    path = dataset / CARD_FILE
    write_text(path, text)
    return path
