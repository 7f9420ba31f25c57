"""The latent Schrödinger bridge (I2SB-style, discrete time n = 0..N-1) as functions of tensors.

Notation follows the paper / I2SB:
  b_n          beta schedule (rises then falls: "symmetric")
  sigma_n^2    = sum_{k<=n} b_k          forward variance            (std_fwd in I2SB)
  sigmabar_n^2 = sum_{k>n} b_k           backward variance           (std_bwd in I2SB)
  q(x_n | x0, x1) = N(mu0_n x0 + mu1_n x1, s_n^2)
      mu0 = sigmabar^2 / (sigma^2 + sigmabar^2), mu1 = sigma^2 / (sigma^2 + sigmabar^2),
      s^2 = sigma^2 sigmabar^2 / (sigma^2 + sigmabar^2)   (s = 0 in OT-ODE mode)
x0 is the clean latent, x1 the latent of the defective image; n = N-1 is exactly x1.
Defining sigmabar with k > n makes sigma^2 + sigmabar^2 = S constant, so the posterior below
keeps every intermediate state on the marginal q exactly (tested in tests/test_bridge.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEDULE_SHAPES = ("symmetric", "linear", "cosine")


def symmetric_betas(n_steps: int, beta_max: float, beta_min: float = 1e-4) -> torch.Tensor:
    """b_k = (sqrt(beta_min) + k/(N-1) (sqrt(beta_max/N) - sqrt(beta_min)))^2, first half mirrored."""
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2, got {n_steps}")
    k = torch.arange(n_steps, dtype=torch.float64)
    lin = beta_min**0.5 + k / (n_steps - 1) * ((beta_max / n_steps) ** 0.5 - beta_min**0.5)
    half = (lin**2)[: n_steps // 2]
    mirrored = torch.cat([half, half.flip(0)])
    if n_steps % 2:  # odd N: repeat the peak so there are N values
        mirrored = torch.cat([half, half[-1:], half.flip(0)])
    return mirrored


def make_betas(shape: str, n_steps: int, beta_max: float) -> torch.Tensor:
    """Beta schedule of a given shape. "symmetric" is the paper's; the others exist for tuning."""
    if shape == "symmetric":
        return symmetric_betas(n_steps, beta_max)
    if shape == "linear":  # monotone I2SB-style ramp, same total variance scale
        k = torch.arange(n_steps, dtype=torch.float64)
        return (1e-2 + k / (n_steps - 1) * ((beta_max / n_steps) ** 0.5 - 1e-2)) ** 2
    if shape == "cosine":  # smooth bump: beta ~ sin^2, peak beta_max / N at the middle
        k = torch.arange(n_steps, dtype=torch.float64)
        return 1e-8 + (beta_max / n_steps) * torch.sin(torch.pi * (k + 0.5) / n_steps) ** 2
    raise ValueError(f"unknown schedule shape {shape!r}; expected one of {SCHEDULE_SHAPES}")


@dataclass(frozen=True)
class Schedule:
    """Precomputed per-step arrays (float64 on CPU; gathered and cast per call)."""

    betas: torch.Tensor
    sigma2: torch.Tensor  # sigma_n^2
    sigmabar2: torch.Tensor  # sigmabar_n^2
    mu0: torch.Tensor
    mu1: torch.Tensor
    s2: torch.Tensor  # marginal variance s_n^2

    @property
    def n_steps(self) -> int:
        return len(self.betas)

    @property
    def max_std(self) -> float:
        return float(self.s2.max().sqrt())


def make_schedule(betas: torch.Tensor) -> Schedule:
    betas = betas.to(torch.float64)
    sigma2 = torch.cumsum(betas, 0)
    total = sigma2[-1]
    sigmabar2 = (total - sigma2).clamp_min(0.0)
    return Schedule(
        betas=betas,
        sigma2=sigma2,
        sigmabar2=sigmabar2,
        mu0=sigmabar2 / total,
        mu1=sigma2 / total,
        s2=sigma2 * sigmabar2 / total,
    )


def _at(values: torch.Tensor, n: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """values[n] shaped to broadcast against a batch `like` (B, ...)."""
    idx = torch.as_tensor(n, device=values.device).long()
    v = values[idx].to(device=like.device, dtype=like.dtype)
    return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v


def q_sample(
    sched: Schedule,
    n: torch.Tensor | int,
    x0: torch.Tensor,
    x1: torch.Tensor,
    ot_ode: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw x_n ~ q(x_n | x0, x1) = N(mu0 x0 + mu1 x1, s^2) (I2SB eq. 11)."""
    mean = _at(sched.mu0, n, x0) * x0 + _at(sched.mu1, n, x0) * x1
    if ot_ode:
        return mean
    noise = torch.randn_like(x0) if noise is None else noise
    return mean + _at(sched.s2, n, x0).sqrt() * noise


def training_target(sched: Schedule, n: torch.Tensor | int, x_n: torch.Tensor, x0: torch.Tensor):
    """eps target (x_n - x0) / sigma_n that the network regresses (MSE)."""
    return (x_n - x0) / _at(sched.sigma2, n, x_n).sqrt()


def predict_x0(sched: Schedule, n: torch.Tensor | int, x_n: torch.Tensor, eps: torch.Tensor):
    """x0_hat = x_n - sigma_n * eps."""
    return x_n - _at(sched.sigma2, n, x_n).sqrt() * eps


def posterior_sample(
    sched: Schedule,
    m: int,
    n: int,
    x_n: torch.Tensor,
    x0_hat: torch.Tensor,
    ot_ode: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_m ~ p(x_m | x_n, x0_hat) = N(a2/sigma_n^2 x0_hat + sigma_m^2/sigma_n^2 x_n,
    sigma_m^2 a2 / sigma_n^2), a2 = sigma_n^2 - sigma_m^2, m < n (I2SB eq. 4)."""
    if not m < n:
        raise ValueError(f"posterior needs m < n, got m={m}, n={n}")
    sn2, sm2 = float(sched.sigma2[n]), float(sched.sigma2[m])
    a2 = sn2 - sm2
    x_m = (a2 / sn2) * x0_hat + (sm2 / sn2) * x_n
    if ot_ode:
        return x_m
    noise = torch.randn_like(x_n) if noise is None else noise
    return x_m + (sm2 * a2 / sn2) ** 0.5 * noise


def sampling_steps(n_steps: int, nfe: int) -> list[int]:
    """nfe+1 indices spaced over 0..N-1 (ascending, first 0, last N-1, all distinct)."""
    if not 1 <= nfe <= n_steps - 1:
        raise ValueError(f"nfe must be in 1..{n_steps - 1}, got {nfe}")
    steps = torch.linspace(0, n_steps - 1, nfe + 1).round().long().tolist()
    return sorted(set(steps))


def sample(
    eps_fn,
    sched: Schedule,
    x1: torch.Tensor,
    nfe: int,
    ot_ode: bool = False,
    noise_fn=None,
    return_path: bool = False,
):
    """Run the bridge from x1 (n = N-1) back to x0_hat with `nfe` network calls.

    eps_fn(x_n, n_batch) -> eps. Each step predicts x0_hat and moves to the earlier index with
    the posterior; the last step returns x0_hat itself (no noise at the last step).
    noise_fn(like) -> noise tensor lets callers make draws independent of batch composition.
    """
    steps = sampling_steps(sched.n_steps, nfe)
    x = x1
    path = [x1]
    for m, n in zip(reversed(steps[:-1]), reversed(steps[1:])):
        n_batch = torch.full((x.shape[0],), n, device=x.device, dtype=torch.long)
        x0_hat = predict_x0(sched, n, x, eps_fn(x, n_batch))
        if m == 0:
            x = x0_hat
        else:
            noise = None if ot_ode or noise_fn is None else noise_fn(x)
            x = posterior_sample(sched, m, n, x, x0_hat, ot_ode=ot_ode, noise=noise)
        path.append(x)
    return (x, path) if return_path else x
