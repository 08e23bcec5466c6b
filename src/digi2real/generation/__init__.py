"""Generation with Arc2Face (paper section 3): ``Arc2Face`` (loading, identity -> conditioning, sampling), the realism
shift (``shift``) and the dataset runner (``runner``).

``from digi2real.generation import Arc2Face`` works; the heavy modules load on first use, so the CLI stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Arc2Face", "RealismShift", "apply_shift", "make_shift", "read_shift"]

_WHERE = {"Arc2Face": "arc2face", "apply_shift": "arc2face", "RealismShift": "shift", "make_shift": "shift",
          "read_shift": "shift"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"digi2real.generation.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'digi2real.generation' has no attribute {name!r}")
