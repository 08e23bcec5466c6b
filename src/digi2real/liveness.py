"""The processes of one multi-process launch of `digi2real run` (torchrun, srun): signs of life and bounded waits.

Rank 0 runs the single-process stages while the others wait for its records in ``pipeline.json``, and it waits for
their shards of the generated images. A process that never started or died must not leave the others waiting forever,
printing nothing; nor may a timeout end a healthy run in the middle of a long stage (under torchrun one process
failing stops them all). So every process that others wait for writes a *heartbeat*, a small JSON file rewritten every
:data:`HEARTBEAT_SECONDS` with its session and a counter, and a last record when it exits (with its error, if any).
A waiting process gives up when the awaited one does not appear within ``start_timeout``, shows no sign of life for
``wait_timeout``, or exits without doing what was awaited; each with a one-line error naming the state file and what
was awaited. Staleness is judged by when the content last *changed* on this process's clock, so clocks that differ
between hosts do not matter.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from digi2real.errors import Digi2RealError
from digi2real.fileio import write_json

#: Seconds between two heartbeats of a process.
HEARTBEAT_SECONDS = 30.0
#: How often a waiting process looks at the files it waits on.
POLL_SECONDS = 1.0
#: Default of ``--start-timeout``: rank 0 writes its first heartbeat once its preflight passed (seconds, or a minute or
#: two when it counts a DigiFace tree on a network file system).
START_TIMEOUT = 600.0
#: Default of ``--wait-timeout``: silence, not the length of a stage. A live process beats every 30 s whatever it does,
#: so half an hour without one means it is gone (or stopped); a stage may take days.
WAIT_TIMEOUT = 1800.0
#: A waiting process repeats what it waits for this often, so a log shows it is waiting, not hung.
REMIND_SECONDS = 600.0
START_ENV, WAIT_ENV = "DIGI2REAL_START_TIMEOUT", "DIGI2REAL_WAIT_TIMEOUT"

T = TypeVar("T")


def timeout_from_env(name: str, default: float) -> float:
    """A timeout from the environment (the same for every process of a launch, where flags may differ), else the
    default; a value that is not a positive number of seconds is refused in one line."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise Digi2RealError(f"environment {name}={raw!r}: expected a positive number of seconds, e.g. {default:.0f}")
    return value


class Heartbeat:
    """This process's sign of life for the others of its launch, as a context manager: ``path`` is written at once,
    then every :data:`HEARTBEAT_SECONDS` by a daemon thread, and a last time on exit (``state: exited`` and the error
    that ended the block, if any)."""

    def __init__(self, path: Path, session: str, rank: int, interval: float | None = None) -> None:
        self.path, self.session, self.rank = Path(path), session, rank
        self.interval = HEARTBEAT_SECONDS if interval is None else interval
        self._stop = threading.Event()
        self._beat = 0
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-rank-{rank}", daemon=True)

    def _write(self, state: str, error: str | None = None) -> None:
        write_json(self.path, {"session": self.session, "rank": self.rank, "beat": self._beat, "state": state,
                               "error": error, "host": socket.gethostname(), "pid": os.getpid(),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat += 1
            try:
                self._write("running")
            except OSError:  # a full or flaky disk: the next beat tries again; the stage itself will report it
                pass

    def __enter__(self) -> "Heartbeat":
        self._write("running")
        self._thread.start()
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._beat += 1
        error = None if exc is None else (" ".join(str(exc).split())[:300] or type(exc).__name__)
        try:
            self._write("exited", error)
        except OSError:
            pass


def _read(path: Path) -> dict | None:
    """A heartbeat as written (atomically, so never half); None when absent or unreadable (retried next poll)."""
    import json

    try:
        data = json.loads(path.read_bytes()[: 1 << 16])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Watch:
    """What this process has seen of another's heartbeat in this launch (``session``): whether it started (its
    heartbeat changed while watched, or it already exited in this launch), when its content last changed (this
    process's monotonic clock), and its exit record."""

    path: Path
    session: str
    started: bool = False
    exited: dict | None = None
    _last: tuple | None = None
    _changed: float | None = None

    def poll(self) -> None:
        data = _read(self.path)
        if data is None or data.get("session") != self.session:
            return  # not written yet, or an earlier launch's
        key = (data.get("beat"), data.get("state"), data.get("pid"), data.get("host"))
        now = time.monotonic()
        if data.get("state") == "exited":
            self.exited, self.started = data, True
        elif self._last is not None and key != self._last:
            self.started = True
        elif self._last is None and data.get("beat") == 0:
            self.started = True  # its very first beat: a stale file of this session would have beaten since
        if key != self._last:
            self._last, self._changed = key, now

    def silent_for(self) -> float:
        return 0.0 if self._changed is None else time.monotonic() - self._changed


@dataclass
class Waiter:
    """Bounded waits of this process (``me``) on others through their heartbeats (``watches``: who, e.g. "rank 0",
    -> :class:`Watch`); errors name ``state_file``, the file whose records are awaited."""

    watches: dict[str, Watch]
    me: str
    state_file: Path
    start_timeout: float
    wait_timeout: float
    say: Callable[[str], None]

    def until(self, ready: Callable[[], T | None], awaited: str, poll: float | None = None) -> T:
        """Poll ``ready()`` until it returns something (returned), or give up with a one-line error."""
        begin = time.monotonic()
        remind = 0.0
        while True:
            got = ready()
            if got:
                return got
            for who, watch in self.watches.items():
                watch.poll()
                self._check(who, watch, begin, awaited)
            exited = [(who, w.exited) for who, w in self.watches.items() if w.exited is not None]
            if exited:
                got = ready()  # what was awaited may have been written just before the other process exited
                if got:
                    return got
                who, record = exited[0]
                raise Digi2RealError(f"{self.state_file}: {who} exited ({record.get('error') or 'without an error'})"
                                     f" before {awaited}; see its output, then run the same command again")
            now = time.monotonic()
            if now >= remind:
                self.say(f"[{self.me}] waiting for {awaited} ({self.state_file}; {self._limits()})")
                remind = now + REMIND_SECONDS
            time.sleep(POLL_SECONDS if poll is None else poll)

    def _limits(self) -> str:
        waiting = [who for who, w in self.watches.items() if not w.started]
        if waiting:
            return f"gives up if {', '.join(waiting)} does not start within {self.start_timeout:.0f} s"
        return f"gives up after {self.wait_timeout:.0f} s without a sign of life from {', '.join(self.watches)}"

    def _check(self, who: str, watch: Watch, begin: float, awaited: str) -> None:
        if not watch.started and time.monotonic() - begin > self.start_timeout:
            raise Digi2RealError(
                f"{self.state_file}: {who} of this launch did not start within {self.start_timeout:.0f} s (no live "
                f"heartbeat in {watch.path}) while {self.me} waited for {awaited}; start every process of the launch "
                "together (torchrun, srun), or raise --start-timeout")
        if watch.started and watch.exited is None and watch.silent_for() > self.wait_timeout:
            raise Digi2RealError(
                f"{self.state_file}: {who} gave no sign of life for {self.wait_timeout:.0f} s ({watch.path} unchanged)"
                f" while {self.me} waited for {awaited}; it was probably killed: see its output, then run the same "
                "command again (raise --wait-timeout if it is only slow)")
