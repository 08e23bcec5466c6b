"""Atomic file writing, content hashing, and the rules that keep a user's files safe (DESIGN "Safety").

Every artifact is written under a temporary name in the destination directory and renamed into place, so a crash or
a kill never leaves a half-written file where a finished one is expected. The temporary name records the host and
process that writes it (``.<name>.~<host>~<pid>~<random>.tmp``), so the next run can remove what a killed process left
without touching the temporaries of a process still running (:func:`clean_temporaries`).

The safety rules every command follows live here too: an output never overlaps an input (:func:`check_apart`), a path
built from data stays inside its output folder (:func:`confine`), a state file we wrote is read back through a schema
(:func:`read_json`), and work two processes must not share is locked (:func:`exclusive_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from digi2real.errors import Digi2RealError


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0666 less the umask): temporary files start at 0600, and
    artifacts (datasets shared on a cluster, reports) must stay readable by others as usual."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
_TMP = re.compile(r"^\.(?P<name>.+)\.~(?P<host>[^~/]*)~(?P<pid>\d+)~[^~/]*\.tmp$")
#: tempfile's names before temporaries were tagged: ``.<name>.<8 characters>.tmp`` (or ``.partial``/``.old`` folders).
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(tmp|partial|old)$")
#: A temporary older than this whose writer cannot be checked (another host, or an older naming) is orphaned: our
#: writers finish a file in seconds and touch it while they write.
STALE_TEMPORARY_SECONDS = 3600.0


def temporary_prefix(name: str) -> str:
    """The start of a temporary name for the file ``name`` written by this process (see the module doc)."""
    return f".{name}.~{_HOST}~{os.getpid()}~"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_orphaned_temporary(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is one of our temporaries whose writer is gone: written on this host by a process that no
    longer exists, or (written on another host, or named by an earlier version: ``.<name>.<8 random>.tmp``) not
    modified for :data:`STALE_TEMPORARY_SECONDS`. A file that merely looks temporary (a user's ``.notes.tmp``) is
    never one."""
    match = _TMP.match(path.name)
    if match is None and not _LEGACY_TMP.match(path.name):
        return False
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if match and match["host"] == _HOST:
        return int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))
    return age > STALE_TEMPORARY_SECONDS


def clean_temporaries(folders: Iterable[str | os.PathLike[str]], recursive: bool = False) -> int:
    """Remove the temporaries that killed writers left in ``folders`` (never a running writer's); returns how many.
    Each stage calls this on its own output folders when it starts."""
    import shutil

    removed = 0
    now = time.time()
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        entries = folder.rglob(".*") if recursive else folder.glob(".*")
        for entry in list(entries):
            if entry.is_symlink() or not is_orphaned_temporary(entry, now):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for writers that want a file name; rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """A stable fingerprint of JSON-serialisable settings."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ safety rules


def _resolved(path: str | os.PathLike[str]) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError:  # Python < 3.13 raises it for a symbolic link loop
        raise Digi2RealError(f"{path}: a symbolic link loop; remove the link or give another path") from None


def check_apart(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], *,
                flag: str = "-o") -> None:
    """Refuse an output that is one of the inputs, lies inside one, or holds one (DESIGN "Safety": a command never
    writes into, or deletes, its own input or a folder holding it). Symbolic links are resolved first."""
    out = _resolved(output)
    for raw in inputs:
        if raw is None:
            continue
        src = _resolved(raw)
        if out == src:
            how = "is the input itself"
        elif out.is_relative_to(src):
            how = f"lies inside the input {raw}"
        elif src.is_relative_to(out):
            how = f"holds the input {raw}"
        else:
            continue
        raise Digi2RealError(f"{flag} {output}: the output {how}; a command never writes into or deletes its input: "
                             "choose an output folder outside it")


_BAD_PART = re.compile(r"[\x00-\x1f\\]")


def confine(root: str | os.PathLike[str], relative: str, what: str) -> Path:
    """``root / relative`` for a path built from data (an identity name, a manifest row), refused with one line
    unless it stays inside ``root``: no absolute path, no ``..``, no empty or control-character part, no backslash.
    ``what`` names where the value came from."""
    text = str(relative)
    parts = text.split("/")
    if (not text or text.startswith("/") or any(p in ("", ".", "..") for p in parts) or _BAD_PART.search(text)
            or len(text) > 1024):
        raise Digi2RealError(f"{what}: {text[:80]!r} is not a safe relative path (absolute, empty, '..', control "
                             "characters or backslashes); rename it")
    path = Path(root) / text
    if not _resolved(path).is_relative_to(_resolved(root)):
        raise Digi2RealError(f"{what}: {text[:80]!r} leads outside {root} through a symbolic link; remove the link")
    return path


def safe_name(name: str, what: str) -> str:
    """An identity name used as one folder name: one path part, checked as :func:`confine` does."""
    if "/" in str(name):
        raise Digi2RealError(f"{what}: identity name {str(name)[:80]!r} contains '/'; identity names are one folder "
                             "name each: rename it")
    confine(".", str(name), what)
    return str(name)


def read_json(path: str | os.PathLike[str], *, fix: str, keys: dict[str, type | tuple[type, ...]] | None = None,
              max_bytes: int = 64 << 20) -> dict:
    """Read a JSON state file written by us, with a one-line error naming it and ``fix`` when it is unreadable,
    not an object, or lacks one of ``keys`` with its type (``{"settings": dict}``)."""
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{path.stat().st_size} bytes, larger than any state file we write")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise Digi2RealError(f"{path}: not found; {fix}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Digi2RealError(f"{path}: corrupt ({str(exc)[:100]}); {fix}") from None
    if not isinstance(data, dict):
        raise Digi2RealError(f"{path}: corrupt (a JSON {type(data).__name__}, not an object); {fix}")
    for key, kind in (keys or {}).items():
        if not isinstance(data.get(key), kind):
            raise Digi2RealError(f"{path}: corrupt ({key!r} missing or of the wrong type); {fix}")
    return data


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], busy: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block; another holder -> one-line error
    ``busy``. The lock goes with the process, so a killed holder never leaves it stuck."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - closed below
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise Digi2RealError(f"{path.parent}: {busy}") from None
            raise
        yield
    finally:
        handle.close()
