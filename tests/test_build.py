"""``adatsq build``'s pieces that run without the full model: options, the stage cache, device moves."""

import pytest
import torch

from adatsq.errors import InputError
from adatsq.passes.plan import Budget
from adatsq.passes.transforms import LayerTransform, transforms_to
from adatsq.passes.weights import LayerPrep
from adatsq.tools.build import BuildCache, BuildOptions, plan_memory, plan_policy
from tests.test_search import analysed_tiny  # noqa: F401 - the module fixture


@pytest.mark.parametrize("bad, msg", [(dict(budget="W1A1"), "infeasible budget"), (dict(weights="awq"), "unknown weights"),
                                      (dict(base="hqq"), "unknown base"), (dict(policy="random"), "unknown policy"),
                                      (dict(rank=-2), "rank and group size"), (dict(search_samples=0), "samples"),
                                      (dict(target="tpu"), "unknown target"),
                                      (dict(target="simulate", budget="W3A3", lattice="W4A4,W8A8"), "infeasible budget W3A3"),
                                      (dict(lattice="W4A4"), "executes only"),
                                      (dict(groups="head"), "unknown layer grouping"),
                                      (dict(target="simulate", lattice="W4A4,W8A8", memory_bits=3), "infeasible memory")])
def test_build_options_fail_before_any_work(bad, msg):
    with pytest.raises(InputError, match=msg):
        BuildOptions(**bad).validate()
    BuildOptions().validate()


def test_each_target_has_a_feasible_default_budget():
    from adatsq.tools.build import DEFAULT_BUDGETS, group_max_bits

    assert BuildOptions().target == "onnxruntime" and BuildOptions().resolved().budget == "W6A12"
    assert BuildOptions(target="simulate").resolved().budget == "W4A4"
    assert BuildOptions(budget="W8A8").resolved().budget == "W8A8"  # a given budget is kept
    # the lattice is spelled canonically, so two spellings share the caches
    assert BuildOptions(target="simulate", lattice="w4a4,W2A4, W4A2").resolved().lattice == "W2A4,W4A2,W4A4"
    assert BuildOptions(target="simulate", lattice="W2A4,W4A4").search_options().points()[0].name == "W2A4"
    for target in DEFAULT_BUDGETS:
        BuildOptions(target=target).validate()
    with pytest.raises(InputError, match="infeasible budget W4A4"):  # the deployment lattice has no 4-bit activations
        BuildOptions(budget="W4A4").validate()
    assert group_max_bits("simulate") == 8 and group_max_bits("tensorrt") == 4 == group_max_bits("onnxruntime")


def test_stage_cache_round_trips_and_distrusts_damaged_entries(analysed_tiny, tmp_path):  # noqa: F811
    from adatsq.passes.analysis import layer_nodes
    from adatsq.passes.annotations import get_annotation
    from adatsq.passes.search import LayerPrecision, SearchOptions, search_plan

    graph, calib, res = analysed_tiny
    cache = BuildCache(tmp_path / "c")
    assert cache.load_prep() is None and cache.load_search(graph) is None
    g = torch.Generator().manual_seed(0)
    prep = {"a.weight": LayerPrep(torch.rand(8, generator=g), (torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g))),
            "b.weight": LayerPrep(torch.rand(4, generator=g), None)}
    cache.save_prep(prep)
    back = cache.load_prep()
    assert set(back) == set(prep) and back["b.weight"].low_rank is None
    assert torch.equal(back["a.weight"].smooth, prep["a.weight"].smooth)
    assert torch.equal(back["a.weight"].low_rank[0], prep["a.weight"].low_rank[0])
    plan, sres, groups = search_plan(graph, calib, res.results["trajectory"], Budget(4.0, 4.0),
                                     SearchOptions(beam=2, samples=2, policy="per-step"))
    assert all(len(set(row)) == 1 for row in plan.assignment)  # per-step: one precision for all layers at a step
    cache.save_search(plan, sres, groups)
    for nodes in layer_nodes(graph).values():  # wipe the annotations: loading writes them again
        for n in nodes:
            n.meta.pop("adatsq.precision", None)
    plan2, sres2, groups2 = cache.load_search(graph)
    assert plan2 == plan and sres2.policy == sres.policy and sres2.front == [tuple(f) for f in sres.front]
    assert groups2 == groups
    p0, nodes0 = next(iter(layer_nodes(graph).items()))
    assert get_annotation(nodes0[0], LayerPrecision).per_step == tuple(plan.precision(t, p0).name
                                                                        for t in range(len(plan.assignment)))
    params = dict(calib.denoiser.transformer.named_parameters())
    by_name = {q.name: q for q in plan.lattice}
    reqs = {p: [(b, None) for b in sorted({by_name[r[i]].w_bits for r in plan.assignment} - {16})]
            for i, p in enumerate(plan.layers)}
    mem = plan_memory(plan, params, reqs, None)
    want = sum((params[p].numel() * b + 7) // 8 + 2 * params[p].shape[0] for p, v in reqs.items() for b, _ in v)
    assert mem["quantized_copies_bytes"] == want and mem["low_rank_and_smoothing_bytes"] == 0
    assert mem["total_bytes"] == want + mem["fp16_layers_bytes"]
    assert mem["fp16_model_bytes"] == sum(2 * params[p].numel() for p in plan.layers)
    share = plan_policy(plan)
    assert share["distinct_step_assignments"] >= 1 and abs(sum(share["precision_share"].values()) - 1) < 1e-3
    # damaged entries are recomputed, not trusted
    (tmp_path / "c" / "search.json").write_text("{not json")
    assert cache.load_search(graph) is None
    (tmp_path / "c" / "prep.safetensors").write_bytes(b"\x00" * 10)
    assert cache.load_prep() is None
    (tmp_path / "c" / "weights.safetensors").write_bytes(b"junk")
    assert cache.copy_weights(tmp_path / "out" / "w.safetensors") is False
    assert not (tmp_path / "out" / "w.safetensors").exists()
    nocache = BuildCache(None)
    nocache.save_prep(prep)
    assert nocache.load_prep() is None and nocache.copy_weights(tmp_path / "x") is False


def test_transforms_move_to_a_device_keeping_their_sharing():
    w = torch.randn(4, 8)
    t1 = LayerTransform(w, 4, smooth=torch.rand(8) + 0.5, low_rank=(torch.randn(4, 2), torch.randn(2, 8)))
    t2 = LayerTransform(w * 2, 8)
    moved = transforms_to({"x.weight": [t1, t1, t2], "y.weight": t2}, "meta")
    xs = moved["x.weight"]
    assert xs[0] is xs[1] and xs[2] is moved["y.weight"]  # one moved object per distinct transform
    assert xs[0].weight.device.type == "meta" and xs[0].smooth.device.type == "meta"
    assert xs[0].low_rank[1].device.type == "meta" and xs[0].a_bits == 4
    same = transforms_to({"x.weight": t1}, "cpu")["x.weight"]
    x = torch.randn(3, 8)
    assert torch.equal(same(x, None), t1(x, None))
    with pytest.raises(TypeError, match="cannot move"):
        transforms_to({"x.weight": lambda x, b: x}, "cpu")


def test_eval_device_is_checked_before_any_work():
    from adatsq.tools.evaluate import EvalConfig

    with pytest.raises(InputError, match="only cpu and cuda"):
        EvalConfig(device="meta").validate()
    with pytest.raises(InputError, match="unknown device"):
        EvalConfig(device="warp-drive").validate()
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            EvalConfig(device="cuda").validate()
    EvalConfig(device="cpu").validate()


def test_build_device_is_checked_before_any_work():
    from adatsq.tools.build import BuildOptions

    with pytest.raises(InputError, match="build: device 'meta': only cpu and cuda"):
        BuildOptions(target="simulate", device="meta").validate()
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="build: device 'cuda' requested but torch sees no CUDA"):
            BuildOptions(target="simulate", device="cuda").validate()
    BuildOptions(target="simulate", device="cpu").validate()


@pytest.mark.gpu
def test_search_on_the_gpu_matches_the_cpu_search(analysed_tiny):  # noqa: F811
    """The search's samples on a GPU: a forced W8A8 policy scores what it scores on the CPU (8-bit
    codes barely flip between the two), a free search stays within its budget, and the model is
    back on the CPU afterwards (the weight pass runs there)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from adatsq.passes.search import SearchOptions, search_plan

    graph, calib, res = analysed_tiny
    lat = res.results["trajectory"]
    forced = SearchOptions(beam=2, samples=4, lattice=("W8A8", "FP16"))
    _, cpu, _ = search_plan(graph, calib, lat, Budget(8.0, 8.0), forced)
    _, gpu, _ = search_plan(graph, calib, lat, Budget(8.0, 8.0), forced, device="cuda")
    assert gpu.error == pytest.approx(cpu.error, rel=1e-2) and gpu.policy == cpu.policy
    plan, out, _ = search_plan(graph, calib, lat, Budget(4.0, 4.0), SearchOptions(beam=2, samples=16), device="cuda")
    assert plan.achieved.w_bits <= 4.0 + 1e-9 and plan.achieved.a_bits <= 4.0 + 1e-9 and out.evaluations > 0
    assert all(t.device.type == "cpu" for t in calib.denoiser.parameters())


def test_build_plots_are_written(tmp_path, analysed_tiny):  # noqa: F811
    from adatsq.passes.search import SearchOptions, search_plan
    from adatsq.tools.build import plot_pareto, plot_plan

    graph, calib, res = analysed_tiny
    plan, sres, groups = search_plan(graph, calib, res.results["trajectory"], Budget(4.0, 4.0),
                                     SearchOptions(beam=2, samples=2, sensitivity="analysis"))
    plot_plan(plan, groups, tmp_path / "plan.png")
    plot_pareto(sres, tmp_path / "pareto.png")
    for f in ("plan.png", "pareto.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png", "plan.png"]  # no temporary files left


def _tiny_plan(graph, calib, precision="W4A4", budget=Budget(4.0, 4.0)):
    from adatsq.frontend.layers import LayerTable
    from adatsq.passes.plan import PrecisionPlan, fingerprint_graph
    from adatsq.passes.search import TARGETS

    return PrecisionPlan.uniform(LayerTable.from_graph(graph), fingerprint_graph(graph), calib.schedule, precision,
                                 lattice=TARGETS["simulate"], budget=budget)


def test_from_plan_options_take_the_plans_lattice_and_budget_and_check_them(analysed_tiny, tmp_path):  # noqa: F811
    from adatsq.errors import PlanError

    graph, calib, _ = analysed_tiny
    path = tmp_path / "plan.json"
    _tiny_plan(graph, calib).save(path)
    opts = BuildOptions(target="simulate", from_plan=str(path))
    opts.validate()
    r = opts.resolved()
    assert r.budget == "W4A4" and r.lattice == "W3A3,W4A4,W4A8,W8A8,FP16"
    assert BuildOptions(target="simulate", budget="W5A5", from_plan=str(path)).resolved().budget == "W5A5"
    # a plan without a budget is held to what it achieves
    _tiny_plan(graph, calib, budget=None).save(tmp_path / "nobudget.json")
    assert BuildOptions(target="simulate", from_plan=str(tmp_path / "nobudget.json")).resolved().budget == "W4A4"
    with pytest.raises(InputError, match="runs W4A4, which target onnxruntime"):
        BuildOptions(target="onnxruntime", from_plan=str(path)).validate()
    with pytest.raises(InputError, match="runs W4A4, which target simulate with lattice W3A3, W8A8"):
        BuildOptions(target="simulate", lattice="W3A3,W8A8", from_plan=str(path)).validate()
    with pytest.raises(InputError, match=r"averages W4.000 A4.000, over the budget W3 A3"):
        BuildOptions(target="simulate", budget="W3A3", from_plan=str(path)).validate()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="bad.json"):
        BuildOptions(target="simulate", from_plan=str(tmp_path / "bad.json")).validate()
    with pytest.raises(PlanError, match="missing.json"):
        BuildOptions(target="simulate", from_plan=str(tmp_path / "missing.json")).validate()


def test_weights_of_a_given_plan_equal_the_copies_the_search_scored(analysed_tiny, tmp_path):  # noqa: F811
    """`--from-plan` skips the search, so its GPTQ copies are made by the weights pass alone: they
    must be the very copies the search made and scored (same Hessian, same residual)."""
    from safetensors.torch import load_file

    from adatsq.passes.search import SearchOptions, layer_transform_factory, search_plan
    from adatsq.passes.weights import GPTQWeights

    graph, calib, res = analysed_tiny
    tr = calib.denoiser.transformer
    make = layer_transform_factory(tr, graph, "gptq-fisher", group_size=8, fisher_mix=0.5)
    plan, _, _ = search_plan(graph, calib, res.results["trajectory"], Budget(5.0, 6.0),
                             SearchOptions(beam=2, samples=2), make)
    by_name = {q.name: q for q in plan.lattice}
    params = dict(tr.named_parameters())
    requests = {}
    for i, p in enumerate(plan.layers):
        bits = sorted({by_name[r[i]].w_bits for r in plan.assignment} - {16})
        g = 8 if params[p].reshape(params[p].shape[0], -1).shape[1] % 8 == 0 else None
        if bits:
            requests[p] = [(b, g) for b in bits]
    assert requests and set(make.copies) >= {(p, b, g, "int") for p, v in requests.items() for b, g in v}
    for name, pre in (("scored", make.copies), ("fresh", None)):
        GPTQWeights(tr, requests, tmp_path / f"{name}.safetensors", hessian="fisher", precomputed=pre,
                    fisher_mix=0.5)(graph)
    a, b = load_file(str(tmp_path / "scored.safetensors")), load_file(str(tmp_path / "fresh.safetensors"))
    assert a.keys() == b.keys() and len(a) >= 2 * len(requests)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_from_plan_notes_options_that_differ_from_the_plans_build(tmp_path):
    import json

    from adatsq.tools.build import given_plan_differences

    (tmp_path / "plan.json").write_text("{}")
    opts = BuildOptions(target="simulate", from_plan=str(tmp_path / "plan.json"))
    assert given_plan_differences(opts) == []  # no report beside the plan: nothing to compare
    (tmp_path / "report.json").write_text("{broken")
    assert given_plan_differences(opts) == []
    (tmp_path / "report.json").write_text(json.dumps(dict(options=dict(target="simulate", rank=16, beam=9))))
    notes = given_plan_differences(opts)
    assert len(notes) == 1 and "rank 16 (now 32)" in notes[0] and "beam" not in notes[0]
