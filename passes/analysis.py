"""Analysis passes over the full-precision denoising trajectory.

Four passes, run in this order by :func:`analyze` (each is an ``analysis`` pass: it annotates the
layer nodes of a :class:`~adatsq.frontend.export.DiTGraph` and never changes the graph):

1. :class:`CaptureTrajectory` samples the calibration set with the FP model and keeps the latent
   before every step (``adatsq.trajectory`` on the graph's output node).
2. :class:`TemporalFisher` replays every step on the trajectory points with gradients of the
   model's own training loss, the rectified-flow velocity loss
   ``L_n(t) = mean((v_theta(x_t, sigma_t, c) - (eps - x0_hat))^2)`` where ``x_t`` is the trajectory
   point at step ``t``, ``eps`` the sample's initial noise and ``x0_hat`` its FP final sample (the
   coupling the sampler itself produced). Both passes of classifier-free guidance are samples.
   Per step ``t`` and layer ``l`` it records

   * ``I_w[t][l] = E_n ||dL_n/dW_l||_F^2`` (the empirical Fisher trace of the layer's weight, from
     exact per-sample gradients ``G_n^T X_n``; :func:`~adatsq.passes.capture.per_sample_weight_grad_sqnorm`),
   * ``I_y[t][l] = E_n ||dL_n/dY_l||^2`` (the cheaper output variant),
   * ``Q[t][l][p] = E_n sum((dL_n/dY_l * dY_l,p)^2)``: the diagonal-Fisher-weighted output error of
     quantizing layer ``l`` alone at precision ``p`` (BRECQ's Fisher approximation), a per-layer
     sensitivity proxy that costs no extra model calls (compared with end-to-end errors after
     scaling by ``dsigma_t^2``, which turns a velocity error into the latent error of the step),

   and normalises the chosen score over steps into ``alpha[t][l] = S * I[t][l]^(1/tau) /
   sum_t' I[t'][l]^(1/tau)`` (mean 1 over steps, so a Fisher-weighted Hessian stays on the scale of
   the uniform one; ``tau`` is the temperature, default 1). ``adatsq.fisher`` on every layer node.
   ``fisher_weighting="latent"`` multiplies ``I[t]`` by ``dsigma_t^2`` first: the Fisher of the
   step's latent update ``x + dsigma_t * v`` rather than of the velocity loss. On flux-fmnist the
   plain loss Fisher of the last step (sigma 0.05) is 40x that of any middle step, while that
   step moves the latent least; both weightings are measured in docs/analysis.md.
3. :class:`ActivationStatistics` replays every step once more and accumulates per layer and step
   the per-channel absmax, per-token absmax range, and the input second moment ``X^T X``
   (``adatsq.stats``, ``adatsq.hessian``). Per-call products are float32 GEMMs; the running sums
   over calls and steps are float64 (sums of up to millions of rank-1 terms). Hessians are kept
   ``per_step``, in ``grouped`` step ranges, or ``weighted``: the uniform sum and
   ``H' = sum_t alpha[t][l] X_t^T X_t`` directly (needs the Fisher pass first; two matrices per
   layer instead of S). Layers are processed in chunks that fit ``max_hessian_bytes``; the
   trajectory is replayed once per chunk, and each finished chunk goes to the cache.
4. :class:`ReconstructionSensitivity`: for each layer group, step and precision, the error one
   step of quantization introduces, ``E_n mean((dsigma_t * (v_q - v_fp))^2)`` (the latent
   perturbation a group quantized at step ``t`` alone causes; guided velocity, RTN fake
   quantization), plus the exact end-to-end error of the final sample for a stratified subset of
   (group, step, precision) triples and the Spearman rank agreement of both proxies with it.

Everything is cached by :class:`~adatsq.passes.cache.AnalysisCache` under the model fingerprint
and the calibration key; interrupted passes resume from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import re
import resource
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..frontend.layers import LayerRef, LayerTable
from ..frontend.sampling import _cat_conditions
from .annotations import annotate, get_annotation, register_annotation
from .cache import AnalysisCache, Checkpointer, options_key
from .calibration import CalibrationSet
from .capture import (capture, input_tokens, layer_modules, output_tokens, per_sample_weight_grad_sqnorm,
                      quantized_call, replicated_quantization)
from .infra import Pass, PassResult, PreconditionError
from .quant import fake_quant_weight

Progress = Callable[[str, int, int], None]
HESSIAN_MODES = ("weighted", "per_step", "grouped", "none")
GROUPINGS = ("layer", "role", "block")
FISHER_SOURCES = ("weight", "output")
_PREC_RE = re.compile(r"^W(\d+)A(\d+)$")


def parse_point(name: str) -> tuple[int, int, str]:
    """A lattice point's name -> (weight bits, activation bits, number format): ``WxAy`` (integers)
    or an NVFP4 point (``NVFP4``: W4A4, ``NVFP4A16``: weights only)."""
    from .search import NVFP4_POINTS

    if name in NVFP4_POINTS:
        p = NVFP4_POINTS[name]
        return p.w_bits, p.a_bits, p.fmt
    return (*parse_precision(name), "int")


def parse_precision(name: str) -> tuple[int, int]:
    m = _PREC_RE.match(name)
    if not m or int(m.group(1)) not in (2, 3, 4, 6, 8) or int(m.group(2)) not in (2, 3, 4, 6, 8, 16):
        raise InputError(f"analysis: precision {name!r} is not WxAy with x in 2,3,4,6,8 and y in 2,3,4,6,8,16")
    return int(m.group(1)), int(m.group(2))


# =========================================================================== options
@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    hessian: str = "weighted"  # weighted | per_step | grouped | none
    step_groups: int = 4  # for hessian == "grouped"
    hessian_tokens: int | None = None  # subsample this many tokens per model call and layer
    temperature: float = 1.0
    fisher_source: str = "weight"  # which Fisher score alpha is computed from
    fisher_weighting: str = "loss"  # loss: I[t] as is; latent: I[t] * dsigma_t^2 (see module doc)
    groups: str = "block"  # sensitivity grouping: layer | role | block
    precisions: tuple[str, ...] = ("W3A3", "W4A4", "W4A8", "W8A8")
    sensitivity_samples: int = 10
    e2e_steps: int = 5  # steps at which end-to-end errors are measured ...
    e2e_per_step: int = 4  # ... for this many (group, precision) pairs each
    seed: int = 0
    max_hessian_bytes: int = 4 << 30
    hessian_layers: str | None = None  # regex on parameter names: Hessians only for these (all: None)

    def validate(self, calib: CalibrationSet | None = None) -> None:
        if self.hessian not in HESSIAN_MODES:
            raise InputError(f"analysis: hessian mode {self.hessian!r} is not one of {', '.join(HESSIAN_MODES)}")
        if self.groups not in GROUPINGS:
            raise InputError(f"analysis: grouping {self.groups!r} is not one of {', '.join(GROUPINGS)}")
        if self.fisher_weighting not in ("loss", "latent"):
            raise InputError(f"analysis: Fisher weighting {self.fisher_weighting!r} is not 'loss' or 'latent'")
        if self.fisher_source not in FISHER_SOURCES:
            raise InputError(f"analysis: Fisher source {self.fisher_source!r} is not one of {FISHER_SOURCES}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise InputError(f"analysis: temperature must be a positive number, got {self.temperature}")
        if self.step_groups < 1:
            raise InputError(f"analysis: step groups must be >= 1, got {self.step_groups}")
        if self.hessian_tokens is not None and self.hessian_tokens < 1:
            raise InputError(f"analysis: hessian token subsample must be >= 1, got {self.hessian_tokens}")
        if not self.precisions:
            raise InputError("analysis: no precisions to measure sensitivity at")
        for p in self.precisions:
            parse_point(p)
        if self.sensitivity_samples < 1 or self.e2e_steps < 0 or self.e2e_per_step < 0:
            raise InputError("analysis: sensitivity_samples must be >= 1, e2e counts >= 0")
        if self.max_hessian_bytes < 1:
            raise InputError("analysis: max_hessian_bytes must be positive")
        if self.hessian_layers is not None:
            try:
                re.compile(self.hessian_layers)
            except re.error as exc:
                raise InputError(f"analysis: hessian layer pattern {self.hessian_layers!r} is not a regex ({exc})") from None
        if calib is not None and self.hessian == "grouped" and self.step_groups > calib.num_steps:
            raise InputError(f"analysis: {self.step_groups} step groups for {calib.num_steps} steps")

    def hessian_slots(self, steps: int) -> int:
        return {"weighted": 2, "per_step": steps, "grouped": self.step_groups, "none": 0}[self.hessian]


# =========================================================================== annotations
@register_annotation("adatsq.trajectory")
@dataclasses.dataclass(frozen=True)
class TrajectoryInfo:
    """On the output node: what the FP calibration trajectory was."""

    calibration: str  # calibration key
    samples: int
    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    guidance: float
    final_rms: float


@register_annotation("adatsq.fisher")
@dataclasses.dataclass(frozen=True)
class FisherScores:
    """On every call node of a layer: its temporal Fisher scores and step weights."""

    param: str
    weight: tuple[float, ...]  # I_w[t]
    output: tuple[float, ...]  # I_y[t]
    alpha: tuple[float, ...]  # normalised weights over steps (mean 1)
    source: str  # "weight" | "output": what alpha is computed from
    temperature: float


@register_annotation("adatsq.fisher_profile")
@dataclasses.dataclass(frozen=True)
class FisherProfile:
    """On the output node: the per-step totals ``I[t] = sum_l I[t][l]``."""

    weight: tuple[float, ...]
    output: tuple[float, ...]
    loss: tuple[float, ...]  # the velocity loss at each step
    max_min_ratio: float  # of the weight-based total across steps
    spearman_weight_output: float  # rank agreement of I_w and I_y over all (step, layer) cells


@register_annotation("adatsq.stats", portable=False)
@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """On every call node of a layer: its input statistics per step (tensors, not exported to ONNX)."""

    param: str
    channel_absmax: torch.Tensor  # [S, K] max |x| per input channel
    token_absmax: torch.Tensor  # [S, 3] min / mean / max over tokens of the per-token max |x|
    tokens: torch.Tensor  # [S] tokens seen


@register_annotation("adatsq.hessian", portable=False)
@dataclasses.dataclass(frozen=True)
class HessianRef:
    """On every call node of a layer: ``sum X^T X`` per slot (float64) and the token counts.

    ``mode`` ``weighted``: slot 0 is the uniform sum over steps, slot 1 ``sum_t alpha[t] X_t^T X_t``;
    ``per_step``: one slot per step; ``grouped``: one per step range (``slots`` lists the steps).
    The matrices live in the analysis cache (``path``) or in memory (``tensor``).
    """

    param: str
    mode: str
    slots: tuple[tuple[int, ...], ...]
    counts: tuple[float, ...]
    path: str = ""
    name: str = ""
    tensor: Any = None

    def sums(self) -> torch.Tensor:
        """``[slots, K, K]`` float64 sums."""
        if self.tensor is not None:
            return self.tensor
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.name)

    def mean(self, slot: int = 0) -> torch.Tensor:
        """The slot's sum divided by its (weighted) token count: ``E[x x^T]``."""
        return self.sums()[slot] / max(self.counts[slot], 1e-30)


@register_annotation("adatsq.sensitivity")
@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """On every call node of a layer: its group's per-step, per-precision error, and the layer's own
    Fisher proxy."""

    param: str
    group: str
    precisions: tuple[str, ...]
    group_error: tuple[tuple[float, ...], ...]  # [P][S] one-step latent MSE, group quantized alone
    layer_fisher_proxy: tuple[tuple[float, ...], ...]  # [P][S] Q[t][l][p]


@register_annotation("adatsq.sensitivity_check")
@dataclasses.dataclass(frozen=True)
class SensitivityCheck:
    """On the output node: exact end-to-end errors for a subset and the proxies' rank agreement."""

    groups: str
    triples: tuple[tuple[str, int, str], ...]  # (group, step, precision)
    end_to_end: tuple[float, ...]  # final-sample MSE vs FP
    velocity_proxy: tuple[float, ...]
    fisher_proxy: tuple[float, ...]
    spearman_velocity: float
    spearman_fisher: float


# =========================================================================== helpers
def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 3 points."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3:
        return float("nan")

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        sx = x[order]
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and sx[j + 1] == sx[i]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _dsigma2(sigmas: torch.Tensor) -> torch.Tensor:
    """``(sigma_{t+1} - sigma_t)^2`` per step: turns a velocity-space quantity into the latent change
    of that Euler step."""
    s = sigmas.double()
    return (s[1:] - s[:-1]) ** 2


def normalise_alpha(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[S, L]`` Fisher scores -> weights over steps with mean 1 per layer (uniform where a layer
    has no gradient at all)."""
    s = scores.double().clamp_min(0) ** (1.0 / temperature)
    tot = s.sum(0, keepdim=True)
    steps = scores.shape[0]
    return torch.where(tot > 0, steps * s / tot.clamp_min(1e-300), torch.ones_like(s))


def layer_groups(table: LayerTable, mode: str) -> "OrderedDict[str, list[str]]":
    """Layer groups of the sensitivity analysis: every layer, role within a block, or block.
    Layers outside blocks are grouped by role (``layer``: alone)."""
    out: "OrderedDict[str, list[str]]" = OrderedDict()
    for info in table:
        if mode == "layer":
            name = info.module
        elif info.block is None:
            name = info.role
        elif mode == "role":
            name = f"{info.block}/{info.role}"
        else:
            name = info.block
        out.setdefault(name, []).append(info.param)
    return out


def layer_nodes(graph: Any) -> "OrderedDict[str, list[Any]]":
    out: "OrderedDict[str, list[Any]]" = OrderedDict()
    for node in graph.graph.nodes:
        ref = get_annotation(node, LayerRef)
        if ref is not None:
            out.setdefault(ref.param, []).append(node)
    return out


def output_node(graph: Any) -> Any:
    return next(n for n in reversed(graph.graph.nodes) if n.op == "output")


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _repeat_condition(cond: Any, times: int) -> Any:
    out = cond
    for _ in range(times - 1):
        out = _cat_conditions(out, cond)
    return out


def replay_inputs(calib: CalibrationSet, latents: torch.Tensor, step: int, params: Sequence[str],
                  samples: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """The rows every layer in ``params`` multiplies at ``step`` (``[rows, K]``, both CFG passes),
    replayed from FP trajectory ``latents`` (``[S+1, N, ...]``, as CaptureTrajectory keeps it) for
    ``samples`` (default: all). For weight optimisers that need raw activations of a few layers."""
    transformer = getattr(calib.denoiser, "transformer", None)
    mods = layer_modules(transformer, list(params))
    idx = list(range(calib.num_samples)) if samples is None else list(samples)
    rows: dict[str, list[torch.Tensor]] = {p: [] for p in params}
    with torch.inference_mode(), capture(mods, lambda p, m, i, o: rows[p].append(input_tokens(m, i))):
        calib.denoiser(*calib.model_inputs(latents[step, idx], step, idx))
    out = {}
    for p, xs in rows.items():
        x = torch.cat(xs, dim=1)
        out[p] = x.reshape(-1, x.shape[-1])
    return out


# =========================================================================== context
class AnalysisContext:
    """What the analysis passes share: the calibration set, options, cache, progress and results."""

    def __init__(self, calib: CalibrationSet, options: AnalysisOptions | None = None,
                 cache: AnalysisCache | None = None, progress: Progress | None = None):
        self.calib = calib
        self.options = options or AnalysisOptions()
        self.options.validate(calib)
        self.cache = cache or AnalysisCache(None)
        self.progress = progress or (lambda stage, done, total: None)
        transformer = getattr(calib.denoiser, "transformer", None)
        if not isinstance(transformer, torch.nn.Module):
            raise InputError("analysis: the denoiser must expose its diffusers transformer as `.transformer`")
        self.transformer = transformer
        #: where per-layer accumulators live: the model's device (trajectories stay on the CPU)
        self.device = next(transformer.parameters()).device
        self.results: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.computed: dict[str, int] = {}  # units computed (not loaded from cache) per pass
        self.table: LayerTable | None = None

    def layers(self, graph: Any) -> LayerTable:
        if self.table is None:
            table = LayerTable.from_graph(graph, annotate_nodes=not layer_nodes(graph))
            self.table = table
            self.modules = layer_modules(self.transformer, table.names)
        return self.table

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.calib.denoiser(x, sigma, cond)


class AnalysisPass(Pass):
    kind = "analysis"

    def __init__(self, ctx: AnalysisContext):
        self.ctx = ctx

    def requires(self, graph: Any) -> None:
        if not hasattr(graph, "program"):
            raise TypeError(f"expected a DiTGraph, got {type(graph).__name__}")

    def _needs(self, *keys: str) -> None:
        missing = [k for k in keys if k not in self.ctx.results]
        if missing:
            raise PreconditionError(f"{self.name}: needs {', '.join(missing)} (run "
                                    f"{', '.join(_PRODUCER[k] for k in missing)} first)")

    def _annotate_layers(self, graph: Any, cls: type, make: Callable[[str], Any]) -> None:
        """Annotate every call node of every layer with ``make(param)``; where that is None, drop a
        stale ``cls`` annotation left by an earlier analysis of the same graph."""
        for param, nodes in layer_nodes(graph).items():
            value = make(param)
            for node in nodes:
                if value is None:
                    node.meta.pop(cls.KEY, None)
                else:
                    annotate(node, value)

    def _run_units(self, name: str, key: str, units: list[Any], state: dict[str, torch.Tensor],
                   step_fn: Callable[[Any, dict[str, torch.Tensor]], None], meta: dict | None = None,
                   stage: str | None = None) -> dict[str, torch.Tensor]:
        """Run ``step_fn(unit, state)`` for every unit not done yet, checkpointing ``state`` to the
        cache; returns the final state (from the cache if complete there)."""
        cache = self.ctx.cache
        hit = cache.load(name, key)
        if hit is not None:
            self.ctx.computed[name] = 0
            return hit[0]
        done: list = []
        part = cache.load(name, key, partial=True)
        if part is not None and set(part[0]) == set(state):
            state = {k: v.to(state[k].device) for k, v in part[0].items()}
            done = [tuple(u) if isinstance(u, list) else u for u in part[1].get("done", [])]
        todo = [u for u in units if u not in done]
        stage = stage or name
        ck = Checkpointer(cache)
        computed = 0
        self.ctx.progress(stage, len(done), len(units))
        for u in todo:
            step_fn(u, state)
            done.append(u)
            computed += 1
            if ck.due() and len(done) < len(units):
                cache.save(name, key, state, dict(meta or {}, done=done), partial=True)
            self.ctx.progress(stage, len(done), len(units))
        self.ctx.computed[name] = computed
        cache.save(name, key, state, dict(meta or {}, done=done))
        return state


PASS_NAMES = ("trajectory", "fisher", "stats", "sensitivity")
_PRODUCER = {"trajectory": "CaptureTrajectory", "fisher": "TemporalFisher", "stats": "ActivationStatistics"}


# =========================================================================== 1. trajectory
class CaptureTrajectory(AnalysisPass):
    def call(self, graph):
        t0 = time.perf_counter()
        ctx, calib = self.ctx, self.ctx.calib
        self.ctx.layers(graph)
        n, steps = calib.num_samples, calib.num_steps
        shape = tuple(calib.denoiser.latent_shape())
        batches = list(calib.batches())
        state = {"latents": torch.zeros(steps + 1, n, *shape), "sigmas": torch.zeros(steps + 1, dtype=torch.float64)}

        def unit(b, st):
            idx = batches[b]
            traj = calib.sample_batch(idx)
            st["latents"][:, idx[0]:idx[-1] + 1] = torch.stack(traj.latents)
            st["sigmas"][:] = torch.tensor(traj.sigmas, dtype=torch.float64)

        state = self._run_units("trajectory", options_key({}), list(range(len(batches))), state, unit)
        lat = state["latents"]
        if not torch.isfinite(lat).all():
            raise InputError("analysis: the FP trajectory has NaN/Inf values; the model or its inputs are broken")
        ctx.results["trajectory"] = lat
        ctx.results["sigmas"] = state["sigmas"]
        info = TrajectoryInfo(calib.key(), n, tuple(calib.schedule.timesteps),
                              tuple(float(s) for s in state["sigmas"]), calib.effective_guidance,
                              float(lat[-1].square().mean().sqrt()))
        annotate(output_node(graph), info)
        ctx.timings[self.name] = time.perf_counter() - t0
        return PassResult(graph, False)


# =========================================================================== 2. Fisher
class TemporalFisher(AnalysisPass):
    def call(self, graph):
        self._needs("trajectory")
        t0 = time.perf_counter()
        ctx, calib, opt = self.ctx, self.ctx.calib, self.ctx.options
        table = ctx.layers(graph)
        params = table.names
        steps, nl, npr = calib.num_steps, len(params), len(opt.precisions)
        lat = ctx.results["trajectory"]
        bits = [parse_point(p) for p in opt.precisions]
        modules = ctx.modules
        state = {"weight": torch.zeros(steps, nl, dtype=torch.float64),
                 "output": torch.zeros(steps, nl, dtype=torch.float64),
                 "proxy": torch.zeros(steps, nl, npr, dtype=torch.float64),
                 "loss": torch.zeros(steps, dtype=torch.float64),
                 "rows": torch.zeros(steps, dtype=torch.float64),
                 "seconds": torch.zeros(3, dtype=torch.float64)}  # forward+backward, weight norms, proxy
        def unit(t, st):
            for idx in calib.batches():
                self._fisher_batch(t, idx, lat, params, modules, bits, st)

        key = options_key(dict(precisions=list(opt.precisions)))
        state = self._run_units("fisher", key, list(range(steps)), state, unit)
        rows = state["rows"].clamp_min(1)[:, None]
        iw, iy = state["weight"] / rows, state["output"] / rows
        proxy = state["proxy"] / rows[:, :, None]
        src = iw if opt.fisher_source == "weight" else iy
        if opt.fisher_weighting == "latent":
            src = src * _dsigma2(ctx.results["sigmas"])[:, None]
        alpha = normalise_alpha(src, opt.temperature)
        ctx.results["fisher"] = dict(weight=iw, output=iy, alpha=alpha, proxy=proxy, loss=state["loss"] / rows[:, 0],
                                     seconds=state["seconds"])
        col = {p: i for i, p in enumerate(params)}
        self._annotate_layers(graph, FisherScores, lambda p: FisherScores(
            p, tuple(iw[:, col[p]].tolist()), tuple(iy[:, col[p]].tolist()), tuple(alpha[:, col[p]].tolist()),
            opt.fisher_source, opt.temperature))
        tot_w, tot_y = iw.sum(1), iy.sum(1)
        ratio = float(tot_w.max() / tot_w.min()) if float(tot_w.min()) > 0 else float("inf")
        annotate(output_node(graph), FisherProfile(tuple(tot_w.tolist()), tuple(tot_y.tolist()),
                                                   tuple((state["loss"] / rows[:, 0]).tolist()), ratio,
                                                   spearman(iw.flatten().tolist(), iy.flatten().tolist())))
        ctx.timings[self.name] = time.perf_counter() - t0
        return PassResult(graph, False)

    def _fisher_batch(self, t, idx, lat, params, modules, bits, st):
        calib = self.ctx.calib
        x = lat[t, idx[0]:idx[-1] + 1]
        target = lat[0, idx[0]:idx[-1] + 1] - lat[-1, idx[0]:idx[-1] + 1]
        x2, s2, c2 = calib.model_inputs(x, t, idx)
        u2 = torch.cat([target, target]) if calib.cfg else target
        seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {p: [] for p in params}

        def on_call(p, mod, inp, out):
            seen[p].append((inp.detach(), out))

        t0 = time.perf_counter()
        transformer = self.ctx.transformer
        req = {n: q.requires_grad for n, q in transformer.named_parameters()}
        try:
            for q in transformer.parameters():
                q.requires_grad_(True)
            with torch.enable_grad(), capture(modules, on_call):
                v = self.ctx.forward(x2, s2, c2)
                loss = (v.float() - u2).square().flatten(1).mean(1)
                outs = [o for p in params for _, o in seen[p]]
                grads = torch.autograd.grad(loss.sum(), outs, allow_unused=True)
        finally:
            for n, q in transformer.named_parameters():
                q.requires_grad_(req[n])
        t1 = time.perf_counter()
        k = 0
        tw = tp = 0.0
        for li, p in enumerate(params):
            m = modules[p]
            calls = seen[p]
            gs = grads[k:k + len(calls)]
            k += len(calls)
            if not calls:
                continue
            xs = torch.cat([input_tokens(m, i) for i, _ in calls], dim=1)
            gt = torch.cat([output_tokens(m, g if g is not None else torch.zeros_like(o)) for (_, o), g in zip(calls, gs)],
                           dim=1)
            a = time.perf_counter()
            st["weight"][t, li] += float(per_sample_weight_grad_sqnorm(xs, gt).sum())
            gt = gt.float()
            b_ = time.perf_counter()
            st["output"][t, li] += float(gt.double().square().sum())
            with torch.no_grad():
                g2 = gt.square()
                for pi, (w_bits, a_bits, fmt) in enumerate(bits):
                    w_q = fake_quant_weight(m.weight.detach().float(), w_bits, fmt=fmt)  # cheap next to the GEMM
                    dy = torch.cat([output_tokens(m, quantized_call(m, i, w_q, a_bits, fmt) - o.detach()).float()
                                    for i, o in calls], dim=1)
                    st["proxy"][t, li, pi] += float((g2 * dy.square()).double().sum())
            tw += b_ - a
            tp += time.perf_counter() - b_
        st["loss"][t] += float(loss.detach().double().sum())
        st["rows"][t] += x2.shape[0]
        st["seconds"] += torch.tensor([t1 - t0, tw, tp], dtype=torch.float64)


# =========================================================================== 3. statistics, Hessians
def hessian_params(table: LayerTable, options: AnalysisOptions) -> list[str]:
    """The layers that get Hessians (``hessian_layers`` regex; all by default), in table order."""
    if options.hessian_layers is None:
        return table.names
    got = [p for p in table.names if re.search(options.hessian_layers, p)]
    if not got:
        raise InputError(f"analysis: hessian layer pattern {options.hessian_layers!r} matches no layer")
    return got


def hessian_memory(table: LayerTable, options: AnalysisOptions, steps: int) -> dict[str, int]:
    """Bytes the statistics pass holds: Hessian sums (float64, per slot) and per-step statistics."""
    slots = options.hessian_slots(steps)
    per_layer = {p: slots * table[p].in_features ** 2 * 8 for p in hessian_params(table, options)}
    stats = sum(steps * (i.in_features * 4 + 4 * 8) for i in table)
    return dict(hessians=sum(per_layer.values()), largest_layer=max(per_layer.values(), default=0), stats=stats)


def hessian_chunks(table: LayerTable, options: AnalysisOptions, steps: int) -> list[list[str]]:
    """Layers in table order, cut into chunks whose Hessian sums fit ``max_hessian_bytes``."""
    slots = options.hessian_slots(steps)
    if slots == 0:
        return [table.names]
    chunks, cur, size = [], [], 0
    for p in hessian_params(table, options):
        b = slots * table[p].in_features ** 2 * 8
        if cur and size + b > options.max_hessian_bytes:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += b
    if cur:
        chunks.append(cur)
    return chunks


class _StopForward(Exception):
    pass


class ActivationStatistics(AnalysisPass):
    def call(self, graph):
        self._needs("trajectory")
        opt = self.ctx.options
        if opt.hessian == "weighted":
            self._needs("fisher")
        t0 = time.perf_counter()
        ctx, calib = self.ctx, self.ctx.calib
        table = ctx.layers(graph)
        steps = calib.num_steps
        slots = self._slots(steps)
        chunks = hessian_chunks(table, opt, steps)
        lat = ctx.results["trajectory"]
        alpha = ctx.results["fisher"]["alpha"] if opt.hessian == "weighted" else None
        col = {p: i for i, p in enumerate(table.names)}
        base = dict(hessian=opt.hessian, step_groups=opt.step_groups if opt.hessian == "grouped" else None,
                    tokens=opt.hessian_tokens, seed=opt.seed, hessian_layers=opt.hessian_layers)
        if alpha is not None:  # the weighted sums depend on alpha, hence on its source and temperature
            base.update(fisher_source=opt.fisher_source, temperature=opt.temperature,
                        fisher_weighting=opt.fisher_weighting)
        stats_out: dict[str, ActivationStats] = {}
        hess_out: dict[str, HessianRef] = {}
        for ci, chunk in enumerate(chunks):
            with_stats = ci == 0
            layers = table.names if with_stats else []
            state: dict[str, torch.Tensor] = {}
            dev = ctx.device
            for p in layers:
                k = table[p].in_features
                state[f"absmax.{p}"] = torch.zeros(steps, k, device=dev)
                state[f"tok.{p}"] = torch.tensor([[math.inf, 0.0, 0.0, 0.0]] * steps, dtype=torch.float64)
            if slots:
                for p in chunk:
                    k = table[p].in_features
                    state[f"hess.{p}"] = torch.zeros(len(slots), k, k, dtype=torch.float64, device=dev)
                    state[f"count.{p}"] = torch.zeros(len(slots), dtype=torch.float64)
            hess_layers = chunk if slots else []
            if not state:
                continue

            def unit(t, st, layers=layers, hess_layers=hess_layers):
                self._replay_step(t, lat, layers, hess_layers, st, slots, alpha, col)

            key = options_key(dict(base, chunk=chunk))
            name = "stats" if len(chunks) == 1 else f"stats-c{ci}"
            state = self._run_units(name, key, list(range(steps)), state, unit,
                                    stage=f"statistics {ci + 1}/{len(chunks)}" if len(chunks) > 1 else "statistics")
            path = ctx.cache._path(name, key) if ctx.cache.folder is not None else None
            for p in layers:
                tok = state[f"tok.{p}"]
                mean = tok[:, 1] / tok[:, 3].clamp_min(1)
                stats_out[p] = ActivationStats(p, state[f"absmax.{p}"].cpu(),
                                               torch.stack([tok[:, 0], mean, tok[:, 2]], 1).float(), tok[:, 3].clone())
            for p in hess_layers:
                counts = tuple(state[f"count.{p}"].tolist())
                if path is not None and len(chunks) > 1:  # large models: matrices stay on disk
                    hess_out[p] = HessianRef(p, opt.hessian, slots, counts, str(path), f"hess.{p}")
                else:
                    hess_out[p] = HessianRef(p, opt.hessian, slots, counts, tensor=state[f"hess.{p}"])
            del state
        ctx.results["stats"] = stats_out
        ctx.results["hessians"] = hess_out
        self._annotate_layers(graph, ActivationStats, lambda p: stats_out.get(p))
        self._annotate_layers(graph, HessianRef, lambda p: hess_out.get(p))
        ctx.timings[self.name] = time.perf_counter() - t0
        return PassResult(graph, False)

    def _slots(self, steps: int) -> tuple[tuple[int, ...], ...]:
        opt = self.ctx.options
        if opt.hessian == "none":
            return ()
        if opt.hessian == "per_step":
            return tuple((t,) for t in range(steps))
        if opt.hessian == "weighted":
            return (tuple(range(steps)), tuple(range(steps)))
        g = opt.step_groups
        return tuple(tuple(t for t in range(steps) if t * g // steps == k) for k in range(g))

    def _replay_step(self, t, lat, layers, hess_layers, st, slots, alpha, col):
        ctx, calib, opt = self.ctx, self.ctx.calib, self.ctx.options
        modules = ctx.modules
        h_step = {p: None for p in hess_layers}
        n_step = {p: 0 for p in hess_layers}
        want = {p: modules[p] for p in set(layers) | set(hess_layers)}
        stats_set, hess_set = set(layers), set(hess_layers)
        batch_no = [0]
        # a chunk without statistics stops the forward after the last call of its last layer (the
        # table is in execution order): later chunks replay only as much of the model as they need
        stop = hess_layers[-1] if hess_layers and not layers else None
        stop_calls = ctx.table[stop].calls if stop else 0
        seen_calls = [0]

        def on_call(p, mod, inp, out):
            xs = input_tokens(mod, inp).float()
            if p in stats_set:
                a = xs.abs()
                am = st[f"absmax.{p}"]
                am[t] = torch.maximum(am[t], a.amax(dim=(0, 1)))
                pt = a.amax(-1).flatten().double()
                tok = st[f"tok.{p}"]
                tok[t, 0] = min(float(tok[t, 0]), float(pt.min()))
                tok[t, 1] += float(pt.sum())
                tok[t, 2] = max(float(tok[t, 2]), float(pt.max()))
                tok[t, 3] += pt.numel()
            if p in hess_set:
                xf = xs.reshape(-1, xs.shape[-1])
                if opt.hessian_tokens is not None and xf.shape[0] > opt.hessian_tokens:
                    gen = torch.Generator().manual_seed(
                        (opt.seed * 1_000_003 + t * 10_007 + col[p] * 101 + batch_no[0]) % (2 ** 63))
                    xf = xf[torch.randperm(xf.shape[0], generator=gen)[:opt.hessian_tokens]]
                h = (xf.T @ xf).double()
                h_step[p] = h if h_step[p] is None else h_step[p] + h
                n_step[p] += xf.shape[0]
            if p == stop:
                seen_calls[0] += 1
                if seen_calls[0] == stop_calls:
                    raise _StopForward

        with torch.inference_mode(), capture(want, on_call):
            for idx in calib.batches():
                x = lat[t, idx[0]:idx[-1] + 1]
                seen_calls[0] = 0
                try:
                    ctx.forward(*calib.model_inputs(x, t, idx))
                except _StopForward:
                    pass
                batch_no[0] += 1
        for p in hess_layers:
            if h_step[p] is None:
                continue
            for si, members in enumerate(slots):
                if t not in members:
                    continue
                w = 1.0
                if opt.hessian == "weighted" and si == 1:
                    w = float(alpha[t, col[p]])
                st[f"hess.{p}"][si] += w * h_step[p]
                st[f"count.{p}"][si] += w * n_step[p]


# =========================================================================== 4. sensitivity
class ReconstructionSensitivity(AnalysisPass):
    def call(self, graph):
        self._needs("trajectory")
        t0 = time.perf_counter()
        ctx, calib, opt = self.ctx, self.ctx.calib, self.ctx.options
        table = ctx.layers(graph)
        groups = layer_groups(table, opt.groups)
        gnames = list(groups)
        steps = calib.num_steps
        bits = [parse_point(p) for p in opt.precisions]
        lat = ctx.results["trajectory"]
        sig = ctx.results["sigmas"]
        idx = self._samples()
        state = {"error": torch.zeros(len(gnames), len(bits), steps, dtype=torch.float64)}

        def unit(t, st):
            x = lat[t, idx]
            xr, sr, cr = calib.model_inputs(x, t, idx)
            with torch.inference_mode():
                v_fp = calib.guided(ctx.forward(xr, sr, cr))
                reps = len(bits)
                xR, sR, cR = torch.cat([xr] * reps), torch.cat([sr] * reps), _repeat_condition(cr, reps)
                ds = float(sig[t + 1] - sig[t])
                for gi, g in enumerate(gnames):
                    mods = {p: ctx.modules[p] for p in groups[g]}
                    ws = {p: [fake_quant_weight(mods[p].weight.float(), w, fmt=f) for w, _, f in bits] for p in mods}
                    with replicated_quantization(mods, ws, [a for _, a, _ in bits], reps, [f for *_, f in bits]):
                        v_all = ctx.forward(xR, sR, cR)
                    for pi, v_q in enumerate(v_all.chunk(reps)):
                        err = (ds * (calib.guided(v_q) - v_fp)).square().flatten(1).mean(1).mean()
                        st["error"][gi, pi, t] = float(err)

        key = options_key(dict(groups=opt.groups, precisions=list(opt.precisions), samples=idx))
        state = self._run_units("sensitivity", key, list(range(steps)), state, unit)
        err = state["error"]
        ctx.results["sensitivity"] = dict(groups=groups, error=err, samples=idx)
        check = self._end_to_end(groups, err, idx, bits, key)
        ctx.results["sensitivity"]["check"] = check
        fisher = ctx.results.get("fisher")
        col = {p: i for i, p in enumerate(table.names)}
        group_of = {p: g for g, ps in groups.items() for p in ps}

        def make(p):
            gi = gnames.index(group_of[p])
            prox = ((tuple(fisher["proxy"][:, col[p], pi].tolist()) for pi in range(len(bits)))
                    if fisher is not None else ())
            return Sensitivity(p, group_of[p], tuple(opt.precisions),
                               tuple(tuple(err[gi, pi].tolist()) for pi in range(len(bits))), tuple(prox))

        self._annotate_layers(graph, Sensitivity, make)
        if check is not None:
            annotate(output_node(graph), check)
        ctx.timings[self.name] = time.perf_counter() - t0
        return PassResult(graph, False)

    def _samples(self) -> list[int]:
        """Spread over conditions first: one seed of every condition, then the next seed ..."""
        calib, n = self.ctx.calib, self.ctx.options.sensitivity_samples
        nc, ns = len(calib.conditions), len(calib.seeds)
        order = [c * ns + s for s in range(ns) for c in range(nc)]
        return sorted(order[:min(n, len(order))])

    def _triples(self, gnames, steps) -> list[tuple[int, int, int]]:
        opt = self.ctx.options
        if opt.e2e_steps == 0 or opt.e2e_per_step == 0:
            return []
        k = min(opt.e2e_steps, steps)
        chosen_steps = sorted({round(i * (steps - 1) / max(k - 1, 1)) for i in range(k)})
        gen = torch.Generator().manual_seed(opt.seed + 7919)
        pairs = [(g, p) for g in range(len(gnames)) for p in range(len(opt.precisions))]
        out = []
        for t in chosen_steps:
            perm = torch.randperm(len(pairs), generator=gen)[:opt.e2e_per_step].tolist()
            out += [(pairs[i][0], t, pairs[i][1]) for i in perm]
        return out

    def _end_to_end(self, groups, err, idx, bits, key) -> SensitivityCheck | None:
        """Exact final-sample error for the chosen triples: quantize the group at step t only, then
        run the FP model to the end from the same noise and condition. Triples sharing a step run
        as one batch."""
        ctx, calib, opt = self.ctx, self.ctx.calib, self.ctx.options
        gnames = list(groups)
        triples = self._triples(gnames, calib.num_steps)
        if not triples:
            return None
        from ..frontend.sampling import flow_match_scheduler

        lat = ctx.results["trajectory"]
        by_step: dict[int, list[int]] = {}
        for i, (_, t, _) in enumerate(triples):
            by_step.setdefault(t, []).append(i)
        state = {"e2e": torch.zeros(len(triples), dtype=torch.float64)}
        n = len(idx)

        def unit(t, st):
            members = by_step[t]
            reps = len(members)
            sched = flow_match_scheduler(calib.schedule)
            x = torch.cat([lat[t, idx]] * reps)
            big_idx = idx * reps
            sched.set_begin_index(t)
            with torch.inference_mode():
                for k in range(t, calib.num_steps):
                    if k == t:
                        v_parts = []
                        for r, i in enumerate(members):
                            g, _, pi = triples[i]
                            mods = {p: ctx.modules[p] for p in groups[gnames[g]]}
                            w_bits, a_bits, fmt = bits[pi]
                            ws = {p: [fake_quant_weight(mods[p].weight.float(), w_bits, fmt=fmt)] for p in mods}
                            sl = slice(r * n, (r + 1) * n)
                            xs, ss, cs = calib.model_inputs(x[sl], k, idx)
                            with replicated_quantization(mods, ws, [a_bits], 1, [fmt]):
                                v_parts.append(calib.guided(ctx.forward(xs, ss, cs)))
                        v = torch.cat(v_parts)
                    else:
                        v = calib.guided(ctx.forward(*calib.model_inputs(x, k, big_idx)))
                    x = sched.step(v, sched.timesteps[k], x).prev_sample
            final_fp = lat[-1, idx]
            for r, i in enumerate(members):
                st["e2e"][i] = float((x[r * n:(r + 1) * n] - final_fp).square().flatten(1).mean(1).mean())

        state = self._run_units("end_to_end", options_key(dict(sens=key, triples=triples, e=opt.seed)),
                                sorted(by_step), state, unit, stage="end-to-end checks")
        e2e = state["e2e"].tolist()
        vel = [float(err[g, p, t]) for g, t, p in triples]
        fisher = ctx.results.get("fisher")
        if fisher is not None:
            col = {p: i for i, p in enumerate(self.ctx.table.names)}
            sig = ctx.results["sigmas"]
            fp = [float(sum(fisher["proxy"][t, col[q], p] for q in groups[gnames[g]])) * float(sig[t + 1] - sig[t]) ** 2
                  for g, t, p in triples]
        else:
            fp = [float("nan")] * len(triples)
        return SensitivityCheck(opt.groups, tuple((gnames[g], t, opt.precisions[p]) for g, t, p in triples),
                                tuple(e2e), tuple(vel), tuple(fp), spearman(vel, e2e), spearman(fp, e2e))


# =========================================================================== the whole analysis
@dataclasses.dataclass
class AnalysisResult:
    table: LayerTable
    calibration: dict[str, Any]
    options: AnalysisOptions
    results: dict[str, Any]
    timings: dict[str, float]
    computed: dict[str, int]
    memory_plan: dict[str, int]
    peak_rss: int
    seconds: float

    @property
    def fisher(self) -> dict[str, torch.Tensor]:
        return self.results["fisher"]

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (no timings: same inputs give the same summary)."""
        f = self.results["fisher"]
        tw = f["weight"].sum(1)
        sens = self.results.get("sensitivity")
        out = dict(
            format="adatsq.analysis", version=1, calibration=self.calibration,
            options=dataclasses.asdict(self.options), layers=self.table.names,
            fisher=dict(
                source=self.options.fisher_source, temperature=self.options.temperature,
                weighting=self.options.fisher_weighting,
                total_latent=_r((tw * _dsigma2(self.results["sigmas"])).tolist()),
                total_weight=_r(tw.tolist()), total_output=_r(f["output"].sum(1).tolist()),
                loss=_r(f["loss"].tolist()),
                max_min_ratio=_r(float(tw.max() / tw.min()) if float(tw.min()) > 0 else None),
                spearman_weight_output=_r(spearman(f["weight"].flatten().tolist(), f["output"].flatten().tolist())),
                per_layer_weight=[_r(r) for r in f["weight"].tolist()],
                per_layer_output=[_r(r) for r in f["output"].tolist()],
                alpha=[_r(r) for r in f["alpha"].tolist()]),
            memory_plan=self.memory_plan)
        if sens is not None:
            chk = sens.get("check")
            out["sensitivity"] = dict(
                groups=self.options.groups, group_names=list(sens["groups"]), precisions=list(self.options.precisions),
                samples=sens["samples"], error=[[_r(r) for r in g] for g in sens["error"].tolist()],
                check=None if chk is None else dict(
                    triples=[list(x) for x in chk.triples], end_to_end=_r(list(chk.end_to_end)),
                    velocity_proxy=_r(list(chk.velocity_proxy)), fisher_proxy=_r(list(chk.fisher_proxy)),
                    spearman_velocity=_r(chk.spearman_velocity), spearman_fisher=_r(chk.spearman_fisher)))
        return out


def _r(x: Any, digits: int = 6) -> Any:
    if isinstance(x, float):
        return None if not math.isfinite(x) else float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [_r(v, digits) for v in x]
    return x


def memory_plan(table: LayerTable, calib: CalibrationSet, options: AnalysisOptions) -> dict[str, int]:
    """Bytes the analysis will hold at once, computed before it starts."""
    steps = calib.num_steps
    lat = (steps + 1) * calib.num_samples * int(np.prod(calib.denoiser.latent_shape())) * 4
    h = hessian_memory(table, options, steps)
    chunks = hessian_chunks(table, options, steps)
    per_chunk = max((sum(options.hessian_slots(steps) * table[p].in_features ** 2 * 8 for p in c) for c in chunks),
                    default=0)
    return dict(trajectory=lat, stats=h["stats"], hessians_total=h["hessians"], hessians_resident=per_chunk,
                hessian_chunks=len(chunks), largest_layer_hessians=h["largest_layer"])


def analyze(graph: Any, calib: CalibrationSet, options: AnalysisOptions | None = None,
            cache_dir: str | Path | None = None, progress: Progress | None = None,
            checkpoint_every_s: float = 30.0, log: Callable[[str], None] | None = None,
            passes: Sequence[str] = PASS_NAMES) -> AnalysisResult:
    """Run the four analysis passes on ``graph`` with ``calib`` and return everything they found.

    ``cache_dir``: the cache root (a folder per model fingerprint and calibration key is made in
    it); None: no caching. ``log`` receives the memory plan before any work starts. ``passes``
    selects a prefix-closed subset of ``trajectory, fisher, stats, sensitivity`` (a weight
    optimiser needs the first three only).
    """
    unknown = [p for p in passes if p not in PASS_NAMES]
    if unknown or not passes:
        raise InputError(f"analysis: unknown passes {unknown} (choose from {', '.join(PASS_NAMES)})")
    from .infra import Pipeline

    options = options or AnalysisOptions()
    t0 = time.perf_counter()
    ctx = AnalysisContext(calib, options, progress=progress)
    table = ctx.layers(graph)
    from .plan import fingerprint_graph, fingerprint_model

    fp_graph, fp_model = fingerprint_graph(graph), fingerprint_model(ctx.transformer)
    if fp_graph != fp_model:
        raise InputError(f"analysis: the graph ({fp_graph.short}) was not exported from the calibration "
                         f"set's model ({fp_model.short})")
    if cache_dir is not None:
        ctx.cache = AnalysisCache(Path(cache_dir) / f"{fp_model.short}-{calib.key()}", checkpoint_every_s)
    plan = memory_plan(table, calib, options)
    if log is not None:
        mib = lambda b: f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
        log(f"memory plan: trajectory {mib(plan['trajectory'])}, statistics {mib(plan['stats'])}, Hessians "
            f"{mib(plan['hessians_total'])} in {plan['hessian_chunks']} chunk(s) of at most "
            f"{mib(plan['hessians_resident'])} (largest layer {mib(plan['largest_layer_hessians'])})")
    chosen = [cls(ctx) for name, cls in zip(PASS_NAMES, (CaptureTrajectory, TemporalFisher, ActivationStatistics,
                                                         ReconstructionSensitivity)) if name in passes]
    Pipeline(chosen, name="analysis")(graph)
    return AnalysisResult(table, calib.describe(), options, ctx.results, ctx.timings, ctx.computed, plan,
                          peak_rss_bytes(), time.perf_counter() - t0)
