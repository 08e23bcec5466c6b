"""The shared safety rules (digi2real.fileio): temporaries of dead writers only, outputs apart from inputs, paths
built from data confined, state files through a schema, locks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from digi2real.errors import Digi2RealError
from digi2real.fileio import (
    STALE_TEMPORARY_SECONDS,
    atomic_open,
    check_apart,
    clean_temporaries,
    confine,
    exclusive_lock,
    read_json,
    safe_name,
    temporary_prefix,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _aged(path, seconds: float):
    old = time.time() - seconds
    os.utime(path, (old, old))
    return path


def test_only_temporaries_of_dead_or_long_gone_writers_are_removed(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = temporary_prefix("x").split("~")[1]
        dead = tmp_path / f".card.md.~{host}~{_dead_pid()}~abc.tmp"
        alive = tmp_path / f".card.md.~{host}~{live.pid}~abc.tmp"
        mine = tmp_path / f"{temporary_prefix('card.md')}abc.tmp"
        other_host_young = tmp_path / ".card.md.~elsewhere~123~abc.tmp"
        other_host_old = tmp_path / ".plan.parquet.~elsewhere~123~abc.tmp"
        legacy_old = tmp_path / ".generation.json.k2j3h4g5.tmp"
        users = [tmp_path / ".notes.tmp", tmp_path / "data.tmp", tmp_path / ".cache.partial"]
        for path in (dead, alive, mine, other_host_young, legacy_old, *users):
            path.write_text("x")
        for path in (legacy_old, *users):
            _aged(path, STALE_TEMPORARY_SECONDS + 60)
        other_host_old.write_text("x")
        _aged(other_host_old, STALE_TEMPORARY_SECONDS + 60)
        assert clean_temporaries([tmp_path]) == 3
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {alive.name, mine.name, other_host_young.name, *(u.name for u in users)}
    finally:
        live.kill()
        live.wait()


def test_atomic_writes_are_tagged_and_leave_nothing(tmp_path):
    with atomic_open(tmp_path / "a.json", "w") as handle:
        assert [p.name.startswith(temporary_prefix("a.json")) for p in tmp_path.iterdir()] == [True]
        handle.write("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("output, how", [("in", "is the input itself"), ("in/sub", "lies inside"), (".", "holds")])
def test_outputs_never_overlap_inputs(tmp_path, output, how):
    (tmp_path / "in").mkdir()
    with pytest.raises(Digi2RealError, match=how):
        check_apart(tmp_path / output, [tmp_path / "in"])
    check_apart(tmp_path / "out", [tmp_path / "in", None])
    (tmp_path / "link").symlink_to(tmp_path / "in")
    with pytest.raises(Digi2RealError, match="is the input itself"):
        check_apart(tmp_path / "link", [tmp_path / "in"])


def test_a_link_loop_is_one_line(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(Digi2RealError, match="symbolic link loop"):
        check_apart(tmp_path / "a", [tmp_path / "in"])


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "", "a//b", "a\\b", "a\nb", ".", "x/.."])
def test_paths_from_data_stay_inside(tmp_path, bad):
    with pytest.raises(Digi2RealError, match="index.parquet"):
        confine(tmp_path, bad, "index.parquet")


def test_confine_follows_links_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "escape").symlink_to(tmp_path)
    with pytest.raises(Digi2RealError, match="symbolic link"):
        confine(tmp_path / "out", "escape/x.png", "manifest")
    assert confine(tmp_path / "out", "id 7/0.png", "manifest") == tmp_path / "out" / "id 7" / "0.png"
    with pytest.raises(Digi2RealError, match="contains '/'"):
        safe_name("a/b", "plan")
    assert safe_name("-ünïcode name", "plan") == "-ünïcode name"


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[1]", b"{", b'{"settings": 3}'])
def test_state_files_are_read_through_a_schema(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(Digi2RealError, match="state.json: corrupt.*restore it"):
        read_json(path, fix="restore it", keys={"settings": dict})
    path.write_text('{"settings": {"a": 1}}')
    assert read_json(path, fix="restore it", keys={"settings": dict}) == {"settings": {"a": 1}}


def test_a_lock_is_refused_while_held_and_free_after(tmp_path):
    with exclusive_lock(tmp_path / ".lock", "another process works here"):
        code = ("import sys; from digi2real.fileio import exclusive_lock\n"
                "try:\n  with exclusive_lock(sys.argv[1], 'busy'): print('got it')\n"
                "except Exception as e: print(e)")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / ".lock")], capture_output=True, text=True)
        assert "busy" in out.stdout
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / ".lock")], capture_output=True, text=True)
    assert "got it" in out.stdout
