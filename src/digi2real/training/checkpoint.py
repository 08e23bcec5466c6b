"""Checkpoints: what one holds, reading it back checked (``weights_only``: a pickle that would run code is refused),
the random states it carries, and writing it atomically from a host copy on a background thread."""

from __future__ import annotations

import contextlib
import json
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digi2real.errors import Digi2RealError
from digi2real.fileio import atomic_open

def _rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(gauss)],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # a different GPU count on resume: keep the fresh CUDA generators
            torch.cuda.set_rng_state_all(state["cuda"])


#: What every checkpoint we write holds (anything else, or another type, is a damaged or foreign file).
_CHECKPOINT_KEYS: dict[str, type | tuple[type, ...]] = {
    "backbone": dict, "head": dict, "optimizer": dict, "step": int, "rng": dict, "config_compare": dict}


def describe_load_error(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a few words (torch's message runs to a page)."""
    text = str(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds objects other than tensors, which could run code when loaded: refused"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "not a complete torch file: truncated or of another kind"
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first[:120]}"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``checkpoint.pt`` loaded with ``weights_only=True`` (a pickle that would run code is refused, never executed)
    and checked for the keys every checkpoint holds; a one-line :class:`Digi2RealError` otherwise."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged or hostile file
        raise Digi2RealError(f"{path}: not a readable digi2real checkpoint ({describe_load_error(exc)})") from None
    if not isinstance(ckpt, dict):
        raise Digi2RealError(f"{path}: not a digi2real checkpoint (a {type(ckpt).__name__}, not a dict)")
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise Digi2RealError(f"{path}: not a digi2real checkpoint ({key!r} missing or of the wrong type)")
    try:  # the saved settings are compared value by value: plain JSON values only
        json.dumps(ckpt["config_compare"], allow_nan=False)
    except (TypeError, ValueError):
        raise Digi2RealError(f"{path}: not a digi2real checkpoint (its settings are not plain values)") from None
    return ckpt


def _host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to the CPU and every container copied: a snapshot training cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes ``checkpoint.pt`` (atomically) on a background thread from a host snapshot, so the next steps run while
    it is written (IResNet50 + AdaFace with momentum is several hundred MB, once an epoch). One write at a time; a
    failed write is raised by the next :meth:`save` or :meth:`wait`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict[str, Any]) -> None:
        self.wait()
        snapshot = _host_copy(state)
        self._thread = threading.Thread(target=self._write, args=(snapshot,), name="checkpoint-writer")
        self._thread.start()

    def _write(self, state: dict[str, Any]) -> None:
        try:
            with atomic_open(self.path, "wb") as fh:
                torch.save(state, fh)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
