"""`pack` and `verify` against hostile or careless input (issue 11, section 2; DESIGN "Safety").

Every refusal is checked as a user sees it: exit status 2, one stderr line naming the file and the fix, and every
input and earlier output byte-identical afterwards (no temporary left behind either).
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digi2real.cli import main
from digi2real.dataset.imagefolder import ImageFolderDataset, RecordFolderDataset, open_dataset
from digi2real.dataset.recordio import write_insightface_rec
from digi2real.errors import Digi2RealError
from digi2real.fileio import temporary_prefix

# ------------------------------------------------------------------------------------------------------ helpers


def face(seed: int) -> np.ndarray:
    """A smooth distinct 112 x 112 image (JPEG q95 keeps it within verify's tolerance)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112] / 112
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
             for _ in range(3)]
    return np.clip(np.stack(chans, -1) * 100 + 128, 0, 255).astype(np.uint8)


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for j, (identity, n) in enumerate(counts.items()):
        (root / identity).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(face(100 * j + k)).save(root / identity / f"{k}.png")
    return root


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 100-byte PNG that declares ``width x height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root`` (hidden ones too, links not followed): file bytes and modes, link targets,
    folders and their modes."""
    out: dict[str, object] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", path.stat().st_mode)
            else:
                out[rel] = (path.read_bytes(), path.stat().st_mode)
    return out


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, *names: object) -> str:
    """Exit 2 and exactly one ``digi2real: error:`` line that names each of ``names``."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("digi2real: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture()
def packed(tmp_path: Path) -> tuple[Path, Path]:
    """(source folder, its packed set): 3 identities, 2 images each."""
    src = make_folder(tmp_path / "src", {"a": 2, "b": 2, "c": 2})
    out = tmp_path / "packed"
    assert main(["pack", str(src), "-o", str(out), "-q"]) == 0
    return src, out


def read_idx(out: Path) -> list[tuple[int, int]]:
    return [(int(k), int(v)) for k, v in (line.split("\t") for line in (out / "train.idx").read_text().splitlines())]


def write_idx(out: Path, rows: list[tuple[int, int]]) -> None:
    (out / "train.idx").write_text("".join(f"{k}\t{v}\n" for k, v in rows))


# ------------------------------------------------------------------------------------------------------ pack: inputs


def test_pack_into_its_own_source_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = tmp_path / "parent"
    src = make_folder(parent / "ds", {"a": 2, "b": 1})
    (parent / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    for out in (src, parent, src / "packed", src / "a"):
        rc, err = cli(capsys, "pack", src, "-o", out, "--force", "-q")
        assert_refused(rc, err, out, "-o")
        assert snapshot(tmp_path) == before  # the source images and the unrelated file survive
    # a symbolic link to the source is the source
    (tmp_path / "alias").symlink_to(src)
    rc, err = cli(capsys, "pack", src, "-o", tmp_path / "alias", "--force", "-q")
    assert_refused(rc, err, "alias")
    assert (parent / "ds" / "a" / "0.png").is_file() and (parent / "notes.txt").read_text() == "mine\n"


def test_force_replaces_only_a_set_pack_wrote(packed: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    src, out = packed
    first = snapshot(out)
    rc, err = cli(capsys, "pack", src, "-o", out, "-q")  # no --force: an earlier set is kept
    assert_refused(rc, err, out, "--force")
    assert snapshot(out) == first
    (out / "notes.txt").write_text("not pack's\n")
    before = snapshot(tmp_path)
    rc, err = cli(capsys, "pack", src, "-o", out, "--force", "-q", "--quality", "80")
    assert_refused(rc, err, out, "notes.txt")
    assert snapshot(tmp_path) == before
    (out / "notes.txt").unlink()
    assert cli(capsys, "pack", src, "-o", out, "--force", "-q", "--quality", "80")[0] == 0
    assert json.loads((out / "labels.json").read_text())["quality"] == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed", "src"]  # nothing set aside is left


def test_force_replaces_a_set_packed_before_pack_named_itself(packed: tuple[Path, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    src, out = packed
    info = json.loads((out / "labels.json").read_text())
    del info["written_by"], info["files"]  # labels.json as earlier versions of pack wrote it
    (out / "labels.json").write_text(json.dumps(info))
    assert cli(capsys, "pack", src, "-o", out, "--force", "-q")[0] == 0
    assert json.loads((out / "labels.json").read_text())["written_by"] == "digi2real pack"


def test_force_never_replaces_a_folder_of_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_folder(tmp_path / "src", {"a": 1})
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "train.rec").write_bytes(b"someone else's set")  # pack's file names, but not written by pack
    (out / "sub" / "x.txt").write_text("x")
    before = snapshot(tmp_path)
    rc, err = cli(capsys, "pack", src, "-o", out, "--force", "-q")
    assert_refused(rc, err, out)
    assert snapshot(tmp_path) == before


def test_symbolic_link_loops_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_folder(tmp_path / "src", {"a": 1})
    (tmp_path / "loop").symlink_to("loop")
    before = snapshot(tmp_path)
    for argv in ([src, "-o", tmp_path / "loop"], [src, "-o", tmp_path / "loop" / "packed"],
                 [tmp_path / "loop", "-o", tmp_path / "packed"]):
        rc, err = cli(capsys, "pack", *argv, "-q")
        assert_refused(rc, err, tmp_path / "loop")
        assert snapshot(tmp_path) == before


def test_output_naming_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_folder(tmp_path / "src", {"a": 1})
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF precious")
    before = snapshot(tmp_path)
    for extra in ([], ["--force"]):
        rc, err = cli(capsys, "pack", src, "-o", target, "-q", *extra)
        assert_refused(rc, err, target)
        assert snapshot(tmp_path) == before
    rc, err = cli(capsys, "pack", src, "-o", target / "packed", "-q")
    assert_refused(rc, err, target)
    assert snapshot(tmp_path) == before


def test_unwritable_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_folder(tmp_path / "src", {"a": 1})
    locked = tmp_path / "locked"
    locked.mkdir()
    before = snapshot(tmp_path)
    mode = locked.stat().st_mode
    if os.geteuid() == 0:  # root ignores permission bits: fail the way the kernel would for anyone else
        real_mkdir = os.mkdir

        def mkdir(path: object, *args: object, **kwargs: object) -> None:
            if Path(os.fsdecode(path)).parent == locked:  # type: ignore[arg-type]
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))  # type: ignore[arg-type]
            real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        locked.chmod(0o555)
    try:
        rc, err = cli(capsys, "pack", src, "-o", locked / "packed", "-q")
    finally:
        locked.chmod(mode)
    assert_refused(rc, err, locked, "permission")
    assert snapshot(tmp_path) == before


def test_empty_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("no images")
    before = snapshot(tmp_path)
    rc, err = cli(capsys, "pack", tmp_path / "empty", "-o", tmp_path / "packed", "-q")
    assert_refused(rc, err, tmp_path / "empty")
    assert snapshot(tmp_path) == before
    rc, err = cli(capsys, "pack", tmp_path / "missing", "-o", tmp_path / "packed", "-q")
    assert_refused(rc, err, tmp_path / "missing")
    assert snapshot(tmp_path) == before


def test_decompression_bomb_in_source_keeps_earlier_set(packed: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    src, out = packed
    (src / "b" / "9.png").write_bytes(bomb_png())
    before = snapshot(tmp_path)
    rc, err = cli(capsys, "pack", src, "-o", out, "--force", "-q")
    assert_refused(rc, err, src / "b" / "9.png", "pixels")
    assert snapshot(tmp_path) == before  # the earlier set is untouched, no temporary folder left
    # verify --source decodes the same file: the same one line
    rc, err = cli(capsys, "verify", out, "--source", src)
    assert_refused(rc, err, src)


def test_odd_identity_names_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["-rf", "Zoë Ångström", "two  spaces ", "名前", "a\\b", "x\u2028y"]
    src = make_folder(tmp_path / "src", {n: 1 for n in names})
    out = tmp_path / "packed"
    assert cli(capsys, "pack", src, "-o", out, "-q")[0] == 0
    expected = ImageFolderDataset(src).identities
    assert sorted(expected) == sorted(names)
    rec = RecordFolderDataset(out)
    assert rec.named and rec.identities == expected
    rc, err = cli(capsys, "verify", out, "--source", src)
    assert rc == 0, err


@pytest.mark.parametrize("name", ["b\nc", "b\rc", "b\x1bc", os.fsdecode(b"b\xffc")])
def test_identity_name_that_cannot_be_a_line_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        name: str) -> None:
    src = make_folder(tmp_path / "src", {"a": 1, name: 1})
    before = snapshot(tmp_path)
    rc, err = cli(capsys, "pack", src, "-o", tmp_path / "packed", "-q")
    assert_refused(rc, err, src, "rename")
    assert snapshot(tmp_path) == before


def _generated(root: Path, rows: list[dict[str, object]]) -> Path:
    for identity in ("1", "2"):
        (root / "images" / identity).mkdir(parents=True)
        Image.fromarray(face(int(identity))).save(root / "images" / identity / "0.png")
    (root / "manifest").mkdir()
    (root / "manifest" / "shard-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_manifest_rows_are_confined_to_the_images_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(face(9)).save(outside / "0.png")
    ok = [{"path": "1/0.png", "status": "ok"}, {"path": "2/0.png", "status": "ok"}]
    bad_rows = [
        {"identity": "..", "file": "outside/0.png", "status": "ok"},
        {"path": "/etc/0.png", "status": "ok"},
        {"path": "images/./0.png", "status": "ok"},
        {"path": "1/0\n.png", "status": "ok"},
        {"path": "link/0.png", "status": "ok"},
    ]
    for j, row in enumerate(bad_rows):
        gen = _generated(tmp_path / f"gen{j}", [*ok, row])
        (gen / "images" / "link").symlink_to(outside)  # a folder link that leads out of images/
        before = snapshot(tmp_path)
        rc, err = cli(capsys, "pack", gen, "-o", tmp_path / f"packed{j}", "-q")
        assert_refused(rc, err, gen / "manifest" / "shard-0.jsonl")
        assert snapshot(tmp_path) == before


def test_pack_artifacts_get_ordinary_permissions(packed: tuple[Path, Path]) -> None:
    mask = os.umask(0)
    os.umask(mask)
    _, out = packed
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for name in ("train.rec", "train.idx", "property", "identities.txt", "labels.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pack_cleans_its_own_leftovers_only(packed: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src, out = packed
    dead = _dead_pid()
    mine = temporary_prefix("packed").replace(f"~{os.getpid()}~", f"~{dead}~")
    partial = tmp_path / f"{mine}ab12.partial.tmp"
    partial.mkdir()
    (partial / "train.rec").write_bytes(b"half")
    stray = tmp_path / f"{mine}cd34.tmp"
    stray.write_bytes(b"half")
    young = tmp_path / ".packed.x9y8z7w6.partial"  # an older naming without a process id: maybe still running
    young.mkdir()
    other = tmp_path / f"{temporary_prefix('src').replace(f'~{os.getpid()}~', f'~{dead}~')}ef56.tmp"
    other.write_bytes(b"another stage's leftover: not pack's to remove")
    assert cli(capsys, "pack", src, "-o", out, "--force", "-q")[0] == 0
    assert not partial.exists() and not stray.exists()
    assert young.is_dir() and other.is_file()


def test_set_aside_by_a_killed_pack_is_restored(packed: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src, out = packed
    first = snapshot(out)
    # killed between setting the old set aside and renaming the new one into place
    aside = tmp_path / f"{temporary_prefix('packed').replace(f'~{os.getpid()}~', f'~{_dead_pid()}~')}ab12.old.tmp"
    out.rename(aside)
    rc, err = cli(capsys, "pack", src, "-o", out, "-q")
    assert_refused(rc, err, out, "--force")  # the earlier set is back, and not replaced without --force
    assert snapshot(out) == first and not aside.exists()


# ------------------------------------------------------------------------------------------------------ verify


def test_verify_checks_each_index_entry_points_at_its_own_record(packed: tuple[Path, Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, out = packed
    rows = read_idx(out)
    assert cli(capsys, "verify", out)[0] == 0
    pristine = (out / "train.idx").read_bytes()
    offsets = dict(rows)
    # two index lines with the same offset: key 2 shows record 1 (same class "a": labels alone cannot tell)
    write_idx(out, [(k, offsets[1] if k == 2 else v) for k, v in rows])
    before = snapshot(out)
    rc, err = cli(capsys, "verify", out, "--sample", "0")
    assert_refused(rc, err, out / "train.idx", "key 2")
    assert snapshot(out) == before
    # two records of one class swapped in the index
    write_idx(out, [(k, offsets[{3: 4, 4: 3}.get(k, k)]) for k, _ in rows])
    rc, err = cli(capsys, "verify", out)
    assert_refused(rc, err, out / "train.idx", "key 3")
    # a range record's key pointing at an image record
    n = len(rows)
    write_idx(out, [(k, offsets[1] if k == n - 1 else v) for k, v in rows])
    rc, err = cli(capsys, "verify", out)
    assert_refused(rc, err, out / "train.idx", f"key {n - 1}")
    (out / "train.idx").write_bytes(pristine)
    assert cli(capsys, "verify", out)[0] == 0


@pytest.mark.parametrize("idx_text", [
    "garbage\n",
    "0\t0\n1\tzero\n",
    "0\t0\n1\t99999999\n",  # past the end of train.rec
    "0\t0\n1\t6\n",  # not on a record boundary
    "0\t0\n99999999999999999999999\t0\n",  # a key beyond 64 bits
    "0\t0\n-1\t0\n",
    "1_0\t0\n",
    "\x00\xff" * 5000,  # binary, no newline
])
def test_verify_refuses_a_damaged_index(packed: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                        idx_text: str) -> None:
    _, out = packed
    (out / "train.idx").write_bytes(idx_text.encode("latin-1"))
    before = snapshot(out)
    rc, err = cli(capsys, "verify", out)
    assert_refused(rc, err, out / "train.idx")
    assert snapshot(out) == before
    with pytest.raises(Digi2RealError, match="train.idx"):
        open_dataset(out)  # training reads it through the same checks


@pytest.mark.parametrize("damage", ["truncate", "zero_middle", "flip_magic", "empty"])
def test_verify_refuses_a_damaged_rec(packed: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                      damage: str) -> None:
    _, out = packed
    rec = out / "train.rec"
    data = bytearray(rec.read_bytes())
    rows = read_idx(out)
    if damage == "truncate":
        data = data[: rows[3][1] + 20]
    elif damage == "zero_middle":
        data[rows[2][1]: rows[4][1]] = bytes(rows[4][1] - rows[2][1])
    elif damage == "flip_magic":
        data[rows[5][1]] ^= 0xFF
    else:
        data = bytearray()
    rec.write_bytes(bytes(data))
    before = snapshot(out)
    rc, err = cli(capsys, "verify", out)
    assert_refused(rc, err, out)
    assert snapshot(out) == before


def _rewrite_header(out: Path, key: int, fmt: str, values: tuple[float, ...], at: int) -> None:
    """Overwrite header fields of record ``key`` (``at`` bytes into its payload)."""
    offsets = dict(read_idx(out))
    with open(out / "train.rec", "r+b") as f:
        f.seek(offsets[key] + 8 + at)
        f.write(struct.pack(fmt, *values))


@pytest.mark.parametrize("key,fmt,values,at,expect", [
    (1, "<f", (float("nan"),), 4, "record 1"),  # image label NaN
    (1, "<f", (float("inf"),), 4, "record 1"),
    (1, "<f", (0.5,), 4, "record 1"),  # not a class number
    (1, "<f", (-1.0,), 4, "record 1"),
    (0, "<ff", (float("nan"), 10.0), 24, "meta record 0"),  # meta (N + 1, end)
    (0, "<ff", (3.0, 5.0), 24, "meta record 0"),  # fewer images than the index and property say
    (7, "<ff", (float("nan"), 3.0), 24, "record 7"),  # a class range record
])
def test_verify_refuses_nonsense_headers(packed: tuple[Path, Path], capsys: pytest.CaptureFixture[str], key: int,
                                         fmt: str, values: tuple[float, ...], at: int, expect: str) -> None:
    _, out = packed
    _rewrite_header(out, key, fmt, values, at)
    before = snapshot(out)
    rc, err = cli(capsys, "verify", out)
    assert_refused(rc, err, out, expect)
    assert snapshot(out) == before


def _limited_cli(*argv: object) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with a 3 GB address-space limit and a timeout: a regression to allocating what a
    damaged file announces then fails the test instead of killing the test run."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from digi2real.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("damage", ["billion_images", "billion_classes"])
def test_verify_huge_announcements_neither_hang_nor_allocate(packed: tuple[Path, Path], damage: str) -> None:
    _, out = packed
    if damage == "billion_images":
        _rewrite_header(out, 0, "<ff", (1e9, 1e9 + 5), 24)  # meta record: (N + 1, end)
        expect: tuple[object, ...] = (out / "train.rec", "meta record 0")
    else:
        (out / "property").write_text("99999999999,112,112\n")
        expect = (out / "property",)
    before = snapshot(out)
    proc = _limited_cli("verify", out)
    assert_refused(proc.returncode, proc.stderr, *expect)
    assert snapshot(out) == before


@pytest.mark.parametrize("text", [b"abc", b"1e400,112,112", b"nan,112,112", b"0,112,112", b"3,112",
                                  b"3,112,99999999", b"\xff\xfe\x00garbage", b""])
def test_verify_refuses_a_nonsense_property(packed: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                            text: bytes) -> None:
    _, out = packed
    (out / "property").write_bytes(text)
    before = snapshot(out)
    rc, err = cli(capsys, "verify", out)
    assert_refused(rc, err, out / "property")
    assert snapshot(out) == before
    with pytest.raises(Digi2RealError, match="property"):
        open_dataset(out)


@pytest.mark.parametrize("name,content", [
    ("labels.json", b'{"images": 6, "classes": 3, "counts": ["a", "b", "c"]}'),
    ("labels.json", b'{"images": 6, "classes": 3, "counts": [[1], 2, 3]}'),
    ("labels.json", b"\xff\x00not json"),
    ("labels.json", b"[1, 2]"),
    ("identities.txt", b"\xff\xfe\x00\x01\n\x02\n\x03\n"),
])
def test_verify_refuses_nonsense_side_files(packed: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                            name: str, content: bytes) -> None:
    src, out = packed
    (out / name).write_bytes(content)
    before = snapshot(out)
    rc, err = cli(capsys, "verify", out, "--source", src)
    assert_refused(rc, err, out / name)
    assert snapshot(out) == before


def test_verify_refuses_a_bomb_stored_in_a_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "foreign"
    out.mkdir()
    buf = io.BytesIO()
    Image.fromarray(face(1)).save(buf, format="PNG")
    write_insightface_rec(out, [(buf.getvalue(), 0), (bomb_png(), 0)], 1)
    before = snapshot(tmp_path)
    rc, err = cli(capsys, "verify", out)
    assert_refused(rc, err, out, "record 2", "pixels")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv", [["--sample", "-1"], ["--seed", "-5"]])
def test_verify_refuses_negative_counts(packed: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                        argv: list[str]) -> None:
    _, out = packed
    rc, err = cli(capsys, "verify", out, *argv)
    assert_refused(rc, err, argv[0])


def test_verify_of_a_missing_or_wrong_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = cli(capsys, "verify", tmp_path / "nope")
    assert_refused(rc, err, tmp_path / "nope")
    (tmp_path / "file.rec").write_bytes(b"x")
    rc, err = cli(capsys, "verify", tmp_path / "file.rec")
    assert_refused(rc, err, tmp_path / "file.rec")
    (tmp_path / "empty").mkdir()
    rc, err = cli(capsys, "verify", tmp_path / "empty")
    assert_refused(rc, err, tmp_path / "empty")

