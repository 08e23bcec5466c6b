"""`digi2real report`: one self-contained HTML page of a run directory (settings, samples, the realism map, identity
similarity, not copying the generator's training set, acceptance, training curves, benchmarks). See
:mod:`digi2real.report.build`."""

from __future__ import annotations

from digi2real.report.build import build_report, render_report

__all__ = ["build_report", "render_report"]
