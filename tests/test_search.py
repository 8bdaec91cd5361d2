"""The beam search: exact on separable problems, never over budget, clear on infeasible budgets."""

import itertools

import numpy as np
import pytest

from adatsq.errors import InputError
from adatsq.passes.plan import Budget, Precision
from adatsq.passes.search import Costs, allocation_candidates, beam_search

LATTICE = (Precision("W3A3", 3, 3), Precision("W4A4", 4, 4), Precision("W8A8", 8, 8))


def _toy(seed, S=4, G=2):
    rng = np.random.default_rng(seed)
    # separable: the error of a policy is the sum of e[t, g, p]; higher precision errs less
    base = rng.uniform(0.5, 2.0, size=(S, G, 1)) * np.array([1.0, 0.3, 0.01])[None, None, :]
    costs = Costs(params=tuple(rng.uniform(1, 3, G)), macs=tuple(rng.uniform(1, 3, G)))
    return base, costs


def _brute(e, costs, budget):
    S, G, P = e.shape
    best = (np.inf, None)
    for flat in itertools.product(range(P), repeat=S * G):
        pol = tuple(tuple(flat[t * G:(t + 1) * G]) for t in range(S))
        avg = costs.averages(pol, LATTICE)
        if avg.w_bits <= budget.w_bits + 1e-9 and avg.a_bits <= budget.a_bits + 1e-9:
            err = sum(e[t, g, pol[t][g]] for t in range(S) for g in range(G))
            if err < best[0]:
                best = (err, pol)
    return best


def _search(e, costs, budget, beam):
    S, G, P = e.shape
    all_asg = list(itertools.product(range(P), repeat=G))

    def step_fn(state, k, asgs):
        return [(state + sum(e[k, g, a[g]] for g in range(G)), state + sum(e[k, g, a[g]] for g in range(G)))
                for a in asgs]

    return beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=beam)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [Budget(4.0, 4.0), Budget(5.0, 4.5), Budget(3.5, 6.0)])
def test_beam_search_finds_the_optimum_of_a_separable_problem(seed, budget):
    e, costs = _toy(seed)
    want_err, want_pol = _brute(e, costs, budget)
    res = _search(e, costs, budget, beam=10 ** 6)  # the Pareto front is never trimmed: exact
    assert res.error == pytest.approx(want_err, rel=1e-12)
    assert res.achieved.w_bits <= budget.w_bits + 1e-9 and res.achieved.a_bits <= budget.a_bits + 1e-9
    narrow = _search(e, costs, budget, beam=2)  # a narrow beam: feasible, maybe worse, never better
    assert narrow.error >= want_err - 1e-12
    assert narrow.achieved.w_bits <= budget.w_bits + 1e-9 and narrow.achieved.a_bits <= budget.a_bits + 1e-9


def test_budget_is_never_exceeded_and_the_front_is_pareto():
    e, costs = _toy(7, S=6, G=3)
    for w in (3.0, 3.4, 4.0, 5.5, 8.0):
        res = _search(e, costs, Budget(w, w), beam=3)
        assert res.achieved.w_bits <= w + 1e-9 and res.achieved.a_bits <= w + 1e-9
        assert len(res.policy) == 6 and all(len(a) == 3 for a in res.policy)
        for (b1, e1), (b2, e2) in zip(res.front, res.front[1:]):
            assert b1 <= b2 and e1 > e2  # sorted by bits, each more bits buys less error
    assert _search(e, costs, Budget(3.0, 3.0), beam=3).policy == ((0, 0, 0),) * 6  # only all-W3A3 fits


def test_infeasible_budgets_and_bad_beam_fail_before_any_work():
    e, costs = _toy(0)
    calls = []

    def step_fn(state, k, asgs):
        calls.append(k)
        return [(state, 0.0) for _ in asgs]

    with pytest.raises(InputError, match="infeasible budget W2A4"):
        beam_search(4, LATTICE, costs, Budget(2.0, 4.0), lambda k: [(0, 0)], step_fn, 0.0)
    with pytest.raises(InputError, match="beam width"):
        beam_search(4, LATTICE, costs, Budget(4.0, 4.0), lambda k: [(0, 0)], step_fn, 0.0, beam=0)
    with pytest.raises(InputError, match="infeasible memory budget of 2.5 bits"):
        beam_search(4, LATTICE, costs, Budget(4.0, 4.0), lambda k: [(0, 0)], step_fn, 0.0, memory_bits=2.5)
    assert calls == []


def test_allocation_candidates_respect_their_levels():
    rng = np.random.default_rng(0)
    G = 5
    errors = rng.uniform(0.1, 1.0, size=(G, 1)) * np.array([1.0, 0.3, 0.01])[None, :]
    costs = Costs(params=tuple(rng.uniform(1, 3, G)), macs=tuple(rng.uniform(1, 3, G)))
    budget = Budget(4.0, 4.0)
    cands = allocation_candidates(errors, LATTICE, costs, budget, levels=(0.8, 1.0, 1.25))
    assert (1,) * G in cands and (0,) * G in cands  # uniform W4A4 and W3A3 fit 1.25 x W4A4
    assert (2,) * G not in cands  # W8A8 does not
    for c in cands:
        avg = costs.averages([c], LATTICE)
        assert avg.w_bits <= 1.25 * 4 + 1e-9 and avg.a_bits <= 1.25 * 4 + 1e-9
    at_budget = [c for c in cands if costs.averages([c], LATTICE).w_bits <= 4 + 1e-9]
    # the greedy allocation at 1.0 x budget errs no more than uniform W4A4
    best = min(sum(errors[g, c[g]] for g in range(G)) for c in at_budget)
    assert best <= errors[:, 1].sum() + 1e-12


@pytest.fixture(scope="module")
def analysed_tiny():
    from adatsq.passes.analysis import AnalysisOptions, analyze
    from tests.test_analysis import _tiny_setup

    den, graph, calib = _tiny_setup()
    res = analyze(graph, calib, AnalysisOptions(sensitivity_samples=2, e2e_steps=0, groups="block",
                                                precisions=("W3A3", "W4A4", "W4A8", "W8A8")))
    return graph, calib, res


def test_search_plan_on_a_tiny_model(analysed_tiny):
    from adatsq.passes.analysis import layer_nodes
    from adatsq.passes.annotations import get_annotation
    from adatsq.passes.plan import PrecisionPlan
    from adatsq.passes.search import LayerPrecision, SearchOptions, search_plan

    graph, calib, res = analysed_tiny
    lat = res.results["trajectory"]
    for budget in (Budget(4.0, 4.0), Budget(5.0, 6.0)):
        plan, out, groups = search_plan(graph, calib, lat, budget, SearchOptions(beam=2, samples=3))
        assert plan.achieved.w_bits <= budget.w_bits + 1e-9 and plan.achieved.a_bits <= budget.a_bits + 1e-9
        assert len(plan.assignment) == calib.num_steps and out.evaluations > 0
        assert PrecisionPlan.from_json(plan.to_json()) == plan
        for p, nodes in layer_nodes(graph).items():
            lp = get_annotation(nodes[0], LayerPrecision)
            assert lp.per_step == tuple(plan.precision(t, p).name for t in range(calib.num_steps))
    # a budget at the lattice's cheapest point leaves one policy: found without measuring anything else
    plan, out, _ = search_plan(graph, calib, lat, Budget(3.0, 3.0), SearchOptions(beam=2, samples=2))
    assert {n for row in plan.assignment for n in row} == {"W3A3"} and out.evaluations == calib.num_steps
    with pytest.raises(InputError, match="infeasible budget W2A2"):
        search_plan(graph, calib, lat, Budget(2.0, 2.0))
    with pytest.raises(Exception, match="did not measure W4A16"):
        search_plan(graph, calib, lat, Budget(4.0, 16.0), SearchOptions(target="tensorrt"))
    # a chosen lattice: the plan draws from it only and records it
    plan, _, _ = search_plan(graph, calib, lat, Budget(6.0, 6.0), SearchOptions(beam=2, samples=2,
                                                                                lattice=("w8a8", "W4A4")))
    assert [p.name for p in plan.lattice] == ["W4A4", "W8A8"]
    assert {n for row in plan.assignment for n in row} <= {"W4A4", "W8A8"}
    assert plan.achieved.w_bits <= 6.0 + 1e-9 and plan.achieved.a_bits <= 6.0 + 1e-9
    with pytest.raises(Exception, match="did not measure W2A4"):
        search_plan(graph, calib, lat, Budget(3.0, 3.0), SearchOptions(lattice=("W2A4", "W4A2", "W3A3")))
    # W4A8 and W8A8 cannot run under W3A3 with nothing below 3 activation bits: forced to W3A3
    plan, out, _ = search_plan(graph, calib, lat, Budget(3.0, 3.0), SearchOptions(beam=2, samples=2,
                                                                                lattice=("W3A3", "W4A8", "W8A8")))
    assert {n for row in plan.assignment for n in row} == {"W3A3"} and out.evaluations == calib.num_steps
    # an unusable point below the budget on one axis does not open the door to another (W4A8
    # needs a point under 4 weight bits... W3A3 is the only usable one): the ablation policies too
    for policy in ("uniform", "per-step", "per-layer", "dynamic"):
        plan, _, _ = search_plan(graph, calib, lat, Budget(3.5, 3.0), SearchOptions(
            beam=2, samples=2, policy=policy, lattice=("W3A3", "W4A4", "W4A8")))
        assert {n for row in plan.assignment for n in row} == {"W3A3"}, policy


def test_usable_points_need_a_point_below_the_budget_on_each_axis_they_exceed():
    from adatsq.passes.search import target_lattice, usable_points

    def names(points, budget):
        lat = target_lattice("simulate", points)
        return [lat[i].name for i in usable_points(lat, budget)]

    assert names(None, Budget(3.0, 3.0)) == ["W3A3"]
    assert names(None, Budget(4.0, 4.0)) == ["W3A3", "W4A4", "W4A8", "W8A8", "FP16"]
    assert names("W2A4,W3A3,W3A8,W4A4,FP16", Budget(3.0, 3.0)) == ["W3A3"]
    assert names("W2A3,W3A3,W3A8,W4A4", Budget(3.0, 3.0)) == ["W2A3", "W3A3"]  # no point below A3
    assert names("W2A3,W3A2,W3A8,W4A4", Budget(3.0, 3.0)) == ["W2A3", "W3A2", "W3A8", "W4A4"]
    # W2A16 is below the weight budget, but only usable if something is below A3: then W8A8 is too
    assert names("W2A16,W3A3,W8A8", Budget(3.0, 3.0)) == ["W3A3"]
    assert names("W2A16,W3A2,W8A8", Budget(3.0, 3.0)) == ["W2A16", "W3A2", "W8A8"]


def test_target_lattice_takes_named_points():
    from adatsq.passes.search import TARGETS, target_lattice

    assert target_lattice("simulate") == TARGETS["simulate"]
    names = lambda t, pts: [p.name for p in target_lattice(t, pts)]  # noqa: E731
    assert names("simulate", "w4a4, W2A4,W4A2,fp16,W4A4") == ["W2A4", "W4A2", "W4A4", "FP16"]
    assert names("simulate", ["W3A3", "W16A16"]) == ["W3A3", "FP16"]
    assert names("onnxruntime", "FP16,W8A8") == ["W8A8", "FP16"]
    for target, pts, msg in [("simulate", "W5A5", "not WxAy"), ("simulate", " , ", "at least one"),
                             ("simulate", "int4", "not WxAy"), ("onnxruntime", "W4A4", "executes only"),
                             ("tensorrt", "W4A8", "executes only")]:
        with pytest.raises(InputError, match=msg):
            target_lattice(target, pts)


def test_model_step_fn_reproduces_the_fp_trajectory_at_16_bits(analysed_tiny):
    from adatsq.passes.search import SwitchableLayers, model_step_fn, target_lattice
    from adatsq.passes.transforms import LayerTransform, transformed_layers

    graph, calib, res = analysed_tiny
    lat = res.results["trajectory"]
    tr = calib.denoiser.transformer
    lattice = target_lattice("simulate")
    linears = [n + ".weight" for n, m in tr.named_modules() if isinstance(m, __import__("torch").nn.Linear)]
    params = dict(tr.named_parameters())
    switch = SwitchableLayers({p: {"FP16": LayerTransform(params[p].detach().float(), 16)} for p in linears})
    fn = model_step_fn(calib, switch, {"all": linears}, lattice, lat, [0, 3])
    x = lat[0, [0, 3]]
    with transformed_layers(tr, switch.transforms()):
        for k in range(calib.num_steps):
            ((x, err),) = fn(x, k, [(4,)])  # lattice[4] is FP16
            assert err < 1e-10, (k, err)


def test_static_policies_repeat_their_first_assignment():
    e, costs = _toy(1)
    S, G, P = e.shape
    all_asg = list(itertools.product(range(P), repeat=G))

    def step_fn(state, k, asgs):
        return [(state + sum(e[k, g, a[g]] for g in range(G)),) * 2 for a in asgs]

    budget = Budget(4.5, 4.5)
    res = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=10 ** 6, static=True)
    assert len(set(res.policy)) == 1  # one assignment at every step
    # exact over static policies: the best single assignment repeated S times within budget
    feasible = [a for a in all_asg if costs.averages([a], LATTICE).w_bits <= budget.w_bits + 1e-9
                and costs.averages([a], LATTICE).a_bits <= budget.a_bits + 1e-9]
    best = min(sum(e[t, g, a[g]] for t in range(S) for g in range(G)) for a in feasible)
    assert res.error == pytest.approx(best, rel=1e-12)
    dynamic = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=10 ** 6)
    assert dynamic.error <= res.error + 1e-12  # the time dimension can only help


def test_policy_candidates_and_options():
    from adatsq.passes.search import SearchOptions, policy_candidates

    e, costs = _toy(2, S=3, G=3)
    budget = Budget(4.0, 4.0)
    levels = (0.75, 1.0, 1.25)
    for policy in ("per-step", "uniform"):
        cands = policy_candidates(policy, e, LATTICE, costs, budget, levels)(1)
        assert cands and all(len(set(c)) == 1 for c in cands)  # every group at one precision
        assert (2, 2, 2) not in cands  # W8A8 everywhere is beyond 1.25 x W4A4
        # a point with an infinite error (unusable under the budget: no copies made) is never offered
        blocked = e.copy()
        blocked[:, :, 1] = np.inf
        assert (1, 1, 1) in cands and (1, 1, 1) not in policy_candidates(policy, blocked, LATTICE, costs, budget,
                                                                         levels)(1)
    static = policy_candidates("per-layer", e, LATTICE, costs, budget, levels)
    assert static(0) == static(2) == allocation_candidates(e.sum(0), LATTICE, costs, budget, levels)
    dyn = policy_candidates("dynamic", e, LATTICE, costs, budget, levels)
    assert dyn(2) == allocation_candidates(e[2], LATTICE, costs, budget, levels)
    for bad, msg in ((dict(policy="sometimes"), "unknown policy"), (dict(beam=0), "beam width"),
                     (dict(samples=0), "samples"), (dict(target="tpu"), "unknown target")):
        with pytest.raises(InputError, match=msg):
            SearchOptions(**bad).validate()


def test_search_with_a_lowrank_base_scores_what_the_weights_pass_writes(analysed_tiny, tmp_path):
    import torch

    from adatsq.passes.analysis import layer_nodes
    from adatsq.passes.search import SearchOptions, layer_transform_factory, search_plan
    from adatsq.passes.weights import GPTQWeights, load_weight_copies, plan_transforms, prepare_layers

    graph, calib, res = analysed_tiny
    lat = res.results["trajectory"]
    tr = calib.denoiser.transformer
    params = dict(tr.named_parameters())
    layers = [p for p in layer_nodes(graph) if params[p].ndim == 2]
    prep = prepare_layers(calib, lat, layers, 4, 4, rank=4, samples=2)
    assert set(prep) == set(layers) and all(v.low_rank[0].shape[1] == 4 for v in prep.values())
    make = layer_transform_factory(tr, graph, "gptq-fisher", prep=prep, group_size=16)
    plan, out, _ = search_plan(graph, calib, lat, Budget(4.0, 4.0), SearchOptions(beam=2, samples=2), make)
    by_name = {p.name: p for p in plan.lattice}
    reqs = {}
    for i, p in enumerate(plan.layers):
        g = 16 if params[p].shape[1] % 16 == 0 else None
        bits = sorted({by_name[r[i]].w_bits for r in plan.assignment} - {16})
        if bits:
            reqs[p] = [(b, g) for b in bits]
    path = tmp_path / "w.safetensors"
    GPTQWeights(tr, reqs, path, hessian="fisher", prep=prep, precomputed=make.copies)(graph)
    idx = load_weight_copies(path)
    for p in reqs:
        got = idx.prep(p)
        assert torch.equal(got.smooth, prep[p].smooth) and torch.equal(got.low_rank[1], prep[p].low_rank[1])
    # the plan replayed from the files runs exactly the transforms the search scored
    replay = plan_transforms(plan, idx, tr)
    g = torch.Generator().manual_seed(0)
    for p in reqs:
        x = torch.randn(2, 9, params[p].shape[1], generator=g)
        for t in range(calib.num_steps):
            prec = plan.precision(t, p)
            scored = make(p, prec)
            assert torch.equal(replay[p][t].weight, scored.weight), (p, t)
            # same tensors (the file's are fresh contiguous copies: matmul may round the last bit differently)
            assert torch.allclose(replay[p][t](x, None), scored(x, None), rtol=1e-6, atol=1e-6), (p, t)
            if prec.w_bits < 16:
                assert torch.equal(replay[p][t].smooth, prep[p].smooth)


def _rtn_switch(analysed_tiny):
    """The tiny model's layers, switchable between RTN copies at every simulate precision."""
    from adatsq.passes.search import SwitchableLayers, layer_transform_factory, sensitivity_table, target_lattice

    graph, calib, res = analysed_tiny
    tr = calib.denoiser.transformer
    lattice = target_lattice("simulate")
    groups, _ = sensitivity_table(graph, lattice)
    make = layer_transform_factory(tr, graph, "rtn")
    switch = SwitchableLayers({p: {prec.name: make(p, prec) for prec in lattice} for ls in groups.values() for p in ls})
    return calib, res.results["trajectory"], tr, lattice, groups, switch


def test_batched_step_evaluation_matches_one_at_a_time(analysed_tiny):
    import torch

    from adatsq.passes.search import model_step_fn
    from adatsq.passes.transforms import transformed_layers

    calib, lat, tr, lattice, groups, switch = _rtn_switch(analysed_tiny)
    G = len(groups)
    asgs = [(0,) * G, (3,) * G, tuple(i % 5 for i in range(G)), (1,) * G, (4,) * G]
    one = model_step_fn(calib, switch, groups, lattice, lat, [0, 2], max_batch=1)
    many = model_step_fn(calib, switch, groups, lattice, lat, [0, 2], max_batch=3)  # chunks of 3 + 2
    with transformed_layers(tr, switch.transforms()):
        a = one(lat[1, [0, 2]], 1, asgs)
        b = many(lat[1, [0, 2]], 1, asgs)
    assert switch.chunks is None  # back to single selection
    # bit for bit: a candidate's numbers do not depend on what it is batched with (at 3 bits a
    # different GEMM blocking flips activation codes, and the sampler amplifies that)
    for (xa, ea), (xb, eb) in zip(a, b):
        assert torch.equal(xa, xb) and ea == eb
    with transformed_layers(tr, switch.transforms()):
        c = many(lat[1, [0, 2]], 1, [asgs[3], asgs[0], asgs[0]])
    assert torch.equal(c[1][0], a[0][0]) and torch.equal(c[2][0], a[0][0]) and torch.equal(c[0][0], a[3][0])
    assert a[4][1] < 1e-10  # FP16 everywhere reproduces the FP trajectory
    assert a[0][1] > a[3][1] > a[4][1]  # W3A3 errs more than W4A4


def test_pacing_keeps_every_prefix_within_its_share():
    e, costs = _toy(3, S=5, G=2)
    S, G, P = e.shape
    all_asg = list(itertools.product(range(P), repeat=G))

    def step_fn(state, k, asgs):
        return [(state + sum(e[k, g, a[g]] for g in range(G)),) * 2 for a in asgs]

    budget = Budget(4.0, 4.0)
    res = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=3, pace=0.0)
    total_w = budget.w_bits * S * sum(costs.params)
    total_a = budget.a_bits * S * sum(costs.macs)
    w = a = 0.0
    for k, asg in enumerate(res.policy):
        dw, da = costs.step_bits(asg, LATTICE)
        w, a = w + dw, a + da
        assert w <= total_w * (k + 1) / S * (1 + 1e-9) and a <= total_a * (k + 1) / S * (1 + 1e-9), k
    free = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=10 ** 6)
    assert free.error <= res.error + 1e-12  # pacing is a restriction: exact search without it is never worse
    with pytest.raises(InputError, match="pace"):
        from adatsq.passes.search import SearchOptions

        SearchOptions(pace=-0.5).validate()
    with pytest.raises(InputError, match="sensitivity must be"):
        SearchOptions(sensitivity="vibes").validate()


def test_measured_sensitivity_quantizes_one_group_at_a_time(analysed_tiny):
    import torch

    from adatsq.passes.search import measured_sensitivity, model_step_fn
    from adatsq.passes.transforms import transformed_layers

    calib, lat, tr, lattice, groups, switch = _rtn_switch(analysed_tiny)
    fn = model_step_fn(calib, switch, groups, lattice, lat, [1, 2])
    G = len(groups)
    with transformed_layers(tr, switch.transforms()):
        err = measured_sensitivity(fn, lat[:, [1, 2]], G, lattice)
        k, g = 1, G - 1
        ((_, one),) = fn(lat[k, [1, 2]], k, [tuple(0 if h == g else 4 for h in range(G))])
    assert err.shape == (calib.num_steps, G, len(lattice))
    assert (err[:, :, 4] == 0).all() and (err[:, :, :4] > 0).all()  # FP16 is the reference
    assert err[k, g, 0] == pytest.approx(one, rel=1e-4)
    assert (err[:, :, 0].sum() > err[:, :, 3].sum())  # W3A3 errs more than W8A8 in total
    assert torch.isfinite(torch.from_numpy(err)).all()


def test_the_uniform_anchor_keeps_the_search_from_ending_worse_than_uniform():
    # a trap for a narrow beam: W8 + W4 at step 0 has the lowest error so far, but spends the budget
    # the last two steps need, which then run W3A3 everywhere
    costs = Costs(params=(1.0, 1.0), macs=(1.0, 1.0))
    per = np.array([1.0, 0.3, 0.01])  # W3A3, W4A4, W8A8 error of one group at one step
    all_asg = list(itertools.product(range(3), repeat=2))

    def step_fn(state, k, asgs):
        return [(state + per[a[0]] + per[a[1]],) * 2 for a in asgs]

    budget = Budget(4.0, 4.0)
    greedy = beam_search(3, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=1)
    anchored = beam_search(3, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=1, anchor=(1, 1))
    uniform = 3 * 2 * per[1]
    assert greedy.error > uniform + 1.0  # the trap works without the anchor
    assert anchored.error <= uniform + 1e-12 and anchored.policy == ((1, 1),) * 3
    assert anchored.achieved.w_bits <= 4.0 + 1e-9 and anchored.achieved.a_bits <= 4.0 + 1e-9


def test_uniform_anchor_is_the_most_bits_the_budget_allows_everywhere():
    from adatsq.passes.search import uniform_anchor

    assert uniform_anchor(LATTICE, Budget(4.0, 4.0), 3) == (1, 1, 1)
    assert uniform_anchor(LATTICE, Budget(6.0, 9.0), 2) == (1, 1)
    assert uniform_anchor(LATTICE, Budget(8.0, 8.0), 2) == (2, 2)
    assert uniform_anchor(LATTICE, Budget(2.0, 8.0), 2) is None


def test_heldout_search_samples_are_not_calibration_samples(analysed_tiny):
    import torch

    from adatsq.passes.search import HELDOUT_SEED0, SearchOptions, heldout_set

    _, calib, res = analysed_tiny
    held, lat, order = heldout_set(calib, 3)
    assert not set(held.seeds) & set(calib.seeds) and min(held.seeds) == HELDOUT_SEED0
    assert lat.shape == (calib.num_steps + 1, held.num_samples, *res.results["trajectory"].shape[2:])
    assert len(order) == 3 and len({i // len(held.seeds) for i in order[:2]}) == 2  # every condition first
    again = held.sample_batch([order[0]])
    # their own FP trajectory (sampled alone here, in one batch there: equal up to float summation order)
    assert torch.allclose(torch.stack(again.latents)[:, 0], lat[:, order[0]], atol=1e-4)
    with pytest.raises(InputError, match="score must be"):
        SearchOptions(score="test-set").validate()


def test_deployment_targets_keep_8_bit_copies_per_channel(analysed_tiny):
    from adatsq.passes.analysis import layer_nodes
    from adatsq.passes.plan import Precision
    from adatsq.passes.search import layer_transform_factory

    graph, calib, _ = analysed_tiny
    tr = calib.denoiser.transformer
    params = dict(tr.named_parameters())
    p = next(q for q in layer_nodes(graph) if params[q].ndim == 2 and params[q].shape[1] % 16 == 0)
    for gmax, want8 in ((8, 16), (4, None)):
        make = layer_transform_factory(tr, graph, "rtn", group_size=16, group_max_bits=gmax)
        make(p, Precision("W4A16", 4, 16))
        make(p, Precision("W8A8", 8, 8))
        assert set(make.copies) == {(p, 4, 16, "int"), (p, 8, want8, "int")}, gmax


def _brute_force(e, costs, budget, ok=lambda pol: True):
    """(error, policy) of the best policy of a separable problem ``e[S, G, P]`` within ``budget``
    and ``ok``, by enumeration."""
    S, G, P = e.shape
    best = (np.inf, None)
    for flat in itertools.product(range(P), repeat=S * G):
        pol = tuple(tuple(flat[t * G:(t + 1) * G]) for t in range(S))
        avg = costs.averages(pol, LATTICE)
        if avg.w_bits <= budget.w_bits + 1e-9 and avg.a_bits <= budget.a_bits + 1e-9 and ok(pol):
            best = min(best, (sum(e[t, g, pol[t][g]] for t in range(S) for g in range(G)), pol))
    return best


def _separable_step(e):
    """Every assignment of one step, and a ``step_fn`` whose state is the summed error so far."""
    G, P = e.shape[1:]

    def step_fn(state, k, asgs):
        return [(state + sum(e[k, g, a[g]] for g in range(G)),) * 2 for a in asgs]

    return list(itertools.product(range(P), repeat=G)), step_fn


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("memory", [4.0, 7.0, 9.0])
def test_memory_budget_is_exact_on_a_separable_problem_and_never_exceeded(seed, memory):
    """``memory_bits``: the distinct copies a policy needs (a group that runs W4 and W8 holds 12
    bits per parameter) stay within the budget, and with an untrimmed beam the search finds the
    brute-force optimum under both budgets (3 steps, 2 groups: 3^6 policies)."""
    from adatsq.passes.search import memory_bits_of

    e, costs = _toy(seed, S=3, G=2)
    budget = Budget(5.5, 5.5)
    S, G, P = e.shape
    best = _brute_force(e, costs, budget, lambda pol: memory_bits_of(pol, LATTICE, costs) <= memory + 1e-9)
    all_asg, step_fn = _separable_step(e)

    res = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=10 ** 6, memory_bits=memory)
    assert res.error == pytest.approx(best[0], rel=1e-12)
    assert memory_bits_of(res.policy, LATTICE, costs) <= memory + 1e-9
    narrow = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=2, memory_bits=memory)
    assert memory_bits_of(narrow.policy, LATTICE, costs) <= memory + 1e-9 and narrow.error >= best[0] - 1e-12
    free = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=10 ** 6)
    assert free.error <= res.error + 1e-12  # a constraint can only cost
    if memory == 4.0:  # one copy of at most 4 bits per group: one precision per group, never W8
        assert all(len({asg[g] for asg in res.policy}) == 1 for g in range(G))
        assert 2 not in {i for asg in res.policy for i in asg}
        assert memory_bits_of(free.policy, LATTICE, costs) > 4.0  # the budget binds


ORT_LATTICE = (Precision("W4A16", 4, 16), Precision("W8A8", 8, 8), Precision("FP16", 16, 16))


@pytest.mark.parametrize("seed", range(40))
def test_memory_budget_search_never_dead_ends(seed):
    """Under a memory budget with a lattice that trades weight bits against activation bits (the
    onnxruntime target's), a narrow beam fed few, memory-blind candidates used to commit to copies
    the rest of the budget could not use ("no candidate at step k"). Every child now carries a
    completion that is offered at the next step and the beam keeps one child that has one: a
    feasible problem always ends with a policy within all three budgets (and a segment budget)."""
    from adatsq.passes.search import constant_completion, memory_bits_of

    rng = np.random.default_rng(seed)
    S, G = 8, 6
    costs = Costs(params=tuple(rng.uniform(1, 4, G)), macs=tuple(rng.uniform(1, 4, G)))
    budget = Budget(float(rng.uniform(5, 7)), float(rng.uniform(10, 13)))
    memory = float(rng.uniform(5.5, 8))
    e = rng.uniform(0, 1, size=(S, G, 3)) * np.array([1.0, 0.5, 0.0])  # wider is better
    all_asg = list(itertools.product(range(3), repeat=G))
    # memory-blind candidates: a few random assignments per step (with the budget's best uniform one)
    cand = {k: [all_asg[i] for i in rng.choice(len(all_asg), 6, replace=False)] for k in range(S)}

    def step_fn(state, k, asgs):
        return [(state + sum(e[k, g, a[g]] for g in range(G)),) * 2 for a in asgs]

    wr, ar = budget.w_bits * sum(costs.params), budget.a_bits * sum(costs.macs)
    root = constant_completion(ORT_LATTICE, costs, (0,) * G, wr, ar, memory * sum(costs.params))
    if root is None:
        pytest.skip("no constant policy fits these budgets")
    for beam, segments in ((1, None), (2, None), (2, 2), (3, 1)):
        res = beam_search(S, ORT_LATTICE, costs, budget, lambda k: cand[k], step_fn, 0.0, beam=beam,
                          memory_bits=memory, pace=0.1, max_segments=segments)
        assert len(res.policy) == S and len(set(res.policy)) <= (segments or S)
        assert res.achieved.w_bits <= budget.w_bits + 1e-9 and res.achieved.a_bits <= budget.a_bits + 1e-9
        assert memory_bits_of(res.policy, ORT_LATTICE, costs) <= memory + 1e-9


def test_constant_completion_meets_all_three_rooms_or_says_none():
    from adatsq.passes.search import constant_completion

    costs = Costs(params=(1.0, 1.0), macs=(1.0, 1.0))
    # held: group 0 has W8A8; 8 bits of memory left; W avg <= 6 and A avg <= 12 per step
    c = constant_completion(ORT_LATTICE, costs, (0b010, 0), 12.0, 24.0, 8.0)
    w, a = costs.step_bits(c, ORT_LATTICE)
    assert w <= 12.0 and a <= 24.0 and c[1] != 2  # FP16 for group 1 needs 16 bits of memory
    assert constant_completion(ORT_LATTICE, costs, (0, 0), 7.9, 100.0, 100.0) is None  # W4 x 2 = 8 > 7.9
    assert constant_completion(ORT_LATTICE, costs, (0b010, 0b010), 8.0, 100.0, 0.0) is None  # no room for W4


def test_allocation_candidates_mix_a_lattice_without_a_point_cheapest_on_both_axes():
    """W4A16 and W8A8 (onnxruntime's, TensorRT's lattice) trade weight bits for activation bits: a
    W5A14 budget is met by neither alone, only by a mix. The generator used to start from the
    point with the fewest bits in total (W8A8) and, finding it over budget, offered only uniform
    W4A16; it now starts each level from a Lagrangian mix that fits."""
    rng = np.random.default_rng(0)
    G = 9
    costs = Costs(params=tuple(rng.uniform(1, 4, G)), macs=tuple(rng.uniform(1, 4, G)))
    errors = rng.uniform(0.5, 1.0, size=(G, 3)) * np.array([1.0, 0.3, 0.0])
    budget = Budget(5.0, 14.0)
    cands = allocation_candidates(errors, ORT_LATTICE, costs, budget)
    mixed = [c for c in cands if len(set(c)) > 1]
    assert mixed, cands
    for c in mixed:
        w, a = costs.step_bits(c, ORT_LATTICE)
        assert w / sum(costs.params) <= 1.5 * budget.w_bits + 1e-9 and a / sum(costs.macs) <= 1.5 * budget.a_bits + 1e-9
    at_budget = [c for c in mixed if costs.averages([c], ORT_LATTICE).w_bits <= 5 + 1e-9
                 and costs.averages([c], ORT_LATTICE).a_bits <= 14 + 1e-9]
    assert at_budget  # the level-1 allocation meets the budget itself
    err = lambda c: sum(errors[g, p] for g, p in enumerate(c))  # noqa: E731
    assert min(map(err, at_budget)) < err((0,) * G)  # and beats uniform W4A16


@pytest.mark.parametrize("seed", range(6))
def test_select_copies_fits_the_memory_and_keeps_the_budget_reachable(seed):
    """The copies kept under a memory budget take at most that many bits per parameter, every group
    keeps one, some single assignment over them meets the bit budget, and the beam search drawing
    its candidates from them ends within all three budgets."""
    from adatsq.passes.search import constant_completion, memory_bits_of, select_copies

    rng = np.random.default_rng(seed)
    S, G = 10, 7
    costs = Costs(params=tuple(rng.uniform(1, 4, G)), macs=tuple(rng.uniform(1, 4, G)))
    budget = Budget(5.0, 14.0)
    errors = rng.uniform(0.2, 1.0, size=(S, G, 3)) * np.array([1.0, 0.4, 0.0])
    memory = 6.0
    allowed = select_copies(errors, ORT_LATTICE, costs, budget, memory)
    wb = np.array([4, 8, 16])
    assert (allowed * np.array(costs.params)[:, None] * wb).sum() <= memory * sum(costs.params) * (1 + 1e-9)
    assert allowed.any(axis=1).all()
    used = tuple(int(sum(1 << p for p in range(3) if allowed[g, p])) for g in range(G))
    assert constant_completion(ORT_LATTICE, costs, used, 5.0 * sum(costs.params), 14.0 * sum(costs.macs), 0.0)
    assert allowed.sum() > G  # with 6 bits for W5 weights there is room for a second copy somewhere
    cands = {k: allocation_candidates(errors[k], ORT_LATTICE, costs, budget, allowed=allowed) for k in range(S)}
    assert all(allowed[g, p] for k in range(S) for c in cands[k] for g, p in enumerate(c))

    def step_fn(state, k, asgs):
        return [(state + sum(errors[k, g, a[g]] for g in range(G)),) * 2 for a in asgs]

    res = beam_search(S, ORT_LATTICE, costs, budget, lambda k: cands[k], step_fn, 0.0, beam=4, memory_bits=memory,
                      pace=0.1)
    assert res.achieved.w_bits <= 5.0 + 1e-9 and res.achieved.a_bits <= 14.0 + 1e-9
    assert memory_bits_of(res.policy, ORT_LATTICE, costs) <= memory + 1e-9
    with pytest.raises(InputError, match="infeasible memory budget of 4.5 bits"):
        select_copies(errors, ORT_LATTICE, costs, budget, 4.5)  # W5A14 needs W8 copies for a quarter of MACs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("segments", [1, 2])
def test_segment_budget_is_exact_on_a_separable_problem(seed, segments):
    """``max_segments``: at most that many distinct step assignments (one deployed graph or engine
    each); with an untrimmed beam the search finds the brute-force optimum under it, and a narrow
    beam stays within it."""
    e, costs = _toy(seed, S=3, G=2)
    budget = Budget(5.0, 5.0)
    S, G, P = e.shape
    best = _brute_force(e, costs, budget, lambda pol: len(set(pol)) <= segments)
    all_asg, step_fn = _separable_step(e)

    res = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=10 ** 6, max_segments=segments)
    assert res.error == pytest.approx(best[0], rel=1e-12) and len(set(res.policy)) <= segments
    narrow = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=1, max_segments=segments)
    assert len(set(narrow.policy)) <= segments
    free = beam_search(S, LATTICE, costs, budget, lambda k: all_asg, step_fn, 0.0, beam=10 ** 6)
    assert free.error <= res.error + 1e-12
    if segments == 1:  # one assignment for all steps
        assert len(set(free.policy)) > 1  # (the unconstrained optimum varies over time here)


def test_switch_runs_every_chunk_as_its_own_call():
    """The batch layout a candidate sees is fixed (chunks of ``rows``), whatever it is batched
    with: neighbours at the same precision are not merged into one larger GEMM."""
    import torch

    from adatsq.passes.search import SwitchableLayers

    calls = []

    def op(tag):
        def f(x, bias):
            calls.append((tag, x.shape[0]))
            return x + tag
        return f

    sw = SwitchableLayers({"w": {"A": op(1.0), "B": op(2.0)}})
    sw.select_chunks([{"w": "A"}, {"w": "A"}, {"w": "B"}], rows=2)
    x = torch.zeros(12, 3)  # [cond; uncond] x 3 candidates x 2 rows
    y = sw.transforms()["w"](x, None)
    assert calls == [(1.0, 2), (1.0, 2), (2.0, 2)] * 2
    assert torch.equal(y[:, 0], torch.tensor([1.0, 1, 1, 1, 2, 2] * 2))
