"""`audit` at the issue's scale: 20,000 identities x 20 images against a 100,000-identity reference x 5 images, from
stored embeddings (512-d), time and peak memory (issue 14: at most 3 minutes and 4 GB on 2 CPU cores).

Synthetic unit vectors (identity centres plus noise: genuine image cosines about 0.6, impostors 0 +- 0.045, as
ArcFace's) are written as stored-embeddings files (safetensors: "vectors" float32 [n, 512], "labels" int64 [n]),
with a few dataset identities planted as other views of reference identities and a few as duplicates of each
other. Each run is a fresh process (peak RSS is its own) that loads the files and runs the audit's arithmetic
(``digi2real.audit.measures``): thresholds, contamination (k = 10), distinctness, consistency, variation, Fréchet
distance. Beside it, on a reduced size that fits, a baseline: the same two searches (each identity's nearest
reference identity, its nearest other identity) done straightforwardly, full rows of image-to-image similarities
in row blocks, no prototype stage; the blocked audit runs on that same reduced size so the ratio is on equal work,
then on the full size alone. Prints a table, writes benchmarks/results/audit.json.

    python benchmarks/bench_audit.py [--identities 20000] [--images 20] [--ref-identities 100000] [--ref-images 5]
                                     [--base-identities 2000] [--base-ref-identities 10000] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 512
NOISE = 0.8  # image = centre + NOISE * N(0, I/d), normalised: cosine 0.78 to the centre, about 0.6 between images
PLANTED = 10  # dataset identities that are other views of a reference identity (contamination to find)
DUPLICATES = 5  # pairs of dataset identities that are views of one centre (duplicates to find)
TARGETS = {"seconds": 180, "peak_rss_gb": 4}


# ------------------------------------------------------------------------------------------------------ data


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def _views(centres: np.ndarray, images: int, rng: np.random.Generator) -> np.ndarray:
    x = np.repeat(centres, images, axis=0)
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(NOISE / np.sqrt(DIM))
    return _unit(x)


def make_sets(folder: Path, identities: int, images: int, ref_identities: int, ref_images: int,
              seed: int = 0) -> dict:
    """Write dataset.safetensors and reference.safetensors into ``folder``; return what was planted."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    ref_centres = _unit(rng.standard_normal((ref_identities, DIM), dtype=np.float32))
    save_file({"vectors": _views(ref_centres, ref_images, rng),
               "labels": np.repeat(np.arange(ref_identities, dtype=np.int64), ref_images)},
              str(folder / "reference.safetensors"))
    centres = _unit(rng.standard_normal((identities, DIM), dtype=np.float32))
    planted = rng.choice(identities, size=PLANTED + 2 * DUPLICATES, replace=False)
    leaked, dup_a, dup_b = planted[:PLANTED], planted[PLANTED::2], planted[PLANTED + 1::2]
    sources = rng.choice(ref_identities, size=PLANTED, replace=False)
    centres[leaked] = ref_centres[sources]
    centres[dup_b] = centres[dup_a]
    del ref_centres
    vectors = np.empty((identities * images, DIM), np.float32)
    for start in range(0, identities, 4096):  # in chunks: the parent's memory is not measured, but it is shared
        vectors[start * images:(start + 4096) * images] = _views(centres[start:start + 4096], images, rng)
    n = len(vectors)
    save_file({"vectors": vectors, "labels": np.repeat(np.arange(identities, dtype=np.int64), images),
               "landmarks": (rng.normal(0, 2, (n, 5, 2)) + [56, 56]).astype(np.float32),
               "brightness": rng.normal(120, 10, n).astype(np.float32),
               "contrast": rng.normal(50, 5, n).astype(np.float32)}, str(folder / "dataset.safetensors"))
    return {"leaked": {int(a): int(b) for a, b in zip(leaked, sources)},
            "duplicates": sorted((int(min(a, b)), int(max(a, b))) for a, b in zip(dup_a, dup_b))}


def _load(path: Path, name: str):
    from safetensors.numpy import load_file

    from digi2real.audit.measures import Embedded

    t = load_file(str(path))
    m = int(t["labels"].max()) + 1
    return Embedded(name, t.pop("vectors"), t.pop("labels"), [f"{name}-{i}" for i in range(m)], **t)


# ------------------------------------------------------------------------------------------------------ children


def child_audit(folder: Path, device: str) -> dict:
    """The blocked audit, step by step (seconds per step, and what it found)."""
    from digi2real.audit import measures as M

    steps: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        steps[name] = round(now - t, 2)
        t = now

    data, ref = _load(folder / "dataset.safetensors", "dataset"), _load(folder / "reference.safetensors", "ref")
    step("load")
    data.prototypes, ref.prototypes  # cached properties: computed here, so each later step times only itself
    step("prototypes")
    pair_threshold = M.far_threshold(M.impostor_scores(ref.prototypes), 1e-4)
    step("threshold_pairs")
    search_threshold = M.far_threshold(M.nearest_impostor_scores(ref.prototypes, device=device), 1e-4,
                                       what="nearest-identity cosines")
    step("threshold_search")
    cont = M.contamination(data, ref, search_threshold, k=10, device=device)
    step("contamination")
    dist = M.distinctness(data, search_threshold, device=device)
    step("distinctness")
    cons = M.consistency(data)
    step("consistency")
    M.variation(data)
    step("variation")
    fd = M.frechet_distance(data.vectors, ref.vectors)
    step("frechet")
    np.save(folder / "ours_nearest.npy", cont.image_reference)
    np.save(folder / "ours_other.npy", dist.nearest)
    return {"steps": steps, "matched": sorted({int(x.identity.split("-")[1]) for x in cont.matches}),
            "matched_pair_threshold": int((cont.nearest_cosine > pair_threshold.value).sum()),
            "duplicates": sorted((int(x.identity_a.split("-")[1]), int(x.identity_b.split("-")[1]))
                                 for x in dist.duplicates),
            "threshold_pairs": round(pair_threshold.value, 4), "threshold_search": round(search_threshold.value, 4),
            "d_prime": round(cons.d_prime, 3), "frechet": round(fd, 4)}


def child_baseline(folder: Path) -> dict:
    """The straightforward searches: every dataset image against every reference image (and every dataset image),
    in row blocks of full similarity rows, no prototypes: each identity's nearest reference identity and its nearest
    other identity by their best image pair."""
    steps: dict[str, float] = {}
    t = time.perf_counter()
    data, ref = _load(folder / "dataset.safetensors", "dataset"), _load(folder / "reference.safetensors", "ref")
    steps["load"] = round(time.perf_counter() - t, 2)
    out = {}
    for what, table, table_labels in (("contamination", ref.vectors, ref.labels),
                                      ("distinctness", data.vectors, data.labels)):
        t = time.perf_counter()
        best = np.full(len(data.identities), -np.inf, np.float32)
        who = np.full(len(data.identities), -1, np.int64)
        for start in range(0, len(data.vectors), 1024):
            s = data.vectors[start:start + 1024] @ table.T
            mine = data.labels[start:start + 1024]
            if what == "distinctness":  # an identity's own images are not another identity
                s[mine[:, None] == table_labels[None, :]] = -np.inf
            col = s.argmax(axis=1)
            val = s[np.arange(len(s)), col]
            for i, v, c in zip(mine, val, col):  # per identity, its best image pair so far
                if v > best[i]:
                    best[i], who[i] = v, table_labels[c]
        out[what] = who
        steps[what] = round(time.perf_counter() - t, 2)
    np.save(folder / "base_nearest.npy", out["contamination"])
    np.save(folder / "base_other.npy", out["distinctness"])
    return {"steps": steps}


# ------------------------------------------------------------------------------------------------------ parent


def _run(args: list[str]) -> tuple[float, float, dict]:
    """Wall seconds, the child's peak RSS in GB, and what it printed (JSON, last line)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c",
                           "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
                           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
                           "sys.exit(r.returncode)", sys.executable, __file__, *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return wall, peak_kb / 1e6, json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(label: str, child: str, folder: Path, sizes: tuple[int, int, int, int], device: str) -> dict:
    wall, peak, printed = _run(["--child", child, "--folder", str(folder), "--device", device])
    searches = sum(printed["steps"].get(k, 0.0) for k in ("prototypes", "contamination", "distinctness"))
    return {"run": label, "identities": sizes[0], "images": sizes[1], "ref_identities": sizes[2],
            "ref_images": sizes[3], "seconds": round(wall, 1), "peak_rss_gb": round(peak, 2),
            "search_seconds": round(searches, 2), **printed}


def _agreement(folder: Path, planted: dict) -> dict:
    """Share of identities whose nearest reference identity by best image pair is the same for the blocked audit
    (image pairs among the 10 nearest by prototype) as for the exhaustive baseline, and whose nearest other identity
    (the audit's by prototype, Table 4's criterion; the baseline's by best image pair) is the same: over all
    identities (for an identity that matches no one, "nearest" is the largest of many chance cosines and may differ)
    and over the planted ones, which are what the audit must find."""
    ours_ref, base_ref = np.load(folder / "ours_nearest.npy"), np.load(folder / "base_nearest.npy")
    ours_other, base_other = np.load(folder / "ours_other.npy"), np.load(folder / "base_other.npy")
    leaked = np.array(sorted(planted["leaked"]), np.int64)
    dups = np.array(planted["duplicates"], np.int64).reshape(-1)

    def share(a: np.ndarray, b: np.ndarray) -> float:
        return round(float((a == b).mean()), 4) if len(a) else 1.0

    return {"nearest_reference_all": share(ours_ref, base_ref),
            "nearest_reference_planted": share(ours_ref[leaked], base_ref[leaked]),
            "nearest_other_all": share(ours_other, base_other),
            "nearest_other_planted": share(ours_other[dups], base_other[dups])}


def _found(planted: dict, ours: dict) -> dict:
    """How many planted leaks and duplicates the full-size audit found, and what else it matched (at FAR 1e-4 of a
    search, a few chance matches among 20,000 identities are expected)."""
    leaked, matched = set(planted["leaked"]), set(ours["matched"])
    dups, found = {tuple(p) for p in planted["duplicates"]}, {tuple(p) for p in ours["duplicates"]}
    return {"leaked": len(leaked), "leaked_found": len(leaked & matched), "other_matches": len(matched - leaked),
            "duplicates": len(dups), "duplicates_found": len(dups & found), "other_duplicates": len(found - dups)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=20_000)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--ref-identities", type=int, default=100_000)
    ap.add_argument("--ref-images", type=int, default=5)
    ap.add_argument("--base-identities", type=int, default=2_000, help="the reduced size the baseline runs on")
    ap.add_argument("--base-ref-identities", type=int, default=10_000)
    ap.add_argument("--device", default="cpu", help="cpu, auto or cuda: where the blocked audit's products run")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks that every part runs")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit.json")
    ap.add_argument("--child", choices=("audit", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child_audit(args.folder, args.device) if args.child == "audit" else child_baseline(args.folder)
        print(json.dumps(result))
        return
    if args.quick:
        args.identities, args.images, args.ref_identities, args.ref_images = 300, 4, 1500, 3
        args.base_identities, args.base_ref_identities = 100, 500

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reduced, full = Path(tmp) / "reduced", Path(tmp) / "full"
        reduced.mkdir()
        small = (args.base_identities, args.images, args.base_ref_identities, args.ref_images)
        planted_small = make_sets(reduced, *small)
        rows.append(_measure("baseline: full image rows", "baseline", reduced, small, "cpu"))
        rows.append(_measure("blocked audit (same size)", "audit", reduced, small, args.device))
        agreement = _agreement(reduced, planted_small)
        full.mkdir()
        big = (args.identities, args.images, args.ref_identities, args.ref_images)
        planted = make_sets(full, *big)
        rows.append(_measure("blocked audit (full size)", "audit", full, big, args.device))
    base, same, ours = rows
    # The baseline's products grow with images x images; extrapolated, not run (it would take hours at full size).
    work = ((big[0] * big[1]) * (big[2] * big[3] + big[0] * big[1])) / ((small[0] * small[1]) *
                                                                       (small[2] * small[3] + small[0] * small[1]))
    base_search = base["steps"]["contamination"] + base["steps"]["distinctness"]
    result = {
        "benchmark": "audit", "quick": args.quick, "device": args.device, "cores": os.cpu_count(), "rows": rows,
        "search_speedup_same_size": round(base_search / max(same["search_seconds"], 1e-9), 1),
        "baseline_full_size_estimate_seconds": round(base_search * work),
        "agreement_with_baseline": agreement,
        "planted": _found(planted, ours),
        "targets": TARGETS,
    }
    if not args.quick:
        result["targets_met"] = ours["seconds"] <= TARGETS["seconds"] and ours["peak_rss_gb"] <= TARGETS["peak_rss_gb"]
    print(f"\n{'':30s}{'sets':>34s}{'seconds':>9s}{'searches':>10s}{'peak GB':>9s}")
    for r in rows:
        sets = f"{r['identities']:,}x{r['images']} vs {r['ref_identities']:,}x{r['ref_images']}"
        print(f"{r['run']:30s}{sets:>34s}{r['seconds']:9.1f}{r['search_seconds']:10.2f}{r['peak_rss_gb']:9.2f}")
    print(f"steps (full size): {ours['steps']}")
    print(f"searches {result['search_speedup_same_size']}x faster than the baseline on the same size; the baseline "
          f"would take about {result['baseline_full_size_estimate_seconds']:,} s at full size")
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
