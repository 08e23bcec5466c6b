"""Hostile and careless input to the identity stages (align, embed, select, plan), the sources, configs and limits.

Each case was a traceback, a hang, a silent wrong result or data loss before (issue 11); each now ends with one line,
exit status 2, and every input and earlier output byte-identical (``hostile.refused``).
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digi2real.cli import main
from digi2real.identity.store import read_store, write_store
from digi2real.sources.procedural import write_procedural_tree

from hostile import refused, snapshot


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def faces(tmp_path) -> Path:
    """Six procedural identities x 3 aligned images in a folder-per-identity tree."""
    return write_procedural_tree(tmp_path / "faces", 6, 3, seed=3)


def _embed(src: Path, out: Path, encoder: Path, *extra: str) -> int:
    return main(["embed", str(src), "-o", str(out), "--encoder", str(encoder), "-k", "3", "-q", *extra])


# ------------------------------------------------------------------------------------------------------ align


def test_align_into_its_own_input_folder_is_refused(tmp_path, capsys, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(astronaut).save(photos / "a.png")
    line = refused(capsys, ["align", photos, "-o", photos, "-q"], tmp_path)
    assert "never writes into or deletes its input" in line
    refused(capsys, ["align", photos, "-o", photos / "aligned", "-q"], tmp_path)  # inside it: also its input
    refused(capsys, ["align", photos, "-o", tmp_path, "-q"], tmp_path)  # a folder holding it


def test_align_refuses_a_damaged_settings_file_instead_of_mixing_sizes(tmp_path, capsys, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(astronaut).save(photos / "a.png")
    out = tmp_path / "aligned"
    assert main(["align", str(photos), "-o", str(out), "-q"]) == 0
    Image.fromarray(astronaut[::-1].copy()).save(photos / "b.png")
    (out / "align_settings.json").write_text("{not json")
    line = refused(capsys, ["align", photos, "-o", out, "--size", "128", "-q"], tmp_path)
    assert "align_settings.json" in line and "restore it" in line
    (out / "align_settings.json").unlink()  # missing while crops exist: the same refusal
    refused(capsys, ["align", photos, "-o", out, "--size", "128", "-q"], tmp_path)


def test_align_reports_a_decompression_bomb_as_a_bad_image(tmp_path, capsys, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(astronaut).save(photos / "a.png")
    (photos / "bomb.png").write_bytes(_png_declaring(10000, 10000))  # 15 KB that decodes to 300 MB
    assert main(["align", str(photos), "-o", str(tmp_path / "out"), "-q", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] == 1 and summary["bad_image"] == 1
    rows = [json.loads(x) for x in (tmp_path / "out" / "align_report.jsonl").read_text().splitlines()]
    bomb = next(r for r in rows if r["src"] == "bomb.png")
    assert "10000 x 10000" in bomb["reason"] and "DIGI2REAL_MAX_IMAGE_PIXELS" in bomb["reason"]


@pytest.mark.parametrize("value", ["2,2,2", "nan,0.7,0.7", "-1,0.7,0.7"])
def test_align_refuses_impossible_thresholds(tmp_path, capsys, value, astronaut):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(astronaut).save(photos / "a.png")
    line = refused(capsys, ["align", photos, "-o", tmp_path / "out", f"--thresholds={value}", "-q"], tmp_path)
    assert "align.detector.thresholds" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ embed


def test_embed_notices_images_replaced_under_the_same_names(tmp_path, capsys, faces, mini_arcface):
    out = tmp_path / "emb"
    assert _embed(faces, out, mini_arcface) == 0
    before = read_store(out).embeddings.copy()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(faces / "2" / "1.png")
    line = refused(capsys, ["embed", faces, "-o", out, "--encoder", mini_arcface, "-k", "3", "-q"], tmp_path)
    assert "other inputs" in line and "content_sha256" in line
    assert _embed(faces, out, mini_arcface, "--overwrite") == 0
    after = read_store(out)
    row = after.paths.index("2/1.png")
    assert not np.allclose(before[row], after.embeddings[row])  # the stale vector is gone
    np.testing.assert_array_equal(np.delete(before, row, 0), np.delete(after.embeddings, row, 0))


def test_a_damaged_part_is_redone_on_resume(tmp_path, faces, mini_arcface, monkeypatch):
    from digi2real.identity import embed as embed_module

    out = tmp_path / "emb"
    reference = tmp_path / "ref"
    assert _embed(faces, reference, mini_arcface, "--chunk-size", "4") == 0

    # A run killed after its parts were written but before assembly, then a part damaged on disk.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "_assemble", killed)
    assert _embed(faces, out, mini_arcface, "--chunk-size", "4") == 130
    monkeypatch.undo()
    part = out / "parts" / "part-000001.safetensors"
    part.write_bytes(part.read_bytes()[:50])
    assert _embed(faces, out, mini_arcface, "--chunk-size", "4") == 0
    np.testing.assert_array_equal(read_store(out).embeddings, read_store(reference).embeddings)


def test_embed_state_files_of_the_wrong_shape_give_one_line(tmp_path, capsys, faces, mini_arcface):
    out = tmp_path / "emb"
    assert _embed(faces, out, mini_arcface) == 0
    for content in (b"\x00\xff\xfe binary", b"[1, 2]", b'{"inputs_sha256": 5}'):
        (out / "meta.json").write_bytes(content)
        line = refused(capsys, ["embed", faces, "-o", out, "--encoder", mini_arcface, "-k", "3", "-q"], tmp_path)
        assert "meta.json" in line and "--overwrite" in line
    assert _embed(faces, out, mini_arcface, "--overwrite") == 0  # the fix the message gives works
    assert len(read_store(out)) == 18


def test_embed_output_inside_its_source_or_a_file_is_refused(tmp_path, capsys, faces, mini_arcface):
    refused(capsys, ["embed", faces, "-o", faces / "emb", "--encoder", mini_arcface, "-q"], tmp_path)
    (tmp_path / "afile").write_text("keep me")
    line = refused(capsys, ["embed", faces, "-o", tmp_path / "afile", "--encoder", mini_arcface, "-q"], tmp_path)
    assert "not a folder" in line
    # -o below a file: the operating system's error, as one line naming the path
    line = refused(capsys, ["embed", faces, "-o", tmp_path / "afile" / "emb", "--encoder", mini_arcface, "-q"],
                   tmp_path)
    assert "afile" in line


def test_a_zip_member_inflating_past_the_limit_is_never_inflated_whole(tmp_path, capsys, mini_arcface, monkeypatch):
    from digi2real.sources.digiface import DigiFaceZipSource

    tree = write_procedural_tree(tmp_path / "tree", 3, 2, seed=1)
    zpath = tmp_path / "zips" / "subjects_0-1999_72_imgs.zip"
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for png in sorted(tree.rglob("*.png")):
            zf.write(png, f"{png.parent.name}/{png.name}")
        zf.writestr("9/0.png", b"\0" * (8 << 20))  # 8 MB of zeros: 8 KB in the zip
    monkeypatch.setenv("DIGI2REAL_MAX_IMAGE_BYTES", str(1 << 20))
    with DigiFaceZipSource(zpath.parent) as source:
        item = next(i for i in source.list_items() if i.identity == "9")
        with pytest.raises(Exception) as info:
            source.load(item)
    assert "more than the limit" in str(info.value) and "DIGI2REAL_MAX_IMAGE_BYTES" in str(info.value)
    assert _embed(zpath.parent, tmp_path / "emb", mini_arcface) == 0  # the bad member is a reported failure
    failures = (tmp_path / "emb" / "failures.jsonl").read_text()
    assert "9/0.png" in failures and "limit" in failures


def test_embed_records_a_bomb_in_a_folder_source_as_a_failure(tmp_path, faces, mini_arcface):
    (faces / "0" / "9.png").write_bytes(_png_declaring(30000, 30000))
    assert main(["embed", str(faces), "-o", str(tmp_path / "emb"), "--encoder", str(mini_arcface), "--all",
                 "-q"]) == 0
    failures = [json.loads(x) for x in (tmp_path / "emb" / "failures.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failures] == ["0/9.png"] and "pixels" in failures[0]["reason"]


def test_a_huge_procedural_source_is_refused_at_once(tmp_path, capsys, mini_arcface):
    line = refused(capsys, ["embed", "procedural:20000000x5", "-o", tmp_path / "emb", "--encoder", mini_arcface],
                   tmp_path)
    assert "DIGI2REAL_MAX_PROCEDURAL_IMAGES" in line


# ------------------------------------------------------------------------------------------------------ select, plan


def _store_with(tmp_path: Path, embeddings: np.ndarray, names: list[str]) -> Path:
    out = tmp_path / "emb"
    write_store(out, embeddings.astype(np.float32), names, [f"{n}/0.png" for n in names], {"source": {}})
    return out


def test_select_refuses_non_finite_embeddings(tmp_path, capsys):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[5] = np.nan
    store = _store_with(tmp_path, emb, [f"id{i}" for i in range(8)])
    line = refused(capsys, ["select", store, "-n", "3", "-o", tmp_path / "ids.csv"], tmp_path)
    assert "not finite" in line and "'id5'" in line
    assert not (tmp_path / "ids.csv").exists()


def test_select_and_plan_never_write_into_their_inputs(tmp_path, capsys):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, 16))
    store = _store_with(tmp_path, emb / np.linalg.norm(emb, axis=1, keepdims=True), [f"id{i}" for i in range(8)])
    refused(capsys, ["select", store, "-n", "3", "-o", store / "ids.csv"], tmp_path)
    assert main(["select", str(store), "-n", "3", "-o", str(tmp_path / "ids.csv")]) == 0
    refused(capsys, ["plan", store, "--ids", tmp_path / "ids.csv", "-o", store / "plan.parquet"], tmp_path)


def test_a_binary_identity_list_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 16))
    store = _store_with(tmp_path, emb / np.linalg.norm(emb, axis=1, keepdims=True), ["a", "b", "c", "d"])
    (tmp_path / "ids.csv").write_bytes(bytes(range(256)) * 4)
    line = refused(capsys, ["plan", store, "--ids", tmp_path / "ids.csv", "-o", tmp_path / "plan.parquet"], tmp_path)
    assert "ids.csv" in line and "not a text file" in line


# ------------------------------------------------------------------------------------------------------ configs


def test_config_with_a_key_written_twice_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("select:\n  n: 5\n  n: 7\n")
    line = refused(capsys, ["select", tmp_path / "missing", "-o", tmp_path / "ids.csv", "--config", cfg], tmp_path)
    assert "written twice" in line and "line 3" in line


def test_binary_config_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    line = refused(capsys, ["run", cfg, "--dry-run"], tmp_path)
    assert "not a text file" in line


@pytest.mark.parametrize("item", ["plan.alpha=nan", "plan.alpha=.inf", "select.threshold=nan"])
def test_non_finite_settings_are_refused(tmp_path, capsys, item):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 16))
    store = _store_with(tmp_path, emb / np.linalg.norm(emb, axis=1, keepdims=True), ["a", "b", "c", "d"])
    line = refused(capsys, ["select", store, "-o", tmp_path / "ids.csv", "--set", item, "--method", "greedy",
                            "--set", "select.threshold=0.5"] if item.startswith("plan") else
                   ["select", store, "-o", tmp_path / "ids.csv", "--method", "greedy", "--set", item], tmp_path)
    assert item.split("=")[0] in line and "finite" in line


# ------------------------------------------------------------------------------------------------------ environment


def test_a_usage_error_is_one_line_too(tmp_path, capsys):
    line = refused(capsys, ["align", tmp_path, "--thresholds", "0.6"], tmp_path)
    assert "digi2real align" in line and "--help" in line
    refused(capsys, ["no-such-command"], tmp_path)


def test_a_bad_rank_environment_names_the_variables_not_the_flag(tmp_path, capsys, monkeypatch):
    from digi2real.sharding import shard_from_env
    from digi2real.errors import Digi2RealError

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Digi2RealError) as info:
        shard_from_env()
    assert "RANK='3'" in str(info.value) and "WORLD_SIZE='2'" in str(info.value) and "--shard '" not in str(info.value)


@pytest.mark.parametrize("timeout", ["-1", "0", "nan"])
def test_download_refuses_a_timeout_that_is_not_positive(tmp_path, capsys, timeout):
    line = refused(capsys, ["download", "digiface", "-o", tmp_path / "zips", "--timeout", timeout, "--list"],
                   tmp_path)
    assert "--timeout" in line
    assert not (tmp_path / "zips").exists()


def test_the_pixel_limit_can_be_raised(tmp_path, monkeypatch):
    from digi2real.errors import BadImageError
    from digi2real.imageio import decode_image

    img = np.zeros((300, 400, 3), np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    monkeypatch.setenv("DIGI2REAL_MAX_IMAGE_PIXELS", "100000")
    with pytest.raises(BadImageError, match="DIGI2REAL_MAX_IMAGE_PIXELS=120000"):
        decode_image(path.read_bytes(), str(path))
    monkeypatch.setenv("DIGI2REAL_MAX_IMAGE_PIXELS", "120000")
    assert decode_image(path.read_bytes(), str(path)).shape == (300, 400, 3)


def test_os_errors_become_one_line(tmp_path, capsys, faces, mini_arcface):
    out = Path("/proc/digi2real-cannot-write-here")
    line = refused(capsys, ["embed", faces, "-o", out, "--encoder", mini_arcface, "-q"], tmp_path)
    assert str(out) in line and ";" in line


def test_snapshot_sees_changes(tmp_path):
    (tmp_path / "a").write_text("1")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_text("2")
    assert snapshot(tmp_path) != before
