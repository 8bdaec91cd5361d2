"""TensorRT backend: one engine per ONNX segment of a lowered build, and a runtime that switches them.

Input: a lowered build directory (``BUILD/onnx/manifest.json`` + ``BUILD/onnx/<segment>.onnx``,
the segments sharing one external-data file; see :mod:`adatsq.backends.manifest`). Output:

* ``BUILD/tensorrt/trtexec.sh`` -- always written, TensorRT or not: one ``trtexec`` line per
  segment (``--stronglyTyped``, min/opt/max shapes from the manifest, ``--saveEngine``), the
  weight-stripped / refittable variants as comments. It is what a user without the Python package
  runs on a machine with TensorRT.
* ``BUILD/tensorrt/<segment>.engine`` and ``BUILD/tensorrt/engines.json`` -- only when the
  ``tensorrt`` Python package is importable (:func:`build_engines`). Without it,
  :class:`TensorRTUnavailable` is raised after the script was written; no engine file and no
  ``engines.json`` appear, so nothing can mistake the build for one that has engines.

TensorRT API used (TensorRT 10.x Python API; pages read 2026-11 on docs.nvidia.com):

* Builder / network / parser: ``trt.Builder(logger)``,
  ``builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))`` ("every
  tensor in the network has a data type defined in the network following only type inference
  rules", python-api/infer/Core/Builder.html), ``trt.OnnxParser(network, logger)``,
  ``parser.parse_from_file(path)`` (external data is read from the model's folder),
  ``builder.create_optimization_profile()``, ``profile.set_shape(name, min, opt, max)``,
  ``config.add_optimization_profile(profile)``,
  ``config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)``,
  ``builder.build_serialized_network(network, config)``. With strong typing no precision flag
  (FP16/INT8) is set: "Use explicit quantization with Strong Typing. Precision-control build flags
  are not required and should not be specified" (inference-library/
  quantized-types-explicit-quantization.html).
* Weight-stripped engines: ``config.set_flag(trt.BuilderFlag.STRIP_PLAN)`` +
  ``trt.BuilderFlag.REFIT_IDENTICAL``; at load ``trt.Refitter(engine, logger)``,
  ``trt.OnnxParserRefitter(refitter, logger).refit_from_file(onnx)``,
  ``refitter.refit_cuda_engine()`` (inference-library/refitting-engines.html; NVIDIA/TensorRT
  samples/python/sample_weight_stripping).
* Runtime: ``trt.Runtime(logger).deserialize_cuda_engine(bytes)``,
  ``engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)`` ("the
  user supplies custom allocation to the execution context", python-api/infer/Core/
  RuntimeConfig.html), ``engine.device_memory_size_v2``, ``context.set_device_memory(ptr, size)``
  (``IExecutionContext::setDeviceMemoryV2``), ``context.set_input_shape``,
  ``context.set_tensor_address``, ``context.execute_async_v3(stream)``.

Nothing here was run against TensorRT in this repository's workplace (TensorRT cannot be
installed there); the tests that build and run an engine skip without ``tensorrt`` and a GPU.
See docs/tensorrt.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import AdatsqError, InputError

TRT_DIR = "tensorrt"
ENGINES_JSON = "engines.json"
SCRIPT = "trtexec.sh"
ENGINES_FORMAT = "adatsq.tensorrt-engines"
ENGINES_VERSION = 1

#: a profile entry: (min, opt, max) for a symbolic dimension name, or (min_shape, opt_shape, max_shape) for an input
ProfileSpec = Mapping[str, tuple]


class TensorRTUnavailable(InputError):
    """The ``tensorrt`` Python package is not installed: no engine can be built here."""


class TensorRTError(AdatsqError, RuntimeError):
    """TensorRT refused a segment (parse or build failure) or an engine could not be run."""


def tensorrt_available() -> bool:
    """True when ``import tensorrt`` works (it does not check for a GPU)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        _import_tensorrt()
    except Exception:
        return False
    return True


def _import_tensorrt():
    """The ``tensorrt`` module (one place, so that control-flow tests can substitute a labelled stub)."""
    return importlib.import_module("tensorrt")


# ----------------------------------------------------------------------------- manifest and shapes
def _onnx_dir(build_dir) -> Path:
    return Path(build_dir) / "onnx"


def read_manifest(build_dir) -> dict[str, Any]:
    """``BUILD/onnx/manifest.json`` through the lowering's own reader (format and step checks)."""
    from .manifest import load_manifest

    return load_manifest(_onnx_dir(build_dir))


def _example_shapes(build_dir, manifest) -> dict[str, list[int]]:
    """Input shapes at the model's example resolution: the manifest's, else the ONNX ``adatsq.model`` metadata."""
    out = {}
    for inp in manifest["inputs"]:
        for key in ("example_shape", "opt_shape"):
            if isinstance(inp.get(key), list):
                out[inp["name"]] = [int(d) for d in inp[key]]
    if len(out) == len(manifest["inputs"]):
        return out
    import onnx

    from ..frontend.onnx_io import model_metadata

    first = _onnx_dir(build_dir) / manifest["segments"][0]["file"]
    try:
        meta = model_metadata(onnx.load(str(first), load_external_data=False))
    except Exception as exc:
        raise InputError(f"{first}: cannot read the segment ({type(exc).__name__}: {exc})") from None
    for name, shape in (meta.get("inputs") or {}).items():
        out.setdefault(name, [int(d) for d in shape])
    return out


def profile_shapes(manifest: Mapping[str, Any], example: Mapping[str, list[int]] | None = None,
                   profiles: ProfileSpec | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape per network input, from the manifest's input shapes.

    Static dimensions are fixed. A symbolic dimension (a string in the manifest's ``shape``) takes
    ``profiles[dim_name] = (min, opt, max)`` when given. Otherwise ``opt`` is its size at the
    example resolution and: a dimension that is the first axis of an input (the batch) ranges over
    ``[1, 2 * opt]``; any other (tokens, latent height/width...) is pinned to ``opt``, because the
    valid token counts depend on the patch grid -- give a range to make it dynamic.
    ``profiles[input_name] = (min_shape, opt_shape, max_shape)`` overrides one input entirely.
    """
    profiles = dict(profiles or {})
    example = dict(example or {})
    inputs = [dict(inp, shape=_named_dims(inp)) for inp in manifest["inputs"]]
    batch_dims = {inp["shape"][0] for inp in inputs if inp["shape"] and isinstance(inp["shape"][0], str)}
    dim_value: dict[str, int] = {}
    for inp in inputs:
        ex = example.get(inp["name"])
        for k, d in enumerate(inp["shape"]):
            if isinstance(d, str) and ex is not None and k < len(ex):
                if dim_value.setdefault(d, int(ex[k])) != int(ex[k]):
                    raise InputError(f"dimension {d!r} is {dim_value[d]} in one input and {ex[k]} in "
                                     f"{inp['name']!r} at the example resolution")
    out = {}
    for inp in inputs:
        name = inp["name"]
        if name in profiles:
            mn, opt, mx = (tuple(int(v) for v in s) for s in profiles[name])
            if not (len(mn) == len(opt) == len(mx) == len(inp["shape"])):
                raise InputError(f"profile for input {name!r}: shapes of rank {len(mn)}/{len(opt)}/{len(mx)}, "
                                 f"the input has rank {len(inp['shape'])}")
            out[name] = (mn, opt, mx)
            continue
        mn, opt, mx = [], [], []
        for d in inp["shape"]:
            if isinstance(d, int) or (isinstance(d, str) and d.isdigit()):
                lo = o = hi = int(d)
            elif d in profiles:
                lo, o, hi = (int(v) for v in profiles[d])
            elif d in dim_value:
                o = dim_value[d]
                lo, hi = (1, 2 * o) if d in batch_dims else (o, o)
            else:
                raise InputError(f"input {name!r}: no size for dimension {d!r} (no example shape in the build; "
                                 f"give profiles={{{d!r}: (min, opt, max)}})")
            mn.append(lo), opt.append(o), mx.append(hi)
        out[name] = (tuple(mn), tuple(opt), tuple(mx))
    for name, (mn, opt, mx) in out.items():
        if not all(0 < a <= b <= c for a, b, c in zip(mn, opt, mx)):
            raise InputError(f"profile for input {name!r}: need 0 < min <= opt <= max, got {mn} / {opt} / {mx}")
    return out


def _named_dims(inp: Mapping[str, Any]) -> list:
    """An input's shape with unnamed dynamic dimensions (ONNX dim_value 0 / None) named ``input[axis]``."""
    shape = inp.get("shape")
    if not isinstance(shape, list):
        raise InputError(f"manifest input {inp.get('name')!r} has no shape list")
    return [f"{inp['name']}[{k}]" if d is None or (isinstance(d, int) and d <= 0) or d == "" else d
            for k, d in enumerate(shape)]


def _dims(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


# ----------------------------------------------------------------------------- trtexec
def trtexec_args(onnx_file: str, engine_file: str, shapes, *, workspace_gb: float = 4.0,
                 strip_weights: bool = False, refit: bool = False) -> list[str]:
    """The trtexec argument list that builds one segment the way :func:`build_engines` does."""
    args = ["trtexec", f"--onnx={onnx_file}", "--stronglyTyped"]
    for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        args.append(f"{flag}=" + ",".join(f"{name}:{_dims(s[k])}" for name, s in shapes.items()))
    args.append(f"--memPoolSize=workspace:{int(round(workspace_gb * 1024))}M")
    if strip_weights:
        args.append("--stripWeights")
    if refit:
        args.append("--refit")
    args.append(f"--saveEngine={engine_file}")
    return args


def write_trtexec_commands(build_dir, *, strip_weights: bool = False, workspace_gb: float = 4.0,
                           profiles: ProfileSpec | None = None, manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``BUILD/tensorrt/trtexec.sh`` (one trtexec line per segment); returns its path.

    Needs no TensorRT. Paths in the script are relative to the build directory (the script cds
    there first), so it runs from anywhere on a machine with ``trtexec`` on the PATH.
    """
    from ..tools.io import atomic_write_text

    build_dir = Path(build_dir)
    manifest = manifest if manifest is not None else read_manifest(build_dir)
    shapes = profile_shapes(manifest, _example_shapes(build_dir, manifest), profiles)
    lines = ["#!/bin/sh",
             f"# adatsq: one TensorRT engine per ONNX segment of this build ({len(manifest['segments'])} segments,",
             f"# {len(manifest['steps'])} steps; the step -> segment map is onnx/manifest.json).",
             "# Generated by adatsq for TensorRT 10.x trtexec.",
             "# Strongly typed networks: the precisions come from the Q/DQ graph, no --fp16/--int8 flags.",
             "set -e",
             'cd "$(dirname "$0")/.."',
             f"mkdir -p {TRT_DIR}"]
    for seg in manifest["segments"]:
        onnx_file = f"onnx/{seg['file']}"
        engine = f"{TRT_DIR}/{seg['name']}.engine"
        steps = seg.get("steps", [])
        lines.append("")
        lines.append(f"# segment {seg['name']}: steps {_ranges(steps)}")
        main = trtexec_args(onnx_file, engine, shapes, workspace_gb=workspace_gb, strip_weights=strip_weights)
        lines.append(shlex.join(main))
        if strip_weights:
            full = trtexec_args(onnx_file, engine, shapes, workspace_gb=workspace_gb)
            lines.append("#   with the weights in the engine: " + shlex.join(full))
        else:
            stripped = trtexec_args(onnx_file, f"{TRT_DIR}/{seg['name']}.stripped.engine", shapes,
                                    workspace_gb=workspace_gb, strip_weights=True)
            lines.append(f"#   weight-stripped (refit from {onnx_file} at load): " + shlex.join(stripped))
        refit = trtexec_args(onnx_file, f"{TRT_DIR}/{seg['name']}.refit.engine", shapes,
                             workspace_gb=workspace_gb, refit=True)
        lines.append("#   refittable, weights kept: " + shlex.join(refit))
    path = build_dir / TRT_DIR / SCRIPT
    atomic_write_text(path, "\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def _ranges(steps) -> str:
    steps = sorted(int(s) for s in steps)
    if not steps:
        return "none"
    out, start, prev = [], steps[0], steps[0]
    for s in steps[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ",".join(out)


# ----------------------------------------------------------------------------- building
def _check_fp16(build_dir, manifest) -> None:
    import onnx

    for seg in manifest["segments"]:
        path = _onnx_dir(build_dir) / seg["file"]
        model = onnx.load(str(path), load_external_data=False)
        f32 = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
        if f32:
            raise InputError(f"{path}: fp16 engine requested, but inputs {f32} are float32; a strongly typed "
                             "network computes in the graph's own types (lower the build in float16)")


def build_engines(build_dir, *, strip_weights: bool = False, fp16: bool = False, workspace_gb: float = 4.0,
                  profiles: ProfileSpec | None = None, verify: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build ``BUILD/tensorrt/<segment>.engine`` for every segment; returns the ``engines.json`` index.

    * ``strip_weights``: weight-stripped plans (``STRIP_PLAN`` + ``REFIT_IDENTICAL``); the runner
      refits them from the segment's ONNX (the shared external-data file) at load.
    * ``fp16``: strongly typed networks take every precision from the ONNX graph, so this sets no
      builder flag; it checks that the segments' float inputs are float16 and fails otherwise.
    * ``workspace_gb``: the builder's workspace memory-pool limit.
    * ``profiles``: ranges for symbolic dimensions or whole inputs, see :func:`profile_shapes`.
    * ``verify``: check the segments' sizes and sha256 against the manifest first.

    ``trtexec.sh`` is written first, always. Without TensorRT this raises
    :class:`TensorRTUnavailable` naming that script; no engine is written. ``engines.json``
    appears only after every engine was built (a stale one is removed first).
    """
    log = log or (lambda s: None)
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    script = write_trtexec_commands(build_dir, strip_weights=strip_weights, workspace_gb=workspace_gb,
                                    profiles=profiles, manifest=manifest)
    if fp16:
        _check_fp16(build_dir, manifest)
    if not tensorrt_available():
        raise TensorRTUnavailable(
            f"TensorRT is not installed (no `tensorrt` Python package): no engine was built. The ONNX segments "
            f"are in {_onnx_dir(build_dir)}; build the engines on a machine with TensorRT 10 by running {script} "
            f"(one trtexec command per segment)")
    trt = _import_tensorrt()
    if verify:
        from .manifest import verify_files

        verify_files(_onnx_dir(build_dir), manifest)
    shapes = profile_shapes(manifest, _example_shapes(build_dir, manifest), profiles)
    out_dir = build_dir / TRT_DIR
    index_path = out_dir / ENGINES_JSON
    if index_path.exists():
        index_path.unlink()  # never leave an index that points at a half-rebuilt set
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_box: list = [None]  # one timing cache shared by the segments' builds
    entries = []
    for seg in manifest["segments"]:
        onnx_path = _onnx_dir(build_dir) / seg["file"]
        log(f"tensorrt: building {seg['name']} from {onnx_path}")
        plan = _build_one(trt, builder, logger, onnx_path, shapes, strip_weights=strip_weights,
                          workspace_gb=workspace_gb, cache_box=cache_box)
        engine_path = out_dir / f"{seg['name']}.engine"
        from ..tools.io import atomic_write

        atomic_write(engine_path, lambda p, plan=plan: p.write_bytes(plan))
        entries.append({"name": seg["name"], "engine": f"{seg['name']}.engine", "onnx": f"onnx/{seg['file']}",
                        "steps": list(seg.get("steps", [])), "bytes": len(plan),
                        "profile": {k: [list(v) for v in s] for k, s in shapes.items()}})
    index = {"format": ENGINES_FORMAT, "version": ENGINES_VERSION,
             "tensorrt_version": str(getattr(trt, "__version__", "unknown")),
             "strip_weights": bool(strip_weights), "workspace_gb": workspace_gb, "strongly_typed": True,
             "segments": entries, "steps": list(manifest["steps"]), "trtexec": f"{TRT_DIR}/{SCRIPT}"}
    from ..tools.io import atomic_write_text

    atomic_write_text(index_path, json.dumps(index, indent=1))
    return index


def _build_one(trt, builder, logger, onnx_path: Path, shapes, *, strip_weights: bool, workspace_gb: float,
               cache_box: list) -> bytes:
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTError(f"{onnx_path}: TensorRT's ONNX parser refused the segment: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    if cache_box[0] is None:
        cache_box[0] = config.create_timing_cache(b"")
    config.set_timing_cache(cache_box[0], False)
    profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise TensorRTError(f"{onnx_path}: network inputs {missing} are not in the manifest's inputs")
    for n in names:
        mn, opt, mx = shapes[n]
        profile.set_shape(n, mn, opt, mx)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    return bytes(plan)


# ----------------------------------------------------------------------------- runtime
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def _torch_dtype(trt_dtype):
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
    if name not in _TORCH_DTYPES:
        raise TensorRTError(f"engine I/O of type {name} has no torch equivalent")
    return getattr(torch, _TORCH_DTYPES[name])


def read_engines(build_dir) -> dict[str, Any]:
    from ..tools.io import read_json

    path = Path(build_dir) / TRT_DIR / ENGINES_JSON
    data = read_json(path, InputError, "no such file (build the engines first: adatsq.backends.tensorrt.build_engines, "
                                       f"or run {Path(build_dir) / TRT_DIR / SCRIPT} and index them)")
    if not isinstance(data, dict) or data.get("format") != ENGINES_FORMAT or data.get("version") != ENGINES_VERSION:
        raise InputError(f"{path}: not an adatsq TensorRT engine index (format {ENGINES_FORMAT} v{ENGINES_VERSION})")
    return data


class TensorRTRunner:
    """Runs a build's engines: step ``k`` runs the engine of ``steps[k]``'s segment.

    Every engine gets one execution context created with
    ``ExecutionContextAllocationStrategy.USER_MANAGED``, and all contexts share one device scratch
    buffer of ``max(engine.device_memory_size_v2)`` bytes (a torch CUDA tensor): activations of one
    segment are dead when the next step starts, so the segments' activation memory is one block,
    not one per engine. Contexts run one at a time on one stream (the current torch stream) -- the
    sharing is not safe for concurrent execution. Weight-stripped engines are refitted from their
    segment's ONNX file at load.
    """

    def __init__(self, build_dir, *, device: int | str = 0, log: Callable[[str], None] | None = None):
        import torch

        if not tensorrt_available():
            raise TensorRTUnavailable("TensorRT is not installed (no `tensorrt` Python package): cannot run engines")
        if not torch.cuda.is_available():
            raise TensorRTError("TensorRT engines need a CUDA device; torch sees none")
        trt = self.trt = _import_tensorrt()
        log = log or (lambda s: None)
        self.build_dir = Path(build_dir)
        self.index = read_engines(build_dir)
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for seg in self.index["segments"]:
            path = self.build_dir / TRT_DIR / seg["engine"]
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise TensorRTError(f"{path}: TensorRT could not deserialize the engine (built by another TensorRT "
                                    "version or for another GPU?)")
            if self.index.get("strip_weights"):
                log(f"tensorrt: refitting {seg['name']} from {seg['onnx']}")
                refitter = trt.Refitter(engine, self.logger)
                parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
                refitted = parser_refitter.refit_from_file(str(self.build_dir / seg["onnx"]))
                if not refitted or not refitter.refit_cuda_engine():
                    raise TensorRTError(f"{path}: refit from {seg['onnx']} failed")
            self.engines[seg["name"]] = engine
        self.scratch_bytes = max(self._memory_size(e) for e in self.engines.values())
        with torch.cuda.device(self.device):
            self.scratch = torch.empty(max(self.scratch_bytes, 1), dtype=torch.uint8, device=self.device)
        for name, engine in self.engines.items():
            ctx = self._context(engine)
            if hasattr(ctx, "set_device_memory"):
                ctx.set_device_memory(self.scratch.data_ptr(), self.scratch_bytes)  # setDeviceMemoryV2
            else:
                ctx.device_memory = self.scratch.data_ptr()
            self.contexts[name] = ctx
        self.steps = list(self.index["steps"])

    def _memory_size(self, engine) -> int:
        return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)

    def _context(self, engine):
        trt = self.trt
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:
            return engine.create_execution_context(strategy.USER_MANAGED)
        return engine.create_execution_context_without_device_memory()

    def io_names(self, segment: str) -> tuple[list[str], list[str]]:
        engine = self.engines[segment]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        return ins, [n for n in names if n not in ins]

    def run(self, step: int, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run denoising step ``step``'s engine on ``inputs`` (torch tensors, moved/cast as needed)."""
        import torch

        if not 0 <= step < len(self.steps):
            raise InputError(f"step {step} out of range (the build has {len(self.steps)} steps)")
        seg = self.steps[step]
        engine, ctx = self.engines[seg], self.contexts[seg]
        ins, outs = self.io_names(seg)
        missing = [n for n in ins if n not in inputs]
        if missing:
            raise InputError(f"step {step} ({seg}): missing inputs {missing}")
        keep = []
        for n in ins:
            t = torch.as_tensor(inputs[n]).to(self.device, _torch_dtype(engine.get_tensor_dtype(n))).contiguous()
            keep.append(t)
            if not ctx.set_input_shape(n, tuple(t.shape)):
                raise InputError(f"step {step} ({seg}): input {n!r} of shape {tuple(t.shape)} is outside the "
                                 "engine's optimization profile")
            ctx.set_tensor_address(n, t.data_ptr())
        result = {}
        for n in outs:
            shape = tuple(ctx.get_tensor_shape(n))
            result[n] = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(n)), device=self.device)
            ctx.set_tensor_address(n, result[n].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise TensorRTError(f"step {step} ({seg}): execute_async_v3 failed")
        stream.synchronize()
        return result
