"""Analysis passes: trajectory capture, statistics/Hessians, temporal Fisher, sensitivity, caching.

A tiny class-conditional Flux (one double + one single block, hidden 32) in the flux-fmnist
wrapper, 2 classes x 2 seeds, 3 steps, CFG: every quantity is checked against an explicit
computation (per-row autograd for Fisher, explicit ``X^T X`` for Hessians).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from adatsq.errors import InputError
from adatsq.frontend.architectures import Resolution
from adatsq.frontend.export import export_model
from adatsq.frontend.reference import ClassConditioner, FluxFMNIST
from adatsq.frontend.schedule import default_schedule
from adatsq.passes.analysis import (ActivationStatistics, ActivationStats, AnalysisContext, AnalysisOptions,
                                    FisherProfile, FisherScores, HessianRef, Sensitivity, SensitivityCheck,
                                    TemporalFisher, analyze, layer_groups, layer_nodes, normalise_alpha,
                                    output_node, replay_inputs, spearman)
from adatsq.passes.annotations import encode, get_annotation
from adatsq.passes.calibration import CalibrationSet
from adatsq.passes.capture import capture, input_tokens, layer_modules, per_sample_weight_grad_sqnorm
from adatsq.passes.infra import PreconditionError

STEPS = 3
FAST = dict(sensitivity_samples=2, e2e_steps=2, e2e_per_step=2, precisions=("W4A4", "W8A8"))


def _tiny_denoiser(seed: int = 0) -> FluxFMNIST:
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    cond = ClassConditioner(3, 4, 16, 16)
    with torch.no_grad():
        cond.tokens.normal_()
        cond.pooled.normal_()
    return FluxFMNIST(tr, cond).eval()


def _tiny_setup(steps: int = 3, **calib_kw) -> tuple[FluxFMNIST, object, CalibrationSet]:
    """The tiny denoiser, its exported graph and a calibration set (2 classes x seeds 5, 6, CFG 2.0)."""
    den = _tiny_denoiser()
    graph = export_model(den.transformer, Resolution(height=32, width=32, text_len=4, batch=2))
    calib = CalibrationSet(den, [torch.tensor(0), torch.tensor(1)], (5, 6),
                           default_schedule("FluxTransformer2DModel", steps, 2.0), **calib_kw)
    return den, graph, calib


@pytest.fixture(scope="module")
def tiny():
    return _tiny_setup(STEPS, batch=3)


def _run(tiny, tmp_path=None, **kw):
    _, graph, calib = tiny
    opts = AnalysisOptions(**{**FAST, **kw})
    return analyze(graph, calib, opts, cache_dir=tmp_path, checkpoint_every_s=0)


@pytest.fixture(scope="module")
def per_step(tiny):
    return _run(tiny, hessian="per_step")


def _explicit_inputs(den, calib, lat, t, param):
    """Every row the layer multiplies at step t, over all samples (one batch, CFG doubled), float64."""
    mod = layer_modules(den.transformer, [param])
    rows = []
    idx = list(range(calib.num_samples))
    with torch.no_grad(), capture(mod, lambda p, m, i, o: rows.append(input_tokens(m, i))):
        den(*calib.model_inputs(lat[t], t, idx))
    x = torch.cat(rows, dim=1)
    return x.reshape(-1, x.shape[-1]).double()


# --------------------------------------------------------------------------- Hessians and stats
def test_hessians_equal_explicit_per_step(tiny, per_step):
    den, _, calib = tiny
    lat = per_step.results["trajectory"]
    hess = per_step.results["hessians"]
    for param in ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight",
                  "time_text_embed.timestep_embedder.linear_1.weight", "x_embedder.weight"):
        ref = hess[param]
        assert ref.mode == "per_step" and len(ref.slots) == STEPS
        for t in range(STEPS):
            x = _explicit_inputs(den, calib, lat, t, param)
            want = x.T @ x
            got = ref.sums()[t]
            assert ref.counts[t] == x.shape[0]
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), param


def test_replay_inputs_match(tiny, per_step):
    den, _, calib = tiny
    lat = per_step.results["trajectory"]
    p = "single_transformer_blocks.0.proj_out.weight"
    got = replay_inputs(calib, lat, 1, [p])[p]
    assert torch.allclose(got.double(), _explicit_inputs(den, calib, lat, 1, p))
    assert replay_inputs(calib, lat, 1, [p], samples=[0])[p].shape[0] == got.shape[0] // calib.num_samples


def test_stats_equal_explicit(tiny, per_step):
    den, _, calib = tiny
    lat = per_step.results["trajectory"]
    param = "transformer_blocks.0.ff.net.2.weight"
    st: ActivationStats = per_step.results["stats"][param]
    for t in range(STEPS):
        x = _explicit_inputs(den, calib, lat, t, param).float()
        assert torch.allclose(st.channel_absmax[t], x.abs().amax(0), rtol=1e-6)
        per_tok = x.abs().amax(1)
        assert torch.allclose(st.token_absmax[t], torch.stack([per_tok.min(), per_tok.mean(), per_tok.max()]),
                              rtol=1e-5)
        assert float(st.tokens[t]) == x.shape[0]


def test_weighted_and_grouped_hessians_combine_per_step_ones(tiny, per_step):
    weighted = _run(tiny, hessian="weighted")
    grouped = _run(tiny, hessian="grouped", step_groups=2)
    alpha = weighted.results["fisher"]["alpha"]
    names = weighted.table.names
    for param in ("transformer_blocks.0.attn.to_k.weight", "proj_out.weight"):
        per = per_step.results["hessians"][param].sums()
        w = weighted.results["hessians"][param].sums()
        a = alpha[:, names.index(param)]
        assert torch.allclose(w[0], per.sum(0), rtol=1e-10)
        assert torch.allclose(w[1], (a[:, None, None] * per).sum(0), rtol=1e-10)
        g = grouped.results["hessians"][param]
        assert g.slots == ((0, 1), (2,))
        assert torch.allclose(g.sums()[0], per[0] + per[1], rtol=1e-10)
        assert torch.allclose(g.sums()[1], per[2], rtol=1e-10)
    # alpha: mean 1 over steps for every layer
    assert torch.allclose(alpha.mean(0), torch.ones(alpha.shape[1], dtype=alpha.dtype))


def test_token_subsampling_and_chunking(tiny, per_step, tmp_path):
    sub = _run(tiny, hessian="per_step", hessian_tokens=50)
    ref = sub.results["hessians"]["transformer_blocks.0.attn.to_q.weight"]
    # batches of 3 samples (6 rows with CFG, 256 image tokens each) then 1 sample: 50 tokens per call
    assert ref.counts == (100.0,) * STEPS
    full = per_step.results["hessians"]["transformer_blocks.0.attn.to_q.weight"].sums()
    assert not torch.allclose(ref.sums(), full)
    # chunking the layers to a tiny Hessian budget replays per chunk and gives the same sums
    chunked = _run(tiny, tmp_path, hessian="per_step", max_hessian_bytes=200_000)
    assert chunked.memory_plan["hessian_chunks"] > 2
    for p, h in per_step.results["hessians"].items():
        c = chunked.results["hessians"][p]
        assert c.path  # large-model mode: matrices stay in the cache file
        assert torch.allclose(c.sums(), h.sums(), rtol=1e-12), p
    # Hessians for a subset of layers only (streaming a big model block by block); stats for all
    some = _run(tiny, hessian="per_step", hessian_layers=r"attn\.to_q")
    assert set(some.results["hessians"]) == {p for p in per_step.table.names if "attn.to_q" in p}
    assert set(some.results["stats"]) == set(per_step.table.names)
    q = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(some.results["hessians"][q].sums(), per_step.results["hessians"][q].sums())


# --------------------------------------------------------------------------- Fisher
def test_fisher_equals_per_row_autograd(tiny, per_step):
    den, _, calib = tiny
    fisher = per_step.results["fisher"]
    lat = per_step.results["trajectory"]
    names = per_step.table.names
    checked = ("transformer_blocks.0.attn.to_v.weight", "single_transformer_blocks.0.proj_mlp.weight",
               "time_text_embed.timestep_embedder.linear_2.weight", "proj_out.weight")
    mods = dict(den.transformer.named_modules())
    n = calib.num_samples
    for t in range(STEPS):
        x2, s2, c2 = calib.model_inputs(lat[t], t, list(range(n)))
        target = lat[0] - lat[-1]
        u2 = torch.cat([target, target])
        sq_w = {p: 0.0 for p in checked}
        sq_y = {p: 0.0 for p in checked}
        for r in range(x2.shape[0]):  # one row at a time: the plain definition of per-sample gradients
            outs = {}
            hooks = [mods[p[:-7]].register_forward_hook(lambda m, a, o, p=p: outs.__setitem__(p, o)) for p in checked]
            v = den(x2[r:r + 1], s2[r:r + 1], c2[r:r + 1])
            for h in hooks:
                h.remove()
            loss = (v - u2[r:r + 1]).square().mean()
            weights = [mods[p[:-7]].weight for p in checked]
            gw = torch.autograd.grad(loss, weights + [outs[p] for p in checked])
            for i, p in enumerate(checked):
                sq_w[p] += float(gw[i].double().square().sum())
                sq_y[p] += float(gw[len(checked) + i].double().square().sum())
        for p in checked:
            col = names.index(p)
            rows = x2.shape[0]
            assert fisher["weight"][t, col].item() == pytest.approx(sq_w[p] / rows, rel=1e-4), (p, t)
            assert fisher["output"][t, col].item() == pytest.approx(sq_y[p] / rows, rel=1e-4), (p, t)


def test_latent_fisher_weighting(tiny, per_step):
    lat = _run(tiny, fisher_weighting="latent")
    sig = per_step.results["sigmas"]
    d2 = (sig[1:] - sig[:-1]) ** 2
    want = normalise_alpha(per_step.results["fisher"]["weight"] * d2[:, None])
    assert torch.allclose(lat.results["fisher"]["alpha"], want)
    assert not torch.allclose(want, per_step.results["fisher"]["alpha"])


def test_per_sample_grad_norm_both_forms():
    g = torch.Generator().manual_seed(0)
    for t, k, o in ((3, 8, 5), (40, 4, 3)):  # Gram form, then explicit form
        x, gr = torch.randn(4, t, k, generator=g), torch.randn(4, t, o, generator=g)
        want = torch.stack([(gr[b].double().T @ x[b].double()).square().sum() for b in range(4)])
        assert torch.allclose(per_sample_weight_grad_sqnorm(x, gr), want, rtol=1e-5)


def test_normalise_alpha_and_temperature():
    s = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    a = normalise_alpha(s)
    assert torch.allclose(a[:, 0], torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.allclose(a[:, 1], torch.ones(2, dtype=torch.float64))  # no gradient: uniform
    hot = normalise_alpha(s, temperature=2.0)[:, 0]
    assert float(hot[1] / hot[0]) == pytest.approx(3 ** 0.5)


# --------------------------------------------------------------------------- sensitivity
def test_sensitivity_and_end_to_end_check(tiny, per_step):
    sens = per_step.results["sensitivity"]
    err = sens["error"]
    assert err.shape == (len(sens["groups"]), 2, STEPS)
    assert (err > 0).all()
    # W8A8 is less harmful than W4A4 in (almost) every cell
    assert float((err[:, 1] < err[:, 0]).double().mean()) > 0.9
    chk: SensitivityCheck = sens["check"]
    assert len(chk.triples) == 4 and all(e > 0 for e in chk.end_to_end)
    # at the last step nothing follows: the end-to-end error *is* the one-step latent error
    for (g, t, p), e2e, vel in zip(chk.triples, chk.end_to_end, chk.velocity_proxy):
        if t == STEPS - 1:
            assert e2e == pytest.approx(vel, rel=1e-3)


def test_layer_groups(per_step):
    table = per_step.table
    by_block = layer_groups(table, "block")
    assert "transformer_blocks.0" in by_block and "time_embed" in by_block
    by_role = layer_groups(table, "role")
    assert set(by_role["transformer_blocks.0/attn_q"]) == {"transformer_blocks.0.attn.to_q.weight",
                                                           "transformer_blocks.0.attn.add_q_proj.weight"}
    assert len(layer_groups(table, "layer")) == len(table)
    for groups in (by_block, by_role):
        assert sorted(p for ps in groups.values() for p in ps) == sorted(table.names)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)


# --------------------------------------------------------------------------- annotations
def test_annotations_on_graph_and_onnx_encoding(tiny):
    _, graph, _ = tiny
    per_step = _run(tiny, hessian="per_step")  # the graph is shared: its annotations are the last run's
    nodes = layer_nodes(graph)
    assert set(nodes) == set(per_step.table.names)
    for param, ns in nodes.items():
        for node in ns:
            f = get_annotation(node, FisherScores)
            assert f is not None and f.param == param and len(f.alpha) == STEPS
            assert get_annotation(node, ActivationStats) is not None
            h = get_annotation(node, HessianRef)
            assert h.param == param and h.sums().shape[0] == STEPS
            assert get_annotation(node, Sensitivity).param == param
            enc = encode(node.meta)
            assert "adatsq.fisher" in enc and "adatsq.sensitivity" in enc
            assert "adatsq.stats" not in enc and "adatsq.hessian" not in enc  # tensors stay off ONNX
    prof = get_annotation(output_node(graph), FisherProfile)
    assert len(prof.weight) == STEPS and prof.max_min_ratio >= 1


# --------------------------------------------------------------------------- cache, resume, determinism
def _assert_same(a, b):
    assert a.summary() == b.summary()
    for p, h in a.results["hessians"].items():
        assert torch.equal(h.sums(), b.results["hessians"][p].sums()), p
    for p, s in a.results["stats"].items():
        assert torch.equal(s.channel_absmax, b.results["stats"][p].channel_absmax), p


def test_deterministic_and_cached(tiny, tmp_path):
    first = _run(tiny, tmp_path)
    assert all(v > 0 for v in first.computed.values())
    again = _run(tiny, tmp_path)
    assert all(v == 0 for v in again.computed.values()), again.computed  # everything from the cache
    _assert_same(first, again)
    fresh = _run(tiny)  # no cache at all: same numbers
    _assert_same(first, fresh)


def test_cancelled_run_resumes(tiny, tmp_path):
    _, graph, calib = tiny
    opts = AnalysisOptions(**FAST)

    class Cancel(Exception):
        pass

    def cancel_after_two(stage, done, total):
        if stage == "fisher" and done == 2:
            raise Cancel

    with pytest.raises(Cancel):
        analyze(graph, calib, opts, cache_dir=tmp_path, progress=cancel_after_two, checkpoint_every_s=0)
    partial = list(tmp_path.rglob("fisher-*.partial.safetensors"))
    assert len(partial) == 1
    resumed = analyze(graph, calib, opts, cache_dir=tmp_path, checkpoint_every_s=0)
    assert resumed.computed["trajectory"] == 0  # finished before the cancel
    assert resumed.computed["fisher"] == STEPS - 2  # only the missing steps
    assert not list(tmp_path.rglob("*.partial.safetensors"))
    _assert_same(resumed, analyze(graph, calib, opts))


def test_changed_options_do_not_reuse_wrong_results(tiny, tmp_path):
    a = _run(tiny, tmp_path)
    b = _run(tiny, tmp_path, precisions=("W3A3", "W8A8"))
    assert b.computed["fisher"] == STEPS and b.computed["sensitivity"] == STEPS
    assert b.computed["trajectory"] == 0
    assert not torch.equal(a.results["fisher"]["proxy"], b.results["fisher"]["proxy"])


# --------------------------------------------------------------------------- bad input
def test_bad_inputs(tiny):
    den, graph, calib = tiny
    with pytest.raises(InputError, match="hessian mode"):
        AnalysisOptions(hessian="diag").validate()
    with pytest.raises(InputError, match="precision"):
        AnalysisOptions(precisions=("W5A5",)).validate()
    with pytest.raises(InputError, match="not a regex"):
        AnalysisOptions(hessian_layers="(").validate()
    with pytest.raises(InputError, match="step groups"):
        AnalysisOptions(hessian="grouped", step_groups=9).validate(calib)
    with pytest.raises(InputError, match="seeds repeat"):
        CalibrationSet(den, [torch.tensor(0)], (1, 1), calib.schedule)
    other = _tiny_denoiser(seed=1)
    other_calib = dataclasses.replace(calib, denoiser=other)
    with pytest.raises(InputError, match="not exported from"):
        analyze(graph, other_calib, AnalysisOptions(**FAST))
    ctx = AnalysisContext(calib, AnalysisOptions(**FAST))
    with pytest.raises(PreconditionError, match="CaptureTrajectory"):
        TemporalFisher(ctx)(graph)
    ctx.results["trajectory"] = torch.zeros(1)
    with pytest.raises(PreconditionError, match="TemporalFisher"):
        ActivationStatistics(ctx)(graph)  # weighted Hessians need alpha


def test_nan_model_is_a_clear_error():
    den = _tiny_denoiser()
    with torch.no_grad():
        den.transformer.proj_out.weight[0, 0] = float("nan")
    graph2 = export_model(den.transformer, Resolution(height=32, width=32, text_len=4, batch=2))
    calib = CalibrationSet(den, [torch.tensor(0)], (1,), default_schedule("FluxTransformer2DModel", 2, 2.0))
    with pytest.raises(InputError, match="NaN"):
        analyze(graph2, calib, AnalysisOptions(**FAST))


def test_conv_patches_match_convolution():
    g = torch.Generator().manual_seed(0)
    conv2 = nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 7, generator=g)
    xs = input_tokens(conv2, x)
    y = xs @ conv2.weight.reshape(5, -1).T + conv2.bias
    assert torch.allclose(y, conv2(x).flatten(2).transpose(1, 2), atol=1e-5)
    conv3 = nn.Conv3d(4, 6, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    x3 = torch.randn(2, 4, 3, 8, 6, generator=g)
    y3 = input_tokens(conv3, x3) @ conv3.weight.reshape(6, -1).T + conv3.bias
    assert torch.allclose(y3, conv3(x3).flatten(2).transpose(1, 2), atol=1e-5)
