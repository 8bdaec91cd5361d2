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

**Under ``torch.compile``** each quantized layer is one custom op (``adatsq::plan_linear``;
``adatsq::quantized_linear`` after the activation quantization), opaque to the compiler: the op
reads the clock when it runs, so the precision switches per step inside one compiled graph (no
guard on the step, no recompilation, the segment is data). Where every precision a layer runs takes
INT8 activations (W8A8 and W4A8), or every one FP8 activations (``fp8``, ``w4f8``; their bias is
added outside the op), the per-token quantization (and
the smoothing division) are written as plain torch ops in front of the op, so the compiler fuses
them into the ops that produce ``x`` (the adaLN modulation, the attention output) and computes
them once for the layers that share an input (q/k/v). Those compiled quantization ops are the
reference numerics traced by Inductor: its division may round differently from IEEE division in
the last float32 bit, which can move a code at a rounding tie (eager calls use the bit-exact
Triton pass).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

#: lattice points the runtime executes: (w_bits, a_bits) -> kernel
KERNELS = {(8, 8): "w8a8", (4, 8): "w4a8", (4, 16): "w4a16"}
#: kernels of a layer: these plus "fp8" (FP8 E4M3 W8A8), "w4f8" (INT4 weights, FP8 E4M3 activations
#: and FP8 math; both :func:`lower_linears` only) and "fp" (16-bit)
KINDS = ("w8a8", "w4a8", "w4a16", "fp8", "w4f8", "fp")
#: kernels that take per-token INT8 activations (one quantization serves every one of them)
INT8_ACT = frozenset({"w8a8", "w4a8"})
#: kernels that take per-token FP8 E4M3 activations
FP8_ACT = frozenset({"fp8", "w4f8"})

#: PlanLinear instances by uid, for the custom ops (weak: a dropped runtime frees its layers)
_LAYERS: list[weakref.ref] = []


def _layer(uid: int) -> "PlanLinear":
    m = _LAYERS[uid]() if 0 <= uid < len(_LAYERS) else None
    if m is None:
        raise RuntimeError(f"adatsq runtime: layer {uid} no longer exists")
    return m


@torch.library.custom_op("adatsq::plan_linear", mutates_args=())
def _plan_linear_op(x: torch.Tensor, uid: int) -> torch.Tensor:
    """A lowered layer on ``x [M, K]`` at the clock's step."""
    return _layer(uid)._run(x)


@_plan_linear_op.register_fake
def _(x, uid):
    return x.new_empty((x.shape[0], _layer(uid).out_features))


@torch.library.custom_op("adatsq::quantized_linear", mutates_args=())
def _quantized_linear_op(codes: torch.Tensor, scales: torch.Tensor, uid: int, out_dtype: torch.dtype) -> torch.Tensor:
    """A lowered layer whose precisions all take INT8 (w8a8, w4a8) or all FP8 (fp8, w4f8)
    activations, on activations already quantized per token."""
    return _layer(uid)._run_quantized(codes, scales, out_dtype)


@_quantized_linear_op.register_fake
def _(codes, scales, uid, out_dtype):
    return scales.new_empty((codes.shape[0], _layer(uid).out_features), dtype=out_dtype)


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
        from . import kernels

        self.kinds = frozenset(k for k, _ in self.variants.values())
        unknown = self.kinds - set(KINDS)
        if unknown:
            raise ValueError(f"PlanLinear: unknown kernel {sorted(unknown)[0]!r} (known: {', '.join(KINDS)})")
        fp8 = [p for k, p in self.variants.values() if k == "fp8"]
        self._fp8_gpu = bool(fp8) and kernels.fp8_supported(fp8[0].data.device)
        self.uid = len(_LAYERS)
        _LAYERS.append(weakref.ref(self))

    def extra_repr(self) -> str:
        return (f"{self.in_features} -> {self.out_features}, precisions "
                f"{', '.join(sorted(self.variants))}{', smoothed' if self.smooth is not None else ''}"
                f"{f', rank-{self.low_rank[0].shape[1]} branch' if self.low_rank is not None else ''}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import kernels

        kinds = self.kinds
        if kinds == {"fp"}:
            return F.linear(x, self.weight, self.bias)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if not (kinds <= INT8_ACT or kinds <= FP8_ACT):  # the op smooths and adds the branch itself
            return torch.ops.adatsq.plan_linear(x2, self.uid).reshape(*lead, self.out_features)
        xs = x2 / self.smooth if self.smooth is not None else x2
        compiling = torch.compiler.is_compiling()
        fp8 = kinds <= FP8_ACT
        codes, scales = (kernels._quantize_tokens_ref(xs, fp8=fp8) if compiling  # plain ops: fused
                         else kernels.quantize_tokens_fp8(xs) if fp8 else kernels.quantize_tokens_int8(xs))
        if kinds == {"fp8"}:  # one FP8 copy: the GEMM itself is traceable
            _, packed = next(iter(self.variants.values()))
            y = (kernels._scaled_mm_rowwise(codes, scales.float(), packed, x.dtype) if self._fp8_gpu
                 else kernels.fp8_gemm(codes, scales, packed, x.dtype, backend="torch"))
        else:
            y = torch.ops.adatsq.quantized_linear(codes, scales.float(), self.uid, x.dtype)
            if fp8 and self.bias is not None:  # added out here, where the compiler fuses it into the next
                # op (eager inside the opaque op it was a separate pass over the output: 3.8 ms a step on
                # Flux-dev); the INT8 kernels add it in their epilogue
                y = y + self.bias.to(y.dtype)
        return self._branch(y, xs).reshape(*lead, self.out_features)

    def _branch(self, y: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        if self.low_rank is None:
            return y
        a, b = self.low_rank
        return (y + (xs.to(b.dtype) @ b.T) @ a.T).to(y.dtype)

    def current(self) -> tuple[str, Any]:
        """(kernel, packed weight) of the clock's step."""
        return self.variants[self.per_step[self.clock.step]]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        from . import kernels

        kind, packed = self.current()
        if kind == "fp":
            return F.linear(x, self.weight, self.bias)
        xs = x / self.smooth if self.smooth is not None else x
        if kind == "w8a8":
            y = kernels.w8a8_linear(xs, packed, out_dtype=x.dtype)
        elif kind == "w4a8":
            y = kernels.w4a8_linear(xs, packed, out_dtype=x.dtype)
        elif kind == "fp8":
            y = kernels.fp8_linear(xs, packed, out_dtype=x.dtype)
        elif kind == "w4f8":
            y = kernels.w4f8_linear(xs, packed, out_dtype=x.dtype)
        else:
            y = kernels.w4a16_linear(xs, packed, out_dtype=x.dtype)
        return self._branch(y, xs)

    def _run_quantized(self, codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The step's GEMM on per-token quantized activations; FP8 kernels without the bias
        (``forward`` adds it)."""
        from . import kernels

        kind, packed = self.current()
        if kind == "w8a8":
            return kernels.int8_gemm(codes, scales, packed.codes, packed.scales, packed.bias, out_dtype)
        if kind == "w4a8":
            return kernels.w4a8_gemm(codes, scales, packed, out_dtype)
        gemm = kernels.fp8_gemm if kind == "fp8" else kernels.w4f8_gemm
        return gemm(codes, scales, dataclasses.replace(packed, bias=None), out_dtype)

    def nbytes(self) -> dict[str, int]:
        """Resident bytes: the packed copies, the 16-bit weight if some step runs it, the base."""
        out = {"copies": 0, "fp16_weight": 0, "base": 0}
        for kind, packed in self.variants.values():
            if kind == "fp":
                out["fp16_weight"] = self.weight.numel() * self.weight.element_size()
            else:
                fields = (getattr(packed, f.name) for f in dataclasses.fields(packed))
                out["copies"] += sum(t.numel() * t.element_size() for t in fields if isinstance(t, torch.Tensor))
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
    layers = {}
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
            kind = KERNELS.get((prec.w_bits, prec.a_bits)) if prec.fmt == "int" else None
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
        layers[name] = PlanLinear(mod, variants, per_step, clock, smooth, low_rank)
    return _swap(transformer, layers, keep_originals, clock)


def _swap(transformer: nn.Module, layers: dict[str, "PlanLinear"], keep_originals: bool, clock: Any) -> TorchRuntime:
    # every layer is prepared before the first is swapped: an error before this leaves the model untouched
    mods = dict(transformer.named_modules())
    originals, parents = {}, {}
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = mods[parent_name] if parent_name else transformer
        originals[name] = getattr(parent, attr)
        parents[name] = (parent, attr)
        setattr(parent, attr, layer)
    return TorchRuntime(layers, originals if keep_originals else {}, clock, parents)


def lower_linears(transformer: nn.Module, kernels_per_step: Mapping[str, Sequence[str]], clock: Any,
                  group_size: int | None = None, keep_originals: bool = True) -> TorchRuntime:
    """Lower Linear layers by name to :class:`PlanLinear` with round-to-nearest weights packed from
    the layers' own weights, where they are (no build needed: a synthetic or hand-written plan, e.g.
    for speed measurements): ``kernels_per_step[name][k]`` is the kernel of step ``k``, one of
    :data:`KINDS` (``fp8``: FP8 E4M3 weights per channel and per-token FP8 activations; ``w4f8``: INT4
    weights per channel, per-token FP8 activations, FP8 math)."""
    from . import kernels

    mods = dict(transformer.named_modules())
    layers = {}
    for name, per_step in kernels_per_step.items():
        mod = mods.get(name)
        if not isinstance(mod, nn.Linear):
            raise InputError(f"runtime: {name} is not a Linear layer of the model "
                             f"({type(mod).__name__ if mod is not None else 'no such module'})")
        per_step = tuple(per_step)
        if len(per_step) != clock.num_steps:
            raise InputError(f"runtime: {name} has {len(per_step)} steps, the clock {clock.num_steps}")
        bad = sorted(set(per_step) - set(KINDS))
        if bad:
            raise InputError(f"runtime: {name}: unknown kernel {bad[0]!r} (known: {', '.join(KINDS)})")
        w = mod.weight.detach()
        bias = mod.bias.detach().float() if mod.bias is not None else None
        variants = {}
        for kind in dict.fromkeys(per_step):
            if kind == "fp":
                variants[kind] = ("fp", None)
            elif kind == "w8a8":
                variants[kind] = (kind, kernels.pack_w8a8(w.float(), bias))
            elif kind == "fp8":
                variants[kind] = (kind, kernels.pack_fp8(w, bias))
            elif kind == "w4f8":  # _scaled_mm takes one weight scale per channel: no groups
                variants[kind] = (kind, kernels.pack_w4(w.float(), None, bias))
            else:
                variants[kind] = (kind, kernels.pack_w4(w.float(), group_size, bias))
        layers[name] = PlanLinear(mod, variants, per_step, clock)
    return _swap(transformer, layers, keep_originals, clock)


def step_callback(clock: Any) -> Callable:
    """A diffusers ``callback_on_step_end``: after step ``i`` the layers run step ``i + 1``'s
    precisions. Call ``clock.reset()`` before each generation (the pipeline's step 0 runs first)."""

    def callback(pipe, i, t, callback_kwargs):
        clock.step = min(i + 1, clock.num_steps - 1)
        return callback_kwargs

    return callback
