"""IJB-C-scale 1:1 scoring from cached features: pooling, pair scoring and ROC, time and peak memory.

Synthetic protocol with IJB-C's sizes and structure (FACTS 9): 469,375 images of 512-d float32 features, 23,124
templates (3,531 enrolment templates, one per subject, and 19,593 probe templates), about 3 media per template, and
15,658,489 (enrolment, probe) pairs of which 19,557 are genuine (~0.1 %), in shuffled order. As in IJB-C, every pair
joins an enrolment template to a probe template. Features are a subject vector plus noise, so TARs are meaningful.

"ours" is :func:`digi2real.evaluation.ijb` (template_features, score_pairs) plus
:func:`digi2real.evaluation.metrics.roc_curve`; "baseline" is the straightforward insightface ``eval_ijbc.py``-style
pipeline written out here (a loop over templates for pooling, float64 features after the faceness product, pairs
scored in 100k-pair chunks by gathering both rows; the same numpy ROC, since sklearn is not a dependency). Each runs in
its own process so peak RSS (ru_maxrss) is its own; both load the same features first (counted in the peak, not in
the time), and ours imports torch before timing (a real run has it loaded for the model; ~4 s here). The TARs of both
must agree, and our scoring applied to the baseline's template features must give its scores bit for bit (each is
insightface's ``np.sum(f1 * f2, -1)``, whatever the chunk; issue 11): both asserted. Targets: ours <= 15 s in all and
<= 4 GB peak.

    python benchmarks/bench_ijb.py [--baseline-fraction 1.0] [--seed 0]

With ``--baseline-fraction f < 1`` the baseline scores only the first fraction ``f`` of the pairs and its scoring
time is extrapolated linearly (reported as such); its TARs are then not comparable and ours are compared with an
exact scoring of all pairs by the baseline's formula instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_IMAGES = 469_375
N_GALLERY = 3_531
N_PROBE = 19_593
N_PAIRS = 15_658_489
N_GENUINE = 19_557
DIM = 512
FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]

OURS = r"""
import json, resource, sys, time
import numpy as np
import torch  # loaded before timing: a real run has it loaded already for the model (pooling uses index_add_)
from digi2real.evaluation.ijb import score_pairs, template_features
from digi2real.evaluation.metrics import roc_curve, tar_at_far
d = sys.argv[1]
feats = np.load(d + "/feats.npy"); face = np.load(d + "/face.npy")
tid = np.load(d + "/tid.npy"); mid = np.load(d + "/mid.npy")
p1 = np.load(d + "/p1.npy"); p2 = np.load(d + "/p2.npy"); lab = np.load(d + "/label.npy")
fars = json.loads(sys.argv[2])
t0 = time.perf_counter()
ids, tf = template_features(feats, face, tid, mid, use_faceness=True)
t1 = time.perf_counter()
scores = score_pairs(tf, ids, p1, p2, chunk=2_000_000)
t2 = time.perf_counter()
fpr, tpr, _ = roc_curve(lab, scores)
tars = tar_at_far(fpr, tpr, fars)
t3 = time.perf_counter()
np.save(d + "/scores_ours.npy", scores)
print(json.dumps({"pooling_s": t1 - t0, "scoring_s": t2 - t1, "roc_s": t3 - t2, "total_s": t3 - t0,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "tar": {repr(k): v for k, v in tars.items()}, "roc_points": len(fpr)}))
"""

BASELINE = r"""
import json, resource, sys, time
import numpy as np
from digi2real.evaluation.metrics import roc_curve, tar_at_far
d = sys.argv[1]
fraction = float(sys.argv[3])
feats = np.load(d + "/feats.npy"); face = np.load(d + "/face.npy")
tid = np.load(d + "/tid.npy"); mid = np.load(d + "/mid.npy")
p1 = np.load(d + "/p1.npy"); p2 = np.load(d + "/p2.npy"); lab = np.load(d + "/label.npy")
fars = json.loads(sys.argv[2])
t0 = time.perf_counter()
img = feats * face[:, None]  # float32 * float64 -> float64, as in insightface
uq = np.unique(tid)
tfeat = np.zeros((len(uq), img.shape[1]))
for k, t in enumerate(uq):
    ind_t = np.where(tid == t)[0]
    f_t = img[ind_t]
    m_t = mid[ind_t]
    media = []
    for m in np.unique(m_t):
        ind_m = np.where(m_t == m)[0]
        media.append(f_t[ind_m] if len(ind_m) == 1 else np.mean(f_t[ind_m], axis=0, keepdims=True))
    tfeat[k] = np.sum(np.concatenate(media), axis=0)
tfeat /= np.maximum(np.linalg.norm(tfeat, axis=1, keepdims=True), 1e-300)
t1 = time.perf_counter()
lut = np.zeros(int(uq.max()) + 1, dtype=int)
lut[uq] = np.arange(len(uq))
n = int(round(len(p1) * fraction))
scores = np.zeros(n)
for s in range(0, n, 100000):
    e = min(s + 100000, n)
    scores[s:e] = np.sum(tfeat[lut[p1[s:e]]] * tfeat[lut[p2[s:e]]], -1)
t2 = time.perf_counter()
np.save(d + "/tfeat_base.npy", tfeat)
if fraction < 1.0:
    tars = {}
    t3 = t2
    roc_s = None
else:
    fpr, tpr, _ = roc_curve(lab, scores)
    tars = tar_at_far(fpr, tpr, fars)
    t3 = time.perf_counter()
    roc_s = t3 - t2
np.save(d + "/scores_base.npy", scores)
print(json.dumps({"pooling_s": t1 - t0, "scoring_s": (t2 - t1) / fraction, "roc_s": roc_s,
                  "total_s": (t1 - t0) + (t2 - t1) / fraction + (roc_s or 0.0),
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "tar": {repr(k): v for k, v in tars.items()}}))
"""


def make_protocol(out: Path, seed: int) -> dict[str, int]:
    """Write the synthetic IJB-C-sized protocol as .npy files under ``out``."""
    rng = np.random.default_rng(seed)
    n_templates = N_GALLERY + N_PROBE
    # Template ids are scattered over a larger range, as IJB's are.
    template_ids = np.sort(rng.choice(200_000, size=n_templates, replace=False))
    subject = np.concatenate([np.arange(N_GALLERY), rng.integers(0, N_GALLERY, N_PROBE)])
    # Every template gets at least one image; the rest are spread at random.
    img_template = np.concatenate([np.arange(n_templates), rng.integers(0, n_templates, N_IMAGES - n_templates)])
    rng.shuffle(img_template)
    tid = template_ids[img_template]
    mid = img_template.astype(np.int64) * 3 + rng.integers(0, 3, N_IMAGES)  # ~3 media per template
    centres = rng.standard_normal((N_GALLERY, DIM)).astype(np.float32)
    feats = rng.standard_normal((N_IMAGES, DIM), dtype=np.float32) * np.float32(10.0)
    feats += centres[subject[img_template]]
    face = rng.uniform(0.5, 1.0, N_IMAGES)

    # Genuine: probe templates with their subject's enrolment template; impostors: distinct random
    # (enrolment, probe) cells of other subjects.
    probes = rng.choice(N_PROBE, N_GENUINE, replace=False)
    g1 = subject[N_GALLERY + probes]
    g2 = N_GALLERY + probes
    n_imp = N_PAIRS - N_GENUINE
    cells = np.unique(rng.integers(0, N_GALLERY * N_PROBE, int(n_imp * 1.3)))
    gi, pj = cells // N_PROBE, cells % N_PROBE
    keep = subject[N_GALLERY + pj] != gi
    gi, pj = gi[keep], pj[keep]
    pick = rng.choice(len(gi), n_imp, replace=False)
    i1 = np.concatenate([g1, gi[pick]])
    i2 = np.concatenate([g2, N_GALLERY + pj[pick]])
    label = np.concatenate([np.ones(N_GENUINE, np.int8), np.zeros(n_imp, np.int8)])
    order = rng.permutation(N_PAIRS)
    arrays = {"feats": feats, "face": face, "tid": tid, "mid": mid, "p1": template_ids[i1[order]],
              "p2": template_ids[i2[order]], "label": label[order]}
    for key, arr in arrays.items():
        np.save(out / f"{key}.npy", arr)
    return {"images": N_IMAGES, "templates": n_templates, "pairs": N_PAIRS, "genuine": N_GENUINE}


def _child(code: str, *args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-fraction", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ijb.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_ijb_") as tmp:
        t = time.perf_counter()
        sizes = make_protocol(Path(tmp), args.seed)
        print(f"protocol generated in {time.perf_counter() - t:.1f} s: {sizes}", flush=True)
        fars = json.dumps(FARS)
        ours = _child(OURS, tmp, fars)
        print(f"ours: {ours}", flush=True)
        base = _child(BASELINE, tmp, fars, str(args.baseline_fraction))
        print(f"baseline: {base}", flush=True)

        s_ours = np.load(Path(tmp) / "scores_ours.npy")
        s_base = np.load(Path(tmp) / "scores_base.npy")
        max_diff = float(np.abs(s_ours[: len(s_base)] - s_base).max())
        # The pooling orders its float64 additions differently (a scatter-add, not a loop of means), so the two
        # pipelines' scores differ in the last bit; given the same template features, our scoring is insightface's.
        from digi2real.evaluation.ijb import score_pairs

        uq = np.unique(np.load(Path(tmp) / "tid.npy"))
        n = len(s_base)
        rescored = score_pairs(np.load(Path(tmp) / "tfeat_base.npy"), uq, np.load(Path(tmp) / "p1.npy")[:n],
                               np.load(Path(tmp) / "p2.npy")[:n])
        scoring_identical = rescored.tobytes() == s_base.tobytes()
        if args.baseline_fraction >= 1.0:
            base_tar = base["tar"]
        else:
            # Score every pair by the baseline's formula with its pooled features (vectorised here: only the TARs
            # are compared, the baseline's time was extrapolated above).
            from digi2real.evaluation.metrics import roc_curve, tar_at_far

            tfeat = np.load(Path(tmp) / "tfeat_base.npy")
            uq = np.unique(np.load(Path(tmp) / "tid.npy"))
            p1, p2 = np.load(Path(tmp) / "p1.npy"), np.load(Path(tmp) / "p2.npy")
            r1, r2 = np.searchsorted(uq, p1), np.searchsorted(uq, p2)
            full = np.empty(len(p1))
            for s in range(0, len(p1), 200_000):
                full[s:s + 200_000] = np.sum(tfeat[r1[s:s + 200_000]] * tfeat[r2[s:s + 200_000]], -1)
            fpr, tpr, _ = roc_curve(np.load(Path(tmp) / "label.npy"), full)
            base_tar = {repr(k): v for k, v in tar_at_far(fpr, tpr, FARS).items()}

    assert scoring_identical, "score_pairs differs from insightface's np.sum(f1 * f2, -1) on the same features"
    assert ours["tar"] == base_tar, f"TARs differ: ours {ours['tar']} baseline {base_tar}"
    rows = [("pooling (s)", "pooling_s"), ("scoring (s)", "scoring_s"), ("ROC + TAR (s)", "roc_s"),
            ("total (s)", "total_s"), ("peak RSS (GB)", "peak_gb")]
    print(f"\n{'':16}{'ours':>10}{'baseline':>12}")
    for label, key in rows:
        b = base[key]
        print(f"{label:16}{ours[key]:>10.2f}{(f'{b:.2f}' if b is not None else 'n/a'):>12}")
    print("\nTAR@FAR (ours == baseline):", {k: round(v, 5) for k, v in ours["tar"].items()})
    print(f"max |score difference| (ours vs baseline, both float64): {max_diff:.2e}; score_pairs on the baseline's "
          f"template features bit-identical to its scores: {scoring_identical}")
    result = {"sizes": sizes, "ours": ours, "baseline": base, "baseline_fraction": args.baseline_fraction,
              "baseline_scoring_extrapolated": args.baseline_fraction < 1.0, "max_score_diff": max_diff,
              "scoring_bit_identical": scoring_identical,
              "targets": {"total_s": 15.0, "peak_gb": 4.0},
              "meets_targets": ours["total_s"] <= 15.0 and ours["peak_gb"] <= 4.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
