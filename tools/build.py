"""``adatsq build``: model -> export -> analysis -> search -> weight optimisation -> artefacts.

    OUT/plan.json              the precision plan (per step, per layer)
    OUT/weights.safetensors    Fisher-weighted GPTQ copies of every layer at every precision it uses
    OUT/report.json            budget, achieved averages, search statistics, stage timings
    OUT/plan.png, OUT/pareto.png   the plan heatmap and the (bits, error) points the search explored

Every stage shows progress; the analysis is cached (a rerun only searches and writes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    model: str = "flux-fmnist"
    budget: str | None = None  # None: the target's default (DEFAULT_BUDGETS)
    target: str = "onnxruntime"
    beam: int = 4
    search_samples: int = 10
    weights: str = "gptq-fisher"  # the weights the search scores and the build writes
    base: str = "lowrank"  # lowrank: smoothing + 16-bit low-rank branch + groups (SVDQuant-style); plain
    rank: int = 32  # of the low-rank branch (base lowrank)
    group_size: int = 64  # weight groups of the base lowrank (plain: per output channel)
    policy: str = "dynamic"  # dynamic | per-step | per-layer | uniform (ablations)
    pace: float | None = 0.1  # budget pacing slack of the beam search (None: off)
    search_sensitivity: str = "measured"  # candidates from errors measured with the plan's layers, or "analysis"
    sensitivity_samples: int = 4
    fisher_mix: float = 1.0  # Fisher-weighted Hessian tempered towards the uniform one (1: the paper's H')
    anchor: bool = True  # keep the uniform policy at the budget in the beam
    search_score: str = "heldout"  # the samples the search scores on: heldout seeds or calibration samples
    memory_bits: float | None = None  # memory budget: bits of all distinct weight copies per parameter
    max_segments: int | None = None  # at most this many distinct step assignments (deployed segments)
    lattice: str | None = None  # the lattice points the search may use, "W2A4,W3A3,..." (None: the target's)
    groups: str = "block"  # the search's layer groups: block | role (each role within a block) | layer
    # where the search runs (cpu, cuda[:N]): a GPU affords hundreds of search samples; the analysis,
    # the base and the weight copies stay on the CPU
    device: str = "cpu"
    cache_dir: str | None = None
    # a precision plan (plan.json) to build instead of searching one: export, analysis, base and
    # weight copies run as usual; the plan is checked against the model, the target and the budget
    from_plan: str | None = None

    def given_plan(self) -> Any:
        """The plan of ``from_plan`` (None without one); a bad file is a PlanError naming it."""
        if self.from_plan is None:
            return None
        from ..passes.plan import PrecisionPlan

        return PrecisionPlan.load(self.from_plan)

    def resolved(self) -> "BuildOptions":
        """These options with the budget filled in from the target's default and the lattice
        spelled canonically (sorted names; so the caches key on what is searched)."""
        from ..passes.search import TARGETS, target_lattice

        plan = self.given_plan()
        points = self.lattice
        # (an unknown target: target_lattice below raises the clear error)
        budget = self.budget if self.budget is not None else DEFAULT_BUDGETS.get(self.target)
        if plan is not None:  # a given plan brings its lattice and budget (the analysis measures that lattice)
            if points is None:  # the plan's points the target executes (validate names any it uses but cannot)
                runs = {p.name for p in TARGETS.get(self.target, ())}
                points = ",".join(p.name for p in plan.lattice if self.target == "simulate" or p.name in runs)
                points = points or None
            if self.budget is None:
                b = plan.budget or plan.achieved
                budget = f"W{b.w_bits:.10g}A{b.a_bits:.10g}"
        lattice = target_lattice(self.target, points)  # an unknown target or point: the clear error
        return dataclasses.replace(self, budget=budget, lattice=None if points is None else ",".join(p.name for p in lattice))

    def search_options(self) -> Any:
        """The :class:`~adatsq.passes.search.SearchOptions` these build options run the search with."""
        from ..passes.search import SearchOptions

        return SearchOptions(self.target, self.beam, self.search_samples, policy=self.policy, pace=self.pace,
                             sensitivity=self.search_sensitivity, sensitivity_samples=self.sensitivity_samples,
                             anchor=self.anchor, score=self.search_score, memory_bits=self.memory_bits,
                             max_segments=self.max_segments,
                             lattice=None if self.lattice is None else tuple(self.lattice.split(",")))

    def validate(self) -> None:
        from ..passes.search import WEIGHTS, check_budget, parse_budget, target_lattice

        resolved = self.resolved()
        if self.from_plan is not None:  # what the plan runs and averages, before the budget's feasibility
            check_given_plan(self.given_plan(), resolved, self.from_plan)
        check_budget(target_lattice(self.target, resolved.lattice), parse_budget(resolved.budget))
        self.search_options().validate()
        if self.weights not in WEIGHTS:
            raise InputError(f"build: unknown weights {self.weights!r} ({', '.join(WEIGHTS)})")
        from ..passes.analysis import GROUPINGS

        if self.groups not in GROUPINGS:
            raise InputError(f"build: unknown layer grouping {self.groups!r} ({', '.join(GROUPINGS)})")
        if self.base not in BASES:
            raise InputError(f"build: unknown base {self.base!r} ({', '.join(BASES)})")
        from .evaluate import check_device

        check_device(self.device, "build")
        if not 0.0 <= self.fisher_mix <= 1.0:
            raise InputError(f"build: --fisher-mix must lie in [0, 1], got {self.fisher_mix}")
        if self.rank < 0 or self.group_size < 0 or self.sensitivity_samples < 1:
            raise InputError("build: rank and group size must be >= 0, sensitivity samples >= 1")


def check_given_plan(plan: Any, opts: "BuildOptions", where: str) -> None:
    """A given plan (``--from-plan``) must use only precisions the target runs with the same bits, and
    stay within the budget (resolved options: the plan's own budget unless one was given)."""
    from ..passes.search import parse_budget, target_lattice

    lattice = {p.name: p for p in target_lattice(opts.target, opts.lattice)}
    used = sorted({n for row in plan.assignment for n in row})
    of_plan = {p.name: p for p in plan.lattice}
    for n in used:
        if lattice.get(n) != of_plan[n]:
            raise InputError(f"build: {where} runs {n}, which target {opts.target} with lattice "
                             f"{', '.join(lattice)} does not execute")
    budget = parse_budget(opts.budget)
    a = plan.achieved
    if a.w_bits > budget.w_bits + 1e-9 or a.a_bits > budget.a_bits + 1e-9:
        raise InputError(f"build: {where} averages W{a.w_bits:.3f} A{a.a_bits:.3f}, over the budget "
                         f"W{budget.w_bits:g} A{budget.a_bits:g}")


#: the budget a target builds for when none is given: the paper's W4A4 when simulating; for the
#: deployment lattices (W4A16 / W8A8 / 16-bit and the like) a weight budget between the 4- and 8-bit
#: copies and an activation budget that makes some layers take 8-bit (integer) activations
DEFAULT_BUDGETS = {"simulate": "W4A4", "onnxruntime": "W6A12", "tensorrt": "W6A12", "torch-cuda": "W5A8"}

#: deployment targets run 8-bit weights per output channel (TensorRT and onnxruntime's INT8 GEMMs
#: take no blocked INT8 weights); only 4-bit and narrower copies use the base's groups there
def group_max_bits(target: str) -> int:
    return 8 if target == "simulate" else 4


#: how each precision's weights are built: ``lowrank`` AdaTSQ on an SVDQuant-style base (per layer
#: a searched smoothing and a 16-bit rank-r branch shared by all its precisions; GPTQ on the
#: residual in groups); ``plain`` GPTQ of the weight itself, per output channel
BASES = ("lowrank", "plain")


def build(out: str | Path, opts: BuildOptions, log: Callable[[str], None] = print,
          progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    from ..frontend.export import export_model
    from ..frontend.loading import REFERENCE_RESOLUTIONS
    from ..frontend.reference import load_reference
    from ..passes.analysis import AnalysisOptions, analyze
    from ..passes.cache import default_cache_root
    from ..passes.calibration import reference_calibration
    from ..passes.cache import options_key
    from ..passes.search import layer_transform_factory, parse_budget, search_plan, target_lattice
    from ..passes.plan import fingerprint_graph
    from ..passes.quant import nvfp4_block
    from ..passes.weights import GPTQWeights, prepare_layers
    from .io import atomic_write_text

    opts.validate()  # bad options and an infeasible budget fail before any work
    opts = opts.resolved()
    budget = parse_budget(opts.budget)
    lattice = target_lattice(opts.target, opts.lattice)
    if opts.model not in REFERENCE_RESOLUTIONS:
        raise InputError(f"build: {opts.model!r} is not a reference model with a calibration set "
                         f"({', '.join(REFERENCE_RESOLUTIONS)})")
    out = Path(out)
    prog = progress or (lambda stage, done, total: None)
    timings: dict[str, float] = {}
    from_cache: dict[str, bool] = {}
    given = opts.given_plan()
    if given is not None:
        for line in given_plan_differences(opts):
            log(line)
    t = time.perf_counter()
    ref = load_reference(opts.model)
    graph = export_model(opts.model)
    timings["export"] = time.perf_counter() - t
    calib = reference_calibration(ref)
    if given is not None:  # for this model and its sampler, before the analysis
        from ..frontend.layers import LayerTable

        given.check_model(fingerprint_graph(graph), LayerTable.from_graph(graph), where=str(opts.from_plan))
        if given.schedule != calib.schedule:
            raise InputError(f"build: {opts.from_plan} was made for another sampler schedule "
                             f"({given.schedule.num_steps} steps; {opts.model} samples {calib.schedule.num_steps})")
    cache_root = Path(opts.cache_dir) if opts.cache_dir else default_cache_root()
    quantized = tuple(p.name for p in lattice if p.w_bits < 16 or p.a_bits < 16)
    aopts = AnalysisOptions(hessian="weighted", precisions=quantized, sensitivity_samples=opts.sensitivity_samples,
                            e2e_steps=0, groups=opts.groups)
    t = time.perf_counter()
    # a given plan needs no sensitivity (nothing is searched): the trajectory, Fisher and Hessians only
    res = analyze(graph, calib, aopts, cache_dir=cache_root, log=log,
                  progress=lambda stage, done, total: prog(f"analysis: {stage}", done, total),
                  **({} if given is None else dict(passes=("trajectory", "fisher", "stats"))))
    timings["analysis"] = time.perf_counter() - t
    # the build's own stages are cached beside the analysis, keyed by everything they depend on
    key = {k: v for k, v in dataclasses.asdict(opts).items()
           if k not in ("cache_dir", "from_plan") and (k, v) != ("device", "cpu")}
    if given is not None:  # keyed by the plan's content, not its path; search options do not apply
        key = {k: v for k, v in key.items() if k not in SEARCH_ONLY_OPTIONS}
        key["from_plan"] = hashlib.sha256(json.dumps(given.to_json(), sort_keys=True).encode()).hexdigest()
    stage_cache = BuildCache(cache_root / f"{fingerprint_graph(graph).short}-{calib.key()}" / "builds" /
                             options_key(dict(build=BUILD_CACHE_VERSION, analysis=dataclasses.asdict(aopts), **key)))
    prep, group = None, None
    if opts.base == "lowrank":
        t = time.perf_counter()
        prep = stage_cache.load_prep()
        from_cache["base"] = prep is not None
        if prep is None:
            # smoothing searched at the budget's precision (rounded), shared by every precision of a layer
            # (clamped to 2..8: a budget like W6A12 searches its smoothing for 8-bit activations)
            ref_bits = tuple(min(8, max(2, round(b))) for b in (budget.w_bits, budget.a_bits))
            prep = prepare_layers(calib, res.results["trajectory"], linear_layers(graph, ref.denoiser.transformer),
                                  *ref_bits, rank=opts.rank,
                                  progress=lambda stage, done, total: prog(f"base: {stage}", done, total))
            stage_cache.save_prep(prep)
        else:
            log("base: smoothing and low-rank branches from the cache")
        group = opts.group_size or None
        timings["base"] = time.perf_counter() - t
    t = time.perf_counter()
    make = layer_transform_factory(ref.denoiser.transformer, graph, opts.weights, prep=prep, group_size=group,
                                   fisher_mix=opts.fisher_mix, group_max_bits=group_max_bits(opts.target))
    cached = stage_cache.load_search(graph) if given is None else None
    from_cache["search"] = cached is not None
    if given is not None:
        from ..frontend.layers import LayerTable
        from ..passes.analysis import layer_groups
        from ..passes.search import SearchResult

        plan = given
        groups = {g: list(ls) for g, ls in layer_groups(LayerTable.from_graph(graph), opts.groups).items()}
        annotate_plan(graph, plan, groups)
        sres = SearchResult(tuple(), None, plan.achieved, [], [], 0)
        log(f"search: skipped, the plan of {opts.from_plan}")
    elif cached is None:
        plan, sres, groups = search_plan(graph, calib, res.results["trajectory"], budget, opts.search_options(),
                                         make, progress=lambda done, total: prog("search", done, total),
                                         sensitivity_progress=lambda d, t: prog("search: sensitivity", d, t),
                                         device=opts.device)
        stage_cache.save_search(plan, sres, groups)
    else:
        plan, sres, groups = cached
        log("search: plan from the cache")
    timings["search"] = time.perf_counter() - t
    t = time.perf_counter()
    by_name = {p.name: p for p in plan.lattice}
    requests: dict[str, list] = {}
    params = dict(ref.denoiser.transformer.named_parameters())
    for i, p in enumerate(plan.layers):
        kinds = {(by_name[row[i]].w_bits, by_name[row[i]].fmt) for row in plan.assignment}
        g = group if group and params[p].shape[1] % group == 0 else None
        requests[p] = [(b, g if b <= group_max_bits(opts.target) else None) if f == "int"
                       else (b, nvfp4_block(params[p].reshape(params[p].shape[0], -1).shape[1]), f)
                       for b, f in sorted(kinds) if b < 16]
    requests = {p: v for p, v in requests.items() if v}
    hess = "none" if opts.weights == "rtn" else ("uniform" if opts.weights == "gptq" else "fisher")
    # the copies the search scored are written as they are (same Hessian, same residual)
    from_cache["weights"] = stage_cache.copy_weights(out / "weights.safetensors")
    if not from_cache["weights"]:
        wpass = GPTQWeights(ref.denoiser.transformer, requests, out / "weights.safetensors", hessian=hess,
                            progress=lambda stage, done, total: prog("weights", done, total), prep=prep,
                            precomputed=make.copies, fisher_mix=opts.fisher_mix)
        wpass(graph)
        stage_cache.keep_weights(out / "weights.safetensors")
    else:
        log("weights: copies from the cache")
    timings["weights"] = time.perf_counter() - t
    plan.save(out / "plan.json")
    plot_plan(plan, groups, out / "plan.png")
    if given is None:
        plot_pareto(sres, out / "pareto.png")
    else:  # nothing was explored: no front to plot (an earlier build's would not belong to these weights)
        (out / "pareto.png").unlink(missing_ok=True)
    report = dict(format="adatsq.build-report", version=1, options=dataclasses.asdict(opts), policy=plan_policy(plan),
                  budget=dataclasses.asdict(budget), achieved=dataclasses.asdict(plan.achieved),
                  search=dict(final_error=sres.error, evaluations=sres.evaluations, front=sres.front,
                              groups={n: ls for n, ls in groups.items()},
                              **({} if given is None else dict(from_plan=str(opts.from_plan)))),
                  weight_copies=sum(len(v) for v in requests.values()),
                  # what the search constrains: the average bits (always), the copies' bits per
                  # parameter (with --memory-bits); the memory view below is what the plan needs
                  constraints=dict(average_bits=dataclasses.asdict(budget), memory_bits=opts.memory_bits,
                                   plan_memory_bits=round(plan_copy_bits(plan, params), 4),
                                   max_segments=opts.max_segments,
                                   plan_segments=len(set(plan.assignment))),
                  memory=plan_memory(plan, params, requests, prep),
                  weights_bytes=(out / "weights.safetensors").stat().st_size,
                  seconds={k: round(v, 2) for k, v in timings.items()},
                  from_cache=from_cache,  # stages taken from the build cache (the analysis has its own)
                  analysis_computed=dict(res.computed))
    # --- ONNX Q/DQ lowering (backends/onnx_qdq.py): OUT/onnx for the deployment targets ---------
    if opts.target in ("onnxruntime", "tensorrt"):
        from ..backends.onnx_qdq import lower_build

        t = time.perf_counter()
        manifest = lower_build(out, model=opts.model, target=opts.target, log=log,
                               progress=lambda stage, done, total: prog(f"onnx: {stage}", done, total))
        report["seconds"]["onnx"] = round(time.perf_counter() - t, 2)
        report["onnx"] = dict(segments=len(manifest["segments"]), sizes=manifest["sizes"], notes=manifest["notes"])
    # ---------------------------------------------------------------------------------------------
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    if opts.target == "tensorrt":
        # one engine per segment; without TensorRT this stops with a clear error after the ONNX, the
        # report and BUILD/tensorrt/trtexec.sh are written (no engine is pretended)
        from ..backends.tensorrt import build_engines

        t = time.perf_counter()
        report["tensorrt"] = build_engines(out, log=log)
        report["seconds"]["tensorrt"] = round(time.perf_counter() - t, 2)
        atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    return report


#: options that only steer the search (not used when a plan is given)
SEARCH_ONLY_OPTIONS = ("beam", "search_samples", "policy", "pace", "search_sensitivity", "anchor", "search_score",
                       "memory_bits", "max_segments", "device")

#: bump when what a cached build stage holds changes
BUILD_CACHE_VERSION = 4  # 3: memory-aware search (copy selection, completions), segment budget; 4: fixed chunk layout


class BuildCache:
    """The build's stage outputs (base smoothing/low-rank, search result, weight copies) in one
    folder per build key; ``None`` folder: nothing cached. Files are written atomically; a file
    that cannot be read is recomputed, never trusted."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def _file(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / name

    def load_prep(self):
        from ..passes.weights import LayerPrep

        f = self._file("prep.safetensors")
        if f is None or not f.is_file():
            return None
        try:
            from safetensors.torch import load_file

            t = load_file(str(f))
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            return None
        params = sorted({k.rsplit(".", 1)[0] for k in t if k.endswith(".smooth")})
        return {p: LayerPrep(t[f"{p}.smooth"], (t[f"{p}.low_rank_a"], t[f"{p}.low_rank_b"])
                             if f"{p}.low_rank_a" in t else None) for p in params}

    def save_prep(self, prep) -> None:
        f = self._file("prep.safetensors")
        if f is None:
            return
        from safetensors.torch import save_file

        from .io import atomic_write

        tensors = {}
        for p, v in prep.items():
            tensors[f"{p}.smooth"] = v.smooth.contiguous()
            if v.low_rank is not None:
                tensors[f"{p}.low_rank_a"], tensors[f"{p}.low_rank_b"] = (t.contiguous() for t in v.low_rank)
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(f, lambda tmp: save_file(tensors, str(tmp)))

    def load_search(self, graph):
        from ..passes.plan import PrecisionPlan
        from ..passes.search import SearchResult

        f = self._file("search.json")
        pf = self._file("plan.json")
        if f is None or not f.is_file() or not pf.is_file():
            return None
        try:
            plan = PrecisionPlan.load(pf)
            d = json.loads(f.read_text())
            from ..passes.plan import Budget

            sres = SearchResult(tuple(tuple(a) for a in d["policy"]), d["error"], Budget(**d["achieved"]),
                                [tuple(e) for e in d["explored"]], [tuple(e) for e in d["front"]], d["evaluations"])
            groups = {k: list(v) for k, v in d["groups"].items()}
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            return None
        annotate_plan(graph, plan, groups)
        return plan, sres, groups

    def save_search(self, plan, sres, groups) -> None:
        f = self._file("search.json")
        if f is None:
            return
        from .io import atomic_write_text

        f.parent.mkdir(parents=True, exist_ok=True)
        plan.save(self._file("plan.json"))
        atomic_write_text(f, json.dumps(dict(policy=sres.policy, error=sres.error,
                                             achieved=dataclasses.asdict(sres.achieved), explored=sres.explored,
                                             front=sres.front, evaluations=sres.evaluations, groups=groups)))

    def copy_weights(self, dest: Path) -> bool:
        import shutil

        from .io import atomic_path

        f = self._file("weights.safetensors")
        if f is None or not f.is_file():
            return False
        try:
            from ..passes.weights import load_weight_copies

            load_weight_copies(f)  # readable, with its index
        except Exception:  # noqa: BLE001
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(f, tmp)
        return True

    def keep_weights(self, src: Path) -> None:
        import shutil

        from .io import atomic_path

        f = self._file("weights.safetensors")
        if f is None:
            return
        f.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(f) as tmp:
            shutil.copyfile(src, tmp)


#: the options a build's weight copies depend on besides the plan (the budget: the base's smoothing
#: is searched at its rounded bits)
WEIGHT_OPTIONS = ("model", "target", "budget", "weights", "base", "rank", "group_size", "fisher_mix")


def given_plan_differences(opts: BuildOptions) -> list[str]:
    """Notes on the options of the build that wrote a given plan (its report.json beside it, when
    there is one) that differ from these: the weight copies will differ from that build's."""
    report = Path(opts.from_plan).parent / "report.json"
    try:
        then = json.loads(report.read_text())["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    now = dataclasses.asdict(opts)
    diff = [f"{k} {then[k]!r} (now {now[k]!r})" for k in WEIGHT_OPTIONS if k in then and then[k] != now[k]]
    return [f"note: {report} was built with " + ", ".join(diff) + "; the weight copies will differ from its"] if diff else []


def annotate_plan(graph, plan, groups: dict[str, list[str]]) -> None:
    """Write the ``adatsq.precision`` annotations the search pass would have written for ``plan``
    (a cached or a given plan)."""
    from ..passes.analysis import layer_nodes
    from ..passes.annotations import annotate
    from ..passes.search import LayerPrecision

    group_of = {p: n for n, ls in groups.items() for p in ls}
    for p, nodes in layer_nodes(graph).items():
        value = LayerPrecision(p, group_of.get(p, p), tuple(plan.precision(t, p).name
                                                           for t in range(len(plan.assignment))))
        for node in nodes:
            annotate(node, value)


def plan_copy_bits(plan, params: dict) -> float:
    """Bits of the distinct weight copies the plan's steps run (16-bit counted as 16), averaged over
    the plan's parameters: the quantity ``--memory-bits`` bounds."""
    by_name = {p.name: p for p in plan.lattice}
    tot = n = 0
    for i, name in enumerate(plan.layers):
        size = params[name].numel()
        tot += size * sum(by_name[q].w_cost for q in {row[i] for row in plan.assignment})
        n += size
    return tot / max(n, 1)


def plan_memory(plan, params: dict, requests: dict, prep) -> dict[str, Any]:
    """The memory view of a plan: bytes of every distinct weight copy it needs when deployed (a
    layer that switches precision across steps keeps each copy; INT codes packed, one 16-bit scale
    per group or channel), of the layers it keeps in 16-bit, and of the 16-bit low-rank branches and
    smoothing vectors; against the 16-bit model. Not a constraint of the search (the budget is)."""
    by_name = {p.name: p for p in plan.lattice}
    copies = fp16 = extra = 0
    model16 = 0
    for i, p in enumerate(plan.layers):
        w = params[p]
        o, k = w.shape[0], w.numel() // w.shape[0]
        model16 += 2 * w.numel()
        used = {by_name[row[i]] for row in plan.assignment}
        if any(u.w_bits >= 16 for u in used):
            fp16 += 2 * w.numel()
        for bits, group, *fmt in requests.get(p, []):  # NVFP4: one FP8 scale per block, else 16-bit
            copies += (w.numel() * bits + 7) // 8 + (1 if fmt == ["nvfp4"] else 2) * o * (k // group if group else 1)
        pr = (prep or {}).get(p)
        if pr is not None and p in requests:
            extra += 2 * k + (2 * pr.low_rank[0].shape[1] * (o + k) if pr.low_rank is not None else 0)
    total = copies + fp16 + extra
    return dict(quantized_copies_bytes=copies, fp16_layers_bytes=fp16, low_rank_and_smoothing_bytes=extra,
                total_bytes=total, fp16_model_bytes=model16, ratio_to_fp16=round(total / max(model16, 1), 4))


def linear_layers(graph, transformer) -> list[str]:
    """The graph's layers with a 2-D weight (the ones a smoothing and low-rank branch apply to)."""
    from ..passes.analysis import layer_nodes

    params = dict(transformer.named_parameters())
    return [p for p in layer_nodes(graph) if p in params and params[p].ndim == 2]


def plan_policy(plan) -> dict[str, Any]:
    """How a plan uses time and layers: distinct assignments over steps, precisions used, per-step
    weight/activation averages are in the plan itself."""
    from collections import Counter

    cells = Counter(name for row in plan.assignment for name in row)
    total = sum(cells.values())
    return dict(distinct_step_assignments=len(set(plan.assignment)),
                precision_share={k: round(v / total, 4) for k, v in sorted(cells.items())})


def plot_plan(plan, groups: dict[str, list[str]], path: Path) -> None:
    """Heatmap: layer groups x steps, coloured by precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    from .plots import save_png

    names = [p.name for p in plan.lattice]
    rows = []
    for g, layers in groups.items():
        i = plan.layers.index(layers[0])
        rows.append([names.index(r[i]) for r in plan.assignment])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(plan.assignment) + 3), 0.35 * len(rows) + 1.8))
    cmap = ListedColormap(plt.cm.viridis(np.linspace(0, 1, len(names))))
    im = ax.imshow(np.array(rows), aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5)
    ax.set_yticks(range(len(rows)), list(groups))
    ax.set_xlabel("denoising step (sampling order)")
    cb = fig.colorbar(im, ticks=range(len(names)))
    cb.ax.set_yticklabels(names)
    ax.set_title(f"precision plan: W{plan.achieved.w_bits:.2f} A{plan.achieved.a_bits:.2f} average")
    fig.tight_layout()
    save_png(fig, path)


def plot_pareto(sres, path: Path) -> None:
    """Every (bits so far, error) point the search explored, coloured by step; the entries it kept
    ringed; the final Pareto front in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_png

    fig, ax = plt.subplots(figsize=(7, 4.4))
    steps = [k for k, *_ in sres.explored]
    sc = ax.scatter([b for _, b, _, _ in sres.explored], [e for *_, e, _ in sres.explored], c=steps, cmap="viridis",
                    s=10, alpha=0.6, label="explored")
    kept = [(b, e) for _, b, e, kp in sres.explored if kp]
    if kept:
        ax.scatter(*zip(*kept), s=22, facecolors="none", edgecolors="k", linewidths=0.6, label="kept in the beam")
    if sres.front:
        ax.plot(*zip(*sres.front), "r.-", label="final Pareto front")
    fig.colorbar(sc, label="denoising step")
    ax.set_xlabel("bits spent so far (W + A averages relative to the budget; 2 = on budget)")
    ax.set_ylabel("latent MSE vs FP after the step")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
