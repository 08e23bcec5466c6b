"""Results schema and the paper's tables (Tables 5/6: verification + IJB; Table 7: RFW) as Markdown and CSV.

Results JSON (one dict per model, written by :func:`digi2real.evaluation.run.run_eval`); every number is a
percentage, as in the paper::

    {"schema": "digi2real.eval/1",
     "name": "r50-digi2real",
     "model": {"path": ..., "kind": "iresnet" | "onnx", ...},
     "settings": {...EvalConfig...},
     "verification": {"lfw": {"accuracy": 98.6, "std": 0.4, "tar_at_far_1e3": 95.1, "pairs": 6000,
                              "fold_accuracies": [...], "best_thresholds": [...]}, ...},
     "ijb": {"ijbc": {"1e-04": 75.8, "1e-05": ..., ...}, ...},
     "rfw": {"accuracy": {"African": 80.7, ...}, "mean": 81.8, "std": 2.08, "ddof": 0, "std_ddof1": 2.40,
             "races": {...per-race verification dicts...}},
     "skipped": [{"benchmark": "cplfw", "expected": "/data/cplfw.bin", "reason": "file not found"}]}

IJB FAR keys are strings formatted with :func:`far_key` (``1e-04``) so that JSON round-trips them.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

SCHEMA = "digi2real.eval/1"

# Table 5/6 columns: (header, section, key) in the paper's order.
MAIN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("LFW", "verification", "lfw"),
    ("CALFW", "verification", "calfw"),
    ("CPLFW", "verification", "cplfw"),
    ("AgeDB30", "verification", "agedb_30"),
    ("CFP-FP", "verification", "cfp_fp"),
    ("IJB-B", "ijb", "ijbb"),
    ("IJB-C", "ijb", "ijbc"),
)
RFW_COLUMNS: tuple[str, ...] = ("African", "Asian", "Caucasian", "Indian", "Mean", "Std")
IJB_TABLE_FAR = 1e-4  # the paper reports IJB TAR at FAR = 1e-4

# FACTS 1: the paper's headline numbers (IResNet50 + AdaFace), printed beside ours for comparison.
PAPER_MAIN: dict[str, tuple[float, ...]] = {
    "Digi2Real-20K (paper)": (98.58, 87.22, 82.65, 84.72, 87.49, 70.14, 75.80),
    "DigiFace-1M (paper)": (91.93, 75.80, 73.13, 71.12, 78.89, 43.23, 49.53),
}
PAPER_RFW: dict[str, tuple[float, ...]] = {
    "Digi2Real-20K (paper)": (80.67, 79.95, 85.33, 81.40, 81.84, 2.08),
}


def far_key(far: float) -> str:
    """The JSON key of a FAR value: ``1e-04``."""
    return f"{float(far):.0e}"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.2f}"


def main_row(result: dict[str, Any]) -> list[float | None]:
    """One model's Table 5/6 values: verification accuracies (%) and IJB TAR@FAR=1e-4 (%); None where not run."""
    row: list[float | None] = []
    for _, section, key in MAIN_COLUMNS:
        block = (result.get(section) or {}).get(key)
        if block is None:
            row.append(None)
        elif section == "verification":
            row.append(block.get("accuracy"))
        else:
            row.append(block.get(far_key(IJB_TABLE_FAR)))
    return row


def rfw_row(result: dict[str, Any]) -> list[float | None] | None:
    """One model's Table 7 values, or None when RFW was not evaluated."""
    rfw = result.get("rfw")
    if not rfw:
        return None
    acc = rfw.get("accuracy") or {}
    return [acc.get(race) for race in RFW_COLUMNS[:4]] + [rfw.get("mean"), rfw.get("std")]


def _markdown(title: str, headers: Sequence[str], rows: Sequence[tuple[str, Sequence[Any]]]) -> str:
    lines = [f"### {title}", "", "| Model | " + " | ".join(headers) + " |",
             "|---|" + "---:|" * len(headers)]
    lines += ["| " + name + " | " + " | ".join(_cell(v) for v in values) + " |" for name, values in rows]
    return "\n".join(lines) + "\n"


def _rows(results: Sequence[dict[str, Any]], paper: bool) -> tuple[list, list]:
    main = [(r.get("name", "model"), main_row(r)) for r in results]
    rfw = [(r.get("name", "model"), row) for r in results if (row := rfw_row(r)) is not None]
    if paper:
        main += [(name, list(values)) for name, values in PAPER_MAIN.items()]
        rfw += [(name, list(values)) for name, values in PAPER_RFW.items()]
    return main, rfw


def markdown_tables(results: Sequence[dict[str, Any]], paper: bool = True) -> str:
    """Markdown of Table 5/6 (and Table 7 when any result has RFW) with the paper's rows marked "(paper)"."""
    main, rfw = _rows(results, paper)
    headers = [h for h, _, _ in MAIN_COLUMNS]
    text = _markdown("Verification accuracy (%) and IJB TAR@FAR=1e-4 (%) (paper Tables 5/6)", headers, main)
    if any(not name.endswith("(paper)") for name, _ in rfw):
        text += "\n" + _markdown("RFW accuracy (%) (paper Table 7; std is the population std, ddof=0)",
                                 RFW_COLUMNS, rfw)
    main_sets = {key for _, section, key in MAIN_COLUMNS if section == "verification"}
    other = [(r.get("name", "model"), name, block) for r in results
             for name, block in (r.get("verification") or {}).items() if name not in main_sets]
    if other:
        text += ("\n### Other verification sets (same 10-fold protocol)\n\n| Model | Set | Accuracy (%) | Std (%) | "
                 "TAR@FAR=1e-3 (%) | Pairs |\n|---|---|---:|---:|---:|---:|\n")
        text += "".join(f"| {model} | {name} | {_cell(b.get('accuracy'))} | {_cell(b.get('std'))} | "
                        f"{_cell(b.get('tar_at_far_1e3'))} | {b.get('pairs', '-')} |\n" for model, name, b in other)
    skipped = [(r.get("name", "model"), s) for r in results for s in r.get("skipped", [])]
    if skipped:
        text += "\nSkipped (file not found):\n\n" + "\n".join(
            f"- {name}: {s['benchmark']} (expected {s['expected']})" for name, s in skipped) + "\n"
    return text


def csv_table(results: Sequence[dict[str, Any]], paper: bool = True) -> str:
    """One CSV row per model: the Table 5/6 columns then the Table 7 columns (RFW ...), empty where not run."""
    main, rfw = _rows(results, paper)
    rfw_by_name = dict(rfw)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model"] + [h for h, _, _ in MAIN_COLUMNS] + [f"RFW {c}" for c in RFW_COLUMNS])
    for name, values in main:
        extra = rfw_by_name.get(name) or [None] * len(RFW_COLUMNS)
        writer.writerow([name] + ["" if v is None else f"{float(v):.4f}" for v in list(values) + list(extra)])
    return buf.getvalue()
