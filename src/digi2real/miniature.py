"""Miniature, randomly initialised stand-ins for the real models, saved in the real formats.

The demo and the tests cannot download Arc2Face's ``arcface.onnx``; they build a small network of the same kind (a
CNN mapping aligned 112 x 112 RGB crops to a 512-d vector), export it to ONNX and load it through exactly the code a
user's downloaded file goes through. Its embeddings carry no real identity information: they exercise the machinery.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from digi2real.fileio import atomic_path


class _Normalise(nn.Module):
    """(x - 127.5) / 127.5 inside the graph, as some insightface exports do (their first nodes are Sub and Mul)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 127.5) * (1.0 / 127.5)


class MiniArcFace(nn.Module):
    """A four-stage strided CNN with global pooling and a linear embedding head."""

    def __init__(self, width: int = 16, dim: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(4):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.PReLU(c_out)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * 7 * 7, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def export_face_encoder(model: nn.Module, path: str | Path, normalize_inside: bool = False,
                        input_size: int = 112) -> Path:
    """Export a face embedding network to ONNX with a dynamic batch axis (input ``input``, output ``embedding``)."""
    model = nn.Sequential(_Normalise(), model) if normalize_inside else model
    model.eval()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, input_size, input_size),),
            str(tmp),
            input_names=["input"],
            output_names=["embedding"],
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def build_mini_arcface(path: str | Path, seed: int = 0, normalize_inside: bool = False, width: int = 16,
                       dim: int = 512) -> Path:
    """Write a randomly initialised MiniArcFace (seeded, so the same file every time) as ONNX at ``path``."""
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        model = MiniArcFace(width, dim)
    return export_face_encoder(model, path, normalize_inside=normalize_inside)
