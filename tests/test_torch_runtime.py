"""backends/torch_runtime.py on the CPU: the lowered module computes the plan's reference numerics
(the kernels' torch path), switches precision per step through the clock, and reports its memory."""

import pytest
import torch

from adatsq.errors import InputError
from adatsq.passes.plan import PrecisionPlan
from adatsq.passes.search import TARGETS
from tests.test_search import analysed_tiny  # noqa: F401 - the module fixture


def _rows(k, i, name):
    return ("W8A8", "W4A8", "W4A16", "FP16")[(k + i) % 4]


@pytest.fixture(scope="module")
def lowered_inputs(analysed_tiny, tmp_path_factory):  # noqa: F811
    from adatsq.frontend.layers import LayerTable
    from adatsq.passes.plan import fingerprint_graph
    from adatsq.passes.weights import GPTQWeights, load_weight_copies, prepare_layers

    graph, calib, res = analysed_tiny
    tr = calib.denoiser.transformer
    table = LayerTable.from_graph(graph)
    lattice = TARGETS["torch-cuda"]
    params = dict(tr.named_parameters())
    layers = tuple(table.names)
    lin = [p for p in layers if params[p].ndim == 2]
    rows = tuple(tuple(_rows(k, i, p) if p in lin else "FP16" for i, p in enumerate(layers))
                 for k in range(calib.num_steps))
    plan = PrecisionPlan(fingerprint_graph(graph), calib.schedule, lattice, layers, rows, None,
                         PrecisionPlan.averages(rows, lattice, layers, table))
    prep = prepare_layers(calib, res.results["trajectory"], lin[::2], 4, 8, rank=4, samples=2)
    reqs = {p: [(4, None), (8, None)] for p in lin}
    path = tmp_path_factory.mktemp("rt") / "w.safetensors"
    GPTQWeights(tr, reqs, path, hessian="none", prep=prep)(graph)
    return tr, plan, load_weight_copies(path), calib


def _assert_close_up_to_code_flips(got: torch.Tensor, want: torch.Tensor, step: int) -> None:
    """Equal up to float summation order: the runtime's integer GEMMs (codes x codes, then the
    scales) and the simulation's float GEMMs of dequantized values differ in the last bits, which
    can move an activation code at a rounding tie in a later layer. So: all but a few elements
    (0.1%) within 1e-4, none off by more than a few code steps (5e-3). Measured on a 2-core
    AVX-512/AMX Xeon: 2 of 4096 elements at 3.3e-4 (an AVX2 EPYC: none)."""
    d = (got - want).abs()
    off = d > 1e-4 + 1e-4 * want.abs()
    assert off.float().mean() <= 1e-3 and float(d.max()) < 5e-3, (step, int(off.sum()), float(d.max()))


def test_runtime_matches_the_plan_reference_at_every_step(lowered_inputs):
    from adatsq.backends.torch_runtime import PlanLinear, lower_to_torch
    from adatsq.passes.transforms import StepClock, transformed_layers
    from adatsq.passes.weights import plan_transforms

    tr, plan, idx, calib = lowered_inputs
    den = calib.denoiser
    x = torch.randn(2, *den.latent_shape(), generator=torch.Generator().manual_seed(0))
    clock = StepClock(calib.num_steps)
    want = []
    with torch.no_grad(), transformed_layers(tr, plan_transforms(plan, idx, tr), clock):
        for k in range(calib.num_steps):
            clock.step = k
            want.append(den(*calib.model_inputs(x, k, [0, 1])))
    fp = den(*calib.model_inputs(x, 0, [0, 1])).detach()
    rt = lower_to_torch(tr, plan, idx, clock)
    try:
        assert rt.layers and all(isinstance(m, PlanLinear) for m in rt.layers.values())
        with torch.no_grad():
            for k in range(calib.num_steps):
                clock.step = k
                got = den(*calib.model_inputs(x, k, [0, 1]))
                _assert_close_up_to_code_flips(got, want[k], k)
        assert not torch.allclose(want[0], fp, atol=1e-4)  # the plan really quantizes
        mem = rt.memory()
        assert mem["copies"] > 0 and mem["base"] > 0 and mem["total"] == sum(v for k, v in mem.items() if k != "total")
    finally:
        rt.restore()
    assert not any(isinstance(m, PlanLinear) for m in tr.modules())
    with torch.no_grad():
        assert torch.equal(den(*calib.model_inputs(x, 0, [0, 1])), fp)  # restored exactly


def test_runtime_rejects_what_it_cannot_run(lowered_inputs):
    from adatsq.backends.torch_runtime import lower_to_torch, step_callback
    from adatsq.passes.plan import Precision
    from adatsq.passes.transforms import StepClock

    tr, plan, idx, calib = lowered_inputs
    lat = plan.lattice + (Precision("W3A3", 3, 3),)
    rows = tuple(tuple("W3A3" if n != "FP16" else n for n in row) for row in plan.assignment)
    bad = PrecisionPlan(plan.model, plan.schedule, lat, plan.layers, rows, None, plan.achieved)
    with pytest.raises(InputError, match="no kernel for"):
        lower_to_torch(tr, bad, idx, StepClock(calib.num_steps))
    with pytest.raises(InputError, match="steps"):
        lower_to_torch(tr, plan, idx, StepClock(calib.num_steps + 1))
    with pytest.raises(InputError, match="no weights file"):
        lower_to_torch(tr, plan, None, StepClock(calib.num_steps))
    clock = StepClock(3)
    cb = step_callback(clock)
    assert cb(None, 0, None, {"a": 1}) == {"a": 1} and clock.step == 1
    cb(None, 2, None, {})
    assert clock.step == 2  # clamped at the last step


class _Block(torch.nn.Module):
    """A small stand-in for a DiT block: q/k/v share an input, an MLP, a 16-bit-only layer."""

    def __init__(self, d=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.gate = torch.nn.Linear(d, d)

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:]) * 1.5 + 0.1
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8, dim=-1) @ self.v(h)
        x = x + a * torch.sigmoid(self.gate(x))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


SCHEDULE = {  # 4 steps: every kernel, and layers that switch between them
    "q": ("w8a8", "w4a8", "w4a8", "w8a8"),  # INT8 activations at every step: the fused path
    "k": ("w8a8",) * 4,
    "v": ("fp8",) * 4,  # the FP8 path
    "up": ("w4a16", "w8a8", "fp", "w4a8"),  # the opaque path, 16-bit at one step
    "down": ("w4a8",) * 4,
    "gate": ("fp8", "w4f8", "w4f8", "fp8"),  # FP8 activations at every step: the fused FP8 path, INT4 weights
}


def _rtn_reference(block, x, step):
    """The schedule's numerics written with passes/quant.py's fake-quant ops."""
    from adatsq.passes.quant import fake_quant_tokens, fake_quant_tokens_fp8, fake_quant_weight_fp8, quantize_weight

    def op(name, mod, inp):
        kind = SCHEDULE.get(name, ("fp",) * 4)[step]
        w, b = mod.weight.detach(), mod.bias.detach()
        if kind == "fp":
            return torch.nn.functional.linear(inp, w, b)
        if kind == "fp8":
            return torch.nn.functional.linear(fake_quant_tokens_fp8(inp), fake_quant_weight_fp8(w), b)
        if kind == "w4f8":
            return torch.nn.functional.linear(fake_quant_tokens_fp8(inp), quantize_weight(w, 4).dequantize(), b)
        wq = quantize_weight(w, 8 if kind == "w8a8" else 4).dequantize()
        xq = inp if kind == "w4a16" else fake_quant_tokens(inp, 8)
        return torch.nn.functional.linear(xq, wq, b)

    h = torch.nn.functional.layer_norm(x, x.shape[-1:]) * 1.5 + 0.1
    a = torch.softmax(op("q", block.q, h) @ op("k", block.k, h).transpose(-1, -2) / 8, dim=-1) @ op("v", block.v, h)
    x = x + a * torch.sigmoid(op("gate", block.gate, x))
    return x + op("down", block.down, torch.nn.functional.gelu(op("up", block.up, x)))


def test_lower_linears_follows_the_schedule_and_compiles_once():
    """Eager: each step runs its kernels (= the fake-quant reference). Under torch.compile
    (fullgraph: no graph break) the step is data: one compilation serves all four steps, with the
    same outputs as eager."""
    from adatsq.backends.torch_runtime import PlanLinear, lower_linears
    from adatsq.passes.transforms import StepClock

    block = _Block()
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp = block(x)
        ref = [_rtn_reference(block, x, k) for k in range(4)]
    clock = StepClock(4)
    rt = lower_linears(block, SCHEDULE, clock)
    assert isinstance(block.q, PlanLinear) and isinstance(block.gate, PlanLinear)
    mem = rt.memory()
    assert mem["fp16_weight"] == block.up.weight.numel() * 4  # only "up" keeps its float weight (float32 here)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counting_backend, fullgraph=True)
    with torch.no_grad():
        for k in range(4):
            clock.step = k
            eager = block(x)
            # = the reference, but for at most one token row: the ops agree to ~5e-7 (summation
            # order), and where that moves a value across a rounding tie of a later per-token
            # quantization, one code of that token's row flips (step 1: token 5 of sample 1)
            off = ~torch.isclose(eager, ref[k], rtol=1e-4, atol=1e-4)
            assert int(off.any(-1).sum()) <= 1, (k, int(off.any(-1).sum()))
            assert not torch.allclose(eager, fp, atol=1e-3)
            assert torch.allclose(compiled(x), eager, rtol=1e-5, atol=1e-5), k
    assert len(compiles) == 1
    # the compiled graph calls the runtime's ops: the fused INT8 and FP8 paths and the opaque one
    targets = {str(n.target) for n in compiles[0].graph.nodes if n.op == "call_function"}
    assert all(any(op in t for t in targets) for op in ("quantized_linear", "plan_linear")), targets
    quantized = [n for n in compiles[0].graph.nodes if n.op == "call_function" and "quantized_linear" in str(n.target)]
    code_dtypes = {n.args[0].meta["example_value"].dtype for n in quantized}
    assert len(quantized) == 4 and code_dtypes == {torch.int8, torch.float8_e4m3fn}, code_dtypes  # q, k, down; gate
    rt.restore()
    with torch.no_grad():
        assert torch.equal(block(x), fp)


def test_lower_linears_rejects_bad_input():
    from adatsq.backends.torch_runtime import lower_linears
    from adatsq.passes.transforms import StepClock

    block = _Block()
    with pytest.raises(InputError, match="not a Linear"):
        lower_linears(block, {"nope": ("fp",) * 4}, StepClock(4))
    with pytest.raises(InputError, match="unknown kernel"):
        lower_linears(block, {"q": ("w2a2",) * 4}, StepClock(4))
    with pytest.raises(InputError, match="steps"):
        lower_linears(block, {"q": ("fp",) * 3}, StepClock(4))
    assert type(block.q) is torch.nn.Linear  # untouched


def test_e2e_benchmark_mixed_fp8_plan_is_the_mixed_plan_on_fp8_math():
    """benchmarks/gpu_e2e.py's ``mixed-fp8`` variant: the synthetic mixed plan with each INT8-activation
    kernel replaced by its FP8 twin (same weight widths, so the same weight memory)."""
    import importlib.util
    from pathlib import Path

    from adatsq.backends.torch_runtime import KINDS

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_e2e.py"
    spec = importlib.util.spec_from_file_location("gpu_e2e", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    names = ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"]
    base, fp8 = e2e.synthetic_plan(names, 6, 2), e2e.synthetic_plan(names, 6, 2, fp8=True)
    twin = {"w4a8": "w4f8", "w8a8": "fp8", "w4a16": "w4a16"}
    assert {k for p in fp8.values() for k in p} == {"w4a16", "w4f8", "fp8"} <= set(KINDS)
    assert all(fp8[n] == tuple(twin[k] for k in base[n]) for n in names)
    assert base["transformer_blocks.0.attn.to_q"] == ("w8a8",) * 2 + ("w4a8",) * 4
