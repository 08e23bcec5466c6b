"""DigiFace download: resume, servers without Range support, size checks, offline errors.

Every test talks to a small HTTP server on 127.0.0.1 written here; the real host is never contacted.
"""

from __future__ import annotations

import io
import re
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from digi2real.errors import Digi2RealError
from digi2real.sources import digiface
from digi2real.sources.digiface import (
    DIGIFACE_PARTS,
    DigiFacePart,
    DigiFaceZipSource,
    download_digiface,
    resolve_parts,
)


def make_zip_bytes(seed: int, ids: range, per_id: int = 3, payload: int = 20_000) -> bytes:
    """A small DigiFace-like zip (<id>/<k>.png members, stored so its size is predictable)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for identity in ids:
            for k in range(per_id):
                zf.writestr(f"{identity}/{k}.png", rng.bytes(payload))
    return buf.getvalue()


ZIP_A = make_zip_bytes(0, range(0, 4))
ZIP_B = make_zip_bytes(1, range(4, 8))
ZIP_C = make_zip_bytes(2, range(100, 103), per_id=2)


def table(**sizes: int | None) -> dict[str, DigiFacePart]:
    """A fake parts table over the three test zips; sizes default to the true ones."""
    return {
        "0-3": DigiFacePart("subjects_0-3_72_imgs.zip", sizes.get("a", len(ZIP_A))),
        "4-7": DigiFacePart("subjects_4-7_72_imgs.zip", sizes.get("b", len(ZIP_B))),
        "100-102": DigiFacePart("subjects_100-102_5_imgs.zip", sizes.get("c", None)),
    }


@dataclass
class Served:
    """What the test server holds and how it behaves; ``log`` records each request."""

    files: dict[str, bytes]
    # "range": honours Range; "norange": always 200 with the full body; "cut": stops half-way;
    # "nolength": full body without Content-Length, ended by closing the connection
    mode: str = "range"
    log: list[dict] = field(default_factory=list)

    def requests_for(self, name: str) -> list[dict]:
        return [entry for entry in self.log if entry["path"].endswith(name)]


def _handler(state: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            name = self.path.rsplit("/", 1)[-1]
            entry = {"path": self.path, "range": self.headers.get("Range"), "status": None, "sent": 0}
            state.log.append(entry)
            body = state.files.get(name)
            if body is None:
                entry["status"] = 404
                self.send_error(404, "Not Found")
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and state.mode != "norange":
                start = int(match.group(1))
                if start >= len(body):
                    entry["status"] = 416
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                entry["status"] = 206
            else:
                self.send_response(200)
                entry["status"] = 200
            chunk = body[start:]
            if state.mode == "nolength":
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Content-Type", "application/zip")
            self.end_headers()
            if state.mode == "cut":
                chunk = chunk[: len(chunk) // 2]  # promise everything, deliver half, hang up
                self.close_connection = True
            self.wfile.write(chunk)
            self.wfile.flush()
            entry["sent"] = len(chunk)

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[Served, str]]:
    state = Served(files={p.filename: data for p, data in zip(table().values(), [ZIP_A, ZIP_B, ZIP_C])})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    # A short poll interval keeps shutdown() (and so each test's teardown) fast.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}/wacv-2023/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch(out: Path, parts: str, base: str, **kw: object) -> list[Path]:
    kw.setdefault("parts_table", table())
    kw.setdefault("progress", False)
    kw.setdefault("timeout", 5)
    return download_digiface(out, parts, base_url=base, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------


def test_full_download(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    paths = fetch(tmp_path, "all", base)
    assert [p.name for p in paths] == [p.filename for p in table().values()]
    assert [p.read_bytes() for p in paths] == [ZIP_A, ZIP_B, ZIP_C]
    assert not list(tmp_path.glob("*.part"))
    assert [e["range"] for e in state.log] == [None, None, None]
    # What was downloaded is readable as a source straight away.
    with DigiFaceZipSource(tmp_path) as src:
        assert src.identities() == ["0", "1", "2", "3", "4", "5", "6", "7", "100", "101", "102"]


def test_progress_bar_runs(server: tuple[Served, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, base = server
    fetch(tmp_path, "0-3", base, progress=True)
    err = capsys.readouterr().err
    assert "subjects_0-3_72_imgs.zip" in err and "done" in err


def test_resume_requests_only_the_remaining_bytes(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    have = len(ZIP_A) // 3
    (tmp_path / "subjects_0-3_72_imgs.zip.part").write_bytes(ZIP_A[:have])
    (path,) = fetch(tmp_path, "72-0", base)
    assert path.read_bytes() == ZIP_A
    (entry,) = state.log
    assert entry["range"] == f"bytes={have}-"
    assert entry["status"] == 206
    assert entry["sent"] == len(ZIP_A) - have


def test_interrupted_download_keeps_part_and_resumes(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    state.mode = "cut"
    with pytest.raises(Digi2RealError, match="interrupted.*run the same command again to resume"):
        fetch(tmp_path, "0-3", base)
    part = tmp_path / "subjects_0-3_72_imgs.zip.part"
    assert part.read_bytes() == ZIP_A[: len(ZIP_A) // 2]
    assert not (tmp_path / "subjects_0-3_72_imgs.zip").exists()
    state.mode = "range"
    (path,) = fetch(tmp_path, "0-3", base)
    assert path.read_bytes() == ZIP_A
    assert state.log[-1]["range"] == f"bytes={len(ZIP_A) // 2}-"
    assert state.log[-1]["sent"] == len(ZIP_A) - len(ZIP_A) // 2


def test_server_without_range_support_restarts_cleanly(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    state.mode = "norange"
    # A .part whose bytes are wrong: appending the 200 body to it would corrupt the file, restarting must not.
    (tmp_path / "subjects_4-7_72_imgs.zip.part").write_bytes(b"\0" * 1000)
    (path,) = fetch(tmp_path, "4-7", base)
    assert path.read_bytes() == ZIP_B
    assert state.log[0]["range"] == "bytes=1000-" and state.log[0]["status"] == 200


def test_size_mismatch_keeps_nothing(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    wrong = table(a=len(ZIP_A) + 1234)
    with pytest.raises(Digi2RealError, match=f"{len(ZIP_A)} bytes but {len(ZIP_A) + 1234} are expected"):
        fetch(tmp_path, "0-3", base, parts_table=wrong)
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_without_content_length_keeps_nothing(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    state.mode = "nolength"  # the size is only known once the body has arrived
    with pytest.raises(Digi2RealError, match=f"downloaded {len(ZIP_B)} bytes but {len(ZIP_B) - 1} are expected"):
        fetch(tmp_path, "4-7", base, parts_table=table(b=len(ZIP_B) - 1))
    assert list(tmp_path.iterdir()) == []
    (path,) = fetch(tmp_path, "4-7", base)  # with the right size the same server is fine
    assert path.read_bytes() == ZIP_B


def test_unknown_size_part_and_complete_part_answered_416(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    # A finished .part of a part whose size is not known: the server answers 416 to "bytes=<len>-".
    (tmp_path / "subjects_100-102_5_imgs.zip.part").write_bytes(ZIP_C)
    (path,) = fetch(tmp_path, "5", base)
    assert path.read_bytes() == ZIP_C
    assert state.log[0]["status"] == 416


def test_part_longer_than_file_restarts(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    (tmp_path / "subjects_100-102_5_imgs.zip.part").write_bytes(ZIP_C + b"junk")
    (path,) = fetch(tmp_path, "100-102", base)
    assert path.read_bytes() == ZIP_C
    assert [e["status"] for e in state.log] == [416, 200]


def test_not_a_zip_is_deleted(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    state.files["subjects_4-7_72_imgs.zip"] = b"<html>maintenance</html>".ljust(len(ZIP_B), b" ")
    with pytest.raises(Digi2RealError, match="not a readable zip.*deleted"):
        fetch(tmp_path, "4-7", base)
    assert list(tmp_path.iterdir()) == []


def test_verify_catches_a_damaged_member(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    blob = bytearray(ZIP_A)
    blob[200:220] = bytes(20)  # inside the first member's data; the central directory stays intact
    state.files["subjects_0-3_72_imgs.zip"] = bytes(blob)
    with pytest.raises(Digi2RealError, match="CRC"):
        fetch(tmp_path, "0-3", base, verify=True)
    assert list(tmp_path.iterdir()) == []


def test_already_complete_file_is_skipped(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    (tmp_path / "subjects_0-3_72_imgs.zip").write_bytes(ZIP_A)
    (tmp_path / "subjects_100-102_5_imgs.zip").write_bytes(ZIP_C)
    paths = fetch(tmp_path, ["0-3", "100-102"], base, verify=True)
    assert [p.name for p in paths] == ["subjects_0-3_72_imgs.zip", "subjects_100-102_5_imgs.zip"]
    assert state.log == []


def test_existing_file_with_wrong_size_is_left_alone(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    final = tmp_path / "subjects_0-3_72_imgs.zip"
    final.write_bytes(ZIP_A[:100])
    with pytest.raises(Digi2RealError, match="has 100 bytes"):
        fetch(tmp_path, "0-3", base)
    assert final.read_bytes() == ZIP_A[:100]
    assert state.log == []


def test_http_error_is_one_line(server: tuple[Served, str], tmp_path: Path) -> None:
    state, base = server
    del state.files["subjects_4-7_72_imgs.zip"]
    (tmp_path / "subjects_4-7_72_imgs.zip.part").write_bytes(ZIP_B[:10])
    with pytest.raises(Digi2RealError, match="HTTP 404") as err:
        fetch(tmp_path, "4-7", base)
    assert "\n" not in str(err.value) and "by hand" in str(err.value)
    assert (tmp_path / "subjects_4-7_72_imgs.zip.part").read_bytes() == ZIP_B[:10]  # nothing lost


def test_unreachable_host_fails_fast_and_keeps_files(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on: bind, read its number, release it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}/wacv-2023/"
    (tmp_path / "subjects_0-3_72_imgs.zip").write_bytes(ZIP_A)  # done earlier
    (tmp_path / "subjects_4-7_72_imgs.zip.part").write_bytes(ZIP_B[:50])
    started = time.monotonic()
    with pytest.raises(Digi2RealError) as err:
        fetch(tmp_path, "72", base)
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert message.startswith(f"cannot reach 127.0.0.1:{port}: ")
    assert "check your connection" in message
    assert f"{base}subjects_4-7_72_imgs.zip" in message and str(tmp_path) in message
    assert "\n" not in message
    assert (tmp_path / "subjects_0-3_72_imgs.zip").read_bytes() == ZIP_A
    assert (tmp_path / "subjects_4-7_72_imgs.zip.part").read_bytes() == ZIP_B[:50]


def test_not_enough_disk_space(server: tuple[Served, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, base = server

    class Usage:
        free = 10

    monkeypatch.setattr(digiface.shutil, "disk_usage", lambda _path: Usage())
    with pytest.raises(Digi2RealError, match="not enough disk space"):
        fetch(tmp_path, "0-3", base)
    assert not (tmp_path / "subjects_0-3_72_imgs.zip").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Part names
# ---------------------------------------------------------------------------------------------------------------------


def test_real_parts_table_matches_the_dataset() -> None:
    sizes = [p.size for p in DIGIFACE_PARTS.values() if p.images_per_identity == 72]
    assert sizes == [2938553163, 2936098225, 2936895527, 2940940004, 2927632784]
    assert [p.filename for p in DIGIFACE_PARTS.values() if p.images_per_identity == 5] == [
        "subjects_100000-133332_5_imgs.zip",
        "subjects_133333-166665_5_imgs.zip",
        "subjects_166666-199998_5_imgs.zip",
    ]
    assert all(p.size is None for p in DIGIFACE_PARTS.values() if p.images_per_identity == 5)
    assert digiface.DIGIFACE_BASE_URL == "https://facesyntheticspubwedata.z6.web.core.windows.net/wacv-2023/"
    with pytest.raises(TypeError):
        DIGIFACE_PARTS["x"] = DigiFacePart("x.zip", 1)  # type: ignore[index]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(DIGIFACE_PARTS)),
        (None, list(DIGIFACE_PARTS)),
        ("72", ["0-1999", "2000-3999", "4000-5999", "6000-7999", "8000-9999"]),
        ("5", ["100000-133332", "133333-166665", "166666-199998"]),
        ("72-4", ["8000-9999"]),
        ("5-0", ["100000-133332"]),
        ("2000-3999", ["2000-3999"]),
        ("subjects_6000-7999_72_imgs.zip", ["6000-7999"]),
        ("SUBJECTS_6000-7999_72_IMGS", ["6000-7999"]),
        ("5-2,72-0", ["0-1999", "166666-199998"]),
        (["72-1", "2000-3999 72-0"], ["0-1999", "2000-3999"]),
    ],
)
def test_resolve_parts(spec: object, expected: list[str]) -> None:
    assert resolve_parts(spec) == expected  # type: ignore[arg-type]


def test_unknown_part_lists_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(Digi2RealError) as err:
        download_digiface(tmp_path, ["72-9"], base_url="http://127.0.0.1:9/", progress=False)
    message = str(err.value)
    for name in ("all", "72", "5", "0-1999", "166666-199998", "72-0..72-4", "5-0..5-2"):
        assert name in message
    assert list(tmp_path.iterdir()) == []
