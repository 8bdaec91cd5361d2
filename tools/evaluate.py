"""The evaluation harness behind ``adatsq eval``: generate, judge, compare.

For a reference model (``flux-fmnist``) it generates ``n`` samples over a balanced set of classes
(sample ``i`` has class ``classes[i % len(classes)]`` and seed ``seed + i``) with the full-precision
model and with every requested variant, from identical noise and class, and reports per variant:

* ``judge_accuracy``: the share of samples the independent judge (``models/judge-fmnist``, a CNN
  trained on the Fashion-MNIST training split) classifies as the class asked for (our GenEval
  analogue), and per class;
* ``fid``: Frechet distance between the judge's penultimate-layer features of the samples and of
  the Fashion-MNIST test split (10k images; precomputed, shipped). Small sample counts bias FID
  upwards: compare FIDs at equal ``n`` only;
* ``psnr_vs_fp`` / ``ssim_vs_fp`` / ``feature_distance_vs_fp``: fidelity to the full-precision
  sample from the same noise and class (PSNR in dB with identical images capped at 100 dB; SSIM on
  the valid 11x11-window region; judge-feature L2 distance relative to the mean FP feature norm);
* ``w_bits`` / ``a_bits``: the variant's average weight bits (weighted by parameters) and
  activation bits (weighted by MACs) over the quantizable layers and steps.

Everything is computed on the CPU, deterministically for a given seed; timings are reported on the
console and in the Markdown, never in the JSON, so the same command gives identical JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from . import fmnist
from ..passes.transforms import StepClock, transformed_layers, transforms_to
from .baselines import MethodCache, method_transforms, parse_variant, reference_analysis, variant_method
from .sysinfo import cpu_name

MAX_SAMPLES = 100_000


def check_device(device: str, who: str) -> torch.device:
    """``device`` as a torch device, or a clear error: cpu or cuda[:N], CUDA only where torch sees it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"{who}: unknown device {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{who}: device {device!r}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{who}: device {device!r} requested but torch sees no CUDA device")
    return dev


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = "flux-fmnist"
    variants: tuple[str, ...] = ("fp",)
    n: int = 512
    classes: tuple[str, ...] | None = None  # None: all classes, balanced
    seed: int = 0
    steps: int | None = None  # None: the model's schedule
    guidance: float | None = None  # None: the model's schedule
    batch: int = 64
    keep_going: bool = False  # a variant that fails with an InputError is recorded, not fatal
    device: str = "cpu"  # where sampling runs (transforms are prepared on the CPU, then moved)

    def validate(self) -> None:
        if not isinstance(self.n, int) or self.n <= 0:
            raise InputError(f"eval: the number of samples must be a positive integer, got {self.n!r}")
        if self.n > MAX_SAMPLES:
            raise InputError(f"eval: {self.n} samples is more than the limit of {MAX_SAMPLES}")
        if self.batch <= 0:
            raise InputError(f"eval: batch must be positive, got {self.batch}")
        if self.steps is not None and self.steps <= 0:
            raise InputError(f"eval: steps must be positive, got {self.steps}")
        check_device(self.device, "eval")
        for v in self.variants:
            kind, d = build_variant(v)
            if kind is not None:
                if not (d / "plan.json").is_file():
                    raise InputError(f"eval: {d} is not a build directory (no plan.json)")
                if kind in ("deployed", "ort") and not (d / "onnx" / "manifest.json").is_file():
                    raise InputError(f"eval: {d} has no lowered ONNX (onnx/manifest.json); build it with "
                                     f"--target onnxruntime")
            elif v not in ("fp", *FP8_ATTENTION_VARIANTS):
                parse_variant(v)
                if variant_method(v) == "peer":
                    from .peers import check_device as check_peer_device

                    check_peer_device(v, self.device)


#: the FP model with FP8 attention (Q, K, V and the probabilities in FP8 E4M3:
#: :func:`~adatsq.passes.quant.fp8_sdpa`): what an FP8 attention kernel would cost in quality
FP8_ATTENTION = "fp8-attention"
#: the FP model with the FP8 attention kernel's own numerics (``backends/attention.py``; on the CPU
#: its torch reference: V scaled per channel, probabilities against the online softmax's running
#: max per 128-key block), where ``fp8-attention`` is the idealised kernel (global row max)
FP8_ATTENTION_KERNEL = "fp8-attention-kernel"
FP8_ATTENTION_VARIANTS = (FP8_ATTENTION, FP8_ATTENTION_KERNEL)

#: variants that sample a build directory: ``plan:DIR`` the search's simulation (per-token
#: activations), ``deployed:DIR`` the PyTorch reference of what the lowered ONNX computes (static
#: per-segment activation scales, FP16 low-rank factors), ``ort:DIR`` the lowered ONNX itself on
#: onnxruntime (CPU), ``torch:DIR`` the PyTorch/CUDA runtime (backends/torch_runtime.py: the low-bit
#: kernels on a GPU, their reference ops on the CPU)
BUILD_VARIANTS = ("plan", "deployed", "ort", "torch")


@contextlib.contextmanager
def _torch_runtime(transformer, plan, weights, clock, device):
    """The plan lowered by the torch runtime (entered after the model moved to ``device``)."""
    from ..backends.torch_runtime import lower_to_torch

    rt = lower_to_torch(transformer, plan, weights, clock, device=device)
    try:
        yield rt
    finally:
        rt.restore()


def build_variant(variant: str) -> tuple[str | None, Path | None]:
    """(kind, build directory) of a build variant, (None, None) for the others."""
    kind, sep, rest = variant.partition(":")
    if sep and kind in BUILD_VARIANTS:
        return kind, Path(rest)
    return None, None


def _schedule(ref, steps: int | None, guidance: float | None):
    from ..frontend.sampling import flow_match_scheduler
    from ..frontend.schedule import default_schedule

    s = ref.schedule
    if steps is not None and steps != s.num_steps:
        s = default_schedule(type(ref.denoiser.transformer).__name__, steps, s.guidance)
    if guidance is not None:
        s = dataclasses.replace(s, guidance=float(guidance))
    flow_match_scheduler(s)  # validates
    return s


def _round(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def evaluate(cfg: EvalConfig, on_progress: Callable[[str, int, int], None] | None = None,
             judged: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
             ) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, float]]:
    """Run the evaluation. Returns (JSON-ready result, uint8 images per variant, seconds per variant).
    ``judged``, if given, receives every variant's judge predictions and features per sample (what
    the metrics were computed from; :func:`~adatsq.tools.paired.save_per_sample` keeps them)."""
    from ..frontend.export import export_model
    from ..frontend.layers import LayerTable
    from ..frontend.reference import load_reference
    from ..frontend.sampling import sample
    from ..passes.plan import PrecisionPlan, Precision, fingerprint_model
    from .judge import Judge
    from .metrics import feature_distance, fid, mean_psnr, ssim

    cfg.validate()
    ref = load_reference(cfg.model)
    class_ids = [ref.class_id(c) for c in (cfg.classes or ref.classes)]
    if not class_ids:
        raise InputError("eval: no classes given")
    schedule = _schedule(ref, cfg.steps, cfg.guidance)
    judge = Judge.load()
    ref_mu, ref_sigma = judge.reference_stats()
    labels = np.array([class_ids[i % len(class_ids)] for i in range(cfg.n)], dtype=np.int64)
    seeds = [cfg.seed + i for i in range(cfg.n)]
    transformer = ref.denoiser.transformer
    table = LayerTable.from_graph(export_model(transformer, _reference_resolution(cfg.model)))
    linear_layers = [i.param for i in table if i.kind == "linear"]

    images: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    rows: dict[str, dict[str, Any]] = {}
    analyses: dict = {}  # Fisher weighting -> (analysis result, calibration set)
    method_cache = MethodCache()  # calibration rows and smoothing searches shared by the variants
    clock = StepClock(schedule.num_steps)  # the step of per-step (timestep-aware) transforms
    plans: dict = {}  # plan variant -> its loaded PrecisionPlan
    device = torch.device(cfg.device)

    def on_device(transforms):
        return transforms if device.type == "cpu" else transforms_to(transforms, device)

    def generate(variant: str, w_bits: int, a_bits: int) -> np.ndarray:
        if variant == "fp":
            ctx = contextlib.nullcontext()
        elif variant == FP8_ATTENTION:
            from ..passes.quant import fp8_attention

            ctx = fp8_attention()
        elif variant == FP8_ATTENTION_KERNEL:
            from ..backends.attention import use_fp8_attention

            ctx = use_fp8_attention()
        elif build_variant(variant)[0] is not None:  # a build directory: plan.json + weights.safetensors
            from ..passes.weights import load_weight_copies, plan_transforms

            kind, d = build_variant(variant)
            plan = plans[variant] = PrecisionPlan.load(d / "plan.json")
            plan.check_model(fingerprint_model(transformer), table, where=str(d / "plan.json"))
            if plan.schedule.num_steps != schedule.num_steps:
                raise InputError(f"eval: {d} plans {plan.schedule.num_steps} steps, the schedule has "
                                 f"{schedule.num_steps}")
            wfile = d / "weights.safetensors"
            weights = load_weight_copies(wfile) if wfile.is_file() else None
            if kind == "ort":
                return _sample_ort(d, labels, seeds, schedule, cfg.batch, variant, on_progress)
            if kind == "torch":
                ctx = _torch_runtime(transformer, plan, weights, clock, device)
            elif kind == "deployed":
                from ..backends.manifest import load_manifest
                from ..backends.onnx_qdq import deployed_layers, deployed_transforms

                scales = load_manifest(d / "onnx").get("calibration", {}).get("scales", {})
                ctx = deployed_layers(transformer, on_device(deployed_transforms(plan, weights, transformer, scales)),
                                      clock)
            else:
                ctx = transformed_layers(transformer, on_device(plan_transforms(plan, weights, transformer)), clock)
        elif variant_method(variant) == "peer":  # a third-party quantizer on a copy of the model
            from ..passes.calibration import reference_calibration
            from .peers import peer_quantized

            ctx = peer_quantized(ref, variant, reference_calibration(ref))
        else:  # methods other than RTN use the analysis passes (cached), computed once per run
            method = variant_method(variant)
            weighting = "latent" if method == "gptq-fisher-latent" else "loss"
            if method != "rtn" and weighting not in analyses:
                analyses[weighting] = reference_analysis(cfg.model, fisher_weighting=weighting)
            ctx = transformed_layers(transformer, on_device(method_transforms(
                transformer, method, w_bits, a_bits, linear_layers, *analyses.get(weighting, (None, None)),
                cache=method_cache)), clock)
        out = []
        ref.denoiser.to(device)  # transforms were made from the CPU weights; sampling runs on the device
        with contextlib.ExitStack() as stack:
            stack.callback(ref.denoiser.to, "cpu")
            stack.enter_context(ctx)
            for start in range(0, cfg.n, cfg.batch):
                sl = slice(start, min(cfg.n, start + cfg.batch))

                def step_cb(k, x, v, _start=start):
                    clock.on_step(k)
                    if on_progress is not None:
                        on_progress(variant, _start * schedule.num_steps + (k + 1) * (sl.stop - sl.start),
                                    cfg.n * schedule.num_steps)

                clock.reset()
                tr = sample(ref.denoiser, torch.from_numpy(labels[sl]), seeds[sl], schedule, record=False,
                            on_step=step_cb)
                out.append(fmnist.from_model_space(tr.sample.numpy()))
        return np.concatenate(out)

    for variant in dict.fromkeys(("fp",) + tuple(cfg.variants)):  # fp first: the fidelity reference
        w_bits, a_bits = ((16, 16) if variant in ("fp", *FP8_ATTENTION_VARIANTS) or build_variant(variant)[0] is not None
                          else parse_variant(variant))
        t0 = time.perf_counter()
        try:
            images[variant] = generate(variant, w_bits, a_bits)
        except InputError as exc:  # e.g. a peer whose package is missing: recorded with keep_going
            if not cfg.keep_going or variant == "fp":
                raise
            rows[variant] = dict(w_bits=float(w_bits), a_bits=float(a_bits), error=str(exc))
            continue
        seconds[variant] = time.perf_counter() - t0
        feats = judge.features(images[variant])
        pred = judge.predict(images[variant])
        if judged is not None:
            judged[variant] = (pred, feats)
        per_class = {ref.classes[c]: float((pred[labels == c] == c).mean()) for c in sorted(set(class_ids))}
        if variant in plans:
            plan_bits = plans[variant].achieved
        else:
            plan_bits = PrecisionPlan.averages([[f"W{w_bits}A{a_bits}"] * len(linear_layers)],
                                               [Precision(f"W{w_bits}A{a_bits}", w_bits, a_bits)], linear_layers,
                                               table)
        row: dict[str, Any] = dict(w_bits=plan_bits.w_bits, a_bits=plan_bits.a_bits,
                                   judge_accuracy=float((pred == labels).mean()), per_class_accuracy=per_class,
                                   fid=float(fid(feats, ref_mu, ref_sigma)))
        if variant == "fp":
            fp_feats = feats
            row.update(psnr_vs_fp=None, ssim_vs_fp=None, feature_distance_vs_fp=None)
        else:
            row.update(psnr_vs_fp=float(mean_psnr(images["fp"], images[variant])),
                       ssim_vs_fp=float(np.mean(ssim(images["fp"], images[variant]))),
                       feature_distance_vs_fp=float(np.mean(feature_distance(fp_feats, feats))))
        rows[variant] = row
    result = dict(
        format="adatsq.eval", version=1, model=cfg.model, model_fingerprint=fingerprint_model(transformer).short,
        samples=cfg.n, seed=cfg.seed, classes=[ref.classes[c] for c in class_ids], batch=cfg.batch,
        schedule=dict(scheduler=schedule.scheduler, num_steps=schedule.num_steps, guidance=schedule.guidance),
        judge=dict(test_accuracy=judge.info.get("test_accuracy"), features=judge.info.get("feature_dim"),
                   fid_reference="Fashion-MNIST test split (10000 images), judge penultimate features"),
        variants=rows,
        environment=dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
                         device=(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")),
    )
    return _round(result), images, seconds


def _reference_resolution(name: str):
    from ..frontend.loading import REFERENCE_RESOLUTIONS

    return REFERENCE_RESOLUTIONS.get(name)


def _sample_ort(build_dir: Path, labels: np.ndarray, seeds: Sequence[int], schedule: Any, batch: int, variant: str,
                on_progress: Callable[[str, int, int], None] | None) -> np.ndarray:
    """Samples of a lowered build run by onnxruntime (CPU), the same labels and seeds as the others."""
    from ..backends.ort_runner import OrtBuild

    ob = OrtBuild(build_dir, device="cpu")
    out = []
    for start in range(0, len(seeds), batch):
        sl = slice(start, min(len(seeds), start + batch))
        x = ob.sample([int(c) for c in labels[sl]], list(seeds[sl]), guidance=schedule.guidance)
        out.append(fmnist.from_model_space(x.numpy()))
        if on_progress is not None:
            on_progress(variant, sl.stop * schedule.num_steps, len(seeds) * schedule.num_steps)
    return np.concatenate(out)


def markdown(result: dict[str, Any], seconds: dict[str, float] | None = None) -> str:
    s = result["schedule"]
    lines = [f"**{result['model']}** ({result['model_fingerprint']}): {result['samples']} samples, "
             f"{len(result['classes'])} classes, seed {result['seed']}, {s['num_steps']} steps, "
             f"guidance {s['guidance']}; judge test accuracy {result['judge']['test_accuracy']}", "",
             "| variant | W bits | A bits | judge acc. | FID (judge feat.) | PSNR vs FP | SSIM vs FP | feat. dist. vs FP |"
             + (" time |" if seconds else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if seconds else "")]
    fmt = lambda v, f: "—" if v is None else format(v, f)
    for name, r in result["variants"].items():
        if "error" in r:
            lines.append(f"| {name} | {r['w_bits']:.2f} | {r['a_bits']:.2f} | did not run: "
                         f"{r['error'].splitlines()[0][:200]} | | | | |" + (" |" if seconds else ""))
            continue
        lines.append(f"| {name} | {r['w_bits']:.2f} | {r['a_bits']:.2f} | {r['judge_accuracy']:.3f} | {r['fid']:.2f} | "
                     f"{fmt(r['psnr_vs_fp'], '.2f')} | {fmt(r['ssim_vs_fp'], '.4f')} | "
                     f"{fmt(r['feature_distance_vs_fp'], '.4f')} |" + (f" {seconds[name]:.0f} s |" if seconds else ""))
    if seconds:
        lines += ["", f"CPU: {result['environment']['cpu']}, {result['environment']['threads']} threads"]
    return "\n".join(lines) + "\n"


def grid_png(images: dict[str, np.ndarray], classes: Sequence[str], labels: Sequence[int], path, columns: int = 20,
             scale: int = 2) -> None:
    """A PNG grid: one row per variant (FP first), the first ``columns`` samples, same seeds per column."""
    from PIL import Image, ImageDraw

    from .io import atomic_path

    names = list(images)
    k = min(columns, len(next(iter(images.values()))))
    cell, pad, label_w, head_h = 28 * scale, 2, 90, 14
    w = label_w + k * (cell + pad)
    h = head_h + len(names) * (cell + pad)
    canvas = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(canvas)
    for j in range(k):
        draw.text((label_w + j * (cell + pad) + 2, 1), classes[labels[j]][:8], fill=0)
    for i, name in enumerate(names):
        y = head_h + i * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill=0)
        for j in range(k):
            tile = Image.fromarray(images[name][j]).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell + pad), y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def save_json(result: dict[str, Any], path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True) + "\n")
