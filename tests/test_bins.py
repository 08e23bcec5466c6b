"""Benchmark .bin files (FACTS 8): safe loading, round trips, Python 2 pickles, decoding; the pairs-folder reader."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digi2real.errors import BadImageError, Digi2RealError
from digi2real.evaluation.bins import decode_pairs, read_bin, read_pairs_folder, write_bin


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture()
def images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        rgb = np.full((112, 112, 3), 40 * i, np.uint8)
        rgb[10:30, 10:30] = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        out.append(_png(rgb))
    return out


ISSAME = [True, False, True]


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's pickle.dump(..., protocol=2) writes: images as BINSTRING (py2 str) opcodes, no globals."""
    out = bytearray(b"\x80\x02]q\x00(")  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for blob in images:
        out += b"T" + struct.pack("<i", len(blob)) + blob if len(blob) > 255 else b"U" + bytes([len(blob)]) + blob
    out += b"e]q\x01("  # APPENDS, EMPTY_LIST, BINPUT 1, MARK
    out += b"".join(b"\x88" if v else b"\x89" for v in issame)
    out += b"e\x86q\x02."  # APPENDS, TUPLE2, BINPUT 2, STOP
    return bytes(out)


def test_round_trip_and_decode(tmp_path: Path, images: list[bytes]) -> None:
    path = tmp_path / "lfw.bin"
    write_bin(path, images, np.array(ISSAME))
    got, issame = read_bin(path)
    assert got == images and all(type(b) is bytes for b in got)
    assert issame.dtype == bool and issame.tolist() == ISSAME
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind
    arr = decode_pairs(got)
    assert arr.shape == (6, 112, 112, 3) and arr.dtype == np.uint8
    assert (arr[3, 50, 50] == 120).all() and (arr[0, 50, 50] == 0).all()
    # What write_bin stores is what insightface expects: a (list of bytes, list of bool) pickle.
    raw_images, raw_issame = pickle.loads(path.read_bytes())
    assert raw_images == images and raw_issame == ISSAME


def test_python2_pickle_reads(tmp_path: Path, images: list[bytes]) -> None:
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_pickle(images, ISSAME))
    got, issame = read_bin(path)
    assert got == images and issame.tolist() == ISSAME


@pytest.mark.parametrize("protocol", [0, 2])
def test_python3_low_protocol_pickle_reads(tmp_path: Path, images: list[bytes], protocol: int) -> None:
    # Python 3 writes bytes at protocols 0-2 through _codecs.encode(text, 'latin1'): allowed in that form only.
    path = tmp_path / "p.bin"
    path.write_bytes(pickle.dumps((images, ISSAME), protocol=protocol))
    got, issame = read_bin(path)
    assert got == images and issame.tolist() == ISSAME


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_array_images_and_labels_read(tmp_path: Path, images: list[bytes], protocol: int) -> None:
    path = tmp_path / "np.bin"
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in images]
    path.write_bytes(pickle.dumps((arrays, np.array(ISSAME)), protocol=protocol))
    got, issame = read_bin(path)
    assert got == images and issame.tolist() == ISSAME


def _evil(marker: Path) -> object:
    class Evil:
        def __reduce__(self):  # noqa: D105 - the payload under test
            return (os.system, (f"touch {marker}",))

    return Evil()


def test_code_payload_is_refused_without_running(tmp_path: Path, images: list[bytes]) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((images, [_evil(marker)] * 3), protocol=4))
    refused = r"refusing to load .*evil\.bin: the pickle references (os|posix|nt)\.system"
    with pytest.raises(Digi2RealError, match=refused):
        read_bin(path)
    assert not marker.exists()


def test_raw_global_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned2"
    path = tmp_path / "raw.bin"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(Digi2RealError) as info:
        read_bin(path)
    expected = f"refusing to load {path}: the pickle references os.system, not a benchmark .bin;"
    assert str(info.value).startswith(expected)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, named",
    [
        (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),
        (b"c_codecs\nencode\n(Vx\nVrot13\ntR.", "_codecs.encode"),  # an allowed global, but not with this codec
        (b"cbuiltins\nbytes\n(I1000\ntR.", "builtins.bytes"),  # only bytes() with no argument is allowed
        (b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\ndtype\n(I0\ntS'b'\ntR.", "_reconstruct"),
        (b"cnumpy\nmatrix\n.", "numpy.matrix"),
    ],
)
def test_other_globals_are_refused(tmp_path: Path, payload: bytes, named: str) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(payload)
    with pytest.raises(Digi2RealError, match="refusing to load") as info:
        read_bin(path)
    assert named in str(info.value)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([b"a", b"b", b"c"], "pair \\(images, issame\\); found a list of length 3"),
        ([b"a", b"b"], "images entry is a bytes"),
        ((b"a", b"b", [True]), "pair"),
        (([b"a", b"b", b"c"], [True]), "3 images for 1 pairs"),
        (([b"a", b"b"], [True, False]), "2 images for 2 pairs"),
        (([b"a", 7], [True]), "image 1 is a int"),
        (([b"a", np.zeros(4, np.float32)], [True]), "image 1 is a float32 array"),
        (([b"a", b"b"], [2]), r"issame\[0\]"),
        (([b"a", b"b"], ["yes"]), r"issame\[0\]"),
        (([b"a", b"b"], np.array([1.0])), "float64"),
        (([b"a", b"b"], "T"), "issame is a str"),
        (("ab", [True]), "images entry is a str"),
        (([], []), "no pairs"),
    ],
)
def test_malformed_structures(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(Digi2RealError, match=message) as info:
        read_bin(path)
    assert str(path) in str(info.value)


def test_labels_as_ints_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ints.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b", b"c", b"d"], [1, 0]), protocol=4))
    assert read_bin(path)[1].tolist() == [True, False]


def test_missing_truncated_and_not_pickle(tmp_path: Path, images: list[bytes]) -> None:
    with pytest.raises(Digi2RealError, match=r"nope\.bin: benchmark file not found"):
        read_bin(tmp_path / "nope.bin")
    path = tmp_path / "trunc.bin"
    write_bin(path, images, ISSAME)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(Digi2RealError, match="not a readable benchmark"):
        read_bin(path)
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(Digi2RealError, match="trunc.bin"):
        read_bin(path)


def test_write_bin_checks_lengths(tmp_path: Path) -> None:
    with pytest.raises(Digi2RealError, match="3 images for 2 pairs"):
        write_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True, False])
    assert not (tmp_path / "x.bin").exists()


def test_decode_pairs_resizes_and_reports_bad_images() -> None:
    rgb = np.zeros((90, 100, 3), np.uint8)
    rgb[:, 50:] = 200
    gray = Image.fromarray(np.full((112, 112), 77, np.uint8))
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    arr = decode_pairs([_png(rgb), buf.getvalue(), _jpg(np.full((120, 120, 3), 10, np.uint8)),
                        _png(np.zeros((112, 112, 3), np.uint8))])
    assert arr.shape == (4, 112, 112, 3)
    expect = np.asarray(Image.fromarray(rgb).resize((112, 112), Image.BILINEAR))
    assert np.array_equal(arr[0], expect)
    assert (arr[1] == 77).all()
    assert abs(int(arr[2].mean()) - 10) <= 2
    assert decode_pairs([_png(rgb)] * 2, size=64).shape == (2, 64, 64, 3)
    with pytest.raises(BadImageError, match=r"lfw\.bin: image 1 \(pair 0\)"):
        decode_pairs([_png(rgb), b"garbage"], name="lfw.bin")
    # the index is the image's in the whole .bin, when it is decoded in chunks
    with pytest.raises(BadImageError, match=r"lfw\.bin: image 2049 \(pair 1024\)"):
        decode_pairs([_png(rgb), b"garbage"], name="lfw.bin", first=2048)
    with pytest.raises(BadImageError, match=r"^b\.png: "):
        decode_pairs([_png(rgb), b"garbage"], names=["a.png", "b.png"])


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    for name in ("a/1.png", "a/2.png", "b/1.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(np.zeros((16, 16, 3), np.uint8)))
    return root


def test_pairs_folder_happy_path(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# comment\na/1.png a/2.png 1\n\n  a/1.png   b/1.png\t0  \n")
    paths, issame = read_pairs_folder(root, pairs)
    assert paths == [root / "a/1.png", root / "a/2.png", root / "a/1.png", root / "b/1.png"]
    assert issame.dtype == bool and issame.tolist() == [True, False]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a/1.png a/2.png 1\na/1.png b/1.png\n", r"pairs\.txt:2: expected 'path_a path_b label' \(3 fields\), found 2"),
        ("a/1.png a/2.png yes\n", r"pairs\.txt:1: label must be 1 \(same\) or 0"),
        ("a/1.png a/9.png 0\n", r"pairs\.txt:1: image .*a/9\.png not found"),
        ("# only a comment\n\n", "no pairs found"),
    ],
)
def test_pairs_folder_errors(tmp_path: Path, text: str, message: str) -> None:
    root = _folder(tmp_path)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(text)
    with pytest.raises(Digi2RealError, match=message):
        read_pairs_folder(root, pairs)


def test_pairs_folder_missing_files(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    with pytest.raises(Digi2RealError, match=r"missing\.txt: pairs file not found"):
        read_pairs_folder(root, tmp_path / "missing.txt")
    with pytest.raises(Digi2RealError, match=r"nowhere: benchmark image folder not found"):
        read_pairs_folder(tmp_path / "nowhere", tmp_path / "missing.txt")


# ------------------------------------------------------------------------------- numpy booleans in issame (issue 11)

_PY2_NUMPY_TRUE = (b"cnumpy.core.multiarray\nscalar\nq\x00cnumpy\ndtype\nq\x01U\x02b1q\x02K\x00K\x01\x87q\x03Rq\x04"
                   b"(K\x03U\x01|q\x05NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x06b")


def _as_numpy1(data: bytes) -> bytes:
    """A numpy 2 pickle rewritten as numpy 1.x writes it (``numpy.core`` instead of ``numpy._core``)."""
    new = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    new = new.replace(b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray")
    if new[2:3] == b"\x95":  # protocol 4+: one frame holding the rest; its length shrank with the name
        new = new[:3] + struct.pack("<Q", len(new) - 11) + new[11:]
    assert new != data
    return new


def _py2_numpy_bool_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Python 2 + numpy 1.x, protocol 2: images as py2 str, each label a pickled numpy.bool_."""
    out = bytearray(b"\x80\x02]q\x00(")
    for blob in images:
        out += b"T" + struct.pack("<i", len(blob)) + blob if len(blob) > 255 else b"U" + bytes([len(blob)]) + blob
    out += b"e]q\x01("
    for v in issame:
        out += _PY2_NUMPY_TRUE + (b"U\x01\x01" if v else b"U\x01\x00") + b"\x86R"
    out += b"e\x86q\x02."
    return bytes(out)


@pytest.mark.parametrize("form", ["p0", "p2", "p4", "p5", "numpy1-p2", "numpy1-p4", "py2"])
def test_numpy_bool_labels_load_and_evaluate(tmp_path: Path, images: list[bytes], form: str) -> None:
    """Issue 11: issame as numpy.bool_ values (numpy 1.x or 2, Python 2 or 3) loads, as _as_labels accepts them."""
    labels = [np.bool_(v) for v in ISSAME]
    if form == "py2":
        data = _py2_numpy_bool_pickle(images, ISSAME)
    else:
        data = pickle.dumps((images, labels), protocol=int(form[-1]))
        data = _as_numpy1(data) if form.startswith("numpy1") else data
    path = tmp_path / "np_bool.bin"
    path.write_bytes(data)
    got, issame = read_bin(path)
    assert got == images and issame.dtype == bool and issame.tolist() == ISSAME
    from digi2real.evaluation.verification import evaluate_verification

    pixels = decode_pairs(got).reshape(len(got), -1).astype(np.float64)
    result = evaluate_verification(pixels, issame, folds=3)
    assert result.pairs == 3 and 0.0 <= result.accuracy <= 1.0


@pytest.mark.parametrize(
    "payload, named",
    [
        # numpy.scalar with an object dtype would hand back whatever the stream built
        (b"cnumpy._core.multiarray\nscalar\n(cnumpy\ndtype\n(VO8\nI0\nI1\ntRVx\ntR.", "dtype object"),
        (b"cnumpy.core.multiarray\nscalar\n(cnumpy\ndtype\n(Vf8\nI0\nI1\ntRC\x08\x00\x00\x00\x00\x00\x00\xf0?tR.",
         "dtype float64"),
        (b"cnumpy._core.multiarray\nscalar\n(cnumpy\ndtype\n(Vb1\nI0\nI1\ntRC\x01\x07tR.", "not one byte 0 or 1"),
        (b"cnumpy._core.multiarray\nscalar\n(Vb1\nC\x01\x01tR.", "dtype b1"),  # not a dtype object at all
        (b"cnumpy._core.multiarray\nscalar\n(cos\nsystem\nVtrue\ntR.", "os.system"),
        (b"cnumpy._core.multiarray\nfromstring\n(C\x01\x01Vb1\ntR.", "numpy._core.multiarray.fromstring"),
    ],
)
def test_numpy_scalar_allowed_only_as_boolean(tmp_path: Path, payload: bytes, named: str) -> None:
    path = tmp_path / "s.bin"
    path.write_bytes(payload)
    with pytest.raises(Digi2RealError, match="refusing to load") as info:
        read_bin(path)
    assert named in str(info.value)


def test_code_payload_beside_numpy_bools_is_refused(tmp_path: Path, images: list[bytes]) -> None:
    marker = tmp_path / "pwned3"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((images, [np.bool_(True), _evil(marker), np.bool_(False)]), protocol=2))
    with pytest.raises(Digi2RealError, match=r"refusing to load .*evil\.bin: the pickle references (os|posix)\.system"):
        read_bin(path)
    assert not marker.exists()
