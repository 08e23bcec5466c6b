"""IResNet backbones (FACTS 6): sizes, parameter names and miniature variants."""

from __future__ import annotations

import pytest
import torch

from digi2real.training.iresnet import IResNet, build_backbone, feature_side


def test_r50_matches_the_reference_size_and_names():
    model = build_backbone("r50")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params / 1e6 == pytest.approx(43.6, abs=0.1)
    names = set(model.state_dict())
    for key in ("conv1.weight", "prelu.weight", "layer1.0.bn1.weight", "layer1.0.downsample.0.weight",
                "layer3.13.conv2.weight", "bn2.running_var", "fc.weight", "features.weight"):
        assert key in names
    assert "layer3.14.conv1.weight" not in names  # r50 has 14 blocks in stage 3
    assert not model.features.weight.requires_grad  # BatchNorm1d scale fixed at 1


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_miniature_variants_run_on_112_crops(stem_stride):
    model = IResNet((1, 1, 1, 1), widths=(8, 16, 32, 64), stem_stride=stem_stride).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 112, 112))
    assert out.shape == (3, 512)
    assert model.fc.in_features == 64 * feature_side(112, stem_stride, 4) ** 2
    assert feature_side(112, 1, 4) == 7 and feature_side(112, 2, 4) == 4


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="unknown backbone 'r200'"):
        build_backbone("r200")


def test_the_net_runs_in_its_weights_layout_whatever_the_input():
    """A channels_last input (what ``normalize``'s permuted view is) must not drag an NCHW net into channels_last: on
    the CPU, oneDNN's backward of the 8 -> 16 channel 1x1 stride-2 downsample in that layout corrupts memory (issue
    11). Forward passes of the NCHW net only (nothing that could crash runs here): the check is the layout the
    downsample receives."""
    torch.manual_seed(0)
    model = IResNet((1, 1, 1, 1), widths=(8, 8, 16, 16), stem_stride=2, embedding_dim=32).eval()
    seen = []
    downsample = model.layer3[0].downsample[0]  # the reduction: Conv2d(8, 16, 1, stride=2)
    downsample.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    nhwc = torch.randn(2, 112, 112, 3)
    with torch.no_grad():
        outs = [model(nhwc.permute(0, 3, 1, 2)), model(nhwc.permute(0, 3, 1, 2).contiguous())]
    assert seen == [True, True]
    assert torch.equal(outs[0], outs[1])
    # its layout is read from its weights: NCHW, and channels_last after .to(channels_last) (CUDA training)
    assert model.memory_format() == torch.contiguous_format
    assert model.to(memory_format=torch.channels_last).memory_format() == torch.channels_last
