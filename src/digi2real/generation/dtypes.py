"""The precisions the generator runs in, by any of the names diffusers accepts (FACTS 2: float16 on CUDA).

Kept apart from :mod:`digi2real.generation.arc2face` so that the CLI can check ``--dtype`` without importing torch.
"""

from __future__ import annotations

from typing import Any

from digi2real.errors import ConfigError

#: Every accepted spelling -> its canonical name (a ``torch`` attribute, or ``auto``). diffusers and transformers take
#: ``torch_dtype``/``dtype`` as a ``torch.dtype`` or its name; the short forms are the usual command-line ones.
DTYPE_ALIASES = {
    "auto": "auto",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
DTYPE_HELP = "auto, float16 (fp16, half), bfloat16 (bf16) or float32 (fp32)"


def canonical_dtype(value: Any, what: str = "arc2face.dtype") -> str:
    """``value`` (a ``torch.dtype`` such as ``torch.float16``, or a name: ``"fp16"``, ``"torch.bfloat16"``...) as its
    canonical name; anything else is one :class:`ConfigError` naming ``what`` and the choices."""
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise ConfigError(f"{what} {value!r}: not a precision; use {DTYPE_HELP}")
    name = DTYPE_ALIASES.get(text.strip().lower().removeprefix("torch."))
    if name is None:
        raise ConfigError(f"{what} {text[:40]!r}: not a supported precision; use {DTYPE_HELP}")
    return name
