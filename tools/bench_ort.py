"""CPU benchmark of the onnxruntime artefacts (issue 8): latency, size, fusion, quality.

For ``flux-fmnist`` it compares, on this machine's CPU:

* ``fp32``: the FP32 ONNX export (``frontend/onnx_io.export_onnx``), at onnxruntime's default
  optimisation level (ALL) and at the runner's (EXTENDED);
* ``torch``: the same transformer in PyTorch, eager, FP32 (the reference);
* our lowered builds (``adatsq build --target onnxruntime``): a W8A8 plan, a W4A16 plan and a mixed
  plan from the search, run by ``backends/ort_runner`` with its pinned settings;
* what a user would otherwise do with onnxruntime's own tools on the FP32 export:
  ``quantize_dynamic`` (default settings; per-channel) and ``quantize_static`` in QDQ format with a
  calibration reader fed real flux-fmnist transformer inputs (uint8 activations, and int8
  activations: onnxruntime's default, whose load error is recorded verbatim when it refuses).

Per variant: the per-step latency (batch 2 = one sample with CFG, as the sampler runs it; the
model's 256 image + 4 text tokens; ``intra_op_num_threads`` = 2; warm-up, then the median of
``--runs`` runs, the whole list repeated ``--rounds`` times, the lowest median kept), the on-disk
size (model files + external data, a shared data file counted once) and its ratio to the FP32
ONNX, the op types of the graph onnxruntime actually runs (its optimised model: integer kernels,
Q/DQ left, float MatMul/Gemm), and the quality row of the evaluation harness (``adatsq eval``'s
judge accuracy, FID, PSNR/SSIM/feature distance vs the FP PyTorch samples from the same noise),
computed from samples drawn with the onnxruntime model standing in for the transformer inside
the reference sampler (``frontend.sampling.sample``).

For a build it also times ablations of its graph (``--ablate``): the smoothing Div, the low-rank
branch and the activation Q/DQ removed one at a time (numerically wrong graphs, for timing only),
which shows what each costs and whether the INT8 layers fuse without it.

    python -m adatsq.tools.bench_ort --out benchmarks/results/ort_cpu.json --md benchmarks/results/ort_cpu.md \\
        --build w8a8=DIR --build w4a16=DIR --build mixed=DIR

A ``--build NAME=DIR`` whose DIR has no ``onnx/manifest.json`` is built first
(``adatsq build flux-fmnist --target onnxruntime``; NAME's budget from ``--budget NAME=WxAy``,
defaults W8A8 / W4A16 / W6A12 for w8a8 / w4a16 / mixed). Intermediate files (the FP32 export,
the quantized models, the calibration inputs, per-variant quality rows) go to ``--work``; quality
rows are reused when their model file and sample set are unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

FORMAT = "adatsq.bench_ort"
VERSION = 1

#: op types of onnxruntime's optimised CPU graph, by what they say about fusion
INT_KERNELS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm",
               "QAttention", "ConvInteger", "QLinearConv", "MatMulNBits", "DynamicQuantizeLSTM")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
FLOAT_MATMULS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx_vnni_int8", "amx_tile", "amx_int8", "amx_bf16")
DEFAULT_BUDGETS = {"w8a8": "W8A8", "w4a16": "W4A16", "mixed": "W6A12"}


# =========================================================================== the machine
def cpu_info() -> dict[str, Any]:
    """``lscpu``'s model name and the SIMD flags that decide which integer kernels onnxruntime
    (MLAS) can use: AVX2 only, AVX-512 VNNI, AVX-VNNI, AMX."""
    name, flags = None, set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name" and name is None:
                name = val.strip()
            elif key.strip() == "Flags":
                flags = set(val.split())
    except (OSError, subprocess.SubprocessError):
        pass
    if not flags:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        except OSError:
            pass
    from .sysinfo import cpu_name

    return dict(model_name=name or cpu_name(), cpu_name=cpu_name(), cores=os.cpu_count(),
                flags={f: f in flags for f in CPU_FLAGS},
                isa=("AMX" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags
                     else "AVX-VNNI" if "avx_vnni" in flags else "AVX2" if "avx2" in flags else "pre-AVX2"))


def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Share of all cores busy over ``seconds`` (from /proc/stat; this process included)."""
    def snap():
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_idle_cpu(max_busy: float = 0.15, timeout: float = 0.0, log: Callable[[str], None] = print) -> float:
    """Wait until the CPU is at most ``max_busy`` busy (other engineers' jobs), up to ``timeout``
    seconds; returns the last busy fraction (recorded beside the timings)."""
    t0 = time.time()
    busy = cpu_busy_fraction()
    while busy > max_busy and time.time() - t0 < timeout:
        log(f"bench: CPU {busy:.0%} busy; waiting for it to be idle before timing")
        time.sleep(20)
        busy = cpu_busy_fraction()
    return busy


# =========================================================================== sizes
def external_files(model_path: str | Path) -> list[Path]:
    """The external-data files an ONNX model points to (resolved beside the model)."""
    import onnx

    model_path = Path(model_path)
    m = onnx.load(str(model_path), load_external_data=False)
    files = []
    for t in _all_tensors(m.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is not None:
                files.append((model_path.parent / loc).resolve())
    return sorted(set(files))


def _all_tensors(graph) -> Iterable[Any]:
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.t is not None and a.HasField("t"):
                yield a.t
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def disk_size(model_paths: Sequence[str | Path]) -> dict[str, Any]:
    """On-disk bytes of one or more ONNX models together: every model file plus every external
    data file they point to, each distinct file counted once (segments sharing one data file)."""
    models = sorted({Path(p).resolve() for p in model_paths})
    data = sorted({f for p in models for f in external_files(p)} - set(models))
    missing = [str(f) for f in data if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"external data missing: {', '.join(missing)}")
    model_bytes = sum(p.stat().st_size for p in models)
    data_bytes = sum(f.stat().st_size for f in data)
    return dict(bytes=model_bytes + data_bytes, model_bytes=model_bytes, data_bytes=data_bytes,
                files=len(models) + len(data), data_files=[f.name for f in data])


# =========================================================================== onnxruntime sessions
def plain_session_options(threads: int | None = 2, level: str = "all", optimized_model: str | Path | None = None):
    """onnxruntime's defaults (what a user of its quantization tools runs), with ``threads``."""
    from ..backends.ort_runner import session_options

    return session_options(threads, optimized_model=optimized_model, level=level, pinned=False)


def runner_session_options(threads: int | None = 2, level: str = "extended",
                           optimized_model: str | Path | None = None):
    """The runner's pinned settings (``backends/ort_runner.session_options``)."""
    from ..backends.ort_runner import session_options

    return session_options(threads, optimized_model=optimized_model, level=level)


def _runner_disabled() -> list[str]:
    from ..backends.ort_runner import disabled_optimizers

    return disabled_optimizers()


def make_session(path: str | Path, so, runner: bool = False):
    """A CPU session; ``runner``: with the runner's disabled optimizers as well (its settings are
    ``so`` plus ``backends/ort_runner.disabled_optimizers``: no S8->U8 on CPUs without VNNI)."""
    import onnxruntime as ort

    if runner:
        from ..backends.ort_runner import make_session as runner_session

        return runner_session(path, so)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_counts(model_path: str | Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in m.graph.node).items()))


def optimized_op_counts(model_path: str | Path, out_path: str | Path, so_factory: Callable[..., Any],
                        level: str, threads: int | None = 1) -> dict[str, int]:
    """Op-type counts of the graph onnxruntime (CPU EP) runs for ``model_path`` at ``level``
    (its optimised model, written to ``out_path``)."""
    make_session(model_path, so_factory(threads, level=level, optimized_model=out_path),
                 runner=so_factory is runner_session_options)
    return op_counts(out_path)


def fusion_summary(counts: Mapping[str, int]) -> dict[str, Any]:
    """The fused-node counts that matter: integer kernels, Q/DQ left, float matmuls."""
    return dict(int_kernels={k: counts[k] for k in INT_KERNELS if counts.get(k)},
                qdq_left={k: counts[k] for k in QDQ_OPS if counts.get(k)},
                float_matmuls={k: counts[k] for k in FLOAT_MATMULS if counts.get(k)},
                n_int_kernels=sum(counts.get(k, 0) for k in INT_KERNELS),
                n_qdq_left=sum(counts.get(k, 0) for k in QDQ_OPS),
                n_float_matmuls=sum(counts.get(k, 0) for k in FLOAT_MATMULS),
                nodes=sum(counts.values()))


# =========================================================================== inputs
class InputCapture:
    """Records the keyword inputs of every call of ``module`` (the diffusers transformer) as
    float32/int64 numpy arrays, in call order."""

    def __init__(self, module, names: Sequence[str] | None = None):
        self.module = module
        self.names = list(names) if names is not None else None
        self.calls: list[dict[str, np.ndarray]] = []
        self._handle = None

    def _hook(self, module, args, kwargs):
        if args:
            raise TypeError("InputCapture: the transformer was called with positional inputs")
        names = self.names or [k for k, v in kwargs.items() if hasattr(v, "detach")]
        self.calls.append({k: kwargs[k].detach().cpu().float().contiguous().numpy().copy() for k in names})

    def __enter__(self):
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._handle = None


def capture_inputs(ref: Any, input_names: Sequence[str], seeds_per_class: int = 1,
                   classes: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
    """The transformer inputs of the reference model along its FP calibration trajectories
    (``passes/calibration.reference_calibration``: every class x ``seeds_per_class`` calibration
    seeds, the model's schedule, both CFG halves in one batch): one dict per model call, i.e. per
    step and calibration batch. The same trajectories ``lower_build`` calibrates our scales on."""
    from ..frontend.sampling import sample
    from ..passes.calibration import reference_calibration

    calib = reference_calibration(ref, seeds_per_class=seeds_per_class, classes=classes)
    cap = InputCapture(ref.denoiser.transformer, input_names)
    with cap:
        for idx in calib.batches():
            sample(calib.denoiser, calib.sample_conditions(idx), [calib.sample_seeds()[i] for i in idx],
                   calib.schedule, calib.guidance, record=False)
    return cap.calls


def save_inputs(path: str | Path, calls: Sequence[Mapping[str, np.ndarray]]) -> None:
    from .io import atomic_path

    flat = {f"{i:04d}/{k}": v for i, c in enumerate(calls) for k, v in c.items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **flat)


def load_inputs(path: str | Path) -> list[dict[str, np.ndarray]]:
    z = np.load(str(path))
    calls: dict[int, dict[str, np.ndarray]] = {}
    for key in z.files:
        i, name = key.split("/", 1)
        calls.setdefault(int(i), {})[name] = z[key]
    return [calls[i] for i in sorted(calls)]


def batch_rows(call: Mapping[str, np.ndarray], rows: Sequence[int], batched: Sequence[str]) -> dict[str, np.ndarray]:
    """``rows`` of the batched inputs of one call (the unbatched ids tensors as they are)."""
    return {k: (np.ascontiguousarray(v[list(rows)]) if k in batched else v) for k, v in call.items()}


def step_feeds(calls: Sequence[Mapping[str, np.ndarray]], step: int | None = None, sample_index: int = 0,
               batch_inputs: Sequence[str] = ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                              "timestep")) -> dict[str, np.ndarray]:
    """One sampler step's inputs for ONE sample with CFG: batch 2 = [cond; uncond] rows of
    ``calls[step]`` (a calibration call holds B conditioned rows then B unconditioned ones)."""
    step = len(calls) // 2 if step is None else step
    call = calls[step]
    b = call["hidden_states"].shape[0] // 2
    return batch_rows(call, [sample_index, b + sample_index], batch_inputs)


class CalibrationReader:
    """An onnxruntime ``CalibrationDataReader`` over captured transformer inputs: one dict
    ``{input name: array}`` per captured call, with exactly the model's input names."""

    def __init__(self, calls: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str]):
        self.input_names = list(input_names)
        for i, c in enumerate(calls):
            missing = set(self.input_names) - set(c)
            if missing:
                raise ValueError(f"calibration call {i} lacks inputs {sorted(missing)}")
        self.calls = [{k: c[k] for k in self.input_names} for c in calls]
        self._it = iter(self.calls)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.calls)

    def __len__(self):
        return len(self.calls)


def calibration_reader(calls, input_names):
    """:class:`CalibrationReader` registered as an ``onnxruntime.quantization.CalibrationDataReader``."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationReader, CalibrationDataReader):
        pass

    return _Reader(calls, input_names)


# =========================================================================== onnxruntime's tools
@dataclasses.dataclass
class Variant:
    name: str
    kind: str  # fp32 | torch | build | ort-dynamic | ort-static | ablation
    how: str  # one line: what it is
    models: list[str] = dataclasses.field(default_factory=list)  # the ONNX files it consists of
    level: str = "all"  # onnxruntime optimisation level it runs at
    runner: bool = False  # the runner's pinned session settings
    build_dir: str | None = None
    error: str | None = None
    steps: list[str] | None = None  # a build: segment file per step
    quality: bool = True  # sample it through the harness's metrics


def _first_line(exc: BaseException, limit: int = 600) -> str:
    s = f"{type(exc).__name__}: {exc}"
    return " ".join(s.split())[:limit]


def ort_quantize_dynamic(fp32: Path, out: Path, **kw) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(fp32), str(out), **kw)


def ort_quantize_static(fp32: Path, out: Path, calls, input_names, activation: str = "uint8",
                        per_channel: bool = False, preprocess: bool = True, work: Path | None = None) -> str:
    """``quantize_static`` in QDQ format (weights int8, activations ``activation``), MinMax
    calibration over ``calls``; with ``preprocess`` onnxruntime's ``quant_pre_process`` first (as
    its documentation advises). Returns a note on what was done."""
    from onnxruntime.quantization import quant_pre_process

    src, note = fp32, "no pre-processing"
    if preprocess:
        pre = (work or out.parent) / (fp32.stem + ".preproc.onnx")
        pre_note = pre.with_suffix(".note")
        if pre.is_file() and pre_note.is_file():
            return _quantize_static_qdq(pre, out, calls, input_names, activation, per_channel, pre_note.read_text())
        errors = []
        for skip_symbolic in (False, True):  # symbolic shape inference fails on some dynamic exports
            try:
                if not pre.is_file():
                    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=skip_symbolic)
                src = pre
                note = "quant_pre_process" + (" (skip_symbolic_shape=True)" if skip_symbolic else "")
                break
            except Exception as exc:  # noqa: BLE001 - record and go on without it
                errors.append(_first_line(exc, 160))
        if src is fp32:
            note = f"quant_pre_process failed ({'; '.join(errors)}); quantized without it"
        elif errors:
            note += f"; with symbolic shape inference it failed: {errors[0]}"
        if src is pre:
            pre_note.write_text(note)
    return _quantize_static_qdq(src, out, calls, input_names, activation, per_channel, note)


def _quantize_static_qdq(src: Path, out: Path, calls, input_names, activation: str, per_channel: bool,
                         note: str) -> str:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(out), calibration_reader(calls, input_names), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=per_channel)
    return note


# =========================================================================== graph ablations
def ablate_model(model, drop: Sequence[str]):
    """A copy of a lowered segment with parts of every quantized layer removed (for timing what
    they cost; the numerics are wrong): ``smooth`` bypasses the smoothing ``Div``, ``lowrank``
    the low-rank branch (its ``Add`` passes the main output through; the branch MatMuls and Casts
    become dead), ``actq`` the activation QuantizeLinear/DequantizeLinear pair. Nodes are found
    by the names ``lower_segment`` gives them (``adatsq/<param>/<segment>/<j>/...``)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    found = Counter()
    for n in g.node:
        nm = n.name
        kind = None
        if nm.startswith("adatsq/"):
            if "smooth" in drop and nm.endswith("/Div") and n.op_type == "Div":
                kind = "smooth"
            elif "lowrank" in drop and nm.endswith("/Add_lr") and n.op_type == "Add":
                kind = "lowrank"
            elif "actq" in drop and ((n.op_type == "QuantizeLinear" and n.output[0].endswith("/x_q"))
                                     or (n.op_type == "DequantizeLinear" and n.output[0].endswith("/x_dq"))):
                kind = "actq"
        if kind is None:
            keep.append(n)
            continue
        found[kind] += 1
        if n.output[0] in outputs:  # a graph output keeps its name: pass the input through
            keep.append(onnx.helper.make_node("Identity", [n.input[0]], [n.output[0]], name=nm + "/bypass"))
        else:
            rename[n.output[0]] = n.input[0]
    missing = [d for d in drop if not found[d]]
    if missing:
        raise ValueError(f"ablation: the graph has no lowered {', '.join(missing)} nodes to remove")

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for n in keep:
        for i, x in enumerate(n.input):
            if x:
                n.input[i] = resolve(x)
    # dead-code elimination
    while True:
        used = {x for n in keep for x in n.input} | outputs
        alive = [n for n in keep if any(o in used for o in n.output)]
        if len(alive) == len(keep):
            break
        keep = alive
    del g.node[:]
    g.node.extend(keep)
    used = {x for n in keep for x in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return m


def write_ablation(segment: Path, out_dir: Path, drop: Sequence[str]) -> Path:
    """Write the ablated ``segment`` into ``out_dir`` beside a copy of its external data."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in external_files(segment):
        dst = out_dir / f.name
        if not dst.is_file() or dst.stat().st_size != f.stat().st_size:
            shutil.copyfile(f, dst)
    m = ablate_model(onnx.load(str(segment), load_external_data=False), drop)
    out = out_dir / f"{segment.stem}.{'-'.join(drop)}.onnx"
    onnx.save_model(m, str(out))
    return out


# =========================================================================== timing
def time_session(sess, feeds: Mapping[str, np.ndarray], warmup: int = 5, runs: int = 30) -> list[float]:
    """Seconds of ``runs`` calls after ``warmup`` calls."""
    names = [i.name for i in sess.get_inputs()]
    f = {k: feeds[k] for k in names}
    for _ in range(warmup):
        sess.run(None, f)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, f)
        out.append(time.perf_counter() - t0)
    return out


def time_torch(module, feeds: Mapping[str, np.ndarray], threads: int, warmup: int = 5, runs: int = 30) -> list[float]:
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kw = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        with torch.inference_mode():
            for _ in range(warmup):
                module(**kw, return_dict=False)
            out = []
            for _ in range(runs):
                t0 = time.perf_counter()
                module(**kw, return_dict=False)
                out.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    return out


def summarize_times(rounds: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per round: median; the figure is the lowest round median (least disturbed), in ms."""
    meds = [statistics.median(r) * 1e3 for r in rounds]
    best = int(np.argmin(meds))
    r = sorted(rounds[best])
    return dict(ms_per_step=round(meds[best], 3), round_medians_ms=[round(m, 3) for m in meds],
                p10_ms=round(float(np.percentile(r, 10)) * 1e3, 3), p90_ms=round(float(np.percentile(r, 90)) * 1e3, 3),
                runs=len(r))


# =========================================================================== quality (the harness's row)
class SessionTransformer(nn.Module):
    """Duck-types the diffusers transformer call ``transformer(**inputs, return_dict=False)[0]``
    with one onnxruntime session, so that the reference ``FluxFMNIST`` denoiser (conditioner,
    packing, CFG) and ``frontend.sampling.sample`` run it unchanged."""

    def __init__(self, sess):
        super().__init__()
        self.sess = sess
        self.names = [i.name for i in sess.get_inputs()]
        # FluxFMNIST reads the device/dtype of its transformer through its buffers only
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def forward(self, return_dict: bool = False, **inputs):
        feeds = {k: inputs[k].detach().float().contiguous().numpy() for k in self.names}
        return (torch.from_numpy(self.sess.run(None, feeds)[0]),)


def sample_images(denoiser_or_build: Any, labels: np.ndarray, seeds: Sequence[int], schedule: Any,
                  batch: int = 32, on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` images as the harness makes them (sample ``i``: class ``labels[i]``,
    seed ``seeds[i]``), with ``frontend.sampling.sample`` on a denoiser, or ``OrtBuild.sample``."""
    import torch

    from . import fmnist
    from ..frontend.sampling import sample

    out = []
    for start in range(0, len(labels), batch):
        sl = slice(start, min(len(labels), start + batch))
        if hasattr(denoiser_or_build, "sample") and hasattr(denoiser_or_build, "manifest"):
            x = denoiser_or_build.sample([int(c) for c in labels[sl]], list(seeds[sl]))
        else:
            x = sample(denoiser_or_build, torch.from_numpy(labels[sl]), list(seeds[sl]), schedule, record=False).sample
        out.append(fmnist.from_model_space(x.numpy()))
        if on_batch is not None:
            on_batch(sl.stop, len(labels))
    return np.concatenate(out)


def quality_row(judge: Any, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                fp_images: np.ndarray | None, fp_features: np.ndarray | None) -> dict[str, Any]:
    """The harness's metrics for one variant (``tools/evaluate.evaluate``'s row, same functions)."""
    from .metrics import feature_distance, fid, mean_psnr, ssim

    ref_mu, ref_sigma = judge.reference_stats()
    feats = judge.features(images)
    pred = judge.predict(images)
    per_class = {classes[c]: float((pred[labels == c] == c).mean()) for c in sorted(set(labels.tolist()))}
    row = dict(judge_accuracy=float((pred == labels).mean()), per_class_accuracy=per_class,
               fid=float(fid(feats, ref_mu, ref_sigma)))
    if fp_images is None:
        row.update(psnr_vs_fp=None, ssim_vs_fp=None, feature_distance_vs_fp=None)
    else:
        row.update(psnr_vs_fp=float(mean_psnr(fp_images, images)), ssim_vs_fp=float(np.mean(ssim(fp_images, images))),
                   feature_distance_vs_fp=float(np.mean(feature_distance(fp_features, feats))))
    return row


def sha256_files(paths: Iterable[str | Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(str(Path(x).resolve()) for x in paths):
        h.update(p.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# =========================================================================== report
def _fmt(v, f, dash="—"):
    return dash if v is None else format(v, f)


def markdown(result: Mapping[str, Any]) -> str:
    cpu = result["cpu"]
    env = result["environment"]
    t = result["timing"]
    q = result.get("quality") or {}
    lines = [f"**flux-fmnist on onnxruntime {env['onnxruntime']} (CPU EP)** — CPU: {cpu['model_name']} "
             f"({cpu['isa']}; {cpu['cores']} cores), {t['threads']} intra-op threads, batch {t['batch']} "
             f"x {t['tokens']} tokens (one sample with CFG), median of {t['runs']} runs after {t['warmup']} "
             f"warm-up, lowest of {t['rounds']} rounds; CPU {t.get('busy_before', float('nan')):.0%} busy "
             "before timing.", ""]
    if q:
        lines += [f"Quality: the harness's metrics (`adatsq eval`: judge, FID, PSNR/SSIM vs the FP PyTorch "
                  f"samples from the same noise) on {q['samples']} samples, seed {q['seed']}, "
                  f"{q['steps']} steps, CFG {q['guidance']}; FID at n={q['samples']} is biased upwards: "
                  "compare rows only.", ""]
    lines += ["| variant | what | ORT level | ms/step | vs FP32 ORT | vs PyTorch | size MB | size / FP32 | "
              "integer kernels | Q/DQ left | float MatMul/Gemm | judge acc. | FID | PSNR vs FP | SSIM vs FP |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["variants"]:
        if r.get("error"):
            lines.append(f"| {r['name']} | {r['how']} | {r.get('level', '')} | did not run: {r['error'][:300]} "
                         "| | | | | | | | | | | |")
            continue
        fu = r.get("fusion") or {}
        ik = ", ".join(f"{k} {v}" for k, v in (fu.get("int_kernels") or {}).items()) or ("—" if fu else "")
        qr = r.get("quality") or {}
        lines.append(
            f"| {r['name']} | {r['how']} | {r.get('level') or '—'} | {_fmt(r.get('ms_per_step'), '.2f')} | "
            f"{_fmt(r.get('speedup_vs_fp32_ort'), '.2f')}{'x' if r.get('speedup_vs_fp32_ort') else ''} | "
            f"{_fmt(r.get('speedup_vs_torch'), '.2f')}{'x' if r.get('speedup_vs_torch') else ''} | "
            f"{_fmt((r.get('size') or {}).get('bytes', None) and r['size']['bytes'] / 1e6, '.2f')} | "
            f"{_fmt(r.get('size_ratio'), '.3f')} | {ik} | {_fmt(fu.get('n_qdq_left'), 'd')} | "
            f"{_fmt(fu.get('n_float_matmuls'), 'd')} | {_fmt(qr.get('judge_accuracy'), '.3f')} | "
            f"{_fmt(qr.get('fid'), '.2f')} | {_fmt(qr.get('psnr_vs_fp'), '.2f')} | {_fmt(qr.get('ssim_vs_fp'), '.4f')} |")
    abl = result.get("ablations") or []
    if abl:
        lines += ["", "Ablations of the lowered graphs (timing only; the numerics of these graphs are wrong):", "",
                  "| graph | removed | ORT level | ms/step | integer kernels | Q/DQ left | float MatMul/Gemm |",
                  "|---|---|---|---:|---|---:|---:|"]
        for r in abl:
            if r.get("error"):
                lines.append(f"| {r['name']} | {r['removed']} | | did not run: {r['error'][:200]} | | | |")
                continue
            fu = r.get("fusion") or {}
            ik = ", ".join(f"{k} {v}" for k, v in (fu.get("int_kernels") or {}).items()) or "—"
            lines.append(f"| {r['of']} | {r['removed']} | {r['level']} | {_fmt(r.get('ms_per_step'), '.2f')} | {ik} | "
                         f"{_fmt(fu.get('n_qdq_left'), 'd')} | {_fmt(fu.get('n_float_matmuls'), 'd')} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def write_outputs(result: Mapping[str, Any], out: str | Path | None, md: str | Path | None) -> None:
    """JSON and Markdown, each written atomically."""
    from .io import atomic_write_text

    if out:
        atomic_write_text(out, json.dumps(result, indent=1, sort_keys=False) + "\n")
    if md:
        atomic_write_text(md, markdown(result))


# =========================================================================== the benchmark
@dataclasses.dataclass
class BenchConfig:
    work: Path = Path("/tmp/adatsq-bench-ort")
    builds: dict[str, str] = dataclasses.field(default_factory=dict)
    budgets: dict[str, str] = dataclasses.field(default_factory=dict)
    cache: str | None = None
    threads: int = 2
    warmup: int = 5
    runs: int = 30
    rounds: int = 2
    samples: int = 128
    seed: int = 0
    sample_batch: int = 32
    quality: bool = True
    timing: bool = True
    ablate: tuple[str, ...] = ()
    wait_idle: float = 0.0  # seconds to wait for an idle CPU before timing
    only: tuple[str, ...] = ()  # variant names (empty: all)


def _log(msg: str) -> None:
    print(msg, flush=True)


def ensure_build(name: str, d: Path, budget: str, cache: str | None, log=_log) -> None:
    if (d / "onnx" / "manifest.json").is_file():
        return
    if (d / "plan.json").is_file():  # built, not lowered: lower it
        from ..backends.onnx_qdq import lower_build

        lower_build(d, "flux-fmnist", log=log)
        return
    cmd = [sys.executable, "-m", "adatsq", "build", "flux-fmnist", "-o", str(d), "--target", "onnxruntime",
           "--budget", budget] + (["--cache", cache] if cache else [])
    log(f"bench: building {name}: {' '.join(cmd)}")
    subprocess.run(cmd, check=True)


def prepare(cfg: BenchConfig, log=_log) -> tuple[list[Variant], dict[str, Any]]:
    """The FP32 export, captured inputs, onnxruntime's quantized models and the builds."""
    import torch

    from ..backends.onnx_qdq import _reference_resolution
    from ..frontend.export import export_model
    from ..frontend.layers import LayerTable
    from ..frontend.onnx_io import export_onnx
    from ..frontend.reference import load_reference

    work = cfg.work
    work.mkdir(parents=True, exist_ok=True)
    ref = load_reference("flux-fmnist")
    ctx: dict[str, Any] = dict(ref=ref)
    fp32 = work / "fp32.onnx"
    if not fp32.is_file():
        log("bench: exporting the FP32 ONNX")
        graph = export_model(ref.denoiser.transformer, _reference_resolution("flux-fmnist"))
        export_onnx(graph, fp32, table=LayerTable.from_graph(graph))
    sess = make_session(fp32, plain_session_options(cfg.threads))
    input_names = [i.name for i in sess.get_inputs()]
    ctx["input_names"] = input_names
    inputs_file = work / "calib_inputs.npz"
    if not inputs_file.is_file():
        log("bench: capturing transformer inputs along the calibration trajectories")
        torch.set_num_threads(cfg.threads)
        save_inputs(inputs_file, capture_inputs(ref, input_names))
    calls = load_inputs(inputs_file)
    ctx["calls"] = calls
    variants = [Variant("fp32", "fp32", "FP32 ONNX export, ORT default level", [str(fp32)], level="all"),
                Variant("fp32-ext", "fp32", "FP32 ONNX export, the runner's level", [str(fp32)], level="extended",
                        quality=False),
                Variant("torch", "torch", "PyTorch eager FP32 (the reference)", level=None)]

    def tool(name: str, kind: str, how: str, make: Callable[[Path], str | None]) -> None:
        out = work / f"{name}.onnx"
        v = Variant(name, kind, how, [str(out)], level="all")
        if cfg.only and name not in cfg.only:
            return
        err_file = work / f"{name}.error"
        if not out.is_file() and not err_file.is_file():
            log(f"bench: {name}: {how}")
            try:
                note = make(out)
                if note:
                    v.how += f" ({note})"
            except Exception as exc:  # noqa: BLE001 - onnxruntime's tools raise many types: record
                err_file.write_text(_first_line(exc))
        if err_file.is_file():
            v.error = "quantization failed: " + err_file.read_text()
        else:
            note_file = work / f"{name}.note"
            if note_file.is_file():
                v.how += f" ({note_file.read_text()})"
        variants.append(v)

    def static(act: str, per_channel: bool):
        def make(out: Path):
            note = ort_quantize_static(fp32, out, calls, input_names, activation=act, per_channel=per_channel,
                                       work=work)
            (work / f"{out.stem}.note").write_text(note)
        return make

    tool("ort-dynamic", "ort-dynamic", "quantize_dynamic, default settings (int8 weights per tensor, "
         "dynamic uint8 activations)", lambda out: ort_quantize_dynamic(fp32, out))
    tool("ort-dynamic-pc", "ort-dynamic", "quantize_dynamic, per_channel=True",
         lambda out: ort_quantize_dynamic(fp32, out, per_channel=True))
    tool("ort-static-u8", "ort-static", "quantize_static QDQ, uint8 activations, int8 weights, MinMax",
         static("uint8", False))
    tool("ort-static-u8-pc", "ort-static", "quantize_static QDQ, uint8 activations, int8 weights per channel",
         static("uint8", True))
    tool("ort-static-s8", "ort-static", "quantize_static QDQ, int8 activations (its default), int8 weights",
         static("int8", False))
    for name, d in cfg.builds.items():
        d = Path(d)
        budget = cfg.budgets.get(name) or DEFAULT_BUDGETS.get(name, name.upper())
        try:
            ensure_build(name, d, budget, cfg.cache, log)
            man = json.loads((d / "onnx" / "manifest.json").read_text())
            segs = {s["name"]: str(d / "onnx" / s["file"]) for s in man["segments"]}
            plan = json.loads((d / "plan.json").read_text())
            ach = plan.get("achieved") or {}
            if (d / "report.json").is_file():  # an existing build: its own options, not the name's default
                o = json.loads((d / "report.json").read_text()).get("options", {})
                budget = " ".join([str(o.get("budget", budget))]
                                  + [f"--{k.replace('_', '-')} {o[k]}" for k in ("memory_bits", "max_segments", "rank")
                                     if o.get(k) is not None and not (k == "rank" and o[k] == 32)])
            how = (f"adatsq build --budget {budget}: {len(segs)} segment(s), achieved "
                   f"W{ach.get('w_bits', float('nan')):.2f}A{ach.get('a_bits', float('nan')):.2f}")
            variants.append(Variant(name, "build", how, sorted(segs.values()), level="extended", runner=True,
                                    build_dir=str(d), steps=[segs[s] for s in man["steps"]]))
        except Exception as exc:  # noqa: BLE001 - a failed build is a row, not the end of the benchmark
            variants.append(Variant(name, "build", f"adatsq build --budget {budget}", level="extended",
                                    runner=True, build_dir=str(d), error=_first_line(exc)))
    if cfg.only:
        variants = [v for v in variants if v.name in cfg.only or v.name in ("fp32", "torch")]
    return variants, ctx


def _session_factory(v: Variant):
    return runner_session_options if v.runner else plain_session_options


def measure_static(v: Variant, cfg: BenchConfig, fp32_bytes: int, log=_log) -> dict[str, Any]:
    """Size, fusion (optimised-graph op counts) and whether onnxruntime loads the model."""
    row: dict[str, Any] = dict(name=v.name, kind=v.kind, how=v.how, level=v.level, runner_settings=v.runner)
    if v.build_dir:
        row["build_dir"] = v.build_dir
    if v.error:
        row["error"] = v.error
        return row
    if not v.models:
        return row
    row["size"] = disk_size(v.models)
    row["size_ratio"] = round(row["size"]["bytes"] / fp32_bytes, 4)
    row["graph_ops"] = {}
    row["optimized_ops"] = {}
    opt_dir = cfg.work / "optimized"
    opt_dir.mkdir(exist_ok=True)
    for mp in v.models:
        key = Path(mp).name
        row["graph_ops"][key] = op_counts(mp)
        try:
            row["optimized_ops"][key] = optimized_op_counts(mp, opt_dir / f"{v.name}.{Path(mp).stem}.opt.onnx",
                                                            _session_factory(v), v.level)
        except Exception as exc:  # noqa: BLE001 - e.g. the int8-activation QDQ graph onnxruntime refuses
            row["error"] = "onnxruntime cannot load it: " + _first_line(exc)
            return row
    # fusion of the graph run at most steps (a build's most used segment), summed over nothing
    main = Path(_main_model(v)).name
    row["fusion"] = fusion_summary(row["optimized_ops"][main])
    row["fusion_of"] = main
    return row


def _main_model(v: Variant) -> str:
    if v.steps:
        return Counter(v.steps).most_common(1)[0][0]
    return v.models[0]


def measure_times(variants: Sequence[Variant], rows: dict[str, dict], feeds, ref, cfg: BenchConfig,
                  log=_log) -> None:
    """Per-step latency of every loadable variant (a build: the mean over its steps of its
    segments' medians, i.e. one sampling run's average step)."""
    import torch

    torch.set_num_threads(cfg.threads)
    sessions: dict[str, Any] = {}
    per_round: dict[str, dict[str, list[list[float]]]] = {}
    runnable = [v for v in variants if not rows[v.name].get("error")]
    for rnd in range(cfg.rounds):
        for v in runnable:
            if v.kind == "torch":
                t = time_torch(ref.denoiser.transformer, feeds, cfg.threads, cfg.warmup, cfg.runs)
                per_round.setdefault(v.name, {}).setdefault("torch", []).append(t)
                continue
            for mp in sorted(set(v.steps or v.models)):
                key = f"{v.name}:{mp}"
                if key not in sessions:
                    sessions[key] = make_session(mp, _session_factory(v)(cfg.threads, level=v.level), runner=v.runner)
                t = time_session(sessions[key], feeds, cfg.warmup, cfg.runs)
                per_round.setdefault(v.name, {}).setdefault(mp, []).append(t)
            log(f"bench: round {rnd + 1}/{cfg.rounds} {v.name}: "
                + ", ".join(f"{statistics.median(r[-1]) * 1e3:.2f} ms" for r in per_round[v.name].values()))
    for v in runnable:
        per = {mp: summarize_times(rs) for mp, rs in per_round[v.name].items()}
        row = rows[v.name]
        if v.steps:
            row["ms_per_step"] = round(float(np.mean([per[mp]["ms_per_step"] for mp in v.steps])), 3)
            row["segments_ms"] = {Path(mp).name: s for mp, s in per.items()}
        else:
            s = next(iter(per.values()))
            row.update(s)


def measure_quality(variants: Sequence[Variant], rows: dict[str, dict], ctx: dict, cfg: BenchConfig,
                    log=_log) -> dict[str, Any]:
    """Samples of every loadable variant through the harness's metrics, against the FP PyTorch
    samples of :func:`adatsq.tools.evaluate.evaluate` (whose ``fp`` row is reproduced as a check)."""
    import torch

    from ..backends.ort_runner import OrtBuild
    from ..frontend.reference import FluxFMNIST
    from .evaluate import EvalConfig, _round, evaluate
    from .judge import Judge

    torch.set_num_threads(cfg.threads)
    ref = ctx["ref"]
    qdir = cfg.work / "quality"
    qdir.mkdir(exist_ok=True)
    labels = np.array([i % len(ref.classes) for i in range(cfg.samples)], dtype=np.int64)
    seeds = [cfg.seed + i for i in range(cfg.samples)]
    fp_file = qdir / f"fp_n{cfg.samples}_s{cfg.seed}.npz"
    if fp_file.is_file():
        z = np.load(fp_file)
        fp_images, harness_fp = z["images"], json.loads(str(z["row"]))
    else:
        log(f"bench: harness FP samples (adatsq eval, n={cfg.samples})")
        res, images, _ = evaluate(EvalConfig(model="flux-fmnist", variants=("fp",), n=cfg.samples, seed=cfg.seed,
                                             batch=cfg.sample_batch))
        fp_images, harness_fp = images["fp"], res["variants"]["fp"]
        with open(fp_file, "wb") as f:
            np.savez(f, images=fp_images, row=json.dumps(harness_fp))
    judge = Judge.load()
    fp_feats = judge.features(fp_images)
    mine = quality_row(judge, fp_images, labels, ref.classes, None, None)
    check = {k: _round(mine[k]) == _round(harness_fp[k]) for k in ("judge_accuracy", "fid")}
    if not all(check.values()):
        raise RuntimeError(f"bench: the scorer does not reproduce the harness's fp row: {mine} vs {harness_fp}")
    rows.setdefault("torch", {})["quality"] = dict(_round(harness_fp), source="adatsq eval (harness), fp")
    for v in variants:
        row = rows[v.name]
        if v.kind == "torch" or row.get("error") or not v.models or not v.quality:
            continue
        key = f"{v.name}_n{cfg.samples}_s{cfg.seed}_{sha256_files(v.models)}_{v.level}"
        qf = qdir / f"{key}.json"
        if qf.is_file():
            row["quality"] = json.loads(qf.read_text())
            continue
        t0 = time.perf_counter()
        if v.kind == "build":
            runner = OrtBuild(v.build_dir, device="cpu", threads=cfg.threads)
            src = runner
        else:
            sess = make_session(v.models[0], plain_session_options(cfg.threads, level=v.level))
            src = FluxFMNIST(SessionTransformer(sess), ref.denoiser.conditioner).eval()
        log(f"bench: sampling {cfg.samples} images with {v.name}")
        images = sample_images(src, labels, seeds, ref.schedule, batch=cfg.sample_batch)
        q = _round(quality_row(judge, images, labels, ref.classes, fp_images, fp_feats))
        q["sampling_s"] = round(time.perf_counter() - t0, 1)
        q["source"] = "onnxruntime samples, harness metrics"
        from .io import atomic_write_text

        atomic_write_text(qf, json.dumps(q, indent=1))
        row["quality"] = q
        log(f"bench: {v.name}: judge {q['judge_accuracy']:.3f} FID {q['fid']:.2f} PSNR {q['psnr_vs_fp']:.2f} dB "
            f"({q['sampling_s']:.0f}s)")
    return dict(samples=cfg.samples, seed=cfg.seed, steps=ref.schedule.num_steps, guidance=ref.schedule.guidance,
                classes=list(ref.classes), harness_fp_row_reproduced=check)


def run(cfg: BenchConfig, command: str = "", log=_log) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort
    import torch

    variants, ctx = prepare(cfg, log)
    fp32 = Path(variants[0].models[0])
    fp32_size = disk_size([fp32])
    rows = {v.name: measure_static(v, cfg, fp32_size["bytes"], log) for v in variants}
    feeds = step_feeds(ctx["calls"])
    timing = dict(threads=cfg.threads, batch=int(feeds["hidden_states"].shape[0]),
                  tokens=int(feeds["hidden_states"].shape[1] + feeds["encoder_hidden_states"].shape[1]),
                  image_tokens=int(feeds["hidden_states"].shape[1]), text_tokens=int(feeds["encoder_hidden_states"].shape[1]),
                  warmup=cfg.warmup, runs=cfg.runs, rounds=cfg.rounds,
                  feeds="calibration inputs of step 10 (class 0, calibration seed), [cond; uncond]")
    quality = None
    if cfg.quality:
        quality = measure_quality(variants, rows, ctx, cfg, log)
    if cfg.timing:
        timing["busy_before"] = wait_for_idle_cpu(timeout=cfg.wait_idle, log=log)
        timing["loadavg_before"] = list(os.getloadavg())
        measure_times(variants, rows, feeds, ctx["ref"], cfg, log)
        timing["busy_after"] = cpu_busy_fraction()
        timing["loadavg_after"] = list(os.getloadavg())
        base = rows["fp32"].get("ms_per_step")
        tref = rows["torch"].get("ms_per_step")
        for r in rows.values():
            if r.get("ms_per_step") and base:
                r["speedup_vs_fp32_ort"] = round(base / r["ms_per_step"], 3)
            if r.get("ms_per_step") and tref:
                r["speedup_vs_torch"] = round(tref / r["ms_per_step"], 3)
    ablations = []
    for name in cfg.ablate:
        v = next((x for x in variants if x.name == name and x.kind == "build" and not rows[name].get("error")), None)
        if v is None:
            continue
        seg = Path(_main_model(v))
        base_row = dict(name=f"{name}", of=name, removed="nothing", level=v.level, fusion=rows[name].get("fusion"),
                        ms_per_step=(rows[name].get("segments_ms") or {}).get(seg.name, {}).get("ms_per_step"))
        ablations.append(base_row)
        for drop in (("smooth",), ("lowrank",), ("actq",), ("smooth", "lowrank"), ("smooth", "lowrank", "actq")):
            ab = Variant(f"{name}-no-{'-'.join(drop)}", "ablation", "", level=v.level, runner=True)
            arow = dict(name=ab.name, of=name, removed=" + ".join(drop), level=v.level)
            try:
                try:
                    mp = write_ablation(seg, cfg.work / "ablations" / name, drop)
                except ValueError as exc:  # e.g. no activation Q/DQ in a W4A16 graph: nothing to ablate
                    if "no lowered" in str(exc):
                        continue
                    raise
                ab.models = [str(mp)]
                st = measure_static(ab, cfg, fp32_size["bytes"], log)
                if st.get("error"):
                    raise RuntimeError(st["error"])
                arow["fusion"] = st["fusion"]
                if cfg.timing:
                    sess = make_session(mp, runner_session_options(cfg.threads, level=v.level), runner=True)
                    arow.update(summarize_times([time_session(sess, feeds, cfg.warmup, cfg.runs)
                                                 for _ in range(cfg.rounds)]))
            except Exception as exc:  # noqa: BLE001
                arow["error"] = _first_line(exc)
            ablations.append(arow)
            log(f"bench: ablation {ab.name}: {arow.get('ms_per_step')} ms")
    result = dict(
        format=FORMAT, version=VERSION, model="flux-fmnist", command=command,
        cpu=cpu_info(),
        environment=dict(onnxruntime=ort.__version__, onnx=onnx.__version__, torch=torch.__version__,
                         python=platform.python_version(), providers=["CPUExecutionProvider"],
                         runner_disabled_optimizers=_runner_disabled()),
        fp32_onnx=dict(path=str(fp32), **fp32_size),
        timing=timing, quality=quality,
        variants=[rows[v.name] for v in variants], ablations=ablations,
        notes=["ms_per_step: one model call at batch 2 (one sample with CFG), what each of the 20 sampling "
               "steps costs; a build with several segments: the mean over its steps of its segments' medians",
               "size: model file(s) + external data, a data file shared by segments counted once; size_ratio: "
               "to the FP32 ONNX export (weights inline)",
               "fusion: op types of onnxruntime's optimised graph (SessionOptions.optimized_model_filepath) of "
               "the variant's main graph, at the level it runs at"],
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adatsq.tools.bench_ort", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--md", help="results Markdown (default: --out with .md)")
    p.add_argument("--work", default="/tmp/adatsq-bench-ort", help="intermediate files (default %(default)s)")
    p.add_argument("--build", action="append", default=[], metavar="NAME=DIR",
                   help="a build directory (built if it has no onnx/manifest.json); default w8a8, w4a16, mixed "
                        "under WORK/builds")
    p.add_argument("--no-builds", action="store_true", help="only the FP32 export and onnxruntime's tools")
    p.add_argument("--budget", action="append", default=[], metavar="NAME=WxAy",
                   help="budget of a build that must be made (defaults: w8a8 W8A8, w4a16 W4A16, mixed W6A12)")
    p.add_argument("--cache", help="analysis cache for builds (adatsq build --cache)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-n", "--samples", type=int, default=128, help="quality samples per variant (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--ablate", action="append", default=[], metavar="NAME", help="time ablations of this build's graph")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for an idle CPU before timing (default: do not wait)")
    p.add_argument("--only", action="append", default=[], metavar="VARIANT", help="only these variants (+fp32, torch)")
    args = p.parse_args(argv)
    builds = {} if args.no_builds else dict(b.split("=", 1) for b in args.build) if args.build else {
        k: str(Path(args.work) / "builds" / k) for k in DEFAULT_BUDGETS}
    cfg = BenchConfig(work=Path(args.work), builds=builds, budgets=dict(b.split("=", 1) for b in args.budget),
                      cache=args.cache, threads=args.threads, warmup=args.warmup, runs=args.runs, rounds=args.rounds,
                      samples=args.samples, seed=args.seed, quality=not args.no_quality, timing=not args.no_timing,
                      ablate=tuple(args.ablate), wait_idle=args.wait_idle, only=tuple(args.only))
    from .sysinfo import keep_freed_memory

    keep_freed_memory()
    command = "python -m adatsq.tools.bench_ort " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run(cfg, command)
    md = args.md or str(Path(args.out).with_suffix(".md"))
    write_outputs(result, args.out, md)
    print(markdown(result))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
