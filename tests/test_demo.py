"""The built-in miniature that `make demo` runs: every artifact it promises is there and well formed."""

from __future__ import annotations

import numpy as np
from PIL import Image

from digi2real.cli import main
from digi2real.identity import read_plan, read_store
from digi2real.identity.select import read_selection


def test_demo_produces_every_artifact_and_reruns_without_work(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--identities", "12", "--keep", "8", "-q"]) == 0
    first = capsys.readouterr().out
    assert "rendering 12 procedural identities" in first
    store = read_store(out / "embeddings")
    assert len(store) == 60 and store.meta["source"]["kind"] == "digiface-folder"
    ids = read_selection(out / "ids.csv")
    assert len(ids) == 8
    plan = read_plan(out / "plan.parquet")
    assert len(plan) == 160 and set(plan.table.column("identity").to_pylist()) == set(ids)
    crops = sorted((out / "aligned").glob("*.png"))
    assert [c.name for c in crops] == ["astronaut.png", "grace_hopper.png"]
    for crop in crops:
        arr = np.asarray(Image.open(crop))
        assert arr.shape == (112, 112, 3) and arr.std() > 20  # a real face, not an empty canvas
    assert main(["demo", "-o", str(out), "--identities", "12", "--keep", "8", "-q"]) == 0
    assert "rendering" not in capsys.readouterr().out  # the second run reuses what the first made
