"""Image-folder and generated-dataset reading, real-identity mixing, pack/verify, and open_training_set's errors."""

from __future__ import annotations

import argparse
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digi2real.config import DataConfig
from digi2real.dataset import commands
from digi2real.dataset.imagefolder import ImageFolderDataset, MixedDataset, RecordFolderDataset, open_training_set
from digi2real.dataset.pack import pack, verify
from digi2real.dataset.recordio import InsightFaceRecordDataset
from digi2real.errors import BadImageError, Digi2RealError


def face(seed: int, size: int = 112) -> np.ndarray:
    """A smooth, distinct test image (smooth so JPEG at q95 stays within the verify tolerance)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
             for _ in range(3)]
    return np.clip(np.stack(chans, -1) * 100 + 128, 0, 255).astype(np.uint8)


def save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def make_folder(root: Path, counts: dict[str, int], offset: int = 0) -> Path:
    """root/<identity>/<k>.png with the given number of images per identity."""
    for j, (identity, n) in enumerate(counts.items()):
        for k in range(n):
            save(root / identity / f"{k}.png", face(offset + 100 * j + k))
    return root


def make_generated(root: Path) -> Path:
    """A generated dataset: 3 identities, one rejected image whose file exists, an identity with no ok image."""
    rows = []
    for identity, n in (("10", 2), ("2", 3), ("7", 1)):
        for k in range(n):
            save(root / "images" / identity / f"{k}.png", face(int(identity) * 10 + k))
            status = "ok"
            if identity == "2" and k == 1:
                status = "identity_gate"
            if identity == "7":
                status = "no_face"
            rows.append({"path": f"{identity}/{k}.png", "status": status, "seed": k})
    (root / "manifest").mkdir(parents=True)
    half = len(rows) // 2
    (root / "manifest" / "shard-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:half]))
    # A killed writer's truncated last line must be ignored.
    (root / "manifest" / "shard-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[half:]) + '{"pa')
    (root / "card.md").write_text("# card\n")
    return root


# ------------------------------------------------------------------------------------------------ folder datasets


def test_folder_labels_natural_order(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"id10": 2, "id2": 1, "id1": 3})
    (root / "empty").mkdir()
    (root / "id1" / ".DS_Store").write_bytes(b"x")
    save(root / "id1" / "10.png", face(999))  # natural order: 10.png after 2.png
    ds = ImageFolderDataset(root)
    assert ds.identities == ["id1", "id2", "id10"]
    assert ds.num_classes == 3
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 2, 2]
    assert [ds.relpath(i) for i in range(4)] == ["id1/0.png", "id1/1.png", "id1/2.png", "id1/10.png"]
    img, label = ds[4]
    assert img.dtype == np.uint8 and img.shape == (112, 112, 3) and label == 1
    assert np.array_equal(img, face(100))  # id2 was the second identity made: seed 100
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[6][0], ds[6][0]) and clone.labels.tolist() == ds.labels.tolist()
    with pytest.raises(IndexError):
        ds[7]


def test_wrong_size_names_file(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "d", {"a": 1})
    save(root / "a" / "1.png", face(1, size=96))
    ds = ImageFolderDataset(root)
    with pytest.raises(BadImageError, match=r"a/1\.png.*96x96"):
        ds[1]


def test_generated_layout_uses_ok_rows_only(tmp_path: Path) -> None:
    ds = ImageFolderDataset(make_generated(tmp_path / "gen"))
    assert ds.has_manifest
    assert ds.identities == ["2", "10"]  # "7" has no ok image
    assert [ds.relpath(i) for i in range(len(ds))] == ["2/0.png", "2/2.png", "10/0.png", "10/1.png"]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(ds[1][0], face(22))


def test_generated_later_row_wins_and_missing_ok_file(tmp_path: Path) -> None:
    root = make_generated(tmp_path / "gen")
    with open(root / "manifest" / "shard-2.jsonl", "w") as f:  # a retry made 2/1.png acceptable
        f.write(json.dumps({"path": "images/2/1.png", "status": "ok"}) + "\n")
    assert ImageFolderDataset(root).labels.tolist() == [0, 0, 0, 1, 1]
    (root / "images" / "10" / "1.png").unlink()
    with pytest.raises(Digi2RealError, match=r"10/1\.png.*missing"):
        ImageFolderDataset(root)


def test_generated_without_manifest_rows(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    save(root / "images" / "a" / "0.png", face(0))
    (root / "manifest").mkdir()
    with pytest.raises(Digi2RealError, match="no \\*.jsonl"):
        ImageFolderDataset(root)
    (root / "manifest" / "s.jsonl").write_text(json.dumps({"path": "a/0.png", "status": "no_face"}) + "\n")
    with pytest.raises(Digi2RealError, match="empty training set"):
        ImageFolderDataset(root)


# ------------------------------------------------------------------------------------------------ mixing


def test_mix_first_and_random(tmp_path: Path) -> None:
    syn = ImageFolderDataset(make_folder(tmp_path / "syn", {"s0": 2, "s1": 1}))
    real = ImageFolderDataset(make_folder(tmp_path / "real", {f"r{i}": i + 1 for i in range(6)}, offset=5000))
    mixed = MixedDataset(syn, real, k=2, pick="first", seed=0)
    assert mixed.num_classes == 4
    assert mixed.identities == ["s0", "s1", "real/r0", "real/r1"]
    assert mixed.labels.tolist() == [0, 0, 1, 2, 3, 3]
    assert len(mixed) == 6
    img, label = mixed[4]
    assert label == 3 and np.array_equal(img, real[1][0])
    assert np.array_equal(mixed[0][0], syn[0][0]) and mixed[2][1] == 1

    a = MixedDataset(syn, real, k=3, pick="random", seed=7)
    b = MixedDataset(syn, real, k=3, pick="random", seed=7)
    assert a.real_classes.tolist() == b.real_classes.tolist()
    picks = {tuple(MixedDataset(syn, real, k=3, pick="random", seed=s).real_classes.tolist()) for s in range(8)}
    assert len(picks) > 1  # the seed matters
    assert a.labels[:3].tolist() == syn.labels.tolist()  # synthetic labels unchanged
    real_part = a.labels[3:]
    assert sorted(set(real_part.tolist())) == [2, 3, 4]
    expected = []
    for new, old in enumerate(a.real_classes.tolist()):
        expected += [2 + new] * int((real.labels == old).sum())
    assert real_part.tolist() == expected
    assert a.identities[2:] == [f"real/{real.identities[c]}" for c in a.real_classes.tolist()]
    for i in range(len(a)):
        assert a[i][1] == a.labels[i]
    assert pickle.loads(pickle.dumps(a)).labels.tolist() == a.labels.tolist()
    with pytest.raises(Digi2RealError, match="only 6"):
        MixedDataset(syn, real, k=7)


# ------------------------------------------------------------------------------------------------ pack / verify


@pytest.mark.parametrize("keep_png", [False, True])
def test_pack_verify_round_trip(tmp_path: Path, keep_png: bool) -> None:
    src = make_generated(tmp_path / "gen")
    save(src / "images" / "10" / "2.jpg", face(77))  # a JPEG source is stored byte for byte
    with open(src / "manifest" / "shard-2.jsonl", "w") as f:
        f.write(json.dumps({"path": "10/2.jpg", "status": "ok"}) + "\n")
    out = tmp_path / "packed"
    summary = pack(src, out, progress=False, keep_png=keep_png)
    assert summary["images"] == 5 and summary["classes"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["identities.txt", "labels.json", "property", "train.idx",
                                                     "train.rec"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert (out / "identities.txt").read_text() == "2\n10\n"
    source = ImageFolderDataset(src)
    rec = InsightFaceRecordDataset(out)
    assert len(rec) == 5 and rec.num_classes == 2 and rec.has_meta
    assert rec.labels.tolist() == source.labels.tolist()
    for i in range(len(rec)):
        img, label = rec[i]
        ref, ref_label = source[i]
        assert label == ref_label
        diff = np.abs(img.astype(int) - ref.astype(int)).mean()
        if keep_png or source.relpath(i).endswith(".jpg"):
            assert diff == 0
        else:
            assert 0 < diff < 3
    assert RecordFolderDataset(out).identities == ["2", "10"]
    report = verify(out, source=src, sample=10)
    assert report["images"] == 5 and report["sampled"] == 5 and report["labels_checked"] == 5
    assert report["exact"] == 5  # re-encoding the source as pack did reproduces the stored JPEG byte for byte
    assert verify(out)["ok"]
    with pytest.raises(Digi2RealError, match="already holds a packed set; replace it with --force"):
        pack(src, out, progress=False)
    pack(src, out, progress=False, overwrite=True, quality=80)
    assert json.loads((out / "labels.json").read_text())["quality"] == 80


def _tamper_label(packed: Path, key: int, label: float) -> None:
    """Overwrite the scalar label in record ``key``'s header (part head 8 bytes, then flag uint32, label float32)."""
    offsets = {int(k): int(v) for k, v in (line.split("\t") for line in (packed / "train.idx").read_text().splitlines())}
    with open(packed / "train.rec", "r+b") as f:
        f.seek(offsets[key] + 8 + 4)
        f.write(struct.pack("<f", label))


def test_verify_detects_tampered_label_and_wrong_source(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", {"a": 2, "b": 2, "c": 2})
    out = tmp_path / "packed"
    pack(src, out, progress=False)
    _tamper_label(out, key=3, label=0.0)  # first image of "b" now claims class 0 (still sorted)
    with pytest.raises(Digi2RealError, match="record 3 has label 0 but its source image b/0.png has label 1"):
        verify(out, source=src)
    with pytest.raises(Digi2RealError, match="class 0|range"):
        verify(out)  # labels.json and range records catch it without the source too

    pack(src, out, progress=False, overwrite=True)
    other = make_folder(tmp_path / "other", {"a": 2, "b": 3, "c": 2})
    with pytest.raises(Digi2RealError, match="holds 6 images of 3 classes but the source .* has 7 images"):
        verify(out, source=other)
    swapped = make_folder(tmp_path / "swapped", {"a": 2, "b": 2, "c": 2}, offset=40)
    with pytest.raises(Digi2RealError, match="differs from its source image"):
        verify(out, source=swapped)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digi2real")
    commands.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_pack_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_folder(tmp_path / "src", {"x": 2, "y": 1})
    out = tmp_path / "packed"
    args = _parser().parse_args(["pack", str(src), "-o", str(out), "--keep-png", "-q"])
    assert args.func(args) == 0
    assert "packed 3 images of 2 identities (PNG" in capsys.readouterr().out
    args = _parser().parse_args(["verify", str(out), "--source", str(src), "--sample", "2", "--json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sampled"] == 2 and report["exact"] == 2
    _tamper_label(out, key=3, label=0.0)
    args = _parser().parse_args(["verify", str(out), "--source", str(src)])
    with pytest.raises(Digi2RealError):
        args.func(args)
    with pytest.raises(SystemExit):
        _parser().parse_args(["pack", str(src)])  # -o is required
    pack_help = _parser()._subparsers._group_actions[0].choices["pack"].format_help()  # type: ignore[union-attr]
    assert "manifest" in pack_help and "--keep-png" in pack_help


# ------------------------------------------------------------------------------------------------ open_training_set


def test_open_training_set(tmp_path: Path) -> None:
    syn = make_folder(tmp_path / "syn", {"s0": 1, "s1": 1})
    real = make_folder(tmp_path / "real", {"r0": 1, "r1": 2, "r2": 1}, offset=300)
    ds = open_training_set(DataConfig(path=syn), seed=0)
    assert isinstance(ds, ImageFolderDataset) and ds.num_classes == 2
    mixed = open_training_set(DataConfig(path=syn, real_path=real, real_identities=2, real_pick="random"), seed=3)
    again = open_training_set(DataConfig(path=syn, real_path=real, real_identities=2, real_pick="random"), seed=3)
    assert mixed.num_classes == 4 and mixed.identities == again.identities
    assert mixed.identities[:2] == ["s0", "s1"]

    packed = tmp_path / "packed"
    pack(real, packed, progress=False)
    rec = open_training_set(DataConfig(path=packed, real_path=syn, real_identities=1), seed=0)
    assert rec.num_classes == 4 and rec.identities == ["r0", "r1", "r2", "real/s0"]
    assert rec.labels.tolist() == [0, 1, 1, 2, 3]
    assert rec[4][1] == 3 and rec[4][0].shape == (112, 112, 3)
    assert open_training_set(DataConfig(path=packed / "train.rec"), seed=0).num_classes == 3

    with pytest.raises(Digi2RealError, match="data.path is not set"):
        open_training_set(DataConfig(), seed=0)
    with pytest.raises(Digi2RealError, match="does not exist"):
        open_training_set(DataConfig(path=tmp_path / "nope"), seed=0)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(Digi2RealError, match="empty training set"):
        open_training_set(DataConfig(path=tmp_path / "empty"), seed=0)
    with pytest.raises(Digi2RealError, match="real_path is not set"):
        open_training_set(DataConfig(path=syn, real_identities=1), seed=0)
    with pytest.raises(Digi2RealError, match="data.real_identities: asked for 5 .* only 3"):
        open_training_set(DataConfig(path=syn, real_path=real, real_identities=5), seed=0)
    with pytest.raises(Digi2RealError, match="data.real_path: .* does not exist"):
        open_training_set(DataConfig(path=syn, real_path=tmp_path / "nope", real_identities=1), seed=0)


def test_verify_without_identity_names_and_renamed_identity(tmp_path: Path) -> None:
    src = make_folder(tmp_path / "src", {"a": 1, "b": 1})
    out = tmp_path / "packed"
    pack(src, out, progress=False)
    (out / "identities.txt").write_text("a\nz\n")
    with pytest.raises(Digi2RealError, match="label 1 is identity 'z' but 'b'"):
        verify(out, source=src)
    (out / "identities.txt").unlink()  # as a set packed by another tool: names are not compared
    assert verify(out, source=src)["ok"]
