"""The bridge math against closed forms and Monte Carlo runs of the forward chain."""

import numpy as np
import pytest
import torch

from lasb import bridge


def numpy_symmetric_betas(n, beta_max):
    k = np.arange(n)
    b = (np.sqrt(1e-4) + k / (n - 1) * (np.sqrt(beta_max / n) - np.sqrt(1e-4))) ** 2
    half = b[: n // 2]
    return np.concatenate([half, half[::-1]])


def test_symmetric_schedule_matches_formula_and_is_mirrored():
    betas = bridge.symmetric_betas(1000, 0.3).numpy()
    expected = numpy_symmetric_betas(1000, 0.3)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    np.testing.assert_allclose(betas, betas[::-1])
    assert betas[0] == pytest.approx(1e-4)
    assert np.argmax(betas) in (499, 500)
    assert np.all(np.diff(betas[:500]) > 0)


def test_max_bridge_std_is_small_at_beta_max_03():
    sched = bridge.make_schedule(bridge.symmetric_betas(1000, 0.3))
    b = numpy_symmetric_betas(1000, 0.3)
    fwd = np.cumsum(b)
    bwd = np.clip(b.sum() - fwd, 0, None)
    s = np.sqrt(fwd * bwd / (fwd + bwd))
    assert sched.max_std == pytest.approx(s.max(), rel=1e-9)
    assert 0.15 < sched.max_std < 0.25  # "about 0.19": latents must be unit-scale


def test_schedule_endpoints_are_x0_and_x1():
    sched = bridge.make_schedule(bridge.symmetric_betas(100, 0.3))
    assert float(sched.mu1[-1]) == 1.0 and float(sched.s2[-1]) == 0.0
    assert float(sched.mu0[0]) > 0.99
    np.testing.assert_allclose((sched.mu0 + sched.mu1).numpy(), 1.0)


@pytest.mark.parametrize("shape", bridge.SCHEDULE_SHAPES)
def test_every_schedule_shape_is_positive(shape):
    betas = bridge.make_betas(shape, 200, 0.5)
    assert betas.shape == (200,) and bool((betas > 0).all())


def test_marginal_matches_monte_carlo_of_the_pinned_forward_chain():
    """Simulate x_n = x0 + sum_{k<=n} sqrt(b_k) z_k and pin it at x1 (Brownian-bridge
    conditioning of a Gaussian walk); its mean/var must equal q(x_n | x0, x1)."""
    n_steps, n_paths = 60, 200_000
    b = numpy_symmetric_betas(n_steps, 0.3)
    rng = np.random.default_rng(0)
    x0, x1 = 0.7, -1.3
    walk = np.cumsum(np.sqrt(b)[None, :] * rng.standard_normal((n_paths, n_steps)), axis=1)
    total = b.sum()
    var_fwd = np.cumsum(b)
    pinned = x0 + walk + (var_fwd / total)[None, :] * ((x1 - x0) - walk[:, -1:])

    sched = bridge.make_schedule(torch.as_tensor(b))
    for n in (0, 5, 20, 30, 45, 59):
        draws = bridge.q_sample(
            sched,
            torch.full((n_paths,), n),
            torch.full((n_paths,), x0, dtype=torch.float64),
            torch.full((n_paths,), x1, dtype=torch.float64),
            noise=torch.as_tensor(rng.standard_normal(n_paths)),
        ).numpy()
        mc_mean, mc_var = pinned[:, n].mean(), pinned[:, n].var()
        assert draws.mean() == pytest.approx(mc_mean, abs=3e-3)
        assert draws.var() == pytest.approx(mc_var, rel=2e-2, abs=1e-5)
        closed_mean = float(sched.mu0[n]) * x0 + float(sched.mu1[n]) * x1
        assert mc_mean == pytest.approx(closed_mean, abs=3e-3)


def test_training_target_inverts_to_x0():
    sched = bridge.make_schedule(bridge.symmetric_betas(100, 0.3))
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    n = torch.tensor([0, 10, 50, 99])
    x_n = bridge.q_sample(sched, n, x0, x1)
    eps = bridge.training_target(sched, n, x_n, x0)
    torch.testing.assert_close(bridge.predict_x0(sched, n, x_n, eps), x0)


def perfect_eps(sched, x0):
    return lambda x_n, n: bridge.training_target(sched, n, x_n, x0)


@pytest.mark.parametrize("nfe", [1, 2, 4, 10, 37])
def test_ot_ode_with_perfect_model_follows_the_marginal_mean_and_returns_x0(nfe):
    sched = bridge.make_schedule(bridge.symmetric_betas(1000, 1.0).double())
    g = torch.Generator().manual_seed(nfe)
    x0 = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    x1 = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    out, path = bridge.sample(
        perfect_eps(sched, x0), sched, x1, nfe=nfe, ot_ode=True, return_path=True
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)
    steps = bridge.sampling_steps(1000, nfe)
    assert len(path) == len(steps)
    # every intermediate state sits exactly on mu0 x0 + mu1 x1 (the OT-ODE path)
    for x, n in zip(path[1:-1], reversed(steps[1:-1])):
        expected = float(sched.mu0[n]) * x0 + float(sched.mu1[n]) * x1
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-10)


def test_stochastic_sampler_with_perfect_model_visits_the_marginals():
    """Monte Carlo: with the true x0, each posterior step must land on q(x_m | x0, x1)."""
    sched = bridge.make_schedule(bridge.symmetric_betas(1000, 0.3).double())
    n_paths = 100_000
    x0 = torch.full((n_paths,), 0.5, dtype=torch.float64)
    x1 = torch.full((n_paths,), -1.0, dtype=torch.float64)
    torch.manual_seed(0)
    _, path = bridge.sample(perfect_eps(sched, x0), sched, x1, nfe=5, return_path=True)
    steps = bridge.sampling_steps(1000, 5)
    for x, n in zip(path[1:-1], reversed(steps[1:-1])):
        mean = float(sched.mu0[n]) * 0.5 - float(sched.mu1[n])
        assert float(x.mean()) == pytest.approx(mean, abs=2e-3)
        assert float(x.var()) == pytest.approx(float(sched.s2[n]), rel=2e-2)


def test_sampler_uses_exactly_nfe_network_calls():
    sched = bridge.make_schedule(bridge.symmetric_betas(1000, 0.3))
    calls = []

    def eps(x, n):
        calls.append(int(n[0]))
        return torch.zeros_like(x)

    bridge.sample(eps, sched, torch.zeros(2, 1, 2, 2), nfe=4)
    assert len(calls) == 4 and calls[0] == 999 and calls == sorted(calls, reverse=True)


def test_sampling_steps_and_argument_errors():
    assert bridge.sampling_steps(1000, 1) == [0, 999]
    steps = bridge.sampling_steps(1000, 10)
    assert steps[0] == 0 and steps[-1] == 999 and len(steps) == 11
    with pytest.raises(ValueError, match="nfe"):
        bridge.sampling_steps(10, 10)
    with pytest.raises(ValueError, match="shape"):
        bridge.make_betas("zigzag", 10, 0.3)
