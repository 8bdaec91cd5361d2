"""Per-layer quantization transforms that a plan can turn on: smoothing, rotation, low rank.

A quantized Linear ``y = x W^T + b`` is simulated as

    x' = (x / s) @ R          (per-input-channel smoothing s, orthonormal rotation R)
    y  = Q_a(x') @ Q_w(W')^T  +  (x' @ B^T) @ A^T  +  b,     W' = (W * s) @ R - A B

which equals the float layer exactly when nothing is quantized (``x' W'^T = x W^T`` because
``R R^T = I``). The three options, our re-implementations of the published methods:

* **SmoothQuant-style migration** (Xiao et al.): ``s_j = max|x_j|^alpha / max|W_:j|^(1-alpha)``
  moves activation outliers into the weights; ``alpha`` is searched per layer on the output error
  of calibration activations (:func:`search_smoothing`). Deployed, ``1/s`` folds into the
  producer of ``x`` (a norm or the previous linear); here it is applied explicitly.
* **Hadamard rotation** (QuaRot-style, Ashkboos et al.): ``R`` is a block-diagonal Hadamard matrix
  (Sylvester blocks of the largest power of two dividing ``K``, at most 256) that spreads outliers
  across channels; the activation side is computed exactly (an online rotation in deployment).
* **Low-rank branch** (SVDQuant-style, Li et al.): the top ``rank`` singular directions of the
  (smoothed) weight stay in 16-bit as ``A B``; only the residual is quantized.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .quant import fake_quant_static, fake_quant_tokens, fake_quant_weight


@dataclasses.dataclass(frozen=True)
class LayerTransform:
    """What replaces one Linear in simulation (see the module docstring)."""

    weight: torch.Tensor  # Q_w(W') dequantized, [O, K]
    a_bits: int
    smooth: torch.Tensor | None = None  # s [K]
    rotation: torch.Tensor | None = None  # R [K, K]
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None  # (A [O, r], B [r, K])
    # deployed numerics (backends/onnx_qdq.py): a static per-tensor activation scale from calibration
    # replaces the search's dynamic per-token Q_a (None: per token, the simulation's default)
    act_scale: torch.Tensor | float | None = None
    a_fmt: str = "int"  # number format of Q_a: "int" (per token) or "nvfp4" (blocks of 16, dynamic)

    def __post_init__(self):
        # a block-diagonal rotation with equal blocks (block_hadamard) is applied block-wise:
        # K * b multiply-adds per token instead of K^2
        object.__setattr__(self, "_block", None if self.rotation is None else _repeated_block(self.rotation))
        if self.act_scale is not None and self.a_fmt != "int":
            raise ValueError(f"a static activation scale needs integer activations, not {self.a_fmt}")

    def to(self, device: torch.device | str) -> "LayerTransform":
        """The same transform with its tensors on ``device``."""
        mv = (lambda t: None if t is None else t.to(device))
        return LayerTransform(self.weight.to(device), self.a_bits, mv(self.smooth), mv(self.rotation),
                              None if self.low_rank is None else tuple(t.to(device) for t in self.low_rank),
                              self.act_scale.to(device) if isinstance(self.act_scale, torch.Tensor) else self.act_scale,
                              self.a_fmt)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth
        if self.rotation is not None:
            blk = self._block
            if blk is None:
                x = x @ self.rotation
            else:
                b = blk.shape[0]
                x = (x.reshape(*x.shape[:-1], x.shape[-1] // b, b) @ blk).reshape(x.shape)
        return x

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xt = self.input(x)
        xq = (fake_quant_tokens(xt, self.a_bits, fmt=self.a_fmt) if self.act_scale is None
              else fake_quant_static(xt, self.a_bits, self.act_scale))
        y = F.linear(xq, self.weight, bias)
        if self.low_rank is not None:
            a, b = self.low_rank
            y = y + (xt @ b.T) @ a.T
        return y


def _repeated_block(r: torch.Tensor) -> torch.Tensor | None:
    """The ``b x b`` block if ``r`` is block-diagonal with identical blocks (smallest such ``b``
    below ``K``), else None."""
    k = r.shape[0]
    if r.ndim != 2 or r.shape[1] != k:
        return None
    b = 1
    while b < k:
        if k % b == 0:
            blk = r[:b, :b]
            if torch.equal(r, torch.block_diag(*([blk] * (k // b)))):
                return blk.contiguous()
        b *= 2
    return None


def transformed_weight(w: torch.Tensor, smooth: torch.Tensor | None = None, rotation: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """``W' = (W * s) @ R`` (before the low-rank split)."""
    if smooth is not None:
        w = w * smooth[None, :]
    if rotation is not None:
        w = w @ rotation
    return w


# --------------------------------------------------------------------------- smoothing
def smoothing_scales(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)``, clamped away from 0."""
    a = act_absmax.float().clamp_min(1e-5)
    wm = w.float().abs().amax(0).clamp_min(1e-5)
    return (a ** alpha / wm ** (1 - alpha)).clamp_min(1e-5)


def search_smoothing(x: torch.Tensor, w: torch.Tensor, w_bits: int, a_bits: int,
                     alphas: Sequence[float] = tuple(i / 10 for i in range(11)),
                     act_absmax: torch.Tensor | None = None) -> tuple[float, torch.Tensor, float]:
    """The ``alpha`` (and scales) minimising ``||Q_a(x/s) Q_w(W s)^T - x W^T||^2`` on calibration
    rows ``x`` [N, K] with RTN weights; returns (alpha, s, relative error)."""
    x, w = x.float(), w.float()
    am = x.abs().amax(0) if act_absmax is None else act_absmax
    ref = x @ w.T
    best = (math.inf, 0.0, None)
    for alpha in alphas:
        s = smoothing_scales(am, w, alpha)
        err = _smoothed_error(x, w, s, w_bits, a_bits, ref)
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2], best[0] / max(float(ref.square().sum()), 1e-30)


def _smoothed_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, w_bits: int, a_bits: int,
                    ref: torch.Tensor) -> float:
    y = fake_quant_tokens(x / s, a_bits) @ fake_quant_weight(w * s, w_bits).T
    return float((y - ref).square().sum())


def search_stepwise_smoothing(xs: Sequence[torch.Tensor], act_absmax: Sequence[torch.Tensor], w: torch.Tensor,
                              w_bits: int, a_bits: int,
                              alphas: Sequence[float] = tuple(i / 10 for i in range(11))) -> tuple[float, float]:
    """Timestep-aware smoothing: one ``alpha`` for a layer, scales per step from that step's
    activation range. ``xs[i]`` are calibration rows of a step whose channel absmax is
    ``act_absmax[i]``; returns the ``alpha`` minimising the summed output error of those steps
    (RTN weights requantized per step) and its relative error."""
    w = w.float()
    pairs = [(x.float(), am) for x, am in zip(xs, act_absmax)]
    refs = [x @ w.T for x, _ in pairs]
    best = (math.inf, 0.0)
    for alpha in alphas:
        err = sum(_smoothed_error(x, w, smoothing_scales(am, w, alpha), w_bits, a_bits, ref)
                  for (x, am), ref in zip(pairs, refs))
        if err < best[0]:
            best = (err, alpha)
    return best[1], best[0] / max(sum(float(r.square().sum()) for r in refs), 1e-30)


# --------------------------------------------------------------------------- rotation
def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def block_hadamard(k: int, max_block: int = 256) -> torch.Tensor:
    """Block-diagonal orthonormal Hadamard for ``k`` input channels: blocks of the largest power
    of two dividing ``k`` (capped at ``max_block``)."""
    b = 1
    while k % (b * 2) == 0 and b * 2 <= max_block:
        b *= 2
    return torch.block_diag(*([hadamard(b)] * (k // b)))


# --------------------------------------------------------------------------- low rank
def low_rank_split(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W = A B + residual`` with ``A B`` the best rank-``rank`` approximation (SVD)."""
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(rank, sv.numel())
    a = (u[:, :r] * sv[:r]).float()
    b = vh[:r].float()
    return a, b, (w.double() - a.double() @ b.double()).float()


# --------------------------------------------------------------------------- simulation
class StepClock:
    """The denoising step that time-dependent transforms are at.

    Sampling advances it: pass :meth:`on_step` as (or call it from) the sampler's ``on_step``
    callback, which runs after step ``k``'s model call, and :meth:`reset` before each new batch.
    """

    def __init__(self, num_steps: int):
        self.num_steps = int(num_steps)
        self.step = 0

    def reset(self) -> None:
        self.step = 0

    def on_step(self, k: int, *_args) -> None:
        self.step = k + 1


def transforms_to(transforms: Mapping[str, "LayerTransform | Sequence[LayerTransform]"], device: torch.device | str
                  ) -> dict[str, "LayerTransform | list[LayerTransform]"]:
    """``transforms`` (as :func:`transformed_layers` takes them) with every tensor on ``device``;
    per-step lists keep their sharing (one moved object per distinct transform)."""
    moved: dict[int, LayerTransform] = {}

    def mv(t):
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    out = {}
    for p, tr in transforms.items():
        if isinstance(tr, LayerTransform):
            out[p] = mv(tr)
        elif isinstance(tr, (list, tuple)):
            out[p] = [mv(t) for t in tr]
        else:
            raise TypeError(f"{p}: cannot move a {type(tr).__name__} to {device}")
    return out


@contextlib.contextmanager
def transformed_layers(transformer: nn.Module, transforms: Mapping[str, "LayerTransform | Sequence[LayerTransform]"],
                       clock: StepClock | None = None) -> Iterator[None]:
    """Within the context, every Linear named in ``transforms`` (weight parameter names) runs its
    :class:`LayerTransform`; the modules are restored on exit. A per-step sequence of transforms
    (timestep-dependent weights, smoothing or precisions) needs ``clock``, which says which
    element the next call uses."""
    mods = dict(transformer.named_modules())
    patched = []
    try:
        for param, tr in transforms.items():
            m = mods[param[: -len(".weight")]]
            if not isinstance(m, nn.Linear):
                raise TypeError(f"{param}: only Linear layers take transforms, got {type(m).__name__}")
            if isinstance(tr, LayerTransform) or (callable(tr) and not isinstance(tr, (list, tuple))):
                m.forward = lambda x, m=m, tr=tr: tr(x, m.bias)  # a transform, or any tr(x, bias)
            else:
                if clock is None:
                    raise InputError(f"{param}: per-step transforms need a StepClock")
                if len(tr) != clock.num_steps:
                    raise InputError(f"{param}: {len(tr)} per-step transforms for a {clock.num_steps}-step schedule "
                                     "(calibrated on a different schedule)")
                m.forward = lambda x, m=m, tr=tuple(tr): tr[clock.step](x, m.bias)
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
