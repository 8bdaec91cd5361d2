"""The ``adatsq`` command line.

    adatsq inspect MODEL [--json FILE] [--layers]     layer table of a builtin, a folder or an .onnx file
    adatsq export  MODEL -o OUT.onnx [--json FILE]    torch.export -> ONNX (opset 21) with annotations
    adatsq plan    MODEL -o PLAN.json [--precision P] a uniform precision plan (search: later release)
    adatsq eval    [MODEL] [--variant V] [-n N]       generate, judge, compare (flux-fmnist)
    adatsq analyze [MODEL] -o DIR                     trajectory, Fisher, statistics/Hessians, sensitivity
    adatsq quantize [MODEL] -o W.safetensors --bits 4 GPTQ weight copies (Fisher-weighted Hessian), streamed
    adatsq build   [MODEL] -o DIR --budget W4A4       analysis -> search -> GPTQ: plan, weights, report, plots
    adatsq inspect MODEL --analysis DIR               show an analysis: tables and heatmaps
    adatsq models                                     the builtin models
    adatsq run     BUILD --class 3 --seed 0 --out IMG  sample a lowered build on onnxruntime

Errors caused by the input are printed on one line and exit with code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.table import Table

from ..errors import AdatsqError

# piped output (logs, CI) gets a wide console so that parameter names are not cut
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False)


def _add_resolution_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling resolution (latent units; defaults: the architecture's own)")
    g.add_argument("--height", type=int, help="latent height")
    g.add_argument("--width", type=int, help="latent width")
    g.add_argument("--text-len", type=int, help="number of text tokens")
    g.add_argument("--frames", type=int, help="latent frames (video models)")
    g.add_argument("--batch", type=int, help="example batch size used for export")
    p.add_argument("--static", action="store_true", help="export with static shapes (no dynamic batch/tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for builtin weights and example inputs")


def _resolution(args, adapter):
    import dataclasses

    from ..frontend.loading import default_resolution

    base = default_resolution(args.model, adapter)
    over = {k: getattr(args, k) for k in ("height", "width", "text_len", "frames", "batch")
            if getattr(args, k, None) is not None}
    return dataclasses.replace(base, **over) if over else base


def _export(args):
    from ..frontend.export import export_model
    from ..frontend.loading import resolve_model

    with console.status(f"loading {args.model}…"):
        model, adapter = resolve_model(args.model, seed=args.seed)
    res = _resolution(args, adapter)
    t0 = time.perf_counter()
    with console.status(f"torch.export of {adapter.arch} at {res.height}x{res.width} latent, "
                        f"{res.text_len} text tokens…"):
        graph = export_model(model, res, dynamic=not args.static, seed=args.seed)
    console.print(f"[green]exported[/] {adapter.arch} in {time.perf_counter() - t0:.1f}s "
                  f"({sum(1 for n in graph.graph.nodes if n.op == 'call_function')} ops, "
                  f"{'dynamic' if graph.dynamic else 'static'} shapes)")
    return graph


def _table_and_fingerprint(args):
    """(layer table, model fingerprint or None) of a builtin, a folder or an .onnx file."""
    from ..frontend.layers import LayerTable
    from ..passes.plan import ModelFingerprint, fingerprint_graph

    if str(args.model).endswith(".onnx"):
        from ..frontend.onnx_io import load_onnx, layer_table_from_onnx, model_metadata

        with console.status(f"reading {args.model}…"):
            model = load_onnx(args.model, load_weights=False)
            fp = model_metadata(model).get("fingerprint")
            return layer_table_from_onnx(model), (ModelFingerprint(**fp) if fp else None)
    graph = _export(args)
    return LayerTable.from_graph(graph), fingerprint_graph(graph)


def _fmt_int(n) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def print_table(table, show_layers: bool = False) -> None:
    res = table.resolution or {}
    total_p = sum(i.params for i in table)
    known = [i.macs for i in table if i.macs is not None]
    console.print(f"[bold]{table.arch}[/] ({table.source}): {len(table)} quantizable layers, "
                  f"{_fmt_int(total_p)} parameters"
                  + (f", {_fmt_int(sum(known))} MACs per sample per step" if len(known) == len(table) else "")
                  + (f" at {res.get('height')}x{res.get('width')} latent, {res.get('text_len')} text tokens"
                     + (f", {res.get('frames')} frames" if res.get("frames", 1) > 1 else "") if res else ""))
    t = Table(title="per role", show_lines=False)
    for col, just in (("role", "left"), ("layers", "right"), ("params", "right"), ("param share", "right"),
                      ("MACs/step", "right"), ("MAC share", "right")):
        t.add_column(col, justify=just)
    for r in table.totals():
        t.add_row(r["role"], str(r["layers"]), _fmt_int(r["params"]), f"{100 * r['param_share']:.1f}%",
                  _fmt_int(r["macs"]), "?" if r["mac_share"] is None else f"{100 * r['mac_share']:.1f}%")
    console.print(t)
    if show_layers:
        lt = Table(title="layers")
        lt.add_column("param", overflow="fold")
        for col in ("role", "block", "shape", "MACs/token", "tokens", "calls"):
            lt.add_column(col)
        for i in table:
            lt.add_row(i.param, i.role, "-" if i.block_index is None else str(i.block_index),
                       "x".join(map(str, i.shape)), _fmt_int(i.macs_per_token), _fmt_int(i.tokens), str(i.calls))
        console.print(lt)


def print_plan(plan) -> None:
    from collections import Counter

    s = plan.schedule
    console.print(f"[bold]plan[/] v{plan.version} for {plan.model.arch} {plan.model.short}: {s.num_steps} steps "
                  f"({s.scheduler}, guidance {s.guidance}), {len(plan.layers)} layers; achieved "
                  f"W{plan.achieved.w_bits:.2f} A{plan.achieved.a_bits:.2f}"
                  + (f" (budget W{plan.budget.w_bits:.2f} A{plan.budget.a_bits:.2f})" if plan.budget else ""))
    t = Table(title="layers per precision, by step")
    t.add_column("step")
    t.add_column("timestep", justify="right")
    for p in plan.lattice:
        t.add_column(p.name, justify="right")
    for k, row in enumerate(plan.assignment):
        c = Counter(row)
        t.add_row(str(k), f"{s.timesteps[k]:.1f}", *(str(c.get(p.name, 0)) for p in plan.lattice))
    console.print(t)


def cmd_inspect(args) -> int:
    from ..errors import PlanError
    from ..passes.plan import PrecisionPlan

    plan = PrecisionPlan.load(args.plan) if args.plan else None  # fail fast, before exporting
    summary = load_analysis(args.analysis) if args.analysis else None
    table, fp = _table_and_fingerprint(args)
    if summary is not None:
        from ..errors import InputError

        if list(summary["layers"]) != table.names:
            raise InputError(f"{args.analysis}: the analysis was made for another model (its layers differ)")
    if plan is not None:
        if fp is None:
            raise PlanError(f"{args.plan}: cannot check the plan: {args.model} carries no adatsq model fingerprint")
        plan.check_model(fp, table, where=str(args.plan))
    print_table(table, args.layers)
    if plan is not None:
        print_plan(plan)
    if summary is not None:
        print_analysis(summary)
        write_analysis_plots(summary, Path(args.analysis_png or _analysis_dir(args.analysis)))
    if args.json:
        table.save(args.json)
        console.print(f"wrote {args.json}")
    return 0


def cmd_export(args) -> int:
    from ..frontend.layers import LayerTable
    from ..frontend.onnx_io import export_onnx

    graph = _export(args)
    table = LayerTable.from_graph(graph)
    t0 = time.perf_counter()
    with console.status(f"ONNX export (opset {args.opset})…"):
        export_onnx(graph, args.output, opset=args.opset, table=table)
    console.print(f"[green]wrote[/] {args.output} ({Path(args.output).stat().st_size / 1e6:.1f} MB, "
                  f"{time.perf_counter() - t0:.1f}s)")
    if args.json:
        table.save(args.json)
        console.print(f"wrote {args.json}")
    return 0


def cmd_plan(args) -> int:
    from ..frontend.schedule import default_schedule
    from ..passes.plan import PrecisionPlan

    if str(args.model).endswith(".onnx"):
        from ..errors import InputError

        raise InputError(f"{args.model}: make plans from the model (builtin or folder), not from an .onnx file")
    table, fp = _table_and_fingerprint(args)
    plan = PrecisionPlan.uniform(table, fp, default_schedule(table.arch, args.steps), args.precision)
    plan.save(args.output)
    print_plan(plan)
    console.print(f"wrote {args.output}")
    return 0


def stage_progress(progress, label: Callable[[str], str] = lambda stage: stage) -> Callable[[str, int, int], None]:
    """A ``(stage, done, total)`` callback: one rich bar per stage; where the console is not a
    terminal (a log file, CI, a device run) no bar is drawn, so it also prints a timestamped line at
    each stage's first step and at every further quarter of it."""
    tasks: dict[str, Any] = {}
    last: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(label(stage), total=total)
        progress.update(tasks[stage], completed=done, total=total)
        if not console.is_terminal:
            quarter = 4 * done // max(total, 1)
            if done == 1 or quarter > last.get(stage, 0):
                last[stage] = quarter
                progress.console.print(f"{time.strftime('%H:%M:%S')} {label(stage)}: {done}/{total}")

    return on_progress


def run_eval(cfg, judged=None):
    """:func:`~adatsq.tools.evaluate.evaluate` with a progress bar per variant."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..tools.evaluate import evaluate

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} "
                  "sample-steps"), TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        return evaluate(cfg, stage_progress(progress, lambda variant: f"sampling {variant}"), judged)


def cmd_eval(args) -> int:
    from ..tools.evaluate import EvalConfig, grid_png, markdown, save_json

    classes = None
    if args.classes and args.classes != "all":
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    variants = list(args.variant or [])
    if args.method or args.bits:
        from ..errors import InputError

        if not (args.method and args.bits):
            raise InputError("eval: --method and --bits go together (e.g. --method gptq --bits W4A4)")
        for method in args.method:
            for bits in args.bits:
                variants.append(f"{bits.lower()}-{method.lower()}")
    variants += [f"plan:{d}" for d in (args.plan or [])]
    variants += [f"deployed:{d}" for d in (args.deployed or [])] + [f"ort:{d}" for d in (args.ort or [])]
    variants += [f"torch:{d}" for d in (args.torch_runtime or [])]
    cfg = EvalConfig(model=args.model, variants=tuple(variants or ("fp",)), n=args.n, classes=classes,
                     seed=args.seed, steps=args.steps, guidance=args.guidance, batch=args.batch,
                     keep_going=args.keep_going, device=args.device)
    cfg.validate()  # before loading anything
    judged = {} if args.per_sample else None
    result, images, seconds = run_eval(cfg, judged)
    md = markdown(result, seconds)
    console.print(md)
    if args.json:
        save_json(result, args.json)
        console.print(f"wrote {args.json}")
    if args.md:
        from ..tools.io import atomic_write_text

        atomic_write_text(args.md, md)
        console.print(f"wrote {args.md}")
    from ..frontend.reference import FMNIST_CLASSES

    class_ids = [FMNIST_CLASSES.index(c) for c in result["classes"]]
    labels = [class_ids[i % len(class_ids)] for i in range(result["samples"])]
    if args.grid:
        grid_png(images, FMNIST_CLASSES, labels, args.grid)
        console.print(f"wrote {args.grid}")
    if args.per_sample:
        from .paired import save_per_sample

        save_per_sample(args.per_sample, result, judged, labels, [result["seed"] + i for i in range(result["samples"])])
        console.print(f"wrote {args.per_sample} (compare variants with python -m adatsq.tools.paired)")
    return 0


def cmd_quantize(args) -> int:
    import dataclasses
    import json
    import re

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..errors import InputError
    from ..frontend.loading import REFERENCE_RESOLUTIONS
    from ..passes.analysis import layer_nodes
    from ..passes.gptq import GPTQOptions
    from ..passes.weights import GPTQWeights
    from .baselines import annotated_reference_graph
    from .io import atomic_write_text

    bits = []
    for b in args.bits:
        m = re.fullmatch(r"[wW]?(\d)", b.strip())
        if not m or not 2 <= int(m.group(1)) <= 8:
            raise InputError(f"quantize: --bits takes an integer weight width 2..8 (e.g. 4 or W4), got {b!r}")
        bits.append(int(m.group(1)))
    if args.group is not None and args.group <= 0:
        raise InputError(f"quantize: --group must be positive, got {args.group}")
    opts = GPTQOptions(damp=args.damp, block_size=args.block_size, act_order=not args.no_act_order)
    try:
        opts.validate()
    except ValueError as exc:
        raise InputError(f"quantize: {exc}") from None
    if args.model not in REFERENCE_RESOLUTIONS:
        raise InputError(f"quantize: {args.model!r} is not a reference model ({', '.join(REFERENCE_RESOLUTIONS)}); "
                         f"for your own model run adatsq.passes.weights.GPTQWeights on your analysed graph (README)")
    try:
        pat = re.compile(args.layers) if args.layers else None
    except re.error as exc:
        raise InputError(f"quantize: --layers {args.layers!r} is not a regular expression ({exc})") from None
    console.print(f"analysis passes on {args.model} (cached after the first run) ...")
    graph, res, calib = annotated_reference_graph(args.model, log=console.print)
    transformer = calib.denoiser.transformer  # the model the graph was analysed for
    params = dict(transformer.named_parameters())
    layers = [i.param for i in res.table if i.kind == "linear" and (pat is None or pat.search(i.param))]
    if not layers:
        raise InputError(f"quantize: no linear layer matches {args.layers!r}")
    requests = {}
    for p in layers:
        k = params[p].shape[1]
        g = args.group if args.group and k % args.group == 0 else None
        requests[p] = [(b, g) for b in bits]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} copies"),
                  TimeElapsedColumn(), console=console) as progress:
        on_progress = stage_progress(progress, lambda stage: f"GPTQ ({args.hessian} Hessian)")
        wp = GPTQWeights(transformer, requests, args.output, hessian=args.hessian, options=opts,
                         progress=on_progress)
        wp(graph)
    from ..passes.annotations import get_annotation
    from ..passes.weights import WeightCopies

    rows = {}
    for p, nodes in layer_nodes(graph).items():
        wc = get_annotation(nodes[0], WeightCopies)
        if wc is not None and p in requests:
            rows[p] = {name: dict(rtn_error=r, error=e) for name, r, e in zip(wc.copies, wc.rtn_error, wc.error)}
    summary = {}
    for b in bits:
        pairs = [(v["rtn_error"], v["error"]) for r in rows.values() for n, v in r.items() if f"@w{b}" in n]
        summary[f"W{b}"] = dict(layers=len(pairs), mean_rtn_error=sum(a for a, _ in pairs) / len(pairs),
                                mean_error=sum(e for _, e in pairs) / len(pairs),
                                layers_better_than_rtn=sum(e < a for a, e in pairs))
    table = Table(title=f"{args.output}: relative output error tr(dW H dW^T)/tr(W H W^T), uniform H")
    for c in ("bits", "layers", "RTN (mean)", f"{args.hessian} GPTQ (mean)" if args.hessian != "none" else "written",
              "better than RTN"):
        table.add_column(c)
    for b, v in summary.items():
        table.add_row(b, str(v["layers"]), f"{v['mean_rtn_error']:.3e}", f"{v['mean_error']:.3e}",
                      f"{v['layers_better_than_rtn']}/{v['layers']}")
    console.print(table)
    size = Path(args.output).stat().st_size
    console.print(f"wrote {args.output} ({size / 1e6:.2f} MB) in {wp.seconds:.1f} s")
    if args.report:
        atomic_write_text(args.report, json.dumps(dict(format="adatsq.weights-report", version=1, model=args.model,
                                                       hessian=args.hessian, gptq=dataclasses.asdict(opts),
                                                       summary=summary, layers=rows), indent=1, sort_keys=True) + "\n")
        console.print(f"wrote {args.report}")
    return 0


def _pace(text: str) -> float | None:
    from ..errors import InputError

    if str(text).lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"build: --pace takes a number or 'none', got {text!r}") from None


def cmd_build(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .build import BuildOptions, build

    opts = BuildOptions(model=args.model, budget=args.budget, target=args.target, beam=args.beam,
                        search_samples=args.search_samples, weights=args.weights, base=args.base, rank=args.rank,
                        group_size=args.group_size, policy=args.policy, pace=_pace(args.pace),
                        search_sensitivity=args.search_sensitivity,
                        sensitivity_samples=args.sensitivity_samples, anchor=not args.no_anchor,
                        fisher_mix=args.fisher_mix,
                        search_score=args.search_score, memory_bits=args.memory_bits,
                        max_segments=args.max_segments, lattice=args.lattice, groups=args.groups,
                        device=args.device, cache_dir=args.cache, from_plan=args.from_plan)
    opts.validate()  # bad input fails before any work
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        report = build(args.output, opts, log=console.print, progress=stage_progress(progress))
    a, b, srch = report["achieved"], report["budget"], report["search"]
    how = (f"given ({srch['from_plan']}, not searched)" if "from_plan" in srch else
           f"search error {srch['final_error']:.3e} after {srch['evaluations']} step evaluations")
    console.print(f"plan: W{a['w_bits']:.3f} A{a['a_bits']:.3f} average (budget W{b['w_bits']:g} A{b['a_bits']:g}); "
                  f"{how}; {report['weight_copies']} weight copies, {report['weights_bytes'] / 1e6:.2f} MB")
    con = report.get("constraints", {})
    if con.get("memory_bits") is not None:
        console.print(f"memory: the plan's weight copies take {con['plan_memory_bits']:.3f} bits per parameter "
                      f"(budget {con['memory_bits']:g})")
    if con.get("max_segments") is not None:
        console.print(f"segments: {con['plan_segments']} distinct step assignments (budget {con['max_segments']})")
    mem = report["memory"]
    console.print(f"deployed weights: {mem['total_bytes'] / 1e6:.2f} MB ({mem['ratio_to_fp16']:.2f}x the 16-bit "
                  f"model's {mem['fp16_model_bytes'] / 1e6:.2f} MB; low-rank branches {mem['low_rank_and_smoothing_bytes'] / 1e6:.2f} MB)")
    console.print("seconds by stage: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    console.print(f"wrote {args.output}/plan.json, weights.safetensors, report.json, plan.png"
                  + ("" if "from_plan" in srch else ", pareto.png"))
    return 0


def _analysis_dir(path: str) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def load_analysis(path: str) -> dict:
    from ..errors import InputError
    from .io import read_json

    p = Path(path)
    if p.is_dir():
        p = p / "analysis.json"
    data = read_json(p, InputError, "no such file (run `adatsq analyze MODEL -o DIR` first)")
    if not isinstance(data, dict) or data.get("format") != "adatsq.analysis":
        raise InputError(f"{p}: not an adatsq analysis summary")
    if data.get("version") != 1:
        raise InputError(f"{p}: unknown analysis version {data.get('version')!r} (this adatsq reads 1)")
    return data


def write_analysis_plots(summary: dict, folder: Path) -> None:
    from .plots import fisher_png, sensitivity_png

    fisher_png(summary, folder / "fisher.png")
    console.print(f"wrote {folder / 'fisher.png'}")
    if summary.get("sensitivity"):
        sensitivity_png(summary, folder / "sensitivity.png")
        console.print(f"wrote {folder / 'sensitivity.png'}")


def analysis_markdown(summary: dict) -> str:
    """Per-step table (Fisher share, loss, sensitivity totals) and the proxy agreement, as Markdown."""
    f = summary["fisher"]
    tot = f["total_weight"] if f["source"] == "weight" else f["total_output"]
    s = summary.get("sensitivity")
    precs = s["precisions"] if s else []
    cal = summary["calibration"]
    lines = [f"Calibration: {cal['samples']} samples ({len(cal['conditions'])} conditions x {len(cal['seeds'])} seeds), "
             f"{cal['steps']} steps, guidance {cal['guidance']}; Fisher source: {f['source']}; "
             f"max/min of I[t] = {f['max_min_ratio']}; Spearman(weight, output Fisher) = {f['spearman_weight_output']}",
             "", "| step | I[t] share | loss | " + " | ".join(f"{p} one-step error" for p in precs) + " |",
             "|---:|---:|---:|" + "---:|" * len(precs)]
    total = sum(tot) or 1.0
    for t, it in enumerate(tot):
        errs = [sum(g[k][t] for g in s["error"]) for k in range(len(precs))] if s else []
        lines.append(f"| {t} | {it / total:.3f} | {f['loss'][t]:.4f} | " + " | ".join(f"{e:.3g}" for e in errs) + " |")
    if s and s.get("check"):
        c = s["check"]
        lines += ["", f"Rank agreement with the measured end-to-end error over {len(c['triples'])} "
                  f"(group, step, precision) triples: one-step error Spearman {c['spearman_velocity']}, "
                  f"Fisher proxy Spearman {c['spearman_fisher']}."]
    return "\n".join(lines) + "\n"


def print_analysis(summary: dict) -> None:
    from rich.markup import escape

    f = summary["fisher"]
    per = f["per_layer_weight" if f["source"] == "weight" else "per_layer_output"]
    layers = summary["layers"]
    t = Table(title="temporal Fisher and sensitivity per step", show_lines=False)
    s = summary.get("sensitivity")
    precs = s["precisions"] if s else []
    for col in ["step", "I[t] share", "loss", *[f"{p} err" for p in precs]]:
        t.add_column(escape(col), justify="right")
    tot = [sum(r) for r in per]
    total = sum(tot) or 1.0
    for k, it in enumerate(tot):
        errs = [sum(g[j][k] for g in s["error"]) for j in range(len(precs))] if s else []
        t.add_row(str(k), f"{it / total:.3f}", f"{f['loss'][k]:.4f}", *[f"{e:.3g}" for e in errs])
    console.print(t)
    ratio = f["max_min_ratio"]
    console.print(f"I[t] max/min across steps: {ratio}; Spearman(weight, output Fisher): "
                  f"{f['spearman_weight_output']}", markup=False)
    by_layer = sorted(range(len(layers)), key=lambda i: -sum(r[i] for r in per))[:8]
    lt = Table(title="layers with the largest Fisher (sum over steps)")
    lt.add_column("layer")
    lt.add_column("sum I", justify="right")
    lt.add_column("peak step", justify="right")
    lt.add_column("alpha min..max", justify="right")
    for i in by_layer:
        col = [r[i] for r in per]
        al = [r[i] for r in f["alpha"]]
        lt.add_row(layers[i], f"{sum(col):.3g}", str(max(range(len(col)), key=col.__getitem__)),
                   f"{min(al):.2f}..{max(al):.2f}")
    console.print(lt)
    if s and s.get("check"):
        c = s["check"]
        console.print(f"sensitivity ({s['groups']} groups): rank agreement with measured end-to-end error over "
                      f"{len(c['triples'])} triples: one-step error {c['spearman_velocity']}, "
                      f"Fisher proxy {c['spearman_fisher']}")


# --------------------------------------------------------------------------- run (backends/ort_runner.py)
def cmd_run(args) -> int:
    """Sample a lowered build directory (BUILD/onnx) on onnxruntime and write the image(s)."""
    from ..backends.ort_runner import OrtBuild, save_image
    from ..errors import InputError

    seeds = [args.seed + i for i in range(args.n)]
    if args.n < 1:
        raise InputError("run: -n must be >= 1")
    with console.status(f"loading {args.build}…"):
        build = OrtBuild(args.build, device=args.device, threads=args.threads)
    classes = build.pipeline()["classes"]
    cls = args.class_
    cid = int(cls) if str(cls).isdigit() else (classes.index(cls) if cls in classes else None)
    if cid is None:
        raise InputError(f"run: unknown class {cls!r}; classes: {', '.join(classes)}")
    t0 = time.perf_counter()
    sample = build.sample([cid] * len(seeds), seeds, guidance=args.guidance)
    secs = time.perf_counter() - t0
    save_image(sample, args.out)
    per_step = [t for _, t in build.step_seconds]
    console.print(f"{len(seeds)} sample(s) of class {cid} ({classes[cid]}), seeds {seeds[0]}..{seeds[-1]}: "
                  f"{len(per_step)} steps on {len(build.sessions)} segments in {secs:.2f}s "
                  f"({1000 * sum(per_step) / max(len(per_step), 1):.1f} ms per model call); wrote {args.out}")
    return 0


def cmd_check(args) -> int:
    """Check Q/DQ ONNX graphs (files or a build's segments) against TensorRT's explicit-quantization rules."""
    from ..backends.validate import run

    # plain printing: violation lines contain "[layer]", which rich would read as markup
    return run(args, out=lambda s: console.print(s, markup=False, highlight=False))


def cmd_analyze(args) -> int:
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..errors import InputError
    from ..frontend.export import export_model
    from ..frontend.loading import REFERENCE_RESOLUTIONS
    from ..frontend.reference import load_reference
    from ..passes.analysis import AnalysisOptions, analyze
    from ..passes.cache import default_cache_root
    from ..passes.calibration import reference_calibration
    from .io import atomic_write_text
    from .sysinfo import cpu_name

    precisions = tuple(p.strip().upper() for p in args.precisions.split(",") if p.strip())
    opts = AnalysisOptions(hessian=args.hessian, step_groups=args.step_groups, hessian_tokens=args.hessian_tokens,
                           temperature=args.temperature, fisher_source=args.fisher_source,
                           fisher_weighting=args.fisher_weighting, groups=args.groups,
                           precisions=precisions, sensitivity_samples=args.samples, e2e_steps=args.e2e_steps,
                           e2e_per_step=args.e2e_per_step, seed=args.seed,
                           max_hessian_bytes=int(args.max_hessian_mib * 2 ** 20))
    opts.validate()  # before loading anything
    if args.model not in REFERENCE_RESOLUTIONS:
        raise InputError(f"analyze: {args.model!r} is not a reference model with a calibration set "
                         f"({', '.join(REFERENCE_RESOLUTIONS)}); for your own model build a "
                         f"adatsq.passes.calibration.CalibrationSet from your prompt embeddings and call "
                         f"adatsq.passes.analysis.analyze (see README)")
    ref = load_reference(args.model)
    classes = None
    if args.classes != "all":
        classes = [ref.class_id(c.strip()) for c in args.classes.split(",") if c.strip()]
    calib = reference_calibration(ref, seeds_per_class=args.seeds_per_class, classes=classes, steps=args.steps,
                                  guidance=args.guidance, batch=args.batch)
    opts.validate(calib)
    out = Path(args.output)
    cache = None if args.no_cache else Path(args.cache or default_cache_root())
    t0 = time.perf_counter()
    with console.status("exporting"):
        graph = export_model(args.model)
    console.print(f"exported {graph.arch} in {time.perf_counter() - t0:.1f} s; calibration: {calib.num_samples} "
                  f"samples x {calib.num_steps} steps (cache: {cache or 'off'})")
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        result = analyze(graph, calib, opts, cache_dir=cache, progress=stage_progress(progress), log=console.print)
    summary = result.summary()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "analysis.json", json.dumps(summary, indent=1))
    console.print(f"wrote {out / 'analysis.json'}")
    md = analysis_markdown(summary)
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    md += (f"\nAnalysis time {result.seconds:.1f} s ({timing}); peak resident memory "
           f"{result.peak_rss / 2 ** 20:.0f} MiB; CPU: {cpu_name()}; computed units (0 = cache hit): "
           f"{result.computed}.\n")
    atomic_write_text(out / "analysis.md", md)
    console.print(f"wrote {out / 'analysis.md'}")
    write_analysis_plots(summary, out)
    print_analysis(summary)
    console.print(f"analysis took {result.seconds:.1f} s ({timing}); peak resident memory "
                  f"{result.peak_rss / 2 ** 20:.0f} MiB")
    return 0


def cmd_models(args) -> int:
    from ..frontend.architectures import BUILTINS

    t = Table(title="builtin models (tiny, random init)")
    for col in ("name", "architecture", "params", "default resolution"):
        t.add_column(col)
    for name, a in sorted(BUILTINS.items()):
        m = a.tiny()
        r = a.default_resolution
        t.add_row(name, a.arch, _fmt_int(sum(p.numel() for p in m.parameters())),
                  f"{r.height}x{r.width}, {r.text_len} text" + (f", {r.frames} frames" if a.video else ""))
    console.print(t)
    from ..frontend.loading import REFERENCE_RESOLUTIONS
    from ..frontend.reference import load_reference

    rt = Table(title="reference models (trained, shipped in models/)")
    for col in ("name", "architecture", "params", "resolution", "schedule"):
        rt.add_column(col)
    for name, r in sorted(REFERENCE_RESOLUTIONS.items()):
        ref = load_reference(name)
        tr = ref.denoiser.transformer
        s = ref.schedule
        rt.add_row(name, type(tr).__name__, _fmt_int(sum(p.numel() for p in tr.parameters())),
                   f"{r.height}x{r.width} px, {r.text_len} class tokens",
                   f"{s.num_steps} steps, guidance {s.guidance}")
    console.print(rt)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adatsq", description="AdaTSQ: an ahead-of-time compiler for diffusion "
                                "transformers (timestep-adaptive mixed-precision quantization).")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("inspect", help="print the quantizable-layer table of a model")
    pi.add_argument("model", help="a builtin name (see `adatsq models`), a diffusers transformer folder, or an .onnx")
    pi.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    pi.add_argument("--layers", action="store_true", help="print every layer, not only per-role totals")
    pi.add_argument("--plan", metavar="PLAN.json", help="check a precision plan against the model and show it")
    pi.add_argument("--analysis", metavar="DIR", help="show an analysis (`adatsq analyze -o DIR`): tables, heatmaps")
    pi.add_argument("--analysis-png", metavar="DIR", help="where to write the heatmaps (default: beside the analysis)")
    _add_resolution_args(pi)
    pi.set_defaults(func=cmd_inspect)

    pe = sub.add_parser("export", help="export a model to ONNX (torch.export, opset >= 21)")
    pe.add_argument("model", help="a builtin name or a diffusers transformer folder")
    pe.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    pe.add_argument("--opset", type=int, default=21)
    pe.add_argument("--json", metavar="FILE", help="also write the layer table as JSON")
    _add_resolution_args(pe)
    pe.set_defaults(func=cmd_export)

    pp = sub.add_parser("plan", help="write a uniform precision plan (the AdaTSQ search comes in a later release)")
    pp.add_argument("model", help="a builtin name or a diffusers transformer folder")
    pp.add_argument("-o", "--output", required=True, metavar="PLAN.json")
    pp.add_argument("--precision", default="W8A8", help="lattice point for every layer and step (default W8A8)")
    pp.add_argument("--steps", type=int, default=20, help="number of sampling steps (default 20)")
    _add_resolution_args(pp)
    pp.set_defaults(func=cmd_plan)

    pv = sub.add_parser("eval", help="generate with the FP model and variants; judge accuracy, FID, fidelity")
    pv.add_argument("model", nargs="?", default="flux-fmnist", help="a reference model (default flux-fmnist)")
    pv.add_argument("--variant", action="append", metavar="V",
                    help="fp (always run), w<W>a<A>-<method> (e.g. w4a8-rtn, w4a4-svdquant) or a peer "
                    "(modelopt-int8-sq, modelopt-int4-awq, modelopt-w4a8-awq, torchao-int8-dyn, torchao-int4-wo; "
                    "pip install 'adatsq[peers]'), fp8-attention (the FP model with FP8 attention numerics) or "
                    "fp8-attention-kernel (the same with the FP8 attention kernel's own numerics) (repeatable)")
    pv.add_argument("--method", action="append", metavar="M",
                    help="with --bits: rtn, gptq, gptq-fisher, gptq-fisher-latent, smoothquant, quarot, svdquant, "
                    "qdit, viditq (repeatable)")
    pv.add_argument("--bits", action="append", metavar="WxAy", help="with --method: W8A8, W4A8, W4A4, W3A3 ... "
                    "(repeatable; every method x bits pair is run)")
    pv.add_argument("-n", type=int, default=512, help="number of samples (default 512)")
    pv.add_argument("--classes", default="all", help="comma-separated class names or ids (default: all)")
    pv.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED+i")
    pv.add_argument("--steps", type=int, help="sampling steps (default: the model's schedule)")
    pv.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    pv.add_argument("--batch", type=int, default=64)
    pv.add_argument("--json", metavar="FILE")
    pv.add_argument("--md", metavar="FILE", help="write the Markdown table")
    pv.add_argument("--per-sample", metavar="FILE.safetensors",
                    help="keep every sample's judge prediction and features, for paired comparisons of the "
                         "variants on the same seeds (python -m adatsq.tools.paired)")
    pv.add_argument("--deployed", action="append", metavar="BUILD",
                    help="a lowered build (BUILD/onnx) sampled with the PyTorch reference of its deployed numerics "
                         "(static activation scales), repeatable")
    pv.add_argument("--ort", action="append", metavar="BUILD",
                    help="a lowered build (BUILD/onnx) sampled by onnxruntime on the CPU, repeatable")
    pv.add_argument("--torch-runtime", action="append", metavar="BUILD",
                    help="a build sampled by the PyTorch/CUDA runtime (low-bit kernels on --device cuda, their "
                         "reference ops on the CPU; plans of --target torch-cuda), repeatable")
    pv.add_argument("--grid", metavar="FILE.png", help="write a PNG grid: FP row vs variant rows, same seeds")
    pv.add_argument("--plan", action="append", metavar="BUILD_DIR",
                    help="also evaluate the plan of an `adatsq build` directory (repeatable)")
    pv.add_argument("--keep-going", action="store_true",
                    help="record a variant that cannot run (e.g. a peer not installed) and go on")
    pv.add_argument("--device", default="cpu",
                    help="where sampling runs: cpu (default) or cuda[:N]; quantized weights are prepared on the "
                    "CPU either way, the peers run on the CPU only")
    pv.set_defaults(func=cmd_eval)

    pq = sub.add_parser("quantize", help="GPTQ weight copies (Fisher-weighted Hessian by default) of every linear "
                        "layer, streamed layer by layer to one safetensors file")
    pq.add_argument("model", nargs="?", default="flux-fmnist", help="a reference model (default flux-fmnist)")
    pq.add_argument("-o", "--output", required=True, metavar="FILE.safetensors")
    pq.add_argument("--bits", action="append", required=True, metavar="B",
                    help="weight bits of a copy, 2..8 (repeatable: one copy per width, e.g. --bits 4 --bits 8)")
    pq.add_argument("--group", type=int, help="group size (layers it does not divide stay per channel)")
    pq.add_argument("--hessian", choices=("fisher", "uniform", "none"), default="fisher",
                    help="fisher: AdaTSQ's sum_t alpha[t] X_t^T X_t; uniform: plain GPTQ; none: round to nearest")
    pq.add_argument("--layers", metavar="REGEX", help="only layers whose name matches")
    pq.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (fraction of mean diagonal)")
    pq.add_argument("--block-size", type=int, default=128)
    pq.add_argument("--no-act-order", action="store_true")
    pq.add_argument("--report", metavar="FILE.json", help="per-layer errors, RTN vs the written copy")
    pq.set_defaults(func=cmd_quantize)

    pb = sub.add_parser("build", help="export -> analysis -> search -> Fisher-weighted GPTQ -> plan, weights, report")
    pb.add_argument("model", nargs="?", default="flux-fmnist", help="a reference model (default flux-fmnist)")
    pb.add_argument("-o", "--output", required=True, metavar="DIR")
    pb.add_argument("--budget", default=None,
                    help="average bits W<w>A<a>, e.g. W4A4, W6A12 (default: the target's, W6A12 for onnxruntime "
                         "and tensorrt, W4A4 for simulate, W5A8 for torch-cuda)")
    pb.add_argument("--target", default="onnxruntime",
                    help="onnxruntime (default: also writes OUT/onnx, run it with `adatsq run`), tensorrt (also "
                         "OUT/tensorrt: engines where TensorRT is installed, trtexec.sh always), simulate (the "
                         "paper's W3A3..W8A8 lattice, fake-quantized; no deployable artefacts), torch-cuda")
    pb.add_argument("--beam", type=int, default=4, help="beam width K (default 4)")
    pb.add_argument("--search-samples", type=int, default=10, help="calibration samples the search scores on")
    pb.add_argument("--weights", choices=("gptq-fisher", "gptq", "rtn"), default="gptq-fisher",
                    help="GPTQ Hessian of the quantized copies: Fisher-weighted (AdaTSQ, default), uniform, or RTN")
    pb.add_argument("--base", choices=("lowrank", "plain"), default="lowrank",
                    help="lowrank (default): per layer a searched smoothing and a 16-bit low-rank branch shared by "
                         "all its precisions, the residual quantized in groups (SVDQuant-style); plain: the weight "
                         "itself, per output channel")
    pb.add_argument("--rank", type=int, default=32, help="rank of the low-rank branch (default 32)")
    pb.add_argument("--group-size", type=int, default=64, help="weight group size of the lowrank base (default 64)")
    pb.add_argument("--policy", choices=("dynamic", "per-step", "per-layer", "uniform"), default="dynamic",
                    help="dynamic (per step and layer group, default); ablations: per-step (one precision for all "
                         "layers at a step), per-layer (static mixed precision), uniform")
    pb.add_argument("--pace", default="0.1", metavar="SLACK",
                    help="budget pacing: prune a partial policy that spent more than its share of the budget so "
                         "far by more than SLACK (default 0.1); 'none' turns pacing off")
    pb.add_argument("--search-sensitivity", choices=("measured", "analysis"), default="measured",
                    help="per-step errors the candidate assignments are drawn from: measured with the plan's own "
                         "quantized layers (default) or the analysis pass's RTN sensitivity")
    pb.add_argument("--sensitivity-samples", type=int, default=4)
    pb.add_argument("--search-score", choices=("heldout", "calibration"), default="heldout",
                    help="samples the search scores candidates on: held-out seeds (default; never seen by the "
                         "Hessians the weights were made with) or the calibration samples")
    pb.add_argument("--fisher-mix", type=float, default=1.0, metavar="M",
                    help="GPTQ Hessian (1 - M) E_uniform[xx^T] + M E_fisher[xx^T]: 1 (default) is AdaTSQ's "
                         "Fisher-weighted Hessian, 0 the uniform one")
    pb.add_argument("--memory-bits", type=float, metavar="B",
                    help="memory budget: bits of every distinct weight copy the plan needs, per parameter (a layer "
                         "that switches W4 <-> W8 across steps costs 12); default: unconstrained")
    pb.add_argument("--max-segments", type=int, metavar="N",
                    help="at most N distinct step assignments: each is one deployed ONNX graph / TensorRT engine "
                         "(default: unconstrained)")
    pb.add_argument("--lattice", metavar="POINTS",
                    help="the precisions the search may use, comma-separated (e.g. W2A4,W3A3,W4A2,W4A4,W8A8,FP16): "
                         "for simulate any WxAy with x in 2,3,4,6,8 and y in 2,3,4,6,8,16, and NVFP4 / NVFP4A16 "
                         "(FP4 in blocks of 16 with FP8 scales: 4.5 bits in the budget); for a deployment "
                         "target a subset of what it executes (default: the target's lattice)")
    pb.add_argument("--device", default="cpu",
                    help="where the search runs: cpu (default) or cuda[:N]; a GPU makes hundreds of "
                         "--search-samples cheap (the objective's noise falls as 1/sqrt(samples)); the analysis "
                         "and the weight copies stay on the CPU")
    pb.add_argument("--groups", choices=("block", "role", "layer"), default="block",
                    help="the search's layer groups, each one precision per step: block (default; layers outside "
                         "blocks by role), role (each role within a block: its attention, MLP, adaLN ... apart) "
                         "or layer")
    pb.add_argument("--no-anchor", action="store_true",
                    help="do not keep the uniform policy at the budget in the beam (ablation)")
    pb.add_argument("--cache", metavar="DIR", help="analysis cache (default $ADATSQ_CACHE or ~/.cache/adatsq/analysis)")
    pb.add_argument("--from-plan", metavar="PLAN.json",
                    help="build this precision plan (e.g. a committed BUILD/plan.json) instead of searching one: "
                         "analysis, base and weight copies as usual; its lattice and budget unless given. The "
                         "weights equal the original build's when --target/--budget/--weights/--base/--rank/"
                         "--group-size/--fisher-mix match it (its report.json lists them; differences are noted)")
    pb.set_defaults(func=cmd_build)

    pa = sub.add_parser("analyze", help="analysis passes on the FP trajectory: Fisher, statistics, Hessians, "
                        "sensitivity (cached; resumable)")
    pa.add_argument("model", nargs="?", default="flux-fmnist", help="a reference model (default flux-fmnist)")
    pa.add_argument("-o", "--output", required=True, metavar="DIR",
                    help="writes analysis.json, analysis.md, fisher.png, sensitivity.png")
    g = pa.add_argument_group("calibration set")
    g.add_argument("--seeds-per-class", type=int, default=2, help="seeds per class (default 2; from seed 10000)")
    g.add_argument("--classes", default="all", help="comma-separated class names or ids (default: all)")
    g.add_argument("--steps", type=int, help="sampling steps (default: the model's schedule)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    g.add_argument("--batch", type=int, default=64, help="samples per model call (CFG doubles it)")
    g = pa.add_argument_group("passes")
    g.add_argument("--hessian", default="weighted", choices=["weighted", "per_step", "grouped", "none"],
                   help="weighted: uniform and Fisher-weighted sums (default); per_step; grouped; none")
    g.add_argument("--step-groups", type=int, default=4, help="step ranges for --hessian grouped")
    g.add_argument("--hessian-tokens", type=int, help="subsample this many tokens per model call and layer")
    g.add_argument("--max-hessian-mib", type=float, default=4096, help="Hessians held at once (layers are chunked)")
    g.add_argument("--fisher-source", default="weight", choices=["weight", "output"],
                   help="Fisher score that alpha is computed from (default: weight gradients)")
    g.add_argument("--fisher-weighting", default="loss", choices=["loss", "latent"],
                   help="loss: the velocity-loss Fisher I[t] (default, the paper's); latent: I[t] * dsigma_t^2")
    g.add_argument("--temperature", type=float, default=1.0, help="alpha ~ I^(1/T) (default 1)")
    g.add_argument("--groups", default="block", choices=["layer", "role", "block"],
                   help="sensitivity layer groups (default block: 9 on flux-fmnist; role: 31; layer: 48; "
                   "each group costs one replicated forward per step)")
    g.add_argument("--precisions", default="W3A3,W4A4,W4A8,W8A8", help="sensitivity precisions")
    g.add_argument("--samples", type=int, default=10, help="samples for sensitivity (default 10)")
    g.add_argument("--e2e-steps", type=int, default=5, help="steps with measured end-to-end errors (default 5)")
    g.add_argument("--e2e-per-step", type=int, default=4, help="(group, precision) pairs per such step (default 4)")
    g.add_argument("--seed", type=int, default=0, help="seed of token subsampling and of the checked triples")
    g = pa.add_argument_group("cache")
    g.add_argument("--cache", metavar="DIR", help="cache root (default $ADATSQ_CACHE or ~/.cache/adatsq/analysis)")
    g.add_argument("--no-cache", action="store_true", help="compute everything, store nothing")
    pa.set_defaults(func=cmd_analyze)

    pr = sub.add_parser("run", help="sample a lowered build (BUILD/onnx, `adatsq build --target onnxruntime`) on "
                        "onnxruntime, switching segment per step")
    pr.add_argument("build", metavar="BUILD", help="a build directory with onnx/manifest.json")
    pr.add_argument("--class", dest="class_", default="0", help="class id or name (default 0)")
    pr.add_argument("--seed", type=int, default=0, help="noise seed (sample i uses SEED+i)")
    pr.add_argument("-n", type=int, default=1, help="number of samples, written side by side (default 1)")
    pr.add_argument("--out", required=True, metavar="IMG.png")
    pr.add_argument("--guidance", type=float, help="classifier-free guidance (default: the plan's schedule)")
    pr.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="onnxruntime execution provider (auto: CUDA where onnxruntime has it, else CPU)")
    pr.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    pr.set_defaults(func=cmd_run)

    from ..backends.validate import build_arg_parser

    pc = sub.add_parser("check", help="check Q/DQ ONNX graphs or a build's segments against TensorRT's "
                        "explicit-quantization rules (exit 1 on a violation)")
    build_arg_parser(pc)
    pc.set_defaults(func=cmd_check)

    pm = sub.add_parser("models", help="list the builtin models (tiny random-init and trained reference models)")
    pm.set_defaults(func=cmd_models)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("adatsq")
    except Exception:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    from .sysinfo import keep_freed_memory

    keep_freed_memory()  # large tensors reuse freed heap instead of fresh, page-faulting mmaps
    try:
        return args.func(args)
    except AdatsqError as exc:
        err_console.print(f"adatsq: error: {exc}", markup=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("adatsq: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
