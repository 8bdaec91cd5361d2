"""Smoothing, rotation and low-rank transforms: exact when unquantized, helpful when quantized."""

import pytest
import torch
from torch import nn

from adatsq.passes.quant import fake_quant_tokens, fake_quant_weight
from adatsq.passes.transforms import (LayerTransform, block_hadamard, hadamard, low_rank_split, search_smoothing,
                                      smoothing_scales, StepClock, transformed_layers,
                                      transformed_weight)


def _outlier_layer(seed=0, n=512, k=64, o=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, :3] *= 30  # a few outlier channels, as in transformer activations
    w = torch.randn(o, k, generator=g) / k ** 0.5
    return x, w


def test_float_equivalence_of_every_transform():
    x, w = _outlier_layer()
    s = smoothing_scales(x.abs().amax(0), w, 0.5)
    r = block_hadamard(64)
    a, b, res = low_rank_split(transformed_weight(w, s, r), 8)
    tr = LayerTransform(weight=res, a_bits=16, smooth=s, rotation=r, low_rank=(a, b))
    bias = torch.randn(32)
    assert torch.allclose(tr(x, bias), x @ w.T + bias, atol=1e-3, rtol=1e-4)


def test_hadamard_is_orthonormal():
    for n in (1, 2, 8, 64):
        h = hadamard(n)
        assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6)
    bh = block_hadamard(192)  # 192 = 3 x 64
    assert bh.shape == (192, 192) and torch.allclose(bh @ bh.T, torch.eye(192), atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


def test_smoothing_and_rotation_reduce_w4a4_error():
    x, w = _outlier_layer(1)
    ref = x @ w.T
    plain = (fake_quant_tokens(x, 4) @ fake_quant_weight(w, 4).T - ref).square().sum()
    alpha, s, rel = search_smoothing(x, w, 4, 4)
    smoothed = (fake_quant_tokens(x / s, 4) @ fake_quant_weight(w * s, 4).T - ref).square().sum()
    assert 0 < alpha <= 1 and smoothed < plain / 2
    assert rel == pytest.approx(float(smoothed / ref.square().sum()), rel=1e-4)
    r = block_hadamard(64)
    rotated = (fake_quant_tokens(x @ r, 4) @ fake_quant_weight(w @ r, 4).T - ref).square().sum()
    assert rotated < plain / 2


def test_low_rank_split_is_exact_and_optimal():
    _, w = _outlier_layer(2)
    a, b, res = low_rank_split(w, 4)
    assert a.shape == (32, 4) and b.shape == (4, 64)
    assert torch.allclose(a @ b + res, w, atol=1e-5)
    sv = torch.linalg.svdvals(w)
    assert float(res.square().sum()) == pytest.approx(float(sv[4:].square().sum()), rel=1e-4)


def test_transformed_layers_patch_and_restore():
    lin = nn.Linear(8, 4)
    model = nn.Sequential(lin)
    x = torch.randn(3, 8)
    before = model(x)
    tr = LayerTransform(weight=torch.zeros(4, 8), a_bits=16)
    with transformed_layers(model, {"0.weight": tr}):
        assert torch.allclose(model(x), lin.bias.expand(3, 4))
    assert torch.equal(model(x), before) and "forward" not in lin.__dict__


def test_every_baseline_method_is_exact_at_16_bits_and_lossy_below():
    """Each eval method's transforms on a tiny analysed Flux: at W16A16 the model output is
    unchanged (smoothing, rotation and low rank are exact re-parametrisations); at W4A4 it is not,
    and the outlier-handling methods beat RTN."""
    from adatsq.passes.analysis import AnalysisOptions, analyze
    from adatsq.tools.baselines import METHODS, method_transforms
    from tests.test_analysis import _tiny_setup

    den, graph, calib = _tiny_setup()
    res = analyze(graph, calib, AnalysisOptions(), passes=("trajectory", "fisher", "stats"))
    layers = [i.param for i in res.table if i.kind == "linear"]
    x, sig, cond = calib.model_inputs(res.results["trajectory"][1], 1, [0, 1, 2, 3])
    clock = StepClock(calib.num_steps)
    clock.on_step(0)  # the inputs are step 1's
    with torch.no_grad():
        ref = den(x, sig, cond)
        err4 = {}
        for method in METHODS:
            exact = method_transforms(den.transformer, method, 16, 16, layers, res, calib)
            assert set(exact) == set(layers)
            with transformed_layers(den.transformer, exact, clock):
                assert torch.allclose(den(x, sig, cond), ref, atol=2e-4), method
            with transformed_layers(den.transformer, method_transforms(den.transformer, method, 4, 4, layers,
                                                                       res, calib), clock):
                err4[method] = float((den(x, sig, cond) - ref).square().mean())
        assert torch.equal(den(x, sig, cond), ref)  # everything restored
    assert all(e > 0 for e in err4.values())
    assert err4["quarot"] < err4["rtn"] and err4["svdquant"] < err4["rtn"]


def test_per_step_transforms_follow_the_clock():
    from adatsq.errors import InputError

    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    ws = [torch.randn(4, 8) for _ in range(3)]
    per_step = [LayerTransform(w, 16) for w in ws]
    clock = StepClock(3)
    with torch.no_grad(), transformed_layers(lin, {"weight": per_step}, clock):
        for k in range(3):
            assert torch.allclose(lin(x), x @ ws[k].T + lin.bias)
            clock.on_step(k)
        clock.reset()
        assert torch.allclose(lin(x), x @ ws[0].T + lin.bias)
    assert "forward" not in vars(lin)
    with pytest.raises(InputError, match="StepClock"):
        with transformed_layers(lin, {"weight": per_step}):
            pass
    with pytest.raises(InputError, match="3 per-step transforms for a 5-step schedule"):
        with transformed_layers(lin, {"weight": per_step}, StepClock(5)):
            pass
    assert "forward" not in vars(lin)


def test_stepwise_smoothing_beats_one_static_smoothing_when_outliers_move():
    from adatsq.passes.transforms import _smoothed_error, search_stepwise_smoothing

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    xs = []
    for step in range(2):  # the outlier channels differ from step to step
        x = torch.randn(256, 64, generator=g)
        x[:, step * 8:(step + 1) * 8] *= 40
        xs.append(x)
    ams = [x.abs().amax(0) for x in xs]
    alpha, rel = search_stepwise_smoothing(xs, ams, w, 4, 4)
    assert 0 <= alpha <= 1 and rel > 0
    stepwise = sum(_smoothed_error(x, w, smoothing_scales(am, w, alpha), 4, 4, x @ w.T) for x, am in zip(xs, ams))
    static_am = torch.stack(ams).amax(0)
    static = min(sum(_smoothed_error(x, w, smoothing_scales(static_am, w, a / 10), 4, 4, x @ w.T) for x in xs)
                 for a in range(11))
    assert stepwise < static


def test_qdit_group_allocation_respects_the_scale_budget():
    from adatsq.tools.baselines import qdit_group_sizes

    g = torch.Generator().manual_seed(0)
    ws, hs = {}, {}
    for i, k in enumerate((512, 256, 384)):
        w = torch.randn(16, k, generator=g)
        x = torch.randn(512, k, generator=g)
        if i == 1:  # a block of tiny weights on large inputs: rounded to 0 unless a group isolates it
            w[:, :32] *= 0.05
            x[:, :32] *= 20
        ws[f"l{i}.weight"], hs[f"l{i}.weight"] = w, x.T @ x
    cost = lambda gs: sum(ws[p].shape[0] * (1 if gs[p] is None else ws[p].shape[1] // gs[p]) for p in ws)
    budget64 = sum(w.shape[0] * (w.shape[1] // 64) for w in ws.values())
    gs = qdit_group_sizes(ws, hs, 4)
    assert cost(gs) <= budget64 and set(gs.values()) - {None, 128, 64, 32} == set()
    assert gs["l1.weight"] == 32
    assert set(qdit_group_sizes(ws, hs, 4, budget_group=10 ** 6).values()) == {None}  # no budget: per channel
    assert set(qdit_group_sizes(ws, hs, 4, budget_group=32).values()) == {32}  # everything affordable
