"""The ``adatsq`` command line.

    adatsq inspect MODEL [--json FILE] [--layers]     layer table of a builtin, a folder or an .onnx file
    adatsq export  MODEL -o OUT.onnx [--json FILE]    torch.export -> ONNX (opset 21) with annotations
    adatsq plan    MODEL -o PLAN.json [--precision P] a uniform precision plan (search: later release)
    adatsq eval    [MODEL] [--variant V] [-n N]       generate, judge, compare (flux-fmnist)
    adatsq models                                     the builtin models

Errors caused by the input are printed on one line and exit with code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

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
    table, fp = _table_and_fingerprint(args)
    if plan is not None:
        if fp is None:
            raise PlanError(f"{args.plan}: cannot check the plan: {args.model} carries no adatsq model fingerprint")
        plan.check_model(fp, table, where=str(args.plan))
    print_table(table, args.layers)
    if plan is not None:
        print_plan(plan)
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


def cmd_eval(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..tools.evaluate import EvalConfig, evaluate, grid_png, markdown, save_json

    classes = None
    if args.classes and args.classes != "all":
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    cfg = EvalConfig(model=args.model, variants=tuple(args.variant or ("fp",)), n=args.n, classes=classes,
                     seed=args.seed, steps=args.steps, guidance=args.guidance, batch=args.batch)
    cfg.validate()  # before loading anything
    tasks = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} "
                  "sample-steps"), TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        def on_progress(variant, done, total):
            if variant not in tasks:
                tasks[variant] = progress.add_task(f"sampling {variant}", total=total)
            progress.update(tasks[variant], completed=done)

        result, images, seconds = evaluate(cfg, on_progress)
    md = markdown(result, seconds)
    console.print(md)
    if args.json:
        save_json(result, args.json)
        console.print(f"wrote {args.json}")
    if args.md:
        from ..tools.io import atomic_write_text

        atomic_write_text(args.md, md)
        console.print(f"wrote {args.md}")
    if args.grid:
        from ..frontend.reference import FMNIST_CLASSES

        labels = [FMNIST_CLASSES.index(c) for c in result["classes"]]
        grid_png(images, FMNIST_CLASSES, [labels[i % len(labels)] for i in range(result["samples"])], args.grid)
        console.print(f"wrote {args.grid}")
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
                    help="fp (always run) or w<W>a<A>-rtn (round-to-nearest baseline), repeatable")
    pv.add_argument("-n", type=int, default=512, help="number of samples (default 512)")
    pv.add_argument("--classes", default="all", help="comma-separated class names or ids (default: all)")
    pv.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED+i")
    pv.add_argument("--steps", type=int, help="sampling steps (default: the model's schedule)")
    pv.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    pv.add_argument("--batch", type=int, default=64)
    pv.add_argument("--json", metavar="FILE")
    pv.add_argument("--md", metavar="FILE", help="write the Markdown table")
    pv.add_argument("--grid", metavar="FILE.png", help="write a PNG grid: FP row vs variant rows, same seeds")
    pv.set_defaults(func=cmd_eval)

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
