"""The generation engine: the accelerator renders batch after batch while worker threads finish the batches before
(issue 12, item 1: "the UNet/VAE work never waits for CPU work").

Rendering (encode, denoise, decode) runs on the calling thread. Each rendered batch goes through a bounded queue to
one of ``workers`` threads, which *finishes* it: detection, alignment, the identity check, image encoding, file
writes and manifest rows (the runner's ``finish``). Finishing a batch may ask for another one (a retry of the images
it rejected); that batch is rendered next, ahead of new work. With ``workers=0`` every batch is finished in line
right after it is rendered, one after the other.

Why this cannot change an image: what a batch holds (its rows and seeds) is fixed before it is rendered (runner
module doc), so the order in which batches are rendered, and which thread finishes them, changes only *when* an
image appears, never its pixels.

Memory stays flat on a run of any length: at most ``queue`` rendered batches wait, each worker holds one, and the
renderer holds the one it is handing over, so at most ``workers + queue + 2`` batches (with the one being rendered)
exist at a time.

Stopping: an exception in a worker stops the run: the renderer stops, the other workers finish the batch they hold,
and the exception is raised on the calling thread (the CLI turns it into its usual one line). Ctrl-C (or any
exception while rendering) does the same. Batches rendered but not finished are dropped; the runner's resume
recomputes their work units, since every image is written before its manifest row.

On CUDA each worker runs its batches on its own stream (``torch.cuda.Stream``), so the detector's and encoder's
kernels do not queue behind the UNet's on the default stream. On a machine without a GPU the renderer already uses
every core, and the workers compete with it rather than fill idle time (measured on a 2-core machine with the
miniature models: 1.35x the in-line wall time); ``workers: 0`` suits CPU-only runs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

Task = TypeVar("Task")
Batch = TypeVar("Batch")

#: Seconds a blocked thread waits before it looks again for a stop or a failure (bounds the reaction time only).
POLL_SECONDS = 0.05


@dataclass
class Engine(Generic[Task, Batch]):
    """Run ``tasks``: ``render(task)`` on the calling thread, ``finish(batch)`` on ``workers`` threads (``finish``
    returns the next task of the same work, a retry, or None). ``stream_device``: a CUDA device gives each worker its
    own stream on it."""

    render: Callable[[Task], Batch]
    finish: Callable[[Batch], Task | None]
    workers: int = 2
    queue: int = 2
    stream_device: torch.device | None = None

    def run(self, tasks: Iterable[Task]) -> None:
        if self.workers <= 0:
            self._in_line(tasks)
        else:
            _Run(self).go(iter(tasks))

    def _in_line(self, tasks: Iterable[Task]) -> None:
        """Today's order: a unit's attempts one after the other, then the next unit."""
        for first in tasks:
            task: Task | None = first
            while task is not None:
                task = self.finish(self.render(task))

    @contextlib.contextmanager
    def worker_stream(self) -> Iterator[Any]:
        """This worker thread's CUDA stream, current for the block (None off CUDA)."""
        device = self.stream_device
        if device is None or device.type != "cuda":
            yield None
            return
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(stream):
            yield stream


class _Run(Generic[Task, Batch]):
    """One threaded run: the renderer's loop (the calling thread) and the workers' loops."""

    def __init__(self, engine: Engine[Task, Batch]) -> None:
        self.engine = engine
        self.waiting: queue.Queue[Batch] = queue.Queue(maxsize=max(1, engine.queue))
        self.results: queue.Queue[tuple[Task | None, BaseException | None]] = queue.Queue()
        self.stop = threading.Event()
        self.failed: BaseException | None = None
        self.retries: deque[Task] = deque()
        self.outstanding = 0  # batches handed to the workers and not finished yet
        # Each worker computes with the calling thread's intra-op thread count, as in line: the CPU detector splits
        # its work by the count of the thread that calls it, and another split rounds differently (measured: MTCNN
        # landmarks 2e-5 px apart, enough to change a crop's bytes). See work().
        self.threads = torch.get_num_threads()
        self.ready = threading.Barrier(engine.workers + 1)

    def go(self, tasks: Iterator[Task]) -> None:
        threads = [threading.Thread(target=self.work, name=f"digi2real-generate-{i}", daemon=True)
                   for i in range(self.engine.workers)]
        for thread in threads:
            thread.start()
        try:
            self.ready.wait()  # every worker has its thread count before any batch exists (see work())
            self.render_all(tasks)
        finally:
            # Normal end: the workers are idle. Otherwise they finish the batch they hold (its images and rows are
            # kept) and take no other.
            self.stop.set()
            for thread in threads:
                thread.join()

    def render_all(self, tasks: Iterator[Task]) -> None:
        exhausted = False
        while True:
            self.collect(block=False)
            task = self.retries.popleft() if self.retries else None
            if task is None and not exhausted:
                task = next(tasks, None)
                exhausted = task is None
            if task is not None:
                self.hand_over(self.engine.render(task))
            elif self.outstanding:
                self.collect(block=True)
            else:
                return

    def hand_over(self, batch: Batch) -> None:
        """Queue a rendered batch, waiting while ``queue`` batches already wait (a failed worker stops the wait)."""
        while True:
            self.raise_failure()
            try:
                self.waiting.put(batch, timeout=POLL_SECONDS)
            except queue.Full:
                continue
            self.outstanding += 1
            return

    def collect(self, block: bool) -> None:
        """Take the workers' finished batches: queue their retries, raise their failure."""
        while True:
            try:
                task, error = self.results.get(timeout=POLL_SECONDS) if block else self.results.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return
            self.outstanding -= 1
            if error is not None:
                raise error
            if task is not None:
                self.retries.append(task)
            block = False

    def raise_failure(self) -> None:
        if self.failed is not None:
            raise self.failed

    def work(self) -> None:
        try:
            try:
                # torch sets a thread's count lazily, at its first parallel call, from the process-wide value (which
                # the CPU detector's own threads set to 1): trigger that first, then set this thread's own count.
                torch.get_num_threads()
                torch.set_num_threads(self.threads)
            finally:
                self.ready.wait()
            with self.engine.worker_stream() as stream:
                self.finish_batches(stream)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which raises it
            if self.failed is None:
                self.failed = exc
            self.results.put((None, exc))

    def finish_batches(self, stream: Any) -> None:
        while not self.stop.is_set():
            try:
                batch = self.waiting.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            task = self.engine.finish(batch)
            if stream is not None:
                stream.synchronize()  # this batch's kernels are done before the renderer hears of it
            self.results.put((task, None))
