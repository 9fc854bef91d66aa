"""The mean-preserving degradation operator of CoreDiff and its schedule.

D(x0, xT, t) = a_t * x0 + (1 - a_t) * xT interpolates between the clean image x0 and the
low-dose image xT. Unlike Gaussian diffusion it adds no synthetic noise: every intermediate
state is a blend of two real images, so the mean is preserved and sampling can start from
the LDCT image itself ("warm start") and finish in ~10 steps.
"""
from __future__ import annotations

import torch


def alpha_schedule(T: int = 10) -> torch.Tensor:
    """a_t = clip(1 - t/(T-1), 0, 0.999) for t = 0..T-1 (the reference schedule).

    a_0 is capped at 0.999 so x_0 keeps a trace of xT, and a_{T-1} = 0 makes x_{T-1} = xT.
    T = 1 degenerates to a single one-shot restoration step with a_0 = 0.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if T == 1:
        return torch.zeros(1)
    t = torch.arange(T, dtype=torch.float64)
    return (1.0 - t / (T - 1)).clamp(0.0, 0.999).float()


def degrade(x0: torch.Tensor, xT: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """D(x0, xT, t) for a given a_t (scalar or per-sample tensor broadcast over C, H, W)."""
    if isinstance(alpha, torch.Tensor) and alpha.ndim == 1:
        alpha = alpha.view(-1, *([1] * (x0.ndim - 1)))
    return alpha * x0 + (1.0 - alpha) * xT
