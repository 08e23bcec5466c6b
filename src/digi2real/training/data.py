"""Training input pipeline: augmentation, the input normalisation, a resumable sharded sampler and the DataLoader.

The Digi2Real paper (section 4) trains IResNet50 + AdaFace with the usual insightface recipe; FACTS 6 records its input:
aligned 112 x 112 RGB, horizontal flip, and ``(x / 255 - 0.5) / 0.5`` normalisation (= ``(x - 127.5) / 127.5``).

Reproducibility design (why the sampler yields keys rather than bare indices):

* The order of an epoch is a permutation drawn from ``(seed, epoch)`` only, so a resumed run recomputes it exactly and
  starts at the saved position: it sees exactly the remaining samples in the same order.
* Each sample's augmentation is drawn from ``(seed, epoch, position in the epoch)``, carried in the key the sampler
  yields. It therefore depends neither on which worker decodes the sample nor on how many workers there are.
* Under DDP the global batch ``b`` of an epoch is ``perm[b * G:(b + 1) * G]`` and rank ``r`` takes its ``r``-th slice of
  ``G / world`` samples, so the union over ranks is the same global batch a single process would see.

Training reads one DataLoader for the whole call (:func:`make_run_loader` over a :class:`RunSampler`): its workers
start once and keep decoding across epoch boundaries, so the first batch of an epoch is ready when the last of the one
before is consumed. Building a DataLoader per epoch cost about 8 s at every epoch boundary on an H200 with 14 workers
(issue 12; ``../shared/gpu/README.md``). Each epoch's batches are still exactly :func:`make_loader`'s for that epoch.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

AUGMENTS = ("flip", "flip+photometric", "flip+photometric+lowres")
INPUT_SIZE = 112


class TrainingSet(Protocol):
    """What the loop trains from (``digi2real.dataset.imagefolder.open_training_set`` returns one)."""

    num_classes: int
    labels: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


# ------------------------------------------------------------------------------------------------ normalisation
def normalize(images: torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 uint8 RGB -> N x 3 x H x W float32 ``(x / 255 - 0.5) / 0.5`` (FACTS 6).

    The NHWC -> NCHW permute is a view, so the result is already in channels_last memory layout, which is what the
    convolutions want when ``channels_last`` is on (and ``.contiguous()`` gives the plain layout otherwise).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 images, got {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()
    return x.mul_(1.0 / 127.5).sub_(1.0)


# ------------------------------------------------------------------------------------------------- augmentation
def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a pure function of (seed, epoch, position in the epoch)."""
    return np.random.default_rng([seed, epoch, position, 0xA116])


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter of +-20 % each (a mild ColorJitter; keeps identity cues)."""
    x = img.astype(np.float32)
    b, c, s = rng.uniform(0.8, 1.2, size=3)
    x = x * b
    mean = x.mean()
    x = (x - mean) * c + mean
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * s + grey
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _lowres(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down-scale to 20-100 % of the side and back up (bilinear): the low-resolution robustness augmentation used by
    AdaFace-style recipes."""
    h, w = img.shape[:2]
    side = int(round(h * rng.uniform(0.2, 1.0)))
    if side >= h:
        return img
    small = Image.fromarray(img).resize((max(side, 4), max(side, 4)), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def augment(img: np.ndarray, rng: np.random.Generator, mode: str) -> np.ndarray:
    """Apply ``mode`` (one of :data:`AUGMENTS`) to one H x W x 3 uint8 RGB image.

    Every random decision is drawn from ``rng`` in a fixed order whatever the outcome of earlier ones, so a sample's
    augmentation stays the same when the mode's earlier parts change nothing.
    """
    if mode not in AUGMENTS:
        raise ValueError(f"unknown augmentation {mode!r}; choose one of {', '.join(AUGMENTS)}")
    flip = rng.random() < 0.5
    photo = rng.random() < 0.5
    low = rng.random() < 0.2
    sub = np.random.default_rng(rng.integers(0, 2**63))
    if flip:
        img = img[:, ::-1]
    if "photometric" in mode and photo:
        img = _photometric(img, sub)
    if "lowres" in mode and low:
        img = _lowres(np.ascontiguousarray(img), sub)
    return np.ascontiguousarray(img)


# ------------------------------------------------------------------------------------------------------ sampler
class SampleKey(tuple):
    """(index into the dataset, epoch, position in the epoch): a DataLoader key that carries its augmentation seed."""

    __slots__ = ()


class ResumableSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation, sharded across DDP ranks, that can start part-way through an epoch.

    An epoch has ``len(dataset) // global_batch`` full global batches (the incomplete tail is dropped, as DDP needs the
    same number of steps on every rank and the cosine schedule counts whole steps). Rank ``rank`` of ``world`` yields
    the keys of its ``global_batch // world`` samples of each global batch, from global batch ``start_step`` on.
    """

    def __init__(self, n: int, global_batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start_step: int = 0) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world} processes")
        if n < global_batch:
            raise ValueError(f"{n} samples are fewer than one batch of {global_batch}")
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, epoch
        self.rank, self.world, self.start_step = rank, world, start_step
        self.per_rank = global_batch // world
        self.steps = n // global_batch

    def permutation(self) -> np.ndarray:
        """The epoch's order of all ``n`` indices (identical on every rank)."""
        return np.random.default_rng([self.seed, self.epoch, 0x5A3]).permutation(self.n)

    def __iter__(self) -> Iterator[SampleKey]:
        perm = self.permutation()
        for step in range(self.start_step, self.steps):
            base = step * self.global_batch + self.rank * self.per_rank
            for pos in range(base, base + self.per_rank):
                yield SampleKey((int(perm[pos]), self.epoch, pos))

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.per_rank


class RunSampler(torch.utils.data.Sampler):
    """The keys of every global step of a run from ``start_step`` to ``stop_step`` (both counted from the run's start,
    across epochs): step ``s`` is global batch ``s % steps`` of epoch ``s // steps`` exactly as
    :class:`ResumableSampler` yields it (same order, augmentation keys and rank slice), so one iterator over the whole
    run sees what a DataLoader per epoch saw, and a resumed run (``start_step`` = the checkpoint's step) continues it.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start_step: int, stop_step: int, rank: int = 0,
                 world: int = 1) -> None:
        self._epoch = functools.partial(ResumableSampler, n, global_batch, seed, rank=rank, world=world)
        probe = self._epoch(0)  # checks the batch against n and world
        if not 0 <= start_step <= stop_step:
            raise ValueError(f"steps {start_step}..{stop_step}: the start must lie in 0..stop")
        self.steps, self.per_rank = probe.steps, probe.per_rank
        self.start_step, self.stop_step = start_step, stop_step

    def __iter__(self) -> Iterator[SampleKey]:
        step = self.start_step
        while step < self.stop_step:
            epoch, position = divmod(step, self.steps)
            take = min(self.steps - position, self.stop_step - step)
            yield from itertools.islice(self._epoch(epoch, start_step=position), take * self.per_rank)
            step += take

    def __len__(self) -> int:
        return (self.stop_step - self.start_step) * self.per_rank


class AugmentedSet(torch.utils.data.Dataset):
    """Wraps a :class:`TrainingSet`: ``self[key]`` -> (H x W x 3 uint8 tensor, label) augmented from the key's seed."""

    def __init__(self, base: TrainingSet, mode: str, seed: int) -> None:
        if mode not in AUGMENTS:
            raise ValueError(f"unknown augmentation {mode!r}; choose one of {', '.join(AUGMENTS)}")
        self.base, self.mode, self.seed = base, mode, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Sequence[int]) -> tuple[torch.Tensor, int]:
        index, epoch, pos = key
        img, label = self.base[int(index)]
        img = np.asarray(img)
        if img.shape != (INPUT_SIZE, INPUT_SIZE, 3) or img.dtype != np.uint8:
            raise ValueError(f"training sample {index}: expected {INPUT_SIZE} x {INPUT_SIZE} x 3 uint8, "
                             f"got {img.shape} {img.dtype}")
        img = augment(img, sample_rng(self.seed, epoch, pos), self.mode)
        if not img.flags.writeable:  # PIL-backed arrays are read-only; torch wants writable memory
            img = img.copy()
        return torch.from_numpy(img), int(label)


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 images (4x less to copy and pin than float; normalised on the device) and int64 labels."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64)


def _seed_worker(worker_id: int, seed: int, epoch: int) -> None:
    """Seed a worker's global RNGs from (seed, epoch, worker index), for any third-party randomness inside a dataset;
    our own augmentation does not use them (it is keyed by sample position)."""
    s = int(np.random.default_rng([seed, epoch, worker_id, 0x3E7]).integers(0, 2**31))
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def make_loader(dataset: TrainingSet, *, global_batch: int, seed: int, epoch: int, augment_mode: str = "flip",
                workers: int = 0, rank: int = 0, world: int = 1, start_step: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The DataLoader of one epoch from ``start_step`` on: batches of ``global_batch // world`` (uint8 NHWC, labels)."""
    sampler = ResumableSampler(len(dataset), global_batch, seed, epoch, rank, world, start_step)
    return _loader(dataset, sampler, augment_mode, seed, epoch, workers, pin_memory)


def make_run_loader(dataset: TrainingSet, *, global_batch: int, seed: int, start_step: int, stop_step: int,
                    augment_mode: str = "flip", workers: int = 0, rank: int = 0, world: int = 1,
                    pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """One DataLoader for global steps ``start_step`` to ``stop_step`` of a run, across epochs (:class:`RunSampler`).
    Iterate it once: its one iterator spans the run, so its ``workers`` start once (what ``persistent_workers`` gives a
    loader iterated per epoch) and decode ahead, 4 batches each, over epoch boundaries."""
    sampler = RunSampler(len(dataset), global_batch, seed, start_step, stop_step, rank, world)
    return _loader(dataset, sampler, augment_mode, seed, start_step // sampler.steps, workers, pin_memory)


def _loader(dataset: TrainingSet, sampler: ResumableSampler | RunSampler, augment_mode: str, seed: int, epoch: int,
            workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The DataLoader of ``sampler``'s keys. ``epoch`` (the first one read) seeds the workers' global RNGs, which our
    augmentation never uses (it is keyed by sample position)."""
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"worker_init_fn": functools.partial(_seed_worker, seed=seed, epoch=epoch), "prefetch_factor": 4}
    # A private generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG, so creating
    # one mid-epoch on resume would shift the dropout stream and break the exact-resume guarantee.
    generator = torch.Generator().manual_seed(int(np.random.default_rng([seed, epoch, 0x6E]).integers(0, 2**62)))
    return torch.utils.data.DataLoader(
        AugmentedSet(dataset, augment_mode, seed), batch_size=sampler.per_rank, sampler=sampler, drop_last=True,
        num_workers=workers, collate_fn=_collate, pin_memory=pin_memory, generator=generator, **kwargs)


def model_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A uint8 N x H x W x 3 batch as the network's input on ``device``: normalised (FACTS 6) and in the layout training
    runs. :func:`normalize`'s permuted view is channels_last in memory, so NCHW needs the copy."""
    x = normalize(images.to(device, non_blocking=True))
    return x if channels_last else x.contiguous()
