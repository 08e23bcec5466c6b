"""The whole `generate` stage on the CPU, this code against an earlier revision's, side by side (issue 12: "CPU path
not slower than today").

The demo's miniature (``configs/demo.yaml``: procedural identities, the miniature Arc2Face / SD1.5 parts / ArcFace
with random weights, the real MTCNN) is prepared once with ``digi2real run --until plan``; then ``digi2real generate``
of its plan runs as a subprocess with the ``src`` of each version on ``PYTHONPATH`` (the earlier one extracted by
``git archive``, the checkout untouched), alternating so both see the same machine load. Each run starts from an
empty dataset folder and is timed from the command's start to its exit (model loading included), and the images
written are compared byte for byte between the versions (the work units changed in issue 12, so a change in the
pixels would show here). ``--size``/``--steps`` scale the rendering's share of the work (the demo's 64 px and 4 steps
make the finishing work - detection, alignment, identity check, writes - a large part, which is what the engine
reorganised).

    .venv/bin/python benchmarks/bench_stage.py --baseline-rev 62c639b [--repeats 3] [--size 64] [--steps 4]
        [--batch 16] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import machine  # noqa: E402
from bench_train import source_tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "bench_stage.json"


def prepare(run: Path) -> dict[str, str]:
    """The demo's run folder up to its plan (this code), and the model paths `generate` is given."""
    cmd = [sys.executable, "-m", "digi2real.cli", "run", str(ROOT / "configs" / "demo.yaml"), "--until", "plan",
           "--set", f"output_dir={run}"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    models = run / "models"
    return {"plan": str(run / "plan.parquet"), "arc2face": str(models / "Arc2Face"), "base": str(models / "sd15"),
            "encoder": str(models / "Arc2Face" / "arcface.onnx")}


def generate(src: Path, inputs: dict[str, str], out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One ``digi2real generate`` with the code in ``src`` (and ``extra`` flags): wall time and the images it
    wrote."""
    cmd = [sys.executable, "-m", "digi2real.cli", "generate", inputs["plan"], "-o", str(out),
           "--config", str(ROOT / "configs" / "demo.yaml"), "--arc2face", inputs["arc2face"], "--base",
           inputs["base"], "--encoder", inputs["encoder"], "--device", "cpu", "--size", str(args.size), "--steps",
           str(args.steps), "--batch-size", str(args.batch), "-q", *extra]
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"outcome": f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    images = sorted((out / "images").rglob("*.png"))
    digest = hashlib.sha256()
    for p in images:
        digest.update(p.relative_to(out).as_posix().encode() + p.read_bytes())
    return {"outcome": "ran", "wall_s": wall, "images": len(images), "images_per_s": len(images) / wall,
            "images_sha256": digest.hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", required=True, help="the earlier revision (e.g. 62c639b, before issue 12)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) of each run")
    ap.add_argument("--threads-too", action="store_true",
                    help="also run this code with --workers 2 (finishing on two threads; the CPU default is in line)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_stage.") as tmp:
        tmp = Path(tmp)
        inputs = prepare(tmp / "demo")
        (tmp / "base").mkdir()
        versions = {"before": (source_tree(args.baseline_rev, tmp / "base"), []), "after": (ROOT / "src", [])}
        if args.threads_too:
            versions["after, --workers 2"] = (ROOT / "src", ["--workers", "2"])
        runs: dict[str, list[dict]] = {v: [] for v in versions}
        for i in range(args.repeats):
            for n, (name, (src, extra)) in enumerate(versions.items()):
                r = generate(src, inputs, tmp / f"v{n}-{i}", args, extra)
                runs[name].append(r)
                print(f"{name:18s} run {i + 1}: " + (f"{r['images']} images in {r['wall_s']:.1f} s = "
                      f"{r['images_per_s']:.2f} images/s" if r["outcome"] == "ran" else r["outcome"]), flush=True)
    ok = {n: [r for r in rs if r["outcome"] == "ran"] for n, rs in runs.items()}
    median = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in ok.items() if rs}
    digests = {r["images_sha256"] for rs in ok.values() for r in rs}
    result = {"benchmark": "generate stage, CPU", "machine": machine(), "baseline_rev": args.baseline_rev,
              "settings": {k: getattr(args, k) for k in ("size", "steps", "batch", "threads", "repeats")},
              "runs": runs, "median_wall_s": median, "same_images_in_every_run": len(digests) == 1}
    if "before" in median and "after" in median:
        result["after_vs_before_speed"] = median["before"] / median["after"]
    print("\n| version | runs (wall s) | median wall s | images/s |\n|---|---|---:|---:|")
    for n, rs in ok.items():
        if rs:
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
            print(f"| {n} | {walls} | {median[n]:.1f} | "
                  f"{rs[0]['images'] / median[n]:.2f} |")
    if "after_vs_before_speed" in result:
        print(f"after / before speed: {result['after_vs_before_speed']:.2f}x; same images in every run: "
              f"{result['same_images_in_every_run']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
