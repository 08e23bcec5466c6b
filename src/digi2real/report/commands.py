"""The `report` sub-command. ``register(subparsers)`` adds it to the main CLI; ``run(args)`` is its handler.

Importing this module is cheap (no torch, no matplotlib): everything is loaded only when the command runs.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

DESCRIPTION = textwrap.dedent("""\
    Write one self-contained HTML page describing the run directory RUN (the output_dir of `digi2real run`,
    holding config.yaml). It opens from disk in any browser with no server and no internet: the styles are
    inline and every image is embedded as a PNG inside the file, so the page can be copied or mailed alone.

    Sections:
      1. settings         the resolved config, pipeline.json stage status and timings, artifacts on disk
      2. identity samples source images of `report.identities` planned identities beside `report.samples`
                          generated aligned crops
      3. realism map      the paper's Figure 3 as a PCA of real vs synthetic Arc2Face conditionings, before
                          and after the realism shift (weight generate.shift_weight), with the gap numbers
      4. similarity       genuine vs impostor ArcFace cosine histograms of the source embeddings and of
                          generated crops (embedded with the run's encoder), `report.pairs` pairs each
      5. acceptance       the dataset card's statistics: gate rejections by reason, similarity and detector
                          score distributions
      6. training curves  loss, accuracy, learning rate and verification accuracy against the step
      7. benchmarks       eval/results.json beside the paper's Digi2Real-20K and DigiFace-1M rows, ROC plots

    A partial run is fine: a stage that has not run yet (or a shift that is not configured) shows a short
    "not available: <why>" note and the rest of the page is still written. The `report:` section of
    config.yaml sets identities, samples, pairs and seed; edit it and run the command again.""")

EPILOG = textwrap.dedent("""\
    examples:
      digi2real report runs/digi2real-20k                 # -> runs/digi2real-20k/report.html
      digi2real report runs/demo -o /tmp/demo-report.html
      xdg-open runs/digi2real-20k/report.html             # or open it in any browser""")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report`` to an argparse subparsers object; the parser's ``func`` default is :func:`run`."""
    p = subparsers.add_parser(
        "report", help="one self-contained HTML page of a run (samples, Figure 3, similarity, curves, benchmarks)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, metavar="RUN",
                   help="run directory (the config's output_dir: config.yaml, pipeline.json, embeddings/ ...)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="where to write the page (default RUN/report.html); written atomically")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of ``digi2real report``; returns the exit status. A RUN without config.yaml raises Digi2RealError."""
    from digi2real.errors import Digi2RealError
    from digi2real.layout import RunLayout
    from digi2real.report.build import build_report

    out = getattr(args, "output", None)
    if out is not None:
        own = RunLayout(args.run_dir).report.resolve()
        if out.resolve() != own and out.resolve().is_relative_to(args.run_dir.resolve()):
            raise Digi2RealError(f"-o {out}: inside the run {args.run_dir}, whose files are the report's inputs; "
                                 f"write the page outside it, or omit -o for {RunLayout(args.run_dir).report}")
        if out.is_dir():
            raise Digi2RealError(f"-o {out}: is a folder; name the HTML file to write, e.g. -o {out / 'report.html'}")
    path = build_report(args.run_dir, out)
    size = path.stat().st_size
    print(f"report: {path} ({size / 1e6:.1f} MB, self-contained; open it in a browser)")
    return 0
