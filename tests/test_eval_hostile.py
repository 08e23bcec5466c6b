"""`digi2real eval` / `compare` on hostile and careless input (issue 11, section 2).

Every case runs the real command line (``digi2real.cli.main``) and asserts what a user would check: exit status 2,
exactly one stderr line that names the file at fault and says what to do, and every input and every file an earlier
run wrote byte-identical afterwards. A module-scoped successful eval into ``out/`` is the "earlier output".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digi2real.cli import main
from digi2real.evaluation.bins import write_bin
from digi2real.evaluation.rfw import RACES
from digi2real.faces.template import ARCFACE_TEMPLATE
from digi2real.training.iresnet import IResNet

PAIRS = 10  # the protocol's 10 folds need at least 10 pairs


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _faces(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [_png(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(n)]


def _bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG that declares ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _bin(path: Path, seed: int, pairs: int = PAIRS) -> None:
    write_bin(path, _faces(seed, 2 * pairs), [i % 2 == 0 for i in range(pairs)])


def _ijb(folder: Path, seed: int = 4) -> None:
    """insightface's IJB-C layout: 12 loose crops with their landmarks, 4 templates, 6 pairs."""
    rng = np.random.default_rng(seed)
    (folder / "loose_crop").mkdir(parents=True)
    (folder / "meta").mkdir()
    pts, tid = [], []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (128, 120, 3), dtype=np.uint8)).save(folder / "loose_crop" / f"{i}.jpg")
        marks = ARCFACE_TEMPLATE + rng.uniform(-3, 3, (5, 2)) + 5
        pts.append(f"{i}.jpg " + " ".join(f"{v:.3f}" for v in marks.ravel()) + f" {rng.uniform(0.5, 1):.4f}")
        tid.append(f"{i}.jpg {i // 3 + 1} {i // 2 + 100}")
    (folder / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(pts) + "\n")
    (folder / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid) + "\n")
    pairs = [(1, 2, 0), (1, 3, 0), (1, 4, 1), (2, 3, 1), (2, 4, 0), (3, 4, 0)]
    (folder / "meta" / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in pairs))


def _tree(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` (hidden ones included) -> sha256 of its bytes; folders -> "dir"."""
    out: dict[str, str] = {}
    for root in roots:
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for path in sorted(root.rglob("*")):
            if path.is_fifo():
                out[str(path)] = "fifo"
            elif path.is_dir():
                out[str(path)] = "dir"
            else:
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny IResNet, a benchmark folder (lfw, cfp_fp, IJB-C, RFW) and one successful eval of it into out/."""
    base = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1), widths=(4, 8, 16, 32), embedding_dim=16).eval()
    (base / "model").mkdir()
    torch.save(net.state_dict(), base / "model" / "backbone.pth")
    data = base / "data"
    data.mkdir()
    _bin(data / "lfw.bin", 1)
    _bin(data / "cfp_fp.bin", 2)
    _ijb(data / "IJBC")
    (data / "RFW").mkdir()
    for i, race in enumerate(RACES):
        _bin(data / "RFW" / f"{race}_test.bin", 10 + i)
    out = base / "out"
    assert main(["eval", str(base / "model" / "backbone.pth"), "--data-root", str(data), "-o", str(out), "-q",
                 "--device", "cpu", "--benchmarks", "lfw,cfp_fp,ijbc,rfw"]) == 0
    assert (out / "results.json").is_file()
    return {"base": base, "model": base / "model" / "backbone.pth", "data": data, "out": out}


@pytest.fixture()
def before(world) -> Iterator[dict[str, str]]:
    """The shared inputs and the earlier run's outputs, checked byte-identical after each test. A failed run may only
    add cache files (named by their key: never one replaced), e.g. for the sets it scored before the bad one."""
    snapshot = _tree(world["model"].parent, world["data"], world["out"])
    yield snapshot
    after = _tree(world["model"].parent, world["data"], world["out"])
    assert {k: after.get(k) for k in snapshot} == snapshot
    added = set(after) - set(snapshot)
    assert all(Path(k).is_relative_to(world["out"] / "cache") for k in added), added


def _fails(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI; it must exit 2 with one stderr line holding every needle. Returns that line."""
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(120)  # a FIFO or endless input must fail the test, not hang the suite
    try:
        rc = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("digi2real: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _hang(signum, frame):  # noqa: ARG001 - signal handler signature
    raise TimeoutError("the command hung")


def _eval(world: dict[str, Path], data: Path, *extra: str, model: Path | None = None,
          out: Path | None = None) -> list[str]:
    return ["eval", str(model or world["model"]), "--data-root", str(data), "-o", str(out or world["out"]), "-q",
            "--device", "cpu", *extra]


# ------------------------------------------------------------------------------------------------------ .bin files


@pytest.mark.parametrize("bomb, limit", [((30000, 30000), "Pillow"), ((10000, 10000), "10000 x 10000"),
                                         ((9000, 5000), "DIGI2REAL_MAX_IMAGE_PIXELS=45000000")])
def test_bin_with_a_decompression_bomb(world, before, tmp_path, capsys, bomb, limit) -> None:
    data = tmp_path / "data"
    data.mkdir()
    images = _faces(3, 2 * PAIRS)
    images[13] = _bomb_png(*bomb)
    write_bin(data / "lfw.bin", images, [i % 2 == 0 for i in range(PAIRS)])
    inputs = _tree(data)
    _fails(_eval(world, data, "--benchmarks", "lfw"), capsys, f"{data / 'lfw.bin'}: image 13 (pair 6)", "resize it",
           limit)
    assert _tree(data) == inputs


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_a_pair"])
def test_damaged_bin(world, before, tmp_path, capsys, damage) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _bin(data / "lfw.bin", 1)
    raw = (data / "lfw.bin").read_bytes()
    (data / "lfw.bin").write_bytes({"truncated": raw[: len(raw) // 2], "garbage": os.urandom(3000), "empty": b"",
                                    "not_a_pair": pickle.dumps({"a": 1})}[damage])
    _fails(_eval(world, data, "--benchmarks", "lfw"), capsys, str(data / "lfw.bin"), "download it again")


def test_bin_that_runs_code_is_refused(world, before, tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = tmp_path / "data"
    shutil.copytree(world["data"] / "RFW", data / "RFW")
    (data / "RFW" / "Asian_test.bin").write_bytes(pickle.dumps((_faces(1, 2), [Evil()]), protocol=2))
    _fails(_eval(world, data, "--benchmarks", "rfw"), capsys, "refusing to load", "Asian_test.bin", "system",
           "download it again")
    assert not marker.exists()


def test_a_bad_second_set_keeps_earlier_outputs(world, tmp_path, capsys) -> None:
    """lfw scores, then cfp_fp's image is damaged: the run stops; the earlier run's files are untouched (a new cache
    file may be added, never one replaced)."""
    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    earlier = _tree(out)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(world["data"] / "lfw.bin", data / "lfw.bin")
    images = _faces(2, 2 * PAIRS)
    images[4] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 50
    write_bin(data / "cfp_fp.bin", images, [i % 2 == 0 for i in range(PAIRS)])
    inputs = _tree(data)
    _fails(_eval(world, data, "--benchmarks", "lfw,cfp_fp", out=out), capsys,
           f"{data / 'cfp_fp.bin'}: image 4 (pair 2)", "replace")
    after = _tree(out)
    assert {k: after.get(k) for k in earlier} == earlier
    assert all(Path(k).parent == out / "cache" for k in set(after) - set(earlier))
    assert _tree(data) == inputs


# ------------------------------------------------------------------------------------------------------------- IJB


def _ijb_case(world: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    _ijb(data / "IJBC")
    return data, data / "IJBC" / "meta"


@pytest.mark.parametrize("file, text, needle", [
    ("ijbc_name_5pts_score.txt", None, "not found"),
    ("ijbc_template_pair_label.txt", "1 2\n3 4\n", "columns"),
    ("ijbc_template_pair_label.txt", "1 2 x\n", "not numeric"),
    ("ijbc_template_pair_label.txt", "1 2 3\n", "labels must be 0 or 1"),
    ("ijbc_template_pair_label.txt", "1 2 0\n1 99 1\n", "no images"),
    ("ijbc_template_pair_label.txt", "", "cannot be parsed"),
    ("ijbc_template_pair_label.txt", b"\xff\xfe\x00garbage\x00\n\x01", "columns"),
    ("ijbc_face_tid_mid.txt", "FRACTIONAL", "whole numbers"),
    ("ijbc_name_5pts_score.txt", "nan", "NaN values"),
    ("ijbc_name_5pts_score.txt", "inf", "non-finite"),
])
def test_malformed_ijb_meta(world, before, tmp_path, capsys, file, text, needle) -> None:
    data, meta = _ijb_case(world, tmp_path)
    target = meta / file
    if text is None:
        target.unlink()
    elif text == "FRACTIONAL":
        target.write_text(target.read_text().replace(" 1 100", " 1.5 100", 1))
    elif text in ("nan", "inf"):
        lines = target.read_text().splitlines()
        fields = lines[3].split()
        fields[4] = text
        lines[3] = " ".join(fields)
        target.write_text("\n".join(lines) + "\n")
    else:
        target.write_bytes(text if isinstance(text, bytes) else text.encode())
    inputs = _tree(data)
    _fails(_eval(world, data, "--benchmarks", "ijbc"), capsys, str(target), needle)
    assert _tree(data) == inputs


def test_ijb_with_a_missing_crop_fails_before_embedding(world, before, tmp_path, capsys) -> None:
    data, _ = _ijb_case(world, tmp_path)
    (data / "IJBC" / "loose_crop" / "7.jpg").unlink()
    (data / "IJBC" / "loose_crop" / "9.jpg").unlink()
    _fails(_eval(world, data, "--benchmarks", "ijbc"), capsys, str(data / "IJBC" / "loose_crop"), "'7.jpg'",
           "2 image(s)", "restore")


def test_ijb_crop_that_is_a_fifo_does_not_hang(world, before, tmp_path, capsys) -> None:
    data, _ = _ijb_case(world, tmp_path)
    (data / "IJBC" / "loose_crop" / "9.jpg").unlink()
    os.mkfifo(data / "IJBC" / "loose_crop" / "9.jpg")
    _fails(_eval(world, data, "--benchmarks", "ijbc"), capsys, "'9.jpg'", "not regular files")


# --------------------------------------------------------------------------------------------- pairs lists, RFW


def test_pairs_list_with_a_missing_image(world, before, tmp_path, capsys) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, blob in enumerate(_faces(5, 4)):
        (folder / f"{i}.png").write_bytes(blob)
    (folder / "pairs.txt").write_text("0.png 1.png 1\n2.png gone.png 0\n")
    _fails(["eval", str(world["model"]), "--pairs", f"mine={folder / 'pairs.txt'}", "-o", str(world["out"]), "-q",
            "--device", "cpu"], capsys, f"{folder / 'pairs.txt'}:2", "gone.png", "remove the line")


@pytest.mark.parametrize("name, needle", [("../../escape", "NAME must be"), ("lfw", "built-in benchmark"),
                                          ("rfw_asian", "built-in benchmark"), ("a b", "NAME must be")])
def test_pairs_names_are_refused(world, before, tmp_path, capsys, name, needle) -> None:
    (tmp_path / "pairs.txt").write_text("a.png b.png 1\n")
    _fails(["eval", str(world["model"]), "--pairs", f"{name}={tmp_path / 'pairs.txt'}", "-o", str(world["out"]), "-q"],
           capsys, "--pairs", needle)
    assert not (world["base"] / "escape.npz").exists()


def test_rfw_race_file_damaged(world, before, tmp_path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(world["data"] / "RFW", data / "RFW")
    (data / "RFW" / "Indian_test.bin").write_bytes(b"\x80\x04garbage")
    _fails(_eval(world, data, "--benchmarks", "rfw"), capsys, str(data / "RFW" / "Indian_test.bin"))


# ---------------------------------------------------------------------------------------------------------- models


def _nan_model(path: Path) -> None:
    net = IResNet((1, 1, 1, 1), widths=(4, 8, 16, 32), embedding_dim=16)
    state = net.state_dict()
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    torch.save(state, path)


@pytest.mark.parametrize("kind", ["random.onnx", "random.pth", "code.pth", "nan.pth", "fifo.onnx", "folder"])
def test_model_file_that_is_not_a_model(world, before, tmp_path, capsys, kind) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / ("models" if kind == "folder" else kind.replace("random", "model").replace("code", "model"))
    if kind == "random.onnx" or kind == "random.pth":
        model.write_bytes(os.urandom(4096))
        needles = ["not a", "pass an ONNX face model"]
    elif kind == "code.pth":

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"conv1.weight": Evil()}, model)
        needles = ["refused", "torch.save(model.state_dict()"]
    elif kind == "nan.pth":
        _nan_model(model)
        needles = ["NaN", "--precision fp32"]
    elif kind == "fifo.onnx":
        os.mkfifo(model)
        needles = ["not a regular file"]
    else:
        model.mkdir()
        (model / "notes.txt").write_text("no model here")
        needles = ["no model.pt", "training output folder"]
    _fails(_eval(world, world["data"], "--benchmarks", "lfw", model=model), capsys, str(model), *needles)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------- -o folder


def test_output_that_is_a_file(world, before, tmp_path, capsys) -> None:
    target = tmp_path / "results.txt"
    target.write_text("my notes\n")
    _fails(_eval(world, world["data"], "--benchmarks", "lfw", out=target), capsys, str(target), "is a file")
    assert target.read_text() == "my notes\n"
    _fails(_eval(world, world["data"], "--benchmarks", "lfw", out=target / "sub"), capsys, str(target / "sub"),
           "cannot write there")
    assert target.read_text() == "my notes\n"


def _unwritable(tmp_path: Path) -> tuple[Path, Path]:
    """A folder this user cannot create files in: a mode 0555 folder, or (root writes anywhere) a folder in sysfs,
    where mkdir fails with EPERM for every user. Returns (folder, its parent that must stay unchanged)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").mkdir()
    except PermissionError:
        return locked / "res", locked
    (locked / "probe").rmdir()
    locked.chmod(0o755)
    try:
        Path("/sys/digi2real-probe").mkdir()
    except OSError:
        return Path("/sys/digi2real-eval/res"), locked
    pytest.skip("no folder this user cannot write to")


def test_output_in_a_read_only_folder(world, before, tmp_path, capsys) -> None:
    out, parent = _unwritable(tmp_path)
    try:
        _fails(_eval(world, world["data"], "--benchmarks", "lfw", out=out), capsys, f"-o {out}",
               "cannot write there", "choose a folder you can write to")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("where", ["data", "inside_data", "model_folder"])
def test_output_overlapping_an_input(world, before, capsys, where) -> None:
    out = {"data": world["data"], "inside_data": world["data"] / "results",
           "model_folder": world["model"].parent}[where]
    _fails(_eval(world, world["data"], "--benchmarks", "lfw", out=out), capsys, f"-o {out}", "choose an output folder")
    assert not (world["data"] / "results").exists()


# --------------------------------------------------------------------------------------------- leftovers, caches


def test_leftovers_of_a_killed_eval_are_cleaned(world, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    from digi2real.fileio import temporary_prefix

    dead = 2**22 + 12345  # beyond pid_max on most systems: no such process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    ours = temporary_prefix("x").split("~")[1]
    ijb_cache = next((out / "cache").glob("ijbc-*"))
    orphans = [out / f".results.json.~{ours}~{dead}~ab12.tmp", out / "cache" / f".lfw-0.npz.~{ours}~{dead}~cd34.tmp",
               ijb_cache / f".ijbc_features.npy.~{ours}~{dead}~ef56.tmp"]
    live = out / f".results.md.~{ours}~{os.getppid()}~gh78.tmp"  # a running writer's: never touched
    for path in [*orphans, live]:
        path.write_bytes(b"partial")
    assert main(_eval(world, world["data"], "--benchmarks", "lfw,ijbc", out=out)) == 0
    assert not any(p.exists() for p in orphans)
    assert live.read_bytes() == b"partial"
    results = json.loads((out / "results.json").read_text())
    assert set(results["embeddings_cache"].values()) == {"reused"}  # the caches were kept and used


def test_damaged_cache_is_recomputed(world, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(world["out"], out)
    for cache in (out / "cache").glob("lfw-*.npz"):
        cache.write_bytes(cache.read_bytes()[:100])  # a truncated zip (BadZipFile)
    assert main(_eval(world, world["data"], "--benchmarks", "lfw", out=out)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["embeddings_cache"] == {"lfw": "computed"}
    first = json.loads((world["out"] / "results.json").read_text())
    assert res["verification"]["lfw"]["accuracy"] == first["verification"]["lfw"]["accuracy"]


# --------------------------------------------------------------------------------------------------------- compare


@pytest.fixture()
def second(world, tmp_path) -> Path:
    folder = tmp_path / "second"
    shutil.copytree(world["out"], folder)
    return folder


@pytest.mark.parametrize("damage, needle", [
    ("missing", "not found"),
    ("garbage", "corrupt"),
    ("list", "not an object"),
    ("wrong_shape", "'verification' is not a mapping"),
    ("bad_ijb", "'ijb' is not a mapping"),
    ("nan_accuracy", "'verification' is not a mapping"),
    ("schema", "schema"),
    ("set_name", "'verification' is not a mapping"),
    ("skipped", "'skipped' is not a list"),
    ("curves", "curves.npz: damaged"),
    ("curve_shape", "curves.npz: the curve"),
])
def test_compare_refuses_bad_results(world, before, second, tmp_path, capsys, damage, needle) -> None:
    results = second / "results.json"
    res = json.loads(results.read_text())
    if damage == "missing":
        results.unlink()
    elif damage == "garbage":
        results.write_bytes(os.urandom(200))
    elif damage == "list":
        results.write_text("[1, 2, 3]")
    elif damage == "wrong_shape":
        results.write_text(json.dumps({**res, "verification": [1, 2]}))
    elif damage == "bad_ijb":
        results.write_text(json.dumps({**res, "ijb": {"ijbc": [1]}}))
    elif damage == "nan_accuracy":
        res["verification"]["lfw"]["accuracy"] = float("nan")
        results.write_text(json.dumps(res))
    elif damage == "set_name":
        res["verification"]["a | b\n| c"] = res["verification"]["lfw"]
        results.write_text(json.dumps(res))
    elif damage == "skipped":
        results.write_text(json.dumps({**res, "skipped": [{"benchmark": "x\n# injected", "expected": "y"}]}))
    elif damage == "schema":
        results.write_text(json.dumps({**res, "schema": "other/9"}))
    elif damage == "curves":
        (second / "curves.npz").write_bytes(b"PK\x03\x04 not really a zip")
    else:
        np.savez(second / "curves.npz", lfw__fpr=np.zeros(3), lfw__tpr=np.zeros(4))
    bystander = _tree(second)
    out = tmp_path / "cmp"
    target = second / ("curves.npz" if damage.startswith("curve") else "results.json")
    _fails(["compare", str(world["out"]), str(second), "-o", str(out)], capsys, str(target), needle)
    assert not out.exists()  # checked before anything is written
    assert _tree(second) == bystander


def test_compare_output_mistakes(world, before, second, tmp_path, capsys) -> None:
    note = tmp_path / "note.txt"
    note.write_text("keep me")
    _fails(["compare", str(world["out"]), "-o", str(note)], capsys, str(note), "is a file")
    assert note.read_text() == "keep me"
    _fails(["compare", str(world["out"]), str(second), "-o", str(second / "cmp")], capsys, f"-o {second / 'cmp'}",
           "outside")
    _fails(["compare", str(world["out"]), str(world["out"]), "-o", str(tmp_path / "c")], capsys, "given twice")
    _fails(["compare", str(note), "-o", str(tmp_path / "c")], capsys, str(note), "not a folder")
    assert not (tmp_path / "c").exists() and not (second / "cmp").exists()


def test_second_eval_into_a_busy_folder_is_refused(world, before, capsys) -> None:
    from digi2real.fileio import exclusive_lock

    with exclusive_lock(world["out"] / ".eval.lock", "busy"):  # what a running eval holds
        _fails(_eval(world, world["data"], "--benchmarks", "lfw"), capsys, str(world["out"]),
               "another `digi2real eval`")


def test_compare_escapes_hostile_model_names(world, second, tmp_path) -> None:
    res = json.loads((second / "results.json").read_text())
    (second / "results.json").write_text(json.dumps({**res, "name": "evil | name\n| injected | row |"}))
    assert main(["compare", str(world["out"]), str(second), "-o", str(tmp_path / "c")]) == 0
    md = (tmp_path / "c" / "compare.md").read_text()
    rows = [line for line in md.splitlines() if "evil" in line and line.startswith("|")]
    assert len(rows) == 2  # its row in the main table and in the RFW table, each one line
    header = {line.count("|") for line in md.splitlines() if line.startswith("| Model |")}
    assert all(line.count("|") in header for line in rows)
    assert "| injected |" not in md
