"""The PyTorch/CUDA runtime of a precision plan.

:func:`lower_to_torch` replaces every Linear the plan quantizes with a :class:`PlanLinear` that
keeps *every* weight copy the plan needs resident (a layer that switches precision across steps
holds one packed copy per precision) and runs, at each call, the copy of the current denoising
step with the low-bit ops of :mod:`adatsq.backends.kernels`:

* ``W8A8``: INT8 weights per output channel, per-token INT8 activations (``w8a8_linear``);
* ``W4A8``: packed INT4 weights (per channel or groups of 64/128), INT8 activations (``w4a8_linear``);
* ``W4A16``: INT4 weight-only (``w4a16_linear``);
* ``FP16`` (16-bit): the layer's own weight.

A layer with a base (smoothing ``s`` and a 16-bit low-rank branch ``A B``, :class:`~adatsq.passes.
weights.LayerPrep`) computes ``op(x / s) + ((x / s) B^T) A^T`` as the search scored it. The step
comes from a :class:`~adatsq.passes.transforms.StepClock` shared by the layers: the precision
switches per step by reading the clock, without touching the modules (no re-preparation). On a
machine without CUDA/Triton the kernels take their torch reference path, so the CPU runtime
computes the plan's reference numerics (the search's simulation, up to float summation order).

:func:`step_callback` advances the clock from a diffusers pipeline's ``callback_on_step_end``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

#: lattice points the runtime executes: (w_bits, a_bits) -> kernel
KERNELS = {(8, 8): "w8a8", (4, 8): "w4a8", (4, 16): "w4a16"}


class PlanLinear(nn.Module):
    """One Linear of a plan: the packed copy of every precision it runs at, the step's copy chosen
    through ``clock``."""

    def __init__(self, linear: nn.Linear, variants: Mapping[str, tuple[str, Any]], per_step: tuple[str, ...],
                 clock: Any, smooth: torch.Tensor | None = None,
                 low_rank: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the 16-bit weight only where some step runs it (shared with the model, not copied)
        self.weight = linear.weight if any(k == "fp" for k, _ in variants.values()) else None
        self.bias = linear.bias
        self.variants = dict(variants)  # precision name -> (kernel, packed weight or None)
        self.per_step = tuple(per_step)
        self.clock = clock
        self.smooth = smooth
        self.low_rank = low_rank

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, precisions "
                f"{', '.join(sorted(self.variants))}{', smoothed' if self.smooth is not None else ''}"
                f"{f', rank-{self.low_rank[0].shape[1]} branch' if self.low_rank is not None else ''}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import kernels

        kind, packed = self.variants[self.per_step[self.clock.step]]
        if kind == "fp":
            return F.linear(x, self.weight, self.bias)
        xs = x / self.smooth if self.smooth is not None else x
        if kind == "w8a8":
            y = kernels.w8a8_linear(xs, packed, out_dtype=x.dtype)
        elif kind == "w4a8":
            y = kernels.w4a8_linear(xs, packed, out_dtype=x.dtype)
        else:
            y = kernels.w4a16_linear(xs, packed, out_dtype=x.dtype)
        if self.low_rank is not None:
            a, b = self.low_rank
            y = y + (xs @ b.T) @ a.T
        return y

    def nbytes(self) -> dict[str, int]:
        """Resident bytes: the packed copies, the 16-bit weight if some step runs it, the base."""
        out = {"copies": 0, "fp16_weight": 0, "base": 0}
        for kind, packed in self.variants.values():
            if kind == "fp":
                out["fp16_weight"] = self.weight.numel() * 2
            else:
                out["copies"] += sum(t.numel() * t.element_size() for t in dataclasses.astuple(packed)
                                     if isinstance(t, torch.Tensor))
        for t in ([self.smooth] if self.smooth is not None else []) + list(self.low_rank or ()):
            out["base"] += t.numel() * t.element_size()
        return out


@dataclasses.dataclass
class TorchRuntime:
    """What :func:`lower_to_torch` did: the layers it replaced (``restore()`` puts the originals
    back), the clock the layers read, and the resident weight memory."""

    layers: dict[str, PlanLinear]
    originals: dict[str, nn.Module]
    clock: Any
    parents: dict[str, tuple[nn.Module, str]]

    def memory(self) -> dict[str, int]:
        tot = {"copies": 0, "fp16_weight": 0, "base": 0}
        for m in self.layers.values():
            for k, v in m.nbytes().items():
                tot[k] += v
        tot["total"] = sum(tot.values())
        return tot

    def restore(self) -> None:
        if self.layers and not self.originals:
            raise InputError("runtime: lowered with keep_originals=False; the replaced layers are gone")
        for name, (parent, attr) in self.parents.items():
            setattr(parent, attr, self.originals[name])
        self.layers.clear()


def lower_to_torch(transformer: nn.Module, plan: Any, weights: Any, clock: Any, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, keep_originals: bool = True) -> TorchRuntime:
    """Replace the plan's Linear layers of ``transformer`` (in place) by :class:`PlanLinear` modules
    on ``device``; ``weights`` is the build's :class:`~adatsq.passes.weights.WeightCopyIndex`
    (``load_weight_copies(BUILD/weights.safetensors)``). Precisions outside :data:`KERNELS`
    (and 16-bit) are an error naming the layer and the precision. The packed copies are made on
    ``device`` (lower after moving the model there). ``keep_originals=False`` drops the replaced
    layers (their 16-bit weights are then freed unless a step runs them; no ``restore``)."""
    from . import kernels

    if len(plan.assignment) != clock.num_steps:
        raise InputError(f"runtime: the plan has {len(plan.assignment)} steps, the clock {clock.num_steps}")
    mods = dict(transformer.named_modules())
    by_name = {p.name: p for p in plan.lattice}
    layers, originals, parents = {}, {}, {}
    for i, param in enumerate(plan.layers):
        name = param[: -len(".weight")] if param.endswith(".weight") else param
        mod = mods.get(name)
        per_step = tuple(row[i] for row in plan.assignment)
        used = dict.fromkeys(per_step)
        if all(by_name[p].w_bits >= 16 and by_name[p].a_bits >= 16 for p in used):
            continue  # 16-bit at every step: the layer as it is
        if not isinstance(mod, nn.Linear):
            raise InputError(f"runtime: {param} is quantized by the plan but is not a Linear "
                             f"({type(mod).__name__}); the torch runtime lowers Linear layers only")
        if weights is None:
            raise InputError(f"runtime: {param} is quantized by the plan but no weights file was given")
        prep = weights.prep(param)
        bias = mod.bias.detach().to(device, torch.float32) if mod.bias is not None else None
        variants = {}
        for pname in used:
            prec = by_name[pname]
            if prec.w_bits >= 16 and prec.a_bits >= 16:
                variants[pname] = ("fp", None)
                continue
            kind = KERNELS.get((prec.w_bits, prec.a_bits))
            if kind is None:
                raise InputError(f"runtime: {param} runs at {pname}, which the torch runtime has no kernel for "
                                 f"(it runs {', '.join(f'W{w}A{a}' for w, a in KERNELS)} and 16-bit: build with "
                                 f"--target torch-cuda)")
            q = weights.find(param, prec.w_bits)
            try:
                packed = kernels.pack_w8a8(q, bias) if kind == "w8a8" else kernels.pack_w4(q, q.group_size, bias)
            except ValueError as exc:
                raise InputError(f"runtime: {param} at {pname}: {exc}") from None
            variants[pname] = (kind, packed.to(device))
        smooth = prep.smooth.to(device, dtype or torch.float32) if prep is not None else None
        low_rank = (tuple(t.to(device, dtype or torch.float32) for t in prep.low_rank)
                    if prep is not None and prep.low_rank is not None else None)
        parent_name, _, attr = name.rpartition(".")
        parents[name] = (mods[parent_name] if parent_name else transformer, attr)
        originals[name] = mod
        layers[name] = PlanLinear(mod, variants, per_step, clock, smooth, low_rank)
    # every layer is prepared before the first is swapped: an error above leaves the model untouched
    for name, (parent, attr) in parents.items():
        setattr(parent, attr, layers[name])
    return TorchRuntime(layers, originals if keep_originals else {}, clock, parents)


def step_callback(clock: Any) -> Callable:
    """A diffusers ``callback_on_step_end``: after step ``i`` the layers run step ``i + 1``'s
    precisions. Call ``clock.reset()`` before each generation (the pipeline's step 0 runs first)."""

    def callback(pipe, i, t, callback_kwargs):
        clock.step = min(i + 1, clock.num_steps - 1)
        return callback_kwargs

    return callback
