"""CLEAR-Net: the contextual error-modulated restoration network of CoreDiff.

A normalisation-free 3-scale U-Net predicts the clean slice x0 from the current diffusion
state x_t (residually: x0_hat = unet(input) + x_t). Two additions make it CoreDiff's:

* **Context (CTX)** — the input is Concat(LDCT slice i-1, x_t, LDCT slice i+1). Only the
  centre channel is diffused; the raw neighbours anchor anatomy along z and carry no error.
* **Error-modulated module (EMM)** — during sampling the network is fed its *own* earlier
  estimate, which drifts from the training distribution. A small conv net reads
  Concat(x0_hat_prev, xT) and predicts per-channel (gamma, beta) that recalibrate the time
  embedding: h + gamma * temb + beta instead of h + temb.

Both are switchable for ablations; ``width`` scales every layer (64 = the paper, 4.8 M params).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
import torch.nn.functional as F

from . import CoreDiffError


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture hyper-parameters; stored with every checkpoint so weights are self-describing."""

    width: int = 64            # channels of the first scale; scales are width, 2*width, 4*width
    use_context: bool = True   # CTX: adjacent LDCT slices as extra input channels
    use_emm: bool = True       # EMM: error-modulated time embedding
    time_dim: int = 32         # sinusoidal embedding size
    time_hidden: int = 128     # hidden size of the time MLP
    steps: int = 10            # T, the number of sampling steps the model was trained for
    hu_scale: float = 200.0    # internal normalisation: 0 HU -> 0, +-hu_scale HU -> +-1 (0 = off)

    @property
    def in_channels(self) -> int:
        return 3 if self.use_context else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sin/cos embedding of integer steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _conv_stack(c_in: int, c_out: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ErrorModulation(nn.Module):
    """EMM: (x0_hat_prev, xT) -> (gamma, beta), each (B, C, 1, 1), for one U-Net level.

    Three conv+ReLU+avg-pool blocks, a 1x1 conv to 2C and a global average pool: the
    modulation summarises *how far* the current estimate is from the LDCT, not where.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        w = max(width // 2, 4)
        self.features = nn.Sequential(
            nn.Conv2d(2, w, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Conv2d(4 * w, 2 * channels, 1),
        )

    def forward(self, x0_prev: torch.Tensor, xT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(torch.cat([x0_prev, xT], dim=1)).mean(dim=(2, 3), keepdim=True)
        gamma, beta = h.chunk(2, dim=1)
        return gamma, beta


class ClearNet(nn.Module):
    """CLEAR-Net. ``forward(x, t, x0_prev=None, xT=None)`` returns x0_hat (B, 1, H, W).

    ``x`` is (B, in_channels, H, W) with the diffused slice in the centre channel; H and W
    must be multiples of 4 (the sampler pads). EMM runs only when ``x0_prev`` is given.
    """

    def __init__(self, config: NetworkConfig = NetworkConfig()):
        super().__init__()
        self.config = config
        w = config.width
        level_channels = (w, 2 * w, 2 * w, w)  # where time features are injected

        self.time_mlp = nn.Sequential(
            nn.Linear(config.time_dim, config.time_hidden), nn.GELU(),
            nn.Linear(config.time_hidden, config.time_dim),
        )
        self.time_proj = nn.ModuleList(
            nn.Sequential(nn.GELU(), nn.Linear(config.time_dim, c)) for c in level_channels
        )
        self.emm = (
            nn.ModuleList(ErrorModulation(c, w) for c in level_channels) if config.use_emm else None
        )

        self.enc1 = _conv_stack(config.in_channels, w, 2)
        self.enc2 = _conv_stack(w, 2 * w, 3)
        self.enc3 = _conv_stack(2 * w, 4 * w, 6)
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = _conv_stack(2 * w, 2 * w, 3)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = _conv_stack(w, w, 2)
        self.out = nn.Conv2d(w, 1, 1)
        # Start as the identity (x0_hat = x_t): training only has to learn the correction.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def centre_channel(self) -> int:
        return self.config.in_channels // 2

    def time_features(self, t: torch.Tensor, x0_prev: torch.Tensor | None, xT: torch.Tensor | None) -> list[torch.Tensor]:
        """Per-level (B, C, 1, 1) additive features: temb, or gamma*temb + beta with EMM."""
        temb = self.time_mlp(sinusoidal_embedding(t, self.config.time_dim))
        feats = [proj(temb)[:, :, None, None] for proj in self.time_proj]
        if self.emm is not None and x0_prev is not None:
            if xT is None:
                raise ValueError("EMM needs the LDCT slice xT alongside x0_prev")
            modulated = []
            for f, emm in zip(feats, self.emm):
                gamma, beta = emm(x0_prev, xT)
                modulated.append(gamma * f + beta)
            feats = modulated
        return feats

    def _normalise(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """[0, 1] network range -> 0 HU at 0 and +-hu_scale HU at +-1.

        Soft-tissue contrast and CT noise are a few HU, i.e. ~1e-3 in the [0, 1] range; on
        that scale the correction the network must output is tiny and training crawls.
        Normalising to ~unit soft-tissue scale (and scaling the residual back) is a fixed
        reparametrisation: the model is the same function class, it just learns far faster.
        Zero padding then also means "water", not "air", at image borders.
        """
        if x is None or not self.config.hu_scale:
            return x
        return (x - 1024.0 / 4096.0) * (4096.0 / self.config.hu_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None,
                xT: torch.Tensor | None = None) -> torch.Tensor:
        f1, f2, f3, f4 = self.time_features(t, self._normalise(x0_prev), self._normalise(xT))
        c = self.centre_channel
        residual_scale = self.config.hu_scale / 4096.0 if self.config.hu_scale else 1.0
        x_in = x
        x = self._normalise(x)
        h1 = self.enc1(x) + f1
        h2 = self.enc2(F.avg_pool2d(h1, 2)) + f2
        h3 = self.enc3(F.avg_pool2d(h2, 2))
        d2 = self.dec2(self.up2(h3) + h2) + f3
        d1 = self.dec1(self.up1(d2) + h1) + f4
        return self.out(d1) * residual_scale + x_in[:, c:c + 1]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def widened(model: ClearNet, factor: int = 2, seed: int = 0) -> ClearNet:
    """The same function in a CLEAR-Net ``factor`` times wider (Net2Net-style widening).

    Why: a trained narrow model is a far better start for a wide one than random weights, so
    more capacity can be tried without paying again for everything the narrow one learned.
    Every width-dependent channel is copied ``factor`` times; a layer reading copied channels
    splits each original input weight among the copies in random proportions summing to one,
    so the output is unchanged while the copies get different gradients and can diverge.
    The network has no normalisation layers, so copying and splitting is exact.
    """
    if factor < 2:
        raise CoreDiffError(f"widening factor must be an integer >= 2, not {factor}")
    wide = ClearNet(replace(model.config, width=model.config.width * factor))
    gen = torch.Generator().manual_seed(seed)
    chunked = {id(e.features[-1]) for e in (model.emm or [])}  # outputs [gamma, beta]: copy each half
    for (name, old), (_, new) in zip(model.named_modules(), wide.named_modules()):
        if not isinstance(old, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            continue
        out_dim, in_dim = (1, 0) if isinstance(old, nn.ConvTranspose2d) else (0, 1)
        w = old.weight.detach()
        if new.weight.shape[in_dim] != w.shape[in_dim]:  # reads copied channels: split the weights
            c = w.shape[in_dim]
            share = torch.rand(factor, c, generator=gen) + 0.5
            share = (share / share.sum(0)).reshape(-1)  # copy k of channel i: share[k * c + i]
            shape = [1] * w.dim()
            shape[in_dim] = factor * c
            w = torch.cat([w] * factor, in_dim) * share.reshape(shape).to(w)  # w's dtype and device
        tensors = {"weight": w, "bias": old.bias.detach() if old.bias is not None else None}
        for key, t in tensors.items():
            if t is None:
                continue
            dim = out_dim if key == "weight" else 0
            target = getattr(new, key)
            if target.shape[dim] != t.shape[dim]:  # writes copied channels
                halves = t.chunk(2, dim) if id(old) in chunked else (t,)
                t = torch.cat([torch.cat([h] * factor, dim) for h in halves], dim)
            if t.shape != target.shape:
                raise CoreDiffError(f"cannot widen {name}.{key}: {tuple(t.shape)} does not grow into "
                                    f"{tuple(target.shape)} (widths whose EMM size is not a multiple)")
            target.copy_(t)
    return wide.train(model.training)
