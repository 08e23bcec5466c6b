"""Convert the MTCNN weights shipped in the facenet-pytorch 2.6.0 wheel (MIT) into one safetensors file.

The wheel carries three PyTorch state dicts, ``facenet_pytorch/data/{pnet,rnet,onet}.pt``. This script reads them
straight out of the wheel (the package is never installed or imported), checks the wheel and each file against the
sha256 sums recorded below, and writes every tensor unchanged (float32, same shapes, names prefixed ``pnet.``,
``rnet.``, ``onet.``) to ``src/digi2real/faces/weights/mtcnn.safetensors``. The output is byte-for-byte reproducible;
its sha256 is printed and must equal ``digi2real.faces.mtcnn.WEIGHTS_SHA256``.

Usage::

    pip download --no-deps facenet-pytorch==2.6.0 -d /tmp/fp
    python tools/convert_mtcnn_weights.py /tmp/fp/facenet_pytorch-2.6.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
MEMBER_SHA256 = {
    "pnet": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "digi2real" / "faces" / "weights" / "mtcnn.safetensors"
# One metadata entry only: safetensors writes its metadata map in hash order, so several keys would make the file's
# bytes (and its sha256) change from run to run.
METADATA = {
    "source": "facenet-pytorch 2.6.0 wheel (PyPI), facenet_pytorch/data/{pnet,rnet,onet}.pt; "
    "MIT licence, Copyright (c) 2019 Timothy Esler (see LICENSE-MTCNN.txt)",
}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def convert(wheel: Path, out: Path, check: bool = True) -> str:
    data = wheel.read_bytes()
    if check and sha256_bytes(data) != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {sha256_bytes(data)} is not the facenet-pytorch 2.6.0 wheel's "
                         f"{WHEEL_SHA256}; pass --no-check to convert anyway")
    tensors: dict[str, torch.Tensor] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for net, expected in MEMBER_SHA256.items():
            raw = zf.read(f"facenet_pytorch/data/{net}.pt")
            if check and sha256_bytes(raw) != expected:
                raise SystemExit(f"{wheel}: member {net}.pt has sha256 {sha256_bytes(raw)}, expected {expected}")
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            for key, value in state.items():
                tensors[f"{net}.{key}"] = value.detach().to(torch.float32).contiguous().clone()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=METADATA)
    digest = sha256_bytes(out.read_bytes())
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(tensors)} tensors)\nsha256 {digest}")
    try:
        from digi2real.faces.mtcnn import WEIGHTS_SHA256
    except ImportError:  # the package is not installed: nothing to compare with
        return digest
    verdict = "matches" if digest == WEIGHTS_SHA256 else "DIFFERS from"
    print(f"{verdict} digi2real.faces.mtcnn.WEIGHTS_SHA256 ({WEIGHTS_SHA256})")
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="facenet_pytorch-2.6.0-py3-none-any.whl")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help=f"output file (default: {DEFAULT_OUT})")
    parser.add_argument("--no-check", action="store_true", help="skip the sha256 checks of the wheel and its members")
    args = parser.parse_args(argv)
    convert(args.wheel, args.out, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
