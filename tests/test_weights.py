"""The GPTQ weight-copy pass: exact copies, streamed one layer at a time, written atomically."""

import pytest
import torch

from adatsq.errors import InputError
from adatsq.passes.analysis import AnalysisOptions, HessianRef, analyze, layer_nodes
from adatsq.passes.annotations import get_annotation
from adatsq.passes.gptq import gptq
from adatsq.passes.quant import pack_int4, quantize_weight, unpack_int4
from adatsq.passes.weights import GPTQWeights, WeightCopies, load_weight_copies
from adatsq.tools.io import stream_safetensors
from tests.test_analysis import _tiny_setup


@pytest.fixture(scope="module")
def analysed():
    den, graph, calib = _tiny_setup()
    res = analyze(graph, calib, AnalysisOptions(hessian="weighted"), passes=("trajectory", "fisher", "stats"))
    layers = [i.param for i in res.table if i.kind == "linear"]
    return den, graph, layers


def _requests(den, layers):
    params = dict(den.transformer.named_parameters())
    return {p: [(4, None), (8, None)] + ([(3, 16)] if params[p].shape[1] % 16 == 0 else []) for p in layers}


def test_copies_equal_gptq_with_the_fisher_hessian_and_round_trip(analysed, tmp_path):
    den, graph, layers = analysed
    reqs = _requests(den, layers)
    path = tmp_path / "w.safetensors"
    GPTQWeights(den.transformer, reqs, path, hessian="fisher")(graph)
    idx = load_weight_copies(path)
    params = dict(den.transformer.named_parameters())
    nodes = layer_nodes(graph)
    assert idx.hessian == "fisher" and len(idx.copies) == sum(len(v) for v in reqs.values())
    for p in layers:
        h = get_annotation(nodes[p][0], HessianRef)
        for bits, group in reqs[p]:
            got = idx.get(p, bits, group)
            want = gptq(params[p].detach().float(), h.mean(1), bits, group)
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales), (p, bits, group)
            assert torch.equal(got.dequantize(), want.dequantize())
        wc = get_annotation(nodes[p][0], WeightCopies)
        assert wc.file == str(path) and len(wc.copies) == len(reqs[p]) and wc.hessian == "fisher"
    with pytest.raises(InputError, match="no 5-bit copy"):
        idx.get(layers[0], 5)


def test_uniform_gptq_copies_beat_rtn_and_none_is_rtn(analysed, tmp_path):
    den, graph, layers = analysed
    reqs = {p: [(3, None)] for p in layers}
    GPTQWeights(den.transformer, reqs, tmp_path / "u.safetensors", hessian="uniform")(graph)
    nodes = layer_nodes(graph)
    errs = [get_annotation(nodes[p][0], WeightCopies) for p in layers]
    assert all(e.error[0] <= e.rtn_error[0] * (1 + 1e-9) for e in errs)
    assert sum(e.error[0] < e.rtn_error[0] for e in errs) >= len(errs) - 1
    GPTQWeights(den.transformer, reqs, tmp_path / "n.safetensors", hessian="none")(graph)
    idx = load_weight_copies(tmp_path / "n.safetensors")
    params = dict(den.transformer.named_parameters())
    for p in layers:
        assert torch.equal(idx.get(p, 3).codes, quantize_weight(params[p].detach().float(), 3).codes)


def test_streaming_reads_each_hessian_once_in_graph_order(analysed, tmp_path, monkeypatch):
    den, graph, layers = analysed
    seen = []
    orig = HessianRef.sums
    monkeypatch.setattr(HessianRef, "sums", lambda self: (seen.append(self.param), orig(self))[1])
    written = []
    import adatsq.passes.weights as weights_mod

    real = weights_mod.GPTQWeights._layer_copies

    def spy(self, graph):
        for name, t in real(self, graph):
            written.append((len(seen), name))
            yield name, t

    monkeypatch.setattr(weights_mod.GPTQWeights, "_layer_copies", spy)
    GPTQWeights(den.transformer, {p: [(4, None)] for p in layers}, tmp_path / "s.safetensors")(graph)
    assert seen == [p for p in layer_nodes(graph) if p in layers]  # once each, in graph order
    # every layer's tensors are written before the next layer's Hessian is read
    for i, p in enumerate(seen):
        assert {n for k, n in written if k == i + 1} == {f"{p}@w4.codes", f"{p}@w4.scales"}


def test_bad_input_fails_clearly_and_leaves_nothing(analysed, tmp_path):
    den, graph, layers = analysed
    with pytest.raises(InputError, match="not integer-quantizable"):
        GPTQWeights(den.transformer, {layers[0]: [(9, None)]}, tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="does not divide"):
        GPTQWeights(den.transformer, {layers[0]: [(4, 7)]}, tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="not a parameter"):
        GPTQWeights(den.transformer, {"nope.weight": [(4, None)]}, tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="unknown Hessian"):
        GPTQWeights(den.transformer, {}, tmp_path / "x.safetensors", hessian="diagonal")
    # a NaN weight in the last layer: an error naming it, and no file (not even a temporary one)
    last = layers[-1]
    w = dict(den.transformer.named_parameters())[last]
    saved = w.data.clone()
    try:
        w.data[0, 0] = float("nan")
        with pytest.raises(InputError, match=f"{last} has NaN"):
            GPTQWeights(den.transformer, {p: [(4, None)] for p in layers}, tmp_path / "nan.safetensors")(graph)
    finally:
        w.data.copy_(saved)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_weight_copies(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="not an adatsq weights file"):
        load_weight_copies(tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="no such weights file"):
        load_weight_copies(tmp_path / "missing.safetensors")


def test_pack_int4_round_trip():
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 5), (4, 8), (1,)):
        codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
        packed = pack_int4(codes)
        assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() + 1) // 2
        assert torch.equal(unpack_int4(packed, shape), codes)
    assert int(pack_int4(torch.tensor([1, -1], dtype=torch.int8))[0]) == 0xF1  # first element in the low nibble
    with pytest.raises(ValueError, match="outside"):
        pack_int4(torch.tensor([8]))


def test_stream_safetensors_checks_what_comes(tmp_path):
    from safetensors.torch import load_file

    specs = [("a", torch.float32, (2, 3)), ("b", torch.int8, (4,))]
    a, b = torch.randn(2, 3), torch.arange(4, dtype=torch.int8)
    stream_safetensors(tmp_path / "ok.safetensors", specs, iter([("a", a), ("b", b)]), {"k": "v"})
    got = load_file(str(tmp_path / "ok.safetensors"))
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    for bad in ([("b", b), ("a", a)], [("a", a)], [("a", a.double()), ("b", b)]):
        with pytest.raises(ValueError, match="stream_safetensors"):
            stream_safetensors(tmp_path / "bad.safetensors", specs, iter(bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"]


def test_precomputed_copies_are_written_as_given_and_preps_round_trip(analysed, tmp_path):
    from adatsq.passes.weights import LayerPrep

    den, graph, layers = analysed
    params = dict(den.transformer.named_parameters())
    p = layers[1]
    w = params[p].detach().float()
    o, k = w.shape
    g = torch.Generator().manual_seed(3)
    prep = LayerPrep(torch.rand(k, generator=g) + 0.5, (torch.randn(o, 2, generator=g), torch.randn(2, k, generator=g)))
    given = quantize_weight(prep.residual(w), 4)  # RTN of the residual, handed in as if the search made it
    path = tmp_path / "p.safetensors"
    GPTQWeights(den.transformer, {p: [(4, None), (8, None)]}, path, hessian="fisher", prep={p: prep},
                precomputed={(p, 4, None): given})(graph)
    idx = load_weight_copies(path)
    assert torch.equal(idx.get(p, 4).codes, given.codes)  # reused, not recomputed
    h = get_annotation(layer_nodes(graph)[p][0], HessianRef)
    want8 = gptq(prep.residual(w), prep.hessian(h.mean(1)), 8)  # computed: GPTQ of the residual in x/s units
    assert torch.equal(idx.find(p, 8).codes, want8.codes)
    back = idx.prep(p)
    assert torch.equal(back.smooth, prep.smooth) and all(torch.equal(a, b) for a, b in zip(back.low_rank, prep.low_rank))
    assert idx.prep(layers[0]) is None
    with pytest.raises(InputError, match="shapes do not fit"):
        GPTQWeights(den.transformer, {p: [(4, None)]}, tmp_path / "bad.safetensors",
                    prep={p: LayerPrep(torch.ones(k + 1), None)})
    # the residual plus the branch is the smoothed weight: x W^T = (x/s) residual^T + ((x/s) B^T) A^T
    x = torch.randn(5, k, generator=g)
    y = (x / prep.smooth) @ prep.residual(w).T + ((x / prep.smooth) @ prep.low_rank[1].T) @ prep.low_rank[0].T
    assert torch.allclose(y, x @ w.T, atol=1e-4)


def test_fisher_mix_tempers_the_weighted_hessian():
    import torch

    from adatsq.passes.weights import mix_hessians

    u, f = torch.eye(3), torch.diag(torch.tensor([3.0, 1.0, 0.0]))
    assert torch.equal(mix_hessians(u, f, 1.0), f) and torch.equal(mix_hessians(u, f, 0.0), u)
    assert torch.allclose(mix_hessians(u, f, 0.25), 0.75 * u + 0.25 * f)
    with pytest.raises(InputError, match="Fisher mix"):
        GPTQWeights(torch.nn.Linear(4, 4), {"weight": [(4, None)]}, "/nonexistent/w.safetensors", fisher_mix=1.5)
