"""NVFP4 as a lattice point: the reference numerics (FP4 E2M1 in blocks of 16 with E4M3 block
scales), GPTQ on its grid, the weight file, the plan's costs, and the backends that refuse it."""

import json

import pytest
import torch

from adatsq.errors import InputError, PlanError
from adatsq.passes.gptq import gptq, weighted_error
from adatsq.passes.plan import Budget, Precision, PrecisionPlan
from adatsq.passes.quant import (FP8_MAX, fake_quant_tokens, fake_quant_tokens_nvfp4, fake_quant_weight, fp4_e2m1,
                                 nvfp4_block, nvfp4_weight_scales, pack_fp4, quantize_weight, quantize_weight_nvfp4,
                                 unpack_fp4)
from adatsq.passes.search import check_budget, target_lattice

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def test_fp4_rounds_to_the_nearest_e2m1_value_ties_to_even():
    y = torch.linspace(-7.5, 7.5, 3001)
    q = fp4_e2m1(y)
    full = torch.cat([-GRID.flip(0), GRID])
    assert torch.isin(q, full).all()
    # nearest: no grid value is strictly closer than the one chosen (saturating beyond 6)
    dist = (y.clamp(-6, 6)[:, None] - full[None, :]).abs()
    assert torch.allclose((q - y.clamp(-6, 6)).abs(), dist.min(dim=1).values)
    # ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0])
    assert fp4_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0]


def test_nvfp4_weight_blocks_scales_and_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g) * 3
    q = quantize_weight_nvfp4(w)
    assert q.fmt == "nvfp4" and q.group_size == 16 and q.scales.shape == (24, 4)
    assert torch.isin(q.codes.abs(), torch.tensor([0, 1, 2, 3, 4, 6, 8, 12], dtype=torch.int8)).all()
    block = 2 * q.scales  # the stored scales are halved: codes are 2 v
    gscale = w.abs().amax() / (6 * FP8_MAX)
    # each block scale is an E4M3 number times the global scale, near max|block| / 6
    rel = block / gscale
    assert torch.equal(rel.to(torch.float8_e4m3fn).float(), rel)
    amax = w.reshape(24, 4, 16).abs().amax(-1)
    assert torch.allclose(block, amax / 6, rtol=2 ** -3)
    deq = q.dequantize()
    # every value within half the widest FP4 step (2 x scale) of its block; small values within 1/4 x scale
    step = block.repeat_interleave(16, dim=1)
    assert ((deq - w).abs() <= step + 1e-6).all()
    small = w.abs() < 2 * step
    assert ((deq - w).abs()[small] <= step[small] / 4 + 1e-6).all()
    # re-quantizing the dequantized weight with its scales is exact, the packed file form too
    assert torch.equal(quantize_weight_nvfp4(deq, block).codes, q.codes)
    assert torch.equal(unpack_fp4(pack_fp4(q.codes), (24, 64)), q.codes)
    assert torch.equal(fake_quant_weight(w, 4, fmt="nvfp4"), deq)
    assert torch.equal(quantize_weight(w, 4, 16, fmt="nvfp4").codes, q.codes)
    # closer than INT4 per channel, as the 16-wide blocks promise
    assert (deq - w).norm() < (fake_quant_weight(w, 4) - w).norm()


def test_nvfp4_blocks_edge_cases():
    assert nvfp4_block(64) == 16 and nvfp4_block(4) == 4
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_block(20)
    w = torch.zeros(3, 32)
    w[0, :16] = 1.0
    q = quantize_weight_nvfp4(w)
    assert torch.equal(q.dequantize(), w)  # an all-zero block has scale 0 and codes 0, no NaN
    with pytest.raises(ValueError, match="not twice FP4"):
        pack_fp4(torch.tensor([5], dtype=torch.int8))
    with pytest.raises(ValueError, match="4-bit format"):
        quantize_weight(w, 8, fmt="nvfp4")
    with pytest.raises(ValueError, match="unknown number format"):
        fake_quant_weight(w, 4, fmt="mxfp4")
    with pytest.raises(ValueError, match="blocks of 16"):
        quantize_weight(w, 4, 32, fmt="nvfp4")


def test_nvfp4_activations_per_token_and_block():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 64, generator=g) * torch.rand(64, generator=g) * 4
    y = fake_quant_tokens_nvfp4(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    # per token: a token's result does not depend on the rest of the batch
    assert torch.equal(fake_quant_tokens_nvfp4(x[1:2, 3:4]), y[1:2, 3:4])
    # a block's largest magnitude lands on 6 x its scale: within E4M3 rounding of itself
    xb, yb = x.reshape(3, 10, 4, 16), y.reshape(3, 10, 4, 16)
    assert torch.allclose(yb.abs().amax(-1), xb.abs().amax(-1), rtol=2 ** -3)
    assert (y - x).norm() < (fake_quant_tokens(x, 4) - x).norm()  # finer than INT4 per token
    assert torch.equal(fake_quant_tokens(x, 4, fmt="nvfp4"), y) and torch.equal(fake_quant_tokens(x, 16, fmt="nvfp4"), x)
    # a convolution's per-sample quantization blocks its channels
    c = torch.randn(2, 32, 3, 3, generator=g)
    yc = fake_quant_tokens(c, 4, dims=(1, 2, 3), fmt="nvfp4")
    assert torch.equal(yc, fake_quant_tokens_nvfp4(c.movedim(1, -1)).movedim(-1, 1))


def test_gptq_on_the_nvfp4_grid_beats_round_to_nearest():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3
    h = x.T @ x / x.shape[0]
    w = torch.randn(32, 64, generator=g)
    q = gptq(w, h, 4, fmt="nvfp4")
    rtn = quantize_weight_nvfp4(w)
    assert q.fmt == "nvfp4" and q.group_size == 16
    assert torch.equal(q.scales, rtn.scales)  # the scales are the original weight's
    assert torch.isin(q.codes.abs(), torch.tensor([0, 1, 2, 3, 4, 6, 8, 12], dtype=torch.int8)).all()
    assert weighted_error(w, q.dequantize(), h) < 0.8 * weighted_error(w, rtn.dequantize(), h)
    with pytest.raises(ValueError, match="blocks of 16"):
        gptq(w, h, 4, 64, fmt="nvfp4")


def test_precision_costs_json_and_lattice():
    nv = Precision("NVFP4", 4, 4, "nvfp4")
    assert (nv.w_cost, nv.a_cost) == (4.5, 4.5)
    assert (Precision("NVFP4A16", 4, 16, "nvfp4").a_cost, Precision("W4A4", 4, 4).w_cost) == (16.0, 4.0)
    assert "fmt" not in Precision("W4A4", 4, 4).to_json()  # integer points keep their plan files' form
    assert Precision(**nv.to_json()) == nv
    with pytest.raises(PlanError, match="NVFP4 has 4-bit weights"):
        Precision("X", 8, 8, "nvfp4")
    with pytest.raises(PlanError, match="unknown number format"):
        Precision("X", 4, 4, "mxfp4")
    lat = target_lattice("simulate", "FP16,NVFP4,W4A4,W8A8")
    assert [p.name for p in lat] == ["W4A4", "NVFP4", "W8A8", "FP16"]  # ordered by cost
    with pytest.raises(InputError, match="executes only"):
        target_lattice("tensorrt", "NVFP4")
    check_budget(lat, Budget(4.0, 4.0))
    with pytest.raises(InputError, match="infeasible budget"):  # NVFP4 costs 4.5: it cannot meet W4A4 alone
        check_budget(target_lattice("simulate", "NVFP4,FP16"), Budget(4.0, 4.0))


def test_plan_averages_count_the_block_scales(tmp_path):
    from adatsq.frontend.architectures import BUILTINS
    from adatsq.frontend.export import export_model
    from adatsq.frontend.layers import LayerTable
    from adatsq.frontend.schedule import default_schedule
    from adatsq.passes.plan import fingerprint_model

    model = BUILTINS["tiny-dit"].tiny(seed=0)
    table = LayerTable.from_graph(export_model(model))
    lat = target_lattice("simulate", "W4A4,NVFP4,FP16")
    names = table.names
    assignment = (tuple("NVFP4" for _ in names), tuple("W4A4" for _ in names))
    plan = PrecisionPlan(fingerprint_model(model), default_schedule("DiTTransformer2DModel", 2), lat, tuple(names),
                         assignment, Budget(4.25, 4.25), PrecisionPlan.averages(assignment, lat, names, table))
    assert plan.achieved == Budget(4.25, 4.25)
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert [p.get("fmt", "int") for p in data["lattice"]] == ["int", "nvfp4", "int"]
    assert PrecisionPlan.load(tmp_path / "plan.json") == plan


def test_weight_file_holds_nvfp4_copies_and_backends_refuse_them(tmp_path):
    from adatsq.passes.weights import GPTQWeights, load_weight_copies
    from tests.test_analysis import _tiny_setup

    den, graph, calib = _tiny_setup()
    params = dict(den.transformer.named_parameters())
    from adatsq.frontend.layers import LayerTable

    table = LayerTable.from_graph(graph)
    reqs = {p: [(4, None), (4, None, "nvfp4")] for p in table.names}
    path = tmp_path / "w.safetensors"
    GPTQWeights(den.transformer, reqs, path, hessian="none")(graph)
    idx = load_weight_copies(path)
    for p in reqs:
        w = params[p].detach().float().reshape(params[p].shape[0], -1)
        got = idx.find(p, 4, "nvfp4")
        want = quantize_weight_nvfp4(w)
        assert got.fmt == "nvfp4" and torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
        assert torch.equal(idx.find(p, 4).codes, quantize_weight(w, 4).codes)  # the INT4 copy beside it
    with pytest.raises(InputError, match="NVFP4 copies are 4-bit"):
        GPTQWeights(den.transformer, {next(iter(reqs)): [(8, None, "nvfp4")]}, tmp_path / "x.safetensors",
                    hessian="none")
    assert not (tmp_path / "x.safetensors").exists()

    # no deployment backend runs NVFP4 (simulate only): clear errors, not integer kernels on FP4 codes
    from adatsq.backends.onnx_qdq import LoweringError, check_lowerable
    from adatsq.backends.torch_runtime import lower_to_torch
    from adatsq.passes.plan import fingerprint_graph
    from adatsq.passes.transforms import StepClock

    lat = target_lattice("simulate", "NVFP4,FP16")
    plan = PrecisionPlan.uniform(table, fingerprint_graph(graph), calib.schedule, "NVFP4", lattice=lat)
    with pytest.raises(LoweringError, match="no ONNX Q/DQ lowering"):
        check_lowerable(plan)
    with pytest.raises(InputError, match="runs at NVFP4, which the torch runtime has no kernel for"):
        lower_to_torch(den.transformer, plan, idx, StepClock(calib.schedule.num_steps))


def test_memory_view_counts_one_fp8_scale_per_nvfp4_block():
    from types import SimpleNamespace

    from adatsq.tools.build import plan_memory

    w = torch.zeros(32, 64)
    plan = SimpleNamespace(lattice=(Precision("NVFP4", 4, 4, "nvfp4"),), layers=("l.weight",),
                           assignment=(("NVFP4",),))
    mem = plan_memory(plan, {"l.weight": w}, {"l.weight": [(4, 16, "nvfp4")]}, None)
    # 4-bit codes plus one byte per block of 16: 4.5 bits a weight
    assert mem["quantized_copies_bytes"] == 32 * 64 // 2 + 32 * 4 == w.numel() * 4.5 / 8
    assert mem["ratio_to_fp16"] == round(4.5 / 16, 4)
