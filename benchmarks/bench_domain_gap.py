"""The two procedural domains (issue 13): is the gap between "rendered" and "real" real, does a photo-trained detector
find the "real" faces, and what does each style cost to draw.

1. Domain gap. The project's own face-recognition training (``digi2real.training.loop.train``: a tiny IResNet, widths
   16-128, one block per stage, CosFace) runs on two in-memory sets of the same size: once on rendered people
   (``domains.RENDERED_SOURCE``), once on real-style people (``domains.REAL_TRAIN``), for each of two training seeds
   (initialisation, order, augmentation). Each model is evaluated on the same held-out pairs (``domains.REAL_TEST``
   people, disjoint from both) drawn in both styles, with insightface's 10-fold verification accuracy
   (``digi2real.evaluation.verification``). Raw-pixel accuracy is the floor.
2. MTCNN (the packaged detector, default thresholds, ``detect_and_align`` with the default ``AlignConfig``): share of
   images in which a face is found, per style, at 64 and 112 px, on held-out people.
3. Render time per image of each style at 64 and 112 px; the styles alternate image by image so a busy machine slows
   both alike.

Everything runs on one CPU thread (about 6 minutes on the 2-core CI machine, most of it the four trainings). Prints
a table and writes ``benchmarks/results/domain_gap.json``::

    .venv/bin/python benchmarks/bench_domain_gap.py [--identities 200] [--per-identity 10] [--epochs 8] [--seeds 0,1]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from digi2real.fileio import write_json  # noqa: E402
from digi2real.sources.domains import REAL_TEST, REAL_TRAIN, RENDERED_SOURCE, check_disjoint  # noqa: E402
from digi2real.sources.procedural import STYLES, render_item  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED = 0


class StyleSet:
    """A training set (the loop's TrainingSet protocol) of ``per`` images of each identity, drawn in ``style``."""

    def __init__(self, identities: range, per: int, style: str) -> None:
        self.images = np.stack([render_item(SEED, i, k, style=style) for i in identities for k in range(per)])
        self.labels = np.repeat(np.arange(len(identities), dtype=np.int64), per)
        self.num_classes = len(identities)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


def pair_plan(identities: range, n_pairs: int, per: int = 10) -> list[tuple[int, int, int, int, bool]]:
    """Alternating genuine and impostor pairs ``(i, k1, j, k2, same)`` over ``identities`` (seeded: both styles get
    exactly the same pairs of the same people)."""
    rng = np.random.default_rng(5)
    ids = list(identities)
    plan = []
    for p in range(n_pairs):
        i = ids[p % len(ids)]
        if p % 2 == 0:
            k1, k2 = (int(k) for k in rng.choice(per, 2, replace=False))
            plan.append((i, k1, i, k2, True))
        else:
            j = ids[(p % len(ids) + 1 + int(rng.integers(len(ids) - 1))) % len(ids)]
            plan.append((i, int(rng.integers(per)), j, int(rng.integers(per)), False))
    return plan


def render_pairs(plan: list[tuple[int, int, int, int, bool]], style: str) -> tuple[np.ndarray, np.ndarray]:
    """The 2N images and N labels of a pair plan, drawn in ``style``."""
    images = [render_item(SEED, i, k, style=style) for a, ka, b, kb, _ in plan for i, k in ((a, ka), (b, kb))]
    return np.stack(images), np.array([same for *_, same in plan])


def domain_gap(args: argparse.Namespace) -> dict[str, Any]:
    """Train on each style (once per training seed), evaluate on pairs of each style: the 2 x 2 accuracy table, mean
    over seeds, with raw pixels as the floor."""
    from digi2real.config import DataConfig, EvalConfig, TrainConfig
    from digi2real.evaluation.models import load_face_model
    from digi2real.evaluation.verification import evaluate_verification
    from digi2real.training.loop import train

    plan = pair_plan(REAL_TEST.identities(args.test_identities), args.pairs)
    pairs = {style: render_pairs(plan, style) for style in STYLES}
    out: dict[str, Any] = {"raw_pixels": {}, "trained_on": {}, "runs": []}
    for style, (images, same) in pairs.items():
        raw = images.reshape(len(images), -1).astype(np.float32)
        out["raw_pixels"][style] = evaluate_verification(raw - raw.mean(1, keepdims=True), same).accuracy
    train_ranges = {"rendered": RENDERED_SOURCE, "real": REAL_TRAIN}
    with tempfile.TemporaryDirectory() as tmp:
        for style, people in train_ranges.items():
            data = StyleSet(people.identities(args.identities), args.per_identity, style)
            for seed in args.seeds:
                cfg = TrainConfig(widths=(16, 32, 64, 128), depths=(1, 1, 1, 1), stem_stride=2, head="cosface",
                                  scale=32.0, batch_size=64, epochs=args.epochs, lr=0.1, warmup_epochs=0.5,
                                  device="cpu", log_every=50, seed=seed, data=DataConfig(workers=0))
                t = time.perf_counter()
                summary = train(cfg, data, Path(tmp) / f"{style}-{seed}", progress=False)
                train_s = time.perf_counter() - t
                model = load_face_model(Path(tmp) / f"{style}-{seed}", EvalConfig(device="cpu", batch_size=128))
                accuracy = {test: evaluate_verification(model.embed(images), same).accuracy
                            for test, (images, same) in pairs.items()}
                out["runs"].append({"trained_on": style, "seed": seed, "accuracy": accuracy, "train_s": train_s,
                                    "steps": summary.steps_done, "final_loss": float(np.mean(summary.losses[-10:]))})
                print(f"  trained on {style}, seed {seed}: rendered pairs {accuracy['rendered']:.3f}, real pairs "
                      f"{accuracy['real']:.3f} ({train_s:.0f} s)", flush=True)
            runs = [r for r in out["runs"] if r["trained_on"] == style]
            out["trained_on"][style] = {"accuracy": {test: statistics.mean(r["accuracy"][test] for r in runs)
                                                     for test in STYLES}}
    real = out["trained_on"]
    by_seed = {(r["trained_on"], r["seed"]): r["accuracy"] for r in out["runs"]}
    out["gap_on_real_pairs_by_seed"] = [by_seed["real", s]["real"] - by_seed["rendered", s]["real"]
                                        for s in args.seeds]
    out["gap_on_real_pairs"] = real["real"]["accuracy"]["real"] - real["rendered"]["accuracy"]["real"]
    out["gap_on_rendered_pairs"] = real["rendered"]["accuracy"]["rendered"] - real["real"]["accuracy"]["rendered"]
    return out


def detection_rates(n: int) -> dict[str, dict[str, Any]]:
    """Share of images (held-out people, ``n`` per style and size) in which MTCNN finds a face at default settings."""
    import torch

    from digi2real.config import AlignConfig
    from digi2real.faces.detect import detect_and_align
    from digi2real.faces.mtcnn import MTCNN

    torch.set_num_threads(1)
    detector = MTCNN.from_package(device="cpu")
    people = REAL_TEST.identities(n)
    out: dict[str, dict[str, Any]] = {}
    for style in STYLES:
        for size in (64, 112):
            images = [render_item(SEED + 1, i, i % 10, size, style=style) for i in people]
            found = [r for r in detect_and_align(images, detector, AlignConfig()) if r.ok]
            out[f"{style}@{size}"] = {"images": n, "found": len(found), "rate": len(found) / n,
                                      "found_padded": sum(r.attempt == "padded" for r in found)}
    return out


def render_times(n: int) -> dict[str, dict[str, float]]:
    """Median seconds per image of each style at 64 and 112 px; styles alternate image by image."""
    out: dict[str, dict[str, float]] = {}
    people = REAL_TEST.identities(n)
    for size in (64, 112):
        times: dict[str, list[float]] = {style: [] for style in STYLES}
        for style in STYLES:  # warm-up (imports, caches)
            render_item(SEED, people[0], 0, size, style=style)
        for i in people:
            for style in STYLES:
                t = time.perf_counter()
                render_item(SEED + 2, i, 0, size, style=style)
                times[style].append(time.perf_counter() - t)
        medians = {style: statistics.median(ts) for style, ts in times.items()}
        out[str(size)] = {**{f"{style}_ms": 1000.0 * s for style, s in medians.items()},
                          "real_over_rendered": medians["real"] / medians["rendered"]}
    return out


def report(result: dict[str, Any]) -> None:
    """The three tables."""
    gap = result["domain_gap"]
    print("\n1. Verification accuracy (10-fold, mean over training seeds) on held-out people, by training style (rows) "
          "and pair style (columns)")
    print(f"   {'trained on':<14}{'rendered pairs':>16}{'real pairs':>12}")
    for style, row in gap["trained_on"].items():
        print(f"   {style:<14}{row['accuracy']['rendered']:>16.3f}{row['accuracy']['real']:>12.3f}")
    raw = gap["raw_pixels"]
    print(f"   {'raw pixels':<14}{raw['rendered']:>16.3f}{raw['real']:>12.3f}")
    seeds = ", ".join(f"{g:+.3f}" for g in gap["gap_on_real_pairs_by_seed"])
    print(f"   gap on real pairs (real-trained minus rendered-trained): {gap['gap_on_real_pairs']:+.3f} "
          f"(per training seed: {seeds})")
    print(f"   gap on rendered pairs (rendered-trained minus real-trained): {gap['gap_on_rendered_pairs']:+.3f}")
    print("\n2. MTCNN detection rate (default thresholds, detect_and_align)")
    for key, row in result["mtcnn"].items():
        print(f"   {key:<14}{row['found']:>4}/{row['images']:<4} {row['rate']:.1%}  "
              f"(padded retry: {row['found_padded']})")
    print("\n3. Render time per image (median, one thread)")
    for size, row in result["render_ms"].items():
        print(f"   {size:>3} px: rendered {row['rendered_ms']:.2f} ms, real {row['real_ms']:.2f} ms "
              f"({row['real_over_rendered']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=200, help="training identities per style")
    parser.add_argument("--per-identity", type=int, default=10, help="training images per identity")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
                        help="training seeds, comma-separated (each style is trained once per seed)")
    parser.add_argument("--test-identities", type=int, default=200, help="held-out people in the pairs")
    parser.add_argument("--pairs", type=int, default=800, help="pairs per style (half genuine)")
    parser.add_argument("--detect", type=int, default=300, help="images per style and size for MTCNN")
    parser.add_argument("--timing", type=int, default=300, help="images per style and size for render times")
    parser.add_argument("--out", type=Path, default=RESULTS / "domain_gap.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    check_disjoint([REAL_TRAIN, RENDERED_SOURCE, REAL_TEST])
    start = time.perf_counter()
    result: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": 1,
                                          "torch": torch.__version__}}
    print("render times ...", flush=True)
    result["render_ms"] = render_times(args.timing)
    print("MTCNN ...", flush=True)
    result["mtcnn"] = detection_rates(args.detect)
    print("domain gap (two trainings) ...", flush=True)
    result["domain_gap"] = domain_gap(args)
    result["total_s"] = time.perf_counter() - start
    report(result)
    print(f"\ntotal {result['total_s']:.0f} s; wrote {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
