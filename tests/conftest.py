"""Shared fixtures: miniature ONNX face encoders built once per session, in the layout a user's download has."""

from __future__ import annotations

from pathlib import Path

import pytest

from digi2real.miniature import build_mini_arcface


@pytest.fixture(scope="session")
def mini_arcface(tmp_path_factory) -> Path:
    """A random MiniArcFace exported to ONNX that expects (x - 127.5) / 127.5 inputs, like most ArcFace files."""
    return build_mini_arcface(tmp_path_factory.mktemp("models") / "arcface.onnx", seed=0)


@pytest.fixture(scope="session")
def mini_arcface_inside(tmp_path_factory) -> Path:
    """The same network with the normalisation inside the graph (first nodes Sub, Mul), as some exports have."""
    return build_mini_arcface(tmp_path_factory.mktemp("models") / "arcface_inside.onnx", seed=0, normalize_inside=True)
