"""CPU check that the torch runtime compiles once for every step under Inductor (issue 9).

    .venv/bin/python benchmarks/runtime_compile_cpu.py

A 1 double + 1 single block Flux (diffusers, tiny widths), lowered with the synthetic mixed plan
of ``benchmarks/gpu_e2e.py`` over 4 steps (one layer FP8), run eager and through
``torch.compile`` (Inductor, CPU): prints, per step, the largest difference compiled vs eager
and the relative error vs the unquantized model, then dynamo's graph count (1 expected).
Seconds, not minutes; not part of the test suite because Inductor's CPU compile takes ~50 s.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_e2e as g  # noqa: E402
from adatsq.backends.torch_runtime import lower_linears  # noqa: E402
from adatsq.passes.transforms import StepClock  # noqa: E402


def main() -> int:
    from diffusers import FluxTransformer2DModel

    cfg = dict(g.FLUX_DEV, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
               pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(0)
    m = FluxTransformer2DModel(num_layers=1, num_single_layers=1, **cfg).eval()
    names = g.block_linears(m)
    x = dict(hidden_states=torch.randn(1, 16, 64), encoder_hidden_states=torch.randn(1, 8, 32),
             pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
             img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    with torch.no_grad():
        ref = m(**x)[0]
    plan = g.synthetic_plan(names, 4, 2)
    plan[names[-1]] = ("fp8",) * 4
    clock = StepClock(4)
    lower_linears(m, plan, clock, keep_originals=False)
    worst = 0.0
    with torch.no_grad():
        eager = []
        for k in range(4):
            clock.step = k
            eager.append(m(**x)[0])
        f = torch.compile(m)
        t = time.time()
        for k in range(4):
            clock.step = k
            y = f(**x)[0]
            d = float((y - eager[k]).abs().max())
            worst = max(worst, d)
            print(f"step {k}: |compiled - eager| max {d:.2e}, rel. error vs FP {float((y - ref).norm() / ref.norm()):.4f}")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"compile + 4 calls: {time.time() - t:.1f} s; dynamo graphs: {graphs}")
    return 0 if graphs == 1 and worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
