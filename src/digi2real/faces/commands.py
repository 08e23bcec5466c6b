"""The `align` sub-command. ``register(subparsers)`` adds it to the main CLI; ``run(args)`` is its handler.

Importing this module is cheap (no torch): the detector is loaded only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

DESCRIPTION = textwrap.dedent("""\
    Detect the face in every photo under SRC with MTCNN and write it aligned to the ArcFace 5-point template
    (a 112 x 112 crop by default, the input every ArcFace/AdaFace model expects) under DST, mirroring SRC's
    folders: SRC/<identity>/<name>.jpg -> DST/<identity>/<name>.png. SRC may be a flat folder of photos or a
    folder-per-identity tree.

    When a photo holds several faces, the largest is kept (--pick). When none is found, the photo is tried
    again on a canvas padded with black (--pad-retry), which rescues tight crops such as DigiFace images.
    Grayscale, RGBA and 16-bit photos are converted; unreadable ones are reported, never fatal.

    Every photo gets one line in DST/align_report.jsonl: its box, five landmarks and score, or why it failed
    (status ok / no_face / bad_image). Resumable: run the same command again after an interruption and it
    continues where it stopped. Settings come from --config's `align:` section, then these flags.""")

EPILOG = textwrap.dedent("""\
    examples:
      digi2real align photos/ -o aligned/
      digi2real align ffhq_subset/ -o ffhq_aligned/ --format jpg --batch-size 16
      digi2real align ijb_frames/ -o out/ --thresholds 0.6,0.7,0.9 --factor 0.85 --pick central
      digi2real align photos/ -o aligned/ --config digi2real-20k --device cuda

    report row:
      {"src": "id7/3.jpg", "dst": "id7/3.png", "status": "ok", "box": [x1, y1, x2, y2],
       "landmarks": [[x, y], ...5], "score": 0.9998, "attempt": "direct", "faces": 1, ...}""")


def _thresholds(text: str) -> list[float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3:
        raise argparse.ArgumentTypeError(
            f"expected three comma-separated probabilities for P-Net, R-Net, O-Net, e.g. 0.6,0.7,0.7; got {text!r}")
    return values


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``align`` to an argparse subparsers object; the parser's ``func`` default is :func:`run`."""
    p = subparsers.add_parser(
        "align", help="MTCNN detection + 5-point alignment of a folder of photos (ArcFace 112x112 crops)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, metavar="SRC", help="folder of photos, or of one folder per identity")
    p.add_argument("-o", "--output", dest="dst", type=Path, required=True, metavar="DST",
                   help="output folder (created; resumed when it already holds a report)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="experiment config; its `align:` section sets the defaults (flags below override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an align setting by dotted key, e.g. --set detector.factor=0.8 (repeatable)")
    crop = p.add_argument_group("crop (align.*)")
    crop.add_argument("--size", type=int, metavar="PX",
                      help="side of the square crop; the 112 template is scaled (default 112)")
    crop.add_argument("--format", choices=["png", "jpg"], help="file format of the crops (default png)")
    det = p.add_argument_group("detector (align.detector.*)")
    det.add_argument("--thresholds", type=_thresholds, metavar="P,R,O",
                     help="P-Net, R-Net, O-Net score thresholds (default 0.6,0.7,0.7 as facenet-pytorch; "
                     "0.6,0.7,0.9 as the AdaFace port is stricter)")
    det.add_argument("--factor", type=float, metavar="F",
                     help="image pyramid scale step in (0, 1) (default 0.709; 0.85 is slower, finds more)")
    det.add_argument("--min-face-size", type=int, metavar="PX", help="smallest face searched for (default 20)")
    det.add_argument("--pick", choices=["largest", "confident", "central"],
                     help="which face to keep when there are several (default largest)")
    det.add_argument("--pad-retry", type=float, metavar="FRAC",
                     help="when no face is found, retry on a canvas padded by FRAC of the side on each edge "
                     "(default 0.5; 0 turns the retry off)")
    det.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the detector runs (default auto)")
    det.add_argument("--batch-size", type=int, metavar="N", help="same-size images detected together (default 8)")
    p.add_argument("--redo-failed", action="store_true",
                   help="on resume, also retry photos reported no_face or bad_image (e.g. after changing settings)")
    p.add_argument("--limit", type=int, metavar="N", help="process at most N new photos (a trial run)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted overrides of the `align` section from the flags that were given (and --set)."""
    from digi2real.config import section_overrides

    flags = {
        "size": getattr(args, "size", None),
        "format": getattr(args, "format", None),
        "detector.thresholds": getattr(args, "thresholds", None),
        "detector.factor": getattr(args, "factor", None),
        "detector.min_face_size": getattr(args, "min_face_size", None),
        "detector.pick": getattr(args, "pick", None),
        "detector.pad_retry": getattr(args, "pad_retry", None),
        "detector.device": getattr(args, "device", None),
        "detector.batch_size": getattr(args, "batch_size", None),
    }
    return section_overrides(flags, getattr(args, "set", None), "align")


def run(args: argparse.Namespace) -> int:
    """Handler of ``digi2real align``; returns the exit status. Input errors raise Digi2RealError."""
    from digi2real.config import AlignConfig, load_section
    from digi2real.faces.align_stage import align_folder

    cfg = load_section(AlignConfig, getattr(args, "config", None), "align", overrides_from_args(args))
    # the detector (cfg.detector: thresholds, pyramid, device, batch size) is loaded only if there is work left
    summary = align_folder(args.src, args.dst, cfg, progress=not getattr(args, "quiet", False),
                           redo_failed=getattr(args, "redo_failed", False), limit=getattr(args, "limit", None))
    if getattr(args, "json", False):
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print("\n".join(summary.lines()))
    return 0
