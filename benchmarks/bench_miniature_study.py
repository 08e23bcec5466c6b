"""The paper's comparison in miniature (issue 13, item 6): a face-recognition model trained on generated data, with
and without the realism shift and the similarity filtering, against the same model trained directly on the rendered
source images (the paper's DigiFace-1M row), all evaluated on held-out real-style people.

Every row uses the demo's recipe (``digi2real run demo``: shipped trained miniatures, 60 rendered identities x 10
images, the same IResNet + CosFace training) with one setting changed, for each of ``--seeds`` (the plan's seed, so
other SLERP latents and noise, and the training seed):

* **Digi2Real**: the demo as it is (shift lambda 1, the least similar identities);
* **no shift**: ``generate.shift_weight 0``;
* **no filtering**: ``select.method first`` (the first identities, not the least similar);
* **rendered source**: no generation, the model trained on the rendered images of the same number of identities and
  images (``sources/domains.RENDERED_SOURCE``, rendered style) - the DigiFace-1M row;
* **real-style photos**: trained on real-style images of other people (``REAL_TRAIN``), the same counts: the ceiling a
  perfect generator could approach.

Evaluation: the demo's verification set (60 held-out real-style people of ``REAL_TEST``, 300 pairs, 10 folds), the
trained model's accuracy and TAR at FAR 1e-3 (percent). Prints a table; writes ``benchmarks/results/miniature_study.json``
and the summary into the shipped models' folder (``study.json``), which the demo's report shows.

    .venv/bin/python benchmarks/bench_miniature_study.py [--seeds 0,1] [--json PATH] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "miniature_study.json"
IDENTITIES, IMAGES = 60, 10  # the demo's selected identities and images per identity

VARIANTS: dict[str, dict[str, object]] = {
    "Digi2Real (shift, filtered)": {},
    "no shift": {"generate.shift_weight": 0.0},
    "no filtering": {"select.method": "first"},
}


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "digi2real.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if proc.returncode != 0:
        raise RuntimeError(f"digi2real {' '.join(args[:2])} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    return proc


def sets(overrides: dict[str, object]) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def verification(results: Path) -> dict:
    r = json.loads((results / "results.json").read_text())["verification"]["procedural"]
    return {"accuracy": r["accuracy"], "std": r["std"], "tar_at_far_1e3": r["tar_at_far_1e3"]}


def generated_row(out: Path, seed: int, overrides: dict[str, object]) -> dict:
    """``digi2real run demo`` with ``overrides`` up to eval; its verification figures and the dataset's size."""
    run = out / "run"
    t = time.perf_counter()
    cli("run", "demo", "--until", "eval", "-q", *sets({"output_dir": run, "plan.seed": seed, "train.seed": seed,
                                                        **overrides}))
    record = json.loads((run / "dataset" / "generation.json").read_text())
    rows = [json.loads(x) for p in sorted((run / "dataset" / "manifest").glob("*.jsonl"))
            for x in p.read_text().splitlines()]
    accepted = sum(1 for r in rows if r["final"] and r["status"] == "ok")
    return {**verification(run / "eval"), "images": accepted, "planned": record["planned_images"],
            "seconds": time.perf_counter() - t}


def direct_row(out: Path, seed: int, style: str, first: int, pairs: Path) -> dict:
    """The demo's training on ``IDENTITIES`` x ``IMAGES`` procedural images of ``style`` from identity ``first``,
    evaluated on the same pairs."""
    from digi2real.sources.procedural import write_procedural_tree

    tree = write_procedural_tree(out / "images", IDENTITIES, IMAGES, seed=0, style=style, first_identity=first)
    t = time.perf_counter()
    cli("train", "demo", "-o", str(out / "train"), "--data", str(tree), "-q", "--set", f"train.seed={seed}")
    cli("eval", str(out / "train"), "-o", str(out / "eval"), "--config", "demo", "--pairs", f"procedural={pairs}")
    return {**verification(out / "eval"), "images": IDENTITIES * IMAGES, "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary folder, removed)")
    args = ap.parse_args()

    from digi2real.sources.domains import REAL_TRAIN, RENDERED_SOURCE

    seeds = [int(s) for s in args.seeds.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="miniature_study."))
    rows: dict[str, list[dict]] = {name: [] for name in [*VARIANTS, "rendered source (DigiFace row)",
                                                          "real-style photos (ceiling)"]}
    pairs = None
    for seed in seeds:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            r = generated_row(root / f"v{i}-s{seed}", seed, overrides)
            rows[name].append(r)
            pairs = pairs or root / f"v{i}-s{seed}" / "run" / "benchmarks" / "procedural" / "pairs.txt"
            print(f"seed {seed} {name:32s} accuracy {r['accuracy']:.2f}% ({r['images']} images, "
                  f"{r['seconds']:.0f} s)", flush=True)
        for name, style, first in (("rendered source (DigiFace row)", "rendered", RENDERED_SOURCE.first),
                                   ("real-style photos (ceiling)", "real", REAL_TRAIN.first + 95_000)):
            r = direct_row(root / f"{style}-s{seed}", seed, style, first, pairs)
            rows[name].append(r)
            print(f"seed {seed} {name:32s} accuracy {r['accuracy']:.2f}% ({r['seconds']:.0f} s)", flush=True)
    print("\n| training data | accuracy % (seeds " + ", ".join(map(str, seeds)) + ") | mean | TAR@FAR=1e-3 % (mean) |")
    print("|---|---|---:|---:|")
    summary = {}
    for name, rs in rows.items():
        acc = [r["accuracy"] for r in rs]
        summary[name] = {"accuracy": acc, "mean_accuracy": statistics.mean(acc),
                         "mean_tar_at_far_1e3": statistics.mean(r["tar_at_far_1e3"] for r in rs)}
        print(f"| {name} | {', '.join(f'{a:.2f}' for a in acc)} | {summary[name]['mean_accuracy']:.2f} | "
              f"{summary[name]['mean_tar_at_far_1e3']:.2f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seeds": seeds, "rows": rows, "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.json}")
    from digi2real.miniature import SHIPPED

    (SHIPPED / "study.json").write_text(json.dumps({"seeds": seeds, "summary": summary}, indent=2) + "\n")
    print(f"wrote {SHIPPED / 'study.json'} (the demo report's table)")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
