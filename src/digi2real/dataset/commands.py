"""The `pack` and `verify` sub-commands. ``register(subparsers)`` adds both to the main CLI.

Importing this module is cheap: the dataset code is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

LAYOUTS = textwrap.dedent("""\
    accepted DATASET layouts:
      folder per identity     DATASET/<identity>/<image>.png|.jpg (aligned 112x112 crops)
      generated dataset       DATASET/images/<identity>/<k>.png + DATASET/manifest/*.jsonl: only rows with
                              status "ok" are packed; rejected images are left out even if their file exists,
                              and an ok row whose file is missing is an error
    labels are 0..C-1 in natural identity order (id2 before id10), images in natural file order.""")

PACK_DESCRIPTION = textwrap.dedent("""\
    Write DATASET as an insightface RecordIO training set in DIR: train.rec, train.idx, property
    ("num_classes,112,112"), plus identities.txt (line c = identity of label c) and labels.json
    (identities, images per class, encoding). Records are ordered by label, with insightface's meta record
    (key 0) and one (start, end) range record per class, so insightface/AdaFace loaders read it as is.

    PNG images are re-encoded as JPEG (--quality) to make the set several times smaller; --keep-png stores
    them losslessly instead. JPEG files are stored byte for byte. Every image is decoded while packing, so
    a corrupt or wrongly sized file stops the pack with its name. The set is written into a temporary
    folder and renamed to DIR at the end: an interrupted pack leaves nothing half-written, and the next
    pack cleans up what it left.

    DIR may not be DATASET, lie inside it, or hold it. --force replaces only a set pack wrote (DIR holds
    nothing but pack's five files): any other file in DIR stops the pack before anything is written.""")

PACK_EPILOG = LAYOUTS + "\n\n" + textwrap.dedent("""\
    examples:
      digi2real pack out/dataset -o out/packed
      digi2real pack out/dataset -o out/packed_png --keep-png
      digi2real verify out/packed --source out/dataset""")

VERIFY_DESCRIPTION = textwrap.dedent("""\
    Check a packed RecordIO set in DIR. Always checked: it opens (property, index, every record header),
    every index entry leads to the record written under its key (the header's id), labels are sorted and
    within 0..C-1, each class's range record and count agree with labels.json, and --sample random
    records (seeded) decode to images of the size property gives.

    With --source DATASET (the folder it was packed from): the numbers of images and classes and the
    identity names match, the label of every record equals its source image's label, and the sampled
    images match the source pixels exactly (PNG kept, or JPEG stored byte for byte) or within a mean
    absolute difference of 3 grey levels (re-encoded JPEG). The first mismatch is reported as an error
    (exit status 2); a clean set prints a summary and exits 0.""")

VERIFY_EPILOG = textwrap.dedent("""\
    examples:
      digi2real verify out/packed
      digi2real verify out/packed --source out/dataset --sample 1000
      digi2real verify ms1m-retinaface-t1/        # any insightface set: checks framing, labels, sample""")


def register(subparsers: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add ``pack`` and ``verify``; each parser's ``func`` default is its handler."""
    p = subparsers.add_parser(
        "pack", help="write an image folder / generated dataset as insightface RecordIO (train.rec/.idx)",
        description=PACK_DESCRIPTION, epilog=PACK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", type=Path, metavar="DATASET", help="image folder or generated dataset to pack")
    p.add_argument("-o", "--output", dest="out", type=Path, required=True, metavar="DIR",
                   help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG quality 1-100 for re-encoded images "
                   "(default 95: mean pixel error about 1 grey level)")
    p.add_argument("--keep-png", action="store_true", help="store PNG images losslessly instead of as JPEG")
    p.add_argument("--force", action="store_true", help="replace a set pack wrote earlier in DIR (once the new set "
                   "is complete); other files are never replaced")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pack)

    v = subparsers.add_parser(
        "verify", help="check a packed RecordIO set (counts, every label, a sample of pixels) against its source",
        description=VERIFY_DESCRIPTION, epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("packed", type=Path, metavar="DIR", help="folder with train.rec, train.idx, property")
    v.add_argument("--source", type=Path, metavar="DATASET", help="the image folder / generated dataset DIR was "
                   "packed from; compares counts, every label and sampled pixels")
    v.add_argument("--sample", type=int, default=200, metavar="N", help="records decoded and compared (default 200; "
                   "0 checks labels only)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=run_verify)
    return p, v


def run_pack(args: argparse.Namespace) -> int:
    """Handler of ``digi2real pack``; input errors raise Digi2RealError."""
    from digi2real.dataset.pack import pack

    summary = pack(args.dataset, args.out, quality=args.quality, progress=not args.quiet, keep_png=args.keep_png,
                   overwrite=args.force)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        enc = "PNG" if summary["encoding"] == "png" else f"JPEG q{summary['quality']}"
        print(f"packed {summary['images']} images of {summary['classes']} identities ({enc}, "
              f"{summary['bytes'] / 2**20:.1f} MiB) into {summary['path']}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Handler of ``digi2real verify``; a failed check raises Digi2RealError (exit 2 in the main CLI)."""
    from digi2real.dataset.pack import verify

    report = verify(args.packed, source=args.source, sample=args.sample, seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        against = f" against {report['source']}" if report["source"] else ""
        print(f"ok: {report['images']} images of {report['classes']} classes{against}; {report['sampled']} sampled "
              f"images decoded ({report['exact']} exact, worst mean difference {report['max_mean_abs_diff']})")
    return 0
