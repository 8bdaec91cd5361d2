"""GPTQ: exact format, lower output error than RTN, and Fisher weighting."""

import pytest
import torch

from adatsq.passes.gptq import GPTQOptions, gptq, weighted_error
from adatsq.passes.quant import fake_quant_weight, qmax, quantize_weight


def _layer(seed=0, o=48, k=64, n=2048):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few outlier channels, as transformer activations have
    z = torch.randn(n, k, generator=g)
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g)
    x = z @ mix * torch.where(torch.rand(k, generator=g) < 0.1, 8.0, 1.0)
    w = torch.randn(o, k, generator=g) / k ** 0.5
    return w, x


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [None, 16])
def test_gptq_beats_rtn_on_output_error(bits, group):
    w, x = _layer(bits)
    h = x.double().T @ x.double() / x.shape[0]
    qw = gptq(w, h, bits, group)
    assert qw.bits == bits and qw.codes.shape == w.shape
    assert int(qw.codes.max()) <= qmax(bits) and int(qw.codes.min()) >= -qmax(bits) - 1
    # the result is exactly on the reference grid with the static max-abs scales
    assert torch.equal(qw.scales, quantize_weight(w, bits, group).scales)
    out_gptq = ((w - qw.dequantize()) @ x.T).square().sum()
    out_rtn = ((w - fake_quant_weight(w, bits, group)) @ x.T).square().sum()
    assert out_gptq < out_rtn, (float(out_gptq), float(out_rtn))
    assert weighted_error(w, qw.dequantize(), h) == pytest.approx(float(out_gptq) / x.shape[0], rel=1e-4)


def test_gptq_options_and_errors():
    w, x = _layer(1)
    h = x.T @ x / x.shape[0]
    a = gptq(w, h, 4, options=GPTQOptions(act_order=False, block_size=7)).dequantize()
    b = gptq(w, h, 4, options=GPTQOptions(act_order=False, block_size=128)).dequantize()
    assert torch.allclose(a, b, atol=1e-5)  # lazy block updates do not change the result
    dead = h.clone()
    dead[3, :] = 0
    dead[:, 3] = 0
    assert torch.all(gptq(w, dead, 4).dequantize()[:, 3] == 0)  # an input that never fires
    with pytest.raises(ValueError, match="does not match"):
        gptq(w, h[:10, :10], 4)
    with pytest.raises(ValueError, match="NaN"):
        gptq(w, h * float("nan"), 4)
    with pytest.raises(ValueError, match="damping"):
        GPTQOptions(damp=0).validate()


def test_weighted_hessian_fits_where_weighted():
    """GPTQ with a step-weighted Hessian has lower error under that weighting than GPTQ with the
    uniform Hessian: the AdaTSQ calibration on a two-'step' toy."""
    w, x1 = _layer(2)
    _, x2 = _layer(3)
    h1, h2 = x1.T @ x1 / len(x1), x2.T @ x2 / len(x2)
    uniform, weighted = (h1 + h2) / 2, 0.1 * h1 + 1.9 * h2
    q_u = gptq(w, uniform, 3).dequantize()
    q_w = gptq(w, weighted, 3).dequantize()
    assert weighted_error(w, q_w, weighted) < weighted_error(w, q_u, weighted)
    assert weighted_error(w, q_u, uniform) < weighted_error(w, q_w, uniform)


def test_fisher_weighted_gptq_on_analysis_hessians():
    """On a tiny Flux analysed over 3 steps, both GPTQ variants fitted on the analysis Hessians
    cut the H'-weighted error of RTN several-fold, and the eval variants' weights come out of the
    same path. (Whether the Fisher-weighted H' beats the uniform H under H' itself is measured,
    not asserted: here it does not, by 4% summed over layers; see docs.)"""
    from adatsq.passes.analysis import AnalysisOptions, analyze
    from adatsq.passes.transforms import transformed_layers
    from adatsq.tools.baselines import method_transforms
    from tests.test_analysis import _tiny_setup

    den, graph, calib = _tiny_setup()
    res = analyze(graph, calib, AnalysisOptions(), passes=("trajectory", "fisher", "stats"))
    hess = res.results["hessians"]
    layers = [p for p in res.table.names if p != "x_embedder.weight"]
    t_f = method_transforms(den.transformer, "gptq-fisher", 3, 8, layers, res, calib)
    q_u = {p: t.weight for p, t in method_transforms(den.transformer, "gptq", 3, 8, layers, res, calib).items()}
    q_f = {p: t.weight for p, t in t_f.items()}
    mods = dict(den.transformer.named_modules())
    w = {p: mods[p[:-7]].weight.data.float() for p in layers}
    e_ff = sum(weighted_error(w[p], q_f[p], hess[p].mean(1)) for p in layers)
    e_fu = sum(weighted_error(w[p], q_u[p], hess[p].mean(1)) for p in layers)
    e_fr = sum(weighted_error(w[p], fake_quant_weight(w[p], 3), hess[p].mean(1)) for p in layers)
    assert e_ff < e_fr / 4 and e_fu < e_fr / 4
    before = {p: t.clone() for p, t in w.items()}
    x = torch.randn(5, w[layers[0]].shape[1])
    first = mods[layers[0][:-7]]
    with transformed_layers(den.transformer, t_f):
        assert torch.equal(first(x), t_f[layers[0]](x, first.bias))  # the layer runs the GPTQ weight
    assert all(torch.equal(mods[p[:-7]].weight.data, before[p]) for p in layers)
    assert all("forward" not in mods[p[:-7]].__dict__ for p in layers)
