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


def test_infeasible_budget_and_bad_beam_fail_before_any_work():
    e, costs = _toy(0)
    calls = []

    def step_fn(state, k, asgs):
        calls.append(k)
        return [(state, 0.0) for _ in asgs]

    with pytest.raises(InputError, match="infeasible budget W2A4"):
        beam_search(4, LATTICE, costs, Budget(2.0, 4.0), lambda k: [(0, 0)], step_fn, 0.0)
    with pytest.raises(InputError, match="beam width"):
        beam_search(4, LATTICE, costs, Budget(4.0, 4.0), lambda k: [(0, 0)], step_fn, 0.0, beam=0)
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
