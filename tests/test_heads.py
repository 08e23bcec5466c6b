"""Margin heads (FACTS 6) against independent per-sample float64 reference implementations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digi2real.training.heads import HEADS, AdaFaceHead, ArcFaceHead, CosFaceHead, build_head

D, C, B = 16, 7, 12
EPS = 1e-3


def _inputs(seed: int, batch: int = B, scale: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, D, generator=g) * scale / math.sqrt(D)
    emb = emb * (0.3 + 1.4 * torch.rand(batch, 1, generator=g))  # spread the norms
    labels = torch.randint(0, C, (batch,), generator=g)
    return emb, labels


def _cos(e: np.ndarray, w: np.ndarray, eps: float = EPS) -> float:
    c = float(np.dot(e, w) / (np.linalg.norm(e) * np.linalg.norm(w)))
    return min(max(c, -1.0 + eps), 1.0 - eps)


def ref_logits(kind: str, emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, *, s: float = 64.0,
               m: float, h: float = 0.333, mu: float = 20.0, sigma: float = 100.0) -> np.ndarray:
    """Straightforward per-sample, per-class float64 implementation of the FACTS 6 formulas."""
    e = emb.detach().double().numpy()
    w = weight.detach().double().numpy()
    out = np.zeros((e.shape[0], w.shape[0]))
    for i in range(e.shape[0]):
        for j in range(w.shape[0]):
            c = _cos(e[i], w[j])
            if j != int(labels[i]):
                out[i, j] = s * c
                continue
            theta = math.acos(c)
            if kind == "cosface":
                t = c - m
            elif kind == "arcface":
                t = math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)
            else:
                n = min(max(float(np.linalg.norm(e[i])), 0.001), 100.0)
                z = min(max(h * (n - mu) / (sigma + 1e-3), -1.0), 1.0)
                t = math.cos(min(max(theta - m * z, EPS), math.pi - EPS)) - (m + m * z)
            out[i, j] = s * t
    return out


def _close(a: torch.Tensor, b: np.ndarray, s: float = 64.0) -> None:
    np.testing.assert_allclose(a.detach().double().numpy(), b, rtol=0, atol=1e-4 * s)


@pytest.mark.parametrize("kind,m", [("cosface", 0.4), ("arcface", 0.5), ("adaface", 0.4)])
def test_logits_match_reference_eval(kind, m):
    torch.manual_seed(0)
    head = build_head(kind, D, C).eval()
    emb, labels = _inputs(1)
    logits = head(emb, labels)
    assert logits.shape == (B, C) and logits.dtype == torch.float32
    _close(logits, ref_logits(kind, emb, labels, head.weight, m=m))


def test_arcface_threshold_branch_is_exercised():
    torch.manual_seed(0)
    head = ArcFaceHead(D, C).eval()
    emb, labels = _inputs(2)
    emb[:4] = -head.weight.detach()[labels[:4]] * 5  # theta ~ pi: theta + m > pi, fallback branch
    emb[4:8] = head.weight.detach()[labels[4:8]] * 5  # theta ~ 0: ordinary branch
    logits = head(emb, labels)
    _close(logits, ref_logits("arcface", emb, labels, head.weight, m=0.5))
    tgt = logits.gather(1, labels.view(-1, 1)).squeeze(1) / 64
    expected_fallback = (-1 + EPS) - 0.5 * math.sin(0.5)
    assert torch.allclose(tgt[:4], torch.full((4,), expected_fallback), atol=1e-5)
    assert torch.allclose(tgt[4:8], torch.full((4,), math.cos(math.acos(1 - EPS) + 0.5)), atol=1e-5)


def test_adaface_running_stats_over_training_batches():
    torch.manual_seed(0)
    head = AdaFaceHead(D, C).train()
    assert head.m == 0.4 and head.h == 0.333 and head.s == 64.0 and head.t_alpha == 0.01  # the paper's values
    mu, sigma = 20.0, 100.0
    for step in range(6):
        emb, labels = _inputs(10 + step, scale=10.0 + 8 * step)
        n = np.clip(np.linalg.norm(emb.double().numpy(), axis=1), 0.001, 100.0)
        mu = 0.01 * n.mean() + 0.99 * mu  # updated before use, like the official implementation
        sigma = 0.01 * n.std(ddof=1) + 0.99 * sigma
        logits = head(emb, labels)
        _close(logits, ref_logits("adaface", emb, labels, head.weight, m=0.4, mu=mu, sigma=sigma))
        assert head.batch_mean.item() == pytest.approx(mu, rel=1e-5)
        assert head.batch_std.item() == pytest.approx(sigma, rel=1e-5)
    assert head.batch_mean.item() != pytest.approx(20.0, abs=0.1)


def test_adaface_eval_mode_does_not_update_and_batch_of_one_keeps_std():
    head = AdaFaceHead(D, C).eval()
    emb, labels = _inputs(3)
    head(emb, labels)
    assert head.batch_mean.item() == 20.0 and head.batch_std.item() == 100.0
    head.train()
    head(emb[:1], labels[:1])
    assert head.batch_std.item() == 100.0  # no unbiased std of one sample; not NaN
    assert head.batch_mean.item() == pytest.approx(0.99 * 20 + 0.01 * emb[0].norm().item(), rel=1e-6)


def test_adaface_z_and_theta_clips_are_exercised():
    torch.manual_seed(0)
    head = AdaFaceHead(D, C).eval()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(1.0)
    w = head.weight.detach()
    labels = torch.tensor([0, 1, 2, 3])
    unit = F.normalize(w, dim=1)
    emb = torch.stack([
        unit[0] * 90.0,    # z = +1 (clipped), theta ~ 0.045 -> theta - m < eps: clip at eps
        -unit[1] * 0.5,    # z = -1 (clipped), theta ~ pi - 0.045 -> theta + m > pi - eps: clip at pi - eps
        unit[2] * 300.0,   # norm clipped to 100 as well
        -unit[3] * 1e-4,   # norm clipped to 0.001
    ])
    logits = head(emb, labels)
    _close(logits, ref_logits("adaface", emb, labels, w, m=0.4, mu=20.0, sigma=1.0))
    tgt = (logits.gather(1, labels.view(-1, 1)).squeeze(1) / 64).tolist()
    assert tgt[0] == pytest.approx(math.cos(EPS) - 0.8, abs=1e-5)
    assert tgt[1] == pytest.approx(math.cos(math.pi - EPS) - 0.0, abs=1e-5)
    assert tgt[2] == pytest.approx(math.cos(EPS) - 0.8, abs=1e-5)
    assert tgt[3] == pytest.approx(math.cos(math.pi - EPS), abs=1e-5)


def _ref_adaface_torch(emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, mu: float, sigma: float,
                       detach_norm: bool) -> torch.Tensor:
    """Autograd-able float64 reference, one sample at a time; ``detach_norm`` chooses whether the margin's norm is
    a constant (the AdaFace rule) or not (to show the test can tell the difference)."""
    rows = []
    for i in range(emb.shape[0]):
        e = emb[i]
        raw = torch.sqrt((e * e).sum())
        u = e / raw
        row = []
        for j in range(weight.shape[0]):
            wj = weight[j] / torch.sqrt((weight[j] * weight[j]).sum())
            c = torch.clamp((u * wj).sum(), -1 + EPS, 1 - EPS)
            if j == int(labels[i]):
                n = (raw.detach() if detach_norm else raw).clamp(0.001, 100.0)
                z = torch.clamp(0.333 * (n - mu) / (sigma + 1e-3), -1.0, 1.0)
                c = torch.cos(torch.clamp(torch.acos(c) - 0.4 * z, EPS, math.pi - EPS)) - (0.4 + 0.4 * z)
            row.append(64.0 * c)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_adaface_gradient_flows_through_raw_norm_division_and_margin_norm_is_detached():
    torch.manual_seed(0)
    head = AdaFaceHead(D, C).eval()
    head.batch_mean.fill_(20.0)
    head.batch_std.fill_(5.0)  # a small sigma so that z depends strongly on n: the detach then matters
    emb, labels = _inputs(4)
    emb = emb.clone().requires_grad_(True)
    F.cross_entropy(head(emb, labels), labels).backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0

    grads = {}
    for detach in (True, False):
        e64 = emb.detach().double().requires_grad_(True)
        logits = _ref_adaface_torch(e64, labels, head.weight.detach().double(), 20.0, 5.0, detach)
        F.cross_entropy(logits, labels).backward()
        grads[detach] = e64.grad
    ours = emb.grad.double()
    assert torch.allclose(ours, grads[True], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, grads[False], atol=1e-5, rtol=1e-4)
    # With the division differentiated and the margin's norm detached, the loss depends only on each embedding's
    # direction, so its gradient is orthogonal to the embedding; dividing by a detached norm would break this.
    radial = (emb.grad * emb.detach()).sum(1) / (emb.grad.norm(dim=1) * emb.detach().norm(dim=1))
    assert radial.abs().max().item() < 1e-4
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_state_dict_holds_running_stats_and_reload_reproduces_logits():
    torch.manual_seed(0)
    head = AdaFaceHead(D, C).train()
    for step in range(3):
        head(*_inputs(20 + step))
    state = head.state_dict()
    assert {"weight", "batch_mean", "batch_std"} <= set(state)
    fresh = AdaFaceHead(D, C)
    assert fresh.batch_mean.item() == 20.0
    fresh.load_state_dict(state)
    head.eval()
    fresh.eval()
    emb, labels = _inputs(30)
    assert torch.equal(fresh(emb, labels), head(emb, labels))
    assert fresh.batch_std.item() == head.batch_std.item() != 100.0


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_bf16_autocast_gives_fp32_logits(kind):
    torch.manual_seed(0)
    head = build_head(kind, D, C).eval()
    proj = torch.nn.Linear(D, D)
    emb, labels = _inputs(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = proj(emb)
        assert x.dtype == torch.bfloat16
        logits = head(x, labels)
    assert logits.dtype == torch.float32
    # Same result as fp32 on the (bf16-rounded) input: the head itself added no bf16 rounding.
    ref = head(x.float(), labels)
    assert torch.allclose(logits, ref, atol=1e-4 * 64, rtol=0)
    # And close to the fully fp32 pipeline (differences come only from the bf16 projection).
    full = head(proj(emb), labels)
    assert (logits - full).abs().max().item() < 0.05 * 64


def test_registry_and_defaults():
    assert set(HEADS) == {"adaface", "arcface", "cosface"}
    with pytest.raises(ValueError, match="adaface, arcface, cosface"):
        build_head("sphereface", D, C)
    assert build_head("adaface", D, C, m=0.5, h=0.0).m == 0.5
    arc, cos = build_head("arcface", D, C), build_head("cosface", D, C)
    assert isinstance(arc, ArcFaceHead) and arc.m == 0.5 and arc.s == 64.0
    assert isinstance(cos, CosFaceHead) and cos.m == 0.4 and cos.s == 64.0
    assert arc.weight.shape == (C, D)
    with pytest.raises(ValueError):
        arc(torch.randn(3, D + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        arc(torch.randn(3, D), torch.zeros(4, dtype=torch.long))
