"""RecordIO framing, continuation parts, index, and the insightface dataset layouts (FACTS 7)."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from digi2real.dataset.recordio import (
    MAGIC,
    InsightFaceRecordDataset,
    RecordReader,
    RecordWriter,
    pack_header,
    unpack_header,
    write_insightface_rec,
)
from digi2real.errors import Digi2RealError

M = struct.pack("<I", MAGIC)


def parse_parts(raw: bytes) -> list[tuple[int, int, int]]:
    """Independent parse of the raw words: (offset, flag, length) of every part."""
    parts = []
    pos = 0
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        flag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append((pos, flag, length))
        pos += 8 + ((length + 3) & ~3)
    assert pos == len(raw)
    return parts


# payloads built from random chunks and magic words, so aligned/unaligned/adjacent/start/end magics all occur
chunk = st.one_of(st.binary(max_size=9), st.just(M), st.just(M + M), st.just(b"\x00" + M))
payloads = st.lists(chunk, max_size=8).map(b"".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payloads, min_size=1, max_size=6))
def test_round_trip_arbitrary_payloads(records: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        with RecordWriter(Path(d) / "x") as w:
            for k, p in enumerate(records):
                w.write(k * 3 + 1, p)
        raw = (Path(d) / "x.rec").read_bytes()
        parse_parts(raw)  # every part is well framed and the file ends exactly after the last padding
        r = RecordReader(Path(d) / "x.rec", Path(d) / "x.idx")
        for k, p in enumerate(records):
            assert r.read(k * 3 + 1) == p
        # the same file without its index: keys are 0.. in file order
        (Path(d) / "x.idx").rename(Path(d) / "moved.idx")
        scanned = RecordReader(Path(d) / "x.rec")
        assert scanned.idx_path is None
        assert [scanned.read(i) for i in range(len(records))] == records
        r.close()
        scanned.close()


def test_exact_framing_with_aligned_magic(tmp_path: Path) -> None:
    # dmlc-core: split at the aligned magic, drop it, flags 1 then 3; pad only the last part
    payload = b"ABCD" + M + b"EFGHxy"
    with RecordWriter(tmp_path / "a") as w:
        w.write(5, payload)
    raw = (tmp_path / "a.rec").read_bytes()
    expected = M + struct.pack("<I", (1 << 29) | 4) + b"ABCD" + M + struct.pack("<I", (3 << 29) | 6) + b"EFGHxy\0\0"
    assert raw == expected
    assert RecordReader(tmp_path / "a.rec").read(5) == payload


def test_continuation_flags_middle_and_edges(tmp_path: Path) -> None:
    # magic at offset 0, twice in the middle, and as the last 4 bytes; an unaligned one is left alone
    payload = M + b"abcd" + M + M + b"e" + M + b"fgh" + M
    with RecordWriter(tmp_path / "b") as w:
        w.write(0, payload)
        w.write(1, b"x" + M + b"yzw")  # unaligned magic only: one flag-0 part
    raw = (tmp_path / "b.rec").read_bytes()
    parts = parse_parts(raw)
    flags = [f for _, f, _ in parts]
    lengths = [n for _, _, n in parts]
    # aligned magics at 0, 8, 12; the one at 17 is unaligned; the final M at 24 is aligned -> empty end part
    assert payload.find(M, 13) == 17 and len(payload) == 28
    assert flags == [1, 2, 2, 2, 3, 0]
    assert lengths == [0, 4, 0, 8, 0, 8]
    r = RecordReader(tmp_path / "b.rec")
    assert r.read(0) == payload
    assert r.read(1) == b"x" + M + b"yzw"


def test_idx_matches_record_offsets(tmp_path: Path) -> None:
    payloads = [b"", b"a", b"abcd" + M, M * 3, bytes(range(37))]
    with RecordWriter((tmp_path / "d.rec", tmp_path / "d.idx")) as w:
        for i, p in enumerate(payloads):
            w.write(10 + i, p)
    raw = (tmp_path / "d.rec").read_bytes()
    starts = [off for off, flag, _ in parse_parts(raw) if flag in (0, 1)]
    lines = (tmp_path / "d.idx").read_text().splitlines()
    assert lines == [f"{10 + i}\t{off}" for i, off in enumerate(starts)]
    r = RecordReader(tmp_path / "d.rec", tmp_path / "d.idx")
    assert list(r.keys) == [10, 11, 12, 13, 14]
    assert [r.offset(10 + i) for i in range(5)] == starts


def test_writer_is_atomic(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with RecordWriter(tmp_path / "e") as w:
            w.write(0, b"data")
            assert not (tmp_path / "e.rec").exists()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with RecordWriter(tmp_path / "f") as w:
        w.write(0, b"x")
        with pytest.raises(Digi2RealError, match="twice"):
            w.write(0, b"y")


def test_writer_files_get_ordinary_permissions_and_tagged_temporaries(tmp_path: Path) -> None:
    # mkstemp's 0600 left a shared dataset unreadable to other users; the umask decides, as for a plain open()
    import os
    import stat

    from digi2real.fileio import is_orphaned_temporary

    mask = os.umask(0)
    os.umask(mask)
    w = RecordWriter(tmp_path / "g")
    w.write(0, b"x")
    temporaries = sorted(tmp_path.iterdir())
    assert len(temporaries) == 2 and not any(is_orphaned_temporary(t) for t in temporaries)  # a live writer's
    assert all(t.name.startswith(".g.") and f"~{os.getpid()}~" in t.name for t in temporaries)
    w.close()
    for name in ("g.rec", "g.idx"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_header_pack_unpack() -> None:
    h, rest = unpack_header(pack_header(7, 3, 9) + b"IMG")
    assert (h.flag, h.label, h.id, h.id2, rest) == (0, 7.0, 3, 9, b"IMG")
    raw = pack_header([1.5, 2.0, 3.0], 4)
    assert len(raw) == 24 + 12
    assert struct.unpack_from("<IfQQ", raw) == (3, 0.0, 4, 0)
    h, rest = unpack_header(raw + b"J")
    assert h.flag == 3 and list(h.label) == [1.5, 2.0, 3.0] and rest == b"J"
    with pytest.raises(Digi2RealError, match="shorter"):
        unpack_header(b"short")


# ----------------------------------------------------------------------------------------------------- errors


def _two_records(tmp_path: Path) -> Path:
    with RecordWriter(tmp_path / "g") as w:
        w.write(0, b"first record")
        w.write(1, b"second record payload")
    return tmp_path / "g.rec"


def test_bad_magic_names_file_and_offset(tmp_path: Path) -> None:
    rec = _two_records(tmp_path)
    raw = bytearray(rec.read_bytes())
    second = int((tmp_path / "g.idx").read_text().splitlines()[1].split("\t")[1])
    raw[second] ^= 0xFF
    rec.write_bytes(bytes(raw))
    r = RecordReader(rec)
    assert r.read(0) == b"first record"
    with pytest.raises(Digi2RealError, match=rf"g\.rec.*bad magic.*offset {second}"):
        r.read(1)
    (tmp_path / "g.idx").unlink()
    with pytest.raises(Digi2RealError, match="bad magic"):
        RecordReader(rec)  # the scan hits it too


def test_truncated_file(tmp_path: Path) -> None:
    rec = _two_records(tmp_path)
    rec.write_bytes(rec.read_bytes()[:-10])
    r = RecordReader(rec)
    with pytest.raises(Digi2RealError, match="truncated"):
        r.read(1)
    (tmp_path / "g.idx").unlink()
    with pytest.raises(Digi2RealError, match="truncated"):
        RecordReader(rec)


def test_missing_key(tmp_path: Path) -> None:
    r = RecordReader(_two_records(tmp_path))
    with pytest.raises(Digi2RealError, match="key 7 is not in the index"):
        r.read(7)
    assert 7 not in r and 1 in r


def test_missing_rec_file(tmp_path: Path) -> None:
    with pytest.raises(Digi2RealError, match="not found"):
        RecordReader(tmp_path / "nope.rec")


# ----------------------------------------------------------------------------------------------------- pickling


def test_pickle_and_read_in_subprocess(tmp_path: Path) -> None:
    payload = b"pay" + M + b"load" + M  # unaligned then aligned at the end
    with RecordWriter(tmp_path / "p") as w:
        w.write(3, b"other")
        w.write(4, payload)
    r = RecordReader(tmp_path / "p.rec")
    r.read(3)  # open the descriptor before pickling
    blob = pickle.dumps(r)
    r2 = pickle.loads(blob)
    assert r2.read(4) == payload
    code = "import pickle,sys; r=pickle.loads(sys.stdin.buffer.read()); sys.stdout.write(r.read(4).hex())"
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True, timeout=60)
    assert bytes.fromhex(out.stdout.decode()) == payload


# ----------------------------------------------------------------------------------------------------- insightface


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_insightface_layout_round_trip(tmp_path: Path) -> None:
    labels = [0, 0, 0, 1, 2, 2]
    images = [_jpeg(i) for i in range(len(labels))]
    n = write_insightface_rec(tmp_path, zip(images, labels), num_classes=3)
    assert n == 6
    assert (tmp_path / "property").read_text().strip() == "3,112,112"
    # raw meta record: flag 2, labels (N+1, end)
    r = RecordReader(tmp_path / "train.rec", tmp_path / "train.idx")
    h0, _ = unpack_header(r.read(0))
    assert h0.flag == 2 and list(h0.label) == [7.0, 10.0]
    ranges = [tuple(unpack_header(r.read(k))[0].label) for k in range(7, 10)]
    assert ranges == [(1.0, 4.0), (4.0, 5.0), (5.0, 7.0)]
    ds = InsightFaceRecordDataset(tmp_path)
    assert ds.has_meta and len(ds) == 6 and ds.num_classes == 3
    assert ds.labels.tolist() == labels
    assert ds.class_ranges is not None and ds.class_ranges.tolist() == [[1, 4], [4, 5], [5, 7]]
    for i in (0, 3, 5):
        rgb, label = ds[i]
        assert rgb.dtype == np.uint8 and rgb.shape == (112, 112, 3)
        assert label == labels[i]
        assert np.array_equal(rgb, np.asarray(Image.open(io.BytesIO(images[i])).convert("RGB")))
    with pytest.raises(IndexError):
        ds[6]
    # also readable by a sequential scan without train.idx (record 0 comes first in the file)
    (tmp_path / "train.idx").unlink()
    ds2 = InsightFaceRecordDataset(tmp_path)
    assert ds2.has_meta and ds2.labels.tolist() == labels


def test_insightface_rejects_unsorted_or_gappy_labels(tmp_path: Path) -> None:
    img = _jpeg(0)
    with pytest.raises(Digi2RealError, match="sorted"):
        write_insightface_rec(tmp_path / "a", [(img, 0), (img, 1), (img, 0)], num_classes=2)
    with pytest.raises(Digi2RealError, match="sorted"):
        write_insightface_rec(tmp_path / "b", [(img, 0), (img, 2)], num_classes=3)
    with pytest.raises(Digi2RealError, match="every class"):
        write_insightface_rec(tmp_path / "c", [(img, 0)], num_classes=2)
    assert not (tmp_path / "a" / "train.rec").exists()


def test_im2rec_layout_without_meta(tmp_path: Path) -> None:
    labels = [2, 0, 1, 1]
    images = [_jpeg(10 + i) for i in range(4)]
    with RecordWriter(tmp_path / "train") as w:
        for k, (img, lab) in enumerate(zip(images, labels)):
            w.write(k, pack_header(float(lab), k) + img)
    (tmp_path / "property").write_text("3,112,112\n")
    ds = InsightFaceRecordDataset(tmp_path)
    assert not ds.has_meta and len(ds) == 4 and ds.num_classes == 3
    assert ds.labels.tolist() == labels
    rgb, label = ds[2]
    assert label == 1 and rgb.shape == (112, 112, 3)
    assert np.array_equal(rgb, np.asarray(Image.open(io.BytesIO(images[2])).convert("RGB")))


def test_multi_label_header_uses_first_label(tmp_path: Path) -> None:
    with RecordWriter(tmp_path / "train") as w:
        w.write(5, pack_header(4.0, 5) + _jpeg(1))
        w.write(6, pack_header([1.0, 0.5], 6) + _jpeg(2))
    (tmp_path / "property").write_text("5,112,112")
    ds = InsightFaceRecordDataset(tmp_path)
    assert not ds.has_meta  # key 0 is absent: no meta record
    assert ds.labels.tolist() == [4, 1]
    assert ds[1][1] == 1


def test_missing_property_is_clear(tmp_path: Path) -> None:
    write_insightface_rec(tmp_path, [(_jpeg(0), 0)], num_classes=1)
    (tmp_path / "property").unlink()
    with pytest.raises(Digi2RealError, match="property"):
        InsightFaceRecordDataset(tmp_path)


def test_threaded_reads_share_one_reader(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    payloads = [rng.bytes(int(rng.integers(0, 300))) + M * int(k % 3) for k in range(64)]
    with RecordWriter(tmp_path / "t") as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    r = RecordReader(tmp_path / "t.rec")
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(r.read, [k % 64 for k in range(512)]))
    assert got == [payloads[k % 64] for k in range(512)]
