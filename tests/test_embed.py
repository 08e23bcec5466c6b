"""The `embed` stage: the artifact, bad images skipped and reported, and resume after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from digi2real.config import EmbedConfig, EncoderConfig
from digi2real.errors import Digi2RealError
from digi2real.faces.arcface import ArcFaceEncoder
from digi2real.identity.embed import embed_source
from digi2real.identity.store import read_store
from digi2real.sources.folder import FolderSource


def _tree(root, identities=6, images=4, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(identities):
        (root / f"id{i}").mkdir(parents=True)
        for k in range(images):
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(root / f"id{i}" / f"{k}.png")
    return root


@pytest.fixture()
def encoder(mini_arcface):
    return ArcFaceEncoder.load(EncoderConfig(model=str(mini_arcface), batch_size=4))


def test_embed_writes_the_artifact_for_the_first_k_images(tmp_path, encoder):
    src = _tree(tmp_path / "src")
    summary = embed_source(FolderSource(src), encoder, tmp_path / "emb", EmbedConfig(images_per_identity=3, chunk_size=5),
                           progress=False)
    assert (summary.embedded, summary.failed, summary.identities) == (18, 0, 6)
    store = read_store(tmp_path / "emb")
    assert store.embeddings.shape == (18, 512)
    np.testing.assert_allclose(np.linalg.norm(store.embeddings, axis=1), 1.0, atol=1e-5)
    assert store.paths[:4] == ["id0/0.png", "id0/1.png", "id0/2.png", "id1/0.png"]
    assert store.identities[:4] == ["id0", "id0", "id0", "id1"]
    # the stored vector is the encoder's output for that file
    img = np.asarray(Image.open(src / "id1" / "2.png"))
    np.testing.assert_allclose(store.embeddings[5], encoder(img[None])[0], atol=1e-5)
    assert store.meta["encoder"]["sha256"] == encoder.file_hash()
    assert store.meta["images_per_identity"] == 3
    assert not (tmp_path / "emb" / "parts").exists()
    # a second run finds the work done
    again = embed_source(FolderSource(src), encoder, tmp_path / "emb", EmbedConfig(images_per_identity=3, chunk_size=5),
                         progress=False)
    assert again.already_complete


def test_bad_images_are_skipped_and_reported_not_fatal(tmp_path, encoder):
    src = _tree(tmp_path / "src", identities=3, images=3)
    (src / "id0" / "1.png").write_bytes(b"")  # empty
    (src / "id1" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    Image.new("RGB", (200, 150)).save(src / "id2" / "2.png")  # not an aligned crop
    Image.new("L", (112, 112), 128).save(src / "id2" / "0.png")  # grayscale: converted, fine
    summary = embed_source(FolderSource(src), encoder, tmp_path / "emb", EmbedConfig(chunk_size=2), progress=False)
    assert (summary.embedded, summary.failed) == (6, 3)
    rows = [json.loads(line) for line in (tmp_path / "emb" / "failures.jsonl").read_text().splitlines()]
    reasons = {r["path"]: r["reason"] for r in rows}
    assert set(reasons) == {"id0/1.png", "id1/0.png", "id2/2.png"}
    assert "empty" in reasons["id0/1.png"]
    assert "not a readable image" in reasons["id1/0.png"]
    assert "200x150" in reasons["id2/2.png"] and "digi2real align" in reasons["id2/2.png"]
    assert read_store(tmp_path / "emb").paths == ["id0/0.png", "id0/2.png", "id1/1.png", "id1/2.png", "id2/0.png",
                                                  "id2/1.png"]


def test_interrupted_embed_resumes_to_the_same_result(tmp_path, encoder, monkeypatch):
    src = _tree(tmp_path / "src", identities=8, images=5)
    cfg = EmbedConfig(images_per_identity=5, chunk_size=8)
    embed_source(FolderSource(src), encoder, tmp_path / "ref", cfg, progress=False)

    calls = {"n": 0}
    real_run = ArcFaceEncoder.run

    def crash_on_fifth_batch(self, x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_run(self, x)

    monkeypatch.setattr(ArcFaceEncoder, "run", crash_on_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_source(FolderSource(src), encoder, tmp_path / "emb", cfg, progress=False)
    parts = sorted((tmp_path / "emb" / "parts").glob("part-*.safetensors"))
    assert len(parts) == 2  # batches of 4, parts of 8: two parts finished before the fifth batch
    assert not (tmp_path / "emb" / "meta.json").exists()
    with pytest.raises(Digi2RealError, match="incomplete"):
        read_store(tmp_path / "emb")

    monkeypatch.setattr(ArcFaceEncoder, "run", real_run)
    summary = embed_source(FolderSource(src), encoder, tmp_path / "emb", cfg, progress=False)
    assert summary.resumed_parts == 2
    ref, got = read_store(tmp_path / "ref"), read_store(tmp_path / "emb")
    assert got.paths == ref.paths
    np.testing.assert_array_equal(got.embeddings, ref.embeddings)


def test_changed_inputs_refuse_to_mix_unless_overwrite(tmp_path, encoder):
    src = _tree(tmp_path / "src", identities=2, images=3)
    embed_source(FolderSource(src), encoder, tmp_path / "emb", EmbedConfig(images_per_identity=2), progress=False)
    with pytest.raises(Digi2RealError, match="other inputs or settings.*--overwrite"):
        embed_source(FolderSource(src), encoder, tmp_path / "emb", EmbedConfig(images_per_identity=3), progress=False)
    assert len(read_store(tmp_path / "emb")) == 4  # the finished artifact is untouched
    summary = embed_source(FolderSource(src), encoder, tmp_path / "emb", EmbedConfig(images_per_identity=3),
                           progress=False, overwrite=True)
    assert summary.embedded == 6 and len(read_store(tmp_path / "emb")) == 6


def test_every_image_failing_is_an_error(tmp_path, encoder):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    Image.new("RGB", (50, 50)).save(src / "a" / "0.png")
    with pytest.raises(Digi2RealError, match="every image failed"):
        embed_source(FolderSource(src), encoder, tmp_path / "emb", EmbedConfig(), progress=False)
