"""Reading a generated dataset's kept ArcFace vectors at the recipe's size (issue 14): 20,000 identities x 20 images
in the layout `generate` leaves (manifest rows, ``embeddings/shard-*.safetensors``), read by
``digi2real.generation.vectors.read_vectors`` as `digi2real audit` does, in a fresh process (peak RSS its own), for 1
and 8 shard files. Prints a table, writes benchmarks/results/vectors.json.

    python benchmarks/bench_vectors.py [--identities 20000] [--images 20] [--shards 1,8]
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

READ = r"""
import sys, time
from pathlib import Path
from digi2real.generation.manifest import read_rows
from digi2real.generation.vectors import read_vectors
t = time.perf_counter()
rows = read_rows(Path(sys.argv[1]))
t_rows = time.perf_counter() - t
v = read_vectors(Path(sys.argv[1]), rows)
print(time.perf_counter() - t, t_rows, len(v.rows), v.rows.vectors.shape[1])
"""


def make_dataset(root: Path, identities: int, images: int, shards: int, dim: int = 512) -> None:
    from digi2real.generation.vectors import VectorRows, _write, shard_path

    rng = np.random.default_rng(0)
    keys = [f"{i:06d}/{k}" for i in range(identities) for k in range(images)]
    n = len(keys)
    (root / "manifest").mkdir(parents=True)
    per = -(-n // shards)
    for s in range(shards):
        name = f"shard-{s:05d}-of-{shards:05d}.jsonl"
        part = range(s * per, min(n, (s + 1) * per))
        with open(root / "manifest" / name, "w") as f:
            for i in part:
                ident = keys[i].split("/")[0]
                f.write(json.dumps({"key": keys[i], "identity": ident, "final": True, "status": "ok", "attempt": 0,
                                    "path": f"{keys[i]}.png"}) + "\n")
        v = rng.standard_normal((len(part), dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        _write(shard_path(root, name), VectorRows([keys[i] for i in part], np.zeros(len(part), np.int32), v,
                                                  np.zeros((len(part), 5, 2), np.float32),
                                                  np.zeros(len(part), np.float32), np.zeros(len(part), np.float32),
                                                  "0" * 64))


def measure(root: Path) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c",
                           "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
                           "text=True); print(r.stdout.strip()); print(resource.getrusage("
                           "resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)",
                           sys.executable, "-c", READ, str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    out, peak = proc.stdout.strip().splitlines()[-2:]
    seconds, rows_s, n, dim = out.split()
    return {"seconds": round(float(seconds), 2), "manifest_seconds": round(float(rows_s), 2), "vectors": int(n),
            "dim": int(dim), "peak_rss_gb": round(int(peak) / 1e6, 2), "wall": round(time.perf_counter() - t, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=20_000)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--shards", default="1,8")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vectors.json")
    args = ap.parse_args()
    rows = []
    for shards in [int(s) for s in args.shards.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            make_dataset(Path(tmp), args.identities, args.images, shards)
            size = sum(p.stat().st_size for p in (Path(tmp) / "embeddings").iterdir())
            rows.append({"shards": shards, "file_gb": round(size / 1e9, 3), **measure(Path(tmp))})
    print(f"{'shards':>6} {'vectors':>8} {'files GB':>8} {'read s':>7} {'of it manifest s':>16} {'peak GB':>8}")
    for r in rows:
        print(f"{r['shards']:>6} {r['vectors']:>8,} {r['file_gb']:>8} {r['seconds']:>7} {r['manifest_seconds']:>16} "
              f"{r['peak_rss_gb']:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "vectors", "identities": args.identities, "images": args.images,
                                    "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
