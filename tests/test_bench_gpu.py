"""The GPU benchmark's ``--quick`` mode is what CI and anyone without a GPU can run: every part must run and the JSON
must carry the figures BENCHMARKS.md reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_quick_runs_every_part_and_writes_its_json(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["device"] in ("cpu", "cuda")
    official, stage = result["official"], result["stage"]
    # same number of images made both ways; the stage detected, aligned, checked and wrote every one of them
    assert official["images"] == stage["images"] == stage["written"] == 8
    assert stage["images_per_s"] > 0 and official["images_per_s"] > 0
    assert set(stage["where"]) == {"arc2face", "arcface", "mtcnn"}
    parts = result["parts_s_per_image"]
    for name in ("unet", "vae_decode", "align", "identity_check", "png_write"):
        assert parts[name] > 0, name
    assert math.isclose(parts["unet_plus_vae"], parts["unet"] + parts["vae_decode"])
    assert result["stage_over_unet_vae"] > 0 and result["stage_vs_official"] > 0
    train = result["train"]
    assert train["steps"] == 30 and train["windows_images_per_s"] and train["layout"] == "nchw"
    assert 0 < train["slowest_window_share"] <= 1
    assert "targets_met" not in result  # a quick run is never compared with the H200 targets
