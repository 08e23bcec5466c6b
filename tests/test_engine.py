"""The generation engine (issue 12, item 1): rendering overlaps the finishing of the batches before it, the queue of
rendered batches is bounded, retries are rendered once their batch is finished, a failure stops the run cleanly.

Each test drives :class:`~digi2real.generation.engine.Engine` with a fake renderer and finisher that only record
what happens and wait on events: nothing here measures time, and every wait has a timeout that fails the test
instead of hanging it.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from digi2real.generation.engine import Engine
from digi2real.generation.runner import FALLBACK_BATCH, resolve_batch, run_lines

WAIT = 20.0  # seconds before a wait that should end at once counts as a failure


def test_rendering_overlaps_the_finishing_of_the_batch_before():
    """The finisher holds batch 0 until the renderer has *started* batch 1: only an engine that renders while a
    batch is being finished gets past it (in line, batch 1 would never start and the wait would time out)."""
    started = {k: threading.Event() for k in range(3)}
    overlapped = []

    def render(k: int) -> int:
        started[k].set()
        return k

    def finish(k: int) -> None:
        if k + 1 in started:
            overlapped.append(started[k + 1].wait(WAIT))

    Engine(render, finish, workers=1, queue=1).run(range(3))
    assert overlapped == [True, True]


def test_workers_0_is_strictly_in_line():
    """``workers: 0``: each batch is finished before the next is rendered, its retries first (today's order)."""
    log: list[str] = []

    def render(task: tuple[int, int]) -> tuple[int, int]:
        log.append(f"render {task}")
        return task

    def finish(task: tuple[int, int]) -> tuple[int, int] | None:
        log.append(f"finish {task}")
        unit, attempt = task
        return (unit, attempt + 1) if unit == 0 and attempt < 2 else None  # unit 0 is retried twice

    Engine(render, finish, workers=0).run([(0, 0), (1, 0)])
    assert log == ["render (0, 0)", "finish (0, 0)", "render (0, 1)", "finish (0, 1)", "render (0, 2)",
                   "finish (0, 2)", "render (1, 0)", "finish (1, 0)"]


def test_the_queue_of_rendered_batches_is_bounded():
    """With the finisher stuck, the renderer stops after the worker's batch, ``queue`` waiting ones and the one it
    is handing over: memory stays flat whatever the number of batches."""
    release = threading.Event()
    rendered: list[int] = []

    def finish(k: int) -> None:
        assert release.wait(WAIT)

    engine = Engine(lambda k: rendered.append(k) or k, finish, workers=1, queue=2)
    runner = threading.Thread(target=engine.run, args=(range(20),))
    runner.start()
    deadline = time.monotonic() + WAIT
    while len(rendered) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # time enough for an unbounded queue to take many more
    assert len(rendered) == 4  # 1 held by the worker + 2 waiting + 1 being handed over
    release.set()
    runner.join(WAIT)
    assert not runner.is_alive() and rendered == list(range(20))


def test_a_retry_is_rendered_after_its_batch_is_finished_and_before_new_work():
    finished: list[tuple[int, int]] = []
    order: list[tuple[int, int]] = []

    def render(task: tuple[int, int]) -> tuple[int, int]:
        unit, attempt = task
        if attempt:
            assert (unit, attempt - 1) in finished  # its verdicts are known: the previous attempt was finished
        order.append(task)
        return task

    def finish(task: tuple[int, int]) -> tuple[int, int] | None:
        finished.append(task)
        return (task[0], 1) if task[1] == 0 and task[0] % 2 == 0 else None

    Engine(render, finish, workers=2, queue=1).run((u, 0) for u in range(8))
    assert sorted(order) == sorted([(u, 0) for u in range(8)] + [(u, 1) for u in range(0, 8, 2)])
    assert sorted(finished) == sorted(order)


def test_a_worker_exception_stops_the_run_and_is_raised_here():
    """The failing batch's exception reaches the caller; the renderer stops soon after (never the whole plan); the
    other worker finishes the batch it holds; every thread is gone afterwards."""
    rendered: list[int] = []
    finished: list[int] = []
    before = threading.active_count()

    def finish(k: int) -> None:
        if k == 3:
            raise OSError(28, "No space left on device")
        finished.append(k)

    with pytest.raises(OSError, match="No space left"):
        Engine(lambda k: rendered.append(k) or k, finish, workers=2, queue=1).run(range(100_000))
    assert 3 in rendered and len(rendered) < 100_000
    assert 3 not in finished and {0, 1, 2} <= set(finished)
    assert threading.active_count() == before


def test_ctrl_c_while_rendering_keeps_the_finished_batches():
    """An interrupt on the rendering thread: the batch a worker holds is finished (its images kept), the run stops
    with the interrupt, and no thread is left behind."""
    holding = threading.Event()
    finished: list[int] = []
    before = threading.active_count()

    def render(k: int) -> int:
        if k == 2:
            assert holding.wait(WAIT)
            raise KeyboardInterrupt
        return k

    def finish(k: int) -> None:
        if k == 1:
            holding.set()
            time.sleep(0.2)  # still finishing when the interrupt comes
        finished.append(k)

    with pytest.raises(KeyboardInterrupt):
        Engine(render, finish, workers=1, queue=1).run(range(10))
    assert finished == [0, 1]
    assert threading.active_count() == before


def test_workers_compute_with_the_callers_thread_count():
    """A new thread starts with torch's process-wide count, which MTCNN's CPU tasks set to 1; the CPU detector
    splits its work by its caller's count and rounds differently with another split, so each worker must use the
    count of the thread that runs the engine."""
    seen: list[int] = []
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        done = threading.Event()

        def pollute() -> None:  # what an MTCNN task does on its own thread
            torch.set_num_threads(1)
            done.set()

        threading.Thread(target=pollute).start()
        assert done.wait(WAIT)
        Engine(lambda k: k, lambda k: seen.append(torch.get_num_threads()), workers=2, queue=1).run(range(4))
    finally:
        torch.set_num_threads(old)
    assert seen == [2, 2, 2, 2]


def test_each_worker_runs_on_its_own_cuda_stream(monkeypatch):
    """On CUDA (simulated: this machine has none) every worker makes one stream on the detector's device and finishes
    all its batches with it current, synchronising it before the renderer hears of a batch."""
    made: list[SimpleNamespace] = []
    current = threading.local()

    class FakeStream(SimpleNamespace):
        def __init__(self, device: torch.device) -> None:
            super().__init__(device=device, synced=0, thread=threading.get_ident())
            made.append(self)

        def synchronize(self) -> None:
            self.synced += 1

    class FakeContext:
        def __init__(self, stream: FakeStream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            current.stream = self.stream

        def __exit__(self, *exc: object) -> None:
            current.stream = None

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", FakeContext)
    used: list[tuple[int, FakeStream]] = []

    def finish(k: int) -> None:
        used.append((threading.get_ident(), current.stream))

    Engine(lambda k: k, finish, workers=2, queue=1, stream_device=torch.device("cuda:1")).run(range(12))
    assert len(made) == 2 and all(s.device == torch.device("cuda:1") for s in made)
    assert all(stream is not None and stream.thread == thread for thread, stream in used)
    assert sum(s.synced for s in made) == 12


def test_the_batch_size_auto_resolution():
    """``batch_size: auto``: the model's choice from its free memory (Arc2Face.auto_batch_size); without a model or
    with one that cannot say, the fallback; a number set by hand stays."""
    from digi2real.config import GenerateConfig

    model = SimpleNamespace(auto_batch_size=lambda size, guidance: 24 if (size, guidance) == (512, 3.0) else 1)
    assert resolve_batch(model, GenerateConfig()) == (24, "auto")
    assert resolve_batch(SimpleNamespace(), GenerateConfig()) == (FALLBACK_BATCH, "fallback")
    assert resolve_batch(None, GenerateConfig()) == (FALLBACK_BATCH, "fallback")
    assert resolve_batch(model, GenerateConfig(batch_size=6)) == (6, "set")


def test_the_summary_warns_when_the_identity_check_ran_on_the_cpu_of_a_gpu_run():
    run = {"models": {"arc2face": "cuda:0 (NVIDIA H200), float16", "arcface": "onnxruntime CPUExecutionProvider",
                      "mtcnn": "torch cuda:0"}, "engine": {"workers": 2}, "batch": 32, "batch_source": "auto"}
    lines = run_lines(run)
    assert "Arc2Face cuda:0 (NVIDIA H200), float16" in lines[0] and "batch 32 (auto)" in lines[0]
    assert lines[1].startswith("warning: Arc2Face ran on the GPU but the identity check on the CPU")
    run["models"]["arcface"] = "onnxruntime CUDAExecutionProvider (cuda:0)"
    assert len(run_lines(run)) == 1


def test_a_worker_that_cannot_start_stops_the_run(monkeypatch):
    """A worker failing before its first batch (here: its CUDA stream cannot be made) is raised too, instead of
    leaving the renderer waiting for a queue nobody empties."""
    def no_stream(device: torch.device) -> None:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch.cuda, "Stream", no_stream)
    with pytest.raises(RuntimeError, match="CUDA error: out of memory"):
        Engine(lambda k: k, lambda k: None, workers=2, queue=1, stream_device=torch.device("cuda")).run(range(50))
