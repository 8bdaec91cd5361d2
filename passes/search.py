"""The search pass's core: a Pareto-pruned beam search over denoising steps for a precision policy.

A *policy* assigns one precision of the target's lattice to every layer group at every step. The
search walks the steps in sampling order (T..1 in diffusion notation, index 0..S-1 here) as
constrained pathfinding:

* a **beam entry** is a partial policy (steps ``0..k-1``) plus the *state* it produced: for the real
  model, the quantized latents of the search samples after step ``k-1``;
* at step ``k`` each entry is expanded with the **candidate assignments** for that step (a short
  list, e.g. from the sensitivity annotations, :func:`allocation_candidates`), and each child's
  state and **error** come from ``step_fn`` (for the real model: one denoising step with the
  child's precisions, error = MSE of its latents against the FP trajectory from the same noise and
  condition after that step, so the error accumulates what earlier choices did);
* a child that can no longer meet the **budget** (even with the cheapest precision for every
  remaining step) is dropped;
* of the rest only the **Pareto front** in (weight bits spent, activation bits spent, error)
  survives, trimmed to the beam width ``K`` (always keeping the lowest error; the rest spread
  evenly over the bits axis, the sum of both averages relative to the budget);
* after the last step the feasible entry with the lowest final error wins.

Costs: weight bits are weighted by parameters, activation bits by MACs, over groups and steps
(:class:`Costs`). The budget constrains both averages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from .analysis import HessianRef, Sensitivity, layer_nodes
from .annotations import annotate, get_annotation, register_annotation
from .plan import Budget, Precision


@register_annotation("adatsq.precision")
@dataclasses.dataclass(frozen=True)
class LayerPrecision:
    """On every call node of a layer: the precision it runs at, per step (written by the search)."""

    param: str
    group: str
    per_step: tuple[str, ...]

#: a step's assignment: the lattice index of every group's precision
Assignment = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Costs:
    """Per group: parameters (weighting weight bits) and MACs per step (weighting activation bits)."""

    params: tuple[float, ...]
    macs: tuple[float, ...]

    def step_bits(self, assignment: Assignment, lattice: Sequence[Precision]) -> tuple[float, float]:
        """(sum params x w_bits, sum MACs x a_bits) of one step's assignment."""
        w = sum(self.params[g] * lattice[i].w_cost for g, i in enumerate(assignment))
        a = sum(self.macs[g] * lattice[i].a_cost for g, i in enumerate(assignment))
        return w, a

    def averages(self, policy: Sequence[Assignment], lattice: Sequence[Precision]) -> Budget:
        w = a = 0.0
        for asg in policy:
            dw, da = self.step_bits(asg, lattice)
            w, a = w + dw, a + da
        n = max(len(policy), 1)
        return Budget(w / (n * sum(self.params)), a / (n * sum(self.macs)))


@dataclasses.dataclass
class Entry:
    policy: tuple[Assignment, ...]
    state: Any
    error: float
    w_spent: float  # sum over steps so far of params x w_bits
    a_spent: float
    used: tuple[int, ...] = ()  # per group: bit mask of the lattice points it has run at so far
    mem: float = 0.0  # params x bits of those copies (computed only under a memory budget)
    rest: Assignment | None = None  # under a memory/segment budget: one assignment that, repeated, completes it
    distinct: frozenset = frozenset()  # the distinct assignments of the policy (segments of the deployed plan)


@dataclasses.dataclass
class SearchResult:
    policy: tuple[Assignment, ...]
    error: float
    achieved: Budget
    explored: list[tuple[int, float, float, bool]]  # (step, bits axis, error, kept) of every child
    front: list[tuple[float, float]]  # final (bits axis, error) of the complete entries
    evaluations: int


def check_budget(lattice: Sequence[Precision], budget: Budget) -> None:
    """Raise InputError if no policy over ``lattice`` can meet ``budget``."""
    lo_w = min(p.w_cost for p in lattice)
    lo_a = min(p.a_cost for p in lattice)
    if lo_w > budget.w_bits + 1e-9 or lo_a > budget.a_bits + 1e-9:
        raise InputError(f"infeasible budget W{budget.w_bits:g}A{budget.a_bits:g}: the lattice's cheapest "
                         f"precisions are {lo_w}-bit weights and {lo_a}-bit activations "
                         f"({', '.join(p.name for p in lattice)})")


def check_memory(lattice: Sequence[Precision], memory_bits: float | None) -> None:
    """Raise InputError if no policy over ``lattice`` fits a memory budget of ``memory_bits`` bits
    per parameter (the cheapest point at every step needs one copy of its width)."""
    if memory_bits is None:
        return
    lo = min(p.w_cost for p in lattice)
    if not memory_bits >= lo - 1e-9:
        raise InputError(f"infeasible memory budget of {memory_bits:g} bits per parameter: the lattice's "
                         f"narrowest weights are {lo}-bit ({', '.join(p.name for p in lattice)})")


def _copy_bits(used: Sequence[int], lattice: Sequence[Precision], costs: Costs) -> float:
    """params x bits of the weight copies held, ``used[g]`` a bit mask of the lattice points group
    ``g`` runs at."""
    return sum(costs.params[g] * sum(p.w_cost for i, p in enumerate(lattice) if m >> i & 1)
               for g, m in enumerate(used))


def memory_bits_of(policy: Sequence[Assignment], lattice: Sequence[Precision], costs: Costs) -> float:
    """Bits of the distinct weight copies ``policy`` needs, averaged over the parameters."""
    used = [0] * len(costs.params)
    for asg in policy:
        used = [m | (1 << i) for m, i in zip(used, asg)]
    return _copy_bits(used, lattice, costs) / max(sum(costs.params), 1e-30)


def _lambda_grid(n: int = 12) -> np.ndarray:
    """Multipliers on the simplex over (weight, activation, memory): ``[L, 3]``."""
    pts = [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)]
    return np.asarray(pts, dtype=np.float64)


_EXHAUSTIVE = 20000  # assignments up to which a completion is found by enumeration (exact)
_PRODUCTS: dict[tuple[int, int], np.ndarray] = {}


def _all_assignments(G: int, P: int) -> np.ndarray:
    if (G, P) not in _PRODUCTS:
        _PRODUCTS[(G, P)] = np.indices((P,) * G).reshape(G, -1).T.copy()
    return _PRODUCTS[(G, P)]


def _repair(stack: np.ndarray, cur: np.ndarray, err: np.ndarray | None = None) -> np.ndarray | None:
    """Greedy single-group changes of ``cur`` that lower the summed violation of ``stack[c].sum() <= 1``
    (``stack`` is ``[C, G, P]``, each constraint normalised by its room; an infinite entry forbids a
    choice) until none is left, preferring the smallest error increase; None if it gets stuck."""
    G, P = stack.shape[1:]
    cur = cur.copy()
    gi = np.arange(G)
    tot = stack[:, gi, cur].sum(axis=1)
    for _ in range(2 * G * P):
        viol = np.maximum(tot - 1, 0).sum()
        if viol <= 1e-9:
            return cur
        new = tot[:, None, None] - stack[:, gi, cur][:, :, None] + stack  # [C, G, P]
        v = np.maximum(new - 1, 0).sum(axis=0)  # [G, P]
        better = v < viol - 1e-12
        if not better.any():
            return None
        cut = viol - v
        if err is None:
            pick = np.where(better, cut, -np.inf)
        else:
            de = err - err[gi, cur][:, None]
            free = better & (de <= 0)  # changes that do not raise the error come first
            pick = (np.where(free, cut, -np.inf) if free.any()
                    else np.where(better, cut / np.maximum(de, 1e-30), -np.inf))
        g, p = np.unravel_index(int(np.argmax(pick)), (G, P))
        cur[g] = p
        tot = new[:, g, p]
    return None


def constant_completion(lattice: Sequence[Precision], costs: Costs, used: Sequence[int], w_room: float,
                        a_room: float, m_room: float) -> Assignment | None:
    """One assignment whose (weight, activation) bits fit ``w_room``/``a_room`` per step and whose new
    weight copies (lattice points group ``g`` has not run at, ``used[g]`` a bit mask) fit ``m_room``
    bits, or None if none is found. A policy that repeats it for every step left meets all three
    budgets, and repeating it needs no new memory after the first step: a beam entry that has one
    can always be finished.

    A multiple-choice knapsack with three constraints: enumerated when there are at most
    ``_EXHAUSTIVE`` assignments (exact), else Lagrangian relaxation (each group alone minimises a
    weighted sum of its three normalised costs, for a grid of multipliers) and a greedy repair of
    the least-violating choice (heuristic: None then does not prove that none exists). Of the
    feasible ones the one with the most bits (best quality, as a rule) is returned."""
    if w_room < 0 or a_room < 0 or m_room < 0:
        return None
    G, P = len(used), len(lattice)
    params = np.asarray(costs.params, dtype=np.float64)[:, None]
    macs = np.asarray(costs.macs, dtype=np.float64)[:, None]
    wb = np.asarray([p.w_cost for p in lattice], dtype=np.float64)[None, :]
    ab = np.asarray([p.a_cost for p in lattice], dtype=np.float64)[None, :]
    held = np.asarray([[m >> i & 1 for i in range(P)] for m in used], dtype=bool)
    tiny = 1e-30
    w = params * wb / max(w_room, tiny)  # [G, P], each normalised by its room
    a = macs * ab / max(a_room, tiny)
    m = np.where(held, 0.0, params * wb) / max(m_room, tiny)
    stack = np.stack([w, a, m])  # [3, G, P]
    gi = np.arange(G)[None, :]
    if P ** G <= _EXHAUSTIVE:
        choice = _all_assignments(G, P)
    else:
        score = np.einsum("lc,cgp->lgp", _lambda_grid(), stack) + 1e-9 * (w + a)[None]
        choice = score.argmin(axis=2)  # [L, G]
    usage = np.stack([stack[c][gi, choice].sum(axis=1) for c in range(3)], axis=1)  # [L, 3]
    ok = (usage <= 1 + 1e-9).all(axis=1)
    if ok.any():
        i = max(np.flatnonzero(ok), key=lambda j: (usage[j, 0] + usage[j, 1], -j))
        return tuple(int(p) for p in choice[i])
    if P ** G <= _EXHAUSTIVE:
        return None
    fixed = _repair(stack, choice[int(usage.max(axis=1).argmin())])
    return None if fixed is None else tuple(int(p) for p in fixed)


def _pareto(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the non-dominated points (lower is better in every coordinate; of equal points
    the first is kept)."""
    out = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if j != i and all(b <= a for a, b in zip(p, q)) and (q != p or j < i):
                dominated = True
                break
        if not dominated:
            out.append(i)
    return out


def _partition(items: list[int], key: Callable[[int], Any]) -> list[list[int]]:
    groups: dict[Any, list[int]] = {}
    for i in items:
        groups.setdefault(key(i), []).append(i)
    return list(groups.values())


def _trim(front: list[int], bits: list[float], errors: list[float], k: int) -> list[int]:
    if len(front) <= k:
        return front
    best = min(front, key=lambda i: errors[i])
    rest = sorted((i for i in front if i != best), key=lambda i: bits[i])
    if k == 1:
        return [best]
    picks = np.linspace(0, len(rest) - 1, k - 1).round().astype(int)
    return [best] + [rest[j] for j in dict.fromkeys(picks.tolist())]


def beam_search(num_steps: int, lattice: Sequence[Precision], costs: Costs, budget: Budget,
                candidates: Callable[[int], Sequence[Assignment]],
                step_fn: Callable[[Any, int, Sequence[Assignment]], Sequence[tuple[Any, float]]],
                initial_state: Any, beam: int = 4,
                progress: Callable[[int, int], None] | None = None, static: bool = False,
                pace: float | None = None, anchor: Assignment | None = None,
                memory_bits: float | None = None, max_segments: int | None = None) -> SearchResult:
    """Beam search (see the module docstring). ``step_fn(state, k, assignments)`` returns, for each
    assignment, the child state and its error after step ``k`` (batched so a model can evaluate
    several children at once); ``candidates(k)`` lists the assignments tried at step ``k``.
    ``static``: a policy repeats its first step's assignment at every step (no time dimension;
    the candidates of step 0 are the only choices). ``pace``: a child that has spent more than
    its share of the budget so far, ``(k + 1) / S`` of it, by more than this fraction is pruned
    (None: no pacing; the search then tends to spend early, where the latent error is cheap to
    buy down, and pay with the cheapest precisions at the last steps). ``anchor``: an assignment
    whose all-steps path (e.g. the uniform precision at the budget) is kept in the beam beside the
    K entries whatever its rank, so the search can always fall back to it or leave it at any step:
    it never ends worse on its own error than that fixed policy. ``memory_bits``: a memory budget,
    the bits of every distinct weight copy the policy needs (a group that runs at two precisions
    holds both copies; 16-bit counts 16) averaged over the parameters; a child over it is dropped,
    the memory a child has committed joins the dominance test, and every entry may also repeat its
    last step's assignment or run each group at its narrowest copy so far (no new memory), and every
    child gets a *completion* (:func:`constant_completion`): one assignment that, repeated, finishes
    the policy within both budgets and the memory. It is a candidate of that child's next step, and
    the beam always keeps the best child that has one, so the search cannot run into a dead end
    (a beam committed to copies the rest of the budget cannot use). ``max_segments``: at most this
    many distinct step assignments (each is one deployed graph or engine, :mod:`..backends.onnx_qdq`);
    a child over it is dropped, the count joins the dominance test, and completions are found the
    same way (once the count is reached, among the policy's own assignments)."""
    if beam < 1:
        raise InputError(f"search: beam width must be >= 1, got {beam}")
    check_budget(lattice, budget)
    check_memory(lattice, memory_bits)
    mem_cap = None if memory_bits is None else memory_bits * sum(costs.params) * (1 + 1e-9)
    if max_segments is not None and max_segments < 1:
        raise InputError(f"search: max_segments must be >= 1, got {max_segments}")
    guard = mem_cap is not None or max_segments is not None  # completions keep the search out of dead ends
    total_w = budget.w_bits * num_steps * sum(costs.params)
    total_a = budget.a_bits * num_steps * sum(costs.macs)
    min_w = min(p.w_cost for p in lattice) * sum(costs.params)
    min_a = min(p.a_cost for p in lattice) * sum(costs.macs)
    tol = 1e-9 * (total_w + total_a)

    def axis(w: float, a: float, steps: int) -> float:
        return (w / max(total_w, 1e-30) + a / max(total_a, 1e-30)) * num_steps / max(steps, 1)

    def future(used: tuple[int, ...], mem: float) -> tuple[float, float]:
        """Lower bounds on one later step's (weight, activation) bits: without a memory budget every
        group can drop to the narrowest points; with one (``mem`` committed so far), a group runs a
        precision it holds a copy of, or one whose copy fits the memory left (each group judged
        alone: a relaxation)."""
        if mem_cap is None:
            return min_w, min_a
        room = mem_cap - mem
        w = a = 0.0
        for g, m in enumerate(used):
            ok = [p for i, p in enumerate(lattice) if m >> i & 1 or costs.params[g] * p.w_cost <= room]
            w += costs.params[g] * min(p.w_cost for p in ok)
            a += costs.macs[g] * min(p.a_cost for p in ok)
        return w, a

    def completion(used: tuple[int, ...], mem: float, distinct: frozenset, w_spent: float, a_spent: float,
                   left: int) -> Assignment | None:
        w_room, a_room = (total_w + tol - w_spent) / left, (total_a + tol - a_spent) / left
        if max_segments is None or len(distinct) < max_segments:
            return constant_completion(lattice, costs, used, w_room, a_room,
                                       math.inf if mem_cap is None else mem_cap - mem)
        # no new segment: one of the policy's own assignments (their copies are held)
        fits = [c for c in distinct if costs.step_bits(c, lattice)[0] <= w_room
                and costs.step_bits(c, lattice)[1] <= a_room]
        return max(fits, key=lambda c: (sum(costs.step_bits(c, lattice)), c)) if fits else None

    beam_entries = [Entry((), initial_state, 0.0, 0.0, 0.0, (0,) * len(costs.params))]
    if guard and not static:
        beam_entries[0].rest = completion(beam_entries[0].used, 0.0, frozenset(), 0.0, 0.0, num_steps)
    explored: list[tuple[int, float, float, bool]] = []
    evaluations = 0
    for k in range(num_steps):
        cands = list(dict.fromkeys(tuple(c) for c in candidates(k)))
        if not cands:
            raise InputError(f"search: no candidate assignment at step {k}")
        left = num_steps - k - 1
        children: list[Entry] = []
        for e in beam_entries:
            feasible = []
            own = cands if not (static and e.policy) else [e.policy[0]]
            if guard and not static:
                # the entry's completion, and assignments that need no new copy: the last step's, and
                # every group's narrowest held
                if e.policy:
                    held = tuple(min((i for i in range(len(lattice)) if m >> i & 1),
                                     key=lambda i: lattice[i].w_cost) for m in e.used)
                    own = list(own) + [e.policy[-1], held]
                own = list(dict.fromkeys(list(own) + ([e.rest] if e.rest is not None else [])))
            for c in own:
                dw, da = costs.step_bits(c, lattice)
                used = tuple(m | (1 << i) for m, i in zip(e.used, c))
                mem = _copy_bits(used, lattice, costs) if mem_cap is not None else 0.0
                if mem_cap is not None and mem > mem_cap:
                    continue
                distinct = e.distinct | {c}
                if max_segments is not None and len(distinct) > max_segments:
                    continue
                fw, fa = future(used, mem) if left else (0.0, 0.0)
                if (e.w_spent + dw + left * fw <= total_w + tol and
                        e.a_spent + da + left * fa <= total_a + tol):
                    feasible.append((c, dw, da, used, mem, distinct))
            if not feasible:
                continue
            results = step_fn(e.state, k, [f[0] for f in feasible])
            evaluations += len(feasible)
            for (c, dw, da, used, mem, distinct), (state, err) in zip(feasible, results):
                rest = None
                if guard and left:
                    w1, a1 = e.w_spent + dw, e.a_spent + da
                    if static:  # its own assignment is the only way on
                        fits = w1 + left * dw <= total_w + tol and a1 + left * da <= total_a + tol
                        rest = c if fits else None
                    else:
                        rest = completion(used, mem, distinct, w1, a1, left)
                children.append(Entry(e.policy + (c,), state, float(err), e.w_spent + dw, e.a_spent + da, used,
                                      mem, rest, distinct))
        if not children:
            raise InputError(f"search: no candidate at step {k} keeps the budget reachable"
                             + (f" within the memory budget of {memory_bits:g} bits per parameter (the beam "
                                f"committed to copies the rest of the budget cannot use: loosen --memory-bits or "
                                f"the budget, or widen --beam)" if memory_bits is not None else "")
                             + (f" in at most {max_segments} segment(s)" if max_segments is not None else ""))
        bits = [axis(c.w_spent, c.a_spent, k + 1) for c in children]
        errors = [c.error for c in children]
        pool = list(range(len(children)))
        if pace is not None:
            share = (k + 1) / num_steps * (1 + pace)
            paced = [i for i in pool if children[i].w_spent <= total_w * share + tol
                     and children[i].a_spent <= total_a * share + tol]
            lowest = min(bits)
            pool = paced or [i for i in pool if bits[i] <= lowest + 1e-12]
        # dominance in (weight bits spent, activation bits spent, error): a child another beats on
        # all three can never end better (the rest of its path is open to the other too)
        # (under a segment budget only among children with the same assignments so far: the others
        # may repeat theirs for free)
        front = []
        for part in _partition(pool, lambda j: children[j].distinct if max_segments is not None else None):
            front += [part[i] for i in _pareto([(children[j].w_spent, children[j].a_spent, children[j].error)
                                                + ((children[j].mem,) if mem_cap is not None else ())
                                                for j in part])]
        front.sort()
        keep = _trim(front, bits, errors, beam)
        if guard and left and not any(children[i].rest is not None for i in keep):
            # the best child that can still be finished, so the next step has a feasible candidate
            ok = [i for i in pool if children[i].rest is not None] or [
                i for i in range(len(children)) if children[i].rest is not None]
            keep += sorted(ok, key=lambda i: errors[i])[:1]
        if anchor is not None:
            path = (tuple(anchor),) * (k + 1)
            keep += [i for i in pool if children[i].policy == path and i not in keep][:1]
        kept = set(keep)
        explored += [(k, bits[i], errors[i], i in kept) for i in range(len(children))]
        beam_entries = [children[i] for i in keep]
        if progress is not None:
            progress(k + 1, num_steps)
    best = min(beam_entries, key=lambda e: e.error)
    final = [(axis(e.w_spent, e.a_spent, num_steps), e.error) for e in beam_entries]
    front = sorted(final[i] for i in _pareto(final))
    return SearchResult(best.policy, best.error, costs.averages(best.policy, lattice), explored, front, evaluations)


def _lagrangian_allocation(errors: np.ndarray, lattice: Sequence[Precision], costs: Costs, cap_w: float,
                           cap_a: float) -> Assignment | None:
    """The lowest-error assignment among all (up to ``_EXHAUSTIVE`` of them) or else the Lagrangian
    ones (each group minimises its error plus priced weight and activation bits, over a grid of
    prices) whose parameter-weighted weight bits
    and MAC-weighted activation bits average at most ``cap_w``/``cap_a``; if none fits, the least
    violating one greedily repaired. None if that fails too. An infinite error forbids a choice."""
    G, P = errors.shape
    pw = np.asarray(costs.params, dtype=np.float64)[:, None] / max(sum(costs.params), 1e-30)
    pa = np.asarray(costs.macs, dtype=np.float64)[:, None] / max(sum(costs.macs), 1e-30)
    w = pw * np.asarray([p.w_cost for p in lattice], dtype=np.float64)[None, :]  # [G, P]: share of the average
    a = pa * np.asarray([p.a_cost for p in lattice], dtype=np.float64)[None, :]
    err = np.asarray(errors, dtype=np.float64)
    finite = err[np.isfinite(err)]
    scale = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-30)
    prices = np.concatenate([[0.0], scale * np.logspace(-3, 3, 25)])
    mu_w, mu_a = (x.reshape(-1, 1, 1) for x in np.meshgrid(prices, prices, indexing="ij"))
    if P ** G <= _EXHAUSTIVE:  # small: every assignment (exact)
        choice = _all_assignments(G, P)
    else:
        choice = (err[None] + mu_w * w[None] + mu_a * a[None]).argmin(axis=2)  # [L, G]
    gi = np.arange(G)[None, :]
    ws, as_, es = w[gi, choice].sum(1), a[gi, choice].sum(1), err[gi, choice].sum(1)
    ok = np.flatnonzero((ws <= cap_w + 1e-9) & (as_ <= cap_a + 1e-9) & np.isfinite(es))
    if len(ok):
        i = min(ok, key=lambda j: (es[j], ws[j] + as_[j], j))
        return tuple(int(p) for p in choice[i])
    forbid = np.where(np.isfinite(err), 0.0, np.inf)
    stack = np.stack([w / max(cap_w, 1e-30) + forbid, a / max(cap_a, 1e-30) + forbid])
    viol = np.maximum(ws / max(cap_w, 1e-30) - 1, 0) + np.maximum(as_ / max(cap_a, 1e-30) - 1, 0)
    viol = np.where(np.isfinite(es), viol, np.inf)
    if not np.isfinite(viol).any():
        return None
    fixed = _repair(stack, choice[int(viol.argmin())], np.where(np.isfinite(err), err, 0.0))
    return None if fixed is None else tuple(int(p) for p in fixed)


def allocation_candidates(errors: np.ndarray, lattice: Sequence[Precision], costs: Costs, budget: Budget,
                          levels: Sequence[float] = (0.75, 0.875, 1.0, 1.125, 1.25, 1.5),
                          allowed: np.ndarray | None = None) -> list[Assignment]:
    """Candidate assignments for one step from per-(group, precision) errors ``errors[G, P]``
    (e.g. the one-step sensitivity): for each level ``l``, a greedy allocation minimising the summed
    error with both averages within ``l`` x the budget (start from the cheapest precision
    everywhere, repeatedly apply the upgrade with the best error reduction per relative bit), plus
    every uniform assignment within the largest level. ``allowed[G, P]``: the only precisions each
    group may take (e.g. the weight copies :func:`select_copies` keeps under a memory budget)."""
    G, P = errors.shape
    if allowed is not None:
        errors = np.where(allowed, errors, np.inf)
    wsum, asum = sum(costs.params), sum(costs.macs)
    cheapest = min(range(P), key=lambda p: (lattice[p].w_cost + lattice[p].a_cost, errors[:, p].sum()))
    out: list[Assignment] = []

    def rel(g: int, p: int) -> tuple[float, float]:
        return costs.params[g] * lattice[p].w_cost / wsum, costs.macs[g] * lattice[p].a_cost / asum

    for lv in levels:
        cap_w, cap_a = lv * budget.w_bits, lv * budget.a_bits
        asg = [cheapest] * G
        w = sum(rel(g, cheapest)[0] for g in range(G))
        a = sum(rel(g, cheapest)[1] for g in range(G))
        if w > cap_w + 1e-9 or a > cap_a + 1e-9 or not np.isfinite(errors[:, cheapest]).all():
            # a lattice that trades weight bits for activation bits (W4A16 vs W8A8) has no point
            # cheapest on both axes: start from a mix that fits instead
            start = _lagrangian_allocation(errors, lattice, costs, cap_w, cap_a)
            if start is None:
                continue
            asg = list(start)
            w = sum(rel(g, p)[0] for g, p in enumerate(asg))
            a = sum(rel(g, p)[1] for g, p in enumerate(asg))
        while True:
            best = None
            for g in range(G):
                w0, a0 = rel(g, asg[g])
                for p in range(P):
                    if p == asg[g] or errors[g, p] >= errors[g, asg[g]]:
                        continue
                    w1, a1 = rel(g, p)
                    nw, na = w - w0 + w1, a - a0 + a1
                    if nw > cap_w + 1e-9 or na > cap_a + 1e-9:
                        continue
                    cost = max((w1 - w0) / budget.w_bits + (a1 - a0) / budget.a_bits, 1e-12)
                    gain = (errors[g, asg[g]] - errors[g, p]) / cost
                    if best is None or gain > best[0]:
                        best = (gain, g, p, nw, na)
            if best is None:
                break
            _, g, p, w, a = best
            asg[g] = p
        out.append(tuple(asg))
    top = max(levels)
    for p in range(P):
        if (lattice[p].w_cost <= top * budget.w_bits + 1e-9 and lattice[p].a_cost <= top * budget.a_bits + 1e-9
                and np.isfinite(errors[:, p]).all()):
            out.append((p,) * G)
    return list(dict.fromkeys(out))


def select_copies(errors: np.ndarray, lattice: Sequence[Precision], costs: Costs, budget: Budget,
                  memory_bits: float) -> np.ndarray:
    """The weight copies a plan may hold under a memory budget, ``allowed[G, P]``, chosen before the
    beam search (which then draws its candidates from them; :func:`allocation_candidates`).

    From the one-step sensitivity ``errors[S, G, P]``: start with the copies the per-step
    allocations at the budget use (what a memory-blind plan would hold), then, while their bits per
    parameter exceed ``memory_bits``, drop the copy whose loss costs the least summed error per bit
    freed (the steps that used it fall back to the group's best remaining copy), never one without
    which no single assignment meets the bit budget (if that gets stuck: the one assignment found to
    fit all three budgets). Raises InputError if no assignment fits both the bits and the memory."""
    S, G, P = errors.shape
    params = np.asarray(costs.params, dtype=np.float64)
    cap = memory_bits * params.sum() * (1 + 1e-9)
    wb = np.asarray([p.w_cost for p in lattice], dtype=np.float64)
    allowed = np.zeros((G, P), dtype=bool)
    root = constant_completion(lattice, costs, (0,) * G, budget.w_bits * params.sum() * (1 + 1e-9),
                               budget.a_bits * sum(costs.macs) * (1 + 1e-9), cap)
    if root is None:
        raise InputError(f"infeasible memory budget of {memory_bits:g} bits per parameter for the budget "
                         f"W{budget.w_bits:g}A{budget.a_bits:g}: no assignment meets both")
    choice = np.zeros((S, G), dtype=int)
    for k in range(S):
        cands = allocation_candidates(errors[k], lattice, costs, budget, (1.0,))
        choice[k] = cands[0] if cands else root
        allowed[np.arange(G), choice[k]] = True

    def feasible(mask: np.ndarray) -> bool:
        used = tuple(int(sum(1 << p for p in range(P) if mask[g, p])) for g in range(G))
        return constant_completion(lattice, costs, used, budget.w_bits * params.sum() * (1 + 1e-9),
                                   budget.a_bits * sum(costs.macs) * (1 + 1e-9), 0.0) is not None

    if not feasible(allowed):  # the per-step allocations may each meet the budget with no common point
        allowed[np.arange(G), list(root)] = True
    while (allowed * params[:, None] * wb[None, :]).sum() > cap:
        best = None
        for g in range(G):
            for p in np.flatnonzero(allowed[g]):
                if allowed[g].sum() == 1:
                    continue
                trial = allowed.copy()
                trial[g, p] = False
                if not feasible(trial):
                    continue
                rest = np.flatnonzero(trial[g])
                fallback = rest[errors[:, g, rest].argmin(axis=1)]  # [S]: the best remaining copy per step
                loss = sum(errors[k, g, fallback[k]] - errors[k, g, p] for k in range(S) if choice[k, g] == p)
                score = max(loss, 0.0) / (params[g] * wb[p])
                if best is None or score < best[0]:
                    best = (score, g, p, fallback)
        if best is None:  # stuck: one copy per group, the assignment found to fit everything
            allowed = np.zeros((G, P), dtype=bool)
            allowed[np.arange(G), list(root)] = True
            break
        _, g, p, fallback = best
        allowed[g, p] = False
        choice[:, g] = np.where(choice[:, g] == p, fallback, choice[:, g])
    return allowed


# =========================================================================== targets
#: what each deployment target executes (the search proposes nothing else); FP16 = kept in 16-bit
TARGETS: dict[str, tuple[Precision, ...]] = {
    # the paper's setting: any of these, simulated (fake-quantized) in floating point
    "simulate": (Precision("W3A3", 3, 3), Precision("W4A4", 4, 4), Precision("W4A8", 4, 8),
                 Precision("W8A8", 8, 8), Precision("FP16", 16, 16)),
    # TensorRT explicit quantization: INT8 W8A8, INT4 weight-only, 16-bit (FP8 needs a fp8 lattice
    # point; added with the backends)
    "tensorrt": (Precision("W4A16", 4, 16), Precision("W8A8", 8, 8), Precision("FP16", 16, 16)),
    # onnxruntime CPU kernels: MatMulNBits (INT4 weight-only), dynamic INT8 MatMulInteger
    "onnxruntime": (Precision("W4A16", 4, 16), Precision("W8A8", 8, 8), Precision("FP16", 16, 16)),
    # our CUDA kernels
    "torch-cuda": (Precision("W4A8", 4, 8), Precision("W4A16", 4, 16), Precision("W8A8", 8, 8),
                   Precision("FP16", 16, 16)),
}


#: NVFP4 lattice points (simulate only; see Precision.fmt): FP4 weights and activations, or weights only
NVFP4_POINTS = {"NVFP4": Precision("NVFP4", 4, 4, "nvfp4"), "NVFP4A16": Precision("NVFP4A16", 4, 16, "nvfp4")}

#: the weights a plan's quantized copies are made with (see :func:`layer_transform_factory`)
WEIGHTS = ("rtn", "gptq", "gptq-fisher")


def target_lattice(target: str, points: str | Sequence[str] | None = None) -> tuple[Precision, ...]:
    """The lattice the search draws from: the target's (``points`` None), or the lattice points
    named in ``points`` ("W2A4,W3A3,W4A4,FP16" or a sequence of names). ``simulate`` takes any
    WxAy with x in 2,3,4,6,8 and y in 2,3,4,6,8,16 (and FP16, and the NVFP4 points ``NVFP4`` and
    ``NVFP4A16``); a deployment target only a subset of what it executes. Ordered by (weight
    cost, activation cost) like the targets' own lattices, duplicates dropped."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    if points is None:
        return TARGETS[target]
    from .analysis import parse_precision

    names = [n.strip().upper() for n in (points.split(",") if isinstance(points, str) else points)]
    names = [n for n in names if n]
    if not names:
        raise InputError(f"lattice {points!r}: name at least one precision, e.g. W3A3,W4A4,W8A8")
    known = {p.name: p for p in TARGETS[target]}
    out: dict[str, Precision] = {}
    for n in names:
        if n in known:
            out[n] = known[n]
        elif target != "simulate":
            raise InputError(f"lattice point {n!r}: target {target} executes only {', '.join(known)}")
        elif n in ("FP16", "W16A16"):
            out["FP16"] = Precision("FP16", 16, 16)
        elif n in NVFP4_POINTS:
            out[n] = NVFP4_POINTS[n]
        else:
            out[n] = Precision(n, *parse_precision(n))
    return tuple(sorted(out.values(), key=lambda p: (p.w_cost, p.a_cost)))


def parse_budget(text: str) -> Budget:
    """``W4A4`` -> Budget(4, 4); ``W3.5A6`` -> Budget(3.5, 6)."""
    import re

    m = re.fullmatch(r"\s*[wW](\d+(?:\.\d+)?)\s*[aA](\d+(?:\.\d+)?)\s*", text or "")
    if not m:
        raise InputError(f"budget {text!r}: expected W<bits>A<bits>, e.g. W4A4 or W3.5A6")
    return Budget(float(m.group(1)), float(m.group(2)))


# =========================================================================== the model
class SwitchableLayers:
    """Per layer, one :class:`~adatsq.passes.transforms.LayerTransform` per precision; ``select``
    sets which one every layer runs (used inside :func:`~adatsq.passes.transforms.transformed_layers`
    through :meth:`transforms`). ``select_chunks`` runs several selections in one batch: the
    batch is cut into chunks of ``rows`` samples and chunk ``i`` runs selection ``i % len``."""

    def __init__(self, options: dict[str, dict[str, Any]]):
        self.options = options  # param -> precision name -> LayerTransform
        self.current: dict[str, str] = {p: next(iter(o)) for p, o in options.items()}
        self.chunks: dict[str, list[str]] | None = None
        self.rows = 0

    def _check(self, precisions: dict[str, str]) -> None:
        for p, name in precisions.items():
            if name not in self.options[p]:
                raise InputError(f"{p}: no weights prepared for precision {name}")

    def select(self, precisions: dict[str, str]) -> None:
        self._check(precisions)
        self.current.update(precisions)
        self.chunks = None

    def select_chunks(self, selections: Sequence[dict[str, str]], rows: int) -> None:
        for sel in selections:
            self._check(sel)
        self.chunks = {p: [sel.get(p, self.current[p]) for sel in selections] for p in self.options}
        self.rows = int(rows)

    def transforms(self) -> dict[str, Any]:
        return {p: _Switch(self, p) for p in self.options}


class _Switch:
    def __init__(self, layers: SwitchableLayers, param: str):
        self.layers, self.param = layers, param

    def __call__(self, x, bias):
        sw = self.layers
        opts = sw.options[self.param]
        if sw.chunks is None:
            return opts[sw.current[self.param]](x, bias)
        names = sw.chunks[self.param]
        if x.shape[0] % sw.rows:
            raise RuntimeError(f"{self.param}: a batch of {x.shape[0]} rows does not split into chunks of {sw.rows}")
        # every chunk is its own call, also where neighbours share a precision: a candidate's numbers
        # must not depend on what it is batched with (at 3-4 bits a different GEMM blocking flips
        # activation codes, and the sampler amplifies that into ~15% of the search error;
        # tools/search_noise.py)
        return torch.cat([opts[names[i % len(names)]](part, bias) for i, part in enumerate(x.split(sw.rows))])


def model_step_fn(calib: Any, switch: SwitchableLayers, groups: dict[str, list[str]], lattice: Sequence[Precision],
                  fp_latents: Any, samples: Sequence[int], max_batch: int = 8) -> Callable:
    """The beam search's ``step_fn`` for a real model: one sampler step (CFG as the calibration set
    samples it) on the search samples' latents with the assignment's precisions; the error is the
    mean squared difference to the FP trajectory after that step (same noise, same condition).
    Up to ``max_batch`` assignments are evaluated in one batched model call (each on its own chunk
    of the batch, :meth:`SwitchableLayers.select_chunks`)."""
    from ..frontend.sampling import flow_match_scheduler

    sched = flow_match_scheduler(calib.schedule)
    sigmas = sched.sigmas.float()  # the sampler's own float32 step sizes
    names = list(groups)
    idx = list(samples)
    n = len(idx)

    def step_fn(state, k, assignments):
        out = []
        for start in range(0, len(assignments), max_batch):
            chunk = assignments[start:start + max_batch]
            m = len(chunk)
            switch.select_chunks([{p: lattice[asg[g]].name for g, nm in enumerate(names) for p in groups[nm]}
                                  for asg in chunk], rows=n)
            with torch.inference_mode():
                xs = torch.cat([state] * m)
                v = calib.guided(calib.denoiser(*calib.model_inputs(xs, k, idx * m)))
                x = xs + (sigmas[k + 1] - sigmas[k]) * v
            ref = fp_latents[k + 1, idx]
            for j, xj in enumerate(x.split(n)):
                out.append((xj, float((xj - ref).square().mean())))
        switch.chunks = None
        return out

    return step_fn


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    target: str = "simulate"
    beam: int = 4
    samples: int = 10  # search samples: the first seed of each condition, then the next seeds
    levels: tuple[float, ...] = (0.75, 0.875, 1.0, 1.125, 1.25, 1.5)
    policy: str = "dynamic"  # see POLICIES
    pace: float | None = 0.1  # budget pacing slack (see beam_search); None: off
    # where the candidate generator's per-step errors come from: "measured" with the plan's own
    # quantized layers on the FP trajectory (sensitivity_samples samples), or the "analysis"
    # pass's sensitivity annotations (RTN weights per output channel)
    sensitivity: str = "measured"
    sensitivity_samples: int = 4
    # keep the uniform policy at the budget (the best lattice point every layer can run at every
    # step within it) in the beam as an anchor (see beam_search)
    anchor: bool = True
    # which samples score the candidates: "heldout" seeds (their own FP trajectory, never seen by
    # the Hessians and Fisher weights the copies were made with) or the "calibration" samples
    score: str = "heldout"
    # a memory budget: bits of all distinct weight copies per parameter (None: unconstrained)
    memory_bits: float | None = None
    # at most this many distinct step assignments, i.e. deployed segments (None: unconstrained)
    max_segments: int | None = None
    # the lattice points the search may use (None: the target's lattice; see target_lattice)
    lattice: tuple[str, ...] | None = None

    def points(self) -> tuple[Precision, ...]:
        return target_lattice(self.target, self.lattice)

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise InputError(f"search: unknown policy {self.policy!r} ({', '.join(POLICIES)})")
        if self.beam < 1:
            raise InputError(f"search: beam width must be >= 1, got {self.beam}")
        if self.samples < 1:
            raise InputError(f"search: samples must be >= 1, got {self.samples}")
        if self.sensitivity not in ("measured", "analysis"):
            raise InputError(f"search: sensitivity must be 'measured' or 'analysis', got {self.sensitivity!r}")
        if self.sensitivity_samples < 1:
            raise InputError(f"search: sensitivity_samples must be >= 1, got {self.sensitivity_samples}")
        if self.score not in SCORES:
            raise InputError(f"search: score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.pace is not None and self.pace < 0:
            raise InputError(f"search: pace slack must be >= 0, got {self.pace}")
        check_memory(self.points(), self.memory_bits)
        if self.max_segments is not None and self.max_segments < 1:
            raise InputError(f"search: max_segments must be >= 1, got {self.max_segments}")


#: the samples the search scores on (SearchOptions.score)
SCORES = ("heldout", "calibration")
#: the first seed of the held-out search samples (calibration seeds start at 10 000, the evaluation
#: harness uses 0..n-1)
HELDOUT_SEED0 = 20_000


def heldout_set(calib: Any, samples: int) -> tuple[Any, torch.Tensor, list[int]]:
    """Search samples that are not calibration samples: the calibration set's conditions with
    seeds from :data:`HELDOUT_SEED0` (one seed per condition first, then the next seeds), their FP
    trajectory ``[S+1, N, ...]`` and the sample indices in search order."""
    from .calibration import CalibrationSet

    n_cond = len(calib.conditions)
    n_seeds = -(-samples // n_cond)
    held = CalibrationSet(calib.denoiser, calib.conditions, tuple(range(HELDOUT_SEED0, HELDOUT_SEED0 + n_seeds)),
                          calib.schedule, calib.guidance, labels=calib.labels, batch=calib.batch)
    order = [c * n_seeds + s for s in range(n_seeds) for c in range(n_cond)][:samples]
    lat = torch.zeros(calib.num_steps + 1, held.num_samples, *calib.denoiser.latent_shape())
    with torch.inference_mode():
        for idx in held.batches():
            lat[:, idx[0]:idx[-1] + 1] = torch.stack(held.sample_batch(idx).latents)
    return held, lat, order


#: the policy families the search may return (the ablations of the time and layer dimensions):
#: ``dynamic`` per step and per layer group (AdaTSQ); ``per-step`` one precision for all groups at
#: a step, changing over steps; ``per-layer`` a static mixed-precision assignment used at every
#: step; ``uniform`` one precision everywhere
POLICIES = ("dynamic", "per-step", "per-layer", "uniform")


def policy_candidates(policy: str, errors: np.ndarray, lattice: Sequence[Precision], costs: Costs, budget: Budget,
                      levels: Sequence[float], allowed: np.ndarray | None = None) -> Callable[[int], list[Assignment]]:
    """``candidates(k)`` for the beam search under ``policy`` from the one-step sensitivity
    ``errors[S, G, P]`` (static policies draw theirs from the errors summed over steps); the dynamic
    policy's are drawn from the ``allowed[G, P]`` copies when given."""
    G = errors.shape[1]
    top = max(levels)
    uniform = [(p,) * G for p in range(len(lattice))
               if lattice[p].w_cost <= top * budget.w_bits + 1e-9 and lattice[p].a_cost <= top * budget.a_bits + 1e-9
               and np.isfinite(errors[:, :, p]).all()]  # an infinite error: a point never proposed
    if policy in ("per-step", "uniform"):
        return lambda k: uniform
    if policy == "per-layer":
        static = allocation_candidates(errors.sum(0), lattice, costs, budget, levels)
        return lambda k: static
    return lambda k: allocation_candidates(errors[k], lattice, costs, budget, levels, allowed)


#: the per-step error given to lattice points no policy within the budget can run
UNUSABLE_ERROR = float("inf")


def usable_points(lattice: Sequence[Precision], budget: Budget) -> list[int]:
    """Indices of the lattice points some policy within ``budget`` can run: a point above the
    budget on one axis needs another usable point below it on that axis (W3A8 under a W3A3
    budget needs a point with fewer than 3 activation bits). Cheapest (weight, activation bits)
    first. ``check_budget`` has made sure one point fits."""
    use = sorted(range(len(lattice)), key=lambda i: (lattice[i].w_cost, lattice[i].a_cost))
    while True:
        below_w = any(lattice[i].w_cost < budget.w_bits - 1e-9 for i in use)
        below_a = any(lattice[i].a_cost < budget.a_bits - 1e-9 for i in use)
        keep = [i for i in use if (below_w or lattice[i].w_cost <= budget.w_bits + 1e-9)
                and (below_a or lattice[i].a_cost <= budget.a_bits + 1e-9)]
        if keep == use:
            return use
        use = keep


def uniform_anchor(lattice: Sequence[Precision], budget: Budget, num_groups: int) -> Assignment | None:
    """The uniform assignment at the most bits the budget allows for every group at every step
    (W4A4 for a W4A4 budget; None if no lattice point fits)."""
    fits = [i for i, p in enumerate(lattice) if p.w_cost <= budget.w_bits + 1e-9 and p.a_cost <= budget.a_bits + 1e-9]
    if not fits:
        return None
    best = max(fits, key=lambda i: (lattice[i].w_cost + lattice[i].a_cost, lattice[i].a_cost))
    return (best,) * num_groups


def measured_sensitivity(step_fn: Callable, fp_states: torch.Tensor, num_groups: int, lattice: Sequence[Precision],
                         progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One-step sensitivity ``[S, G, P]`` measured with ``step_fn`` (the search's own quantized
    layers): from the FP latents of step ``k`` (``fp_states[k]``), the error after step ``k`` with
    group ``g`` alone at precision ``p`` and every other group in 16-bit (0 for 16-bit itself)."""
    fp = next((i for i, p in enumerate(lattice) if p.w_bits >= 16 and p.a_bits >= 16), None)
    if fp is None:
        raise InputError("search: measured sensitivity needs a 16-bit lattice point")
    S = fp_states.shape[0] - 1
    out = np.zeros((S, num_groups, len(lattice)))
    pairs = [(g, p) for g in range(num_groups) for p in range(len(lattice)) if p != fp]
    for k in range(S):
        asgs = [tuple(p if h == g else fp for h in range(num_groups)) for g, p in pairs]
        for (g, p), (_, err) in zip(pairs, step_fn(fp_states[k], k, asgs)):
            out[k, g, p] = err
        if progress is not None:
            progress(k + 1, S)
    return out


def sensitivity_table(graph: Any, lattice: Sequence[Precision]) -> tuple[dict[str, list[str]], np.ndarray]:
    """From the ``adatsq.sensitivity`` annotations: the layer groups (group -> layers, graph order)
    and the one-step error ``[S, G, P]`` of every group at every step for every lattice precision
    (0 for 16-bit). A lattice precision the analysis did not measure is an error naming it."""
    from .infra import PreconditionError

    groups: dict[str, list[str]] = {}
    errs: dict[str, Any] = {}
    for p, nodes in layer_nodes(graph).items():
        sens = get_annotation(nodes[0], Sensitivity)
        if sens is None:
            raise PreconditionError(f"search: {p} has no sensitivity annotation (run the sensitivity analysis pass)")
        groups.setdefault(sens.group, []).append(p)
        errs[sens.group] = sens
    first = next(iter(errs.values()))
    S = len(first.group_error[0])
    out = np.zeros((S, len(groups), len(lattice)))
    for j, prec in enumerate(lattice):
        if prec.w_bits >= 16 and prec.a_bits >= 16:
            continue
        if prec.name not in first.precisions:
            raise PreconditionError(f"search: the sensitivity analysis did not measure {prec.name} (it measured "
                                    f"{', '.join(first.precisions)}); rerun it with that precision")
        for g, name in enumerate(groups):
            out[:, g, j] = errs[name].group_error[errs[name].precisions.index(prec.name)]
    return groups, out


def layer_transform_factory(transformer: Any, graph: Any, weights: str = "gptq-fisher",
                            prep: dict[str, Any] | None = None, group_size: int | None = None,
                            fisher_mix: float = 1.0, group_max_bits: int = 8) -> Callable:
    """``make(param, precision) -> LayerTransform``: the weights a precision runs with. ``rtn``:
    round to nearest; ``gptq`` / ``gptq-fisher``: GPTQ with the uniform / Fisher-weighted Hessian
    of the ``adatsq.hessian`` annotations. Activations: per-token dynamic at the precision's bits.

    With ``prep`` (param -> :class:`~adatsq.passes.weights.LayerPrep`), a layer's copies quantize
    its smoothed low-rank residual and run with its smoothing and 16-bit branch; ``group_size``
    quantizes in groups of that many inputs where it divides them (else per channel). The
    quantized copies made are kept in ``make.copies[copy_key(param, bits, group, fmt)]`` for the
    weights pass. NVFP4 points quantize in their blocks of 16 (their own scales).
    ``group_max_bits``: wider copies are per output channel (deployment targets run INT8 weights
    per channel). ``fisher_mix`` tempers the Fisher weighting (:func:`~adatsq.passes.weights.mix_hessians`)."""
    from .gptq import gptq
    from .weights import copy_key, mix_hessians
    from .quant import nvfp4_block, quantize_weight
    from .transforms import LayerTransform

    if weights not in WEIGHTS:
        raise InputError(f"search: unknown weights {weights!r} ({', '.join(WEIGHTS)})")
    params = dict(transformer.named_parameters())
    nodes = layer_nodes(graph)
    prep = prep or {}
    copies: dict = {}

    def make(param: str, prec: Precision):
        w = params[param].detach().float()
        if prec.w_bits >= 16:
            return LayerTransform(w, prec.a_bits)  # 16-bit: the layer as it is
        pr = prep.get(param)
        wq = pr.residual(w) if pr is not None else w
        if prec.fmt == "nvfp4":  # blocks of 16 whatever the build's integer group size
            group = nvfp4_block(wq.shape[1])
        else:
            group = (group_size if group_size and prec.w_bits <= group_max_bits and wq.shape[1] % group_size == 0
                     else None)
        key = copy_key(param, prec.w_bits, group, prec.fmt)
        if key not in copies:
            if weights == "rtn":
                copies[key] = quantize_weight(wq, prec.w_bits, group, fmt=prec.fmt)
            else:
                h = get_annotation(nodes[param][0], HessianRef)
                if h is None:
                    raise InputError(f"search: {param} has no Hessian for GPTQ weights (use weights='rtn')")
                hm = (mix_hessians(h.mean(0), h.mean(1), fisher_mix) if weights == "gptq-fisher" else h.mean(0))
                copies[key] = gptq(wq, pr.hessian(hm) if pr is not None else hm, prec.w_bits, group, fmt=prec.fmt)
        deq = copies[key].dequantize().reshape(wq.shape)
        a_fmt = prec.fmt if prec.a_bits < 16 else "int"
        return (pr.transform(deq, prec.a_bits, a_fmt) if pr is not None
                else LayerTransform(deq, prec.a_bits, a_fmt=a_fmt))

    make.copies = copies
    return make


def search_plan(graph: Any, calib: Any, fp_latents: Any, budget: Budget, options: SearchOptions = SearchOptions(),
                make_transform: Callable | None = None, progress: Callable[[int, int], None] | None = None,
                sensitivity_progress: Callable[[int, int], None] | None = None, device: Any = "cpu"):
    """Search a precision plan for the analysed ``graph`` (sensitivity and, for GPTQ weights,
    Hessian annotations) under ``budget``; annotates every layer node with ``adatsq.precision``.
    ``device``: where the search samples (the held-out FP trajectory, the measured sensitivity and
    every candidate's step) run; the weight copies are made on the CPU and moved there, and the
    model is back on the CPU when this returns. A GPU makes hundreds of search samples cheap: the
    objective's noise floor falls as 1/sqrt(samples) (tools/search_noise.py).
    Returns (PrecisionPlan, SearchResult, groups)."""
    from ..frontend.layers import LayerTable
    from .plan import PrecisionPlan, fingerprint_graph
    from .transforms import transformed_layers

    lattice = options.points()
    table = LayerTable.from_graph(graph)
    groups, errors = sensitivity_table(graph, lattice)
    costs = Costs(tuple(float(sum(table[p].params for p in ls)) for ls in groups.values()),
                  tuple(float(sum((table[p].macs or table[p].macs_per_token) for p in ls)) for ls in groups.values()))
    check_budget(lattice, budget)
    options.validate()
    transformer = calib.denoiser.transformer
    make = make_transform or layer_transform_factory(transformer, graph)
    usable = usable_points(lattice, budget)
    # a forced budget (one usable point, e.g. W3A3 on W3A3/W4A4/...) runs that point only: no other
    # precision's copies are made or measured. The measured sensitivity holds the other groups in
    # 16-bit: a lattice without a 16-bit point gets one for that measurement only (never proposed)
    forced = len(usable) == 1
    measure = tuple(lattice[i] for i in usable)
    if not forced and options.sensitivity == "measured" and not any(p.w_bits >= 16 and p.a_bits >= 16 for p in measure):
        measure = (*measure, Precision("FP16", 16, 16))
    switch = SwitchableLayers({p: {prec.name: make(p, prec) for prec in measure} for ls in groups.values() for p in ls})
    with _search_device(calib, switch, device):
        if options.score == "heldout":
            calib, fp_latents, samples = heldout_set(calib, options.samples)
        else:
            n_seeds = len(calib.seeds)
            order = [c * n_seeds + s for s in range(n_seeds) for c in range(len(calib.conditions))]
            samples = order[:min(options.samples, len(order))]
        step_fn = model_step_fn(calib, switch, groups, lattice, fp_latents, samples)
        if forced:  # the only feasible policy is that point everywhere
            errors = np.zeros_like(errors)
        elif options.sensitivity == "measured":
            sens_fn = model_step_fn(calib, switch, groups, measure, fp_latents, samples[:options.sensitivity_samples])
            with transformed_layers(transformer, switch.transforms()):
                measured = measured_sensitivity(sens_fn, fp_latents[:, samples[:options.sensitivity_samples]],
                                                len(groups), measure, sensitivity_progress)
            errors = np.zeros_like(errors)
            errors[:, :, usable] = measured[:, :, :len(usable)]
        # points no policy within the budget can run are never proposed (their copies are not made)
        errors[:, :, [i for i in range(len(lattice)) if i not in usable]] = UNUSABLE_ERROR
        # under a memory budget the dynamic search chooses among the copies that fit it
        allowed = (select_copies(errors, lattice, costs, budget, options.memory_bits)
                   if options.memory_bits is not None and options.policy == "dynamic" else None)
        with transformed_layers(transformer, switch.transforms()):
            cands = policy_candidates(options.policy, errors, lattice, costs, budget, options.levels, allowed)
            res = beam_search(calib.num_steps, lattice, costs, budget, cands, step_fn, fp_latents[0, samples].clone(),
                              beam=options.beam, progress=progress,
                              static=options.policy in ("per-layer", "uniform"), pace=options.pace,
                              anchor=uniform_anchor(lattice, budget, len(groups)) if options.anchor else None,
                              memory_bits=options.memory_bits, max_segments=options.max_segments)
    names = list(groups)
    group_of = {p: n for n, ls in groups.items() for p in ls}
    layers = tuple(table.names)
    assignment = tuple(tuple(lattice[asg[names.index(group_of[p])]].name for p in layers) for asg in res.policy)
    plan = PrecisionPlan(fingerprint_graph(graph), calib.schedule, tuple(lattice), layers, assignment, budget,
                         PrecisionPlan.averages(assignment, lattice, layers, table))
    for p, nodes in layer_nodes(graph).items():
        value = LayerPrecision(p, group_of[p], tuple(row[layers.index(p)] for row in assignment))
        for node in nodes:
            annotate(node, value)
    return plan, res, groups


@contextlib.contextmanager
def _search_device(calib: Any, switch: SwitchableLayers, device: Any):
    """The switch's layers and the model on ``device`` for the search (the latents stay on the CPU:
    the denoiser moves them in and out); the model is back on the CPU afterwards."""
    dev = torch.device(device)
    if dev.type == "cpu":
        yield
        return
    from .transforms import transforms_to

    switch.options = {p: transforms_to(o, dev) for p, o in switch.options.items()}
    calib.denoiser.to(dev)
    try:
        yield
    finally:
        calib.denoiser.to("cpu")
