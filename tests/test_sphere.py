"""SLERP (paper eqs. 3-4) and Beta sampling (eq. 5) properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from digi2real.identity import sample_t, slerp

DIM = 16
finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def angle(a: np.ndarray, b: np.ndarray) -> float:
    """Eq. 4 as written, independent of the library's implementation."""
    return float(np.arccos(np.clip(np.dot(a, b), -1.0, 1.0)))


vectors = arrays(np.float64, DIM, elements=finite).filter(lambda v: np.linalg.norm(v) > 1e-3).map(unit)
fractions = st.floats(0.0, 1.0)


_NEAR_ANTIPODAL = (unit(-np.r_[0.0, np.ones(DIM - 1)]), unit(np.r_[1e-5, np.ones(DIM - 1)]))


@settings(max_examples=500, deadline=None)
@given(mu=vectors, e=vectors, t=fractions)
@example(mu=_NEAR_ANTIPODAL[0], e=_NEAR_ANTIPODAL[1], t=0.5)  # arccos-based theta lost 4e-8 of norm here
def test_slerp_stays_on_the_sphere_at_the_angle_fraction_t(mu, e, t):
    z = slerp(mu, e, t)
    assert np.isfinite(z).all()
    assert np.linalg.norm(z) == pytest.approx(1.0, abs=1e-9)
    theta = angle(mu, e)
    if 1e-3 < np.sin(theta):
        # the point is t of the way along the great circle: angle(mu, z) = t theta and angle(z, e) = (1 - t) theta
        assert angle(mu, z) == pytest.approx(t * theta, abs=1e-6)
        assert angle(z, e) == pytest.approx((1 - t) * theta, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(mu=vectors, e=vectors)
def test_slerp_endpoints(mu, e):
    np.testing.assert_allclose(slerp(mu, e, 0.0), mu, atol=1e-9)
    if np.sin(angle(mu, e)) > 1e-3:
        np.testing.assert_allclose(slerp(mu, e, 1.0), e, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(mu=vectors, t=fractions)
def test_degenerate_inputs_return_the_prototype(mu, t):
    # identical vectors: sin(theta) = 0, the formula divides by zero; the path is the point mu
    np.testing.assert_allclose(slerp(mu, mu, t), mu, atol=1e-9)
    # antipodal vectors: arccos(-1) = pi, sin = 0 again; the output must stay finite and on the sphere
    z = slerp(mu, -mu, t)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z, mu, atol=1e-9)
    # nearly identical (float32 rounding pushes mu . e above 1 before the clip)
    near = unit(mu + 1e-9)
    assert np.isfinite(slerp(mu.astype(np.float32), near.astype(np.float32), t)).all()


def test_batched_numpy_and_torch_agree_and_keep_their_type():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(64, 512))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    e = rng.normal(size=(64, 512))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    t = rng.uniform(size=64)
    z_np = slerp(mu, e, t)
    z_t = slerp(torch.from_numpy(mu), torch.from_numpy(e), torch.from_numpy(t))
    assert isinstance(z_t, torch.Tensor) and isinstance(z_np, np.ndarray)
    np.testing.assert_allclose(z_t.numpy(), z_np, atol=1e-12)
    # one prototype broadcast against many directions, scalar t
    z_b = slerp(mu[0], e, 0.25)
    np.testing.assert_allclose(np.linalg.norm(z_b, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(z_b[3], slerp(mu[0], e[3], 0.25), atol=1e-12)
    # float32 in, float32 out
    assert slerp(mu.astype(np.float32), e.astype(np.float32), t).dtype == np.float32


def test_beta_sampling_statistics():
    rng = np.random.default_rng(123)
    for alpha in (1.0, 2.0, 5.0):
        t = sample_t(rng, alpha, 200_000)
        assert t.min() >= 0 and t.max() <= 1
        assert t.mean() == pytest.approx(0.5, abs=0.005)
        # Var of Beta(a, a) = 1 / (4 (2a + 1)); alpha = 1 is uniform (1/12)
        assert t.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.03)
    uniform = sample_t(rng, 1.0, 100_000)
    hist, _ = np.histogram(uniform, bins=10, range=(0, 1))
    assert np.all(np.abs(hist / len(uniform) - 0.1) < 0.01)
    with pytest.raises(ValueError):
        sample_t(rng, 0.0)
