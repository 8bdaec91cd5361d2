"""Third-party quantizers ("peers") run through our evaluation harness, on a copy of the model.

Optional extras (``pip install 'adatsq[peers]'``): NVIDIA Model Optimizer (``nvidia-modelopt``),
``torchao`` and ``compressed-tensors``. A peer variant of ``adatsq eval`` (the keys of
:data:`adatsq.tools.baselines.PEERS`) runs inside :func:`peer_quantized`, which swaps
``ref.denoiser.transformer`` for a quantized ``copy.deepcopy`` of it and puts the original back on
exit (also on errors); the original's weights are never touched.

Scope: every ``nn.Linear`` of the transformer, the set our own baselines quantize (the layer
table's ``linear`` kind; 48 in flux-fmnist, in-features 4, 64, 192, 256, 768, 960), except where a
peer cannot take a layer (listed per peer below, and machine-readably in :func:`peer_info`).

``modelopt-int8-sq``, ``modelopt-int4-awq``, ``modelopt-w4a8-awq``
    ``mtq.quantize(copy, cfg, forward_loop)`` with ``mtq.INT8_SMOOTHQUANT_CFG``,
    ``mtq.INT4_AWQ_CFG`` and ``mtq.W4A8_AWQ_BETA_CFG``: fake quantization in fp32 torch (it runs on
    the CPU; no CUDA extension is needed for these paths). Two changes to the shipped configs, both
    to quantize exactly our linear set: (1) the configs' weight/input quantizer entries are
    restricted to ``parent_class="nn.Linear"`` (as shipped, modelopt 0.47 also quantizes the inputs
    of every ``nn.LayerNorm``); (2) default exclusions that would disable one of our linears are
    dropped: that is only ``*proj_out.*`` (meant for LLM output heads), which would otherwise skip
    the single blocks' ``proj_out`` and the final ``proj_out``. Everything else is as shipped:
    INT8 SQ = INT8 per-output-channel weights, INT8 per-tensor static activations after
    SmoothQuant (alpha 1.0, modelopt's default); INT4 AWQ = INT4 weights in blocks of 128 input
    channels (modelopt zero-pads the last block where 128 does not divide the in-features: 192 ->
    128 + 64, 960 -> 7x128 + 64, and 4, 64 -> one block, i.e. per channel), FP activations, AWQ-lite
    scales (alpha grid step 0.1); W4A8 AWQ = the same INT4 blocks followed by an FP8 E4M3 per-tensor
    weight quantizer, FP8 E4M3 per-tensor static activations ("8 bits" are FP8, not INT8), AWQ-lite.
    The forward loop samples the whole calibration set given (the default one: 10 classes x 2 seeds
    x 20 steps with CFG, 40 rows a model call), walking the model's own trajectory.

``modelopt-nvfp4``, ``modelopt-nvfp4-svdquant`` (W4A4; CUDA only)
    ``NVFP4_DEFAULT_CFG`` and ``NVFP4_SVDQUANT_DEFAULT_CFG`` with the same two changes: FP4 E2M1
    weights and activations with an FP8 E4M3 scale per block of 16 input channels under a
    per-tensor scale (4.5 bits per value with the block scales); the SVDQuant config adds AWQ-lite
    smoothing and a rank-32 16-bit low-rank branch. modelopt's NVFP4 fake quantization is a Triton
    kernel with no CPU path (``amax must be a CUDA tensor``), so these run with ``--device cuda``
    only (:func:`check_device`, before any work). ``x_embedder`` (in-features 4: no block of 16) is
    skipped, with the reason.

``torchao-int8-dyn``
    ``quantize_(copy, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))``: INT8
    symmetric per-row weights, INT8 symmetric per-token dynamic activations, real int8 x int8 ->
    int32 matmuls on the CPU (``Int8Tensor``). All 48 linears. No calibration data is used.

``torchao-int4-wo``
    torchao 0.18's ``Int4WeightOnlyConfig`` has no CPU packing format (``plain`` and
    ``preshuffled`` need the ``mslk`` GPU kernels, ``tile_packed_to_4d`` needs bfloat16 and CUDA,
    ``plain_int32`` is XPU/NPU only; ``"opaque"`` was removed from it). The CPU path is its
    successor ``torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig`` (the old
    ``int4_packing_format="opaque"``: ``Int4OpaqueTensor``, tinygemm
    ``_weight_int4pack_mm_for_cpu``), used here with ``group_size=64`` (allowed: 32, 64, 128, 256;
    64 is the largest that divides 192 and 960), asymmetric INT4 weights with a zero point per
    group, fp32 activations, ``set_inductor_config=False``. Skipped (``filter_fn``): ``x_embedder``
    (in-features 4: no group size divides it; torchao would skip it itself) and the final
    ``proj_out`` (out-features 4: the CPU packing needs out-features divisible by 16). No
    calibration data is used.

``ct-w4a4``, ``ct-w3a3``, ``ct-nvfp4`` (compressed-tensors: W4A4 and W3A3 on the CPU)
    vLLM's quantization library ``compressed-tensors`` (what llm-compressor writes and vLLM loads):
    ``apply_quantization_config(copy, QuantizationConfig(config_groups={"group_0": scheme},
    ignore=[skipped]))`` with ``targets=["Linear"]``, then its own quantize-dequantize forward in
    fp32 torch (it runs on the CPU). ``ct-w4a4`` is its ``W4A4`` preset (INT4 symmetric weights in
    groups, INT4 symmetric per-token dynamic activations) with the group size 64 instead of 128:
    compressed-tensors requires the group to divide the in-features and 128 does not divide 192 or
    960 (``tensor column shape must be divisble by the given group_size``); 64 is the largest that
    divides them all but x_embedder's 4. ``ct-w3a3`` is the same scheme at 3 bits (the presets stop
    at A4: ``_int_wnam`` accepts activation bits 4, 8 and 16 only). ``ct-nvfp4`` is its ``NVFP4``
    preset as shipped: FP4 E2M1 weights and activations, an FP8 E4M3 scale per group of 16 under a
    per-tensor FP32 global scale, activations' group scales dynamic. compressed-tensors only applies
    and runs a scheme; the calibration (llm-compressor's observers) is ours, with its functions:
    weight scales from each group's min/max (``calculate_qparams``; the global scales by
    ``generate_gparam`` over the whole weight), and for NVFP4 the activations' global scale from the
    min/max of each linear's input over the whole calibration set (the same forward loop as the
    modelopt peers, run on the FP model). Not done: llm-compressor's equalisation of the q/k/v
    global scales (a vLLM kernel-fusion constraint). ``x_embedder`` (in-features 4) has no group
    and is skipped, with the reason.

``set_inductor_config=False`` keeps torchao from changing torch's global inductor settings (we do
not compile). Errors (package missing, a peer failing) are :class:`PeerUnavailable`, an
:class:`~adatsq.errors.InputError` naming the peer, the package and version and the underlying
error.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import InputError
from .baselines import PEERS

INSTALL_HINT = "pip install 'adatsq[peers]'"

#: what the two NVFP4 peers share (W4A4 on the GPU only; blocks of 16 input channels)
_NVFP4 = dict(
    dist="nvidia-modelopt", module="modelopt", devices=("cuda",), block=16, block_name="NVFP4 block", calibrated=True,
    effective_bits=4.5,
    activations="NVFP4, dynamic per block of 16, under a per-tensor static scale (max calibration)",
    execution="fake quantization on the GPU (modelopt's Triton FP4 kernel; it has no CPU path)")

#: what the compressed-tensors peers share (quantize-dequantize in torch; CPU or GPU)
_CT = dict(dist="compressed-tensors", module="compressed_tensors", devices=("cpu", "cuda"),
           execution="fake quantization in fp32 (compressed-tensors' torch quantize-dequantize forward)")


#: the compressed-tensors integer peers' weight group (the W4A4 preset's 128 does not divide 192 or 960)
CT_GROUP = 64


def _ct_int(bits: int) -> dict[str, Any]:
    return dict(_CT, bits=bits, block=CT_GROUP, calibrated=False, effective_bits=bits + 16 / CT_GROUP,
                cfg=f"the W{bits}A{bits} integer scheme (preset W4A4's arguments at {bits} bits, group_size {CT_GROUP})",
                weights=f"INT{bits} symmetric, groups of {CT_GROUP} input channels, min-max scales (the preset's group "
                        f"of 128 does not divide 192 or 960)",
                activations=f"INT{bits} symmetric, per token, dynamic")


#: peer -> (PyPI distribution, import name, configuration)
_SPECS: dict[str, dict[str, Any]] = {
    "modelopt-int8-sq": dict(
        dist="nvidia-modelopt", module="modelopt", cfg="INT8_SMOOTHQUANT_CFG",
        weights="INT8 symmetric, per output channel, static (max)",
        activations="INT8 symmetric, per tensor, static (max calibration), after SmoothQuant smoothing (alpha 1.0)",
        execution="fake quantization in fp32 (torch)", calibrated=True),
    "modelopt-int4-awq": dict(
        dist="nvidia-modelopt", module="modelopt", cfg="INT4_AWQ_CFG",
        weights="INT4 symmetric, blocks of 128 input channels (last block zero-padded), AWQ-lite scales",
        activations="floating point (fp32)",
        execution="fake quantization in fp32 (torch)", calibrated=True),
    "modelopt-w4a8-awq": dict(
        dist="nvidia-modelopt", module="modelopt", cfg="W4A8_AWQ_BETA_CFG",
        weights="INT4 symmetric, blocks of 128 input channels (last block zero-padded), then FP8 E4M3 per "
                "tensor, AWQ-lite scales",
        activations="FP8 E4M3, per tensor, static (max calibration)",
        execution="fake quantization in fp32 (torch)", calibrated=True),
    "modelopt-nvfp4": dict(
        _NVFP4, cfg="NVFP4_DEFAULT_CFG",
        weights="NVFP4: FP4 E2M1, an FP8 E4M3 scale per block of 16 input channels under a per-tensor "
                "FP32 scale (4.5 bits per weight with the block scales)"),
    "modelopt-nvfp4-svdquant": dict(
        _NVFP4, cfg="NVFP4_SVDQUANT_DEFAULT_CFG",
        weights="NVFP4 as modelopt-nvfp4, after AWQ-lite smoothing, of the residual of a rank-32 16-bit "
                "low-rank branch (SVDQuant)"),
    "ct-w4a4": _ct_int(4),
    "ct-w3a3": _ct_int(3),
    "ct-nvfp4": dict(
        _CT, block=16, block_name="NVFP4 block", calibrated=True, effective_bits=4.5, cfg="preset NVFP4",
        weights="NVFP4: FP4 E2M1, an FP8 E4M3 scale per group of 16 input channels under a per-tensor FP32 global "
                "scale (4.5 bits per weight with the group scales), min-max",
        activations="NVFP4, dynamic per group of 16, under a per-tensor global scale from min-max calibration"),
    "torchao-int8-dyn": dict(
        dist="torchao", module="torchao", cfg="Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)",
        weights="INT8 symmetric, per output row",
        activations="INT8 symmetric, per token, dynamic",
        execution="int8 x int8 -> int32 matmul on the CPU (torchao Int8Tensor)", calibrated=False),
    "torchao-int4-wo": dict(
        dist="torchao", module="torchao",
        cfg="torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig(group_size=64, "
            "set_inductor_config=False)",
        weights="INT4 asymmetric (zero point), groups of 64 input channels",
        activations="floating point (fp32)",
        execution="fp32 matmul with the effective weights of torchao's tinygemm CPU kernel "
                  "(_weight_int4pack_mm_for_cpu applied to the identity; the kernel itself is ~30x slower here)",
        calibrated=False),
}

TORCHAO_INT4_GROUP = 64


class PeerUnavailable(InputError):
    """A peer quantizer cannot run here: its package is missing, or it failed."""


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _spec(name: str) -> dict[str, Any]:
    if name not in _SPECS:
        raise InputError(f"unknown peer {name!r} (known: {', '.join(_SPECS)})")
    return _SPECS[name]


def _package(name: str) -> str:
    dist = _spec(name)["dist"]
    v = _version(dist)
    return f"{dist} {v}" if v else f"{dist} (not installed)"


def _require(name: str):
    """Import the peer's package or raise :class:`PeerUnavailable`."""
    import importlib

    spec = _spec(name)
    try:
        return importlib.import_module(spec["module"])
    except Exception as exc:  # ImportError, or a broken install failing at import
        raise PeerUnavailable(
            f"peer {name}: cannot import {spec['module']} ({_package(name)}): {type(exc).__name__}: {exc}; "
            f"install the peers extra: {INSTALL_HINT}") from exc


def _linears(transformer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}


def _torchao_int4_reason(mod: nn.Linear) -> str | None:
    """Why torchao's CPU INT4 path cannot take this linear (None: it can)."""
    if mod.in_features % TORCHAO_INT4_GROUP:
        return (f"in-features {mod.in_features} not divisible by the group size {TORCHAO_INT4_GROUP} "
                f"(torchao skips such weights)")
    if mod.out_features % 16:
        return (f"out-features {mod.out_features} not divisible by 16 (aten._convert_weight_to_int4pack_for_cpu: "
                f"'expect N to be dividable by 16')")
    return None


def _skip_reasons(name: str, transformer: nn.Module) -> dict[str, str]:
    if name == "torchao-int4-wo":
        return {n: r for n, m in _linears(transformer).items() if (r := _torchao_int4_reason(m)) is not None}
    block = _SPECS[name].get("block")
    if block:  # scales per block (group) of input channels: a row that no block divides cannot be scaled
        what = _SPECS[name].get("block_name", "group size")
        return {n: f"in-features {m.in_features} not divisible by the {what} of {block}"
                for n, m in _linears(transformer).items() if m.in_features % block}
    return {}


def cpu_peers() -> tuple[str, ...]:
    """The peers that run on the CPU (the quality table's default)."""
    return tuple(n for n in PEERS if "cpu" in _spec(n).get("devices", ("cpu",)))


def check_device(name: str, device: str | torch.device) -> None:
    """Raise InputError (before any work) where peer ``name`` cannot run on ``device``."""
    devices = _spec(name).get("devices", ("cpu",))
    kind = torch.device(device).type
    if kind not in devices:
        why = ("modelopt's NVFP4 fake quantization has no CPU path" if devices == ("cuda",)
               else "its numbers here were measured on the CPU")
        raise InputError(f"{name}: runs on {' or '.join(devices)} only ({why}); use --device {devices[0]}")


def _config_text(spec: dict[str, Any]) -> str:
    if spec["dist"] == "nvidia-modelopt":
        return (f"modelopt.torch.quantization.{spec['cfg']} (quantizer entries restricted to nn.Linear; "
                f"default exclusions that match one of our linears removed)")
    if spec["dist"] == "compressed-tensors":
        return (f"compressed_tensors.quantization.apply_quantization_config(model, {spec['cfg']} on targets "
                f"['Linear']); scales calibrated by adatsq with compressed-tensors' calculate_qparams/generate_gparam")
    return f"torchao.quantization.quantize_(model, {spec['cfg']})"


def describe(name: str) -> dict[str, Any]:
    """What peer ``name`` runs, independent of a model: package and version, configuration,
    numerics (raises InputError for an unknown name; works without the package installed)."""
    spec = _spec(name)
    w, a = PEERS[name]
    out = dict(peer=name, package=_package(name), installed=_version(spec["dist"]) is not None,
               config=_config_text(spec),
               nominal_bits=dict(w=w, a=a), weights=spec["weights"], activations=spec["activations"],
               execution=spec["execution"], uses_calibration=spec["calibrated"],
               devices=list(spec.get("devices", ("cpu",))), effective_bits=spec.get("effective_bits"))
    return out


def peer_info(ref: Any, name: str) -> dict[str, Any]:
    """:func:`describe` plus the layers of ``ref``'s transformer the peer quantizes and skips (with
    reasons), as :func:`peer_quantized` applies it (no quantization is run)."""
    info = describe(name)
    lin = _linears(ref.denoiser.transformer)
    skipped = _skip_reasons(name, ref.denoiser.transformer)
    info.update(linear_layers=len(lin), quantized_layers=len(lin) - len(skipped),
                skipped=[dict(layer=n, reason=r) for n, r in skipped.items()])
    return info


def _calibration_loop(ref, calib, model: nn.Module) -> int:
    """Sample the whole calibration set with ``model`` as the transformer (walking the model's own
    trajectory, with guidance); returns the number of sampling batches."""
    from ..frontend.sampling import sample

    saved = ref.denoiser.transformer
    ref.denoiser.transformer = model
    n = 0
    try:
        seeds = calib.sample_seeds()
        for idx in calib.batches():
            sample(ref.denoiser, calib.sample_conditions(idx), [seeds[i] for i in idx], calib.schedule,
                   calib.guidance, record=False)
            n += 1
    finally:
        ref.denoiser.transformer = saved
    return n


# ---------------------------------------------------------------------------------------- modelopt
def _modelopt_config(mtq, cfg_name: str, linear_names: list[str], skip: tuple[str, ...] = ()
                     ) -> tuple[dict, list[str]]:
    """The shipped config with its quantizer entries restricted to nn.Linear and the exclusions
    that would disable one of our linears dropped, and the linears in ``skip`` (the peer cannot
    take them) disabled by name; returns (config, dropped patterns)."""
    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    entries = cfg["quant_cfg"]
    if not isinstance(entries, list):
        raise TypeError(f"{cfg_name}['quant_cfg'] is a {type(entries).__name__}, expected the list format of "
                        f"nvidia-modelopt >= 0.4x")
    ours = [f"{n}.{q}" for n in linear_names for q in ("weight_quantizer", "input_quantizer")]
    kept, dropped = [], []
    for i, e in enumerate(entries):
        e = dict(e)
        pattern = e.get("quantizer_name")
        if i == 0 and pattern == "*" and e.get("enable") is False and "cfg" not in e:
            kept.append(e)  # the deny-all base entry
        elif pattern in ("*weight_quantizer", "*input_quantizer") and e.get("parent_class") is None:
            e["parent_class"] = "nn.Linear"
            kept.append(e)
        elif (e.get("enable") is False and e.get("parent_class") is None and "cfg" not in e
              and any(fnmatch.fnmatch(q, pattern) for q in ours)):
            dropped.append(pattern)
        else:
            kept.append(e)
    for n in skip:  # later entries win: these turn both quantizers of the layer off
        kept.append({"quantizer_name": f"{n}.*_quantizer", "enable": False})
    cfg["quant_cfg"] = kept
    return cfg, dropped


def _modelopt_quantized_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """(linears with an enabled weight quantizer, linears with an enabled input quantizer)."""
    def enabled(q) -> bool:
        if q is None:
            return False
        if isinstance(q, nn.Sequential):
            return any(getattr(x, "is_enabled", False) for x in q)
        return bool(getattr(q, "is_enabled", False))

    w, a = [], []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if enabled(getattr(m, "weight_quantizer", None)):
                w.append(n)
            if enabled(getattr(m, "input_quantizer", None)):
                a.append(n)
    return w, a


def _modelopt_quantize(ref, name: str, calib, model: nn.Module, log) -> dict[str, Any]:
    _require(name)
    import modelopt.torch.quantization as mtq

    cfg, dropped = _modelopt_config(mtq, _SPECS[name]["cfg"], list(_linears(model)),
                                    tuple(_skip_reasons(name, model)))
    calls = [0]

    def forward_loop(m: nn.Module) -> None:
        calls[0] += _calibration_loop(ref, calib, m)

    out = io.StringIO()  # modelopt prints progress to stdout: keep the CLI's console clean
    with contextlib.redirect_stdout(out):
        model = mtq.quantize(model, cfg, forward_loop)
    for line in out.getvalue().splitlines():
        if line.strip() and log is not None:
            log(f"{name}: {line.strip()}")
    wq, aq = _modelopt_quantized_layers(model)
    return dict(model=model, weight_quantized=wq, input_quantized=aq, dropped_exclusions=dropped,
                forward_loop_passes=calls[0])


# ---------------------------------------------------------------------------------------- compressed-tensors
def _ct_scheme(name: str):
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme, QuantizationType,
                                                 preset_name_to_scheme)

    spec = _SPECS[name]
    if "bits" not in spec:
        return preset_name_to_scheme("NVFP4", ["Linear"])

    def args(**kw) -> QuantizationArgs:
        return QuantizationArgs(num_bits=spec["bits"], type=QuantizationType.INT, symmetric=True, **kw)

    preset = preset_name_to_scheme("W4A4", ["Linear"])  # the preset's strategies, at our bits and group
    return QuantizationScheme(
        targets=["Linear"],
        weights=args(strategy=preset.weights.strategy, group_size=spec["block"], dynamic=False),
        input_activations=args(strategy=preset.input_activations.strategy, dynamic=True))


def _ct_quantize(ref, name: str, calib, model: nn.Module) -> dict[str, Any]:
    _require(name)
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, QuantizationStrategy,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    skip = sorted(_skip_reasons(name, model))
    scheme = _ct_scheme(name)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=skip,
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config, show_progress=False)
    quantized = {n: m for n, m in _linears(model).items() if getattr(m, "quantization_scheme", None) is not None}
    passes = 0
    with torch.no_grad():
        for m in quantized.values():  # weights: min-max per group (llm-compressor's default weight observer)
            args = m.quantization_scheme.weights
            w = m.weight.detach().float()
            gscale = None
            if args.strategy == QuantizationStrategy.TENSOR_GROUP:
                gscale = generate_gparam(w.min(), w.max())
                m.weight_global_scale.data.copy_(gscale)
            groups = w.unflatten(-1, (-1, args.group_size))
            scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=gscale)
            m.weight_scale.data.copy_(scale)
            if getattr(m, "weight_zero_point", None) is not None:
                m.weight_zero_point.data.copy_(zp)
        if any(hasattr(m, "input_global_scale") for m in quantized.values()):
            # the activations' global scale: min/max of each input over the calibration set, on the FP model
            lo = {n: torch.tensor(float("inf")) for n in quantized}
            hi = {n: torch.tensor(float("-inf")) for n in quantized}

            def observe(n):
                def hook(_mod, inputs):
                    x = inputs[0].detach()
                    mn, mx = torch.aminmax(x)
                    lo[n] = torch.minimum(lo[n], mn.float().cpu())
                    hi[n] = torch.maximum(hi[n], mx.float().cpu())
                return hook

            handles = [m.register_forward_pre_hook(observe(n)) for n, m in quantized.items()]
            for m in quantized.values():
                m.quantization_enabled = False
            try:
                passes = _calibration_loop(ref, calib, model)
            finally:
                for h in handles:
                    h.remove()
                for m in quantized.values():
                    m.quantization_enabled = True
            for n, m in quantized.items():
                if not torch.isfinite(lo[n]):
                    raise ValueError(f"{n}: no calibration input reached this layer")
                m.input_global_scale.data.copy_(generate_gparam(lo[n], hi[n]).to(m.input_global_scale.device))
    for m in quantized.values():
        m.quantization_status = QuantizationStatus.FROZEN
    return dict(model=model, weight_quantized=list(quantized),
                input_quantized=list(quantized) if scheme.input_activations is not None else [],
                forward_loop_passes=passes)


# ---------------------------------------------------------------------------------------- torchao
def _torchao_quantize(name: str, model: nn.Module) -> dict[str, Any]:
    _require(name)
    from torchao.quantization import quantize_

    if name == "torchao-int8-dyn":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    else:
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        config = PrototypeInt4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP, set_inductor_config=False)
    skip = set(_skip_reasons(name, model))
    names = {id(m): n for n, m in model.named_modules()}

    def filter_fn(mod: nn.Module, fqn: str) -> bool:
        return isinstance(mod, nn.Linear) and names.get(id(mod), fqn) not in skip

    quantize_(model, config, filter_fn=filter_fn)
    wq = [n for n, m in model.named_modules()
          if isinstance(m, nn.Linear) and type(m.weight) is not nn.Parameter and type(m.weight) is not torch.Tensor]
    if name == "torchao-int4-wo":
        _int4_effective_weights(model, wq)
    return dict(model=model, weight_quantized=wq,
                input_quantized=wq if name == "torchao-int8-dyn" else [])


def _int4_effective_weights(model: nn.Module, names: list[str]) -> None:
    """Replace every INT4 weight by the fp32 weight torchao's kernel effectively multiplies by:
    the kernel applied to the identity, ``W_eff^T = linear(I_K, W_int4)`` (exact: the kernel is
    linear in its input). torchao's CPU INT4 kernel takes ~16 s per sample of flux-fmnist on our
    2-core AVX2 machine (1049 s for 64 samples) against ~0.5 s in fp32; with the effective weights
    the quality numbers are torchao's quantization executed in fp32 (measured against the kernel
    in docs/peers.md)."""
    import torch.nn.functional as F

    mods = dict(model.named_modules())
    with torch.no_grad():
        for n in names:
            m = mods[n]
            eye = torch.eye(m.in_features, dtype=torch.float32)
            w_eff = F.linear(eye, m.weight).T.contiguous()
            m.weight = nn.Parameter(w_eff, requires_grad=False)


# ---------------------------------------------------------------------------------------- the context
def _quantized_copy(ref, name: str, calib, log) -> tuple[nn.Module, dict[str, Any]]:
    original = ref.denoiser.transformer
    model = copy.deepcopy(original).eval()
    t0 = time.perf_counter()
    try:
        if name.startswith("modelopt-"):
            res = _modelopt_quantize(ref, name, calib, model, log)
        elif name.startswith("ct-"):
            res = _ct_quantize(ref, name, calib, model)
        else:
            res = _torchao_quantize(name, model)
    except PeerUnavailable:
        raise
    except Exception as exc:
        raise PeerUnavailable(f"peer {name} ({_package(name)}) failed: {type(exc).__name__}: {exc}; "
                              f"the versions this was measured with: {INSTALL_HINT}") from exc
    finally:
        ref.denoiser.transformer = original
    info = peer_info(ref, name)
    info.update(quantized_layers=len(res["weight_quantized"]),
                activation_quantized_layers=len(res["input_quantized"]),
                prepare_seconds=round(time.perf_counter() - t0, 2))
    expected = {d["layer"] for d in info["skipped"]}
    actual = set(_linears(original)) - set(res["weight_quantized"])
    if actual != expected:  # the peer quantized another set than documented: say so, don't hide it
        info["skipped"] = [dict(layer=n, reason=next((d["reason"] for d in info["skipped"] if d["layer"] == n),
                                                     "not quantized by the peer")) for n in sorted(actual)]
    if "dropped_exclusions" in res:
        info["dropped_default_exclusions"] = res["dropped_exclusions"]
    if info["uses_calibration"]:
        info["forward_loop_passes"] = res["forward_loop_passes"]
        d = calib.describe()
        info["calibration"] = dict(samples=d["samples"], steps=d["steps"], guidance=d["guidance"], key=d["key"])
    return res["model"], info


@contextlib.contextmanager
def peer_quantized(ref: Any, name: str, calib: Any, log: Callable[[str], None] | None = None
                   ) -> Iterator[dict[str, Any]]:
    """Within the context, ``ref.denoiser.transformer`` is a copy of it quantized by peer ``name``
    (see the module docstring); the original is restored on exit, also on errors. Yields the
    peer's :func:`peer_info` with what was actually quantized, ``prepare_seconds`` and the
    calibration used. ``calib``: a :class:`~adatsq.passes.calibration.CalibrationSet` whose
    denoiser is ``ref.denoiser`` (the modelopt peers' forward loop samples all of it; the torchao
    peers quantize dynamically and ignore it). Raises :class:`PeerUnavailable` (an InputError)
    when the peer's package is missing or the peer fails, InputError for an unknown name."""
    _spec(name)
    original = ref.denoiser.transformer
    model, info = _quantized_copy(ref, name, calib, log)
    if log is not None:
        log(f"{name}: {info['package']}, {info['quantized_layers']}/{info['linear_layers']} linears quantized, "
            f"prepared in {info['prepare_seconds']:.1f} s")
    ref.denoiser.transformer = model
    try:
        yield info
    finally:
        ref.denoiser.transformer = original
