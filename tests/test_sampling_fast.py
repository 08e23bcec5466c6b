"""Fast sampling (issue 12, item 2): what ``Arc2Face.optimize``, ``auto_batch_size`` and ``where`` do on the CPU, and
on a stand-in for CUDA (``arc2face._accelerated`` replaced) with ``torch.compile`` succeeding or failing in each way it
can. The images are always compared with the eager CPU path bit for bit."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from digi2real.errors import ConfigError
from digi2real.generation import arc2face
from digi2real.generation.arc2face import Arc2Face, batch_for_memory, per_image_bytes

STEPS, SIZE, BATCH = 2, 64, 3
SEEDS = [101, 102, 103]
REAL_COMPILE = torch.compile
MiB, GiB = 2**20, 2**30


def _embeddings(n: int) -> np.ndarray:
    e = np.random.default_rng(7).normal(size=(n, 512)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _images(model: Arc2Face, n: int = BATCH) -> np.ndarray:
    return model.generate(_embeddings(n), SEEDS[:n], steps=STEPS, size=SIZE)


@pytest.fixture(scope="module")
def eager(mini_generator) -> dict[int, np.ndarray]:
    """The eager CPU images of a full unit (3) and of a smaller one (2): what every path must reproduce."""
    mini_generator.optimize(compile=False, channels_last=False, batch=BATCH, size=SIZE, steps=STEPS)
    return {n: _images(mini_generator, n) for n in (BATCH, 2)}


@pytest.fixture
def fresh(mini_arc2face) -> Iterator[Arc2Face]:
    """A model of its own: the fake-CUDA tests compile it, which must not leak into the shared fixture."""
    repo, base = mini_arc2face
    yield Arc2Face.from_pretrained(repo, base, device="cpu", dtype="float32")
    torch._dynamo.reset()  # what dynamo traced for this model goes with it


@pytest.fixture
def fake_cuda(monkeypatch) -> None:
    """Run the CUDA branch of optimize/auto_batch_size on the CPU model (memory figures are faked per test)."""
    monkeypatch.setattr(arc2face, "_accelerated", lambda device: True)


def _optimize(model: Arc2Face, compile_choice, **kw) -> dict:
    return model.optimize(compile=compile_choice, channels_last=kw.pop("channels_last", False), batch=BATCH,
                          size=SIZE, steps=STEPS, **kw)


def _our_warnings(seen: list) -> list[str]:
    return [str(w.message) for w in seen if "generate.compile" in str(w.message)]


# ----------------------------------------------------------------------------------------------------------- the CPU


def test_optimize_on_the_cpu_applies_nothing(mini_generator, eager):
    for choice in (True, "auto"):
        record = mini_generator.optimize(compile=choice, channels_last=choice, batch=BATCH, size=SIZE, steps=STEPS)
        assert record["compile"] == "off (cpu)" and record["channels_last"] is False
        assert record["compiled_batch"] is None and record["warmup_s"] == 0.0
        assert record["where"] == mini_generator.where == "cpu, float32"
        assert np.array_equal(_images(mini_generator), eager[BATCH])
    assert all(p.is_contiguous() for p in [*mini_generator.unet.parameters(), *mini_generator.vae.parameters()])
    assert mini_generator.optimize(compile=False, channels_last=False)["compile"] == "off (not requested)"


def test_where_names_the_precision(mini_arc2face):
    repo, base = mini_arc2face
    assert Arc2Face.from_pretrained(repo, base, device="cpu", dtype="bf16").where == "cpu, bfloat16"


def test_settings_other_than_true_false_auto_are_refused(mini_generator):
    with pytest.raises(ConfigError, match=r"^generate.compile 'yes': not a choice; use true, false or auto$"):
        mini_generator.optimize(compile="yes")
    with pytest.raises(ConfigError, match=r"^generate.channels_last 1: not a choice"):
        mini_generator.optimize(channels_last=1)


def test_auto_batch_size_on_the_cpu_is_eight(mini_generator, monkeypatch):
    def no_cuda(*args):
        raise AssertionError("the CPU path must not ask CUDA for its memory")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    for size in (64, 512, 1024):
        for guidance in (1.0, 3.0):
            assert mini_generator.auto_batch_size(size, guidance) == 8


# ------------------------------------------------------------------------------------------- batch size from memory


def test_per_image_memory_follows_the_documented_figures():
    """VAE decode 768 elements per pixel, UNet 131 per pixel and row: at 512 px in float16 384 MiB per image; the
    decode is the larger phase, so guidance (two UNet rows) does not change it."""
    assert per_image_bytes(512, 3.0, torch.float16) == 384 * MiB
    assert per_image_bytes(512, 1.0, torch.float16) == 384 * MiB
    assert per_image_bytes(512, 3.0, torch.bfloat16) == 384 * MiB
    assert per_image_bytes(512, 3.0, torch.float32) == 768 * MiB
    assert per_image_bytes(256, 3.0, torch.float16) == 96 * MiB


@pytest.mark.parametrize(("free", "size", "dtype", "guidance", "want"), [
    (141 * GiB, 512, torch.float16, 3.0, 64),   # an H200: 0.6 x 141 GiB holds 225 images; capped
    (10 * GiB, 512, torch.float16, 3.0, 16),    # 6 GiB / 384 MiB = 16 exactly
    (10 * GiB, 512, torch.float16, 1.0, 16),    # guidance does not change it (the decode is the peak)
    (10 * GiB - 1, 512, torch.float16, 3.0, 8),  # one byte less: 15.99 images -> the power of two below
    (10 * GiB, 512, torch.bfloat16, 3.0, 16),
    (10 * GiB, 512, torch.float32, 3.0, 8),     # twice the bytes per element
    (10 * GiB, 256, torch.float16, 3.0, 64),    # a quarter of the pixels: 64 images
    (2 * GiB, 256, torch.float16, 3.0, 8),      # 1.2 GiB / 96 MiB = 12.8 -> 8
    (20 * GiB, 1024, torch.float16, 3.0, 8),    # 12 GiB / 1.5 GiB = 8
    (100 * MiB, 512, torch.float16, 3.0, 1),    # not even one fits: 1 (the runner's halving is the net)
])
def test_auto_batch_size_from_free_memory(mini_generator, fake_cuda, monkeypatch, free, size, dtype, guidance, want):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (free, 141 * GiB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = dataclasses.replace(mini_generator, dtype=dtype)  # only the precision matters to the memory model
    assert model.auto_batch_size(size, guidance) == want
    assert asked == [model.device]
    assert batch_for_memory(free, size, guidance, dtype) == want


# ----------------------------------------------------------------------------------------- compile on a fake CUDA


def _eager_backend(calls: list[int]):
    """torch.compile through dynamo with the eager backend (real graph capture, no C++/triton compiler), counting the
    UNet rows of every call of the compiled module."""

    def compile_(model, **kwargs):
        compiled = REAL_COMPILE(model, backend="eager", dynamic=False)

        def call(sample, *args, **kw):
            calls.append(sample.shape[0])
            return compiled(sample, *args, **kw)

        return call

    return compile_


def test_compiled_unet_serves_its_batch_only_and_keeps_the_pixels(fresh, fake_cuda, eager, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(torch, "compile", _eager_backend(calls))
    record = _optimize(fresh, True)
    assert record["compile"].startswith("on (inductor, batch 3: 6 UNet rows")
    assert record["compiled_batch"] == BATCH and record["warmup"] == "done" and record["warmup_s"] > 0
    assert fresh.where == record["where"] == "cpu, float32, compiled (batch 3)"
    warm = len(calls)
    assert warm == 3 and set(calls) == {2 * BATCH}  # two warm-up steps and the check against eager
    assert np.array_equal(_images(fresh), eager[BATCH])
    assert calls[warm:] == [2 * BATCH] * STEPS
    assert np.array_equal(_images(fresh, 2), eager[2])  # another batch size: eager, no recompilation
    assert len(calls) == warm + STEPS
    assert _optimize(fresh, False)["compile"] == "off (not requested)" and fresh.where == "cpu, float32"


def test_compile_that_raises_falls_back_to_eager_with_one_warning(fresh, fake_cuda, eager, monkeypatch):
    def refuse(model, **kwargs):
        raise RuntimeError("Cannot find a working triton installation.\nMore details follow")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(UserWarning) as seen:
        record = _optimize(fresh, True)
    assert _our_warnings(seen) == ["generate.compile: torch.compile failed: RuntimeError: Cannot find a working "
                                   "triton installation.; the UNet runs eager"]
    assert record["compile"].startswith("off (fallback: torch.compile failed: RuntimeError: Cannot find")
    assert record["compiled_batch"] is None and record["warmup"] == "done"
    assert "compiled" not in fresh.where
    assert np.array_equal(_images(fresh), eager[BATCH])


def test_compile_failing_at_warm_up_under_auto_is_silent_and_recorded(fresh, fake_cuda, eager, monkeypatch):
    def lazy(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("C++ compile error\n  in kernel 12")

        return call

    monkeypatch.setattr(torch, "compile", lazy)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        record = _optimize(fresh, "auto")
    assert _our_warnings(seen) == []
    assert record["compile"] == ("off (fallback: the compiled UNet failed its warm-up: RuntimeError: C++ compile "
                                 "error)")
    assert np.array_equal(_images(fresh), eager[BATCH])


def test_compiled_unet_that_disagrees_with_eager_is_not_used(fresh, fake_cuda, eager, monkeypatch):
    def wrong(model, **kwargs):
        def call(*args, **kw):
            out = model(*args, **kw)
            return type(out)(sample=out.sample * 1.5)

        return call

    monkeypatch.setattr(torch, "compile", wrong)
    record = _optimize(fresh, "auto")
    assert record["compile"].startswith("off (fallback: the compiled UNet differs from eager by ")
    assert np.array_equal(_images(fresh), eager[BATCH])


def _failing_after(warm_calls: int, error: Exception):
    """A compiled UNet that passes the warm-up and its check, then raises ``error``."""

    def compile_(model, **kwargs):
        seen = []

        def call(*args, **kw):
            seen.append(1)
            if len(seen) > warm_calls:
                raise error
            return model(*args, **kw)

        return call

    return compile_


def test_compiled_unet_failing_during_the_run_falls_back_and_says_so(fresh, fake_cuda, eager, monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_after(3, RuntimeError("recompilation failed")))
    record = _optimize(fresh, "auto")
    assert record["compile"].startswith("on ")
    with pytest.warns(UserWarning) as seen:
        images = _images(fresh)
    assert _our_warnings(seen) == ["generate.compile: the compiled UNet failed during the run at batch 3: "
                                   "RuntimeError: recompilation failed; images from here on are rendered eager"]
    assert np.array_equal(images, eager[BATCH])
    assert record is fresh.optimization and record["compile"].startswith("off (fallback: the compiled UNet failed "
                                                                         "during the run")
    assert "compiled" not in fresh.where


def test_out_of_memory_in_the_compiled_unet_reaches_the_runner(fresh, fake_cuda, eager, monkeypatch):
    """Out of memory is the batch's fault, not the compiler's: it propagates so the runner halves the unit, and the
    halves (another batch size) run eager."""
    monkeypatch.setattr(torch, "compile", _failing_after(3, torch.cuda.OutOfMemoryError("CUDA out of memory.")))
    _optimize(fresh, True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _images(fresh)
    assert fresh.where.endswith("compiled (batch 3)")
    assert np.array_equal(_images(fresh, 2), eager[2])


def test_out_of_memory_in_the_warm_up_is_recorded_not_raised(fresh, fake_cuda, monkeypatch):
    def oom(latents):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(fresh, "decode", oom)
    record = _optimize(fresh, False)
    assert record["warmup"] == "out of memory at batch 3 (the runner halves it)"
    monkeypatch.setattr(torch, "compile", _eager_backend([]))
    record = _optimize(fresh, "auto")
    assert record["compile"].startswith("off (fallback: the compiled UNet failed its warm-up: OutOfMemoryError")
    assert record["warmup"].startswith("out of memory")


def test_channels_last_on_a_fake_cuda(mini_arc2face):
    """In a subprocess: channels_last convolutions are not run on the CPU in the main test process (see the training
    loop's CPU crash). The UNet and VAE weights change layout, the images stay finite, and false turns it back."""
    repo, base = mini_arc2face
    code = (
        "import sys, numpy as np, torch\n"
        "from digi2real.generation import arc2face\n"
        "arc2face._accelerated = lambda device: True\n"
        "m = arc2face.Arc2Face.from_pretrained(sys.argv[1], sys.argv[2], device='cpu')\n"
        "r = m.optimize(compile=False, channels_last='auto', batch=2, size=64, steps=1)\n"
        "cl = torch.channels_last\n"
        "print(r['channels_last'], m.unet.conv_in.weight.is_contiguous(memory_format=cl),\n"
        "      m.vae.decoder.conv_in.weight.is_contiguous(memory_format=cl), m.where.endswith('channels_last'))\n"
        "img = m.generate(np.eye(2, 512, dtype=np.float32), [1, 2], steps=1, size=64)\n"
        "print(img.shape == (2, 64, 64, 3), bool((img.std(axis=(1, 2, 3)) > 0).all()))\n"
        "r = m.optimize(compile=False, channels_last=False, batch=2, size=64, steps=1)\n"
        "print(r['channels_last'], m.unet.conv_in.weight.is_contiguous(), m.where)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(repo), str(base)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["True True True True", "True True", "False True cpu, float32"]
