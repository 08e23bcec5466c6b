"""IResNet backbones (FACTS 6; the architecture of insightface's arcface_torch), with insightface's parameter names
so that their checkpoints load here and ours load in their tools.

Block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (the stride sits on this second conv) -> BN, plus a shortcut (conv1x1 +
BN when the stride or width changes). Every stage starts with stride 2, so a 112 x 112 input ends at 7 x 7. Head:
BN2d -> flatten -> dropout -> Linear(512 * 7 * 7, 512) -> BatchNorm1d with its scale fixed at 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
}


def feature_side(input_size: int, stem_stride: int, stages: int) -> int:
    """Side of the last feature map: each padded 3x3 conv of stride s maps n pixels to ceil(n / s)."""
    side = input_size
    for stride in [stem_stride] + [2] * stages:
        side = -(-side // stride)
    return side


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        eps = 1e-5
        self.bn1 = nn.BatchNorm2d(c_in, eps=eps)
        self.conv1 = _conv3x3(c_in, c_out)
        self.bn2 = nn.BatchNorm2d(c_out, eps=eps)
        self.prelu = nn.PReLU(c_out)
        self.conv2 = _conv3x3(c_out, c_out, stride)
        self.bn3 = nn.BatchNorm2d(c_out, eps=eps)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """IResNet for aligned 112 x 112 faces; ``widths`` and ``stem_stride`` allow miniature versions for CPU tests."""

    def __init__(self, layers: tuple[int, ...], widths: tuple[int, ...] = (64, 128, 256, 512), embedding_dim: int = 512,
                 dropout: float = 0.0, stem_stride: int = 1, input_size: int = 112) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, widths[0], stem_stride)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        c_in = widths[0]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            blocks = [IBasicBlock(c_in, width, 2)] + [IBasicBlock(width, width, 1) for _ in range(depth - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = width
        side = feature_side(input_size, stem_stride, len(layers))
        self.bn2 = nn.BatchNorm2d(c_in, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(c_in * side * side, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        self.n_stages = len(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def memory_format(self) -> torch.memory_format:
        """The layout the weights are in: channels_last after ``.to(memory_format=torch.channels_last)``."""
        w = self.conv1.weight  # 3 input channels and a 3x3 kernel: the two layouts have different strides
        channels_last = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        return torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The net runs in its weights' layout whatever the input's: oneDNN follows a channels_last input even into
        # NCHW weights, and its CPU backward of channels_last 1x1 stride-2 convolutions with < 16 input channels
        # corrupts memory (issue 11). A no-op when the input already has the layout.
        x = x.contiguous(memory_format=self.memory_format())
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


BACKBONES: dict[str, Callable[..., IResNet]] = {
    name: (lambda layers: (lambda **kw: IResNet(layers, **kw)))(layers) for name, layers in DEPTHS.items()
}


def build_backbone(name: str, **kwargs) -> IResNet:
    """A backbone by registry name (``r18``, ``r34``, ``r50``, ``r100``)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](**kwargs)
