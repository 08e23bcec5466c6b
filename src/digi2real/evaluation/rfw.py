"""RFW (Racial Faces in-the-Wild): per-race verification accuracy and its spread (FACTS 8; paper Table 7).

RFW ships one insightface-style ``<Race>_test.bin`` per race (6000 pairs each). Each is scored with the ordinary
10-fold verification protocol; the table reports the four accuracies, their mean and their standard deviation.

The deviation is the population one (ddof = 0): it reproduces the paper's Table 7. For Digi2Real-20K, accuracies
80.67 / 79.95 / 85.33 / 81.40 give mean 81.84 and std 2.08 with ddof = 0, whereas ddof = 1 gives 2.40. Both are
reported; ``std`` is the ddof = 0 value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

RACES: tuple[str, ...] = ("African", "Asian", "Caucasian", "Indian")
RFW_DDOF = 0  # population std: matches the paper's Table 7 (see module docstring)


def rfw_bin_candidates(root: str | Path, race: str) -> list[Path]:
    """Where a race's file may lie: ``<root>/RFW/<Race>_test.bin``, then ``<root>/<Race>_test.bin``."""
    root = Path(root)
    return [root / "RFW" / f"{race}_test.bin", root / f"{race}_test.bin"]


def find_rfw_bins(root: str | Path) -> dict[str, Path | None]:
    """Race -> the first existing candidate file, or None when the race's file is absent."""
    return {race: next((p for p in rfw_bin_candidates(root, race) if p.is_file()), None) for race in RACES}


def rfw_summary(per_race: Mapping[str, float]) -> dict[str, Any]:
    """Mean and spread of per-race accuracies (in whatever unit they are given).

    Returns ``{"mean", "std", "ddof", "std_ddof1"}`` where ``std`` is the population deviation (ddof 0, the paper's
    convention) and ``std_ddof1`` the sample deviation, for readers comparing with other papers.
    """
    values = np.asarray([float(v) for v in per_race.values()], np.float64)
    if values.size == 0:
        raise ValueError("rfw_summary needs at least one race accuracy")
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=RFW_DDOF)),
        "ddof": RFW_DDOF,
        "std_ddof1": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
    }


def evaluate_rfw(root: str | Path, score_bin: Callable[[str, Path], dict[str, Any]],
                 warn: Callable[[str], None]) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    """Score every race's ``.bin`` with ``score_bin(name, path)`` (a verification result dict with ``accuracy``).

    Returns ``(result, skipped)``. A missing race is reported through ``warn`` naming the expected path and listed
    in ``skipped``; mean/std are only given when all four races are present (a 3-race mean is not comparable with
    the paper), otherwise they are None. ``result`` is None when no race file exists at all.
    """
    found = find_rfw_bins(root)
    skipped: list[dict[str, str]] = []
    for race, path in found.items():
        if path is None:
            expected = " or ".join(str(p) for p in rfw_bin_candidates(root, race))
            warn(f"rfw: {race} skipped: {expected} not found")
            skipped.append({"benchmark": f"rfw/{race}", "expected": expected, "reason": "file not found"})
    present = {race: p for race, p in found.items() if p is not None}
    if not present:
        return None, skipped
    races = {race: score_bin(f"rfw_{race.lower()}", path) for race, path in present.items()}
    accuracies = {race: r["accuracy"] for race, r in races.items()}
    summary = rfw_summary(accuracies) if len(present) == len(RACES) else \
        {"mean": None, "std": None, "ddof": RFW_DDOF, "std_ddof1": None}
    return {"races": races, "accuracy": accuracies, **summary}, skipped
