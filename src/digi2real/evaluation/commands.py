"""The `eval` and `compare` sub-commands. ``register(subparsers)`` adds both to the main CLI.

Importing this module is cheap (no torch, no onnxruntime): models are loaded only when a command runs.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from digi2real.errors import Digi2RealError

EVAL_DESCRIPTION = textwrap.dedent("""\
    Evaluate a face-recognition model on the benchmarks of the Digi2Real paper (Tables 5-7): 1:1 verification
    accuracy on LFW, CALFW, CPLFW, AgeDB-30, CFP-FP (and CFP-FF) in insightface's 10-fold protocol, IJB-B / IJB-C
    TAR at FAR (the paper reports FAR = 1e-4), and per-race RFW accuracy with mean and std (population, ddof 0).
    Each image is embedded together with its horizontal flip (summed), as insightface does.

    MODEL may be:
      - an ONNX face model (.onnx), input N x 3 x S x S RGB (crops are resized when S != 112); whether the
        graph normalises its input itself is detected as insightface does (first nodes Sub/Mul);
      - an insightface IResNet state dict (backbone.pth from arcface_torch, also wrapped under "state_dict" or
        prefixed "module."/"backbone."): depth and widths are inferred from the keys; input (x/255 - 0.5)/0.5 RGB;
      - a training output directory holding model.pt (our backbone state dict).
    Checkpoints are read with torch.load(weights_only=True): a pickle holding anything but tensors is refused.

    Expected layout under --data-root DIR (a missing benchmark is skipped with a warning naming its path):
      DIR/lfw.bin  calfw.bin  cplfw.bin  agedb_30.bin  cfp_fp.bin  cfp_ff.bin
            insightface .bin pickles; they ship with insightface's training sets (e.g. faces_emore / MS1MV2,
            faces_webface_112x112). Read with a restricted unpickler: no code in them can run.
      DIR/IJBB/  DIR/IJBC/   insightface's IJB release layout:
            loose_crop/*.jpg
            meta/ijbc_face_tid_mid.txt  meta/ijbc_template_pair_label.txt  meta/ijbc_name_5pts_score.txt
            (ijbb_* for IJB-B)
      DIR/RFW/African_test.bin  Asian_test.bin  Caucasian_test.bin  Indian_test.bin
            (or the four files directly in DIR); RFW is available from its authors on request.

    Writes into -o DIR: results.json (all numbers in percent), results.md and results.csv (the paper's tables,
    with its Digi2Real-20K and DigiFace-1M rows marked "(paper)" for comparison), roc_<benchmark>.png,
    curves.npz, and cache/ (embeddings: a re-run with the same model and settings only re-scores).
    Settings come from --config's `eval:` section (its data_root and pairs too), then these flags.""")

EVAL_EPILOG = textwrap.dedent("""\
    examples:
      digi2real eval runs/x/train -o runs/x/eval --data-root data/eval
      digi2real eval backbone.pth -o eval/ms1mv2-r50 --data-root data/faces_emore --benchmarks lfw,cfp_fp,agedb_30
      digi2real eval model.onnx -o eval/onnx --data-root data/eval --benchmarks ijbc --batch-size 256 --device cuda
      digi2real eval runs/x/train -o eval/x --data-root data/eval --precision bf16 --set eval.ijb_faceness=false
      digi2real compare eval/x eval/ms1mv2-r50 -o eval/compare""")

COMPARE_DESCRIPTION = textwrap.dedent("""\
    Combine the results folders written by `digi2real eval` into one Markdown table and one CSV (paper Tables 5-7
    layout, the paper's rows included) and ROC plots with every model overlaid (roc_<benchmark>.png).""")


def _benchmarks(text: str) -> list[str]:
    from digi2real.config import BENCHMARKS

    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [n for n in names if n not in BENCHMARKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(bad) or '(none given)'}; choose from {','.join(BENCHMARKS)}")
    return names


def register(subparsers: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add ``eval`` and ``compare`` to an argparse subparsers object; their ``func`` defaults are the handlers."""
    p = subparsers.add_parser(
        "eval", help="verification / IJB / RFW evaluation of a face model (paper Tables 5-7)",
        description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path, metavar="MODEL", help=".onnx, IResNet backbone.pth, or a directory with model.pt")
    p.add_argument("--data-root", type=Path, metavar="DIR", help="folder holding the benchmarks (layout below)")
    p.add_argument("--pairs", action="append", default=[], metavar="NAME=FILE",
                   help="also score a folder of aligned 112x112 images with a pairs file (lines 'a.png b.png 1|0', "
                        "paths relative to FILE's folder) under NAME; repeatable")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="RESULTS", help="results folder (created)")
    p.add_argument("--benchmarks", type=_benchmarks, metavar="LIST",
                   help="comma-separated, from lfw,calfw,cplfw,agedb_30,cfp_fp,cfp_ff,ijbb,ijbc,rfw "
                   "(default: all but cfp_ff)")
    p.add_argument("--config", type=Path, metavar="YAML",
                   help="experiment config; its `eval:` section sets the defaults (flags below override it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an eval setting by dotted key, e.g. --set eval.folds=10 (repeatable)")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (default 128)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default auto)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast of PyTorch models (default fp32; fp16 needs CUDA); ONNX graphs run as exported")
    p.add_argument("--no-flip", action="store_true", help="embed images alone, not summed with their flips")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval_command)

    c = subparsers.add_parser(
        "compare", help="combine several eval results folders into one table and overlaid ROC plots",
        description=COMPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  digi2real compare eval/digi2real-20k eval/digiface -o eval/compare",
    )
    c.add_argument("results", nargs="+", type=Path, metavar="RESULTS", help="folders written by `digi2real eval -o`")
    c.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="folder for the combined tables")
    c.set_defaults(func=run_compare_command)
    return p, c


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted overrides of the `eval` section from the flags that were given, then --set (last wins)."""
    from digi2real.config import section_overrides

    flags = {
        "benchmarks": getattr(args, "benchmarks", None),
        "batch_size": getattr(args, "batch_size", None),
        "device": getattr(args, "device", None),
        "precision": getattr(args, "precision", None),
        "flip": False if getattr(args, "no_flip", False) else None,
    }
    return section_overrides(flags, getattr(args, "set", None), "eval")


def run_eval_command(args: argparse.Namespace) -> int:
    """Handler of ``digi2real eval``; returns the exit status. Input errors raise Digi2RealError."""
    from digi2real.config import EvalConfig, load_section
    from digi2real.evaluation.run import run_eval

    cfg = load_section(EvalConfig, getattr(args, "config", None), "eval", overrides_from_args(args))
    # The config's eval.data_root and eval.pairs (what `run` evaluates) apply unless the flags say otherwise.
    pairs = dict(cfg.pairs)
    given: set[str] = set()
    for item in getattr(args, "pairs", []):
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise Digi2RealError(f"--pairs {item!r}: expected NAME=FILE, e.g. --pairs mine=data/mine/pairs.txt")
        if name in given:
            raise Digi2RealError(f"--pairs {name}=...: the name {name!r} is given twice; give each set its own NAME")
        given.add(name)
        pairs[name] = Path(file)
    data_root = args.data_root if args.data_root is not None else cfg.data_root
    result = run_eval(args.model, data_root, args.output, cfg, progress=not getattr(args, "quiet", False),
                      pairs=pairs)
    print((args.output / "results.md").read_text().rstrip())
    print(f"\n{result['name']}: {len(result['verification'])} verification set(s), {len(result['ijb'])} IJB, "
          f"RFW {'yes' if result['rfw'] else 'no'}, {len(result['skipped'])} skipped, {result['seconds']:.1f} s "
          f"-> {args.output}")
    return 0


def run_compare_command(args: argparse.Namespace) -> int:
    """Handler of ``digi2real compare``; returns the exit status."""
    from digi2real.evaluation.run import compare

    combined = compare(args.results, args.output)
    print(combined["markdown"].rstrip())
    print(f"\n{len(combined['results'])} result(s) -> {args.output}")
    return 0
