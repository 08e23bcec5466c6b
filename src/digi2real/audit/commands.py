"""The `audit` sub-command. ``register(subparsers)`` adds it to the main CLI; importing it is cheap."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

DESCRIPTION = textwrap.dedent("""\
    Audit one or more face sets (DATASET ...) against reference sets (--against REF ...), with one ArcFace:

      contamination  for every identity of a dataset, its most similar identity in each REF: identity level
                     (prototype cosine) and image level (the best image pair among its nearest identities);
                     the identities above the match threshold are listed, their image pairs shown in the HTML
      distinctness   pairs of the dataset's identities the same threshold calls one person, and each
                     identity's highest cosine to another (the paper's Table 4 criterion, after generation)
      consistency    genuine cosines per identity (to its prototype, pairwise), impostor cosines, d'
      variation      spread of the five landmarks in the aligned crops (pose/expression), of brightness and
                     of contrast within each identity
      realism gap    Fréchet distance between the ArcFace embeddings of the dataset and of each real REF

    The match threshold is the cosine that a fraction --far (default 1e-4) of a real REF's impostor scores
    exceed (each real REF's, the highest used; or --calibrate NAME's). --calibration search (the default): each REF
    identity's cosine to its nearest other identity, so a search wrongly matches about FAR x the identities
    searched, whatever the REF's size; --calibration pairs: single pairs of different identities (FAR per pair:
    FAR x the pairs compared; at 20,000 x 100,000 identities that is every identity). A .bin or pairs list
    gives its listed non-match pairs. Without a real REF the threshold is a stated fixed cosine
    (--fixed-threshold), and --threshold fixes it outright. Each count is printed with the chance matches
    expected at that FAR.

    Sets: a generated dataset (its ArcFace vectors, kept by `generate`, are read; nothing is embedded), an image
    folder (a folder per identity, or image files each its own person), a RecordIO folder, a .bin benchmark or a
    pairs list (identities are the groups its genuine pairs join; its non-match pairs are its impostors), an
    IJB folder (templates as identities). A 112 x 112 image is taken as an aligned crop; any other image (but
    a .bin's, resized as insightface does) as a photograph: MTCNN detects and aligns it (the config's
    align.detector), and one without a face is left out and counted.
    Everything that is not a generated dataset is embedded once, in chunks cached under --cache (by model and
    image bytes): a second audit, or one after a kill, embeds nothing twice.

    Writes OUT/audit.json, OUT/audit.md and OUT/audit.html (self-contained, with the image pairs).""")

EPILOG = textwrap.dedent("""\
    examples:
      digi2real audit runs/digi2real-20k/dataset --against data/benchmarks/lfw.bin data/benchmarks/IJBC -o audit/
      digi2real audit digiface/ runs/x/dataset --against data/ffhq-aligned --model arcface.onnx -o compare/
      digi2real audit old-dataset --embed-images --model arcface.onnx -o audit/   # made before vectors were kept""")


def register(subparsers: Any) -> argparse.ArgumentParser:
    from digi2real.cli_common import add_common

    p = subparsers.add_parser(
        "audit", help="leakage, contamination, distinctness and quality of face sets, side by side",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", type=Path, metavar="DATASET", help="the sets audited (one table row each)")
    p.add_argument("--against", nargs="+", type=Path, default=[], metavar="REF",
                   help="reference sets searched for the datasets' identities (benchmarks, real faces)")
    p.add_argument("--model", metavar="ONNX",
                   help="ArcFace ONNX (file or hub id) for the sets without stored vectors; default: the one the "
                   "first generated dataset recorded")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output folder")
    p.add_argument("--cache", type=Path, metavar="DIR", help="embedding cache (default OUT/cache); share it "
                   "between audits to embed a benchmark once")
    p.add_argument("--far", type=float, help="false-accept rate of the match threshold (default 1e-4)")
    p.add_argument("--threshold", type=float, help="a fixed match cosine instead of the calibrated one")
    p.add_argument("--fixed-threshold", type=float, help="the cosine used when no real REF calibrates (0.4)")
    p.add_argument("--calibrate", metavar="NAME", help="the REF whose impostors set the threshold")
    p.add_argument("--calibration", choices=["search", "pairs"],
                   help="impostor scores: nearest other identity (search, default) or single pairs")
    p.add_argument("--neighbours", type=int, help="nearest REF identities searched image by image (10)")
    p.add_argument("--embed-images", action="store_true",
                   help="embed generated datasets' images with --model instead of reading their stored vectors")
    add_common(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from digi2real.audit.run import audit
    from digi2real.cli_common import given, load_config
    from digi2real.errors import Digi2RealError
    from digi2real.fileio import check_apart

    full = load_config(args, given(audit__far=args.far, audit__threshold=args.threshold,
                                   audit__fixed_threshold=args.fixed_threshold, audit__calibrate=args.calibrate,
                                   audit__calibration=args.calibration, audit__neighbours=args.neighbours))
    cfg = full.audit
    if args.output.exists() and not args.output.is_dir():
        raise Digi2RealError(f"-o {args.output}: is a file; name a folder for audit.json, audit.md and audit.html")
    check_apart(args.output, [*args.datasets, *args.against])
    if args.cache is not None:  # the cache is written to as well: never inside a set
        check_apart(args.cache, [*args.datasets, *args.against], flag="--cache")
    summary = audit(list(args.datasets), list(args.against), args.output, cfg, model=args.model, cache=args.cache,
                    embed_images=args.embed_images, progress=not args.quiet, encoder_cfg=full.encoder,
                    align_cfg=full.align)
    print(f"audit: {args.output / 'audit.html'} (+ audit.json, audit.md) in {summary['seconds']:.1f} s")
    return 0
