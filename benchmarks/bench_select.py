"""`select` at DigiFace scale: 110,000 identities x 5 embeddings (550,000 x 512), time and peak memory.

Runs `digi2real select` in a fresh process (so peak RSS is the stage's own) on a random embeddings artifact, beside a
baseline: a straightforward row-blocked maximum over full rows of the similarity matrix (every pair computed twice)
in the same kind of process. Targets: < 3 minutes and < 4 GB on 2 cores. Prints a table, writes
benchmarks/results/select.json.

    python benchmarks/bench_select.py [--identities 110000] [--per-identity 5]
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

BASELINE = r"""
import sys, time, numpy as np
from digi2real.identity.store import read_store
from digi2real.identity.select import prototypes
t = time.perf_counter()
store = read_store(sys.argv[1])
p = prototypes(store.embeddings, store.identities).vectors
best = np.empty(len(p), np.float32)
for i in range(0, len(p), 1024):
    s = p[i:i + 1024] @ p.T
    s[np.arange(len(s)), np.arange(i, i + len(s))] = -np.inf
    best[i:i + len(s)] = s.max(1)
order = np.argsort(best, kind="stable")[:20000]
print(time.perf_counter() - t)
"""


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and the child's peak RSS in GB."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c",
                           "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
                           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
                           "sys.exit(r.returncode)", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return wall, peak_kb / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=110_000)
    ap.add_argument("--per-identity", type=int, default=5)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "select.json")
    args = ap.parse_args()

    from digi2real.identity.store import write_store

    with tempfile.TemporaryDirectory() as tmp:
        emb_dir = Path(tmp) / "emb"
        rng = np.random.default_rng(0)
        n_rows = args.identities * args.per_identity
        emb = rng.standard_normal((n_rows, 512), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        labels = [str(i) for i in range(args.identities) for _ in range(args.per_identity)]
        paths = [f"{i}/{k}.png" for i in range(args.identities) for k in range(args.per_identity)]
        write_store(emb_dir, emb, labels, paths, {"stage": "embed", "note": "random benchmark embeddings"})
        del emb, labels, paths
        cli = [sys.executable, "-m", "digi2real", "select", str(emb_dir), "-n", str(args.n),
               "-o", str(Path(tmp) / "ids.csv")]
        ours_s, ours_gb = _run(cli)
        base_s, base_gb = _run([sys.executable, "-c", BASELINE, str(emb_dir)])

    result = {
        "benchmark": "select",
        "identities": args.identities,
        "embeddings": n_rows,
        "keep": args.n,
        "ours_seconds": round(ours_s, 1),
        "ours_peak_rss_gb": round(ours_gb, 2),
        "baseline_full_rows_seconds": round(base_s, 1),
        "baseline_peak_rss_gb": round(base_gb, 2),
        "speedup_vs_baseline": round(base_s / ours_s, 2),
        "targets": {"seconds": 180, "peak_rss_gb": 4},
        "cores": os.cpu_count(),
    }
    print(f"\n{'':40s}{'seconds':>10s}{'peak GB':>10s}")
    print(f"{'baseline: full-row blocks':40s}{base_s:10.1f}{base_gb:10.2f}")
    print(f"{'digi2real select (CLI, upper triangle)':40s}{ours_s:10.1f}{ours_gb:10.2f}")
    print(f"speed-up {base_s / ours_s:.2f}x")
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
