"""Readers of identity sources: DigiFace-1M folders and zips (laid out exactly as the real dataset) and any
folder-per-identity tree."""

from __future__ import annotations

import io
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from digi2real.config import SourceConfig
from digi2real.errors import BadImageError, Digi2RealError
from digi2real.sources import open_source
from digi2real.sources.base import SourceItem
from digi2real.sources.digiface import DigiFaceFolderSource, DigiFaceZipSource, detect_layout
from digi2real.sources.folder import FolderSource

IDS = [0, 1, 2, 9, 10, 11]
PER_ID = 11  # 0.png .. 10.png, so 10.png must come after 9.png
SIDE = 16


def pixels(identity: int, k: int) -> np.ndarray:
    """A small image whose content tells identity and index apart (and is not symmetric)."""
    rng = np.random.default_rng(identity * 1000 + k)
    return rng.integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)


def png_bytes(identity: int, k: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels(identity, k)).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root: Path, ids: list[int] = IDS, per_id: int = PER_ID) -> Path:
    """Unzipped DigiFace layout: root/<id>/<k>.png (created in shuffled order so listing cannot rely on it)."""
    order = [(i, k) for i in ids for k in range(per_id)]
    np.random.default_rng(0).shuffle(order)
    for identity, k in order:
        folder = root / str(identity)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k}.png").write_bytes(png_bytes(identity, k))
    return root


def make_zip(path: Path, ids: list[int] = IDS, per_id: int = PER_ID, wrapper: str = "") -> Path:
    """A DigiFace part zip: members <id>/<k>.png with no wrapper folder (unless ``wrapper`` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    order = [(i, k) for i in ids for k in range(per_id)]
    np.random.default_rng(1).shuffle(order)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for identity, k in order:
            zf.writestr(f"{wrapper}{identity}/{k}.png", png_bytes(identity, k))
    return path


def expected_paths(ids: list[int] = IDS, per_id: int = PER_ID) -> list[str]:
    return [f"{i}/{k}.png" for i in ids for k in range(per_id)]


# ---------------------------------------------------------------------------------------------------------------------
# Listing order and first-k
# ---------------------------------------------------------------------------------------------------------------------


def test_folder_listing_is_numeric(tmp_path: Path) -> None:
    src = DigiFaceFolderSource(make_tree(tmp_path / "digiface"))
    items = src.list_items()
    assert [it.path for it in items] == expected_paths()
    assert [it.identity for it in items[:: PER_ID]] == [str(i) for i in IDS]
    assert src.identities() == ["0", "1", "2", "9", "10", "11"]  # 10 after 9, not after 1
    assert [it.path for it in items if it.identity == "9"][-2:] == ["9/9.png", "9/10.png"]


def test_zip_listing_is_numeric(tmp_path: Path) -> None:
    with DigiFaceZipSource(make_zip(tmp_path / "subjects_0-1999_72_imgs.zip")) as src:
        assert [it.path for it in src.list_items()] == expected_paths()


@pytest.mark.parametrize("reader", ["folder", "zip", "generic"])
def test_first_k_per_identity(tmp_path: Path, reader: str) -> None:
    if reader == "zip":
        src = DigiFaceZipSource(make_zip(tmp_path / "subjects_0-1999_72_imgs.zip"))
    elif reader == "folder":
        src = DigiFaceFolderSource(make_tree(tmp_path / "d"))
    else:
        src = FolderSource(make_tree(tmp_path / "d"))
    items = src.list_items(per_identity=3)
    assert [it.path for it in items] == [f"{i}/{k}.png" for i in IDS for k in range(3)]
    # Asking for more than exist gives all of them; zero or negative is refused.
    assert len(src.list_items(per_identity=1000)) == len(IDS) * PER_ID
    with pytest.raises(Digi2RealError):
        src.list_items(per_identity=0)
    src.close()


def test_identities_with_fewer_images_keep_all_they_have(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", ids=[3], per_id=2)
    make_tree(root, ids=[4], per_id=6)
    items = DigiFaceFolderSource(root).list_items(per_identity=5)
    assert [it.path for it in items] == ["3/0.png", "3/1.png"] + [f"4/{k}.png" for k in range(5)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.sets(st.integers(0, 250_000), min_size=1, max_size=12),
    per_id=st.integers(1, 13),
)
def test_zip_order_property(tmp_path_factory: pytest.TempPathFactory, ids: set[int], per_id: int) -> None:
    """Whatever the ids and the member order in the zip, the listing is numeric by id then by k."""
    path = tmp_path_factory.mktemp("prop") / "subjects_x_72_imgs.zip"
    members = [f"{i}/{k}.png" for i in ids for k in range(per_id)]
    with zipfile.ZipFile(path, "w") as zf:
        for name in reversed(members):  # listing must not depend on storage order
            zf.writestr(name, b"not decoded by listing")
    with DigiFaceZipSource(path) as src:
        got = [it.path for it in src.list_items()]
    assert got == [f"{i}/{k}.png" for i in sorted(ids) for k in range(per_id)]


# ---------------------------------------------------------------------------------------------------------------------
# Zip and folder readers agree
# ---------------------------------------------------------------------------------------------------------------------


def test_zip_and_folder_readers_agree(tmp_path: Path) -> None:
    tree = DigiFaceFolderSource(make_tree(tmp_path / "tree"))
    zipped = DigiFaceZipSource(make_zip(tmp_path / "zips" / "subjects_0-1999_72_imgs.zip"))
    generic = FolderSource(tmp_path / "tree")
    assert tree.list_items() == zipped.list_items() == generic.list_items()
    assert tree.list_items(4) == zipped.list_items(4)
    for item in zipped.list_items():
        identity, k = int(item.identity), int(Path(item.path).stem)
        a, b, c = tree.load(item), zipped.load(item), generic.load(item)
        assert a.dtype == np.uint8 and a.shape == (SIDE, SIDE, 3)
        np.testing.assert_array_equal(a, pixels(identity, k))
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(c, a)
    zipped.close()


def test_directory_of_part_zips_is_merged(tmp_path: Path) -> None:
    make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[0, 1, 10])
    make_zip(tmp_path / "subjects_2000-3999_72_imgs.zip", ids=[2000, 2001])
    make_zip(tmp_path / "subjects_100000-133332_5_imgs.zip", ids=[100000], per_id=5)
    (tmp_path / "subjects_4000-5999_72_imgs.zip.part").write_bytes(b"half a download")  # ignored
    (tmp_path / "notes.txt").write_text("ignored")
    with DigiFaceZipSource(tmp_path) as src:
        assert src.identities() == ["0", "1", "10", "2000", "2001", "100000"]
        info = src.describe()
        assert info["kind"] == "digiface-zip"
        assert info["path"] == str(tmp_path.absolute())
        assert info["identities"] == 6 and info["images"] == 5 * PER_ID + 5
        assert [z["name"] for z in info["zips"]] == [
            "subjects_0-1999_72_imgs.zip",
            "subjects_2000-3999_72_imgs.zip",
            "subjects_100000-133332_5_imgs.zip",
        ]
        assert info["zips"][0]["bytes"] == (tmp_path / "subjects_0-1999_72_imgs.zip").stat().st_size
        item = SourceItem("2001", "2001/10.png")
        np.testing.assert_array_equal(src.load(item), pixels(2001, 10))


def test_identity_in_two_zips_is_an_error_naming_both(tmp_path: Path) -> None:
    make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[0, 5])
    make_zip(tmp_path / "subjects_2000-3999_72_imgs.zip", ids=[5, 2000])
    with pytest.raises(Digi2RealError, match="identity 5") as err:
        DigiFaceZipSource(tmp_path)
    assert "subjects_0-1999_72_imgs.zip" in str(err.value)
    assert "subjects_2000-3999_72_imgs.zip" in str(err.value)


def test_single_wrapper_folder_in_zip_is_tolerated(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[1, 2], per_id=3, wrapper="subjects_0-1999/")
    with DigiFaceZipSource(path) as src:
        assert [it.path for it in src.list_items()] == expected_paths([1, 2], 3)
        np.testing.assert_array_equal(src.load(SourceItem("2", "2/1.png")), pixels(2, 1))


def test_zip_junk_members_are_ignored(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[1], per_id=2)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("__MACOSX/1/._0.png", b"resource fork")
        zf.writestr("1/.hidden.png", b"x")
        zf.writestr("1/readme.txt", b"x")
        zf.writestr("stray.png", b"x")
    with DigiFaceZipSource(path) as src:
        assert [it.path for it in src.list_items()] == ["1/0.png", "1/1.png"]
        assert src.describe()["ignored_members"] == 4


def test_split_part_folders_are_merged(tmp_path: Path) -> None:
    make_tree(tmp_path / "subjects_0-1999_72_imgs", ids=[0, 10], per_id=2)
    make_tree(tmp_path / "subjects_2000-3999_72_imgs", ids=[2000, 9], per_id=2)
    assert detect_layout(tmp_path) == "digiface-folder"
    src = DigiFaceFolderSource(tmp_path)
    assert src.identities() == ["0", "9", "10", "2000"]
    assert src.describe()["parts"] == ["subjects_0-1999_72_imgs", "subjects_2000-3999_72_imgs"]
    np.testing.assert_array_equal(src.load(SourceItem("9", "9/1.png")), pixels(9, 1))
    make_tree(tmp_path / "subjects_4000-5999_72_imgs", ids=[10], per_id=1)
    with pytest.raises(Digi2RealError, match="identity 10 is present in both"):
        DigiFaceFolderSource(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Damaged inputs
# ---------------------------------------------------------------------------------------------------------------------


def _corrupt_member(path: Path, member: str) -> None:
    """Flip bytes inside one member's compressed data, leaving the central directory intact."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    blob = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 5, start + 25):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def test_corrupt_member_is_a_bad_image_for_that_item_only(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[1, 2], per_id=3)
    _corrupt_member(path, "2/1.png")
    with DigiFaceZipSource(path) as src:
        with pytest.raises(BadImageError, match=r"subjects_0-1999_72_imgs\.zip:2/1\.png"):
            src.load(SourceItem("2", "2/1.png"))
        for item in src.list_items():
            if item.path != "2/1.png":
                assert src.load(item).shape == (SIDE, SIDE, 3)


def test_member_that_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "subjects_0-1999_72_imgs.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("1/0.png", png_bytes(1, 0))
        zf.writestr("1/1.png", b"this is text, not a png")
        zf.writestr("1/2.png", b"")
    with DigiFaceZipSource(path) as src:
        assert src.load(SourceItem("1", "1/0.png")).shape == (SIDE, SIDE, 3)
        with pytest.raises(BadImageError, match="1/1.png"):
            src.load(SourceItem("1", "1/1.png"))
        with pytest.raises(BadImageError, match="empty"):
            src.load(SourceItem("1", "1/2.png"))
        with pytest.raises(BadImageError, match="no such image"):
            src.load(SourceItem("1", "1/99.png"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_zip_is_one_clear_error(tmp_path: Path, damage: str) -> None:
    path = make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[1, 2], per_id=3)
    blob = path.read_bytes()
    path.write_bytes({"truncated": blob[: len(blob) // 2], "garbage": b"<html>not found</html>", "empty": b""}[damage])
    for target in (path, tmp_path):
        with pytest.raises(Digi2RealError) as err:
            DigiFaceZipSource(target)
        message = str(err.value)
        assert "\n" not in message
        assert "subjects_0-1999_72_imgs.zip" in message
        assert "digi2real download digiface" in message
        # The known size of the real part is quoted, since a short file is the usual cause.
        assert "2938553163" in message


def test_folder_bad_files(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", ids=[1], per_id=2)
    (root / "1" / "2.png").write_bytes(b"")
    (root / "1" / "3.PNG").write_bytes(b"garbage")
    (root / "1" / "notes.txt").write_text("not an image")
    (root / "1" / ".DS_Store").write_bytes(b"x")
    (root / "1" / "._0.png").write_bytes(b"x")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "0.png").write_bytes(png_bytes(0, 0))
    (root / "empty").mkdir()
    src = FolderSource(root)
    assert [it.path for it in src.list_items()] == ["1/0.png", "1/1.png", "1/2.png", "1/3.PNG"]
    assert src.describe()["empty_folders"] == 1
    with pytest.raises(BadImageError, match="empty"):
        src.load(SourceItem("1", "1/2.png"))
    with pytest.raises(BadImageError, match="3.PNG"):
        src.load(SourceItem("1", "1/3.PNG"))
    (root / "1" / "1.png").unlink()
    with pytest.raises(BadImageError, match="not found"):
        src.load(SourceItem("1", "1/1.png"))


def test_folder_source_accepts_mixed_names_and_formats(tmp_path: Path) -> None:
    root = tmp_path / "people"
    for name in ["alice", "bob", "id10", "id9"]:
        (root / name).mkdir(parents=True)
    Image.fromarray(pixels(0, 0)).save(root / "alice" / "img2.JPG", quality=95)
    Image.fromarray(pixels(0, 1)).save(root / "alice" / "img10.png")
    Image.fromarray(pixels(1, 0)).convert("L").save(root / "bob" / "a.bmp")
    Image.fromarray(pixels(2, 0)).save(root / "id10" / "x.webp")
    Image.fromarray(pixels(3, 0)).save(root / "id9" / "x.tiff")
    src = FolderSource(root)
    assert src.kind == "folder"
    assert [it.path for it in src.list_items()] == [
        "alice/img2.JPG", "alice/img10.png", "bob/a.bmp", "id9/x.tiff", "id10/x.webp",
    ]
    for item in src.list_items():
        arr = src.load(item)
        assert arr.dtype == np.uint8 and arr.shape == (SIDE, SIDE, 3)
    np.testing.assert_array_equal(src.load(SourceItem("id9", "id9/x.tiff")), pixels(3, 0))
    assert detect_layout(root) == "folder-tree"


def test_folder_without_identities_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "loose.png").write_bytes(png_bytes(0, 0))
    (tmp_path / "empty_identity").mkdir()
    with pytest.raises(Digi2RealError, match="no identity folders with images found") as err:
        FolderSource(tmp_path)
    assert f"{tmp_path}/<identity>/<image>.png" in str(err.value)
    with pytest.raises(Digi2RealError, match="not a folder"):
        FolderSource(tmp_path / "missing")
    with pytest.raises(Digi2RealError, match="no DigiFace zips"):
        DigiFaceZipSource(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Threads, close, detection, open_source
# ---------------------------------------------------------------------------------------------------------------------


def test_concurrent_loads_from_threads(tmp_path: Path) -> None:
    make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[0, 1, 2])
    make_zip(tmp_path / "subjects_2000-3999_72_imgs.zip", ids=[2000, 2001, 2002])
    with DigiFaceZipSource(tmp_path) as src:
        items = src.list_items()
        workers = 6
        barrier = threading.Barrier(workers)

        def load_all(shift: int) -> list[np.ndarray]:
            barrier.wait()  # start together so reads of the same zips really overlap
            order = items[shift:] + items[:shift]  # each thread walks the items from another starting point
            return [src.load(item) for item in order]

        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(load_all, [w * 7 for w in range(workers)]))
        for shift, arrays in zip([w * 7 for w in range(workers)], results):
            for item, arr in zip(items[shift:] + items[:shift], arrays):
                np.testing.assert_array_equal(arr, pixels(int(item.identity), int(Path(item.path).stem)))


def test_close_then_load_reopens(tmp_path: Path) -> None:
    src = DigiFaceZipSource(make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[1], per_id=2))
    item = src.list_items()[0]
    first = src.load(item)
    src.close()
    src.close()  # twice is harmless
    np.testing.assert_array_equal(src.load(item), first)
    src.close()


def test_detect_layout(tmp_path: Path) -> None:
    zpath = make_zip(tmp_path / "zips" / "subjects_0-1999_72_imgs.zip", ids=[1], per_id=1)
    other_zip = tmp_path / "other.zip"
    other_zip.write_bytes(zpath.read_bytes())
    assert detect_layout(zpath) == "digiface-zip"
    assert detect_layout(other_zip) == "digiface-zip"  # any single zip is read as DigiFace members
    assert detect_layout(tmp_path / "zips") == "digiface-zip"
    assert detect_layout(make_tree(tmp_path / "tree", ids=[1, 2], per_id=2)) == "digiface-folder"
    generic = tmp_path / "generic"
    (generic / "alice").mkdir(parents=True)
    (generic / "alice" / "0.png").write_bytes(png_bytes(0, 0))
    assert detect_layout(generic) == "folder-tree"
    jpgs = tmp_path / "jpgs" / "1"
    jpgs.mkdir(parents=True)
    (jpgs / "0.jpg").write_bytes(b"x")
    assert detect_layout(jpgs.parent) == "folder-tree"  # integer folders but no <int>.png files
    (tmp_path / "loose.png").write_bytes(b"x")
    assert detect_layout(tmp_path / "loose.png") == "folder-tree"
    assert detect_layout(tmp_path / "missing") == "folder-tree"


def test_open_source_picks_the_reader(tmp_path: Path) -> None:
    make_zip(tmp_path / "zips" / "subjects_0-1999_72_imgs.zip", ids=[1, 2], per_id=2)
    make_tree(tmp_path / "tree", ids=[1, 2], per_id=2)
    (tmp_path / "people" / "alice").mkdir(parents=True)
    (tmp_path / "people" / "alice" / "a.png").write_bytes(png_bytes(0, 0))
    with open_source(SourceConfig(kind="auto", path=tmp_path / "zips")) as src:
        assert src.kind == "digiface-zip"
    assert open_source(SourceConfig(kind="auto", path=tmp_path / "tree")).kind == "digiface-folder"
    assert open_source(SourceConfig(kind="auto", path=tmp_path / "people")).kind == "folder"
    forced = open_source(SourceConfig(kind="digiface", path=tmp_path / "people"))
    assert forced.kind == "digiface-folder" and forced.identities() == ["alice"]
    assert open_source(SourceConfig(kind="folder", path=tmp_path / "tree")).kind == "folder"


def test_zip_source_pickles_for_process_pools(tmp_path: Path) -> None:
    import pickle

    src = DigiFaceZipSource(make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[1, 2], per_id=2))
    item = src.list_items()[-1]
    src.load(item)  # open a descriptor first: it must not travel
    copy = pickle.loads(pickle.dumps(src))
    assert copy.list_items() == src.list_items()
    np.testing.assert_array_equal(copy.load(item), src.load(item))
    copy.close()
    src.close()


def test_zip_reads_without_pread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Platforms without os.pread (Windows) read through one locked file object per zip."""
    import os

    monkeypatch.delattr(os, "pread", raising=False)
    make_zip(tmp_path / "subjects_0-1999_72_imgs.zip", ids=[1, 2])
    make_zip(tmp_path / "subjects_2000-3999_72_imgs.zip", ids=[2000])
    with DigiFaceZipSource(tmp_path) as src:
        items = src.list_items()
        with ThreadPoolExecutor(max_workers=4) as pool:
            arrays = list(pool.map(src.load, items))
        for item, arr in zip(items, arrays):
            np.testing.assert_array_equal(arr, pixels(int(item.identity), int(Path(item.path).stem)))
