"""The CoreDiff sampler: T warm-start steps from the LDCT slice to the clean estimate.

Each step asks the network for x0_hat given the current state x_t, recovers the implied
"noise end" xT_hat = (x_t - a_s x0_hat) / (1 - a_s), and moves to
x_{t-1} = x_t - D(x0_hat, xT_hat, s) + D(x0_hat, xT_hat, s - 1) — the cold-diffusion update
that cancels the network's error to first order. The state after every step can be kept: the
one-shot adaptation blends them (they run from nearly the LDCT to the final estimate, so a
blend sets how much of the input's texture a model trained at another dose keeps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .degradation import alpha_schedule, degrade
from .network import ClearNet


@dataclass
class SampleResult:
    """``final``: (B, 1, H, W) in [0, 1]; ``steps``: (S, B, 1, H, W), the sampler's state x_{t-1}
    after each of the S steps run (S = T unless fewer were asked for; with ``keep_steps=False``
    only ``final[None]``; the last is the final estimate, unclamped), as the reference code's OSL
    blends them; the per-step x0_hat are not kept: each is already fully denoised, so a blend
    of them cannot undo a model's over-smoothing at a dose it was not trained for."""

    final: torch.Tensor
    steps: torch.Tensor


def network_input(state: torch.Tensor, context: torch.Tensor | None, use_context: bool) -> torch.Tensor:
    """Concat(LDCT i-1, state, LDCT i+1) when the model uses context, else the state alone.

    ``context`` is the (B, 3, H, W) LDCT stack; its centre channel is replaced by ``state``.
    """
    if not use_context:
        return state
    if context is None or context.shape[1] != 3:
        raise ValueError("a context model needs the (B, 3, H, W) LDCT stack [i-1, i, i+1]")
    return torch.cat([context[:, :1], state, context[:, 2:]], dim=1)


def _pad_to_multiple(x: torch.Tensor, multiple: int = 4) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def step_indices(trained_steps: int, steps: int | None = None) -> list[int]:
    """Descending time indices into the trained schedule.

    ``steps == trained_steps`` gives T-1, ..., 0 (the paper). Fewer steps skip evenly
    through the *trained* schedule (DDIM-style), so the time embedding stays in
    distribution: ``steps=1`` is a single evaluation at t = T-1 (a_t = 0, x_t = LDCT).
    """
    steps = trained_steps if steps is None else steps
    if not 1 <= steps <= trained_steps:
        raise ValueError(f"steps must be between 1 and {trained_steps} (the model's T), got {steps}")
    if steps == 1:
        return [trained_steps - 1]
    idx = torch.linspace(trained_steps - 1, 0, steps).round().long().tolist()
    return list(dict.fromkeys(idx))


@torch.no_grad()
def sample(model: ClearNet, ldct_stack: torch.Tensor, steps: int | None = None,
           keep_steps: bool = True) -> SampleResult:
    """Denoise a batch. ``ldct_stack`` is (B, 3, H, W) = [i-1, i, i+1] in [0, 1] (or (B, 1, H, W)
    for a model without context). Returns the final image and (``keep_steps``) the state after every step.

    ``steps`` defaults to the T the model was trained with (see :func:`step_indices`).
    """
    cfg = model.config
    alphas = alpha_schedule(cfg.steps).to(ldct_stack.device)
    seq = step_indices(cfg.steps, steps)
    stack, (h, w) = _pad_to_multiple(ldct_stack)
    c = stack.shape[1] // 2
    xT = stack[:, c:c + 1]
    context = stack if cfg.use_context else None

    x_t = xT
    x0_hat = xT
    outputs = []
    for i, s in enumerate(seq):
        t_batch = torch.full((stack.shape[0],), s, device=stack.device, dtype=torch.long)
        emm_input = x0_hat if i > 0 else None  # the first step has no previous estimate
        x0_hat = model(network_input(x_t, context, cfg.use_context), t_batch, emm_input, xT)
        a_s = alphas[s]
        xT_hat = (x_t - a_s * x0_hat) / (1.0 - a_s)
        a_next = alphas[seq[i + 1]] if i + 1 < len(seq) else torch.ones((), device=stack.device)
        x_t = x_t - degrade(x0_hat, xT_hat, a_s) + degrade(x0_hat, xT_hat, a_next)
        if keep_steps:
            outputs.append(x_t[..., :h, :w])
    final = x0_hat[..., :h, :w].clamp(0.0, 1.0)
    steps_out = torch.stack(outputs) if keep_steps else final[None]
    return SampleResult(final=final, steps=steps_out)
