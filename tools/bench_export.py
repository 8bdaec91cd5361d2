"""Benchmark: export time and peak memory per architecture, on the CPU.

Each architecture is measured in a fresh subprocess (so peak RSS is its own): model build,
torch.export (+ decompositions and fix-ups), layer table, ONNX export, onnxruntime session load.

    python tools/bench_export.py [--preset tiny|wide] [--arch tiny-flux ...] [--out FILE.json]

``tiny`` is the builtin tiny configs; ``wide`` keeps each architecture's real hidden size (and
head layout) but only 2 blocks, at a 64x64 latent, so per-layer costs are realistic.
Writes a JSON record (with the CPU model) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

WIDE = {  # real widths, 2 blocks
    "tiny-flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                      joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64,
                      axes_dims_rope=(16, 56, 56)),
    "tiny-sd3": dict(num_layers=2, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                     caption_projection_dim=1536, pooled_projection_dim=2048, in_channels=16, out_channels=16,
                     pos_embed_max_size=192, sample_size=128),
    "tiny-pixart": dict(num_layers=2, attention_head_dim=72, num_attention_heads=16, caption_channels=4096,
                        cross_attention_dim=1152, sample_size=64),
    "tiny-dit": dict(num_layers=2, attention_head_dim=72, num_attention_heads=16, sample_size=64),
    "tiny-wan": dict(num_layers=2, attention_head_dim=128, num_attention_heads=12, text_dim=4096, freq_dim=256,
                     ffn_dim=8960, in_channels=16, out_channels=16, rope_max_seq_len=1024),
    "tiny-zimage": dict(dim=3840, n_layers=1, n_refiner_layers=1, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                        in_channels=16, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512]),
}


def child(name: str, preset: str) -> dict:
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from adatsq.frontend.architectures import BUILTINS, Resolution
    from adatsq.frontend.export import export_model
    from adatsq.frontend.layers import LayerTable
    from adatsq.frontend.onnx_io import export_onnx

    adapter = BUILTINS[name]
    rec = dict(model=name, arch=adapter.arch, preset=preset)
    t = time.perf_counter()
    torch.manual_seed(0)
    if preset == "wide":
        model = adapter.model_class()(**{**dict(adapter.tiny_config), **WIDE[name]}).eval()
        res = Resolution(64, 64, 64, frames=3 if adapter.video else 1, batch=2)
    else:
        model, res = adapter.tiny(), adapter.default_resolution
    rec["params"] = sum(p.numel() for p in model.parameters())
    rec["build_s"] = time.perf_counter() - t
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    graph = export_model(model, res)
    rec["torch_export_s"] = time.perf_counter() - t
    table = LayerTable.from_graph(graph)
    rec["layers"] = len(table)
    rec["dynamic"] = graph.dynamic
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        export_onnx(graph, os.path.join(d, "m.onnx"), table=table)
        rec["onnx_export_s"] = time.perf_counter() - t
        import onnxruntime as ort

        t = time.perf_counter()
        ort.InferenceSession(os.path.join(d, "m.onnx"), providers=["CPUExecutionProvider"])
        rec["ort_load_s"] = time.perf_counter() - t
    rec["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec["rss_before_export_mb"] = rss0 / 1024
    rec["resolution"] = dict(height=res.height, width=res.width, text_len=res.text_len, frames=res.frames,
                             batch=res.batch)
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("tiny", "wide"), default="tiny")
    p.add_argument("--arch", nargs="*", default=list(WIDE))
    p.add_argument("--out", help="write the records as JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.preset)))
        return 0
    records = []
    for name in args.arch:
        r = subprocess.run([sys.executable, __file__, "--child", name, "--preset", args.preset],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"{name}: FAILED\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        records.append(rec)
        print(f"{rec['arch']:25s} {rec['params'] / 1e6:8.2f}M params  torch.export {rec['torch_export_s']:6.2f}s  "
              f"ONNX {rec['onnx_export_s']:6.2f}s  ORT load {rec['ort_load_s']:5.2f}s  "
              f"peak RSS {rec['peak_rss_mb']:7.0f} MB", flush=True)
    import torch

    from adatsq.tools.sysinfo import cpu_name

    out = dict(cpu=cpu_name(), cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
               preset=args.preset, records=records)
    print(f"CPU: {out['cpu']} ({out['cores']} cores), torch {out['torch']}")
    if args.out:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from adatsq.tools.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
