"""The three identity stages from the command line, on DigiFace-layout fixtures and on procedural faces."""

from __future__ import annotations

import csv
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from digi2real.cli import main
from digi2real.identity.store import read_store


def _digiface_tree(root, identities=(0, 1, 2, 3, 10, 11), images=6, seed=0):
    """Unzipped DigiFace-1M layout (FACTS 4): <id>/<k>.png, 112 x 112, integer names."""
    rng = np.random.default_rng(seed)
    for ident in identities:
        (root / str(ident)).mkdir(parents=True)
        for k in range(images):
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(root / str(ident) / f"{k}.png")
    return root


def _zip_tree(tree, zip_path):
    """The same images as one DigiFace zip: members <id>/<k>.png, no wrapper folder."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, f"{path.parent.name}/{path.name}")
    return zip_path


def _stages(src, out, encoder, extra_select=(), capsys=None):
    assert main(["embed", str(src), "-o", str(out / "emb"), "--encoder", str(encoder), "-k", "5", "-q"]) == 0
    assert main(["select", str(out / "emb"), "-n", "4", "-o", str(out / "ids.csv"), *extra_select]) == 0
    assert main(["plan", str(out / "emb"), "--ids", str(out / "ids.csv"), "--images", "10", "-o",
                 str(out / "plan.parquet")]) == 0


def test_stages_on_digiface_folders_and_zips_agree(tmp_path, mini_arcface):
    tree = _digiface_tree(tmp_path / "digiface")
    zips = tmp_path / "zips"
    zips.mkdir()
    _zip_tree(tree, zips / "subjects_0-1999_72_imgs.zip")
    _stages(tree, tmp_path / "a", mini_arcface)
    _stages(zips, tmp_path / "b", mini_arcface)

    a, b = read_store(tmp_path / "a" / "emb"), read_store(tmp_path / "b" / "emb")
    assert a.paths == b.paths and a.paths[:6] == ["0/0.png", "0/1.png", "0/2.png", "0/3.png", "0/4.png", "1/0.png"]
    assert a.paths[-1] == "11/4.png"  # natural order: 10 and 11 after 3; first 5 of 6 images
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.meta["source"]["kind"] == "digiface-folder" and b.meta["source"]["kind"] == "digiface-zip"

    rows = list(csv.DictReader(open(tmp_path / "a" / "ids.csv")))
    assert [r["rank"] for r in rows] == ["0", "1", "2", "3"]
    sims = [float(r["max_similarity"]) for r in rows]
    assert sims == sorted(sims)
    plan = pq.read_table(tmp_path / "a" / "plan.parquet")
    assert plan.num_rows == 40
    assert plan.equals(pq.read_table(tmp_path / "b" / "plan.parquet").replace_schema_metadata(plan.schema.metadata))


def test_stages_on_procedural_faces(tmp_path, mini_arcface, capsys):
    out = tmp_path / "p"
    assert main(["embed", "procedural:12x5:0", "-o", str(out / "emb"), "--encoder", str(mini_arcface), "-q"]) == 0
    assert "embedded 60 images of 12 identities" in capsys.readouterr().out
    assert main(["select", str(out / "emb"), "--method", "greedy", "--threshold", "0.999", "--all",
                 "-o", str(out / "ids.csv")]) == 0
    assert main(["plan", str(out / "emb"), "--ids", str(out / "ids.csv"), "--shard", "1/3",
                 "-o", str(out / "plan1.parquet")]) == 0
    plan = pq.read_table(out / "plan1.parquet").to_pydict()
    ids = [r["identity"] for r in csv.DictReader(open(out / "ids.csv"))]
    assert sorted(set(plan["identity"])) == sorted(ids[1::3])
    assert read_store(out / "emb").meta["source"]["kind"] == "procedural"


def test_config_file_drives_the_stages(tmp_path, mini_arcface):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        "source: {kind: procedural, identities: 6, images_per_identity: 3}\n"
        f"encoder: {{model: {mini_arcface}}}\n"
        "select: {n: 3}\n"
        "plan: {images_per_identity: 4, images_per_latent: 2, alpha: 1.0}\n"
    )
    assert main(["embed", "--config", str(cfg), "-o", str(tmp_path / "emb"), "-q"]) == 0
    assert len(read_store(tmp_path / "emb")) == 18
    assert main(["select", "--config", str(cfg), str(tmp_path / "emb"), "-o", str(tmp_path / "ids.csv")]) == 0
    assert main(["plan", "--config", str(cfg), str(tmp_path / "emb"), "--ids", str(tmp_path / "ids.csv"),
                 "--set", "plan.seed=5", "-o", str(tmp_path / "plan.parquet")]) == 0
    table = pq.read_table(tmp_path / "plan.parquet")
    assert table.num_rows == 12 and max(table.column("latent_index").to_pylist()) == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["embed", "/nonexistent/faces", "-o", "{tmp}/e"], "/nonexistent/faces: source not found"),
        (["select", "{tmp}/missing", "-o", "{tmp}/ids.csv"], "embeddings directory not found"),
        (["plan", "{tmp}", "--ids", "{tmp}/ids.csv", "-o", "{tmp}/p.parquet", "--alpha", "-1"], "plan.alpha"),
        (["embed", "procedural:abc", "-o", "{tmp}/e"], "expected procedural:IDENTITIESxIMAGES"),
        (["plan", "{tmp}", "--ids", "{tmp}/ids.csv", "-o", "{tmp}/p.parquet", "--shard", "4/4"], "--shard"),
        (["select", "{tmp}", "--set", "select.bogus=1", "-o", "{tmp}/x.csv"], "select.bogus: unknown key"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "meta.json").write_text("{}")  # makes {tmp} look like an embeddings dir only for read errors
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("digi2real: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_help_teaches_every_stage(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("embed", "select", "plan", "download", "demo"):
        assert word in text
    assert main(["plan", "--help"]) == 0
    assert "Beta(alpha, alpha)" in capsys.readouterr().out
