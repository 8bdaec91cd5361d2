"""The embedded runtime: the denoising loop of a lowered build on onnxruntime.

:class:`OrtBuild` opens ``BUILD/onnx`` (manifest, segments, shared external data), checks every
file against the manifest (size and sha256) and the manifest against ``BUILD/plan.json``, and
makes one InferenceSession per segment (CPU; CUDA first where onnxruntime has it). Sampling reuses
:func:`adatsq.frontend.sampling.sample` unchanged: :class:`OrtTransformer` stands in for the
diffusers transformer inside the reference denoiser (``FluxFMNIST``: conditioner, packing, CFG)
and runs the segment of the current step (a :class:`~adatsq.passes.transforms.StepClock` that the
sampler advances). Same seeds in, same image out.

Session settings (:func:`session_options`), pinned so that the numerics stay those of the graph:

* ``session.qdq_matmulnbits_accuracy_level = 1``: onnxruntime fuses DQ(INT4, blocked)+MatMul into
  MatMulNBits, whose default accuracy level 4 quantizes the activations to INT8 on the fly; level 1
  computes in FP32;
* graph optimisation level EXTENDED, not ALL: at ALL the layout pass (NchwcTransformer) together
  with QDQS8ToU8Transformer changed INT8 segments' outputs by ~2e-3 relative on our tiny models
  (disabling either pass restores ~1e-7); EXTENDED keeps the INT8 (MatMulIntegerToFloat) and INT4
  (MatMulNBits) kernels and the float fusions.
* on x86 CPUs without VNNI (AVX2 only), ``QDQS8ToU8Transformer`` is disabled
  (:func:`disabled_optimizers`): it turns the symmetric INT8 activations into UINT8 so that the
  QDQ selector can fuse the layer into MatMulIntegerToFloat, whose u8 x s8 AVX2 kernel
  (``vpmaddubsw``) adds pairs of products into *saturating* int16 lanes; with full-range INT8
  weights that overflows (measured on an AVX2-only AMD EPYC: 9.9e-2 mean relative error on the
  tiny Flux model's W8A8 segment, against 1e-6 with the pass off). VNNI (``vpdpbusd``, AVX-512
  VNNI, AVX-VNNI, AMX) accumulates in int32 and is exact, so there the fusion stays. Without it
  the INT8 layers run as DQ + float GEMM: correct, not faster. ``ADATSQ_ORT_INT8_FUSION=on|off``
  overrides the detection.

What onnxruntime fuses is reported by :func:`fused_ops`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .manifest import MANIFEST, ONNX_DIR, BuildDirError, load_manifest, verify_files, verify_plan
from .onnx_qdq import ORT_SESSION_CONFIG


#: x86 CPU flags whose integer dot products accumulate in int32 (no int16 saturation)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_fusion_exact() -> bool:
    """Whether onnxruntime's fused u8 x s8 INT8 GEMM computes exact int32 sums on this CPU: ARM
    (sdot/udot), or x86 with VNNI/AMX. ``ADATSQ_ORT_INT8_FUSION=on|off`` overrides."""
    import os
    import platform

    env = os.environ.get("ADATSQ_ORT_INT8_FUSION", "auto").lower()
    if env in ("on", "off"):
        return env == "on"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool(cpu_flags() & set(VNNI_FLAGS))


def disabled_optimizers() -> list[str]:
    """onnxruntime graph transformers the runner turns off on this machine (module docstring)."""
    return [] if int8_fusion_exact() else ["QDQS8ToU8Transformer"]


def make_session(path, so, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An InferenceSession with the runner's settings: ``so`` from :func:`session_options`, and
    :func:`disabled_optimizers`."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), so, providers=list(providers), disabled_optimizers=disabled_optimizers())


def session_options(threads: int | None = None, optimized_model: str | Path | None = None, level: str = "extended",
                    pinned: bool = True):
    """The runner's pinned session settings (see the module docstring and docs/backends.md);
    ``pinned=False``: onnxruntime's defaults at ``level`` (threads and output path only)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    for k, v in (ORT_SESSION_CONFIG.items() if pinned else ()):
        so.add_session_config_entry(k, v)
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if optimized_model is not None:
        so.optimized_model_filepath = str(optimized_model)
    so.log_severity_level = 3
    return so


def providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in avail:
            raise InputError("run: onnxruntime has no CUDA execution provider here (onnxruntime-gpu not installed)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise InputError(f"run: unknown device {device!r} (auto, cpu, cuda)")
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]


def _session(path: Path, so, provs):
    try:
        return make_session(path, so, provs)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        raise BuildDirError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300]})") from None


class OrtBuild:
    """A verified lowered build: the manifest, the plan, one session per segment."""

    def __init__(self, build_dir: str | Path, device: str = "auto", threads: int | None = None,
                 check_sha: bool = True):
        self.build_dir = Path(build_dir)
        if not self.build_dir.is_dir():
            raise BuildDirError(f"{self.build_dir}: no such build directory")
        self.onnx_dir = self.build_dir / ONNX_DIR
        self.manifest = load_manifest(self.onnx_dir)
        verify_files(self.onnx_dir, self.manifest, check_sha=check_sha)
        self.plan = verify_plan(self.build_dir, self.manifest)
        so = session_options(threads)
        provs = providers(device)
        self.sessions = {s["name"]: _session(self.onnx_dir / s["file"], so, provs) for s in self.manifest["segments"]}
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        for name, sess in self.sessions.items():
            got = [i.name for i in sess.get_inputs()]
            if got != self.input_names:
                raise BuildDirError(f"{self.onnx_dir / name}.onnx: inputs {got} differ from the manifest's "
                                    f"{self.input_names}")
        self.step_seconds: list[tuple[int, float]] = []

    def segment(self, step: int) -> str:
        steps = self.manifest["steps"]
        if not 0 <= step < len(steps):
            raise InputError(f"run: step {step} outside the plan's {len(steps)} steps")
        return steps[step]

    def run(self, step: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One model call at ``step`` (the segment that step runs)."""
        sess = self.sessions[self.segment(step)]
        t0 = time.perf_counter()
        out = sess.run(None, {k: feeds[k] for k in self.input_names})[0]
        self.step_seconds.append((step, time.perf_counter() - t0))
        return out

    # ------------------------------------------------------------------ the sampling pipeline
    def pipeline(self) -> dict[str, Any]:
        p = self.manifest.get("pipeline")
        if not p or p.get("kind") != "flux-fmnist":
            raise BuildDirError(f"{self.onnx_dir / MANIFEST}: no sampling pipeline this runner knows "
                                f"(got {None if not p else p.get('kind')!r}; flux-fmnist is supported)")
        return p

    def denoiser(self):
        """The reference denoiser (conditioner, packing) with this build's segments as its transformer."""
        from ..passes.transforms import StepClock

        self.clock = StepClock(len(self.manifest["steps"]))
        return build_denoiser(self.onnx_dir / self.pipeline()["conditioner"], OrtTransformer(self, self.clock))

    def sample(self, class_ids: Sequence[int], seeds: Sequence[int], guidance: float | None = None):
        """Final samples ``[N, 1, 32, 32]`` (model space) for ``class_ids`` x ``seeds`` (paired)."""
        from ..frontend.sampling import sample

        classes = self.pipeline()["classes"]
        for c in class_ids:
            if not 0 <= int(c) < len(classes):
                raise InputError(f"run: class id {c} out of range 0..{len(classes) - 1}")
        den = self.denoiser()
        self.clock.reset()
        tr = sample(den, torch.tensor([int(c) for c in class_ids]), list(seeds), self.plan.schedule, guidance,
                    record=False, on_step=self.clock.on_step)
        return tr.sample


def build_denoiser(conditioner_path: Path, transformer: nn.Module):
    """``FluxFMNIST`` around ``transformer`` with the class tables of ``conditioner_path``."""
    from safetensors.torch import load_file

    from ..frontend.reference import ClassConditioner, FluxFMNIST

    try:
        state = load_file(str(conditioner_path))
        tokens, pooled = state["tokens"], state["pooled"]
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise BuildDirError(f"{conditioner_path}: not a readable conditioner ({type(exc).__name__})") from None
    cond = ClassConditioner(tokens.shape[0] - 1, tokens.shape[1], tokens.shape[2], pooled.shape[1])
    cond.load_state_dict({"tokens": tokens.float(), "pooled": pooled.float()})
    return FluxFMNIST(transformer, cond).eval()


class OrtTransformer(nn.Module):
    """Duck-types the diffusers transformer call ``transformer(**inputs, return_dict=False)[0]``."""

    def __init__(self, build: OrtBuild, clock):
        super().__init__()
        self.build = build
        self.clock = clock
        # FluxFMNIST reads the device/dtype of its transformer through its buffers only
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def forward(self, return_dict: bool = False, **inputs):
        feeds = {}
        for name in self.build.input_names:
            if name not in inputs:
                raise InputError(f"run: the model needs input {name!r}, the pipeline gave {sorted(inputs)}")
            feeds[name] = inputs[name].detach().float().contiguous().numpy()
        out = self.build.run(self.clock.step, feeds)
        return (torch.from_numpy(out),)


def save_image(sample: torch.Tensor, path: str | Path, scale: int = 4) -> None:
    """Write model-space samples ``[N, 1, 32, 32]`` as one PNG row (28x28 crops, ``scale``x)."""
    from PIL import Image

    from ..tools.fmnist import from_model_space
    from ..tools.io import atomic_path

    imgs = from_model_space(sample.numpy())
    row = np.concatenate(list(imgs), axis=1)
    img = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def fused_ops(segment: str | Path, out: str | Path, threads: int | None = 1) -> dict[str, int]:
    """Op-type counts of the graph onnxruntime (CPU EP) actually runs for ``segment``, with the
    runner's settings (the optimised model is written to ``out``)."""
    import onnx

    _session(Path(segment), session_options(threads, optimized_model=out), ["CPUExecutionProvider"])
    from collections import Counter

    m = onnx.load(str(out), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in m.graph.node).items()))
